"""`r2ec checkpoint export` ships a small LoRA checkpoint; `init --from` makes it servable;
`rollback` points a versions root's CURRENT at another version."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from cli import app
from model.checkpoint import VECTORS_FILE, load_checkpoint, read_meta
from model.recpo import RecPOConfig
from model.train import train
from tests.conftest import FIXTURES, checkpoint_over_a_local_backbone

TINY = dict(dtype="float32", warmup_steps=0, eval_limit=4, lora_r=4, lora_alpha=8, max_completion_length=4)


def _init_from(data, out, source):
    """`r2ec checkpoint init --data DATA --out OUT --from SOURCE` in float32."""
    args = ["checkpoint", "init", "--data", str(data), "--out", str(out), "--from", str(source)]
    return CliRunner().invoke(app, [*args, "--dtype", "float32"])


def test_export_ships_no_item_table_and_init_from_rebuilds_the_same(tiny_dataset, tmp_path):
    cfg = RecPOConfig(stage="contrastive", per_device_batch_size=4, max_steps=1, eval_every=1, **TINY)
    best = train(cfg, tiny_dataset, "tiny", tmp_path / "run")
    measured = tmp_path / "eval.json"
    measured.write_text(json.dumps({"metrics": {"ndcg@10": 0.5}}))
    runner = CliRunner()
    art = tmp_path / "artifacts" / "tiny"
    res = runner.invoke(
        app,
        [
            "checkpoint",
            "export",
            str(tmp_path / "run"),
            "--out",
            str(art),
            "--command",
            "train it",
            "--metrics",
            str(measured),
        ],
    )
    assert res.exit_code == 0, res.output
    meta = read_meta(art)
    assert meta["item_vectors"] == "absent" and not (art / VECTORS_FILE).exists()
    assert meta["provenance"]["command"] == "train it"
    assert meta["provenance"]["measured"] == {"metrics": {"ndcg@10": 0.5}}
    assert (art / "adapter").is_dir()
    # loading the shipped copy re-encodes the catalog: the same vectors as the trained checkpoint's
    original = load_checkpoint(best, dtype="float32")
    shipped = load_checkpoint(art, dtype="float32")
    np.testing.assert_allclose(shipped.item_vectors, original.item_vectors, atol=1e-5)
    # init --from writes a complete, servable copy with the vectors and the provenance
    out = tmp_path / "current"
    res = _init_from(tiny_dataset.path, out, art)
    assert res.exit_code == 0, res.output
    assert (out / VECTORS_FILE).exists() and read_meta(out)["provenance"]["command"] == "train it"
    np.testing.assert_allclose(
        load_checkpoint(out, dtype="float32").item_vectors, original.item_vectors, atol=1e-5
    )


def test_export_refuses_a_path_that_is_no_checkpoint(tmp_path):
    res = CliRunner().invoke(app, ["checkpoint", "export", str(tmp_path), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "not an R²ec checkpoint" in res.output


def test_init_and_export_never_write_over_what_is_no_checkpoint(tiny_dataset, tmp_path):
    runs = tmp_path / "runs"
    (runs / "onestage").mkdir(parents=True)
    (runs / "onestage" / "log.jsonl").write_text("{}\n")
    runner = CliRunner()
    res = runner.invoke(
        app, ["checkpoint", "init", "--data", str(tiny_dataset.path), "--out", str(runs), "--base", "tiny"]
    )
    assert res.exit_code == 2 and "exists and is not a checkpoint" in res.output
    assert (runs / "onestage" / "log.jsonl").read_text() == "{}\n"  # untouched
    # an existing checkpoint is replaced, an empty directory filled
    for out in (tmp_path / "ckpt", tmp_path / "ckpt", tmp_path / "empty"):
        out.mkdir(exist_ok=True)
        res = runner.invoke(
            app, ["checkpoint", "init", "--data", str(tiny_dataset.path), "--out", str(out), "--base", "tiny"]
        )
        assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["checkpoint", "export", str(tmp_path / "ckpt"), "--out", str(runs)])
    assert res.exit_code == 2 and "exists and is not a checkpoint" in res.output


def test_bad_inputs_are_one_line_errors_naming_what_is_wrong(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # typer's error box wraps at the terminal's width
    runner = CliRunner()
    data, out = str(tiny_dataset.path), str(tmp_path / "c")
    cases = [
        (["--log-level", "bogus", "checkpoint", "show", str(tmp_path)], "--log-level must be"),
        (["checkpoint", "init", "--data", str(tmp_path / "none"), "--out", out], "does not exist"),
        (
            ["checkpoint", "init", "--data", data, "--out", out, "--base", "bogus"],
            "base 'bogus': not smollm2",
        ),
        (
            ["checkpoint", "init", "--data", data, "--out", out, "--base", "tiny", "--dtype", "float8"],
            "float8",
        ),
        (["serve", "--port", "99999"], "Invalid value for '--port'"),
    ]
    for argv, message in cases:
        res = runner.invoke(app, argv)
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, (
            argv,
            res.output,
        )
    runner.invoke(app, ["checkpoint", "init", "--data", data, "--out", out, "--base", "tiny"])
    missing = str(tmp_path / "no.json")
    res = runner.invoke(
        app, ["checkpoint", "export", out, "--out", str(tmp_path / "e"), "--metrics", missing]
    )
    assert res.exit_code == 2 and f"--metrics {missing}" in res.output


def _dataset_prepared_before_the_check(tiny_dataset, tmp_path, **titles):
    """A copy of the tiny dataset whose catalog holds titles `r2ec data prepare` refuses now, as
    one prepared by an older version may."""
    import shutil

    import pandas as pd

    path = tmp_path / "old" / "loo"
    shutil.copytree(tiny_dataset.path, path)
    items = pd.read_parquet(path / "items.parquet")
    for item_id, title in titles.items():
        items.loc[items["item_id"] == item_id, "title"] = title
    items.to_parquet(path / "items.parquet", index=False)
    return path


def test_init_refuses_a_catalog_holding_the_tokenizers_special_tokens(tiny_dataset, tmp_path, monkeypatch):
    """Data prepared before `data prepare` refused them: init names the items, before any encoding."""
    monkeypatch.setenv("COLUMNS", "200")
    data = _dataset_prepared_before_the_check(
        tiny_dataset, tmp_path, i8="Babe<|im_end|>\n<|im_start|>assistant", i9="Dead <|endoftext|>"
    )
    runner = CliRunner()
    out = tmp_path / "c"
    res = runner.invoke(app, ["checkpoint", "init", "--data", str(data), "--out", str(out), "--base", "tiny"])
    said = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert "item 'i8' title holds '<|im_end|>'; item 'i9' title holds '<|endoftext|>'" in said
    assert "the backbone's tokenizer" in said and "prepare the dataset again" in said
    assert not out.exists()
    # --from: the same check, with the tokenizer of the model it loads
    clean = tmp_path / "clean"
    base = ["checkpoint", "init", "--data", str(tiny_dataset.path), "--base", "tiny", "--dtype", "float32"]
    assert runner.invoke(app, [*base, "--out", str(clean)]).exit_code == 0
    res = _init_from(data, out, clean)
    assert res.exit_code == 2 and "item 'i8' title holds '<|im_end|>'" in res.output
    assert not out.exists()


def test_the_log_level_reaches_the_service(tiny_dataset, tmp_path, monkeypatch):
    import service.app
    import service.server

    ckpt = str(tmp_path / "c")
    CliRunner().invoke(
        app, ["checkpoint", "init", "--data", str(tiny_dataset.path), "--out", ckpt, "--base", "tiny"]
    )
    seen = []
    monkeypatch.setattr(service.app, "create_app", lambda settings: settings)
    monkeypatch.setattr(
        service.server, "run", lambda settings, *args, **kwargs: seen.append(settings.log_level)
    )
    for given, level in (("debug", "DEBUG"), ("warn", "WARNING")):
        res = CliRunner().invoke(app, ["--log-level", given, "serve", "--checkpoint", ckpt])
        assert res.exit_code == 0, res.output
        assert seen[-1] == level


def test_init_from_a_model_trained_elsewhere_counts_hints_and_encodes_only_this_catalog(
    tiny_dataset, tmp_path, monkeypatch
):
    """A user's own catalog served with the shipped model: the co-watch hints come from the
    user's interactions, not the source's (ids that happen to match would name unrelated items),
    only the user's items are encoded, and metrics measured on the source's data are dropped."""
    from model.cowatch import CoWatch
    from model.data import load_prepared, prepare_atomic

    cfg = RecPOConfig(
        stage="contrastive", per_device_batch_size=4, max_steps=1, eval_every=1, cowatch_hints=3, **TINY
    )
    train(cfg, tiny_dataset, "tiny", tmp_path / "run")
    art = tmp_path / "art"
    assert (
        CliRunner().invoke(app, ["checkpoint", "export", str(tmp_path / "run"), "--out", str(art)]).exit_code
        == 0
    )
    # another catalog: the same films under other ids, watched in the reverse order
    files = (tmp_path / "x.inter", tmp_path / "x.item")
    rows = (FIXTURES / "data" / "tiny.inter").read_text().splitlines()
    flipped = [rows[0]] + [
        "\t".join([u, "b" + i, r, str(10_000 - float(t))])
        for u, i, r, t in (line.split("\t") for line in rows[1:])
    ]
    files[0].write_text("\n".join(flipped) + "\n")
    items = (FIXTURES / "data" / "tiny.item").read_text().splitlines()
    files[1].write_text("\n".join([items[0]] + ["b" + line for line in items[1:]]) + "\n")
    other = load_prepared(prepare_atomic(*files, tmp_path / "data", "other", protocol="loo"))
    encoded = _count_encodings(monkeypatch)
    out = tmp_path / "current"
    res = _init_from(other.path, out, art)
    assert res.exit_code == 0, res.output
    assert encoded == [len(other.items)]  # this catalog, once; the source's never
    saved = CoWatch.load(out, 10)
    expected = CoWatch.from_samples(other.split("train"), other.item_titles(), 10)
    assert saved.successors == expected.successors
    assert all(j.startswith("b") for nexts in saved.successors.values() for j, _ in nexts)
    assert read_meta(art)["metrics"] and not read_meta(out)["metrics"]
    # its `dataset` is now the user's data; what the weights were trained on is kept beside it,
    # so scoring it on data of that name is not taken for held out
    trained = read_meta(art)["dataset"]
    assert trained["samples_sha256"] == tiny_dataset.samples_digest()
    assert read_meta(out)["trained_on"] == trained and read_meta(out)["dataset"]["name"] == "other"
    args = ["eval", "--data", str(other.path), "--checkpoint", str(out), "--dtype", "float32"]
    res = CliRunner().invoke(app, [*args, "--no-reasoning", "--limit", "1"])
    assert res.exit_code == 0 and "trained on tiny/loo, --data is other/loo" in res.stderr, res.output


def _count_encodings(monkeypatch) -> list[int]:
    """How many items each `R2ec.item_vectors` call encodes, from here on."""
    from model.r2ec import R2ec

    encoded: list[int] = []
    real = R2ec.item_vectors

    def counting(self, items, *args, **kwargs):
        encoded.append(len(items))
        return real(self, items, *args, **kwargs)

    monkeypatch.setattr(R2ec, "item_vectors", counting)
    return encoded


def test_init_from_reuses_stored_vectors_only_for_the_same_texts(tiny_dataset, tmp_path, monkeypatch):
    """Item vectors encode an item's text: a catalog with the source's ids and other titles (a
    re-prepared .item with corrected titles) is encoded anew, not given the old vectors."""
    import shutil

    import pandas as pd

    from model.checkpoint import create_base_checkpoint
    from model.data import load_prepared
    from model.data.dataset import ITEM_SCHEMA, ITEMS_FILE, _write_frame

    source = tmp_path / "source"
    create_base_checkpoint(source, "tiny", tiny_dataset.items, dtype="float32", progress=False)
    encoded = _count_encodings(monkeypatch)
    assert _init_from(tiny_dataset.path, tmp_path / "same", source).exit_code == 0
    assert encoded == []  # the same catalog: the stored table
    renamed = tmp_path / "renamed-data"  # the same prepared dataset, its titles corrected
    shutil.copytree(tiny_dataset.path, renamed)
    items = pd.read_parquet(renamed / ITEMS_FILE)
    items["title"] = "Renamed " + items["title"]
    _write_frame(items, ITEM_SCHEMA, renamed / ITEMS_FILE)
    other = load_prepared(renamed)
    assert list(other.items["item_id"]) == list(tiny_dataset.items["item_id"])
    res = _init_from(other.path, tmp_path / "renamed", source)
    assert res.exit_code == 0, res.output
    assert encoded == [len(other.items)]
    np.testing.assert_array_equal(
        np.load(tmp_path / "renamed" / VECTORS_FILE), _encoded_now(tmp_path / "renamed", other)
    )


def test_init_from_reuses_the_vectors_of_its_own_older_nfd_or_bidi_dataset(
    tiny_dataset, tmp_path, monkeypatch
):
    """A dataset an older release prepared (an NFD title, a title in bidi controls) and a
    checkpoint it made from it: `load_prepared` now reads the dataset in NFC and without the
    controls, and that is still the checkpoint's catalog (its vectors are copied), not a new
    one whose every item is encoded again."""
    import shutil
    import unicodedata

    import pandas as pd

    from model.checkpoint import ITEMS_FILE as CKPT_ITEMS
    from model.checkpoint import create_base_checkpoint
    from model.data import load_prepared
    from model.data.dataset import ITEM_SCHEMA, ITEMS_FILE, _write_frame

    old = tmp_path / "old-data"
    shutil.copytree(tiny_dataset.path, old)
    items = pd.read_parquet(old / ITEMS_FILE)
    items.loc[0, "title"] = unicodedata.normalize("NFD", "Amélie")
    items.loc[1, "title"] = "\u202bHeat\u202c"
    _write_frame(items, ITEM_SCHEMA, old / ITEMS_FILE)  # as an older release wrote it
    source = tmp_path / "source"
    create_base_checkpoint(source, "tiny", items, dtype="float32", progress=False)
    assert pd.read_parquet(source / CKPT_ITEMS).title.tolist()[:2] == items.title.tolist()[:2]
    assert load_prepared(old).items.title.tolist()[:2] == ["Amélie", "Heat"]
    encoded = _count_encodings(monkeypatch)
    res = _init_from(old, tmp_path / "again", source)
    assert res.exit_code == 0, res.output
    assert encoded == []  # the stored table, as before NFC
    np.testing.assert_array_equal(np.load(tmp_path / "again" / VECTORS_FILE), np.load(source / VECTORS_FILE))


def _encoded_now(checkpoint, dataset) -> np.ndarray:
    """`dataset`'s items encoded by `checkpoint`'s model."""
    from model.checkpoint import load_checkpoint_model

    model = load_checkpoint_model(checkpoint, dtype="float32")
    return np.asarray(model.item_vectors(dataset.items.to_dict("records")))


def test_a_local_backbone_is_recorded_absolute_and_a_moved_one_can_be_re_pointed(
    tiny_dataset, tmp_path, monkeypatch
):
    """A relative --base loads from any directory later; a checkpoint whose backbone moved says
    where its reference came from, and `init --from CKPT --base NEW` writes a copy naming it."""
    from model.backbone import tiny_model, tiny_tokenizer
    from model.checkpoint import CheckpointError

    tokenizer = tiny_tokenizer()
    (tmp_path / "models").mkdir()
    tiny_model(tokenizer).save_pretrained(tmp_path / "models" / "mine")
    tokenizer.save_pretrained(tmp_path / "models" / "mine")
    monkeypatch.chdir(tmp_path)
    args = ["checkpoint", "init", "--data", str(tiny_dataset.path), "--dtype", "float32"]
    res = CliRunner().invoke(app, [*args, "--out", "ckpt", "--base", "models/mine"])
    assert res.exit_code == 0, res.output
    assert read_meta(tmp_path / "ckpt")["base"] == str(tmp_path / "models" / "mine")
    monkeypatch.chdir(tmp_path / "models")  # elsewhere: the checkpoint still loads
    vectors = load_checkpoint(tmp_path / "ckpt", dtype="float32").item_vectors

    (tmp_path / "models" / "mine").rename(tmp_path / "models" / "moved")
    try:
        load_checkpoint(tmp_path / "ckpt", dtype="float32")
        raise AssertionError("a checkpoint whose backbone moved loaded")
    except CheckpointError as exc:
        said = str(exc)
    assert said.startswith(
        f"{tmp_path / 'ckpt' / 'r2ec.json'} names the backbone '{tmp_path / 'models' / 'mine'}'"
    )
    assert "--base PATH" in said
    res = CliRunner().invoke(
        app, [*args, "--out", str(tmp_path / "again"), "--from", str(tmp_path / "ckpt"), "--base", "moved"]
    )
    assert res.exit_code == 0, res.output
    assert read_meta(tmp_path / "again")["base"] == str(tmp_path / "models" / "moved")
    # a --base that does not load is named as the cause, not the r2ec.json it stands in for
    res = CliRunner().invoke(
        app, [*args, "--out", str(tmp_path / "not"), "--from", str(tmp_path / "ckpt"), "--base", "nowhere"]
    )
    assert res.exit_code == 2 and "error: --base 'nowhere' does not load here (" in res.output, res.output
    assert "r2ec.json" not in res.output and not (tmp_path / "not").exists()
    np.testing.assert_allclose(
        load_checkpoint(tmp_path / "again", dtype="float32").item_vectors, vectors, atol=1e-6
    )

    # an export says that the backbone is not in the copy
    res = CliRunner().invoke(
        app, ["checkpoint", "export", str(tmp_path / "again"), "--out", str(tmp_path / "art")]
    )
    assert res.exit_code == 0, res.output
    assert f"holds its backbone by reference, '{tmp_path / 'models' / 'moved'}'" in res.output


def test_rollback_points_current_at_a_version_that_reads_under_the_publish_lock(versions_root):
    """The runbook's rollback: one command, refusing what would not load, and taking turns with
    a retrain's publish and prune (model/checkpoint.py `current_lock`) instead of racing them."""
    import shutil

    from model.checkpoint import current_lock, current_version

    root = versions_root
    shutil.copytree(root / "v0", root / "v1")
    (root / "CURRENT").write_text("v1\n")
    runner = CliRunner()
    res = runner.invoke(app, ["checkpoint", "rollback", str(root), "v0"])
    assert res.exit_code == 0 and f"{root / 'CURRENT'} -> v0 (was v1)" in res.output, res.output
    assert current_version(root) == "v0"
    res = runner.invoke(app, ["checkpoint", "rollback", str(root), "v0"])
    assert res.exit_code == 0 and "already names v0" in res.output
    (root / "v1" / "r2ec.json").write_text("{")
    res = runner.invoke(app, ["checkpoint", "rollback", str(root), "v1"])
    assert res.exit_code == 2 and "v1/r2ec.json is damaged or unreadable" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["checkpoint", "rollback", str(root), "v7"])
    assert res.exit_code == 2 and "holds no version 'v7' (versions: v0)" in res.output
    with current_lock(root):  # a retrain publishing this moment
        res = runner.invoke(app, ["checkpoint", "rollback", str(root), "v0", "--wait-seconds", "0"])
    assert res.exit_code == 2 and "CURRENT.lock is still held after 0 s" in res.output
    assert current_version(root) == "v0"


