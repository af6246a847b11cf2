import errno
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from index import ItemIndex
from model import checkpoint
from model.checkpoint import (
    CheckpointError,
    CurrentMoved,
    create_base_checkpoint,
    current_lock,
    current_version,
    flip_current,
    list_versions,
    load_checkpoint,
    prune_versions,
    publish_version,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
    set_current,
    unused_version,
)
from model.data import dataset


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
    # its own catalog reads the stored table; another order is encoded, row by row the same items
    assert ckpt.vectors_for(items) is ckpt.item_vectors
    flipped = items.iloc[::-1].reset_index(drop=True)
    encoded = ckpt.vectors_for(flipped)
    assert encoded is not ckpt.item_vectors
    np.testing.assert_allclose(np.asarray(encoded), vectors[::-1], atol=1e-6)


def test_an_older_nfd_or_bidi_item_table_is_still_the_catalog_of_its_dataset(tmp_path, tiny_dataset):
    """`load_prepared` reads an older dataset in NFC and without bidi controls in a title, year
    or genre; the checkpoint an older release made from it stored them as they were. The
    retrain gate (`vectors_for`) scores it with the vectors it serves, not with the whole
    catalog encoded again; other texts are still another catalog."""
    import unicodedata

    from model.checkpoint import same_items
    from model.data.dataset import nfc_items

    old = tiny_dataset.items.copy()
    old.loc[0, "title"] = unicodedata.normalize("NFD", "Amélie")
    old.loc[1, "genres"] = "Drama \u202eWar"
    create_base_checkpoint(tmp_path / "ckpt", "tiny", old, dtype="float32", progress=False)
    ckpt = load_checkpoint(tmp_path / "ckpt", dtype="float32")
    read, changed = nfc_items(ckpt.items)
    read.loc[1, "genres"] = "Drama War"  # as load_prepared reads the dataset now
    assert changed.sum() == 1 and not read.equals(ckpt.items)
    assert same_items(ckpt.items, read) and same_items(read, ckpt.items)
    assert ckpt.vectors_for(read) is ckpt.item_vectors
    other = read.copy()
    other.loc[0, "title"] = "Amelie"  # another text: encoded
    assert not same_items(ckpt.items, other)


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
    # the mode a plain mkdir gives, not mkdtemp's 0700: a service running as another user loads it
    umask = os.umask(0o022)
    try:
        save_checkpoint(
            tmp_path / "d", tiny_model, base="tiny", weights="base", items=items, item_vectors=vectors
        )
    finally:
        os.umask(umask)
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


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
    with pytest.raises(CheckpointError, match="nowhere does not exist"):  # a typo, not "no r2ec.json"
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not an R²ec checkpoint: no r2ec.json"):
        load_checkpoint(tmp_path / "empty")


def _save(out, tiny_model, tiny_dataset):
    items = _items(tiny_dataset)
    vectors = np.zeros((len(items), tiny_model.hidden_size), dtype=np.float32)
    return save_checkpoint(out, tiny_model, base="tiny", weights="base", items=items, item_vectors=vectors)


@pytest.mark.parametrize("existing", [False, True], ids=["new", "replaced"])
def test_a_checkpoint_reaches_the_disk_before_its_name(tmp_path, tiny_model, tiny_dataset, fsynced, existing):
    """Every file and directory of the temp dir is flushed before the rename, then the parent
    (the rename itself): after a power loss no empty or truncated file under the new name."""
    out = tmp_path / "c"
    if existing:
        _save(out, tiny_model, tiny_dataset)
        fsynced.clear()
    _save(out, tiny_model, tiny_dataset)
    parent = tmp_path.resolve()
    assert fsynced[-1] == parent
    flushed = fsynced[:-1]
    tmp = {p.relative_to(parent).parts[0] for p in flushed}
    assert len(tmp) == 1 and tmp.pop().startswith(".c.tmp-")
    written = {Path(".")} | {p.relative_to(out) for p in out.rglob("*")}
    assert {p.relative_to(parent / flushed[-1].name) for p in flushed} == written
    assert flushed[-1].parent == parent  # the temp dir itself last, after what it holds


