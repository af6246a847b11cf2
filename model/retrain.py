"""Scheduled retraining (docs/architecture.md §5): events -> samples -> warm-started RecPO -> gated publish.

One run:
1. read the events after the saved cursor and add them to the consumed-events log (a reader
   that checks its stream also says how many the stream's cap trimmed before they were read:
   a WARNING and `events_lost`, `consume_events`); then read the
   erasure ledger and drop from the log every event of an erased user that arrived at or before
   their erasure (`purge_erased`; events the same id posted later stay);
2. rebuild the samples: the seed dataset's interactions (recovered from its samples) plus every
   consumed event that does not repeat one of them exactly (`seed_repeats`: a backfill of the
   seed's own history adds nothing, and is no reason to train), split with the seed's protocol
   by the same builder `r2ec data prepare` uses;
   an erased user's seed interactions are left out whole (the seed is the operator's, not
   rewritten: every run leaves them out). A run that skips training still rebuilds the samples
   once erasures changed the log or the seed's share, so no erased data stays in the rebuilt
   dataset on disk;
3. train from the CURRENT checkpoint (model/train.py `train(cfg, dataset, base=checkpoint)`);
4. rank the same valid samples with the candidate and the current checkpoint; where the stage
   trains reasoning, that evaluation writes each sample's reasoning first (greedy, under the
   claims' grammars, as the service decodes), and its texts' quality comes with the ranks;
5. publish the candidate as ROOT/<version> (with the current version's item edits,
   model/checkpoint.py `carry_item_edits`) and flip ROOT/CURRENT only if its NDCG@10, paired
   per sample with the current one's, passes `gate` (not worse by more than tolerance + gate_z
   standard errors; a negative tolerance demands a gain beyond them), only if its reasoning
   texts are not worse than the current one's beyond the bounds of `TextGate` (loops, unknown
   titles, claims that hold, cut at the budget, empty texts, distinct-2: `check_texts`; a
   stage that trains no reasoning is gated on NDCG@10 alone), and only if CURRENT still
   names the version the run started from (a compare and swap: an operator's rollback meanwhile
   stands, the run ends "superseded"); keep the `keep` newest versions, always the current
   and the one the run started from.

Versions root::

    ROOT/CURRENT                  the served version's directory name (replaced atomically)
    ROOT/<version>/               published checkpoints (model/checkpoint.py layout + retrain.json)
    ROOT/retrain/state.json       the event reader's cursor, counts, the last run's summary
                                  (`format_version`: STATE_FORMAT)
    ROOT/retrain/events.parquet   every consumed event (event id, user, item, rating, timestamp)
    ROOT/retrain/data/<name>/<protocol>/   the rebuilt prepared dataset training reads
    ROOT/retrain/run/             the training run's scratch directory (removed after)
    ROOT/retrain/last-run/        the last run's training log.jsonl and curves.png, whatever its
                                  outcome (a published version carries its own as well)

Versions and CURRENT are model/checkpoint.py's (one registry for the service and this job).
Reading the events is the caller's job (`read_events`, e.g. service/store.py's `read_stream`):
its cursor is an opaque string this module stores and hands back, never parses, so the
stream's key and id formats stay in service/store.py and model/ imports nothing from service/.
The erasure ledger comes the same way (`read_erasures`, e.g. service/store.py's
`read_erasures`): which users were erased, and whether an erasure came after an event, by the
event's id, which only the reader can tell. Erasing a user does not take back what published
versions learnt from them: each run trains from CURRENT (docs/operations.md, "Erasing a user").
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from model.checkpoint import (
    CurrentMoved,
    current_version,
    is_published,
    load_checkpoint,
    prune_versions,
    publish_version,
    read_meta,
    unused_version,
)
from model.data import SPLITS, PreparedDataset, load_prepared
from model.data.build import build_prepared
from model.data.dataset import (
    META_FILE,
    atomic_temps,
    atomic_temps_under,
    atomic_write,
    new_dir_beside,
    recover_dir,
    remove_path,
    swap_into_place,
)
from model.evaluate import eval_rows, evaluate_model, paired_difference, validation_eval_config
from model.recpo import RecPOConfig

log = logging.getLogger(__name__)

WORK_DIR = "retrain"
DATA_DIR = "data"  # in WORK_DIR: the rebuilt prepared dataset
LAST_RUN_DIR = "last-run"  # in WORK_DIR: the last run's log.jsonl and curves.png
STATE_FILE = "state.json"
# state.json's format_version: 1 since r2ec 0.2.0 (a state without one is older and reads the same).
# Raised by a change this code could not read right; a state of a newer format is refused.
STATE_FORMAT = 1
EVENTS_FILE = "events.parquet"
RECORD_FILE = "retrain.json"  # written into each published version
METRIC = "ndcg@10"
MAX_EVENT_TIMESTAMP_S = 4_102_444_800  # 2100-01-01, the service's bound (service/schemas.py)
EVENT_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("rating", pa.float64()),
        ("timestamp", pa.int64()),
        # the client's idempotency key (service/store.py's event_id), "" where none is known: a
        # retry Redis took again (its dedup window passed, or Redis lost it) is the same event
        ("key", pa.string()),
    ]
)


class RetrainError(ValueError):
    """Retraining cannot start: no versions root, or another run holds its lock."""


class Interaction(Protocol):
    """One event as retraining consumes it (service/store.py's StreamEntry is one)."""

    @property
    def id(self) -> str: ...  # unique per event: a re-read event is not counted twice

    @property
    def user_id(self) -> str: ...

    @property
    def item_id(self) -> str: ...

    @property
    def rating(self) -> float | None: ...

    @property
    def timestamp(self) -> int: ...  # seconds

    # optional: the client's idempotency key ("" or absent where none): equal keys of one user
    # are one event (`consume_events`)


class StreamRead(Protocol):
    """What a reader that checks its stream returns (service/store.py's StreamRead is one):
    the events and the cursor, and how many events the stream dropped after the cursor before
    they could be read (its cap trims the oldest, read or not)."""

    @property
    def events(self) -> Sequence[Interaction]: ...

    @property
    def cursor(self) -> str | None: ...

    @property
    def lost(self) -> int: ...  # exact where lost_exact, else a lower bound

    @property
    def lost_exact(self) -> bool: ...

    @property
    def mark(self) -> dict[str, Any] | None: ...  # the reader's counts: stored, passed back, not read


# read_events(cursor) -> (every event after cursor, oldest first; the cursor to pass next time).
# cursor None = from the start. The cursor belongs to the reader: stored, passed back, not read.
# A reader may return a `StreamRead` instead; the `mark` it returned last is then passed back
# too, read_events(cursor, mark) (state.json's `stream_mark`; none yet: read_events(cursor)).
ReadEvents = Callable[..., tuple[Sequence[Interaction], str | None] | StreamRead]


class Erasures(Protocol):
    """The erasure ledger as retraining reads it (service/store.py's ErasureLedger is one)."""

    @property
    def users(self) -> Collection[str]: ...  # every user erased

    def covers(self, user_id: str, event_id: str) -> bool:
        """Whether the user's latest erasure came at or after their event `event_id` (an
        `Interaction.id` of the same reader's)."""
        ...


# read_erasures() -> the ledger as it is now. Read after the events, so an erasure that lands
# between the two reads still covers the events read.
ReadErasures = Callable[[], Erasures]


# The reasoning measures the publish gate compares (model/text_quality.py `TextQuality`), each
# with the `TextGate` setting that bounds how much worse the candidate's may be than the current
# version's, and the direction that is worse (+1: a rise, -1: a drop).
TEXT_MEASURES: dict[str, tuple[str, int]] = {
    "loop_share": ("max_loop_rise", +1),
    "unknown_title_share": ("max_unknown_title_rise", +1),
    "claims_hold_share": ("max_claims_hold_drop", -1),
    "cut_share": ("max_cut_rise", +1),
    "empty_share": ("max_empty_rise", +1),
    "distinct_2": ("max_distinct_2_drop", -1),
}
# what a run's summary keeps of each version's text quality: the measures, and what they count
# over (never the texts themselves: they are made of users' histories, and state.json holds none)
TEXT_SUMMARY = ("texts", *TEXT_MEASURES, "claims", "mean_words")


@dataclass(frozen=True)
class TextGate:
    """The publish gate's check of the reasoning texts (`check_texts`), for a stage that trains
    reasoning (recpo, rationale): both versions' texts on the same valid samples, each bound
    the most the candidate may be worse than the current version by, in shares of 0 to 1
    (0.02 = 2 points; 1 lets that measure through whatever it is, 0 lets nothing worse through):

    max_loop_rise: texts with a repeated word 4-gram (a degenerate decode);
    max_unknown_title_rise: texts naming a title the catalog does not have (0: one more such
      text than the current version's rejects, any where it has none);
    max_claims_hold_drop: of the claims the texts make about the history (liked genres,
      decades, highest-rated titles, the drift), the share that holds; a current version that
      makes none counts as 1 (it said nothing false);
    max_cut_rise: texts stopped by the token budget, not by the model;
    max_empty_rise: texts with no word;
    max_distinct_2_drop: distinct word bigrams over all the texts (one text for every user);
    enabled: False checks nothing: the gate reads NDCG@10 alone.
    """

    enabled: bool = True
    max_loop_rise: float = 0.02
    max_unknown_title_rise: float = 0.0
    max_claims_hold_drop: float = 0.02
    max_cut_rise: float = 0.02
    max_empty_rise: float = 0.02
    max_distinct_2_drop: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"text gate enabled must be true or false, got {self.enabled!r}")
        for setting, _ in TEXT_MEASURES.values():
            value = getattr(self, setting)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and 0 <= value <= 1):
                flag = "--" + setting.replace("_", "-")
                raise ValueError(
                    f"text gate bound {setting} ({flag}) must be a number from 0 to 1 (a share: 0.02 "
                    f"is 2 points, 1 lets the measure through), got {value!r}"
                )

    def bounds(self) -> dict[str, float]:
        return {setting: float(getattr(self, setting)) for setting, _ in TEXT_MEASURES.values()}


