"""`r2ec recommend` on the tiny dataset: who is asked with which history, what is excluded, the
parquet and its metadata, resuming after a kill, and the service's own answers (journey 39)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cli import app
from model.checkpoint import create_base_checkpoint
from service import offline
from service.offline import BatchOutput, UserHistory, dataset_users, run_batch, select_users
from service.store import Event

COLUMNS = ["user_id", "rank", "item_id", "score", "title", "reasoning", "model_version"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "ckpt"
    create_base_checkpoint(out, "tiny", tiny_dataset.items, dtype="float32", progress=False)
    return out


@pytest.fixture
def recommend(tiny_dataset, tiny_checkpoint, tmp_path):
    """Run `r2ec recommend` (float32, 8 reasoning tokens) into tmp_path: exit code, output, frame."""

    def run(*args: str, out: Path | None = None):
        out = tmp_path / "recs.parquet" if out is None else out
        base = ["recommend", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_dataset.path)]
        base += ["--out", str(out), "--max-reasoning-tokens", "8", "--threads", "1"]
        if "--deterministic" not in args:
            base += ["--dtype", "float32"]
        result = CliRunner().invoke(app, [*base, *args])
        frame = pd.read_parquet(out) if out.is_file() else None
        # --json: stdout alone (the progress bar is on stderr)
        output = result.stdout if "--json" in args and result.exit_code == 0 else result.output
        return result.exit_code, output, frame

    return run


def everything(dataset) -> dict[str, set[str]]:
    """Every item each user has in the tiny dataset's splits, by hand."""
    seen: dict[str, set[str]] = {}
    for name in ("train", "valid", "test"):
        for row in dataset.split(name).itertuples():
            seen.setdefault(row.user_id, set()).update([*row.history_item_ids, row.target_item_id])
    return seen


# -- who is asked, with what ------------------------------------------------------------------------
def test_every_user_with_their_latest_history_and_everything_they_had(tiny_dataset):
    users = {u.user_id: u for u in dataset_users(tiny_dataset)}
    assert list(users) == ["u1", "u2", "u3"]  # u3 is only in train
    assert [e.item_id for e in users["u1"].history] == ["i1", "i2", "i3", "i4", "i5"]  # test target last
    assert users["u1"].history[-1] == Event("i5", None, 500)  # no rating in the data (NaN)
    assert [e.item_id for e in users["u3"].history] == ["i1", "i9"]  # train sample + its target
    assert {u: set(h.seen) for u, h in users.items()} == everything(tiny_dataset)
    assert all(u.target is None for u in users.values())


def test_a_split_asks_as_of_before_each_target(tiny_dataset):
    users = dataset_users(tiny_dataset, "valid")
    assert [(u.user_id, u.target) for u in users] == [("u1", "i4"), ("u2", "i7")]
    assert [e.item_id for e in users[0].history] == ["i1", "i2", "i3"]
    assert users[0].seen == {"i1", "i2", "i3"}  # the train targets too, never the valid target
    with pytest.raises(ValueError, match="split must be one of"):
        dataset_users(tiny_dataset, "dev")


def test_users_chosen_in_the_order_given(tiny_dataset):
    users = dataset_users(tiny_dataset)
    assert [u.user_id for u in select_users(users, ["u3", "u1", "u3"])] == ["u3", "u1"]
    assert [u.user_id for u in select_users(users, None, 2)] == ["u1", "u2"]
    with pytest.raises(ValueError, match="no such user in the data: 'u9'"):
        select_users(users, ["u1", "u9"])


# -- the command ------------------------------------------------------------------------------------
def test_recommend_writes_every_user_without_what_they_had(
    recommend, tiny_dataset, tiny_checkpoint, tmp_path
):
    code, output, frame = recommend("--k", "3")
    assert code == 0, output
    assert list(frame.columns) == COLUMNS
    assert frame.groupby("user_id")["rank"].apply(list).to_dict() == {
        u: [1, 2, 3] for u in ("u1", "u2", "u3")
    }
    seen = everything(tiny_dataset)
    assert not any(row.item_id in seen[row.user_id] for row in frame.itertuples())
    assert frame["reasoning"].notna().all() and frame["title"].str.len().gt(0).all()
    run = frame.attrs["run"]
    assert run["checkpoint"]["version"] == frame["model_version"].iloc[0]
    assert run["checkpoint"]["path"] == str(tiny_checkpoint.resolve())
    assert run["data"] == {"path": str(tiny_dataset.path.resolve()), "name": "tiny", "protocol": "loo"}
    assert run["batch_size"] == 16 and run["k"] == 3 and run["mask"] == "seen" and run["split"] is None
    assert run["settings"]["dtype"] == "float32" and run["settings"]["warmup_requests"] == 2  # serve's
    assert run["deterministic"] is False and set(run["code"]) == {"commit", "dirty"}
    assert "3 users in" in output and "9 rows in" in output
    assert "user/s" in output  # the progress bar
    assert not (tmp_path / "recs.parquet.parts").exists()  # the chunks joined and removed


