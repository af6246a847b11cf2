"""deploy/setup.sh and deploy/quickstart.sh, the README's first two lines, and .ci/run, run
against fakes: `apt-get` and `python3 -m ...` (pip, the kernel build, r2ec, ruff, pytest) are
recorded instead of run, and the interpreter setup.sh checks is the real one, told by a
sitecustomize what it looks like (a distribution's PEP 668 python3, a venv, an old version).
Nothing is installed (journey 40, F1 and F4)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.deploy.helpers import ROOT

BASH = shutil.which("bash")
FAKE_PYTHON = """#!/bin/sh
# `python3 -m ...` and the version line are recorded; anything else (setup.sh's check of the
# interpreter, quickstart's check that r2ec is installed) runs in the real one
case "$1" in
  -m) echo "python3 $*" >> "$CALLS"; exit 0 ;;
  -c) case "$2" in
        *"import torch"*) echo "python3 -c version" >> "$CALLS"; echo "torch x transformers y"; exit 0 ;;
        *importlib.metadata*) [ -n "$FAKE_NOT_INSTALLED" ] && exit 1 ;;
      esac ;;
esac
exec {python} "$@"
"""
RECORD = '#!/bin/sh\necho "{name} $*" >> "$CALLS"\n'
# what the checked interpreter looks like: its stdlib (where PEP 668's marker lies), whether it
# runs in a venv, its version
SITECUSTOMIZE = """
import os, sys, sysconfig

_real = sysconfig.get_path
sysconfig.get_path = lambda name, *a, **k: (
    os.environ["FAKE_STDLIB"] if name == "stdlib" else _real(name, *a, **k)
)
sys.base_prefix = sys.prefix + "-base" if os.environ.get("FAKE_VENV") == "1" else sys.prefix
if os.environ.get("FAKE_VERSION"):
    sys.version_info = tuple(int(x) for x in os.environ["FAKE_VERSION"].split(".")) + (0, "final", 0)
"""


@pytest.fixture
def fake(tmp_path):
    bin_dir, site, stdlib = tmp_path / "bin", tmp_path / "site", tmp_path / "stdlib"
    for d in (bin_dir, site, stdlib):
        d.mkdir()
    scripts = {
        "python3": FAKE_PYTHON.format(python=sys.executable),
        "apt-get": RECORD.format(name="apt-get"),
        "id": "#!/bin/sh\necho 0\n",  # root: setup.sh would apt-get what is missing
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (bin_dir / "dirname").symlink_to(shutil.which("dirname"))
    calls = tmp_path / "calls"
    skip = ("PIP_BREAK_SYSTEM_PACKAGES", "SUDO_USER", "VIRTUAL_ENV", "R2EC_", "PYTHON")
    base = {k: v for k, v in os.environ.items() if not k.startswith(skip)}

    def run(script: str, *args: str, managed: bool = False, venv: bool = False, **env: str):
        calls.unlink(missing_ok=True)
        (stdlib / "EXTERNALLY-MANAGED").unlink(missing_ok=True)
        if managed:
            (stdlib / "EXTERNALLY-MANAGED").write_text("[externally-managed]\nError=use apt\n")
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        full = {
            **base,
            "PATH": str(bin_dir),  # no redis-server, g++, chromium or promtool: all to apt-get
            "PYTHONPATH": str(site),
            "CALLS": str(calls),
            "FAKE_STDLIB": str(stdlib),
            "FAKE_VENV": "1" if venv else "0",
            "R2EC_DATA_DIR": str(tmp_path / "data"),
            **env,
        }
        done = subprocess.run(
            [BASH, str(ROOT / script), *args], env=full, capture_output=True, text=True, timeout=60
        )
        return done, calls.read_text().splitlines() if calls.exists() else []

    run.bin = bin_dir
    return run


def _installs(calls: list[str], extras: str) -> None:
    """apt-get first, then every pip install and the kernel build, into `python3`."""
    apt = [c for c in calls if c.startswith("apt-get")]
    assert calls[: len(apt)] == apt and len(apt) == 2
    wanted = "redis-server g++" + (" chromium prometheus" if extras else "")
    assert apt[1] == f"apt-get install -y -qq {wanted}"
    rest = calls[len(apt) :]
    assert rest[0] == "python3 -m pip install -q --upgrade pip"
    assert f"python3 -m pip install -q -c deploy/constraints.txt -e .{extras}" in rest
    assert rest[-2:] == ["python3 -m model.bf16_gemm", "python3 -c version"]
    assert all(c.startswith("python3 -m pip install") for c in rest[:-2]) and len(rest) == 6


@pytest.mark.parametrize("args", [[], ["--dev"]], ids=["runtime", "dev"])
def test_setup_installs_into_a_python3_pip_may_install_into(fake, args):
    """CI's case (a pyenv Python) and any venv: unchanged, everything into `python3`."""
    done, calls = fake("deploy/setup.sh", *args)
    assert done.returncode == 0, done.stderr
    _installs(calls, "[dev]" if args else "")
    assert "setup done" in done.stdout


