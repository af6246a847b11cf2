"""The model from Python, without HTTP: `load` a checkpoint as `r2ec serve` does, then ask the
`Recommender` it returns (service/recommender.py: `recommend`, `score`, `similar_items`,
`recommend_batch`); README, "Use the model from Python".

    import service
    rec = service.load("checkpoints/current")
    result = rec.recommend([("50", 5), ("172", 5), ("181", 4)], k=10)

What `r2ec recommend` runs over a prepared dataset's users lives here too (`dataset_users`,
`run_batch`): each user's history and everything they had in the data, recommended in chunks
written to parquet as they finish, so a killed run resumes where it stopped.

bf16 answers depend slightly on what else is decoded beside them and before them (the batch's
rows, the texts speculative decoding drafts from): scores move in their last bits, and a near
tie between two items, or rarely two tokens of a greedy text, can flip. `load(...,
deterministic=True)` (`DETERMINISTIC`) gives answers that do not depend on earlier queries, and
on the batch only in float32's rounding: the same items and texts, scores that agree to about
1e-6 of their value (an order could change only between two items that close).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from model.data.dataset import SPLITS, PreparedDataset, atomic_write, exclusive, remove_path
from model.evaluate import MASKS, Mask, run_differences, seen_items
from service.config import Settings
from service.continuous import Running
from service.recommender import Recommender
from service.store import Event
from service.types import Query, QueryError, Result

log = logging.getLogger(__name__)

# What makes an answer independent of earlier traffic and, but for float32's last bits, of its
# batch-mates: float32 (bf16 rounds a row's sums differently with the batch's shape, enough to
# swap near ties and flip a greedy token), no speculative drafting (its drafts come from earlier
# texts, and a checked draft rounds unlike a plain step) and exact decoding (every prompt
# prefilled whole, no shared prefix copied in). Slower than bf16: BENCHMARKS.md §3.
DETERMINISTIC: dict[str, Any] = {"dtype": "float32", "speculative_tokens": 0, "exact_decode": True}


def serve_load_kwargs(settings: Settings | None = None) -> dict[str, Any]:
    """`Recommender.load`'s arguments as `r2ec serve` passes them: from `settings`, else from
    the Settings defaults alone (R2EC_* variables in the environment are not read: pass
    `Settings()` for those, as the server reads them)."""
    return (Settings.model_construct() if settings is None else settings).load_kwargs()


def load(
    path: Path | str = "checkpoints/current",
    *,
    deterministic: bool = False,
    settings: Settings | None = None,
    **overrides: Any,
) -> Recommender:
    """A checkpoint and its catalog, loaded as `r2ec serve` loads them (`serve_load_kwargs`:
    bf16, 16 decode slots, speculative drafting, 2 warm-up queries, ...), so `recommend`
    answers as POST /recommend does for the same history. `path`: a checkpoint directory or
    a versions root whose CURRENT names one.

    `deterministic`: `DETERMINISTIC`'s settings on top (float32, no drafting, exact decoding),
    for answers that do not depend on earlier queries, nor on batch-mates beyond float32's
    rounding (module docstring). `overrides`: any other
    `Recommender.load` argument, e.g. `threads=2`, `warmup_requests=0`; they win over both.
    The load logs a WARNING where torch was imported before the project (README,
    "Use the model from Python")."""
    kwargs = serve_load_kwargs(settings)
    if deterministic:
        clash = {k: v for k, v in overrides.items() if k in DETERMINISTIC and v != DETERMINISTIC[k]}
        if clash:
            raise ValueError(f"deterministic=True sets {DETERMINISTIC}; it cannot take {clash}")
        kwargs |= DETERMINISTIC
    return Recommender.load(path, **(kwargs | overrides))


# ---------------------------------------------------------------------------- batch jobs
@dataclass(frozen=True)
class UserHistory:
    """One user of a batch job: their history (oldest first), the items excluded beyond it
    (everything else they had in the data), and, for a split's samples, the held-out item
    that history leads to."""

    user_id: str
    history: tuple[Event, ...]
    seen: frozenset[str] = frozenset()
    target: str | None = None


def dataset_users(dataset: PreparedDataset, split: str | None = None) -> list[UserHistory]:
    """Every user of a prepared dataset, in the order the splits (train, valid, test) first
    list them.

    `split` None, what a nightly job wants: each user's latest history (their latest
    sample's history and its target, the dataset's `max_history` latest items), and as `seen`
    every item they had in train, valid and test (and prior.parquet): what `r2ec eval`'s
    `seen` mask removes (model/evaluate.py `seen_items`). A split's name: each user's last
    sample in it, as of before its target (`target`): the sample's history, and as `seen`
    what the user had before that target, as `r2ec eval --mask seen` ranks it."""
    if split is None:
        window = int(dataset.meta.get("max_history", 20))
        everything = seen_items(dataset, SPLITS[-1]).by_user
        latest: dict[str, tuple[tuple[int, int, int], Any]] = {}  # user -> (when, row)
        for s, name in enumerate(SPLITS):
            for r, row in enumerate(dataset.split(name).itertuples(index=False)):
                user, when = str(row.user_id), (int(row.target_timestamp), s, r)
                if user not in latest or when >= latest[user][0]:
                    latest[user] = (when, row)
        out = []
        for user, (_, row) in latest.items():  # first listed first
            target = Event(str(row.target_item_id), _rating(row.target_rating), int(row.target_timestamp))
            history = (*_events(row), target)[-window:]
            out.append(UserHistory(user, history, frozenset(everything.get(user, ()))))
        return out
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    rows = dataset.split(split)
    before = seen_items(dataset, split)  # per sample
    last = {str(u): r for r, u in enumerate(rows["user_id"])}  # a split lists a user's samples in time order
    return [
        UserHistory(str(row.user_id), _events(row), frozenset(before[r]), str(row.target_item_id))
        for r, row in enumerate(rows.itertuples(index=False))
        if last[str(row.user_id)] == r
    ]


def _events(row: Any) -> tuple[Event, ...]:
    return tuple(
        Event(str(i), _rating(r), int(t))
        for i, r, t in zip(row.history_item_ids, row.history_ratings, row.history_timestamps, strict=True)
    )


def _rating(value: Any) -> float | None:
    """A prepared split's rating: NaN (unknown) as None."""
    return None if value is None or math.isnan(value) else float(value)


