#!/usr/bin/env bash
# The ml-100k training recipe: contrastive warm-up, then RecPO warm-started from it.
# Usage: bash deploy/train_ml100k.sh [RUNS_DIR]   (about 110 minutes on a 2-core CPU)
set -euo pipefail
runs=${1:-runs/ml100k}
data=data/ml-100k/loo
[ -f "$data/meta.json" ] || r2ec data prepare ml-100k --protocol loo
r2ec train --data "$data" --out "$runs/warmup" --base smollm2 --config configs/ml100k-warmup.yaml
r2ec train --data "$data" --out "$runs/recpo" --base "$runs/warmup" --config configs/ml100k-recpo.yaml
echo "checkpoints: $runs/warmup/best (no reasoning) and $runs/recpo/best (RecPO)"
