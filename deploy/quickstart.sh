#!/usr/bin/env bash
# Prepare MovieLens-100k, make sure a checkpoint exists, serve it on http://127.0.0.1:8000.
#   bash deploy/quickstart.sh                                   the shipped trained model (artifacts/ml100k)
#   R2EC_UNTRAINED=1 bash deploy/quickstart.sh                  the untrained SmolLM2 instead
#   R2EC_CHECKPOINT=runs/ml100k/recpo bash deploy/quickstart.sh  a run of yours (its best/)
# Histories live in process unless R2EC_REDIS_URL is set (e.g. redis://127.0.0.1:6379/0).
set -euo pipefail
cd "$(dirname "$0")/.."
# r2ec from the interpreter deploy/setup.sh installed into (python3 on PATH: an activated virtual
# environment's), not whichever `r2ec` script comes first on PATH. Asked from / : here the
# checkout's own r2ec_serve.egg-info would answer for any python3.
if ! (cd / && python3 -c 'import importlib.metadata as m; m.version("r2ec-serve")') 2>/dev/null; then
  hint=""
  [[ -z "${VIRTUAL_ENV:-}" && -d .venv ]] && hint=", or activate the venv it installed into: . .venv/bin/activate"
  echo "error: r2ec is not installed for python3 ($(command -v python3 || echo 'not found')):" \
    "run bash deploy/setup.sh first$hint" >&2
  exit 1
fi
r2ec() { python3 -m cli "$@"; }
DATA=${R2EC_DATA_DIR:-data}
SHIPPED=artifacts/ml100k
if [[ "${R2EC_UNTRAINED:-0}" == 1 ]]; then
  export R2EC_CHECKPOINT=${R2EC_CHECKPOINT:-checkpoints/untrained}
else
  export R2EC_CHECKPOINT=${R2EC_CHECKPOINT:-checkpoints/current}
fi
[[ -f "$DATA/ml-100k/loo/meta.json" ]] || r2ec data prepare ml-100k --protocol loo --data-dir "$DATA"
# (init refuses to write over a path that holds something other than a checkpoint)
if ! r2ec checkpoint show "$R2EC_CHECKPOINT" >/dev/null 2>&1; then
  if [[ "${R2EC_UNTRAINED:-0}" != 1 && -f "$SHIPPED/r2ec.json" ]]; then
    # The model trained by deploy/train_ml100k.sh, shipped as a LoRA adapter: encode the catalog once.
    r2ec checkpoint init --data "$DATA/ml-100k/loo" --out "$R2EC_CHECKPOINT" --from "$SHIPPED"
  else
    # The untrained backbone with the catalog encoded: a working service before any training.
    r2ec checkpoint init --data "$DATA/ml-100k/loo" --out "$R2EC_CHECKPOINT"
  fi
fi
echo "serving $R2EC_CHECKPOINT on http://${R2EC_HOST:-127.0.0.1}:${R2EC_PORT:-8000} (try the curl in README.md)"
exec python3 -m cli serve