def select_users(
    users: Sequence[UserHistory], wanted: Sequence[str] | None = None, limit: int | None = None
) -> list[UserHistory]:
    """The `wanted` users in the order given (ValueError naming those `users` lacks), else all;
    then the first `limit` of them."""
    chosen = list(users)
    if wanted is not None:
        by_id = {u.user_id: u for u in users}
        wanted = list(dict.fromkeys(wanted))
        missing = [w for w in wanted if w not in by_id]
        if missing:
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise ValueError(f"no such user in the data: {', '.join(map(repr, missing[:10]))}{more}")
        chosen = [by_id[w] for w in wanted]
    return chosen if limit is None else chosen[:limit]


def user_query(
    user: UserHistory, *, k: int, reasoning: bool, max_reasoning_tokens: int, mask: Mask = "seen"
) -> Query:
    """A batch user's query. `mask`, as `r2ec eval` names them: `seen` excludes the history
    and everything else the user had (`user.seen`), `prompt` the history alone, `none`
    nothing. Items of a history the catalog no longer holds are dropped, as a stored
    history's are (`stored_user`), not refused."""
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {', '.join(MASKS)}, got {mask!r}")
    return Query(
        history=user.history,
        k=k,
        reasoning=reasoning,
        max_reasoning_tokens=max_reasoning_tokens,
        exclude_history=mask != "none",
        seen_items=user.seen if mask == "seen" else frozenset(),
        stored_user=user.user_id,
    )


def answers(rec: Recommender, queries: Sequence[Query]) -> Iterator[tuple[int, Result | QueryError]]:
    """(position, answer) for each query as it is answered: through continuous batching (the
    served default: up to `slots` decode side by side, the next joining as one ends) where
    the backend is the engine, else one `recommend_batch`. The same answers as
    `recommend_batch`, one at a time, so a caller can show progress."""
    if not rec.continuous:
        yield from enumerate(rec.recommend_batch(queries))
        return
    runner = rec.runner()
    running: dict[Any, int] = {}
    try:
        for i, q in enumerate(queries):
            got = runner.add(q)
            if isinstance(got, Running):
                running[got.handle] = i
            else:
                yield i, got
        while not runner.idle:
            for seq, result in runner.step():
                yield running.pop(seq), result
    finally:  # stopped early (an interrupt, a caller that stops reading): free the decode slots
        for handle in running:
            runner.cancel(handle)