@dataclass
class RetrainConfig:
    """root: versions root (holds CURRENT); data: the seed prepared dataset;
    tolerance: publish when candidate NDCG@10 >= current - tolerance (negative demands a gain);
    gate_z: standard errors of their paired difference given to the side the gate does not ask
      to prove: with tolerance >= 0 a candidate is rejected only beyond them, a demanded gain
      must be shown beyond them (`gate`);
    keep: published versions kept (the current one always is);
    min_events: new stream events needed to train (ignored without a stream; an event that
      repeats a seed interaction exactly is not new, `seed_repeats`);
    text_gate: how much worse the candidate's reasoning texts may be (`TextGate`)."""

    root: Path
    data: Path
    train: RecPOConfig = field(default_factory=RecPOConfig)
    tolerance: float = 0.0
    gate_z: float = 0.0
    keep: int = 3
    min_events: int = 1
    text_gate: TextGate = field(default_factory=TextGate)

    def __post_init__(self) -> None:
        self.root, self.data = Path(self.root), Path(self.data)
        if not isinstance(self.text_gate, TextGate):
            raise ValueError(f"text_gate must be a TextGate, got {type(self.text_gate).__name__}")
        if self.keep < 1:
            raise ValueError(f"keep must be >= 1 (the current version is always kept), got {self.keep}")
        if self.min_events < 0:
            raise ValueError(f"min_events must be >= 0, got {self.min_events}")
        if not math.isfinite(self.tolerance):
            raise ValueError(f"tolerance must be finite, got {self.tolerance}")
        if not (math.isfinite(self.gate_z) and self.gate_z >= 0):
            raise ValueError(f"gate_z must be a finite number >= 0, got {self.gate_z}")