def _crash_the_second_rename(monkeypatch, out):
    """Two renames, as on a filesystem that cannot swap two directories; the second fails."""
    monkeypatch.setattr(dataset, "_exchange", lambda a, b: False)
    real = os.replace

    def replace(src, dst):
        if Path(dst) == out and Path(src).name.startswith(f".{out.name}.tmp-"):
            raise OSError("killed between the two renames")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def test_a_save_cut_between_its_two_renames_is_restored(tmp_path, tiny_model, tiny_dataset, monkeypatch):
    from model.checkpoint import recover_checkpoint

    out = tmp_path / "c"
    first = _save(out, tiny_model, tiny_dataset)
    with monkeypatch.context() as m:
        _crash_the_second_rename(m, out)
        with pytest.raises(OSError, match="killed"):
            _save(out, tiny_model, tiny_dataset)
    assert not out.exists() and [p.name[:7] for p in tmp_path.iterdir()] == [".c.old-"]
    recover_checkpoint(out)
    assert read_meta(out)["version"] == first["version"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    recover_checkpoint(out)  # nothing aside: nothing to do
    assert read_meta(out)["version"] == first["version"]


def test_recovery_touches_only_what_a_save_set_aside(tmp_path, tiny_model, tiny_dataset, monkeypatch):
    """A user's `.c.old-backup`, a sibling checkpoint `c.old-2`'s temp dir: names alike, not
    ours, neither restored nor removed."""
    out = tmp_path / "c"
    first = _save(out, tiny_model, tiny_dataset)
    lookalikes = [tmp_path / ".c.old-backup", tmp_path / ".c.old-2.tmp-aaaaaaaaaaaa"]
    for p in lookalikes:
        shutil.copytree(out, p)
    with monkeypatch.context() as m:
        _crash_the_second_rename(m, out)
        with pytest.raises(OSError, match="killed"):
            _save(out, tiny_model, tiny_dataset)
    checkpoint.recover_checkpoint(out)
    assert read_meta(out)["version"] == first["version"]
    assert all(p.is_dir() for p in lookalikes)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["c", *(p.name for p in lookalikes)])


