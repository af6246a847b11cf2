"""The model fingerprint (Recommender.fingerprint, model/checkpoint.py `model_digest`): what decides
a model's answers, so two arms of an experiment on one Redis never serve each other's cached
reasoning (journey 40, F3): a copied checkpoint with one weight changed keeps its version string,
and one checkpoint served in bfloat16 and in float32 is one version too."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from model.checkpoint import META_FILE, model_digest, read_meta
from service.types import Query
from tests.service.conftest import app_for, serve
from tests.service.test_recommender import H1

HISTORY = [{"item_id": "i6", "rating": 2}, {"item_id": "i7", "rating": 5}]


@pytest.fixture(scope="module")
def full_ckpt(tiny_dataset, tmp_path_factory) -> Path:
    """A checkpoint that holds its weights (model/), unlike the untrained `tiny_ckpt`."""
    from model.backbone import BackboneConfig, load_backbone
    from model.checkpoint import save_checkpoint
    from model.r2ec import R2ec

    lm, tok = load_backbone(BackboneConfig(base="tiny", dtype="float32", seed=0))
    model = R2ec(lm, tok)
    items = tiny_dataset.items
    vectors = model.item_vectors(items.to_dict("records")).numpy()
    out = tmp_path_factory.mktemp("full") / "a"
    save_checkpoint(out, model, base="tiny", weights="full", items=items, item_vectors=vectors)
    return out


def copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("index"))
    return dest


def edit_one_weight(ckpt: Path) -> None:
    """Change one number of one weight in place: the version and every other file stay."""
    from safetensors.torch import load_file, save_file

    (file,) = (ckpt / "model").glob("*.safetensors")
    tensors = load_file(file)
    name = next(n for n in sorted(tensors) if n.endswith("down_proj.weight"))
    tensors[name][0, 0] += 0.5
    save_file(tensors, file, metadata={"format": "pt"})


def test_the_digest_is_the_files_not_where_or_when_they_were_copied(full_ckpt, tmp_path):
    digest = model_digest(full_ckpt, read_meta(full_ckpt))
    same = copy(full_ckpt, tmp_path / "elsewhere" / "b")
    assert model_digest(same, read_meta(same)) == digest
    # the catalog is searched live and edited: not the model
    (same / "item_edits.json").write_text("{}")
    (same / "index").mkdir()
    (same / "index" / "index.json").write_text("{}")
    assert model_digest(same, read_meta(same)) == digest

    weights = copy(full_ckpt, tmp_path / "weights")
    edit_one_weight(weights)
    prompts = copy(full_ckpt, tmp_path / "prompts")
    meta = json.loads((prompts / META_FILE).read_text())
    meta["prompts"]["max_history"] += 1
    (prompts / META_FILE).write_text(json.dumps(meta))
    tokenizer = copy(full_ckpt, tmp_path / "tokenizer")
    config = tokenizer / "tokenizer" / "tokenizer_config.json"
    config.write_text(config.read_text().replace("{", '{"model_max_length_note": 1,', 1))
    digests = {model_digest(c, read_meta(c)) for c in (weights, prompts, tokenizer)}
    assert len(digests) == 3 and digest not in digests
    assert read_meta(weights)["version"] == read_meta(full_ckpt)["version"]


def test_the_fingerprint_names_the_files_and_the_settings_that_change_answers(
    full_ckpt, tmp_path, make_engine
):
    from service.recommender import Recommender

    a = make_engine(copy(full_ckpt, tmp_path / "a"))
    assert len(a.fingerprint) == 16 and int(a.fingerprint, 16) >= 0
    assert make_engine(copy(full_ckpt, tmp_path / "b")).fingerprint == a.fingerprint
    edited = copy(full_ckpt, tmp_path / "c")
    edit_one_weight(edited)
    assert make_engine(edited).version == a.version
    assert make_engine(edited).fingerprint != a.fingerprint
    bf16 = Recommender.load(tmp_path / "a", dtype="bfloat16")
    assert bf16.serving["dtype"] == "bfloat16" and bf16.fingerprint != a.fingerprint
    others = {
        make_engine(tmp_path / "a", exact_decode=True).fingerprint,
        make_engine(tmp_path / "a", speculative_tokens=0).fingerprint,
        make_engine(tmp_path / "a", backend="hf").fingerprint,
        make_engine(tmp_path / "a", constrain_titles=False).fingerprint,
    }
    assert len(others) == 4 and a.fingerprint not in others
    # what only changes how fast or how many: not the model
    assert make_engine(tmp_path / "a", slots=3, index_kind="hnsw").fingerprint == a.fingerprint


def test_the_cache_key_names_the_fingerprint_and_a_query_prepared_by_another_model_is_redone(engine):
    from dataclasses import replace

    from service.recommender import CACHE_FORMAT
    from service.types import CachedReasoning

    prepared = engine.prepare(Query(H1, max_reasoning_tokens=8))
    assert prepared.fingerprint == engine.fingerprint
    engine.fingerprint = "0" * 16
    again = engine.prepare(Query(H1, max_reasoning_tokens=8))
    assert again.cache_key != prepared.cache_key
    # a cache-2 entry, keyed on the version alone, is not read
    assert CACHE_FORMAT == "cache-3"
    old = json.dumps(["cache-2", engine.version, prepared.prompt, 8, "greedy", prepared.grammar])
    assert hashlib.sha256(old.encode()).hexdigest() not in (prepared.cache_key, again.cache_key)
    # prepared (and looked up in the cache) by a model of the same version and other weights,
    # answered after a reload swapped it: prepared again, its cached reasoning not used
    stale = replace(prepared, cached=CachedReasoning((1, 2), "the other model's"))
    (result,) = engine.recommend_batch([stale])
    assert result.cache == "miss" and result.reasoning != "the other model's"
    assert result.fingerprint == engine.fingerprint


@pytest.mark.asyncio
@pytest.mark.redis  # redis_url skips without a redis-server (fails under CI)
async def test_arms_on_one_redis_share_cached_answers_only_as_the_same_model(full_ckpt, tmp_path, redis_url):
    """Journey 40, F3: before the fingerprint, each of these arms was answered "hit" with the
    first one's reasoning and h_T, so its items too."""
    control = copy(full_ckpt, tmp_path / "control")
    candidate = copy(full_ckpt, tmp_path / "candidate")
    edit_one_weight(candidate)

    async def ask(ckpt: Path, **settings) -> dict:
        async with serve(app_for(ckpt, redis_url=redis_url, **settings)) as client:
            r = await client.post("/recommend", json={"history": HISTORY, "k": 3})
        assert r.status_code == 200, r.text
        return r.json()

    first = await ask(control)
    assert first["cache"] == "miss"
    twin = await ask(copy(full_ckpt, tmp_path / "twin"))  # the same files elsewhere: one model
    assert twin["cache"] == "hit" and twin["reasoning"] == first["reasoning"]
    edited = await ask(candidate)
    assert edited["model_version"] == first["model_version"]
    assert edited["cache"] == "miss"
    bf16 = await ask(control, dtype="bfloat16")
    assert bf16["model_version"] == first["model_version"]
    assert bf16["cache"] == "miss"