@dataclass
class RetrainResult:
    """What one run did. status: published | rejected (by the gate) | skipped (too few new
    events) | superseded (CURRENT moved during the run, e.g. a rollback: not published); the
    same values label service/metrics.py's r2ec_retrain_last_run_timestamp_seconds."""

    status: str
    reason: str
    current_version: str
    published_version: str | None = None
    candidate_version: str | None = None
    current_metric: float | None = None
    candidate_metric: float | None = None
    metric: str = METRIC
    tolerance: float = 0.0
    gate_z: float = 0.0
    paired_diff: float | None = None  # candidate - current NDCG@10, per sample on the same valid samples
    paired_stderr: float | None = None  # its standard error (0 for one sample)
    paired_samples: int = 0  # one per user under loo; several per user under temporal
    # the reasoning texts' check (`check_texts`), where the run reached the gate: {"checked":
    # false, "why": ...} where it checks nothing; else both versions' measures on the same valid
    # samples, the bounds, and "failed": one entry per measure beyond its bound
    text_gate: dict[str, Any] | None = None
    stream: bool = True
    new_events: int = 0
    events_total: int = 0
    events_unknown_item: int = 0
    # events the stream dropped after the cursor before this run read them (its cap: trimmed):
    # exact where events_lost_exact, else a lower bound; None: the reader checks nothing
    events_lost: int = 0
    events_lost_exact: bool | None = None
    # logged events that repeat a seed interaction exactly (`seed_repeats`): not added to the
    # samples, and not counted as new work for min_events
    events_in_seed: int = 0
    last_event_id: str | None = None  # the reader's cursor after this run (None: nothing read yet)
    erased_users: int = 0  # users in the erasure ledger this run read (0: no ledger)
    purged_events: int = 0  # erased users' events this run dropped from the events log
    purged_users: int = 0  # the users those events were of
    erased_seed_users: int = 0  # erased users whose seed interactions the rebuilt samples left out
    samples: dict[str, int] = field(default_factory=dict)
    pruned: list[str] = field(default_factory=list)
    seconds: float = 0.0
    finished_at: str = ""  # ISO 8601 UTC: when the run ended (a published one: when it published)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- samples <-> interactions ------------------------------------------------------------------
def seed_interactions(ds: PreparedDataset) -> tuple[pd.DataFrame, np.ndarray]:
    """Interactions that rebuild `ds`'s samples, and which of them may be targets.

    Every sample's target is one interaction; a user's earliest sample's history holds the
    interactions before it (all of them, or the latest max_history when a time window kept
    the earlier ones from being targets, which no later history can reach past either).
    Rows come user by user in the original order (history first, then targets), so
    `build_samples` breaks timestamp ties the same way. A user with a single interaction
    had no sample and is not recovered.
    """
    # Each split is in position order per user (loo: by user; temporal: by time, and the splits
    # follow each other in time), so a stable sort by (user, time) restores each user's order.
    samples = pd.concat([ds.split(name) for name in SPLITS], ignore_index=True)
    samples = samples.sort_values(["user_id", "target_timestamp"], kind="stable")
    first = samples.drop_duplicates("user_id", keep="first")
    before = pd.DataFrame(
        {
            "user_id": np.repeat(first["user_id"].to_numpy(dtype=object), first["history_item_ids"].map(len)),
            "item_id": [i for h in first["history_item_ids"] for i in h],
            "rating": [r for h in first["history_ratings"] for r in h],
            "timestamp": [t for h in first["history_timestamps"] for t in h],
        }
    )
    targets = pd.DataFrame(
        {
            "user_id": samples["user_id"].to_numpy(dtype=object),
            "item_id": samples["target_item_id"].to_numpy(dtype=object),
            "rating": samples["target_rating"].to_numpy(dtype=np.float64),
            "timestamp": samples["target_timestamp"].to_numpy(dtype=np.int64),
        }
    )
    inter = pd.concat([before, targets], ignore_index=True).astype(
        {"user_id": object, "item_id": object, "rating": np.float64, "timestamp": np.int64}
    )
    target_ok = np.concatenate([np.zeros(len(before), dtype=bool), np.ones(len(targets), dtype=bool)])
    return inter, target_ok


def events_frame(events: Sequence[Interaction]) -> pd.DataFrame:
    """Interactions as EVENT_SCHEMA columns. An event whose time is not seconds in
    0..MAX_EVENT_TIMESTAMP_S is dropped with a warning: the service refuses those now, but a
    stream written before may hold one (2^63 once made every later run die in int64)."""
    sane = [e for e in events if 0 <= int(e.timestamp) <= MAX_EVENT_TIMESTAMP_S]
    if len(sane) < len(events):
        bad = [e for e in events if not 0 <= int(e.timestamp) <= MAX_EVENT_TIMESTAMP_S][:5]
        log.warning(
            "dropped %d events with an impossible timestamp (ids %s)",
            len(events) - len(sane),
            ", ".join(str(e.id) for e in bad),
        )
        events = sane
    return pd.DataFrame(
        {
            "event_id": [str(e.id) for e in events],
            "user_id": [str(e.user_id) for e in events],
            "item_id": [str(e.item_id) for e in events],
            "rating": np.array([np.nan if e.rating is None else e.rating for e in events], dtype=np.float64),
            "timestamp": np.array([int(e.timestamp) for e in events], dtype=np.int64),
            "key": [str(getattr(e, "event_id", "") or "") for e in events],
        }
    )


def seed_users(seed: PreparedDataset) -> set[str]:
    """The users the seed's samples hold (those `seed_interactions` recovers)."""
    return {str(u) for name in SPLITS for u in seed.split(name)["user_id"]}


def _seed_part(
    seed: PreparedDataset, erased: Collection[str] = ()
) -> tuple[pd.DataFrame, np.ndarray, dict[str, list[str]] | None]:
    """`seed_interactions` and the seed's prior items, an `erased` user's left out whole."""
    inter, target_ok = seed_interactions(seed)
    prior = seed.prior
    if erased:
        gone = set(erased)
        keep = ~inter["user_id"].isin(gone).to_numpy()
        inter, target_ok = inter[keep].reset_index(drop=True), target_ok[keep]
        prior = {user: items for user, items in (prior or {}).items() if user not in gone}
    return inter, target_ok, prior


_INTERACTION = ["user_id", "item_id", "rating", "timestamp"]
_UNRATED = -1.0  # an unrated row's rating in `seed_repeats`' keys (RATING_RANGE starts at 0)


