#!/usr/bin/env bash
# Held-out loss of KD (forward KL to the default teacher) vs plain LM-loss training of the same
# width-pruned student, same tokens and settings. Needs a pruned student dir as $1 (from `minitron prune`).
#   bash benchmarks/kd_vs_lm.sh runs/student-w50 runs/kd-vs-lm 32768
set -euo pipefail
STUDENT=$1; OUT=${2:-runs/kd-vs-lm}; TOKENS=${3:-32768}
COMMON="--data default --tokens $TOKENS --batch-size 8 --seq-len 256 --lr 3e-4 --min-lr 3e-5 \
        --eval-every 4 --eval-batches 2 --save-every 8 --no-progress"
python -m minitron.cli distill --teacher default --student "$STUDENT" --out "$OUT/kd" $COMMON &
python -m minitron.cli correct --model "$STUDENT" --out "$OUT/lm" $COMMON &
wait
python - "$OUT" <<'PY'
import json, sys
for name in ("kd", "lm"):
    rows = [json.loads(line) for line in open(f"{sys.argv[1]}/{name}/metrics.jsonl")]
    print(name, [(r["tokens"], round(r["val_lm_loss"], 4)) for r in rows if "val_lm_loss" in r])
PY
