"""The items a model serves: their text, their vectors in the FAISS index, and the edits on top.

A checkpoint carries its catalog (a table of item texts) and the vectors its model made of them.
The admin API edits items while the service runs; an edit re-encodes the item's text with the
served model, changes the index under a lock (a batch may be searching it) and is saved in
<checkpoint>/index/, so a restart serves the edited catalog and a reload carries the edits to
the next model.

What an edit saves is the size of the edit: one line appended to the edit log beside the index
(index/journal.py: the item's record, its time and its vector), flushed to the disk before the
edit returns. The whole index (index/persist.py, every vector and the record of every edit in
index.json) is saved again once the log holds SNAPSHOT_EVERY edits, on a thread of its own:
searches go on meanwhile, and an edit waits only while the faiss file is written to the page
cache, not for its flush or the record (`Catalog._save_snapshot`). `Catalog.open` applies the
logged edits to the saved index with their logged vectors (no encoding), so a restart serves
what was served. A kill at any point loses no edit that returned: the log is cut back to the
entries a full save holds only after that save is on the disk, and an entry already held is
applied again to no effect (for an item, the later edit wins).

Replicas that serve one checkpoint from a shared volume share that record. Each edit carries
the time it was made, and a save merges under the directory's lock (index/persist.py `locked`):
the edits saved there by another replica that are newer than this one's are applied first, so a
save never drops another replica's edit, and for one item the latest edit wins (wall clocks:
keep the replicas' clocks in sync). `Catalog.sync_edits` applies what other replicas saved
since it last looked; the service calls it on each tick of its checkpoint watch
(service/state.py), so an edit sent to one replica reaches the others within
`R2EC_WATCH_INTERVAL_S`.

A new version takes the edits of the one it replaces: a reload carries the old catalog's edits
and every one saved beside the old checkpoint (`Catalog.carry_from`), and publishing a version
carries the edits saved for the current one into it (model/checkpoint.py `carry_item_edits`),
which `Catalog.open` applies. Either way the new catalog then follows the old version's record,
and the records that version followed, back along the versions still on disk (`sync_edits`):
an edit a replica still serving an old version saves later is not lost when that replica stops
before it reloads, also where versions were published past it that no service started on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from index import IndexMismatchError, ItemIndex, journal
from index.fair_lock import FairLock
from index.persist import JSON_NAME, locked, saving
from model.checkpoint import (
    INDEX_DIR,
    ITEM_FIELDS,
    Checkpoint,
    edit_maps,
    index_record,
    item_record,
    merge_logged,
    read_carried_edits,
)
from model.special_text import SHOWN_FIELDS, check_shown_text, nfc
from service.search import TIERS, Match, TitleIndex, sort_name
from service.types import QueryError

log = logging.getLogger(__name__)

FOLLOW_BACK = 8  # versions back whose saved edits a new version follows (retrain keeps 3)
TITLE_REBUILD_EDITS = 256  # item edits searched beside the title index before it is rebuilt
SNAPSHOT_EVERY = 1000  # edits in the log beside the index before the whole index is saved again

# encodes item dicts into h_v (N, H), rows in their order (`Catalog.encode_items`, or the
# service's, which takes turns with the recommendation batches on the model thread)
Encoder = Callable[[Sequence[Mapping[str, Any]]], np.ndarray]


class NeedsEncoding(Exception):
    """Raised by `ReadyVectors` for items it holds no vector for: the edits that asked were not
    applied (nothing of that `_apply` was committed); encode `items` and try the sync again."""

    def __init__(self, items: Sequence[Mapping[str, Any]]) -> None:
        super().__init__(f"{len(items)} items to encode")
        self.items = list(items)


class ReadyVectors:
    """An Encoder that encodes nothing: a sync in two steps (service/state.py `_sync_edits`)
    runs `sync_edits` with it under the edit lock; where items must be encoded it raises
    NeedsEncoding, the caller encodes them outside the lock (`add`) and syncs again, which
    checks again which edits still win and takes the vectors of exactly those texts from here
    (an item whose text changed meanwhile raises again)."""

    def __init__(self) -> None:
        self._vectors: dict[tuple[tuple[str, Any], ...], np.ndarray] = {}

    @staticmethod
    def _key(item: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
        return tuple(sorted(item.items()))

    def add(self, items: Sequence[Mapping[str, Any]], vectors: np.ndarray) -> None:
        for item, vector in zip(items, vectors, strict=True):
            self._vectors[self._key(item)] = vector

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> np.ndarray:
        missing = [item for item in items if self._key(item) not in self._vectors]
        if missing:
            raise NeedsEncoding(missing)
        return np.stack([self._vectors[self._key(item)] for item in items])


class ItemTextError(QueryError):
    """An item edit's text holds a special token of the served tokenizer (a 422 naming `field`;
    `at`: where the item is in a batch's body, ("upsert", 3), so the field is `upsert.3.title`)."""

    def __init__(self, field: str, message: str, at: tuple[str | int, ...] = ()) -> None:
        self.loc: tuple[str | int, ...] = (*at, field)
        super().__init__(f"{'.'.join(map(str, self.loc))}: {message}")
        self.field, self.message = field, message