def seed_repeats(inter: pd.DataFrame, events: pd.DataFrame) -> np.ndarray:
    """Which `events` rows repeat a row of `inter` (the seed's interactions) exactly: the same
    user, item, rating and time, as `check_interactions` (model/data/build.py) tells a repeated
    row, and as the service's default event id is that tuple. Ratings compare as float64 (5 and
    5.0 are one rating; two unrated rows are one), times as int64 seconds. A re-rating, the same
    user, item and time with another rating, is no repeat: `check_interactions` keeps both rows,
    and so does the rebuild."""
    if not len(events) or not len(inter):
        return np.zeros(len(events), dtype=bool)

    def keys(frame: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "user_id": frame["user_id"].astype(str).to_numpy(dtype=object),
                "item_id": frame["item_id"].astype(str).to_numpy(dtype=object),
                "rating": frame["rating"].astype(np.float64).fillna(_UNRATED).to_numpy(),
                "timestamp": frame["timestamp"].astype(np.int64).to_numpy(),
            }
        )

    # a left merge on the seed's distinct rows keeps the events' rows, in order, one each
    found = keys(events).merge(keys(inter).drop_duplicates(), how="left", on=_INTERACTION, indicator=True)
    return (found["_merge"] == "both").to_numpy()


class Rebuilt(NamedTuple):
    """What `rebuild_dataset` made: the dataset, and the logged events it did not add."""

    dataset: PreparedDataset
    unknown_item: int  # events on an item outside the catalog
    in_seed: int  # events that repeat a seed interaction exactly (`seed_repeats`)


def rebuild_dataset(
    seed: PreparedDataset, events: pd.DataFrame, out_dir: Path, erased: Collection[str] = ()
) -> Rebuilt:
    """Seed interactions + consumed events -> samples, split as the seed was, written to
    out_dir/<name>/<protocol>/ (replacing what an earlier run wrote there). Events on items
    outside the catalog are dropped (the checkpoint's catalog is fixed), and so are events that
    repeat a seed interaction exactly (`seed_repeats`: a backfill of the history the seed was
    prepared from, or a live event the warehouse export also held), which would otherwise make
    every such interaction count twice, and put a sample's target in its own history. The
    seed's interactions and prior items of an `erased` user are left out whole (their events,
    as the log holds them, stay: `purge_erased` kept those, and they are not compared with
    the seed's rows, which are gone)."""
    inter, target_ok, prior = _seed_part(seed, erased)
    known = events["item_id"].isin(set(seed.items["item_id"])).to_numpy()
    repeats = seed_repeats(inter, events)
    new = events.loc[known & ~repeats, _INTERACTION]
    merged = pd.concat([inter, new], ignore_index=True)
    mask = np.concatenate([target_ok, np.ones(len(new), dtype=bool)])
    source = {
        "seed": str(seed.path),
        "seed_source": seed.meta.get("source", {}),
        "events": int(len(new)),
        "events_in_seed": int(repeats.sum()),
        "last_event_id": str(events["event_id"].iloc[-1]) if len(events) else None,
    }
    path = build_prepared(
        merged,
        seed.items,
        data_dir=out_dir,
        name=seed.name,
        protocol=seed.protocol,
        category=seed.category,
        max_history=int(seed.meta.get("max_history", 20)),
        source=source,
        target_mask=mask,
        prior=prior,
        rebuild=True,  # a seed an earlier release prepared: its name and text as they were taken
    )
    return Rebuilt(load_prepared(path), int((~known).sum()), int(repeats.sum()))


# -- the job's own state -----------------------------------------------------------------------
@contextmanager
def _locked(work: Path) -> Iterator[None]:
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise RetrainError(f"another retrain holds {work / 'lock'}") from exc
        yield


_SWAP_LEFTOVER = re.compile(r"\.(.+)\.(?:tmp-[0-9a-f]{12}|old-.+)")  # dataset.py's swap's names


def _remove_dead_temps(work: Path) -> None:
    """Remove the temp files of writes a killed run left here (`atomic_write`'s: the event log,
    the state, the rebuilt dataset's files). Under the run lock, which every process writing
    them holds, so none is being written now: all go at once, not only stale ones."""
    found = atomic_temps(work / EVENTS_FILE) + atomic_temps(work / STATE_FILE)
    data = work / DATA_DIR
    if data.is_dir():
        found += atomic_temps_under(data)  # a rebuild's files, as written before it swapped dirs
    for path in found:
        log.warning("removing %s, left by a run that did not finish", path)
        remove_path(path)
    # a rebuild's temporary directory (model/data/dataset.py `save_prepared`: a whole copy of the
    # samples, maybe of users erased since) or the copy a cut swap moved aside
    for name_dir in (p for p in data.iterdir() if p.is_dir()) if data.is_dir() else ():
        swapped = {m[1] for p in name_dir.iterdir() if (m := _SWAP_LEFTOVER.fullmatch(p.name))}
        for protocol in sorted(swapped):
            recover_dir(name_dir / protocol, META_FILE)


def read_state(work: Path) -> dict[str, Any]:
    path = work / STATE_FILE
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        reason = f"a JSON {type(state).__name__}, not an object"
    except (OSError, ValueError) as exc:  # UnicodeError and JSONDecodeError are ValueErrors
        state, reason = None, f"{type(exc).__name__}: {exc}"
    if not isinstance(state, dict):
        raise RetrainError(
            f"{path} is damaged or unreadable ({reason}); restore it, or move it away: the next run "
            f"reads the stream from its start and skips the events {work / EVENTS_FILE} already holds"
        )
    written = state.get("format_version", 0)
    if not isinstance(written, int) or isinstance(written, bool) or written > STATE_FORMAT:
        raise RetrainError(
            f"{path} is in format {written!r}, which this r2ec does not know (it reads format "
            f"{STATE_FORMAT} at most): a newer r2ec retrain wrote it (or a hand); run that release, or see "
            "docs/operations.md, 'Upgrading', for what rolling the code back takes"
        )
    last = state.get("last_run")
    if isinstance(last, dict) and not last.get("finished_at"):
        # the last run was an r2ec before 0.2.0's (before the upgrade, or after a code rollback),
        # which records no time but wrote this file last: that time is kept as the run's from the
        # next write on (service/metrics.py reads the file's time until then), so a run that fails
        # after it, having written the cursor, does not pass for a finished one
        last["finished_at"] = datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="seconds")
    return state


