#!/usr/bin/env bash
# GPU smoke of the trainer: a 2-step `red.train` on one GPU in bf16 (fp32 master weights, autocast), HF engine,
# the tiny synthetic model (no download), then the precision block and the per-step times. About 1 minute.
# Usage: bash bench/gpu_smoke_train.sh   (called by bench/gpu_check.sh; output under $OUT or bench/results/)
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="${OUT:-bench/results}"
RUN="$DEST/smoke_train"
mkdir -p "$DEST"
timeout 240 python -m red.train device=cuda model.dtype=bfloat16 rollout.engine=hf output_dir="$RUN" \
    train.steps=2 warmup.enabled=false data.synthetic_eval_size=16 eval.every=0 checkpoint.resume=never \
    log.progress=false log.plot=false 2>&1 | tail -5 | tee "$DEST/gpu_smoke_train.log"
rc=${PIPESTATUS[0]}
python - "$RUN" <<'PY' 2>&1 | tee -a "$DEST/gpu_smoke_train.log"
import json, os, sys
run = sys.argv[1]
print("precision:", json.load(open(os.path.join(run, "summary.json")))["precision"])
for r in (json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))):
    if r.get("step", 0) >= 1:
        print(f"step {r['step']}: " + " ".join(f"{k}={r[k]:.3f}s" for k in sorted(r) if k.startswith("time_")))
PY
exit "$rc"
