import json

import numpy as np
import pytest

from model.checkpoint import (
    CheckpointError,
    create_base_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


def _items(tiny_dataset):
    return tiny_dataset.items


def test_full_checkpoint_round_trip_gives_identical_vectors(tmp_path, tiny_model, tiny_dataset):
    items = _items(tiny_dataset)
    vectors = tiny_model.item_vectors(items.to_dict("records")).numpy()
    meta = save_checkpoint(
        tmp_path / "ckpt",
        tiny_model,
        base="tiny",
        weights="full",
        items=items,
        item_vectors=vectors,
        metrics={"valid": {"ndcg@10": 0.1}},
    )
    ckpt = load_checkpoint(tmp_path / "ckpt", dtype="float32")
    assert ckpt.version == meta["version"]
    assert ckpt.meta["metrics"]["valid"]["ndcg@10"] == 0.1
    np.testing.assert_array_equal(ckpt.item_vectors, vectors)
    again = ckpt.model.item_vectors(ckpt.items.to_dict("records")).numpy()
    np.testing.assert_allclose(again, vectors, atol=1e-6)
    assert list(ckpt.items["item_id"]) == list(items["item_id"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp dirs left"


def test_base_checkpoint_rebuilds_from_reference(tmp_path, tiny_dataset):
    meta = create_base_checkpoint(
        tmp_path / "base", "tiny", tiny_dataset.items, dtype="float32", progress=False
    )
    assert meta["weights"] == "base" and not (tmp_path / "base" / "model").exists()
    ckpt = load_checkpoint(tmp_path / "base", dtype="float32")
    again = ckpt.model.item_vectors(ckpt.items.to_dict("records")).numpy()
    np.testing.assert_allclose(again, ckpt.item_vectors, atol=1e-6)


def test_overwrite_replaces_atomically(tmp_path, tiny_model, tiny_dataset):
    items = _items(tiny_dataset)
    vectors = np.zeros((len(items), tiny_model.hidden_size), dtype=np.float32)
    first = save_checkpoint(
        tmp_path / "c", tiny_model, base="tiny", weights="base", items=items, item_vectors=vectors
    )
    second = save_checkpoint(
        tmp_path / "c", tiny_model, base="tiny", weights="base", items=items, item_vectors=vectors
    )
    assert (
        json.loads((tmp_path / "c" / "r2ec.json").read_text())["version"]
        == second["version"]
        != first["version"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_wrong_vector_shape_rejected_on_save(tmp_path, tiny_model, tiny_dataset):
    items = _items(tiny_dataset)
    with pytest.raises(CheckpointError, match="expected"):
        save_checkpoint(
            tmp_path / "c",
            tiny_model,
            base="tiny",
            weights="base",
            items=items,
            item_vectors=np.zeros((len(items), 3), dtype=np.float32),
        )


def test_load_reports_mismatch_and_missing_files(tmp_path, tiny_model, tiny_dataset):
    items = _items(tiny_dataset)
    vectors = np.zeros((len(items), tiny_model.hidden_size), dtype=np.float32)
    save_checkpoint(
        tmp_path / "c", tiny_model, base="tiny", weights="base", items=items, item_vectors=vectors
    )
    np.save(tmp_path / "c" / "item_vectors.npy", np.zeros((len(items), 7), dtype=np.float32))
    with pytest.raises(CheckpointError, match=r"item_vectors.npy has shape .*hidden 64"):
        load_checkpoint(tmp_path / "c", dtype="float32")
    (tmp_path / "c" / "items.parquet").unlink()
    with pytest.raises(CheckpointError, match="missing items.parquet"):
        load_checkpoint(tmp_path / "c", dtype="float32")
    with pytest.raises(CheckpointError, match="not an R²ec checkpoint: no r2ec.json"):
        load_checkpoint(tmp_path / "nowhere")
