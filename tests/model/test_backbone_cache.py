"""The converted-backbone cache is written whole before its name (model/backbone.py)."""

from __future__ import annotations

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
