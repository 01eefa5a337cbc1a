#!/usr/bin/env bash
# The experiments, run from the repository root on the final code (JOBS=2 runs at a time on a 2-core CPU).
#   experiments/run.sh sweep      # tuning on the validation split (experiments/embedded/sweep.yaml) -> sweep.json/md
#   experiments/run.sh embedded   # the decisive comparison with the sweep's choices: 8 arms x 5 seeds, 400 held-out
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
  for run in runs/"$name"/*/seed_*/; do
    local dest="experiments/$name/${run#runs/$name/}"
    mkdir -p "$dest" && cp "$run/summary.json" "$run/metrics.jsonl" "$dest"
  done
  { echo "command: $*"; echo "commit: $(git rev-parse HEAD)$(git diff --quiet HEAD -- red red_kernels || echo ' (dirty)')";
    echo "date: $(date -u +%FT%TZ)"; } > "experiments/$name/COMMAND.txt"
}

case "${1:-}" in
  sweep)   # every knob on the validation split, the same number of trials per method (experiments/embedded/sweep.yaml)
    cmd=("$PY" -m red.sweep run experiments/embedded/sweep.yaml --jobs "${JOBS:-2}")
    "${cmd[@]}"
    cp runs/sweep/sweep.json runs/sweep/sweep.md experiments/embedded/
    { echo "command: ${cmd[*]}"; echo "commit: $(git rev-parse HEAD)"; echo "date: $(date -u +%FT%TZ)"; } \
      > experiments/embedded/SWEEP_COMMAND.txt
    ;;
  embedded)   # the decisive comparison: the sweep's chosen settings (validation) + ablations, 5 seeds, 400 held-out
    [ -f experiments/embedded/sweep.json ] || { echo "run '$0 sweep' first (settings are chosen on validation)" >&2; exit 2; }
    arms=$("$PY" -m red.sweep arms experiments/embedded/sweep.json)
    cmd=("$PY" -m red.compare --arms "$arms" --seeds 5 --baseline grpo --jobs "${JOBS:-2}"
         train.steps=24 eval.every=8 data.synthetic_eval_size=400 checkpoint.every=0 output_dir=runs/embedded)
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
    echo "usage: $0 sweep|embedded|smollm2" >&2; exit 2 ;;
esac
