"""RecBole atomic files: item-field mapping, broken files, and the ml-100k source."""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
from pathlib import Path

import pytest

from model.data import DataError, load_prepared, prepare_amazon, prepare_atomic, prepare_ml100k
from model.data.atomic import read_atomic_items
from model.data.movielens import RAW_FILES, WHEEL_MEMBER_DIR

from .conftest import assert_no_leakage


def test_item_field_mapping(tiny_item):
    items = read_atomic_items(tiny_item).set_index("item_id")
    assert items.loc["i1", "title"] == "Toy Story"
    assert items.loc["i1", "year"] == "1995"
    assert items.loc["i1", "genres"] == "Animation, Children's, Comedy"
    assert items.loc["i5", "year"] == "1995"  # "1995.0" from a float-typed column
    assert items.loc["i4", "year"] == "" and items.loc["i9", "genres"] == ""
    assert (items.description == "").all()


def test_item_table_catalog(tiny_inter, tiny_item, tmp_path):
    ds = load_prepared(prepare_atomic(tiny_inter, tiny_item, tmp_path, "tiny", "loo"))
    titles = ds.item_titles()
    # i1..i9 and i11 from the catalog, i10 interacted but unknown, i12 untitled and unused
    assert sorted(titles) == sorted([f"i{k}" for k in range(1, 12)])
    assert titles["i10"] == "Item i10" and titles["i11"] == "Richard III"
    assert ds.category == "item" and ds.meta["stats"]["num_items"] == 11
    # the raw files it came from, by content: a preparation says which data it is
    digests = ds.meta["source_sha256"]
    assert digests == {
        "inter": hashlib.sha256(Path(tiny_inter).read_bytes()).hexdigest(),
        "item": hashlib.sha256(Path(tiny_item).read_bytes()).hexdigest(),
    }