def test_the_next_save_after_a_cut_one_leaves_nothing_aside(tmp_path, tiny_model, tiny_dataset, monkeypatch):
    out = tmp_path / "c"
    _save(out, tiny_model, tiny_dataset)
    with monkeypatch.context() as m:
        _crash_the_second_rename(m, out)
        with pytest.raises(OSError, match="killed"):
            _save(out, tiny_model, tiny_dataset)
    again = _save(out, tiny_model, tiny_dataset)
    assert read_meta(out)["version"] == again["version"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_a_save_killed_mid_write_leaves_its_temp_dir_only_until_the_next_writer(
    tmp_path, tiny_model, tiny_dataset, monkeypatch
):
    """A SIGKILL runs no `finally`: the save's `.c.tmp-*` (a whole checkpoint, a full
    fine-tune's optimizer state in a run's last/) stayed for good. The next writer of the path
    (a save, a training run's start, `recover_checkpoint`) removes it; a lookalike stays."""
    out = tmp_path / "c"
    first = _save(out, tiny_model, tiny_dataset)
    with monkeypatch.context() as m:  # killed just before the swap, cleaning nothing up
        # (the swap's fsync lives beside it in model/data/dataset.py)
        m.setattr(dataset, "fsync_tree", lambda p: (_ for _ in ()).throw(OSError("killed")))
        m.setattr(checkpoint.shutil, "rmtree", lambda *a, **k: None)
        with pytest.raises(OSError, match="killed"):
            _save(out, tiny_model, tiny_dataset)
    (dead,) = [p for p in tmp_path.iterdir() if p.name.startswith(".c.tmp-")]
    lookalike = tmp_path / ".c.tmp-backup"
    lookalike.mkdir()
    checkpoint.recover_checkpoint(out)
    assert read_meta(out)["version"] == first["version"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".c.tmp-backup", "c"]
    shutil.copytree(out, dead)  # the same leftover, met by the next save instead
    second = _save(out, tiny_model, tiny_dataset)
    assert read_meta(out)["version"] == second["version"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".c.tmp-backup", "c"]


def test_replacing_a_checkpoint_keeps_one_at_its_path_throughout(
    tmp_path, tiny_model, tiny_dataset, monkeypatch
):
    """Where the filesystem swaps two directories in one rename (Linux renameat2 on ext4, xfs,
    btrfs, tmpfs), a reader of the checkpoint's path finds one at every moment."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    if not dataset._exchange(a, b):
        pytest.skip("this filesystem cannot swap two directories in one rename")
    out = tmp_path / "c"
    first = _save(out, tiny_model, tiny_dataset)
    real = os.replace

    def replace(src, dst):
        real(src, dst)
        assert (out / "r2ec.json").is_file(), f"{out} missing after renaming {src} to {dst}"

    monkeypatch.setattr(os, "replace", replace)
    second = _save(out, tiny_model, tiny_dataset)
    assert read_meta(out)["version"] == second["version"] != first["version"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


# -- the versions root ----------------------------------------------------------------------------
def _fake_versions(root, names):
    """Checkpoint dirs with just an r2ec.json, created a day apart in `names` order."""
    for n, name in enumerate(names):
        (root / name).mkdir()
        meta = {"format": "r2ec-checkpoint", "format_version": 1, "version": name}
        (root / name / "r2ec.json").write_text(json.dumps({**meta, "created_at": f"2025-01-0{n + 1}"}))


def test_prune_keeps_the_newest_and_always_the_current(tmp_path):
    _fake_versions(tmp_path, ["a", "b", "c", "d"])
    (tmp_path / "retrain").mkdir()  # the job's own directory is not a version
    (tmp_path / "CURRENT").write_text("a\n")
    assert list_versions(tmp_path) == ["a", "b", "c", "d"]
    assert prune_versions(tmp_path, keep=2) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CURRENT", "CURRENT.lock", "a", "c", "d", "retrain"]
    assert prune_versions(tmp_path, keep=1, protect=["c"]) == []  # retraining's: its run's start


def test_a_prune_killed_mid_removal_leaves_no_half_version(tmp_path, monkeypatch):
    """rmtree deletes in directory order: a kill after r2ec.json went left a directory that no
    longer looked like a version, so no prune ever removed it (or, before, one listed as a
    rollback target without its weights). A version now leaves sight in one rename first."""
    _fake_versions(tmp_path, ["a", "b", "c", "d"])
    (tmp_path / "a" / "adapter").mkdir()
    (tmp_path / "CURRENT").write_text("d\n")

    def killed(path, *args, **kwargs):  # r2ec.json first, then SIGKILL
        (Path(path) / "r2ec.json").unlink(missing_ok=True)
        raise OSError("killed")

    with monkeypatch.context() as m:
        m.setattr(checkpoint.shutil, "rmtree", killed)
        with pytest.raises(OSError, match="killed"):
            prune_versions(tmp_path, keep=2)
    assert list_versions(tmp_path) == ["c", "d"]  # neither a half one nor b is a rollback target
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    _fake_versions(tmp_path, ["e"])
    meta = json.loads((tmp_path / "e" / "r2ec.json").read_text())
    (tmp_path / "e" / "r2ec.json").write_text(json.dumps({**meta, "created_at": "2025-01-09"}))
    assert prune_versions(tmp_path, keep=2) == ["c"]  # the next prune removes what was hidden
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CURRENT", "CURRENT.lock", "d", "e"]


def test_prune_removes_temps_killed_writers_left_in_the_root(tmp_path):
    """`r2ec checkpoint init --out ROOT/v1` killed mid-write left `.v1.tmp-*`; that save takes
    no lock, so one written to within the hour may be in progress and stays. A flip of CURRENT
    killed mid-write left `.CURRENT.<hex>.tmp`: every flip holds the lock prune holds, so it goes."""
    from model.data.dataset import STALE_TEMP_S

    _fake_versions(tmp_path, ["a"])
    (tmp_path / "CURRENT").write_text("a\n")
    dead, live = tmp_path / ".v1.tmp-0123456789ab", tmp_path / ".v2.tmp-0123456789ab"
    for d in (dead, live):
        shutil.copytree(tmp_path / "a", d)
    old = time.time() - STALE_TEMP_S - 60
    for p in (dead, dead / "r2ec.json"):
        os.utime(p, (old, old))
    (tmp_path / ".CURRENT.0123456789ab.tmp").write_text("b\n")
    assert prune_versions(tmp_path, keep=1) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".v2.tmp-0123456789ab",
        "CURRENT",
        "CURRENT.lock",
        "a",
    ]


def test_publish_flips_current_and_never_overwrites(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    _fake_versions(root, ["v0"])
    flip_current(root, "v0")
    assert current_version(root) == "v0" and resolve_checkpoint(root) == root / "v0"
    _fake_versions(tmp_path, ["cand"])
    assert unused_version(root, "cand") == "cand"
    publish_version(root, tmp_path / "cand", "cand")
    assert (root / "CURRENT").read_text() == "cand\n" and resolve_checkpoint(root) == root / "cand"
    assert not (tmp_path / "cand").exists()
    taken = unused_version(root, "cand")
    assert taken.startswith("cand-") and not (root / taken).exists()
    _fake_versions(tmp_path, ["again"])
    with pytest.raises(CheckpointError, match="never overwritten"):
        publish_version(root, tmp_path / "again", "v0")
    assert current_version(root) == "cand" and not list(root.glob(".CURRENT*"))  # no temp left


def test_a_publish_compares_and_swaps_current(tmp_path):
    """Retraining publishes only over the version it trained from and gated against: an
    operator's rollback meanwhile is not overwritten, nor are the edits of the version rolled
    back to carried into a candidate that is not published."""
    root = tmp_path / "root"
    root.mkdir()
    _fake_versions(root, ["v0", "v1"])
    flip_current(root, "v0")  # a rollback from v1, made while a retrain trained from it
    _fake_versions(tmp_path, ["cand"])
    with pytest.raises(CurrentMoved, match="names 'v0', no longer 'v1': not publishing") as moved:
        publish_version(root, tmp_path / "cand", "cand", expected="v1")
    assert (moved.value.expected, moved.value.found) == ("v1", "v0")
    assert current_version(root) == "v0" and list_versions(root) == ["v0", "v1"]
    assert sorted(p.name for p in (tmp_path / "cand").iterdir()) == ["r2ec.json"]  # untouched
    publish_version(root, tmp_path / "cand", "cand", expected="v0")
    assert current_version(root) == "cand"


def test_a_publish_killed_before_its_flip_leaves_no_version_that_looks_served(tmp_path, monkeypatch):
    """A kill between moving the version in and flipping CURRENT left an orphan that never
    served yet took a `keep` slot and looked like the version to roll back to."""
    root = tmp_path / "root"
    root.mkdir()
    _fake_versions(root, ["v0"])
    flip_current(root, "v0")
    _fake_versions(tmp_path, ["cand"])
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "flip_current", lambda *a: (_ for _ in ()).throw(OSError("killed")))
        with pytest.raises(OSError, match="killed"):
            publish_version(root, tmp_path / "cand", "cand", expected="v0")
    assert (root / "cand" / "r2ec.json").is_file()  # moved in, whole
    assert current_version(root) == "v0" and list_versions(root) == ["v0"]
    with pytest.raises(CheckpointError, match="cand never became CURRENT"):
        set_current(root, "cand")
    assert prune_versions(root, keep=3) == []  # not a version pruned: removed, with a warning
    assert sorted(p.name for p in root.iterdir()) == ["CURRENT", "CURRENT.lock", "v0"]


def test_a_publish_killed_after_its_flip_leaves_a_served_version(tmp_path, monkeypatch):
    """Killed between the flip and dropping the mark: CURRENT names it, so it has served, and
    stays a version after CURRENT moves on (a rollback, the next publish)."""
    root = tmp_path / "root"
    root.mkdir()
    _fake_versions(root, ["v0"])
    flip_current(root, "v0")
    _fake_versions(tmp_path, ["cand"])
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "_served", lambda *a: (_ for _ in ()).throw(OSError("killed")))
        with pytest.raises(OSError, match="killed"):
            publish_version(root, tmp_path / "cand", "cand")
    assert current_version(root) == "cand" and list_versions(root) == ["cand", "v0"]
    set_current(root, "v0")
    assert prune_versions(root, keep=3) == [] and list_versions(root) == ["cand", "v0"]
    assert set_current(root, "cand") == "v0"


def test_set_current_points_at_a_version_that_reads_and_refuses_others(tmp_path):
    _fake_versions(tmp_path, ["v0", "v1"])
    (tmp_path / "CURRENT").write_text("v1\n")
    (tmp_path / "retrain").mkdir()
    assert set_current(tmp_path, "v0") == "v1" and current_version(tmp_path) == "v0"
    assert set_current(tmp_path, "v0") == "v0"  # already: nothing written
    (tmp_path / "v1" / "r2ec.json").write_text('{"format": "r2ec-check')  # truncated
    for version, message in [
        ("v1", r"not pointing CURRENT at 'v1': .*v1/r2ec.json is damaged or unreadable \(JSONDecodeError"),
        ("v9", r"holds no version 'v9' \(versions: v0\)"),
        ("retrain", "r2ec.json is missing"),
        ("../v0", "'../v0' is not a version"),
        (".v0.pruned-0123456789ab", "is not a version"),
        ("", "is not a version"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            set_current(tmp_path, version)
    assert current_version(tmp_path) == "v0" and not list(tmp_path.glob(".CURRENT*"))
    with pytest.raises(CheckpointError, match="not a versions root: no CURRENT"):
        set_current(tmp_path / "v0", "v0")


def test_changes_of_current_take_turns(tmp_path, monkeypatch):
    """A rollback cannot slip between a prune's reading of CURRENT and its removals, nor between
    a publish's compare and its swap: both hold ROOT/CURRENT.lock, which a rollback waits for
    (here: not at all) and then names."""
    _fake_versions(tmp_path, ["a", "b", "c"])
    (tmp_path / "CURRENT").write_text("c\n")
    real = checkpoint.list_versions
    tried = []

    def rollback_meanwhile(root):
        with pytest.raises(CheckpointError, match=r"CURRENT\.lock is still held after 0 s"):
            set_current(tmp_path, "a", timeout_s=0)
        tried.append(root)
        return real(root)

    monkeypatch.setattr(checkpoint, "list_versions", rollback_meanwhile)
    assert prune_versions(tmp_path, keep=1) == ["a", "b"] and tried
    monkeypatch.setattr(checkpoint, "list_versions", real)
    monkeypatch.setattr(checkpoint, "LOCK_WAIT_S", 0)  # the default wait, a minute: none here
    with current_lock(tmp_path):  # e.g. a publish in progress
        with pytest.raises(CheckpointError, match="still held"):
            set_current(tmp_path, "c")
        with pytest.raises(CheckpointError, match="still held"):
            prune_versions(tmp_path, keep=1)
        (tmp_path / "run").mkdir()
        _fake_versions(tmp_path / "run", ["cand"])
        with pytest.raises(CheckpointError, match="still held"):
            publish_version(tmp_path, tmp_path / "run" / "cand", "cand", expected="c")
    assert current_version(tmp_path) == "c" and list_versions(tmp_path) == ["c"]


def test_a_published_version_reaches_the_disk_before_current_names_it(tmp_path, fsynced):
    """A power loss after the flip cannot leave CURRENT naming a version that is missing or
    half written (retraining adds retrain.json to the candidate just before publishing)."""
    root = tmp_path / "root"
    root.mkdir()
    _fake_versions(root, ["v0"])
    flip_current(root, "v0")
    _fake_versions(tmp_path, ["cand"])
    fsynced.clear()
    publish_version(root, tmp_path / "cand", "cand")
    where = [str(p) for p in fsynced]
    cand, root = str((tmp_path / "cand").resolve()), str(root.resolve())
    pointer = next(i for i, p in enumerate(where) if Path(p).name.startswith(".CURRENT."))
    assert where.index(cand + "/r2ec.json") < where.index(cand) < where.index(root) < pointer
    assert where[-1] == root  # the flip itself


def test_current_pointer_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(CheckpointError, match="no CURRENT file.*checkpoint init"):
        current_version(tmp_path)
    (tmp_path / "CURRENT").write_text("\n")
    with pytest.raises(CheckpointError, match="CURRENT is empty"):
        current_version(tmp_path)
    with pytest.raises(CheckpointError, match="CURRENT is empty"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "CURRENT").write_text("gone\n")
    with pytest.raises(CheckpointError, match="names 'gone', which is not a checkpoint"):
        current_version(tmp_path)
    # what the service and `r2ec` resolve: the pointer named, and where rolling back is told
    with pytest.raises(CheckpointError, match=r"CURRENT names 'gone', which does not exist.*operations.md"):
        resolve_checkpoint(tmp_path)


EDITS_FILE = "item_edits.json"  # model/checkpoint.py's name for it: a format on the volume


def test_publishing_carries_the_current_versions_item_edits(tmp_path):
    """The edits a version's service saved (index/index.json) and the ones carried into it
    when it was published, the later per item, go into the next version with its name, also
    when no service ever ran on it; the service applies them (tests/service/test_catalog.py)."""
    root = tmp_path / "root"
    root.mkdir()
    _fake_versions(root, ["v0"])
    flip_current(root, "v0")
    version = read_meta(root / "v0")["version"]
    carried = {"i1": {"title": "Carried"}, "i2": {"title": "Old"}}
    (root / "v0" / EDITS_FILE).write_text(
        json.dumps({"from": "gone", "catalog_edits": carried, "edit_times": {"i1": 5, "i2": 5}})
    )
    index = ItemIndex.build(["i1"], np.eye(1, 4, dtype=np.float32))
    saved = {"i2": {"title": "Saved Later"}, "i3": None}
    index.save(
        root / "v0" / "index",
        {"model_version": version, "catalog_edits": saved, "edit_times": {"i2": 9, "i3": 7}},
    )
    _fake_versions(tmp_path, ["cand"])
    publish_version(root, tmp_path / "cand", "cand")
    doc = json.loads((root / "cand" / EDITS_FILE).read_text())
    assert doc == {
        "from": "v0",
        "version": version,
        "catalog_edits": {"i1": _item("Carried"), "i2": _item("Saved Later"), "i3": None},  # every field
        "edit_times": {"i1": 5, "i2": 9, "i3": 7},
    }
    _fake_versions(tmp_path, ["next"])
    publish_version(root, tmp_path / "next", "next")  # no service ran on cand: still carried
    assert json.loads((root / "next" / EDITS_FILE).read_text())["catalog_edits"] == doc["catalog_edits"]


def _item(title: str) -> dict[str, str]:
    return {"title": title, "year": "", "genres": "", "description": ""}


def test_a_checkpoint_written_before_taste_format_reads_it_from_its_training_stage(tmp_path, tiny_dataset):
    """The shipped model (a rationale run) predates the option: it is taken to write the format,
    as a RecPO run (retraining warm-starts from one); an untrained base or a contrastive run is
    not; a checkpoint that says is taken at its word."""
    import json

    create_base_checkpoint(tmp_path / "base", "tiny", tiny_dataset.items, dtype="float32", progress=False)
    meta_file = tmp_path / "base" / "r2ec.json"
    written = json.loads(meta_file.read_text())
    assert written["prompts"]["taste_format"] is False  # new checkpoints say
    for train, said, taught in (
        ({"config": {"stage": "rationale"}, "step": 330}, None, True),
        ({"config": {"stage": "recpo"}, "step": 24}, None, True),  # RecPO from a rationale model
        ({"config": {"stage": "contrastive"}, "step": 90}, None, False),
        (None, None, False),
        ({"config": {"stage": "rationale"}, "step": 330}, False, False),
    ):
        meta = {**written, "train": train, "prompts": dict(written["prompts"])}
        if said is None:
            del meta["prompts"]["taste_format"]
        else:
            meta["prompts"]["taste_format"] = said
        meta_file.write_text(json.dumps(meta))
        assert load_checkpoint(tmp_path / "base", dtype="float32").model.prompts.taste_format is taught, train


# -- damaged files --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def _lora_checkpoint(tiny_dataset, tmp_path_factory) -> Path:
    """A LoRA checkpoint of a fresh tiny model (the session's tiny_model is not wrapped)."""
    from peft import LoraConfig, get_peft_model

    from model.backbone import BackboneConfig, load_backbone
    from model.r2ec import R2ec

    lm, tok = load_backbone(BackboneConfig(base="tiny", dtype="float32", seed=0))
    model = R2ec(get_peft_model(lm, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])), tok)
    items = _items(tiny_dataset)
    vectors = np.zeros((len(items), model.hidden_size), dtype=np.float32)
    out = tmp_path_factory.mktemp("lora") / "c"
    save_checkpoint(out, model, base="tiny", weights="lora", items=items, item_vectors=vectors)
    return out