# the columns of a batch's output; `target_item_id` too for a split's samples
COLUMNS = pa.schema(
    [
        ("user_id", pa.string()),
        ("rank", pa.int64()),
        ("item_id", pa.string()),
        ("score", pa.float64()),
        ("title", pa.string()),
        ("reasoning", pa.string()),
        ("model_version", pa.string()),
    ]
)
TARGET = pa.field("target_item_id", pa.string())
ATTRS_KEY = b"PANDAS_ATTRS"  # where pandas keeps a frame's attrs (r2ec eval --ranks-out's `run` too)
# what in a `run` block says how a batch ran, not what it answers: a resume may change these
HOW_KEYS = (
    "users",
    "batch_size",
    "chunk_size",
    "code",
    "checkpoint.path",
    "settings.threads",
    "resumed",
)


def read_run(path: Path) -> dict[str, Any] | None:
    """The `run` block in a batch output's metadata (`pd.read_parquet(path).attrs["run"]`);
    None where it has none."""
    meta = pq.read_schema(path).metadata or {}
    try:
        return json.loads(meta[ATTRS_KEY])["run"]
    except (KeyError, ValueError, TypeError):
        return None


def _is_how(key: str) -> bool:
    return any(key == h or key.startswith(f"{h}.") for h in HOW_KEYS)


@dataclass
class BatchSummary:
    users: int = 0  # answered by this run
    kept: int = 0  # answered by the earlier run a resume went on from
    rows: int = 0  # in the output
    failed: dict[str, str] = field(default_factory=dict)  # user -> why
    seconds: float = 0.0