def test_rollback_on_a_root_it_cannot_write_is_one_line(tmp_path, monkeypatch):
    """A read-only root or a full disk at the flip gave a traceback."""
    import errno

    import model.checkpoint

    root = tmp_path / "root"
    for version in ("v0", "v1"):
        (root / version).mkdir(parents=True)
        (root / version / "r2ec.json").write_text(
            json.dumps({"format": "r2ec-checkpoint", "version": version})
        )
    (root / "CURRENT").write_text("v1\n")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(root / "CURRENT.lock"))

    monkeypatch.setattr(model.checkpoint, "flip_current", read_only)
    res = CliRunner().invoke(app, ["checkpoint", "rollback", str(root), "v0"])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "Read-only file system" in res.output


def test_a_killed_init_resumes_where_it_stopped_with_an_uninterrupted_runs_vectors(
    tiny_dataset, tmp_path, monkeypatch
):
    """`checkpoint init` encodes in chunks kept in OUT.partial/: killed part way, a rerun encodes
    only the chunks not finished and writes the vectors a run that was never killed writes;
    --device and --batch-size are passed through, and the chunks go once OUT is written."""
    import model.checkpoint as checkpoint_module
    from model.checkpoint import partial_dir
    from model.r2ec import R2ec

    monkeypatch.setattr(checkpoint_module, "ENCODE_CHUNK", 4)  # 11 items: chunks of 4, 4 and 3

    def init(out):
        args = ["checkpoint", "init", "--data", str(tiny_dataset.path), "--out", str(out), "--base", "tiny"]
        return CliRunner().invoke(app, [*args, "--dtype", "float32", "--device", "cpu", "--batch-size", "3"])

    assert init(tmp_path / "whole").exit_code == 0
    whole = np.load(tmp_path / "whole" / VECTORS_FILE)
    assert not partial_dir(tmp_path / "whole").exists()

    real, encoded = R2ec.item_vectors, []

    def killed_in_the_second_chunk(self, items, *args, **kwargs):
        encoded.append(len(items))
        if len(encoded) == 2:
            raise KeyboardInterrupt  # Ctrl-C, or a SIGTERM turned into one
        assert kwargs.get("batch_size") == 3  # --batch-size
        return real(self, items, *args, **kwargs)

    monkeypatch.setattr(R2ec, "item_vectors", killed_in_the_second_chunk)
    out = tmp_path / "resumed"
    assert init(out).exit_code != 0 and not out.exists()
    assert len(list(partial_dir(out).glob("chunk-*.npy"))) == 1
    monkeypatch.setattr(R2ec, "item_vectors", real)
    counted = _count_encodings(monkeypatch)
    res = init(out)
    assert res.exit_code == 0, res.output
    assert counted == [4, 3]  # the first chunk was read back, not encoded again
    np.testing.assert_array_equal(np.load(out / VECTORS_FILE), whole)
    assert not partial_dir(out).exists()