def test_only_the_raw_files_are_hashed(tiny_inter, tmp_path, monkeypatch):
    """Without an item file `source` says item None: no file named "None" here is hashed as it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "None").write_text("not the data")
    ds = load_prepared(prepare_atomic(tiny_inter, None, tmp_path, "tiny", "loo"))
    assert set(ds.meta["source_sha256"]) == {"inter"}


def test_the_samples_digest_tells_preparations_apart_by_their_samples(tiny_inter, tiny_item, tmp_path):
    """The same files prepared twice give one digest; one interaction more gives another, and so
    does another protocol of the same files."""
    first = load_prepared(prepare_atomic(tiny_inter, tiny_item, tmp_path / "a", "tiny", "loo"))
    again = load_prepared(prepare_atomic(tiny_inter, tiny_item, tmp_path / "b", "tiny", "loo"))
    assert first.samples_digest() == again.samples_digest()
    assert first.describe() == {
        "name": "tiny",
        "protocol": "loo",
        "path": str(first.path),
        "samples_sha256": first.samples_digest(),
    }
    rows = Path(tiny_inter).read_text().splitlines()
    user, item, rating, ts = rows[1].split("\t")
    more = tmp_path / "more.inter"
    more.write_text("\n".join([*rows, "\t".join([user, item, rating, str(int(float(ts)) + 10**6)])]) + "\n")
    newer = load_prepared(prepare_atomic(more, tiny_item, tmp_path / "c", "tiny", "loo"))
    assert newer.samples_digest() != first.samples_digest()
    temporal = load_prepared(prepare_atomic(tiny_inter, tiny_item, tmp_path / "d", "tiny", "temporal"))
    assert temporal.samples_digest() != first.samples_digest()


def test_other_field_names_and_no_timestamp(tmp_path):
    inter = tmp_path / "x.inter"
    inter.write_text("user_id:token\titem_id:token\na\tp\na\tq\na\tr\n")
    item = tmp_path / "x.item"
    item.write_text(
        "item_id:token\ttitle:token_seq\tyear:token\tcategories:token\tdesc:token_seq\n"
        "p\tPen\t2001\tOffice Supplies\tA blue pen\n"
    )
    ds = load_prepared(prepare_atomic(inter, item, tmp_path, "x", "loo", category="product"))
    row = ds.items.set_index("item_id").loc["p"]
    assert (row.title, row.year, row.genres, row.description) == (
        "Pen", "2001", "Office Supplies", "A blue pen",  # a plain token is not split
    )  # fmt: skip
    assert ds.split("test").target_item_id[0] == "r"  # row order stands in for time
    assert "row order" in ds.meta["source"]["timestamp"]


HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("item_id:token\trating:float\ttimestamp:float\ni\t1\t2\n", "user_id"),
        (HEADER + "a\ti\t4\t100\na\tj\t4\tyesterday\n", r"line 3: timestamp 'yesterday'"),
        (HEADER + "a\ti\t4\t100\na\tj\tgood\t200\n", r"line 3: rating 'good'"),
        (HEADER + "a\ti\t4\t100\na\tj\t200\n", r"line 3: expected 4"),
        (HEADER + "a\ti\t4\t100\n\t\t4\t200\n", r"line 3: empty user_id"),
        (HEADER, "no interactions"),
        ("", "empty"),
        # values the service would refuse: training and retraining read one scale
        (
            HEADER + "a\ti\t4\t1700000000000\n",
            r"timestamp 1700000000000 \(user 'a', item 'i'\) is after 2100: milli",
        ),
        (HEADER + "a\ti\t4\t-5\n", r"timestamp -5 .* is before 1970"),
        (HEADER + "a\ti\t4\t1e19\n", r"timestamp .* is after 2100"),  # not wrapped by int64
        (
            HEADER + "a\ti\t50\t100\na\tj\tinf\t200\n",
            r"rating 50 \(user 'a', item 'i'\) is outside 0-10; 2 such",
        ),
        (HEADER + "a\ti\t-2\t100\n", r"rating -2 .* is outside 0-10"),
        # a header the format does not read, with what to do about it
        ("user_id,item_id,rating\na,i,4\n", "must be tab-separated .* this header has commas"),
    ],
)
def test_broken_inter_file(tmp_path, tiny_item, body, problem):
    bad = tmp_path / "broken.inter"
    bad.write_text(body)
    with pytest.raises(DataError, match=problem) as info:
        prepare_atomic(bad, tiny_item, tmp_path, "broken", "loo")
    assert "broken.inter" in str(info.value)


def test_a_utf8_byte_order_mark_is_skipped_whatever_the_first_column(tmp_path, tiny_item, caplog):
    """The mark stuck to the first column's name: a required one got a hint, but a `.item` file
    whose first column is `title` lost every title ("Item <id>"), and a `.inter` whose first is
    `timestamp` lost its times ("has no timestamp column"), both silently."""
    inter = tmp_path / "bom.inter"
    inter.write_text(
        "\ufefftimestamp:float\tuser_id:token\titem_id:token\trating:float\n"
        + "".join(f"{t}\t{u}\t{i}\t4\n" for u in "ab" for t, i in ((300, "p"), (100, "q"), (200, "r"))),
        encoding="utf-8",
    )
    item = tmp_path / "bom.item"
    item.write_text(
        "\ufefftitle:token_seq\titem_id:token\tyear:token\nPen\tp\t2001\nQuill\tq\t\nRuler\tr\t1999\n",
        encoding="utf-8",
    )
    with caplog.at_level("WARNING"):
        ds = load_prepared(prepare_atomic(inter, item, tmp_path, "bom", "loo"))
    assert ds.item_titles() == {"p": "Pen", "q": "Quill", "r": "Ruler"}
    assert "timestamp" not in ds.meta["source"]  # its times were read
    assert ds.split("test").target_item_id.tolist() == ["p", "p"]  # the latest by time, not by row
    assert "no timestamp column" not in caplog.text and "missing from" not in caplog.text
    # a required first column too, where the hint used to say --encoding utf-8-sig
    (tmp_path / "first.inter").write_text("\ufeff" + HEADER + "a\ti\t4\t100\na\tj\t4\t200\na\tk\t4\t300\n")
    prepare_atomic(tmp_path / "first.inter", tiny_item, tmp_path, "first", "loo")


@pytest.mark.parametrize(
    ("codec", "bom"), [("utf-16-le", "FF FE"), ("utf-16-be", "FE FF"), ("utf-32-le", "FF FE 00 00")]
)
def test_a_utf16_or_utf32_file_is_named_as_such(tmp_path, tiny_inter, tiny_item, codec, bom):
    """A UTF-16 file (Excel's "Unicode text") was told "0xff is not valid utf-8 ... e.g. latin-1",
    and read as latin-1 its header was 'ÿþi\x00t\x00...'."""
    item = tmp_path / "wide.item"
    item.write_bytes(("\ufeff" + tiny_item.read_text(encoding="utf-8")).encode(codec))
    family = codec[:6].upper()
    for encoding in ("utf-8", "latin-1"):
        with pytest.raises(DataError) as info:
            prepare_atomic(tiny_inter, item, tmp_path, "x", "loo", encoding=encoding)
        message = str(info.value)
        assert f"starts with a {family}" in message and f"({bom})" in message and "wide.item" in message
        assert "iconv" in message and "latin-1)" not in message
    # told its family, it is read (both files: this .inter is ASCII, readable as neither)
    inter = tmp_path / "wide.inter"
    inter.write_bytes(("\ufeff" + tiny_inter.read_text(encoding="utf-8")).encode(codec))
    ds = load_prepared(prepare_atomic(inter, item, tmp_path, "x", "loo", encoding=family.lower()))
    assert ds.item_titles()["i1"] == "Toy Story"


def test_rows_that_repeat_another_exactly_are_dropped_with_a_warning(tmp_path, tiny_item, caplog):
    inter = tmp_path / "dup.inter"
    rows = ["u\ti1\t4\t100", "u\ti2\t5\t200", "u\ti2\t5\t200", "u\ti3\t\t300", "u\ti3\t\t300"]
    rows += ["u\ti2\t4\t200", "u\ti4\t3\t400"]  # the same item and time with another rating stays
    inter.write_text(HEADER + "\n".join(rows) + "\n")
    ds = load_prepared(prepare_atomic(inter, tiny_item, tmp_path, "dup", "loo", max_history=10))
    assert "2 row(s) repeat an earlier row exactly" in caplog.text
    test = ds.split("test").iloc[0]
    assert list(test.history_item_ids) == ["i1", "i2", "i2", "i3"] and test.target_item_id == "i4"


def test_missing_files(tmp_path, tiny_inter, tiny_item):
    with pytest.raises(DataError, match="nope.inter"):
        prepare_atomic(tmp_path / "nope.inter", tiny_item, tmp_path, "x", "loo")
    with pytest.raises(DataError, match="nope.item"):
        prepare_atomic(tiny_inter, tmp_path / "nope.item", tmp_path, "x", "loo")
    bad_item = tmp_path / "bad.item"
    bad_item.write_text("movie_title:token_seq\nToy Story\n")
    with pytest.raises(DataError, match=r"bad\.item.*item_id"):
        prepare_atomic(tiny_inter, bad_item, tmp_path, "x", "loo")


def _latin1_item(tmp_path, tiny_item):
    """The tiny .item file with i6 retitled "Amélie" and written in Latin-1 (é is byte 0xe9)."""
    text = tiny_item.read_text(encoding="utf-8").replace("Shanghai Triad", "Amélie")
    path = tmp_path / "latin1.item"
    path.write_bytes(text.encode("latin-1"))
    return path


def test_a_file_that_is_not_utf8_fails_naming_the_file_line_and_byte(tmp_path, tiny_inter, tiny_item):
    """It used to be read with errors="replace": "Amélie" became "Am\ufffdlie", and exit 0."""
    item = _latin1_item(tmp_path, tiny_item)
    rows = item.read_bytes().split(b"\n")
    line = 1 + next(n for n, row in enumerate(rows) if b"Am\xe9lie" in row)
    column = 1 + rows[line - 1].index(b"\xe9")
    offset = item.read_bytes().index(b"\xe9")
    with pytest.raises(DataError) as info:
        prepare_atomic(tiny_inter, item, tmp_path, "x", "loo")
    message = str(info.value)
    assert message.startswith(
        f"{item}: line {line}, byte {column} (file offset {offset}): 0xe9 is not valid utf-8"
    )
    assert "--encoding" in message
    assert not (tmp_path / "x").exists()
    inter = tmp_path / "latin1.inter"  # the .inter file too, here in its header line
    inter.write_bytes(tiny_inter.read_bytes().replace(b"user_id", b"us\xe9r_id", 1))
    with pytest.raises(
        DataError, match=r"latin1\.inter: line 1, byte 3 \(file offset 2\): 0xe9 is not valid utf-8"
    ):
        prepare_atomic(inter, tiny_item, tmp_path, "x", "loo")

    # told the encoding, the title comes out right, and meta.json records it
    ds = load_prepared(prepare_atomic(tiny_inter, item, tmp_path, "x", "loo", encoding="latin-1"))
    assert ds.item_titles()["i6"] == "Amélie"
    assert ds.meta["source"]["encoding"] == "iso8859-1"
    with pytest.raises(DataError, match="unknown text encoding 'klingon'"):
        prepare_atomic(tiny_inter, item, tmp_path, "x", "loo", encoding="klingon")
    # a codec that is no text encoding, and one the file cannot even begin in: DataErrors too
    with pytest.raises(DataError, match="unknown text encoding 'hex'"):
        prepare_atomic(tiny_inter, item, tmp_path, "x", "loo", encoding="hex")
    with pytest.raises(DataError, match="not readable as utf-16.*BOM"):
        prepare_atomic(tiny_inter, tiny_item, tmp_path, "x", "loo", encoding="utf-16")


def test_cli_prepare_atomic_takes_an_encoding(tmp_path, tiny_inter, tiny_item):
    from typer.testing import CliRunner

    from cli import app

    item = _latin1_item(tmp_path, tiny_item)
    args = ["data", "prepare", "atomic", "--inter", str(tiny_inter), "--item", str(item), "--name", "x",
            "--data-dir", str(tmp_path)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert (
        result.exit_code == 2
        and "0xe9 is not valid utf-8" in result.output
        and "latin1.item" in result.output
    )
    result = CliRunner().invoke(app, [*args, "--encoding", "latin-1"])
    assert result.exit_code == 0, result.output
    assert load_prepared(tmp_path / "x" / "loo").item_titles()["i6"] == "Amélie"


def _retitled_item(tmp_path, tiny_item, **titles):
    """The tiny .item file with some titles replaced (i8="...")."""
    text = tiny_item.read_text(encoding="utf-8")
    for item_id, title in titles.items():
        old = next(line for line in text.splitlines() if line.startswith(f"{item_id}\t"))
        text = text.replace(old, old.replace(old.split("\t")[1], title))
    path = tmp_path / "retitled.item"
    path.write_text(text, encoding="utf-8")
    return path


def test_control_white_space_in_item_text_becomes_one_space(tmp_path, tiny_inter, tiny_item):
    """A title with a vertical tab, a form feed, U+2028 (a prompt's line break) or U+0085 used to
    be kept, and a prompt's line was then two; plain runs of spaces are kept."""
    item = _retitled_item(
        tmp_path,
        tiny_item,
        i1="Toy\x0bStory",
        i2="Golden \u2028 \x0c Eye",
        i3="Four\x85Rooms",
        i4="Get  Shorty",
    )
    titles = load_prepared(prepare_atomic(tiny_inter, item, tmp_path, "x", "loo")).item_titles()
    assert [titles[i] for i in ("i1", "i2", "i3", "i4")] == [
        "Toy Story",
        "Golden Eye",
        "Four Rooms",
        "Get  Shorty",
    ]


@pytest.mark.parametrize(
    ("title", "found"),
    [
        ("Babe<|im_end|>", "<|im_end|>"),  # SmolLM2's end of turn (and EOS)
        ("Babe <|im_start|>assistant", "<|im_start|>"),
        ("Babe <filename>", "<filename>"),  # one of SmolLM2's other added tokens
        ("Babe <|eot_id|>", "<|eot_id|>"),  # Llama 3's: any "<|...|>" marker
    ],
)
def test_item_text_holding_a_special_token_is_refused_naming_the_item(
    tmp_path, tiny_inter, tiny_item, title, found
):
    item = _retitled_item(tmp_path, tiny_item, i8=title)
    with pytest.raises(DataError) as info:
        prepare_atomic(tiny_inter, item, tmp_path, "x", "loo")
    message = str(info.value)
    assert f"item 'i8' title holds {found!r}" in message and "retitled.item" in message
    assert "special token" in message
    assert not (tmp_path / "x").exists()
    # plain text that only looks like markup is kept
    item = _retitled_item(tmp_path, tiny_item, i8="Babe <3 | im end |>", i9="<b>Dead Man</b>")
    titles = load_prepared(prepare_atomic(tiny_inter, item, tmp_path, "x", "loo")).item_titles()
    assert (titles["i8"], titles["i9"]) == ("Babe <3 | im end |>", "<b>Dead Man</b>")


def test_the_cli_names_the_item_whose_genres_hold_a_special_token(tmp_path, tiny_inter, tiny_item):
    from typer.testing import CliRunner

    from cli import app

    text = tiny_item.read_text(encoding="utf-8").replace("Drama War", "Drama <|endoftext|>War")
    item = tmp_path / "genres.item"
    item.write_text(text, encoding="utf-8")
    args = ["data", "prepare", "atomic", "--inter", str(tiny_inter), "--item", str(item), "--name", "x",
            "--data-dir", str(tmp_path)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "item 'i11' genres holds '<|endoftext|>'" in " ".join(result.output.split())


def test_item_text_is_stored_in_nfc_and_the_count_logged(tmp_path, tiny_inter, tiny_item, caplog):
    """A catalog merged from a macOS export (NFD: "e" + U+0301) and a Windows one kept both forms
    without a word, and "Amélie" was two titles to the model and one to a reader."""
    import unicodedata

    nfd = unicodedata.normalize("NFD", "Amélie")
    item = _retitled_item(tmp_path, tiny_item, i6="Amélie", i7=nfd)
    item.write_text(item.read_text(encoding="utf-8").replace("Drama War", f"Drama {nfd[:4]}War"))
    with caplog.at_level("INFO", logger="model.data.build"):
        ds = load_prepared(prepare_atomic(tiny_inter, item, tmp_path, "x", "loo"))
    titles = ds.item_titles()
    assert titles["i6"] == titles["i7"] == "Amélie"
    assert all(unicodedata.is_normalized("NFC", v) for c in ds.items.columns for v in ds.items[c])
    assert "2 item(s) had text not in Unicode NFC" in caplog.text and "item 'i7'" in caplog.text


def test_a_dataset_prepared_before_nfc_is_read_in_nfc(tmp_path, tiny_inter, tiny_item, caplog):
    import unicodedata

    import pandas as pd

    path = prepare_atomic(tiny_inter, tiny_item, tmp_path, "x", "loo")
    items = pd.read_parquet(path / "items.parquet")
    items.loc[items.item_id == "i6", "title"] = unicodedata.normalize("NFD", "Amélie")
    items.to_parquet(path / "items.parquet")  # as an older release wrote it
    with caplog.at_level("INFO", logger="model.data.dataset"):
        assert load_prepared(path).item_titles()["i6"] == "Amélie"
    assert "read 1 item(s) in Unicode NFC" in caplog.text


@pytest.mark.parametrize("control", ["\u202e", "\u2067", "\u200f", "\u061c"])
def test_a_bidi_control_in_a_title_or_genre_is_refused_naming_the_item(
    tmp_path, tiny_inter, tiny_item, control
):
    """Ids refuse bidirectional controls; titles took them, and a title "\u202eRLO title" mirrored
    the rest of the reasoning that copied it. The same check refuses them in an item's title,
    year and genres (a description may hold them: no reader sees it)."""
    item = _retitled_item(tmp_path, tiny_item, i8=f"{control}RLO title")
    with pytest.raises(DataError) as info:
        prepare_atomic(tiny_inter, item, tmp_path, "x", "loo")
    message = str(info.value)
    assert "item 'i8' title" in message and "bidirectional control" in message
    assert f"U+{ord(control):04X}" in message and "retitled.item" in message
    genres = tmp_path / "genres.item"
    genres.write_text(tiny_item.read_text(encoding="utf-8").replace("Drama War", f"Drama {control}War"))
    with pytest.raises(DataError, match="item 'i11' genres .* bidirectional control"):
        prepare_atomic(tiny_inter, genres, tmp_path, "x", "loo")


@pytest.mark.parametrize("name", ["../../escaped", "a/b", "..", ".", "", "a\\b"])
def test_a_dataset_name_that_is_not_one_folder_name_is_refused(tmp_path, tiny_inter, tiny_item, name):
    """`--name ../../escaped` used to write <data-dir>/../../escaped/loo, outside the data dir."""
    from typer.testing import CliRunner

    from cli import app

    data_dir = tmp_path / "a" / "b" / "data"
    args = ["data", "prepare", "atomic", "--inter", str(tiny_inter), "--item", str(tiny_item), "--name", name,
            "--data-dir", str(data_dir)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert f"dataset name (--name) {name!r} must be one folder name under the data dir" in " ".join(
        result.output.split()
    )
    assert sorted(p.name for p in tmp_path.rglob("*")) == []  # nothing written anywhere
    with pytest.raises(DataError, match="must be one folder name"):
        prepare_amazon(tmp_path / "r.jsonl", tmp_path / "m.jsonl", data_dir, name=name or "..")


def test_interacted_items_missing_from_the_item_file_are_a_warning(tmp_path, tiny_inter, caplog):
    """They used to be titled "Item <id>" without a word."""
    item = tmp_path / "some.item"
    item.write_text("item_id:token\tmovie_title:token_seq\ni1\tToy Story\ni2\tGoldenEye\n")
    with caplog.at_level("WARNING", logger="model.data.build"):
        ds = load_prepared(prepare_atomic(tiny_inter, item, tmp_path, "x", "loo"))
    assert ds.item_titles()["i3"] == "Item i3"
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1, warned
    assert warned[0].startswith("8 of 10 interacted items are missing from ")
    assert "some.item" in warned[0] and "'i10', 'i3', 'i4', 'i5', 'i6', ..." in warned[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="model.data.build"):  # no .item file: nothing to warn of
        prepare_atomic(tiny_inter, None, tmp_path, "y", "loo")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def _ml100k_folder(tmp_path, tiny_inter, tiny_item):
    folder = tmp_path / "src"
    folder.mkdir()
    shutil.copy(tiny_inter, folder / RAW_FILES[0])
    shutil.copy(tiny_item, folder / RAW_FILES[1])
    return folder


def test_ml100k_from_folder_and_wheel(tmp_path, tiny_inter, tiny_item, monkeypatch):
    monkeypatch.delenv("R2EC_ML100K_SOURCE", raising=False)
    folder = _ml100k_folder(tmp_path, tiny_inter, tiny_item)
    ds = load_prepared(prepare_ml100k(tmp_path / "d1", "loo", source=folder))
    assert (ds.name, ds.category, len(ds.split("test"))) == ("ml-100k", "movie", 2)

    wheel = tmp_path / "recbole-1.2.1-py3-none-any.whl"  # a stand-in wheel: only a zip
    with zipfile.ZipFile(wheel, "w") as zf:
        for f in RAW_FILES:
            zf.write(folder / f, f"{WHEEL_MEMBER_DIR}/{f}")
    monkeypatch.setenv("R2EC_ML100K_SOURCE", str(wheel))
    data_dir = tmp_path / "d2"
    prepare_ml100k(data_dir, "temporal")
    assert all((data_dir / "raw" / "ml-100k" / f).is_file() for f in RAW_FILES)
    # a cached wheel in wheel_cache is used without pip, and raw files are reused after
    monkeypatch.delenv("R2EC_ML100K_SOURCE")
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(wheel, cache / wheel.name)
    path = prepare_ml100k(tmp_path / "d3", "loo", wheel_cache=cache)
    assert len(load_prepared(path).split("train")) == 4
    (cache / wheel.name).unlink()
    prepare_ml100k(tmp_path / "d3", "temporal", wheel_cache=cache)  # raw cache, no pip


def test_ml100k_bad_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("R2EC_ML100K_SOURCE", raising=False)
    with pytest.raises(DataError, match="missing.whl"):
        prepare_ml100k(tmp_path, "loo", source=tmp_path / "missing.whl")
    junk = tmp_path / "junk.whl"
    junk.write_text("not a zip")
    with pytest.raises(DataError, match="junk.whl"):
        prepare_ml100k(tmp_path, "loo", source=junk)
    with pytest.raises(DataError, match="lacks"):
        prepare_ml100k(tmp_path, "loo", source=tmp_path)


@pytest.mark.skipif(
    os.environ.get("R2EC_TEST_ML100K") != "1", reason="set R2EC_TEST_ML100K=1 (downloads a wheel)"
)
@pytest.mark.parametrize("protocol", ["loo", "temporal"])
def test_real_ml100k(tmp_path_factory, protocol):
    data_dir = tmp_path_factory.getbasetemp() / "ml100k"
    ds = load_prepared(prepare_ml100k(data_dir, protocol))
    stats = ds.meta["stats"]
    assert (stats["num_users"], stats["num_items"], stats["num_interactions"]) == (
        943, 1682, 100_000,
    )  # fmt: skip
    assert sum(len(df) for df in ds.splits.values()) == 100_000 - 943
    if protocol == "loo":
        assert len(ds.split("test")) == len(ds.split("valid")) == 943
    assert_no_leakage(ds, 20)
