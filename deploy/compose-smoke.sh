#!/usr/bin/env bash
# docker compose, run for real: build the image, bring the stack up, use it, retrain once, take
# it down. Bounded in time; whatever it started is removed on any exit (containers, network,
# volumes; the image stays, so the next run builds from cache).
#
#   bash deploy/compose-smoke.sh
#
# Settings (environment):
#   R2EC_DOCKER_BUILD_ARGS  extra `docker build` arguments, e.g. on a machine without the PyTorch
#                           index: "--network host --build-arg TORCH_INDEX_URL=
#                           --build-arg WHEELS_URL=http://127.0.0.1:18081/"
#   R2EC_ML100K_DIR         a folder with recbole-1.2.1-py3-none-any.whl (or ml-100k.inter/.item),
#                           mounted into init so it works offline (default: deploy/ml100k)
#   R2EC_INIT_BASE          the first checkpoint's backbone (default tiny: a random 2-layer model,
#                           so the smoke takes minutes; smollm2 is the real default of compose)
#   R2EC_HOST_PORT          the api's port on 127.0.0.1 (default 18000)
#   R2EC_SMOKE_TIMEOUT_S    the whole run's limit (default 2400)
# Prints one `compose smoke: PASS ...` line at the end, or `compose smoke: FAIL ...` and exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."

export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-r2ec-smoke}
export R2EC_HOST_PORT=${R2EC_HOST_PORT:-18000}
export R2EC_INIT_BASE=${R2EC_INIT_BASE:-tiny}
export R2EC_ML100K_DIR=${R2EC_ML100K_DIR:-./deploy/ml100k}
limit=${R2EC_SMOKE_TIMEOUT_S:-2400}
api="http://127.0.0.1:${R2EC_HOST_PORT}"
started=$SECONDS

if docker compose version >/dev/null 2>&1; then compose=(docker compose); else compose=(docker-compose); fi
log() { printf '[%5ds] %s\n' $((SECONDS - started)) "$*"; }
fail() {
  log "compose smoke: FAIL: $*"
  "${compose[@]}" ps || true
  "${compose[@]}" logs --tail 40 init api || true
  exit 1
}
left() { echo $((limit - (SECONDS - started))); }
bounded() { # bounded SECONDS CMD...: run CMD with at most SECONDS (and what is left of the limit)
  local s=$1; shift
  (($(left) < s)) && s=$(left)
  ((s > 0)) || fail "time limit of ${limit}s reached"
  timeout "$s" "$@"
}
cleanup() {
  local rc=$?
  log "down -v"
  timeout 180 "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || log "warning: down -v failed"
  exit $rc
}
trap cleanup EXIT
trap 'fail "interrupted"' INT TERM

post() { curl -sS --max-time 120 -H 'content-type: application/json' -d "$2" "$api$1"; }
field() { python3 -c "import json, sys; d = json.load(sys.stdin); print(eval(sys.argv[1], {}, {'d': d}))" "$1"; }

# -- 1. the image
log "build (${R2EC_DOCKER_BUILD_ARGS:-no extra args})"
# shellcheck disable=SC2086  # the build args are words on purpose
bounded 1800 docker build -q ${R2EC_DOCKER_BUILD_ARGS:-} -t r2ec-serve:latest . >/dev/null || fail "docker build"
leftovers=$(docker run --rm -u 0 --entrypoint sh r2ec-serve:latest -c \
  'ls -d /app/build /app/*.egg-info /app/model /wheels /src /root/.cache/pip /home/r2ec/.cache/pip 2>/dev/null; ls -A /tmp')
[ -z "$leftovers" ] || fail "build leftovers in the image: $leftovers"
log "image r2ec-serve:latest, $(docker image inspect -f '{{.Size}}' r2ec-serve:latest | awk '{printf "%.2f GB", $1/1e9}'), no build leftovers"

# -- 2. up: redis, init (ml-100k + checkpoint v0 with $R2EC_INIT_BASE), api
log "up -d api (init: ml-100k from ${R2EC_ML100K_DIR}, checkpoint base ${R2EC_INIT_BASE})"
bounded 1200 "${compose[@]}" up -d --no-build api >/dev/null 2>&1 || fail "up -d"
"${compose[@]}" logs --no-color init | grep -E "extracted|prepared /|wrote /" | sed 's/^init_1 *| /    init: /' || true
published=$(docker port "$("${compose[@]}" ps -q api)" 8000/tcp)
[[ $published == "127.0.0.1:${R2EC_HOST_PORT}" ]] || fail "api published on '$published', not 127.0.0.1 only"
until [ "$(curl -s -o /dev/null -w '%{http_code}' "$api/readyz")" = 200 ]; do
  (($(left) > 0)) || fail "/readyz never answered 200"
  sleep 2
