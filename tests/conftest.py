"""Shared fixtures: a tiny random R²ec model, a tiny prepared dataset, a versions root, the
paths a test flushes to the disk; `in_ci`, how every test reads the CI variable; `child_env`, the
environment of a fresh Python process that must import this checkout."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parents[1]  # the checkout under test


def in_ci(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the run is CI's: CI set to 1, true or yes (any case). There a missing
    redis-server, chromium or promtool fails its tests instead of skipping them. CI=false, 0 or
    empty reads as unset, as many shells and runners export it locally."""
    return environ.get("CI", "").strip().lower() in ("1", "true", "yes")


IN_CI = in_ci()


def child_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment for a fresh Python process that imports the project: `base` (default
    os.environ) with this checkout first on PYTHONPATH and PYTHONSAFEPATH=1, plus `extra`.

    Without it a child imports whichever checkout the editable install points to (a second
    clone, a git worktree), or the one in its working directory (`-c` and `-m` put the working
    directory first on sys.path); PYTHONSAFEPATH leaves that out, so the child imports this
    checkout wherever it runs. Every test that starts an interpreter uses it."""
    env = dict(os.environ if base is None else base)
    rest = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), rest]) if rest else str(ROOT)
    env["PYTHONSAFEPATH"] = "1"
    env.update(extra)
    return env


def checkpoint_over_a_local_backbone(items, tmp_path: Path) -> tuple[Path, Path, dict]:
    """An untrained checkpoint of `items` over the tiny model saved as a model directory (a
    backbone the checkpoint records by its sha256, model/backbone_digest.py): the checkpoint,
    that directory (save other weights there to make a mismatch) and its metadata."""
    from model.backbone import tiny_model, tiny_tokenizer
    from model.checkpoint import create_base_checkpoint

    tokenizer = tiny_tokenizer()
    mine = tmp_path / "models" / "mine"
    tiny_model(tokenizer).save_pretrained(mine)
    tokenizer.save_pretrained(mine)
    ckpt = tmp_path / "ckpt"
    meta = create_base_checkpoint(ckpt, str(mine), items, dtype="float32", progress=False)
    return ckpt, mine, meta


@pytest.fixture(scope="session")
def tiny_model():
    from model.backbone import BackboneConfig, load_backbone
    from model.r2ec import R2ec

    lm, tok = load_backbone(BackboneConfig(base="tiny", dtype="float32", seed=0))
    return R2ec(lm, tok)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """The atomic fixture prepared with the leave-one-out protocol."""
    from model.data import load_prepared, prepare_atomic

    out = tmp_path_factory.mktemp("data")
    path = prepare_atomic(
        FIXTURES / "data" / "tiny.inter",
        FIXTURES / "data" / "tiny.item",
        out,
        "tiny",
        protocol="loo",
        category="movie",
    )
    return load_prepared(path)


@pytest.fixture(scope="session")
def _versions_root(tiny_dataset, tmp_path_factory) -> Path:
    """Built once: an untrained tiny checkpoint v0 that a CURRENT pointer names."""
    from model.checkpoint import create_base_checkpoint

    root = tmp_path_factory.mktemp("versions")
    create_base_checkpoint(root / "v0", "tiny", tiny_dataset.items, dtype="float32", progress=False)
    (root / "CURRENT").write_text("v0\n")
    return root


@pytest.fixture
def versions_root(_versions_root, tmp_path) -> Path:
    """A fresh copy of the versions root (retraining publishes into it and prunes it)."""
    dest = tmp_path / "versions"
    shutil.copytree(_versions_root, dest)
    return dest


@pytest.fixture
def fsynced(monkeypatch) -> list[Path]:
    """Every path os.fsync flushes from here on, in order, under its name at that moment (read
    back from /proc/self/fd): what model/data/dataset.py's `fsync_path` reaches the disk with."""
    flushed: list[Path] = []
    real = os.fsync

    def record(fd: int) -> None:
        flushed.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return flushed
