#!/usr/bin/env bash
# Prepare MovieLens-100k, build the default (untrained SmolLM2) checkpoint, evaluate it.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${R2EC_DATA_DIR:-data}
CKPT=${R2EC_CHECKPOINT:-checkpoints/current}
r2ec data prepare ml-100k --protocol loo --data-dir "$DATA"
[[ -f "$CKPT/r2ec.json" ]] || r2ec checkpoint init --data "$DATA/ml-100k/loo" --out "$CKPT"
r2ec eval --data "$DATA/ml-100k/loo" --baseline pop
r2ec eval --data "$DATA/ml-100k/loo" --checkpoint "$CKPT" --limit 64
