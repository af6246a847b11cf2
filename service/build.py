"""Which code runs: the r2ec-serve version and the git commit (r2ec_build_info, a checkpoint's and
an eval run's record of the code). Standard library only, imported by cli/ and service/ alike."""

from __future__ import annotations

import subprocess
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

DISTRIBUTION = "r2ec-serve"
ROOT = Path(__file__).resolve().parent.parent  # the source tree, or site-packages once installed


def package_version() -> str:
    """The r2ec-serve version of the code running: the source tree's pyproject.toml where it runs
    from one (an editable install's metadata keeps the version it was installed at), else the
    installed package's; "unknown" for neither."""
    try:
        project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
        if project["name"] == DISTRIBUTION:
            return str(project["version"])
    except (OSError, ValueError, KeyError, TypeError):  # no source tree here (a wheel's install)
        pass
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a copy that was never installed
        return "unknown"


def code_commit() -> dict[str, Any]:
    """The commit of the code running (`git rev-parse HEAD` where this package lives) and
    whether its tree has uncommitted changes; "unknown" and None outside a git checkout (a
    wheel's install, a docker image)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        top, head = git("rev-parse", "--show-toplevel", "HEAD").splitlines()
        if Path(top).resolve() != ROOT:  # installed inside some other checkout: not this code's
            raise OSError(top)
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, ValueError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": head, "dirty": dirty}
