#!/usr/bin/env bash
# One-shot GPU check, at most ~8 minutes (stage timeouts 110 + 45 + 110 + 65 + 60 + 60 + 40 s) on a fresh GPU machine (image: CUDA PyTorch, Triton, numpy; no network):
#   1. correctness of the compiled Triton kernels (tests/kernels with RED_KERNELS_TEST_DEVICE=cuda,
#      TRITON_INTERPRET=0, one pinned tile config; test_triton_variants.py pins each GPU config once, baseline and
#      lean), then bitwise batch invariance (tests/kernels/test_triton_gpu.py, autotuned and pinned);
#   2. the GPU benchmarks (bench/gpu_bench.py: no pytest-benchmark needed), written as <gpu>.json/.md/.png;
#   3. the Triton kernel variants side by side (bench/gpu_variants.py), into the same <gpu>.json;
#   4. the vLLM smoke stage (bench/gpu_vllm_smoke.py), only where vLLM is installed (else it says SKIPPED);
#   5. a 2-step bf16 red.train smoke run (bench/gpu_smoke_train.sh): precision block and step times;
#   6. packed vs padded trainer passes (bench/test_bench_packing.py --device cuda) where a varlen attention exists.
# `python -m bench.gpu_bench --dry-run` (any machine) lists what stages 2-3 time, with estimated device time.
# Usage, from anywhere:   bash bench/gpu_check.sh
# Output goes to $OUT when set (the device runner's return folder), else bench/results/.
# Optional offline wheels: put pure-Python wheels (pytest + pluggy + iniconfig, hypothesis + sortedcontainers,
# liger-kernel, trl; for the trainer smoke omegaconf + antlr4-python3-runtime, pebble, math-verify +
# latex2sympy2_extended) in $RED_WHEELS (default .cache/wheels) to install them first, e.g. on a networked machine:
#   pip download --no-deps -d .cache/wheels pytest pluggy iniconfig hypothesis sortedcontainers liger-kernel \
#       trl==1.16.0 omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 pebble==5.2.3 math-verify==0.9.0 latex2sympy2_extended==1.11.0
# liger-kernel and trl go in with --no-deps: the bench peers need only torch/triton (liger) and transformers (trl's
# kernels module imports transformers.utils; without transformers in the image the trl rows are skipped).
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="${OUT:-bench/results}"
WHEELS="${RED_WHEELS:-.cache/wheels}"
mkdir -p "$DEST"
log() { echo "[gpu_check $(date +%T)] $*" | tee -a "$DEST/gpu_check.log"; }

log "start in $(pwd), writing to $DEST"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$DEST/gpu_check.log"
# Install from the local wheels only what is missing (never touches packages already there).
for spec in pytest:pytest hypothesis:hypothesis liger_kernel:liger-kernel trl:trl antlr4:antlr4-python3-runtime \
        omegaconf:omegaconf pebble:pebble latex2sympy2_extended:latex2sympy2_extended math_verify:math-verify; do
    mod=${spec%%:*}; dist=${spec##*:}
    if ! python -c "import $mod" 2>/dev/null && compgen -G "$WHEELS/*.whl" >/dev/null; then
        log "installing $dist from $WHEELS"
        flags=(--no-index --find-links "$WHEELS" -q)
        # their torch/triton/transformers requirements: the image's own (trl's datasets/pandas: not needed here)
        case "$dist" in liger-kernel|trl|omegaconf|math-verify|latex2sympy2_extended) flags+=(--no-deps) ;; esac
        python -m pip install "${flags[@]}" "$dist" 2>&1 | tail -3 | tee -a "$DEST/gpu_check.log"
    fi
done
python - <<'EOF' 2>&1 | tee -a "$DEST/gpu_check.log"
import importlib.util, torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
print("importable:", {m: importlib.util.find_spec(m) is not None
                      for m in ("pytest", "hypothesis", "pytest_benchmark", "liger_kernel", "trl", "transformers", "omegaconf", "pebble", "math_verify")})
EOF

tests_rc=0
if python -c "import pytest" 2>/dev/null; then
    log "1/6 correctness tests on the compiled Triton path"
    # -o addopts= drops pyproject's --benchmark-skip, which fails when pytest-benchmark is absent.
    TRITON_INTERPRET=0 RED_KERNELS_TEST_DEVICE=cuda RED_KERNELS_TRITON_CONFIG=default timeout 110 \
        python -m pytest -o addopts= -p no:cacheprovider -q -rfE --durations=5 \
        tests/kernels --ignore=tests/kernels/test_triton_gpu.py --ignore=tests/kernels/test_triton_compile.py \
        --deselect tests/kernels/test_logprobs.py::test_kernels_compile_for_hopper_without_gpu \
        2>&1 | tee "$DEST/gpu_tests.log"   # (the CPU-side sm_90 compile checks: the GPU compiles for real)
    tests_rc=${PIPESTATUS[0]}
    TRITON_INTERPRET=0 RED_KERNELS_TEST_DEVICE=cuda timeout 45 \
        python -m pytest -o addopts= -p no:cacheprovider -q -rfE tests/kernels/test_triton_gpu.py 2>&1 \
        | tee -a "$DEST/gpu_tests.log"
    [ "${PIPESTATUS[0]}" = 0 ] || tests_rc=1
    log "tests exit code $tests_rc"
else
    log "1/6 SKIPPED: pytest is not installed (put its wheels in $WHEELS)"
    tests_rc=3
fi

log "2/6 benchmarks"
# shellcheck disable=SC2086  # GPU_CHECK_BENCH_ARGS: extra flags, e.g. "--models qwen2.5-0.5b --impls naive,triton"
TRITON_INTERPRET=0 timeout 110 python -m bench.gpu_bench --out "$DEST" --budget-s 85 --variants none \
    ${GPU_CHECK_BENCH_ARGS:-} --note "bench/gpu_check.sh; tests exit code $tests_rc" 2>&1 | tee "$DEST/gpu_bench.log"
bench_rc=${PIPESTATUS[0]}
log "benchmarks exit code $bench_rc"
log "3/6 Triton kernel variants"
TRITON_INTERPRET=0 timeout 65 python -m bench.gpu_bench --out "$DEST" --variants only --variants-budget-s 50 \
    --note "bench/gpu_check.sh; tests exit code $tests_rc" 2>&1 | tee "$DEST/gpu_variants.log"
[ "${PIPESTATUS[0]}" = 0 ] || bench_rc=1
log "4/6 vLLM smoke"
# vLLM smoke (bench/gpu_vllm_smoke.py, < 3 min; prints SKIPPED and passes where vLLM is not installed)
TRITON_INTERPRET=0 timeout 60 python -m bench.gpu_vllm_smoke --out "$DEST" 2>&1 | tee "$DEST/gpu_vllm_smoke.log"; vllm_rc=${PIPESTATUS[0]}
log "vLLM smoke exit code $vllm_rc"
log "5/6 trainer smoke (2 bf16 steps)"; timeout 60 bash bench/gpu_smoke_train.sh; smoke_rc=$?; log "trainer smoke exit code $smoke_rc"
log "6/6 packed vs padded passes"
# Packed vs padded trainer passes (flash_attention_2 / torch varlen_attn; prints "nothing to check" without either).
timeout 40 python -m bench.test_bench_packing --device cuda --out "$DEST" 2>&1 | tee "$DEST/gpu_packing.log"; log "packing check exit code ${PIPESTATUS[0]}"
log "done"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ] && [ "$vllm_rc" = 0 ] && [ "$smoke_rc" = 0 ]