class BatchOutput:
    """A batch's parquet file, written a chunk at a time: each chunk is a part file under
    `OUT.parts/` (a temp file renamed into place), and `finish` joins them into OUT, one row
    group a chunk (again a temp file renamed), then removes the parts. A killed run loses at
    most the chunk it was in. With `resume`, the users already in OUT or a part are not asked
    again, where that run answered the same question (its `run` block equal but for
    HOW_KEYS, model/evaluate.py `run_differences`); without it, an interrupted run's parts are
    dropped. One writer at a time (a lock in OUT.parts/)."""

    def __init__(self, out: Path, run: Mapping[str, Any], *, with_target: bool) -> None:
        self.out = Path(out)
        self.parts = self.out.with_name(self.out.name + ".parts")
        self.run = json.loads(json.dumps(run, default=str))  # as it reads back
        self.with_target = with_target
        self.kept: set[str] = set()  # users answered before (resume)
        self.earlier: list[
            dict[str, Any]
        ] = []  # how the runs a resume went on from ran, where unlike this one

    def schema(self, run: Mapping[str, Any]) -> pa.Schema:
        schema = COLUMNS.append(TARGET) if self.with_target else COLUMNS
        return schema.with_metadata({ATTRS_KEY: json.dumps({"run": run})})

    def _part_files(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.parquet"))

    def start(self, resume: bool) -> None:
        if not resume:
            parts = self._part_files()
            for p in parts:
                p.unlink()
            if parts:
                log.warning(
                    "dropped %d chunks an interrupted run left in %s (--resume keeps them)",
                    len(parts),
                    self.parts,
                )
            return
        for path in ([self.out] if self.out.is_file() else []) + self._part_files():
            try:
                theirs = read_run(path)
                users = set(pq.read_table(path, columns=["user_id"])["user_id"].to_pylist())
            except Exception as exc:  # OSError, or any of pyarrow's errors for a file that is not parquet
                raise ValueError(f"--resume: {path} is unreadable ({exc})") from exc
            if theirs is None:
                raise ValueError(
                    f"--resume: {path} was not written by r2ec recommend (no run in its metadata)"
                )
            differs = run_differences(self.run, theirs) or {}
            if any(not _is_how(key) for key in differs):
                said = "; ".join(
                    f"{k} {a!r} here, {b!r} there" for k, (a, b) in differs.items() if not _is_how(k)
                )
                raise ValueError(
                    f"--resume: {path} answers another question ({said}); write elsewhere or run as it ran"
                )
            if path != self.out and users and users <= self.kept:  # joined into OUT already
                path.unlink()
                continue
            self.kept |= users
            how = {k: there for k, (_, there) in differs.items() if not k.startswith(("users.", "resumed"))}
            for earlier in [*theirs.get("resumed", []), how]:
                if earlier and earlier not in self.earlier:
                    self.earlier.append(earlier)

    def write(self, rows: dict[str, list]) -> None:
        """One chunk's rows (columns as lists) as the next part."""
        table = pa.Table.from_pydict(rows, schema=self.schema(self.run))
        path = self.parts / f"part-{len(self._part_files()):06d}.parquet"
        atomic_write(path, lambda tmp: pq.write_table(table, tmp))

    def finish(self) -> int:
        """Join OUT (what a resume kept) and the parts into OUT; returns its rows."""
        sources = ([self.out] if self.kept and self.out.is_file() else []) + self._part_files()
        run = self.run | ({"resumed": self.earlier} if self.earlier else {})
        schema, rows = self.schema(run), 0

        def join(tmp: Path) -> None:
            nonlocal rows
            with pq.ParquetWriter(tmp, schema) as writer:
                for source in sources:
                    table = pq.read_table(source).replace_schema_metadata(schema.metadata)
                    rows += table.num_rows
                    if table.num_rows:
                        writer.write_table(table)

        atomic_write(self.out, join)
        remove_path(self.parts)
        return rows


def run_batch(
    rec: Recommender,
    users: Sequence[UserHistory],
    out: Path,
    *,
    run: Mapping[str, Any],
    k: int = 10,
    reasoning: bool = True,
    max_reasoning_tokens: int = 64,
    mask: Mask = "seen",
    chunk_size: int = 256,
    resume: bool = False,
    progress: bool = True,
) -> BatchSummary:
    """Recommend for `users` into the parquet `out` (BatchOutput; columns `COLUMNS`, and
    `target_item_id` where the users are a split's samples), `chunk_size` users a chunk, with
    `run` (how it was made: checkpoint, data, settings, the code's commit) in its metadata.
    A user whose query fails (QueryError) gets no rows; the summary says why. Progress on
    stderr: users done, users/s and the time left."""
    started = time.perf_counter()
    summary = BatchSummary()
    output = BatchOutput(out, run, with_target=any(u.target is not None for u in users))
    with exclusive(output.parts / "lock", f"another r2ec recommend writing {out}"):
        output.start(resume)
        todo = [u for u in users if u.user_id not in output.kept]
        summary.kept = len(users) - len(todo)
        bar = tqdm(total=len(todo), unit="user", desc="recommend", disable=not progress, dynamic_ncols=True)
        with bar:
            for lo in range(0, len(todo), chunk_size):
                chunk = todo[lo : lo + chunk_size]
                queries = [
                    user_query(
                        u, k=k, reasoning=reasoning, max_reasoning_tokens=max_reasoning_tokens, mask=mask
                    )
                    for u in chunk
                ]
                got: dict[int, Result | QueryError] = {}
                for i, answer in answers(rec, queries):
                    got[i] = answer
                    bar.update(1)
                output.write(_rows(chunk, got, output.with_target, summary))
        summary.rows = output.finish()
    summary.seconds = time.perf_counter() - started
    return summary


def _rows(
    chunk: Sequence[UserHistory],
    got: Mapping[int, Result | QueryError],
    with_target: bool,
    summary: BatchSummary,
) -> dict[str, list]:
    cols: dict[str, list] = {name: [] for name in (*COLUMNS.names, *([TARGET.name] if with_target else []))}
    for i, user in enumerate(chunk):
        answer = got[i]
        if isinstance(answer, Exception):
            summary.failed[user.user_id] = str(answer)
            continue
        summary.users += 1
        for item in answer.items:
            cols["user_id"].append(user.user_id)
            cols["rank"].append(item.rank)
            cols["item_id"].append(item.item_id)
            cols["score"].append(item.score)
            cols["title"].append(item.title)
            cols["reasoning"].append(answer.reasoning)
            cols["model_version"].append(answer.model_version)
            if with_target:
                cols[TARGET.name].append(user.target)
    return cols