def _read_events_log(work: Path) -> pd.DataFrame:
    path = work / EVENTS_FILE
    if not path.is_file():
        return EVENT_SCHEMA.empty_table().to_pandas()
    logged = pq.read_table(path).to_pandas()
    if "key" not in logged:  # a log written before the key was kept
        logged["key"] = ""
    return logged


class Consumed(NamedTuple):
    """What `consume_events` did."""

    events: pd.DataFrame  # the log
    new: int  # events it added to the log
    cursor: str | None  # the reader's cursor now
    lost: int = 0  # events the stream dropped after the cursor before they were read (`StreamRead`)
    lost_exact: bool | None = None  # whether `lost` is exact (else a lower bound); None: not checked


def consume_events(work: Path, read_events: ReadEvents) -> Consumed:
    """Append the events after the saved cursor to the log, then save the reader's new cursor.

    The log is written before the cursor and deduplicated by event id, so a crash in between
    re-reads those events without counting them twice; and by the client's key per user, so a
    retry the stream took twice is one event. A reader that checks its stream (`StreamRead`)
    also says how many events the stream dropped unread: a WARNING, and state.json's
    `events_lost` adds them up, saved with the cursor and the reader's `stream_mark`.
    """
    state = read_state(work)
    cursor, mark = state.get("last_event_id"), state.get("stream_mark")
    got = read_events(cursor) if mark is None else read_events(cursor, mark)
    if isinstance(got, tuple):
        (fresh, cursor), check = got, None
    else:
        fresh, cursor, check = got.events, got.cursor, got
    lost = int(check.lost) if check is not None else 0
    lost_exact = bool(check.lost_exact) if check is not None else None
    if lost or lost_exact is False:
        _warn_lost(lost, lost_exact)
    logged = _read_events_log(work)
    # how many logged events a finished run has trained on (`retrain` counts from it); a state
    # from before this count took its events as trained
    state.setdefault("trained_events", int(len(logged)))
    new = events_frame(fresh)
    new = new[~new["event_id"].isin(set(logged["event_id"]))]
    # the same event under a new stream id: a client's retry that Redis stored again once its
    # dedup window (R2EC_EVENT_DEDUP_TTL_S) had passed or after it lost its data; one per
    # (user, key), the first logged
    keyed = new["key"] != ""
    known = logged[logged["key"] != ""]
    seen = set(zip(known["user_id"], known["key"], strict=True))
    again = [(u, k) in seen for u, k in zip(new["user_id"], new["key"], strict=True)]
    repeats = keyed & (pd.Series(again, index=new.index) | new.duplicated(["user_id", "key"]))
    if repeats.any():
        log.info("%d events repeat a logged one (same user, event_id): not counted again", int(repeats.sum()))
        new = new[~repeats]
    if len(new):
        logged = pd.concat([logged, new], ignore_index=True) if len(logged) else new.reset_index(drop=True)
        _write_events_log(work, logged)
    state = {**state, "last_event_id": cursor, "events_total": int(len(logged))}
    if check is not None:
        state["stream_mark"] = check.mark
        state["events_lost"] = int(state.get("events_lost", 0)) + lost
    _write_state(work, state)
    log.info("read %d new events (cursor now %s, %d in total)", len(new), cursor, len(logged))
    return Consumed(logged, int(len(new)), cursor, lost, lost_exact)


def _warn_lost(lost: int, exact: bool) -> None:
    count = f"{lost}" if exact else f"at least {lost}" if lost else "an unknown number of"
    log.warning(
        "%s events were dropped from the stream before retraining read them (trimmed by its cap, "
        "R2EC_STREAM_MAXLEN: more events were posted since the last run than it holds): they are "
        "not trained on. Raise R2EC_STREAM_MAXLEN above the events posted between two runs, "
        "backfills included; to train on them, prepare the seed dataset again from the full "
        "export and retrain (docs/operations.md, R2ecRetrainLostEvents)",
        count,
    )


@dataclass
class Purge:
    """What `purge_erased` did: users in the ledger, events dropped from the log, their users."""

    erased_users: int = 0
    events: int = 0
    users: int = 0


def purge_erased(work: Path, erasures: Erasures) -> tuple[pd.DataFrame, Purge]:
    """Drop from the events log every event of an erased user that arrived at or before their
    latest erasure (`erasures.covers`); the user's later events stay. The log is rewritten
    atomically (`atomic_write`), and state.json's `trained_events` (how many logged events a
    finished run trained on: the log's first rows, as it only grows at its end) shrinks by the
    dropped ones among them, so the events not trained on yet still count as pending.

    `purge_epoch` in state.json counts the purges that changed anything, users joining the
    ledger included (their seed interactions leave the samples; state.json keeps how many
    users the ledger had, never their ids); it is raised before the log
    is rewritten, so a crash between leaves the rebuilt dataset marked stale (`retrain`
    rebuilds it), never marked clean. A crash after the rewrite, before `trained_events` is
    lowered, leaves it too high: the next run may wait for more new events, nothing is lost.
    Returns the log and what was dropped."""
    logged = _read_events_log(work)
    erased = set(erasures.users)
    purge = Purge(erased_users=len(erased))
    rows = np.flatnonzero(logged["user_id"].isin(erased).to_numpy()) if erased else np.array([], int)
    drop = np.zeros(len(logged), dtype=bool)
    for i in rows:
        drop[i] = erasures.covers(str(logged["user_id"].iat[i]), str(logged["event_id"].iat[i]))
    purge.events, purge.users = int(drop.sum()), int(logged.loc[drop, "user_id"].nunique())
    state = read_state(work)
    # the ledger only grows (a user erased again keeps one entry): a new user changes its size
    if not purge.events and int(state.get("erased_users", 0)) == len(erased):
        return logged, purge
    state["purge_epoch"] = int(state.get("purge_epoch", 0)) + 1
    _write_state(work, {**state, "erased_users": len(erased)})
    if purge.events:
        kept = logged[~drop].reset_index(drop=True)
        _write_events_log(work, kept)
        trained = int(state.get("trained_events", len(logged)))
        state = read_state(work)
        _write_state(
            work,
            {
                **state,
                "trained_events": trained - int(drop[:trained].sum()),
                "events_total": int(len(kept)),
                "purged_events": int(state.get("purged_events", 0)) + purge.events,
            },
        )
        logged = kept
    return logged, purge


