"""r2ec_build_info: which code a replica runs, so a rolling upgrade can be told apart on /metrics
(journey 39, F6: every build said version 0.1.0)."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import service.build
import service.metrics
from service.build import code_commit, package_version
from service.metrics import Metrics
from tests.service.test_app import metric

ROOT = Path(__file__).resolve().parents[2]


def test_build_info_names_the_source_trees_version_and_its_commit():
    """The version is pyproject.toml's where the code runs from the source tree, even where an
    editable install's metadata still holds the version it was installed at."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert package_version() == version
    commit = code_commit()["commit"]
    if (ROOT / ".git").exists():  # a checkout (a worktree's .git is a file)
        assert (
            commit
            == subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
            ).stdout.strip()
        )
    text = Metrics().render().decode()
    assert metric(text, "r2ec_build_info", version=version, commit=commit) == 1


def test_outside_a_checkout_the_commit_is_unknown(monkeypatch, tmp_path):
    """An installed wheel (the docker image): no pyproject.toml beside the code, no git."""
    monkeypatch.setattr(service.build, "ROOT", tmp_path)
    service.metrics._build.cache_clear()
    try:
        text = Metrics().render().decode()
    finally:
        service.metrics._build.cache_clear()
    assert metric(text, "r2ec_build_info", commit="unknown") == 1
    assert code_commit() == {"commit": "unknown", "dirty": None}