done
version=$(curl -s "$api/readyz" | field 'd["model_version"]')
log "ready: model $version on $published"

# -- 3. recommend with and without reasoning, post events (twice: the retry is a duplicate)
history='[{"item_id": "50", "rating": 5}, {"item_id": "172", "rating": 5}, {"item_id": "181", "rating": 4}]'
for reasoning in true false; do
  reply=$(post /recommend "{\"history\": $history, \"k\": 3, \"reasoning\": $reasoning}") || fail "POST /recommend"
  n=$(field 'len(d["items"])' <<<"$reply") || fail "recommend (reasoning $reasoning): $reply"
  [ "$n" = 3 ] || fail "recommend (reasoning $reasoning): $reply"
  log "recommend reasoning=$reasoning: $(field '[i["item_id"] for i in d["items"]], d["reasoning_tokens"], d["timings"]["total_ms"]' <<<"$reply")"
done
events='{"events": [{"item_id": "50", "rating": 5, "event_id": "smoke-1"}, {"item_id": "98", "rating": 4, "event_id": "smoke-2"}, {"item_id": "174", "rating": 5, "event_id": "smoke-3"}]}'
for user in smoke-u1 smoke-u2; do
  first=$(post "/users/$user/events" "$events") || fail "POST /users/$user/events"
  [ "$(field 'd["appended"]' <<<"$first")" = 3 ] || fail "events: $first"
done
again=$(post /users/smoke-u1/events "$events") || fail "POST /users/smoke-u1/events (retry)"
[ "$(field 'd["appended"], d["duplicates"]' <<<"$again")" = "(0, 3)" ] || fail "retried events were stored again: $again"
reply=$(post /recommend '{"user_id": "smoke-u1", "k": 5, "reasoning": false}') || fail "POST /recommend (user)"
[ "$(field 'sorted({"50", "98", "174"} & {i["item_id"] for i in d["items"]})' <<<"$reply")" = "[]" ] \
  || fail "a stored user's items were recommended back: $reply"
log "events: 6 stored for 2 users, the retry reported 3 duplicates; the stored user's items are excluded"

# -- 4. the trainer, once, with a tiny budget
log "trainer: r2ec retrain, 2 steps"
out=$(bounded 1200 "${compose[@]}" run --rm -T trainer r2ec retrain --data /data/ml-100k/loo \
  --config deploy/retrain.yaml --max-steps 2 --time-budget-minutes 5 --min-events 1 \
  --set num_generations=2 --set per_device_batch_size=2 --set max_completion_length=8 \
  --set eval_limit=100 --json 2>&1) || fail "trainer run: $(tail -20 <<<"$out")"
result=$(tail -1 <<<"$out")
status=$(field 'd["status"]' <<<"$result") || fail "trainer printed no result: $(tail -20 <<<"$out")"
log "trainer: $status ($(field 'd["reason"]' <<<"$result"); events $(field 'd["new_events"]' <<<"$result"), ndcg@10 current $(field 'd["current_metric"]' <<<"$result") candidate $(field 'd["candidate_metric"]' <<<"$result"))"
case $status in
  published)
    new=$(field 'd["published_version"]' <<<"$result")
    current=$("${compose[@]}" exec -T api cat /checkpoints/CURRENT | tr -d '[:space:]')
    [ "$current" = "$new" ] || fail "CURRENT is '$current', the trainer published '$new'"
    until [ "$(curl -s "$api/readyz" | field 'd["model_version"]')" = "$new" ]; do  # the 30 s watch
      (($(left) > 0)) || fail "the api never reloaded $new"
      sleep 3
    done
    log "CURRENT flipped $version -> $new; the api reloaded it"
    ;;
  rejected) log "CURRENT stays $version: the candidate was rejected by the quality gate" ;;
  *) fail "trainer status '$status': $result" ;;
esac

# -- 5. a stop drains (SIGTERM, then R2EC_SHUTDOWN_GRACE_S) instead of being killed
bounded 120 "${compose[@]}" stop api >/dev/null 2>&1 || fail "stop api"
"${compose[@]}" logs api | grep -q "draining:" || fail "the api did not drain on SIGTERM"
log "api stopped with a drain"
log "compose smoke: PASS in $((SECONDS - started))s"