def _write_events_log(work: Path, events: pd.DataFrame) -> None:
    table = pa.Table.from_pandas(events[list(EVENT_SCHEMA.names)], schema=EVENT_SCHEMA, preserve_index=False)
    atomic_write(work / EVENTS_FILE, lambda tmp: pq.write_table(table, tmp))


def _write_state(work: Path, state: dict[str, Any]) -> None:
    state = {"format_version": STATE_FORMAT, **{k: v for k, v in state.items() if k != "format_version"}}
    text = json.dumps(state, indent=2, default=str) + "\n"
    atomic_write(work / STATE_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# -- evaluation and the gate -------------------------------------------------------------------
class Validation(NamedTuple):
    """A version on the valid samples (`validate`)."""

    ranks: np.ndarray  # each sample's target rank, in the harness's order
    users: np.ndarray  # each sample's user
    texts: dict[str, Any] | None  # its reasoning texts' quality (model/text_quality.py); None: no reasoning


def validate(path: Path, ds: PreparedDataset, cfg: RecPOConfig) -> Validation:
    """Each valid sample's target rank under a checkpoint and the sample's user, in the
    harness's order (model/evaluate.py `eval_rows`), under `validation_eval_config(cfg)`, and
    where that writes reasoning (a stage that trains it), the quality of the texts it wrote: one
    decode gives both. Loaded as the service loads it (`load_checkpoint`), so the gate scores
    both versions through the same path, the one that will serve them; the texts are written as
    the service writes them (greedy, the same prompt with its co-watch hints, the claims decoded
    under the grammars of what holds, `constrain_titles`, at the recipe's budget), by the
    reference backend in batches (docs/architecture.md §5.2, step 6)."""
    ckpt = load_checkpoint(path, dtype=cfg.dtype)
    vectors = ckpt.vectors_for(ds.items)
    result = evaluate_model(ckpt.model, ds, vectors, validation_eval_config(cfg), progress=False)
    return Validation(
        np.asarray(result.ranks, dtype=np.int64), np.asarray(result.users, dtype=object), result.text_quality
    )


def gate(
    candidate: np.ndarray, current: np.ndarray, tolerance: float, z: float, users: np.ndarray | None = None
) -> tuple[bool, dict]:
    """Publish or not, from the two versions' ranks on the same valid samples (`users`: each
    sample's user, in the same order).

    d = the mean per-sample NDCG@10 difference (candidate - current), se = its paired standard
    error, clustered by user (model/evaluate.py `paired_difference`; 0 for a single user, so a
    `temporal` split's many samples of one user do not count as independent). z standard errors
    of doubt always go against what has to be shown:
    - tolerance >= 0 (a drop of up to `tolerance` is allowed): publish when
      d + z * se >= -tolerance. z = 0 compares the means; z = 2 rejects only a candidate worse
      by more than the tolerance plus two standard errors, so a run that moved nothing beyond
      the validation noise still ships its fresher data;
    - tolerance < 0 (a gain of -tolerance is demanded): publish when d - z * se >= -tolerance,
      a gain beyond z standard errors, so noise alone cannot meet it.
    """
    paired = paired_difference(candidate, current, METRIC, users)
    se = paired["stderr"] if math.isfinite(paired["stderr"]) else 0.0
    bound = paired["diff"] + (z * se if tolerance >= 0 else -z * se)
    return bound >= -tolerance, {**paired, "stderr": se}


def check_texts(candidate: dict[str, Any], current: dict[str, Any], bounds: TextGate) -> list[dict[str, Any]]:
    """The measures (`TEXT_MEASURES`) on which the candidate's texts are worse than the current
    version's beyond their `bounds`, each {"measure", "candidate", "current", "setting",
    "bound"}; [] passes. `candidate` and `current`: model/text_quality.py `TextQuality` dicts
    over the same samples. A measure either side lacks is not compared (`cut_share` where it is
    not known), but claims: a candidate that makes none is not compared, a current version that
    makes none counts as holding all (1.0). Differences are read to the measures' 4 decimals,
    so a bound is met exactly (0.03 against 0.01 is a rise of 0.02, not 0.0200000001)."""
    failed = []
    for measure, (setting, worse) in TEXT_MEASURES.items():
        mine, theirs = candidate.get(measure), current.get(measure)
        if theirs is None and measure == "claims_hold_share":
            theirs = 1.0
        if mine is None or theirs is None:
            continue
        bound = float(getattr(bounds, setting))
        if round(worse * (float(mine) - float(theirs)), 4) > bound:
            failed.append(
                {"measure": measure, "candidate": mine, "current": theirs, "setting": setting, "bound": bound}
            )
    return failed


def text_gate(
    candidate: dict[str, Any] | None, current: dict[str, Any] | None, bounds: TextGate, cfg: RecPOConfig
) -> dict[str, Any]:
    """`RetrainResult.text_gate`: both versions' text measures (`TEXT_SUMMARY`), the bounds and
    what failed (`check_texts`); or {"checked": false, "why"} where nothing is checked: the text
    gate turned off, or a stage whose evaluation writes no reasoning (the no-reasoning warm-up),
    or an evaluation budget of 0 tokens."""
    evaluation = validation_eval_config(cfg)
    if not bounds.enabled:
        return {"checked": False, "why": "turned off (TextGate.enabled, --no-text-gate)"}
    if not evaluation.reasoning:
        return {"checked": False, "why": f"stage {cfg.stage} is evaluated without reasoning"}
    if evaluation.max_reasoning_tokens == 0:
        return {"checked": False, "why": "the evaluation's reasoning budget (eval_reasoning_tokens) is 0"}
    if candidate is None or current is None:
        return {"checked": False, "why": "no reasoning texts came out of the evaluation"}
    failed = check_texts(candidate, current, bounds)
    return {
        "checked": True,
        "passed": not failed,
        "candidate": {k: candidate.get(k) for k in TEXT_SUMMARY},
        "current": {k: current.get(k) for k in TEXT_SUMMARY},
        "bounds": bounds.bounds(),
        "failed": failed,
    }


def _texts_text(check: dict[str, Any]) -> str:
    """A failed text check in words, e.g. "reasoning worse than current on 200 valid samples:
    loop_share 0.4200 > current 0.0000 + max_loop_rise 0.02; cut_share ..."."""
    parts = []
    for f in check["failed"]:
        worse = TEXT_MEASURES[f["measure"]][1]
        op, sign = (">", "+") if worse > 0 else ("<", "-")
        limit = f"{sign} {f['setting']} {f['bound']:g}"
        parts.append(f"{f['measure']} {f['candidate']:.4f} {op} current {f['current']:.4f} {limit}")
    return f"reasoning worse than current on {check['candidate']['texts']} valid samples: " + "; ".join(parts)


# -- one run -----------------------------------------------------------------------------------
def retrain(
    cfg: RetrainConfig, read_events: ReadEvents | None = None, read_erasures: ReadErasures | None = None
) -> RetrainResult:
    """One retraining run (module docstring). `read_events=None`: no stream, train on the
    seed dataset plus the events consumed so far. `read_erasures=None`: no erasure ledger (the
    events log is kept as it is)."""
    from model.train import train  # heavy; keeps `import model.retrain` cheap for the CLI

    started = time.perf_counter()
    root, work = cfg.root, cfg.root / WORK_DIR
    if not root.is_dir():
        raise RetrainError(f"versions root {root} does not exist")
    seed = load_prepared(cfg.data)
    with _locked(work):
        _remove_dead_temps(work)
        _settle_publish(root, work)  # a run killed while publishing
        current = current_version(root)  # under the lock: a run that just ended may have moved it
        honoured = int(read_state(work).get("erased_users", 0))
        if read_erasures is None and honoured:
            # the seed dataset is never rewritten: only the ledger keeps an erased seed user out
            raise RetrainError(
                f"{root} has honoured the erasures of {honoured} users, and this run reads no "
                "erasure ledger: it would train on their seed data again. Run it with --redis-url "
                "(R2EC_REDIS_URL), the service's Redis, which holds the ledger"
            )
        if read_events is None:
            events, new, cursor = _read_events_log(work), 0, read_state(work).get("last_event_id")
            lost, lost_exact = 0, None
        else:
            events, new, cursor, lost, lost_exact = consume_events(work, read_events)
        erased: set[str] = set()
        purge = Purge()
        if read_erasures is not None:  # after the events: an erasure meanwhile covers them
            erasures = read_erasures()
            erased = set(erasures.users)
            events, purge = purge_erased(work, erasures)
        result = RetrainResult(
            status="skipped",
            reason="",
            current_version=current,
            tolerance=cfg.tolerance,
            gate_z=cfg.gate_z,
            stream=read_events is not None,
            new_events=new,
            events_lost=lost,
            events_lost_exact=lost_exact,
            events_total=int(len(events)),
            last_event_id=cursor,
            erased_users=purge.erased_users,
            purged_events=purge.events,
            purged_users=purge.users,
        )
        in_seed = seed_repeats(_seed_part(seed, erased)[0], events)
        result.events_in_seed = int(in_seed.sum())
        if result.events_in_seed:
            log.info(
                "%d events logged, %d of them already in the seed data (the same user, item, rating "
                "and time): not added again",
                len(events),
                result.events_in_seed,
            )
        if read_events is not None:
            # events since the last run that reached the gate: a run that failed after reading
            # events (a crash, a deadline) leaves them pending for the next, not consumed. An
            # event the seed holds already is no new work: a backfill of the seed's own history
            # does not make a run train
            fresh = ~in_seed[int(read_state(work)["trained_events"]) :]
            pending = int(fresh.sum())
            if pending < cfg.min_events:
                repeated = f" ({int((~fresh).sum())} more already in the seed data)" if (~fresh).any() else ""
                result.reason = (
                    f"{pending} events not trained on yet{repeated}, fewer than min_events={cfg.min_events}"
                )
                state = read_state(work)
                built = work / DATA_DIR / seed.name / seed.protocol  # complete or not (a crash)
                if built.exists() and state.get("data_epoch", 0) != state.get("purge_epoch", 0):
                    # no erased data stays on disk until the next training run
                    _rebuild(seed, events, work, erased, result)
                return _finish(work, result, started)
        ds = _rebuild(seed, events, work, erased, result)
        result.samples = {name: int(len(ds.split(name))) for name in SPLITS}
        if eval_rows(ds, validation_eval_config(cfg.train)).empty:
            raise RetrainError(
                f"the rebuilt dataset {ds.path} has no valid samples to compare the versions on"
            )
        current_ranks, users, current_texts = validate(root / current, ds, cfg.train)
        run = work / "run"
        shutil.rmtree(run, ignore_errors=True)
        try:
            best = train(cfg.train, ds, str(root / current), run, resume=False)
            _copy_training_record(run, best)  # a published version carries its own curves
            result.candidate_version = str(read_meta(best)["version"])
            candidate_ranks, candidate_users, candidate_texts = validate(best, ds, cfg.train)
            if not np.array_equal(candidate_users, users):
                raise RetrainError("the two versions were ranked on different valid samples")
            ok, paired = gate(candidate_ranks, current_ranks, cfg.tolerance, cfg.gate_z, users)
            result.candidate_metric, result.current_metric = paired["a"], paired["b"]
            result.paired_diff, result.paired_stderr = paired["diff"], paired["stderr"]
            result.paired_samples = paired["users"]
            texts = result.text_gate = text_gate(candidate_texts, current_texts, cfg.text_gate, cfg.train)
            if texts["checked"] and not texts["passed"]:
                log.warning("not publishing the candidate, %s", _texts_text(texts))
            if not ok or not texts.get("passed", True):
                reasons = [] if ok else [_gate_text(result, "<")]
                reasons += [] if texts.get("passed", True) else [_texts_text(texts)]
                result.status, result.reason = "rejected", "; ".join(reasons)
                _write_state(work, {**read_state(work), "trained_events": int(len(events))})
            elif _publish(root, work, best, result, started, trained=int(len(events))):
                # the version it started from stays too: it was served until now, the rollback target
                result.pruned = prune_versions(root, cfg.keep, protect=[current])
        finally:
            _keep_last_run(run, work)
            shutil.rmtree(run, ignore_errors=True)
        return _finish(work, result, started)


def _copy_training_record(run: Path, into: Path) -> None:
    """The run's log.jsonl and curves.png (model/train.py) into `into`, those that exist."""
    from model.train import CURVES_FILE, LOG_FILE

    for name in (LOG_FILE, CURVES_FILE):
        if (run / name).is_file():
            shutil.copy2(run / name, into / name)


def _keep_last_run(run: Path, work: Path) -> None:
    """work/last-run: the training record of the run that just ended, rejected or failed ones
    too (the run's directory goes; a Job's stdout is all a scheduler keeps). Swapped in whole;
    a failure to keep it is a warning, not the run's end."""
    from model.train import LOG_FILE

    out = work / LAST_RUN_DIR
    try:
        recover_dir(out, LOG_FILE)  # a swap cut between its renames: the copy aside goes back
        tmp = new_dir_beside(out)
        _copy_training_record(run, tmp)
        swap_into_place(tmp, out)
    except OSError as exc:
        log.warning("the run's training log was not kept in %s: %s", out, exc)


def _rebuild(
    seed: PreparedDataset, events: pd.DataFrame, work: Path, erased: set[str], result: RetrainResult
) -> PreparedDataset:
    """`rebuild_dataset` into work/data, its counts into `result`; state.json's `data_epoch`
    records the `purge_epoch` the rebuilt dataset reflects."""
    epoch = read_state(work).get("purge_epoch", 0)
    ds, result.events_unknown_item, result.events_in_seed = rebuild_dataset(
        seed, events, work / DATA_DIR, erased
    )
    result.erased_seed_users = len(erased & seed_users(seed))
    _write_state(work, {**read_state(work), "data_epoch": epoch})
    return ds


def _publish(root: Path, work: Path, best: Path, result: RetrainResult, started: float, trained: int) -> bool:
    """Publish the candidate, trained on the first `trained` logged events, over the version
    the run started from; False (status "superseded") where CURRENT names another by now."""
    version = unused_version(root, str(result.candidate_version))
    result.status, result.published_version = "published", version
    result.reason = _gate_text(result, ">=")
    if (texts := result.text_gate or {}).get("checked"):
        result.reason += f"; reasoning within the bounds on {texts['candidate']['texts']} valid samples"
    # the run's time so far goes into the version's record, and `_finish` keeps it, so
    # retrain.json and state.json agree (only the pruning, milliseconds, comes after)
    result.seconds, result.finished_at = _elapsed(started), _now()
    (best / RECORD_FILE).write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    # The candidate is final: the state says it is trained on these events and published
    # before CURRENT names it, so a run killed after the flip (pruning, a deadline) does not
    # leave the next one training and publishing the same events again. `publishing` keeps
    # what the state said before, for a run that stops before its flip: put back at once
    # below, or by the next run (`_settle_publish`) where this one was killed.
    before = read_state(work)
    _write_state(
        work,
        {
            **before,
            "trained_events": trained,
            "last_published_at": result.finished_at,
            "publishing": {"version": version, **{key: before.get(key) for key in _PUBLISH_KEYS}},
        },
    )
    try:
        publish_version(root, best, version, expected=result.current_version)
    except CurrentMoved as exc:
        _write_state(work, before)  # no model trained on these events is served: still pending
        # an operator pointed CURRENT elsewhere while this run trained (`r2ec checkpoint
        # rollback`): the candidate was warm-started from, and gated against, a version no
        # longer served, and publishing it would silently undo their choice
        result.status, result.published_version = "superseded", None
        result.reason = (
            f"CURRENT moved from {exc.expected} to {exc.found} during the run (a rollback?); not publishing"
        )
        return False
    except BaseException:
        if best.exists() or not is_published(root, version):  # e.g. no space for CURRENT's new value
            _write_state(work, before)
        raise
    return True


_PUBLISH_KEYS = ("trained_events", "last_published_at")  # what a publish writes before its flip


def _settle_publish(root: Path, work: Path) -> None:
    """The `publishing` record of a run killed while it published (`_publish`): where its
    version never became CURRENT, the state says again what it said before (the events
    pending, the last publish time); where it did, the state is right already."""
    state = read_state(work)
    if "publishing" not in state:
        return
    pending = state.pop("publishing")
    pending = pending if isinstance(pending, dict) else {}
    version = str(pending.get("version") or "")
    if not (version and is_published(root, version)):
        for key in _PUBLISH_KEYS:
            if pending.get(key) is None:
                state.pop(key, None)
            else:
                state[key] = pending[key]
        log.warning("the run that trained %s stopped before publishing it: its events are pending", version)
    _write_state(work, state)


def _gate_text(result: RetrainResult, op: str) -> str:
    """e.g. "ndcg@10 0.0712 >= current 0.0650 - tolerance 0 - 2 s.e. (paired on 200 valid
    samples: +0.0062 ± 0.0031)"; a demanded gain reads "current 0.0650 + gain 0.01 + 2 s.e."."""
    margin = f"- tolerance {result.tolerance:g}" if result.tolerance >= 0 else f"+ gain {-result.tolerance:g}"
    z = f" {margin[0]} {result.gate_z:g} s.e." if result.gate_z else ""
    return (
        f"{METRIC} {result.candidate_metric:.4f} {op} current {result.current_metric:.4f}"
        f" {margin}{z} (paired on {result.paired_samples} valid"
        f" samples: {result.paired_diff:+.4f} ± {result.paired_stderr:.4f})"
    )


def _elapsed(started: float) -> float:
    return round(time.perf_counter() - started, 2)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _finish(work: Path, result: RetrainResult, started: float) -> RetrainResult:
    if result.status != "published":  # a published run's time is in its record already
        result.seconds, result.finished_at = _elapsed(started), _now()
    state = {**read_state(work), "last_run": result.to_dict()}
    state.pop("publishing", None)  # finished: nothing for the next run to settle
    if result.status == "published":  # what the service exports as the last publish's time
        state["last_published_at"] = result.finished_at
    _write_state(work, state)
    if result.erased_users:
        log.info(
            "erasure ledger: %d users; dropped %d events of %d of them from the events log; "
            "left %d of them out of the seed's samples",
            result.erased_users,
            result.purged_events,
            result.purged_users,
            result.erased_seed_users,
        )
    log.info("retrain %s: %s", result.status, result.reason)
    return result