def test_setup_refuses_a_distributions_python3_before_installing_anything(fake):
    done, calls = fake("deploy/setup.sh", "--dev", managed=True)
    assert done.returncode == 1 and calls == []  # neither apt-get nor pip ran
    lines = done.stderr.splitlines()
    assert lines[0].startswith("error: python3 (") and "PEP 668" in lines[0]
    assert "  python3 -m venv .venv && . .venv/bin/activate" in lines
    assert "  bash deploy/setup.sh --dev" in lines  # the way back, with the arguments given
    assert "sudo" not in done.stderr
    done, _ = fake("deploy/setup.sh", managed=True, SUDO_USER="someone")
    assert 'sudo env PATH="$PATH" bash deploy/setup.sh)' in done.stderr


def test_setup_installs_into_a_venv_made_from_a_distributions_python3(fake):
    done, calls = fake("deploy/setup.sh", "--dev", managed=True, venv=True)
    assert done.returncode == 0, done.stderr
    _installs(calls, "[dev]")


def test_setup_follows_pip_where_it_was_told_to_break_system_packages(fake):
    done, calls = fake("deploy/setup.sh", managed=True, PIP_BREAK_SYSTEM_PACKAGES="1")
    assert done.returncode == 0, done.stderr
    _installs(calls, "")


def test_setup_refuses_a_python_older_than_the_project_needs(fake):
    done, calls = fake("deploy/setup.sh", FAKE_VERSION="3.10")
    assert done.returncode == 1 and calls == []
    assert "needs Python 3.11 or newer" in done.stderr and "is 3.10" in done.stderr


def test_quickstart_runs_r2ec_from_the_python3_setup_installed_into(fake, tmp_path):
    done, calls = fake("deploy/quickstart.sh")
    assert done.returncode == 0, done.stderr
    data = tmp_path / "data"
    assert calls == [
        f"python3 -m cli data prepare ml-100k --protocol loo --data-dir {data}",
        "python3 -m cli checkpoint show checkpoints/current",  # the fake says it exists
        "python3 -m cli serve",
    ]


def test_quickstart_without_r2ec_installed_says_to_run_setup_first(fake):
    done, calls = fake("deploy/quickstart.sh", FAKE_NOT_INSTALLED="1")
    assert done.returncode == 1 and calls == []
    assert done.stderr.startswith("error: r2ec is not installed for python3 (")
    assert "run bash deploy/setup.sh first" in done.stderr


def test_ci_installs_lints_then_runs_the_readme_test_command(fake):
    """.ci/run: setup.sh --dev, ruff check and ruff format --check (the pinned ruff, from the
    interpreter setup.sh installed into), then pytest (journey 40, F4)."""
    (fake.bin / "bash").write_text(RECORD.format(name="bash"))
    (fake.bin / "bash").chmod(0o755)
    done, calls = fake(".ci/run")
    assert done.returncode == 0, done.stderr
    assert calls == [
        "bash deploy/setup.sh --dev",
        "python3 -m ruff check .",
        "python3 -m ruff format --check .",
        "python3 -m pytest -q",
    ]


def test_the_readme_starts_with_the_two_lines_and_says_when_to_make_a_venv():
    head = (ROOT / "README.md").read_text(encoding="utf-8").split("\n\n")[1:3]
    assert head[0].splitlines()[1:3] == [
        "bash deploy/setup.sh && bash deploy/quickstart.sh     "
        "# fresh machine: install, prepare MovieLens-100k, serve on :8000",
        "bash deploy/setup.sh --dev && python3 -m pytest -q    "
        "# fresh machine: install and run the tests (what .ci/run does)",
    ]
    assert "python3 -m venv .venv && . .venv/bin/activate" in head[1]