def test_the_rows_are_what_recommend_answers_each_user(recommend, tiny_dataset, tiny_checkpoint):
    code, output, frame = recommend("--k", "4", "--split", "test", "--batch-size", "2")
    assert code == 0, output
    assert list(frame.columns) == [*COLUMNS, "target_item_id"]
    rec = offline.load(tiny_checkpoint, dtype="float32", threads=1)
    for user in dataset_users(tiny_dataset, "test"):
        mine = frame[frame.user_id == user.user_id]
        assert set(mine["target_item_id"]) == {user.target}
        alone = rec.recommend(user.history, k=4, max_reasoning_tokens=8, seen_items=user.seen)
        assert list(mine["item_id"]) == [i.item_id for i in alone.items]
        assert mine["score"].tolist() == pytest.approx([i.score for i in alone.items], abs=1e-4)
        assert set(mine["reasoning"]) == {alone.reasoning}


def test_masks_and_no_reasoning(recommend, tiny_dataset):
    seen = everything(tiny_dataset)
    code, output, frame = recommend("--k", "11", "--mask", "none", "--no-reasoning", "--users", "u1")
    assert code == 0, output
    assert set(frame["item_id"]) >= seen["u1"] and frame["reasoning"].isna().all()
    assert "max_reasoning_tokens" not in frame.attrs["run"]
    code, output, frame = recommend("--k", "11", "--mask", "prompt", "--no-reasoning", "--users", "u3")
    assert code == 0, output
    assert not {"i1", "i9"} & set(frame["item_id"])  # its history (with its latest item) only
    assert len(frame) == len(tiny_dataset.items) - 2


def test_deterministic_answers_do_not_depend_on_the_batch_size(recommend, tmp_path):
    frames = []
    for size in ("1", "16"):
        code, output, frame = recommend(
            "--deterministic", "--batch-size", size, out=tmp_path / f"{size}.parquet"
        )
        assert code == 0, output
        frames.append(frame)
    settings = frames[0].attrs["run"]["settings"]
    assert frames[0].attrs["run"]["deterministic"] is True
    assert (settings["dtype"], settings["speculative_tokens"], settings["exact_decode"]) == (
        "float32",
        0,
        True,
    )
    # the same items, order and texts; scores agree to float32's rounding of the batch's sums
    a, b = frames
    pd.testing.assert_frame_equal(a.drop(columns="score"), b.drop(columns="score"))
    assert a["score"].tolist() == pytest.approx(b["score"].tolist(), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--mask", "history"], "--mask must be one of seen, prompt, none"),
        (["--users", "u1,nobody"], "no such user in the data: 'nobody'"),
        (["--split", "dev"], "split must be one of"),
        (["--deterministic", "--dtype", "bfloat16"], "--deterministic runs in float32"),
    ],
)
def test_refused_with_one_line(recommend, args, says):
    code, output, _ = recommend(*args)
    assert code == 2 and says in output, output


