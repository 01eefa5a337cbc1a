#!/usr/bin/env bash
# The issue-10 experiments, run from the repository root on the final code (one job at a time on a 2-core CPU).
#   experiments/run.sh embedded   # 5 modes x 3 seeds on the embedded default (python -m red.train's task)
#   experiments/run.sh smollm2    # grpo, luffy, red on SmolLM2-135M-Instruct (vLLM rollouts)
# Each writes runs/<name>/compare.{json,md,png} and copies them (not the runs) to experiments/<name>/ with the
# command and commit. Re-running skips finished runs (red.compare resumes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

publish() {   # publish NAME COMMAND...
  local name=$1; shift
  mkdir -p "experiments/$name"
  cp "runs/$name/compare.json" "runs/$name/compare.md" "runs/$name/compare.png" "experiments/$name/"
  for run in runs/"$name"/*/seed_*/; do   # each run's summary + per-step metrics (kilobytes; no weights)
    local dest="experiments/$name/${run#runs/$name/}"
    mkdir -p "$dest" && cp "$run/summary.json" "$run/metrics.jsonl" "$dest"
  done
  { echo "command: $*"; echo "commit: $(git rev-parse HEAD)$(git diff --quiet HEAD -- red red_kernels || echo ' (dirty)')";
    echo "date: $(date -u +%FT%TZ)"; } > "experiments/$name/COMMAND.txt"
}

case "${1:-}" in
  embedded)
    cmd=("$PY" -m red.compare --modes sft,sft_then_grpo,grpo,luffy,red --seeds 3 --baseline grpo
         output_dir=runs/embedded)
    "${cmd[@]}"
    publish embedded "${cmd[@]}"
    ;;
  smollm2)
    export OMP_NUM_THREADS=2
    "$PY" experiments/smollm2/prepare.py            # model link + held-out file (and, once, --base-score)
    cmd=("$PY" -m red.compare --config red/configs/smollm2-135m.yaml --modes grpo,luffy,red --seeds 1
         --baseline grpo output_dir=runs/smollm2 eval.before=false)
    "${cmd[@]}"
    publish smollm2 "${cmd[@]}"
    ;;
  *)
    echo "usage: $0 embedded|smollm2" >&2; exit 2 ;;
esac
