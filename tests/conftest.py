"""Shared fixtures: a tiny random R²ec model and a tiny prepared dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


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
