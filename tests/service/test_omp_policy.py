"""OpenMP's wait policy is read once, when libgomp loads: where torch came first (a notebook's
first cell) and no OMP_WAIT_POLICY is set, model/__init__.py's PASSIVE default is too late, and
`Recommender.load` says so with a WARNING (journey 39, F1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import child_env

LOAD = """
import logging, sys
{first}
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(levelname)s %(name)s: %(message)s")
from service.recommender import Recommender
Recommender.load(sys.argv[1], dtype="float32", threads=1)
print("loaded")
"""


def _load(ckpt: Path, first: str, **env: str) -> str:
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
        and (not k.startswith("R2EC_") or k == "R2EC_CACHE_DIR")
    }
    done = subprocess.run(
        [sys.executable, "-c", LOAD.format(first=first), str(ckpt)],
        env=child_env(base, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "loaded" in done.stdout
    return done.stdout


@pytest.mark.parametrize("first", ["import torch", "import faiss"])
def test_openmp_loaded_first_is_warned_with_what_to_do(tiny_ckpt, first):
    out = _load(tiny_ckpt, first)
    lines = [line for line in out.splitlines() if line.startswith("WARNING service.recommender")]
    assert len(lines) == 1, out
    assert "OMP_WAIT_POLICY=PASSIVE" in lines[0] and "before Python starts" in lines[0]
    assert "import `service` or `model` before torch" in lines[0]


def test_no_warning_when_the_project_comes_first_or_a_policy_is_set(tiny_ckpt):
    assert "OMP_WAIT_POLICY" not in _load(tiny_ckpt, "")
    assert "OMP_WAIT_POLICY" not in _load(tiny_ckpt, "import torch", OMP_WAIT_POLICY="ACTIVE")
