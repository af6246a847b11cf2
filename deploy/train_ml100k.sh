#!/usr/bin/env bash
# The ml-100k training recipe, about 110 minutes on a 2-core CPU (BENCHMARKS.md §1-2):
#   1. the rationale stage (reasoning cold start) from the backbone, 60 minutes;
#   2. the same objective with co-watch hints in the prompt (model/cowatch.py), warm-started
#      from stage 1, 50 minutes: the model artifacts/ml100k ships;
#   3. only with RECPO=1: RecPO from stage 2, 10 minutes. Measured (BENCHMARKS.md §1, stop 20): it
#      leaves the reasoning mode within noise (0.078-0.080 NDCG@10) and lowers the no-reasoning one.
# Usage: bash deploy/train_ml100k.sh [RUNS_DIR]
# A run killed midway continues where it stopped: rerun with RESUME=1.
set -euo pipefail
runs=${1:-runs/ml100k}
data=data/ml-100k/loo
[ -f "$data/meta.json" ] || r2ec data prepare ml-100k --protocol loo

stage() {  # stage NAME BASE CONFIG: train into $runs/NAME unless it finished before
  local name=$1 base=$2 config=$3 resume=()
  [ -f "$runs/$name/done" ] && return 0
  [ "${RESUME:-0}" = 1 ] && [ -f "$runs/$name/last/trainer_state.pt" ] && resume=(--resume)
  r2ec train --data "$data" --out "$runs/$name" --base "$base" --config "$config" "${resume[@]}"
  touch "$runs/$name/done"
}

stage rationale smollm2 configs/ml100k-rationale.yaml
stage hints "$runs/rationale/best" configs/ml100k-hints.yaml
[ "${RECPO:-0}" = 1 ] && stage recpo "$runs/hints/best" configs/ml100k-recpo.yaml
echo "checkpoints: $runs/rationale/best (stage 1), $runs/hints/best (stage 2, what artifacts/ml100k ships)"
