#!/usr/bin/env bash
# The ml-100k training recipe, a 100-minute budget (~107 minutes of wall time) on a 2-core CPU (BENCHMARKS.md §1-2):
#   1. one run from the backbone (configs/ml100k-onestage.yaml): the rationale objective (the
#      reasoning cold start) with co-watch hints in the prompt (model/cowatch.py) and the
#      distillation to their counts: the recipe of the model artifacts/ml100k ships (that one was
#      bounded at 330 steps: configs/ml100k-onestage.yaml says how);
#   2. only with RECPO=1: RecPO from it, 10 minutes. Measured (BENCHMARKS.md §1): on the
#      earlier two-stage model (stop 20) it left the reasoning mode within noise and lowered the
#      no-reasoning one; on this model (stop 29) it lowered both a little (0.0849 -> 0.0831).
# The earlier two-stage recipe (configs/ml100k-rationale.yaml, then configs/ml100k-hints.yaml,
# ~113 minutes) measured no better, within noise per user (stop 28).
# Usage: bash deploy/train_ml100k.sh [RUNS_DIR]
# A finished stage (RUNS_DIR/NAME/done) is skipped; remove its directory to train it again. A
# stage killed midway is not started over by a plain rerun (`r2ec train` refuses an --out that
# holds a run): rerun with RESUME=1 to continue it from its last save, or OVERWRITE=1 to replace it.
set -euo pipefail
runs=$(realpath -m "${1:-runs/ml100k}")  # relative to where it was called from
cd "$(dirname "$0")/.."                   # configs/ and the default data dir are the repo's
data_dir=${R2EC_DATA_DIR:-data}
data=$data_dir/ml-100k/loo
[ -f "$data/meta.json" ] || r2ec data prepare ml-100k --protocol loo --data-dir "$data_dir"

stage() {  # stage NAME BASE CONFIG: train into $runs/NAME unless it finished before
  local name=$1 base=$2 config=$3 run=$runs/$1 how=()
  [ -f "$run/done" ] && return 0
  if [ "${RESUME:-0}" = 1 ] && [ -f "$run/last/trainer_state.pt" ]; then
    how=(--resume)
  elif [ "${OVERWRITE:-0}" = 1 ]; then
    how=(--overwrite)
  elif [ -e "$run/best" ] || [ -e "$run/last" ] || [ -e "$run/log.jsonl" ]; then  # a stage cut short
    if [ "${RESUME:-0}" = 1 ]; then
      echo "error: $run holds a run cut short before its first save (no last/trainer_state.pt):" \
        "nothing to resume; rerun with OVERWRITE=1 to start it over" >&2
    else
      echo "error: $run holds a run cut short: rerun with RESUME=1 to continue it from its last" \
        "save, or OVERWRITE=1 to start it over" >&2
    fi
    exit 2
  fi
  r2ec train --data "$data" --out "$run" --base "$base" --config "$config" "${how[@]}"
  touch "$run/done"
}

stage onestage smollm2 configs/ml100k-onestage.yaml
[ "${RECPO:-0}" = 1 ] && stage recpo "$runs/onestage/best" configs/ml100k-recpo.yaml
echo "checkpoint: $runs/onestage/best (the recipe artifacts/ml100k ships)"