DAMAGED = [
    ("r2ec.json", 0.5),
    ("items.parquet", 0.5),
    ("item_vectors.npy", 0),  # np.load's EOFError: click printed a bare "Aborted."
    ("item_vectors.npy", 0.5),
    ("adapter/adapter_model.safetensors", 0.5),
    ("adapter/adapter_model.safetensors", 0),
    ("adapter/adapter_config.json", 0.5),
    ("tokenizer/tokenizer.json", 0.5),
]


@pytest.mark.parametrize(("name", "kept"), DAMAGED, ids=[f"{n}-{k}" for n, k in DAMAGED])
@pytest.mark.parametrize("where", ["alone", "published"])
def test_a_damaged_file_is_a_checkpoint_error_that_names_it_and_says_what_to_do(
    _lora_checkpoint, tmp_path, name, kept, where
):
    ckpt = tmp_path / "c" if where == "alone" else tmp_path / "root" / "v1"
    shutil.copytree(_lora_checkpoint, ckpt)
    if where == "published":
        (ckpt.parent / "CURRENT").write_text("v1\n")
    file = ckpt / name
    os.truncate(file, int(file.stat().st_size * kept))
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(ckpt.parent if where == "published" else ckpt, dtype="float32")
    message = str(raised.value)
    assert message.startswith(f"{file} is damaged or unreadable ("), message
    assert "\n" not in message
    if where == "published":
        assert f"point {ckpt.parent / 'CURRENT'} at a version that loads (docs/operations.md" in message
    else:
        assert message.endswith("copy a good one back, or write the checkpoint again")


