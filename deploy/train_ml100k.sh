#!/usr/bin/env bash
# The ml-100k training recipe: the rationale stage (reasoning cold start, from the backbone),
# then RecPO warm-started from it. About 75 minutes on a 2-core CPU (BENCHMARKS.md §1-2).
# Usage: bash deploy/train_ml100k.sh [RUNS_DIR]
# A run killed midway continues where it stopped: rerun with RESUME=1.
set -euo pipefail
runs=${1:-runs/ml100k}
data=data/ml-100k/loo
resume=()
[ "${RESUME:-0}" = 1 ] && resume=(--resume)
[ -f "$data/meta.json" ] || r2ec data prepare ml-100k --protocol loo
if [ ! -f "$runs/rationale/done" ]; then
  r2ec train --data "$data" --out "$runs/rationale" --base smollm2 --config configs/ml100k-rationale.yaml "${resume[@]}"
  touch "$runs/rationale/done"
fi
r2ec train --data "$data" --out "$runs/recpo" --base "$runs/rationale/best" --config configs/ml100k-recpo.yaml \
  $( [ -f "$runs/recpo/last/trainer_state.pt" ] && [ "${RESUME:-0}" = 1 ] && echo --resume )
echo "checkpoints: $runs/rationale/best (rationale stage) and $runs/recpo/best (+ RecPO)"
