#!/usr/bin/env bash
# One-shot GPU check, about 5 minutes on a fresh GPU machine (image: CUDA PyTorch, Triton, numpy; no network):
#   1. correctness of the compiled Triton kernels (tests/test_linear_logprobs.py, tests/test_red_loss*.py run
#      with RED_KERNELS_TEST_DEVICE=cuda, TRITON_INTERPRET=0);
#   2. the GPU benchmarks (bench/gpu_bench.py: no pytest-benchmark needed), written as <gpu>.json/.md/.png.
# Usage, from anywhere:   bash bench/gpu_check.sh
# Output goes to $OUT when set (the device runner's return folder), else bench/results/.
# Optional offline wheels: put pure-Python wheels (pytest + pluggy + iniconfig, hypothesis + sortedcontainers,
# liger-kernel) in $RED_WHEELS (default .cache/wheels) to install them first, e.g. made on a networked machine:
#   pip download --no-deps -d .cache/wheels pytest pluggy iniconfig hypothesis sortedcontainers liger-kernel
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="${OUT:-bench/results}"
WHEELS="${RED_WHEELS:-.cache/wheels}"
mkdir -p "$DEST"
log() { echo "[gpu_check $(date +%T)] $*" | tee -a "$DEST/gpu_check.log"; }

log "start in $(pwd), writing to $DEST"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$DEST/gpu_check.log"
# Install from the local wheels only what is missing (never touches packages already there).
for spec in pytest:pytest hypothesis:hypothesis liger_kernel:liger-kernel; do
    mod=${spec%%:*}; dist=${spec##*:}
    if ! python -c "import $mod" 2>/dev/null && compgen -G "$WHEELS/*.whl" >/dev/null; then
        log "installing $dist from $WHEELS"
        flags=(--no-index --find-links "$WHEELS" -q)
        [ "$dist" = liger-kernel ] && flags+=(--no-deps)   # its torch/triton requirement: the image's own
        python -m pip install "${flags[@]}" "$dist" 2>&1 | tail -3 | tee -a "$DEST/gpu_check.log"
    fi
done
python - <<'EOF' 2>&1 | tee -a "$DEST/gpu_check.log"
import importlib.util, torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
print("importable:", {m: importlib.util.find_spec(m) is not None
                      for m in ("pytest", "hypothesis", "pytest_benchmark", "liger_kernel", "transformers")})
EOF

tests_rc=0
if python -c "import pytest" 2>/dev/null; then
    log "1/2 correctness tests on the compiled Triton path"
    # -o addopts= drops pyproject's --benchmark-skip, which fails when pytest-benchmark is absent.
    TRITON_INTERPRET=0 RED_KERNELS_TEST_DEVICE=cuda timeout 140 \
        python -m pytest -o addopts= -p no:cacheprovider -q -rfE --durations=5 \
        tests/test_linear_logprobs.py tests/test_red_loss*.py 2>&1 | tee "$DEST/gpu_tests.log"
    tests_rc=${PIPESTATUS[0]}
    log "tests exit code $tests_rc"
else
    log "1/2 SKIPPED: pytest is not installed (put its wheels in $WHEELS)"
    tests_rc=3
fi

log "2/2 benchmarks"
# shellcheck disable=SC2086  # GPU_CHECK_BENCH_ARGS: extra flags, e.g. "--models qwen2.5-0.5b --impls naive,triton"
TRITON_INTERPRET=0 timeout 170 python -m bench.gpu_bench --out "$DEST" --budget-s 120 ${GPU_CHECK_BENCH_ARGS:-} \
    --note "bench/gpu_check.sh; tests exit code $tests_rc" 2>&1 | tee "$DEST/gpu_bench.log"
bench_rc=${PIPESTATUS[0]}
log "benchmarks exit code $bench_rc"
# Packed vs padded trainer passes (flash_attention_2 / torch varlen_attn; prints "nothing to check" without either).
timeout 120 python -m bench.test_bench_packing --device cuda --out "$DEST" 2>&1 | tee "$DEST/gpu_packing.log"; log "packing check exit code ${PIPESTATUS[0]}"
log "done"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