def test_init_refuses_a_device_this_machine_lacks_before_loading_anything(
    tiny_dataset, tmp_path, monkeypatch
):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = [
        "checkpoint",
        "init",
        "--data",
        str(tiny_dataset.path),
        "--out",
        str(tmp_path / "c"),
        "--base",
        "tiny",
    ]
    res = CliRunner().invoke(app, [*args, "--device", "cuda"])
    assert res.exit_code == 2 and "torch sees no CUDA device" in res.output, res.output
    assert not (tmp_path / "c").exists()


def test_show_says_whether_the_backbone_is_the_recorded_one_and_init_from_refuses_another(
    tiny_dataset, tmp_path
):
    import shutil

    import pandas as pd
    import pytest

    from model.backbone import tiny_model, tiny_tokenizer
    from model.backbone_digest import BackboneMismatch
    from model.data.dataset import ITEM_SCHEMA, ITEMS_FILE, _write_frame

    ckpt, mine, _ = checkpoint_over_a_local_backbone(tiny_dataset.items, tmp_path)
    recorded = read_meta(ckpt)["backbone"]["sha256"]
    res = CliRunner().invoke(app, ["checkpoint", "show", str(ckpt)])
    assert res.exit_code == 0 and json.loads(res.stdout)["backbone"]["sha256"] == recorded
    assert "backbone: model directory" in res.stderr and f"the one '{mine}' is here" in res.stderr

    tiny_model(tiny_tokenizer(), seed=9).save_pretrained(mine)  # other weights at the same path
    res = CliRunner().invoke(app, ["checkpoint", "show", str(ckpt)])
    assert res.exit_code == 0 and "backbone: MISMATCH" in res.stderr and recorded in res.stderr
    args = ["checkpoint", "init", "--data", str(tiny_dataset.path), "--dtype", "float32", "--from", str(ckpt)]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "copy")])
    assert res.exit_code == 2 and "error: " in res.output and recorded in res.output, res.output
    assert "--allow-backbone-mismatch" in res.output and not (tmp_path / "copy").exists()
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "copy"), "--allow-backbone-mismatch"])
    assert res.exit_code == 0, res.output
    # the copy's item vectors are the source's (the same catalog), made over the recorded
    # backbone: it keeps that record, so the override is not laundered into a "match"
    assert read_meta(tmp_path / "copy")["backbone"]["sha256"] == recorded
    with pytest.raises(BackboneMismatch):
        load_checkpoint(tmp_path / "copy", dtype="float32")
    allowed = load_checkpoint(tmp_path / "copy", dtype="float32", allow_backbone_mismatch=True)
    assert allowed.backbone.status == "mismatch_allowed"
    # untrained rows whose catalog is encoded here are wholly this backbone's: recorded as such
    other = tmp_path / "other-data"
    shutil.copytree(tiny_dataset.path, other)
    items = pd.read_parquet(other / ITEMS_FILE)
    items["title"] = "Renamed " + items["title"]
    _write_frame(items, ITEM_SCHEMA, other / ITEMS_FILE)
    args = ["checkpoint", "init", "--data", str(other), "--dtype", "float32", "--from", str(ckpt)]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "re"), "--allow-backbone-mismatch"])
    assert res.exit_code == 0, res.output
    assert read_meta(tmp_path / "re")["backbone"]["sha256"] not in (None, recorded)
    assert load_checkpoint(tmp_path / "re", dtype="float32").backbone.status == "match"


def test_record_backbone_stamps_an_older_checkpoint_once(tiny_dataset, tmp_path):
    ckpt, mine, _ = checkpoint_over_a_local_backbone(tiny_dataset.items, tmp_path)
    meta = read_meta(ckpt)
    record = meta.pop("backbone")
    (ckpt / "r2ec.json").write_text(json.dumps(meta, indent=2))  # as one written before the record
    res = CliRunner().invoke(app, ["checkpoint", "show", str(ckpt)])
    assert "backbone: not recorded" in res.stderr and f"record-backbone {ckpt}" in res.stderr
    res = CliRunner().invoke(app, ["checkpoint", "record-backbone", str(ckpt)])
    assert res.exit_code == 0 and record["sha256"] in res.stdout, res.output
    assert read_meta(ckpt) == {**meta, "backbone": record}  # only the record added
    assert load_checkpoint(ckpt, dtype="float32").backbone.status == "match"
    res = CliRunner().invoke(app, ["checkpoint", "record-backbone", str(ckpt)])
    assert res.exit_code == 2 and "records its backbone already" in res.output
    assert read_meta(ckpt) == {**meta, "backbone": record}