class ItemBatchError(QueryError):
    """A batch of item edits refused before anything changed (`Catalog.edit_many`): every
    entry's text error, in order (a 422 naming each field)."""

    def __init__(self, errors: Sequence[ItemTextError]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = list(errors)


@dataclass(frozen=True)
class BatchEdited:
    """What `Catalog.edit_many` did: for each upserted id (in the order given) whether it
    replaced an item; the deleted ids and those the catalog did not hold, each in the order
    given."""

    replaced: dict[str, bool]
    deleted: list[str]
    not_found: list[str]


def _text(record: Mapping[str, str]) -> tuple[str, ...]:
    """What the model reads of an item (its vector is a function of this alone), in NFC: a
    catalog prepared before text was stored in NFC may hold "Amélie" both as one code point and
    as "e" + U+0301, one title to a reader."""
    return tuple(nfc(record.get(f, "")) for f in ITEM_FIELDS)


class _Twins:
    """Which items share their text with another (every ITEM_FIELDS field): the model gives
    them one vector, a reader sees one item (`Catalog.search`). Kept up to date by every edit
    (`change`), so a search looks ids up instead of reading texts."""

    def __init__(self, records: Mapping[str, Mapping[str, str]]) -> None:
        self._groups: dict[tuple[str, ...], dict[str, None]] = {}  # text -> its ids, in order
        self.ids: dict[str, tuple[str, ...]] = {}  # twin id -> its text
        for item_id, record in records.items():
            self.change(item_id, None, record)

    def change(self, item_id: str, old: Mapping[str, str] | None, new: Mapping[str, str] | None) -> None:
        """An item's text went from `old` to `new` (None: it was not there, or is gone); O(1)."""
        if old is not None:
            text = _text(old)
            group = self._groups.get(text, {})
            group.pop(item_id, None)
            self.ids.pop(item_id, None)
            if len(group) == 1:  # the one left shares its text with nothing now
                self.ids.pop(next(iter(group)), None)
            elif not group:
                self._groups.pop(text, None)
        if new is not None:
            text = _text(new)
            group = self._groups.setdefault(text, {})
            group[item_id] = None
            if len(group) == 2:
                self.ids.update(dict.fromkeys(group, text))
            elif len(group) > 2:
                self.ids[item_id] = text

    def one_per_text(self, row: Sequence[str], exclude: Collection[str]) -> list[int]:
        """Positions in `row` (best first) of the items left once each shared text is listed
        once, and not at all where an `exclude`d item has it."""
        taken = {self.ids[x] for x in exclude if x in self.ids}
        keep = []
        for j, item_id in enumerate(row):
            text = self.ids.get(item_id)
            if text is None or text not in taken:
                keep.append(j)
                if text is not None:
                    taken.add(text)
        return keep


class _Titles(Mapping[str, str]):
    """A read-only item_id -> title view over a catalog's records."""

    def __init__(self, records: Mapping[str, Mapping[str, str]]) -> None:
        self._records = records

    def __getitem__(self, item_id: str) -> str:
        return self._records[item_id]["title"]

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._records

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)


@dataclass(frozen=True)
class Edits:
    """Item edits on top of a checkpoint's catalog: item_id -> its record (None: deleted), and
    when each was made (ns since the epoch; 0 for one saved before times were kept); for the
    upserts read from an edit log, the vector logged with each (`vectors`, made by the model of
    version `model_version`), which a catalog of that version applies rather than encode; for
    those read from a saved record, the index directory it was read from (`saved_in`), whose
    previous edit log (index/journal.py `read_previous`) may hold the vectors of upserts a full
    save took out of the log."""

    records: dict[str, dict[str, str] | None] = field(default_factory=dict)
    times: dict[str, int] = field(default_factory=dict)
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    model_version: str | None = None
    saved_in: Path | None = None

    @classmethod
    def of(cls, metadata: Mapping[str, Any]) -> Edits:
        """The edits an index.json's metadata records (none where it records none)."""
        return cls(*edit_maps(metadata))

    @classmethod
    def logged(cls, merged: Mapping[str, Any], won: Mapping[str, Mapping[str, Any]], version: str) -> Edits:
        """The edits of a record merged with the entries `version`'s edit log holds after it
        (`merge_logged`: the merged record and the entries that won, by item), with each winning
        upsert's logged vector: what a restart (`_replay_log`) and a sync (`Catalog._apply`)
        apply without encoding."""
        edits = cls.of(merged)
        vectors = {
            i: e["vector"]
            for i, e in won.items()
            if edits.records.get(i) is not None and isinstance(e.get("vector"), np.ndarray)
        }
        return cls(edits.records, edits.times, vectors, version)

    def __bool__(self) -> bool:
        return bool(self.records)


def usable_vector(vector: np.ndarray | None, dim: int) -> bool:
    """Whether a logged vector can go into an index of `dim` as it is (else it is encoded)."""
    return (
        vector is not None
        and vector.shape == (dim,)
        and bool(np.isfinite(vector).all())
        and bool(np.any(vector))
    )


def stored_record(fields: Mapping[str, Any]) -> dict[str, str]:
    """An item's text as an edit stores it (PUT /items, POST /items:batch, `Catalog.upsert`,
    `Catalog.edit_many`): every field a string, in Unicode NFC, so "Amélie" sent decomposed is
    the same title (and twin) as the catalog's."""
    return {k: nfc(v) for k, v in item_record(fields).items()}