# -- resume -----------------------------------------------------------------------------------------
def test_a_killed_run_resumes_where_it_stopped(tiny_dataset, tiny_checkpoint, tmp_path, monkeypatch):
    rec = offline.load(tiny_checkpoint, dtype="float32", threads=1, warmup_requests=0)
    users = dataset_users(tiny_dataset)
    out = tmp_path / "recs.parquet"
    run = {"k": 2, "batch_size": 1, "code": {"commit": "a"}}
    asked: list[str] = []
    real = offline.answers

    def killed_after(n: int):
        def answers(rec, queries):
            if len(asked) >= n:
                raise KeyboardInterrupt  # a kill in the middle of a chunk
            asked.extend(q.stored_user for q in queries)
            yield from real(rec, queries)

        return answers

    monkeypatch.setattr(offline, "answers", killed_after(1))
    with pytest.raises(KeyboardInterrupt):
        run_batch(rec, users, out, run=run, k=2, max_reasoning_tokens=4, chunk_size=1, progress=False)
    assert not out.exists() and asked == ["u1"]
    parts = sorted((tmp_path / "recs.parquet.parts").glob("part-*.parquet"))
    assert len(parts) == 1  # the chunk written before the kill; nothing of the one it was in

    monkeypatch.setattr(offline, "answers", real)
    asked.clear()
    spy = []
    monkeypatch.setattr(
        offline, "answers", lambda rec, qs: spy.extend(q.stored_user for q in qs) or real(rec, qs)
    )
    later = {**run, "batch_size": 4, "code": {"commit": "b"}}  # how it runs may change
    summary = run_batch(
        rec, users, out, run=later, k=2, max_reasoning_tokens=4, chunk_size=1, resume=True, progress=False
    )
    assert spy == ["u2", "u3"] and summary.kept == 1 and summary.users == 2
    frame = pd.read_parquet(out)
    assert list(dict.fromkeys(frame["user_id"])) == ["u1", "u2", "u3"] and len(frame) == 6
    assert pq.ParquetFile(out).metadata.num_row_groups == 3  # one a chunk
    assert frame.attrs["run"]["batch_size"] == 4
    assert frame.attrs["run"]["resumed"] == [{"batch_size": 1, "code.commit": "a"}]
    assert not (tmp_path / "recs.parquet.parts").exists()

    spy.clear()  # a finished run resumed: nothing asked again
    run_batch(rec, users, out, run=later, k=2, max_reasoning_tokens=4, resume=True, progress=False)
    assert spy == [] and len(pd.read_parquet(out)) == 6

    with pytest.raises(ValueError, match="answers another question .*k 3 here, 2 there"):
        run_batch(rec, users, out, run={**later, "k": 3}, k=3, resume=True, progress=False)


def test_without_resume_an_interrupted_runs_chunks_are_dropped(tiny_dataset, tiny_checkpoint, tmp_path):
    rec = offline.load(tiny_checkpoint, dtype="float32", threads=1, warmup_requests=0)
    users = dataset_users(tiny_dataset)
    out = tmp_path / "recs.parquet"
    output = BatchOutput(out, {"k": 2}, with_target=False)
    output.parts.mkdir()
    output.write(
        {
            c: ["u1"] if c == "user_id" else [1] if c == "rank" else [0.0] if c == "score" else ["x"]
            for c in COLUMNS
        }
    )
    summary = run_batch(rec, users, out, run={"k": 2}, k=2, reasoning=False, progress=False)
    assert summary.kept == 0 and summary.users == 3
    assert (pd.read_parquet(out)["item_id"] != "x").all()
    with pytest.raises(ValueError, match="not written by r2ec recommend"):
        pd.DataFrame({"user_id": ["u1"]}).to_parquet(out)
        run_batch(rec, users, out, run={"k": 2}, k=2, resume=True, progress=False)


def test_a_user_who_cannot_be_answered_gets_no_rows_and_is_named(tiny_checkpoint, tmp_path):
    rec = offline.load(tiny_checkpoint, dtype="float32", threads=1, warmup_requests=0)
    users = [UserHistory("gone", (Event("no-such-item"),)), UserHistory("ok", (Event("i1", 5.0),))]
    summary = run_batch(rec, users, tmp_path / "r.parquet", run={}, k=2, reasoning=False, progress=False)
    assert summary.users == 1 and list(summary.failed) == ["gone"]
    assert "every item stored for user 'gone' left the catalog" in summary.failed["gone"]
    assert set(pd.read_parquet(tmp_path / "r.parquet")["user_id"]) == {"ok"}


def test_the_command_exits_1_naming_users_that_failed(recommend, monkeypatch):
    from service.types import EmptyHistoryError

    real = offline.answers

    def one_fails(rec, queries):
        for i, answer in real(rec, queries):
            yield i, EmptyHistoryError(queries[i].stored_user) if queries[i].stored_user == "u2" else answer

    monkeypatch.setattr(offline, "answers", one_fails)
    code, output, frame = recommend("--no-reasoning")
    assert code == 1 and "1 users got no recommendations" in output and "u2: history is empty" in output
    assert set(frame["user_id"]) == {"u1", "u3"}


def test_json_summary(recommend):
    code, output, _ = recommend("--json", "--no-reasoning", "--limit", "2", "--k", "3")
    assert code == 0, output
    payload = json.loads(output.strip().splitlines()[-1])
    assert payload["users"] == 2 and payload["rows"] == 6 and payload["failed"] == {}
    assert payload["run"]["users"] == {"given": None, "limit": 2}
