#!/usr/bin/env bash
# The newest transformers the library accepts (constraints-latest.txt: transformers 5.25 + the Hub `kernels`
# package it requires): a second virtual environment (.venv-latest, rebuilt each run) and the kernel, loss,
# trainer, model-loading and TRL tests in it, with the ones that lean on transformers' masks and generate (prompt
# sharing's custom 4-D masks, the rollout prefill's repeated cache) or on its module classes (the lean RMSNorm /
# SwiGLU forwards). Run by .ci/run after the main suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
rm -rf .venv-latest
"$PY" -m venv .venv-latest
.venv-latest/bin/python -m pip install -q --upgrade pip
.venv-latest/bin/pip install -q -c constraints-latest.txt -e ".[dev,trl]"
.venv-latest/bin/python -c "import transformers; print('transformers', transformers.__version__, 'in .venv-latest')"
# pytest-benchmark is not in [dev,trl]: the project's addopts (--benchmark-skip) are replaced here
.venv-latest/bin/python -m pytest -o addopts=-ra -q -p no:cacheprovider \
  tests/kernels/test_logprobs.py tests/kernels/test_red_loss.py tests/red/test_update.py \
  tests/red/test_prompt_sharing.py tests/red/test_packing.py tests/red/test_hf_engine_eval.py \
  tests/rollout/test_model_overrides.py tests/integrations/test_trl.py tests/red/test_lean_layers.py \
  tests/red/test_gradient_free.py