class Catalog:
    """A checkpoint's items and their index, editable; every change to both goes through here."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        index: ItemIndex,
        *,
        persist_edits: bool = True,
        edits: Edits | None = None,
        index_saved: bool = True,
    ) -> None:
        """`edits`: those on record beside the index (the index holds them); `index_saved`:
        whether the index saved there is this one (not where it had to be rebuilt)."""
        if index.dim != checkpoint.model.hidden_size:
            raise IndexMismatchError(
                f"index dim {index.dim} != model hidden size {checkpoint.model.hidden_size}"
            )
        self.checkpoint = checkpoint
        self.index = index
        self.persist_edits = persist_edits
        self._records: dict[str, dict[str, str]] = {
            str(row["item_id"]): item_record(row) for row in checkpoint.items.to_dict("records")
        }
        edits = edits or Edits()
        self._edits: dict[str, dict[str, str] | None] = dict(edits.records)
        self._edit_times: dict[str, int] = {i: edits.times.get(i, 0) for i in self._edits}
        self._saved: tuple[int, int, int] | None = None  # the index.json last read or written here
        # why the last save failed (a full or read-only volume), while edits applied here are
        # not on the disk: retried at each watch tick (`sync_edits`) and at the next edit
        self.unsaved: str | None = None
        # other versions' index directories whose saved edits this catalog takes (the version
        # it replaced): realpath -> (directory, version, stamp of the index.json last read)
        self._sources: dict[str, tuple[Path, str, tuple[int, int, int] | None]] = {}
        _apply_edits(self._records, self._edits)
        self._twins = _Twins(self._records)
        # edits vs. a batch's search + title reads; first come, first served, so an edit is not
        # kept waiting by searches that follow each other (index/fair_lock.py)
        self._lock = FairLock()
        # edits and the start of a full save, taken before `_lock` (which searches take): an
        # edit waits here while a full save writes the faiss file, not holding up searches
        self._writing = threading.RLock()
        self._dirty: set[str] = set()  # items whose edit the record beside the index lacks
        self._index_saved = index_saved  # whether index.json's faiss file is this index
        self.snapshot_every = SNAPSHOT_EVERY  # logged edits before the whole index is saved
        self._snapshotter: threading.Thread | None = None  # the full save under way, if any
        self._log_count = journal.Counter(checkpoint.path / INDEX_DIR)  # entries in the edit log
        # title search (GET /items): built from a snapshot of the titles outside the lock and
        # swapped in (`build_titles`), then edits are searched beside it
        self._titles: TitleIndex | None = None
        self._title_edits: dict[str, str | None] = {}  # edits since the index's snapshot
        self._title_since: dict[str, str | None] | None = None  # since a build's snapshot
        self._title_build = threading.Lock()  # one build at a time
        self._title_thread: threading.Thread | None = None  # a rebuild under way

    @classmethod
    def open(
        cls,
        checkpoint: Checkpoint,
        *,
        kind: str = "flat",
        nprobe: int | None = None,
        ef_search: int | None = None,
        persist_edits: bool = True,
    ) -> Catalog:
        """The checkpoint's catalog with its saved edits, over the index in <ckpt>/index/ (built
        and saved there when missing or stale), and the edits carried into it when it was
        published (model/checkpoint.py `carry_item_edits`) with those saved since for the
        version they came from, which it then follows (`sync_edits`)."""
        index, edits, pending, saved = open_index(checkpoint, kind)
        index.set_search_params(nprobe=nprobe, ef_search=ef_search)
        catalog = cls(checkpoint, index, persist_edits=persist_edits, edits=edits, index_saved=saved)
        if pending:  # saved edits of an index that had to be rebuilt: applied again
            applied = catalog._apply(pending, ties_win=True, on_record=True)
            log.info("re-applied %d saved item edits to the rebuilt index", applied)
        carried = read_carried_edits(checkpoint.path)
        applied = catalog._apply(Edits.of(carried), ties_win=False)  # the ones not taken yet
        if persist_edits:
            applied += catalog._follow_back(carried)
        if applied:
            log.info("applied %d item edits carried from version %s", applied, carried.get("version"))
        if applied:
            catalog._persist()
        if persist_edits and not catalog._index_saved:  # rebuilt: saved whole, with its edits
            catalog._save_snapshot()
        catalog.build_titles()  # now, before it serves: not on the first search, under traffic
        return catalog

    # ---------------------------------------------------------------- reads
    def __len__(self) -> int:
        return len(self._records)

    def item(self, item_id: str) -> dict[str, str] | None:
        found = self._records.get(str(item_id))
        return None if found is None else {"item_id": str(item_id), **found}

    def lookup(self, item_ids: Iterable[str]) -> tuple[dict[str, str], list[str]]:
        """(titles of the known ids, the unknown ids in first-seen order without repeats): the one
        pass over the catalog that a request's ids get. Single dict reads need no lock."""
        titles: dict[str, str] = {}
        unknown: dict[str, None] = {}
        for item_id in item_ids:
            record = self._records.get(item_id)
            if record is None:
                unknown[item_id] = None
            else:
                titles[item_id] = record["title"]
        return titles, list(unknown)

    @property
    def titles(self) -> Mapping[str, str]:
        """item_id -> title of every item served now (a live read-only view, edits included)."""
        return _Titles(self._records)

    def unknown(self, item_ids: Iterable[str]) -> list[str]:
        """Ids not in the catalog, in first-seen order, without repeats."""
        return self.lookup(item_ids)[1]

    def search(
        self,
        vectors: np.ndarray,
        k: int,
        exclude: Sequence[set[str]],
        only: Sequence[Collection[str] | None] | None = None,
    ) -> tuple[list[list[str]], np.ndarray, list[list[str]]]:
        """Top-k ids, cosines (B, K) and titles for (B, H) user vectors, each row without its
        `exclude` and, where `only` gives one, among those items alone (index/faiss_index.py
        `ItemIndex.search`); under the lock, so an edit cannot land between the search and the
        title reads.

        Items whose texts are the same (every ITEM_FIELDS field: ml-100k lists 18 films twice,
        under two ids) are one item to the model, which gives them one vector, and to whoever
        reads the list: a catalog-wide row names the best of them once, and none where the user
        has one of them (`exclude`). A row among given candidates (`only`) keeps every one asked
        for."""
        with self._lock:
            twins = self._twins
            # only twins are dropped: up to k more than asked, and more (doubling) for a row
            # left short where the index holds more
            fetch = k + min(len(twins.ids), k)
            while True:
                ids, cos = self.index.search(vectors, fetch, exclude=exclude, only=only)
                rows = [
                    list(range(len(row))) if not twins.ids or (only is not None and only[i] is not None)
                    else twins.one_per_text(row, exclude[i])
                    for i, row in enumerate(ids)
                ]  # fmt: skip
                short = any(len(r) < k and len(ids[i]) == fetch for i, r in enumerate(rows))
                if not short or fetch >= len(self.index):
                    break
                fetch = min(2 * fetch, len(self.index))
            kept = [[ids[i][j] for j in r[:k]] for i, r in enumerate(rows)]
            scores = np.full((len(ids), k), -np.inf, dtype=np.float32)
            for i, r in enumerate(rows):
                scores[i, : len(r[:k])] = cos[i, r[:k]]
            titles = [[self._records[x]["title"] for x in row] for row in kept]
        return kept, scores, titles

    def search_titles(self, query: str, limit: int) -> list[tuple[dict[str, str], str]]:
        """Items whose title matches `query`, best first, with how it matched (service/search.py:
        exact, prefix, word, substring). The title index is built when the catalog opens
        (`build_titles`); later item edits are searched beside it, and once there are more than
        TITLE_REBUILD_EDITS of them it is built again on a thread of its own, this search and
        the next ones using the one there is meanwhile."""
        with self._lock:
            titles, edits = self._titles, dict(self._title_edits)
        if titles is None:  # a catalog not made by `open`: built on first use, outside the lock
            self.build_titles(missing_only=True)
            with self._lock:
                titles, edits = self._titles, dict(self._title_edits)
        elif len(edits) > TITLE_REBUILD_EDITS:
            self._rebuild_titles_in_background()
        matches = titles.search(query, limit, skip=edits)
        if edits:  # edited items: their current titles, merged in by (tier, title, id)
            edited = TitleIndex((i, t) for i, t in edits.items() if t is not None).search(query, limit)

            def rank(m: Match) -> tuple[int, bool, str, str]:
                return m.tier, not m.typed, sort_name(self._title_now(m.item_id)), m.item_id

            matches = sorted([*matches, *edited], key=rank)[:limit]
        found = []
        for m in matches:
            record = self.item(m.item_id)
            if record is not None:  # removed since the snapshot
                found.append((record, TIERS[m.tier]))
        return found

    def _title_now(self, item_id: str) -> str:
        """An item's current title ("" once removed); read without the lock (one dict read)."""
        record = self._records.get(item_id)
        return "" if record is None else record["title"]

    def build_titles(self, *, missing_only: bool = False) -> None:
        """Build the title index from a snapshot of the titles and swap it in. The build (seconds
        at a million titles) holds no lock a search or an edit takes: the lock is held to copy
        the id -> record map (records are replaced, never changed in place) and to swap;
        the edits made in between are searched beside the new index."""
        with self._title_build:
            if missing_only and self._titles is not None:  # built while this one waited
                return
            with self._lock:
                snapshot = list(self._records.items())
                self._title_since = {}
            try:
                # an item's title for the as-typed ranking: the records, not a second copy of them
                built = TitleIndex(((i, r["title"]) for i, r in snapshot), title_of=self._title_now)
            except BaseException:
                with self._lock:
                    self._title_since = None
                raise
            with self._lock:
                self._titles, self._title_edits, self._title_since = built, self._title_since, None

    def _rebuild_titles_in_background(self) -> None:
        with self._lock:  # one caller starts it
            if self._title_thread is not None and self._title_thread.is_alive():
                return
            self._title_thread = threading.Thread(target=self.build_titles, name="r2ec-titles", daemon=True)
            self._title_thread.start()

    def wait_titles(self) -> None:
        """Wait for a title index rebuild under way, if any (tests)."""
        thread = self._title_thread
        if thread is not None:
            thread.join()

    def _title_changed(self, item_id: str, title: str | None) -> None:
        """Record an edit for title search (under the lock)."""
        if self._titles is not None:
            self._title_edits[item_id] = title
        if self._title_since is not None:  # a build's snapshot was taken before it
            self._title_since[item_id] = title

    # ---------------------------------------------------------------- edits
    def encode_item(self, item: Mapping[str, Any]) -> np.ndarray:
        """h_v (H,) float32 for an item dict (title + optional year/genres/description)."""
        with torch.no_grad():
            return self.checkpoint.model.item_vectors([dict(item)]).numpy()[0]

    def encode_items(self, items: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """h_v (N, H) float32 for item dicts, rows in their order: the model's batched pass
        (`R2ec.item_vectors`, batches of 32 prompts of similar length)."""
        with torch.no_grad():
            return self.checkpoint.model.item_vectors([dict(i) for i in items]).numpy()

    def check_text(self, fields: Mapping[str, Any], at: tuple[str | int, ...] = ()) -> None:
        """ItemTextError naming the first field (of ITEM_FIELDS) whose text holds a special token
        of the served model's tokenizer ("<|im_end|>"): a prompt would carry it as a control
        token, not as text; or, in a title, year or genres, a bidirectional control
        (model/special_text.py). `at`: where the item is in a batch."""
        model = self.checkpoint.model
        for key in ITEM_FIELDS:
            value = fields.get(key)
            if isinstance(value, str) and key in SHOWN_FIELDS:
                try:  # what PUT /items's schema refuses too (service/schemas.py `check_shown`)
                    check_shown_text(value)
                except ValueError as exc:
                    raise ItemTextError(key, str(exc)) from None
            if isinstance(value, str) and (found := model.special_token_in(value)) is not None:
                raise ItemTextError(
                    key,
                    f"must not hold {found!r}, a special token of the served model's tokenizer "
                    "(a prompt would carry it as a control token, not as text)",
                    at,
                )

    def check_texts(self, items: Sequence[Mapping[str, Any]], key: str = "upsert") -> None:
        """`check_text` of every item of a batch: ItemBatchError with each one refused, named by
        its place (`upsert.3.title`)."""
        errors = []
        for n, fields in enumerate(items):
            try:
                self.check_text(fields, (key, n))
            except ItemTextError as exc:
                errors.append(exc)
        if errors:
            raise ItemBatchError(errors)

    def upsert(self, item_id: str, fields: Mapping[str, Any]) -> bool:
        """Encode the item's text, add or replace it in index + catalog; True if it replaced.
        Text holding a special token of the served tokenizer is refused (`check_text`)."""
        self.check_text(fields)
        record = stored_record(fields)
        vector = self.encode_item({"item_id": item_id, **record})  # (H,)
        with self._writing, self._lock:
            replaced = self.index.upsert(item_id, vector)
            self._twins.change(item_id, self._records.get(item_id), record)
            self._records[item_id] = record
            self._edits[item_id] = record
            self._edit_times[item_id] = self._next_time(item_id)
            self._dirty.add(item_id)
            self._title_changed(item_id, record["title"])
        self._persist()
        return replaced

    def remove(self, item_id: str) -> None:
        """Drop an item from index + catalog; KeyError if unknown."""
        with self._writing, self._lock:
            if item_id not in self._records:
                raise KeyError(item_id)
            if item_id in self.index:
                self.index.remove(item_id)
            self._twins.change(item_id, self._records.pop(item_id), None)
            self._edits[item_id] = None
            self._edit_times[item_id] = self._next_time(item_id)
            self._dirty.add(item_id)
            self._title_changed(item_id, None)
        self._persist()

    def edit_many(
        self,
        upserts: Mapping[str, Mapping[str, Any]],
        deletes: Sequence[str] = (),
        vectors: np.ndarray | None = None,
    ) -> BatchEdited:
        """Add or replace `upserts` (id -> its text) and remove `deletes` at once: every text is
        checked first (`check_texts`: ItemBatchError, and nothing changed, where one holds a
        special token), the upserts encoded in one batched pass (`encode_items`) unless
        `vectors` gives their h_v (rows in the order of `upserts`: the service encodes them in
        chunks on the model thread beforehand), then applied with the deletes under the locks in
        one pass over the index (`_commit`), recorded with the time of each, appended to the
        edit log in one write and saved once (`_persist`). An id to delete that the catalog does
        not hold is reported (`not_found`), not recorded. ValueError where an id is in both, or
        twice among `deletes`, or `vectors` does not fit."""
        deletes = [str(i) for i in deletes]
        if len(set(deletes)) != len(deletes) or set(deletes) & set(upserts):
            raise ValueError("an item id may appear once in a batch of edits")
        self.check_texts(list(upserts.values()))
        records = {str(i): stored_record(f) for i, f in upserts.items()}
        if vectors is None and records:
            vectors = self.encode_items([{"item_id": i, **r} for i, r in records.items()])
        if records and (vectors is None or vectors.shape != (len(records), self.index.dim)):
            raise ValueError(f"{len(records)} upserts need ({len(records)}, {self.index.dim}) vectors")
        with self._writing:  # no other edit until this one is applied: what it finds stays so
            replaced = {i: i in self.index for i in records}
            found = [i for i in deletes if i in self._records]
            not_found = [i for i in deletes if i not in self._records]
            recorded: dict[str, dict[str, str] | None] = {**records, **dict.fromkeys(found)}
            self._commit(records, vectors, found, recorded, None)
        if recorded:
            self._persist()
        return BatchEdited(replaced, found, not_found)

    @property
    def edits(self) -> Edits:
        """Item edits made through the admin API on top of the checkpoint's catalog, with their times."""
        with self._lock:
            return Edits(dict(self._edits), dict(self._edit_times))

    def _next_time(self, item_id: str) -> int:
        """The time of a new edit of `item_id`: now, but later than the edit it replaces, so a
        clock stepped back (or behind another replica's) cannot make it lose to that one."""
        return max(time.time_ns(), self._edit_times.get(item_id, -1) + 1)

    def carry_from(self, old: Catalog) -> int:
        """Take over the item edits of the catalog this one replaces (a reload) and save: the
        ones it holds that are not older than this catalog's own edit of the item (a tie goes to
        the carried edit, as an edit saved before times were kept has time 0; changed items are
        re-encoded with this model in one batch), every one saved beside its checkpoint (another replica
        still serving it may have saved some that `old` has not synced), and from then on the
        ones saved there later, at each `sync_edits`: read from the record's stamp taken
        before the read, so an edit saved after this read is not missed either. Returns how
        many edits changed something."""
        applied = self._apply(old.edits, ties_win=True)
        if self.persist_edits and old.persist_edits:
            # the old version's record, and the ones it followed (the versions before it)
            followed = [(old._directory, old.checkpoint.version)]
            followed += [(directory, version) for directory, version, _ in old._sources.values()]
            own = os.path.realpath(self._directory)
            for directory, version in followed:
                if os.path.realpath(directory) != own:
                    applied += self._follow(directory, version)
        if applied:
            self._persist()
        return applied

    def sync_edits(self, encode: Encoder | None = None) -> int:
        """Apply the edits another replica saved beside this checkpoint that are newer than this
        catalog's own (module docstring), and those saved since for the version this catalog
        replaced (`carry_from`, `open`; saved here when they changed something); a cheap stat
        per record that has not changed since this catalog last read or wrote it. The ones read
        from this version's edit log go in with their logged vectors; the others are encoded by
        `encode` (`_vectors_of`). Returns how many edits changed something."""
        if not self.persist_edits:
            return 0
        if self.unsaved is not None:  # edits held in memory since a failed save: try again
            self._persist(encode)
            if self.unsaved is None:
                log.info("item edits held in memory are saved now")
        applied = self._sync_own(encode)
        for key, (directory, _, _) in list(self._sources.items()):
            if not directory.parent.is_dir():  # that version was pruned: nothing more to come
                del self._sources[key]
        carried = sum(
            self._follow(directory, version, encode) for directory, version, _ in list(self._sources.values())
        )
        if carried:
            self._persist(encode)
        elif self.unsaved is None and self._snapshot_due():  # one given up on (`_save_snapshot`)
            self._snapshot_in_background()
        return applied + carried

    @property
    def _directory(self) -> Path:
        return self.checkpoint.path / INDEX_DIR

    def _sync_own(self, encode: Encoder | None = None) -> int:
        """`sync_edits` for this checkpoint's own record only (what a save merges first)."""
        applied, self._saved = self._take_saved(
            self._directory, self.checkpoint.version, self._saved, on_record=True, encode=encode
        )
        return applied

    def _follow(self, directory: Path, version: str, encode: Encoder | None = None) -> int:
        """Apply the edits saved in another version's record `directory` since this catalog last
        read it (all, the first time) that are newer than its own, without saving, and keep
        following it."""
        key = os.path.realpath(directory)
        applied, stamp = self._take_saved(
            directory, version, self._sources.get(key, (directory, version, None))[2], encode=encode
        )
        self._sources[key] = (directory, version, stamp)
        return applied

    def _follow_back(self, carried: Mapping[str, Any]) -> int:
        """Follow the record of the version the carried edits came from (`carried`: this
        checkpoint's EDITS_FILE), then of the one that version's came from, and so on while
        those versions are on disk (at most FOLLOW_BACK): a replica still serving any of them
        may save an edit there after this version was published. Returns how many edits the
        first reads changed."""
        applied, parent = 0, self.checkpoint.path.parent
        for _ in range(FOLLOW_BACK):
            source = carried.get("from")
            if not isinstance(source, str) or source in ("", ".", "..") or {"/", "\x00"} & set(source):
                break
            path = parent / source
            key = os.path.realpath(path / INDEX_DIR)
            if key == os.path.realpath(self._directory) or key in self._sources or not path.is_dir():
                break  # a loop in the records, or a version already pruned
            applied += self._follow(path / INDEX_DIR, str(carried.get("version", "")))
            carried = read_carried_edits(path)
        return applied

    def _take_saved(
        self,
        directory: Path,
        version: str,
        seen: Stamp | None,
        *,
        on_record: bool = False,
        encode: Encoder | None = None,
    ) -> tuple[int, Stamp | None]:
        """Apply the edits in `directory`'s record for `version` that are newer than this
        catalog's own, when the record is not the one last read (`seen`): how many changed
        something, and the stamp of what was read (`seen` where nothing was). The stamp is taken
        before the read, so a save after it is read next time; it is returned after the apply,
        so a failed one is retried. Where index.json is the one read last time, only the edit
        log is read (what was saved since is there). `on_record`: the record is this catalog's
        own, which need not be saved again."""
        stamp = _stamp(directory)
        if stamp is None or stamp == seen:
            return 0, seen
        if seen is not None and stamp[0] is not None and stamp[0] == seen[0]:
            edits = logged_edits(directory, version)
        else:
            edits = saved_edits(directory, version)
        return self._apply(edits, ties_win=False, on_record=on_record, encode=encode), stamp

    def _apply(
        self, edits: Edits, *, ties_win: bool, on_record: bool = False, encode: Encoder | None = None
    ) -> int:
        """Take the edits that are later than this catalog's own edit of the item (or as late,
        with `ties_win`), without saving: each is recorded with its time, also one that changes
        nothing served (its time is what a later save must keep); the ones that change an item
        are re-encoded in one batch and applied to the index. Returns how many changed one.
        `on_record`: they come from this catalog's own record (not to be saved again), else
        the next `_persist` saves them."""

        def wins(item_id: str) -> bool:
            mine, theirs = self._edit_times.get(item_id, -1), edits.times.get(item_id, 0)
            return theirs > mine or (ties_win and theirs == mine)

        winners = {i: r for i, r in edits.records.items() if wins(i)}
        upserts = {i: r for i, r in winners.items() if r is not None and self._records.get(i) != r}
        deletes = [i for i, r in winners.items() if r is None and i in self._records]
        vectors = self._vectors_of(upserts, edits, encode) if upserts else None
        times = {i: edits.times.get(i, 0) for i in winners}
        self._commit(upserts, vectors, deletes, winners, times, on_record=on_record)
        return len(upserts) + len(deletes)

    def _vectors_of(
        self, upserts: Mapping[str, dict[str, str]], edits: Edits, encode: Encoder | None
    ) -> np.ndarray:
        """h_v (N, H) of `upserts`, rows in their order: the vector logged with each where the
        edits come from this model version's log (`Edits.vectors`, as a restart applies them:
        the replica that made the edit encoded it with this model); for an edit a full save
        took out of the log, the vector the previous log holds for the item's text
        (`_previous_vectors`); the others (another version's edits, one a later full save took
        out of the previous log too, a vector missing or of another dimension) encoded by
        `encode` (`encode_items` where None: the service gives one that encodes EDIT_BATCH_CHUNK
        items per turn of the model thread, service/state.py)."""
        dim = self.index.dim
        own = edits.model_version == self.checkpoint.version
        logged = edits.vectors if own else {}
        out = np.empty((len(upserts), dim), dtype=np.float32)
        missing = []
        for row, item_id in enumerate(upserts):
            vector = logged.get(item_id)
            if usable_vector(vector, dim):
                out[row] = vector
            else:
                missing.append(row)
        ids = list(upserts)
        if missing and own and edits.saved_in is not None:
            previous = self._previous_vectors(edits.saved_in, {ids[r] for r in missing})
            found = 0
            for row in list(missing):
                vector = previous.get((ids[row], _text(upserts[ids[row]])))
                if usable_vector(vector, dim):
                    out[row] = vector
                    missing.remove(row)
                    found += 1
            if found:
                log.info("took %d item vectors from the edit log a full save cut, not encoded", found)
        if missing:
            items = [{"item_id": ids[r], **upserts[ids[r]]} for r in missing]
            out[missing] = (encode or self.encode_items)(items)
        return out

    def _previous_vectors(
        self, directory: Path, item_ids: Collection[str]
    ) -> dict[tuple[str, tuple[str, ...]], np.ndarray]:
        """(item id, its text) -> the vector this model version logged for it, of `item_ids`,
        from `directory`'s previous edit log (index/journal.py `read_previous`): the entries the
        last full save took out of the log, made by the replica that encoded them. Keyed by the
        text too: an item's vector is a function of its text alone (`_text`)."""
        version = self.checkpoint.version
        out = {}
        for entry in journal.read_previous(directory):
            item_id, record, vector = entry.get("item_id"), entry.get("record"), entry.get("vector")
            if (
                entry.get("model_version") == version
                and isinstance(item_id, str)
                and item_id in item_ids
                and isinstance(record, dict)
                and isinstance(vector, np.ndarray)
            ):
                out[(item_id, _text(item_record(record)))] = vector
        return out

    def _commit(
        self,
        upserts: Mapping[str, dict[str, str]],
        vectors: np.ndarray | None,
        deletes: Sequence[str],
        recorded: Mapping[str, dict[str, str] | None],
        times: Mapping[str, int] | None,
        *,
        on_record: bool = False,
    ) -> None:
        """Apply many edits under the locks, in one pass over the index: `upserts` (id -> record)
        with their `vectors` (rows in the same order) and `deletes` (ids the catalog holds), and
        record `recorded` (id -> record, None: deleted) with its `times` (None: now, each later
        than the item's edit before, `_next_time`). `on_record`: they come from this catalog's
        own record (not to be saved again), else the next `_persist` saves them."""
        with self._writing, self._lock:
            if upserts:  # one pass over the index for all of them (`ItemIndex.upsert_many`)
                self.index.upsert_many(list(upserts), vectors)
            self.index.remove_many([i for i in deletes if i in self.index])
            for item_id, record in upserts.items():
                self._twins.change(item_id, self._records.get(item_id), record)
                self._records[item_id] = record
                self._title_changed(item_id, record["title"])
            for item_id in deletes:
                self._twins.change(item_id, self._records.pop(item_id, None), None)
                self._title_changed(item_id, None)
            for item_id, record in recorded.items():
                self._edits[item_id] = record
                self._edit_times[item_id] = self._next_time(item_id) if times is None else times[item_id]
            if on_record:
                self._dirty.difference_update(recorded)
            else:
                self._dirty.update(recorded)

    def _persist(self, encode: Encoder | None = None) -> None:
        """Save the edits applied here that the record beside the checkpoint lacks: appended to
        its edit log (index/journal.py), after applying what another replica saved there since
        (`sync_edits`), under the directory's lock, so the record keeps every replica's edits.
        Once the log holds `snapshot_every` edits, or the index saved there is not this one,
        the whole index is saved as well, on a thread of its own (`_save_snapshot`)."""
        if not self.persist_edits:
            return
        directory = self._directory
        try:
            with self._writing, locked(directory):
                caught_up = True
                try:
                    self._sync_own(encode or ReadyVectors())
                except NeedsEncoding:
                    if encode is not None:
                        raise  # a sync's: it encodes them and tries again (service/state.py)
                    # an edit's save: what another replica saved that must be encoded is left
                    # to the next sync (chunked between batches), not encoded in this edit's
                    # turn of the model thread; the record is not marked read, so it is taken
                    caught_up = False
                self._log_dirty(directory)
                if caught_up:
                    self._saved = _stamp(directory)
        except OSError as exc:  # a read-only checkpoint volume still serves the edit, from memory
            if self.unsaved is None:
                log.warning("item edit applied in memory but not saved: %s", exc)
            self.unsaved = str(exc)
            return
        self.unsaved = None
        if self._snapshot_due():
            self._snapshot_in_background()

    def _log_dirty(self, directory: Path) -> None:
        """Append the edits the record lacks to its log, each with the vector the index holds
        for it (so a restart need not encode it); the caller holds `_writing` and the lock of
        `directory`."""
        if not self._dirty:
            return
        with self._lock:
            entries = []
            for item_id in sorted(self._dirty):
                record = self._edits[item_id]
                vector = self.index.vector(item_id) if record is not None and item_id in self.index else None
                entries.append(
                    {
                        "model_version": self.checkpoint.version,
                        "item_id": item_id,
                        "record": record,
                        "time": self._edit_times[item_id],
                        "vector": vector,
                    }
                )
        journal.append(directory, entries)
        self._dirty.clear()

    def _snapshot_due(self) -> bool:
        return self.persist_edits and (not self._index_saved or self._log_count() >= self.snapshot_every)

    def _snapshot_in_background(self) -> None:
        """Start `_save_snapshot` on a thread of its own, unless one is under way."""
        with self._writing:
            if self._snapshotter is not None and self._snapshotter.is_alive():
                return
            self._snapshotter = threading.Thread(
                target=self._save_snapshot, kwargs={"background": True}, name="r2ec-index-save", daemon=True
            )
            self._snapshotter.start()

    def wait_saved(self) -> None:
        """Wait for the full save under way, if any (tests, benchmarks)."""
        thread = self._snapshotter
        if thread is not None:
            thread.join()

    def _save_snapshot(self, *, background: bool = False) -> bool:
        """Save the whole index beside the checkpoint with the record of every edit it holds,
        then cut the edit log back to the entries appended since (the rest are in the saved
        index, and in the previous log, whose vectors the other replicas take: `_vectors_of`,
        index/journal.py `drop_through`). Searches go on throughout; edits wait only while the
        faiss file is written (`ItemIndex.begin_save`), not for its flush to the disk nor the
        record (`finish_save`). One full save at a time per directory, across replicas
        (index/persist.py `saving`).

        `background` (not the model's thread): it encodes nothing, so where another replica
        saved edits since this catalog last read the record, it gives up; the next edit or
        watch tick takes them and starts it again. Returns whether it saved; a failure to write
        is logged, and changes nothing on the disk (the edits are in the log)."""
        directory = self._directory
        try:
            with saving(directory):
                with self._writing:
                    with locked(directory):
                        if not background:
                            self._sync_own()
                        elif _stamp(directory) != self._saved:
                            return False
                        self._log_dirty(directory)  # the log holds every edit applied here
                        logged = journal.stamp(directory)
                        kind = self.index.metadata.get("index_kind", self.index.kind)
                        metadata = index_metadata(self.checkpoint.version, kind, self.edits)
                    written = self.index.begin_save(directory, metadata)
                self.index.finish_save(written)
                self._index_saved = True
                with locked(directory):
                    unchanged = journal.stamp(directory) == logged  # nothing logged since
                    journal.drop_through(directory, logged)
                    if unchanged:
                        self._saved = _stamp(directory)
        except OSError as exc:
            log.warning("could not save the index to %s (%s); its edits are in the edit log", directory, exc)
            return False
        return True


# -------------------------------------------------------------------- the index on disk
def index_metadata(version: str, kind: str, edits: Edits) -> dict[str, Any]:
    """What <ckpt>/index/index.json records: whose vectors, which kind was asked for, and the
    catalog edits made since the checkpoint was written, with their times."""
    return {
        "model_version": version,
        "index_kind": kind,
        "catalog_edits": dict(edits.records),
        "edit_times": dict(edits.times),
    }


Stamp = tuple[tuple[int, int, int] | None, tuple[int, int] | None]


def _stamp(directory: Path) -> Stamp | None:
    """Which record is there now: index.json (each full save replaces the file: a new inode)
    and the edit log (inode, size: each edit appends); None: neither."""
    try:
        st = os.stat(directory / JSON_NAME)
        saved = (st.st_ino, st.st_mtime_ns, st.st_size)
    except (OSError, ValueError):  # ValueError: a path no filesystem has (a NUL byte)
        saved = None
    logged = journal.stamp(directory)
    return None if saved is None and logged is None else (saved, logged)


def open_index(ckpt: Checkpoint, kind: str) -> tuple[ItemIndex, Edits, Edits, bool]:
    """Load <ckpt>/index/ when it was built for this model version and kind and agrees with the
    catalog, with the edits logged since it was saved applied (`_replay_log`); otherwise build
    it from the checkpoint's item vectors and save it (best effort). Returns the index, the item
    edits it holds, the edits it does not hold yet: those saved beside an index that had to be
    rebuilt (another kind asked for, a damaged file), for the caller to encode and apply again
    (`Catalog.open`) rather than lose, and whether the index saved there is this one."""
    directory = ckpt.path / INDEX_DIR
    kind_changed = None  # the kind of the saved index, where only the kind differs
    if (directory / JSON_NAME).is_file():
        try:
            index = ItemIndex.load(
                directory,
                expect_dim=ckpt.model.hidden_size,
                expect_metadata={"model_version": ckpt.version, "index_kind": kind},
            )
            edits = _replay_log(index, directory, ckpt.version)
            catalog = {str(i): {} for i in ckpt.items["item_id"]}
            _apply_edits(catalog, edits.records)
            if set(catalog) == set(index.item_ids()):
                return index, edits, Edits(), True
            log.warning("index in %s disagrees with the catalog: rebuilding", directory)
        except IndexMismatchError as exc:
            if exc.field != "index_kind":
                log.warning("not using the index in %s (%s): rebuilding", directory, exc)
            else:  # a deliberate change of R2EC_INDEX_KIND, not damage
                kind_changed = exc.found
                log.info(
                    "the index in %s is a %s index and %s is asked for: building it",
                    directory,
                    exc.found,
                    kind,
                )
        except (ValueError, OSError, RuntimeError) as exc:
            log.warning("not using the index in %s (%s): rebuilding", directory, exc)
    started = time.perf_counter()
    index = ItemIndex.build([str(i) for i in ckpt.items["item_id"]], ckpt.item_vectors, kind=kind)
    if kind_changed is not None:
        log.info(
            "built a %s index in place of the %s one in %s (%d items, %.1fs); the saved item edits follow",
            kind, kind_changed, directory, len(index), time.perf_counter() - started,
        )  # fmt: skip
    try:
        # the record is read under the lock, after the build: another replica may have saved
        # edits while this one built, and an empty record must not be written over them
        with saving(directory):
            with locked(directory):
                pending = saved_edits(directory, ckpt.version)
                logged = journal.stamp(directory)
            if not pending:  # else the old record stays until the caller applied and saved them
                index.save(directory, index_metadata(ckpt.version, kind, Edits()))
                with locked(directory):  # another version's log (an edit since is kept)
                    journal.drop_through(directory, logged)
    except OSError as exc:
        log.warning("could not save the index to %s (%s); serving it from memory", directory, exc)
        pending = saved_edits(directory, ckpt.version)
        return index, Edits(), pending, False
    return index, Edits(), pending, not pending


def _replay_log(index: ItemIndex, directory: Path, version: str) -> Edits:
    """Apply to a loaded index the edits logged beside it since it was saved, with their logged
    vectors; the edits it holds then. ValueError where one lacks a usable vector (the caller
    rebuilds the index and encodes the edits again)."""
    saved = Edits.of(index.metadata)
    entries = [e for e in journal.read(directory) if e.get("model_version") == version]
    if not entries:
        return saved
    merged, won = merge_logged(index.metadata, entries)
    logged = Edits.logged(merged, won, version)
    upserts: dict[str, np.ndarray] = {}
    deletes = []
    for item_id, entry in won.items():
        record, when = entry["record"], merged["edit_times"][item_id]
        if item_id in saved.records and saved.times.get(item_id) == when:
            held = saved.records[item_id]
            if (record is None) == (held is None) and (record is None or item_record(record) == held):
                continue  # logged before the save that holds it
        if record is None:
            deletes.append(item_id)
            continue
        vector = logged.vectors.get(item_id)
        if not usable_vector(vector, index.dim):
            raise ValueError(f"the edit log's entry for item {item_id!r} has no usable vector")
        upserts[item_id] = vector
    if upserts:
        index.upsert_many(list(upserts), np.stack(list(upserts.values())))  # ValueError: NaN, zero
    index.remove_many([i for i in deletes if i in index])
    if upserts or deletes:
        log.info(
            "applied %d item edits logged since the index in %s was saved",
            len(upserts) + len(deletes),
            directory,
        )
    return Edits.of(merged)


def saved_edits(directory: Path, version: str) -> Edits:
    """The item edits recorded in <directory> for this model version (index.json and the edit
    log after it), whatever state the rest of that directory is in; none when there is no
    readable record. The upserts the log holds come with their logged vectors (`Edits.logged`);
    those a full save took out of it, with the directory whose previous log may hold theirs."""
    return dataclasses.replace(Edits.logged(*index_record(directory, version), version), saved_in=directory)


def logged_edits(directory: Path, version: str) -> Edits:
    """The item edits for this model version in <directory>'s edit log alone, with the vectors
    logged beside them (`Edits.logged`)."""
    entries = [e for e in journal.read(directory) if e.get("model_version") == version]
    return Edits.logged(*merge_logged({}, entries), version) if entries else Edits()


def _apply_edits(catalog: dict[str, Any], edits: Mapping[str, Any]) -> None:
    for item_id, record in edits.items():
        if record is None:
            catalog.pop(item_id, None)
        else:
            catalog[item_id] = record