def test_an_unreadable_meta_file_is_named_where_the_versions_are_listed_and_resolved(tmp_path):
    _fake_versions(tmp_path, ["a", "b"])
    (tmp_path / "CURRENT").write_text("b\n")
    (tmp_path / "b" / "r2ec.json").write_text('{"format": "r2ec-checkpoint", "vers')
    assert list_versions(tmp_path) == ["a"]  # a damaged version is not listed, as before
    with pytest.raises(CheckpointError, match=r"b/r2ec.json is damaged or unreadable \(JSONDecodeError"):
        read_meta(resolve_checkpoint(tmp_path))
    (tmp_path / "b" / "r2ec.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"json is damaged or unreadable \(ValueError: a JSON list"):
        read_meta(tmp_path / "b")


def test_a_full_disk_while_saving_names_the_part_being_written(
    tmp_path, tiny_model, tiny_dataset, monkeypatch
):
    """safetensors, tokenizers and numpy each fail in their own way on a full disk, none naming
    the file (r2ec train printed a SafetensorError traceback); the checkpoint there is kept."""
    out = tmp_path / "c"
    first = _save(out, tiny_model, tiny_dataset)

    def full(*args, **kwargs):
        raise Exception("No space left on device (os error 28)")  # what tokenizers raises

    monkeypatch.setattr(tiny_model.tokenizer, "save_pretrained", full)
    with pytest.raises(OSError) as raised:
        _save(out, tiny_model, tiny_dataset)
    assert str(raised.value) == f"[Errno 28] No space left on device: '{out / 'tokenizer'}'"
    monkeypatch.undo()
    no_space = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "save", lambda *a, **k: (_ for _ in ()).throw(no_space))
    with pytest.raises(OSError) as raised:
        _save(out, tiny_model, tiny_dataset)
    assert str(raised.value) == f"[Errno 28] No space left on device: '{out / 'item_vectors.npy'}'"
    assert read_meta(out)["version"] == first["version"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    monkeypatch.undo()
    monkeypatch.setattr(np, "save", lambda *a, **k: (_ for _ in ()).throw(AttributeError("a bug")))
    with pytest.raises(AttributeError, match="a bug"):  # not an I/O failure: left as it is
        _save(out, tiny_model, tiny_dataset)
