"""The recommender behind the HTTP edge: checkpoint + item index -> ranked items. No FastAPI.

`Recommender.recommend_batch(queries)` serves a whole micro-batch (DESIGN §4):
  1. render every query's user prompt (one tokenizer call);
  2. split the queries: no-reasoning (h_T straight after the prompt, the paper's
     "w/o reasoning" mode), cache hits (reasoning supplied by the caller from the cache), and
     the rest, which need generation;
  3. ONE `generate` call for every distinct prompt that needs reasoning, with the largest
     budget in the batch; each query then keeps the first `max_reasoning_tokens` of its row.
     Greedy decoding is causal, so a row's first m tokens do not depend on how many come
     after: truncating is exactly what a run with budget m writes (EOS ends both the same
     way). One call instead of one per budget; the cost is the short-budget rows riding
     along until the longest finishes;
  4. ONE forward pass over [prompt; reasoning; closing marker] for every query gives all h_T;
  5. ONE index search (k = the batch's largest k) with per-query history exclusion.

Per-query problems (unknown item ids, empty history) come back as `QueryError` values in the
output list, so one bad query never fails its batch-mates. The model must only run on one
thread: the service calls `recommend_batch` and `upsert_item` from a single worker thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from index import IndexMismatchError, ItemIndex
from model.checkpoint import Checkpoint, load_checkpoint
from model.prompts import HistoryEntry, user_message
from model.r2ec import GenerationSettings
from model.samples import history_entries
from service.store import Event

log = logging.getLogger(__name__)

INDEX_DIR = "index"  # the item index lives in <checkpoint>/index/
ITEM_FIELDS = ("title", "year", "genres", "description")


class QueryError(ValueError):
    """A query that cannot be answered as asked (the client's mistake: HTTP 422)."""


class UnknownItemsError(QueryError):
    def __init__(self, item_ids: Sequence[str], where: str = "history") -> None:
        self.item_ids = list(item_ids)
        shown = ", ".join(repr(i) for i in self.item_ids[:20])
        more = f" and {len(self.item_ids) - 20} more" if len(self.item_ids) > 20 else ""
        super().__init__(f"unknown item ids in {where}: {shown}{more}")


class EmptyHistoryError(QueryError):
    def __init__(
        self,
        message: str = "history is empty: send `history` or a user_id with stored "
        "events (POST /users/{user_id}/events)",
    ) -> None:
        super().__init__(message)


@dataclass(frozen=True)
class CachedReasoning:
    """A reasoning as the cache holds it: token ids (so h_T is rebuilt exactly) and text."""

    completion_ids: tuple[int, ...]
    text: str

    def to_json(self) -> str:
        return json.dumps({"ids": list(self.completion_ids), "text": self.text})

    @classmethod
    def from_json(cls, raw: str) -> CachedReasoning:
        d = json.loads(raw)
        return cls(tuple(int(i) for i in d["ids"]), str(d["text"]))


@dataclass(frozen=True)
class Query:
    """One /recommend request after the HTTP edge: the history is final (inline or stored)."""

    history: tuple[Event, ...]
    k: int = 10
    exclude_history: bool = True
    reasoning: bool = True
    max_reasoning_tokens: int = 64
    cache_key: str | None = None  # the key `cached` was read under
    cached: CachedReasoning | None = None
    submitted_at: float = field(default_factory=time.perf_counter)

    @property
    def wants_reasoning(self) -> bool:
        return self.reasoning and self.max_reasoning_tokens > 0


@dataclass(frozen=True)
class ScoredItem:
    item_id: str
    title: str
    score: float  # cos(h_T, h_v) / tau
    rank: int  # 1-based


@dataclass(frozen=True)
class Timings:
    queue_ms: float
    generate_ms: float  # the batch's generate call (0 when nothing was generated)
    score_ms: float  # the batch's h_T forward pass + index search
    total_ms: float


@dataclass(frozen=True)
class Result:
    items: tuple[ScoredItem, ...]
    reasoning: str | None  # None when reasoning was off
    model_version: str
    timings: Timings
    reasoning_tokens: int
    cache: str  # "hit", "miss" (generated here) or "off" (no reasoning)
    cache_key: str | None = None
    generated: CachedReasoning | None = None  # new reasoning the caller may cache


class Recommender:
    """A loaded checkpoint, its item index and an editable catalog, under one model version."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        index: ItemIndex,
        *,
        persist_edits: bool = True,
        catalog_edits: Mapping[str, dict[str, str] | None] | None = None,
    ) -> None:
        if index.dim != checkpoint.model.hidden_size:
            raise IndexMismatchError(
                f"index dim {index.dim} != model hidden size {checkpoint.model.hidden_size}"
            )
        self.checkpoint = checkpoint
        self.model = checkpoint.model
        self.index = index
        self.version = checkpoint.version
        self.persist_edits = persist_edits
        self._catalog: dict[str, dict[str, str]] = {
            str(row["item_id"]): _clean_item(row) for row in checkpoint.items.to_dict("records")
        }
        self._edits: dict[str, dict[str, str] | None] = dict(catalog_edits or {})
        _apply_edits(self._catalog, self._edits)
        self._lock = threading.Lock()  # catalog edits vs. batch reads of titles
        self.generate_calls = 0  # `generate` invocations, for tests and metrics

    # ---------------------------------------------------------------- construction
    @classmethod
    def load(
        cls,
        path: Path | str,
        *,
        dtype: str = "bfloat16",
        threads: int | None = None,
        index_kind: str = "flat",
        index_nprobe: int | None = None,
        index_ef_search: int | None = None,
        persist_edits: bool = True,
    ) -> Recommender:
        """Load a checkpoint and open its index (load <ckpt>/index/ if it matches, else build
        it from the checkpoint's item vectors and save it there)."""
        start = time.perf_counter()
        ckpt = load_checkpoint(path, dtype=dtype, num_threads=threads)
        index, edits = open_index(ckpt, index_kind)
        index.set_search_params(nprobe=index_nprobe, ef_search=index_ef_search)
        engine = cls(ckpt, index, persist_edits=persist_edits, catalog_edits=edits)
        log.info(
            "loaded model %s from %s: %d items, %s index, %.1fs",
            engine.version,
            path,
            len(index),
            index.kind,
            time.perf_counter() - start,
        )
        return engine

    # ---------------------------------------------------------------- catalog
    def __len__(self) -> int:
        return len(self._catalog)

    def item(self, item_id: str) -> dict[str, str] | None:
        found = self._catalog.get(str(item_id))
        return None if found is None else {"item_id": str(item_id), **found}

    def unknown_items(self, item_ids: Iterable[str]) -> list[str]:
        """Ids not in the catalog, in first-seen order, without repeats."""
        return list(dict.fromkeys(i for i in item_ids if i not in self._catalog))

    def encode_item(self, item: Mapping[str, Any]) -> np.ndarray:
        """h_v (H,) float32 for an item dict (title + optional year/genres/description)."""
        with torch.no_grad():
            return self.model.item_vectors([dict(item)]).numpy()[0]

    def upsert_item(self, item_id: str, fields: Mapping[str, Any]) -> bool:
        """Encode the item's text, add or replace it in index + catalog; True if it replaced."""
        record = _clean_item(fields)
        vector = self.encode_item({"item_id": item_id, **record})  # (H,)
        with self._lock:
            replaced = self.index.upsert(item_id, vector)
            self._catalog[item_id] = record
            self._edits[item_id] = record
        self._persist()
        return replaced

    def remove_item(self, item_id: str) -> None:
        """Drop an item from index + catalog; KeyError if unknown."""
        with self._lock:
            if item_id not in self._catalog:
                raise KeyError(item_id)
            if item_id in self.index:
                self.index.remove(item_id)
            del self._catalog[item_id]
            self._edits[item_id] = None
        self._persist()

    @property
    def edits(self) -> dict[str, dict[str, str] | None]:
        """Item edits made through the admin API on top of the checkpoint's catalog (None = deleted)."""
        with self._lock:
            return dict(self._edits)

    def carry_edits(self, edits: Mapping[str, dict[str, str] | None]) -> int:
        """Re-apply another engine's item edits here (after a reload): changed items are
        re-encoded with this model in one batch. Returns how many edits changed something."""
        upserts = {i: r for i, r in edits.items() if r is not None and self._catalog.get(i) != r}
        deletes = [i for i, r in edits.items() if r is None and i in self._catalog]
        if not upserts and not deletes:
            return 0
        vectors = (
            self.model.item_vectors([{"item_id": i, **r} for i, r in upserts.items()]).numpy()
            if upserts
            else None
        )  # (len(upserts), H)
        with self._lock:
            for row, (item_id, record) in enumerate(upserts.items()):
                self.index.upsert(item_id, vectors[row])
                self._catalog[item_id] = record
                self._edits[item_id] = record
            for item_id in deletes:
                if item_id in self.index:
                    self.index.remove(item_id)
                self._catalog.pop(item_id, None)
                self._edits[item_id] = None
        self._persist()
        return len(upserts) + len(deletes)

    def _persist(self) -> None:
        """Save the edited index (with the edits, so a restart sees them) beside the checkpoint."""
        if not self.persist_edits:
            return
        try:
            self.index.save(self.checkpoint.path / INDEX_DIR, self._index_metadata())
        except OSError as exc:  # a read-only checkpoint volume still serves the edit
            log.warning("item edit applied in memory but not saved: %s", exc)

    def _index_metadata(self) -> dict[str, Any]:
        return index_metadata(
            self.version, self.index.metadata.get("index_kind", self.index.kind), self._edits
        )

    # ---------------------------------------------------------------- prompts and keys
    def _entries(self, history: Sequence[Event]) -> list[HistoryEntry]:
        if not history:
            raise EmptyHistoryError()
        titles = {e.item_id: t["title"] for e in history if (t := self._catalog.get(e.item_id))}
        unknown = self.unknown_items(e.item_id for e in history)
        if unknown:
            raise UnknownItemsError(unknown)
        return history_entries(
            [e.item_id for e in history],
            [float("nan") if e.rating is None else e.rating for e in history],
            [e.timestamp for e in history] if all(e.timestamp is not None for e in history) else None,
            titles,
        )

    def prompt_text(self, history: Sequence[Event]) -> str:
        return self.model.render_message(user_message(self._entries(history), self.model.prompts))

    def cache_key(self, query: Query) -> str | None:
        """sha256 of (model version, rendered prompt = the history window, generation settings);
        None when the query does not reason. Raises QueryError for a bad history."""
        if not query.wants_reasoning:
            return None
        return self._key(self.prompt_text(query.history), query.max_reasoning_tokens)

    def _key(self, prompt: str, budget: int) -> str:
        material = json.dumps([self.version, prompt, budget, "greedy"])
        return hashlib.sha256(material.encode()).hexdigest()

    # ---------------------------------------------------------------- the batch
    def recommend_batch(self, queries: Sequence[Query]) -> list[Result | QueryError]:
        """Answer a micro-batch; output i belongs to query i (a Result or a QueryError)."""
        start = time.perf_counter()
        out: list[Result | QueryError | None] = [None] * len(queries)
        ok: list[int] = []
        prompts: list[str] = []
        keys: list[str | None] = []
        for i, q in enumerate(queries):
            try:
                prompt = self.prompt_text(q.history)
            except QueryError as exc:
                out[i] = exc
                continue
            ok.append(i)
            prompts.append(prompt)
            keys.append(self._key(prompt, q.max_reasoning_tokens) if q.wants_reasoning else None)
        if not ok:
            return out  # type: ignore[return-value]
        # one tokenizer call for the batch; the chat template already holds the special tokens
        prompt_ids = self.model.tokenizer(prompts, add_special_tokens=False)["input_ids"]

        # split: off / cache hit / needs generation (deduplicated by prompt)
        completions: list[tuple[int, ...]] = [()] * len(ok)
        texts: list[str | None] = [None] * len(ok)
        status = ["off"] * len(ok)
        todo: dict[str, list[int]] = {}  # prompt -> positions in `ok`
        for j, i in enumerate(ok):
            q = queries[i]
            if not q.wants_reasoning:
                texts[j] = "" if q.reasoning else None
                continue
            if q.cached is not None and q.cache_key == keys[j]:
                completions[j], texts[j], status[j] = q.cached.completion_ids, q.cached.text, "hit"
                continue
            status[j] = "miss"
            todo.setdefault(prompts[j], []).append(j)

        generate_ms = 0.0
        if todo:
            t = time.perf_counter()
            rows = [positions[0] for positions in todo.values()]
            budget = max(queries[ok[j]].max_reasoning_tokens for js in todo.values() for j in js)
            rollout = self.model.reason_from_ids(
                [prompt_ids[j] for j in rows], GenerationSettings(max_new_tokens=budget)
            )
            self.generate_calls += 1
            generate_ms = (time.perf_counter() - t) * 1e3
            for row, positions in enumerate(todo.values()):
                full = rollout.completion_ids[row]
                for j in positions:
                    m = queries[ok[j]].max_reasoning_tokens
                    completions[j] = tuple(full[:m])
                    texts[j] = rollout.texts[row] if len(full) <= m else self._decode(full[:m])

        t = time.perf_counter()
        with torch.no_grad():
            vectors = (
                self.model.user_vectors_from_ids(prompt_ids, [list(c) for c in completions]).cpu().numpy()
            )  # (B, H) float32, normalised
        k_max = max(queries[i].k for i in ok)
        exclude = [
            {e.item_id for e in queries[i].history} if queries[i].exclude_history else set() for i in ok
        ]
        with self._lock:
            ids, cos = self.index.search(vectors, k_max, exclude=exclude)  # (B, K)
            titles = [[self._catalog[x]["title"] for x in row] for row in ids]
        score_ms = (time.perf_counter() - t) * 1e3
        done = time.perf_counter()
        for j, i in enumerate(ok):
            q = queries[i]
            n = min(q.k, len(ids[j]))
            items = tuple(
                ScoredItem(ids[j][r], titles[j][r], float(cos[j, r]) / self.model.tau, r + 1)
                for r in range(n)
            )
            generated = CachedReasoning(completions[j], texts[j] or "") if status[j] == "miss" else None
            out[i] = Result(
                items=items,
                reasoning=texts[j],
                model_version=self.version,
                timings=Timings(
                    queue_ms=max(0.0, (start - q.submitted_at) * 1e3),
                    generate_ms=generate_ms,
                    score_ms=score_ms,
                    total_ms=(done - q.submitted_at) * 1e3,
                ),
                reasoning_tokens=len(completions[j]),
                cache=status[j],
                cache_key=keys[j],
                generated=generated,
            )
        return out  # type: ignore[return-value]

    def _decode(self, ids: Sequence[int]) -> str:
        return self.model.tokenizer.decode(list(ids), skip_special_tokens=True).strip()


# -------------------------------------------------------------------- the index on disk
def index_metadata(version: str, kind: str, edits: Mapping[str, Any]) -> dict[str, Any]:
    """What <ckpt>/index/index.json records: whose vectors, which kind was asked for, and the
    catalog edits (PUT/DELETE /items) since the checkpoint was written."""
    return {"model_version": version, "index_kind": kind, "catalog_edits": dict(edits)}


def open_index(ckpt: Checkpoint, kind: str) -> tuple[ItemIndex, dict[str, Any]]:
    """Load <ckpt>/index/ when it was built for this model version and kind and agrees with the
    catalog; otherwise build it from the checkpoint's item vectors and save it (best effort)."""
    directory = ckpt.path / INDEX_DIR
    if (directory / "index.json").is_file():
        try:
            index = ItemIndex.load(
                directory,
                expect_dim=ckpt.model.hidden_size,
                expect_metadata={"model_version": ckpt.version, "index_kind": kind},
            )
            edits = dict(index.metadata.get("catalog_edits") or {})
            catalog = {str(i): {} for i in ckpt.items["item_id"]}
            _apply_edits(catalog, edits)
            if set(catalog) == set(index.item_ids()):
                return index, edits
            log.warning("index in %s disagrees with the catalog: rebuilding", directory)
        except (IndexMismatchError, ValueError, OSError, RuntimeError) as exc:
            log.warning("not using the index in %s (%s): rebuilding", directory, exc)
    index = ItemIndex.build([str(i) for i in ckpt.items["item_id"]], ckpt.item_vectors, kind=kind)
    try:
        index.save(directory, index_metadata(ckpt.version, kind, {}))
    except OSError as exc:
        log.warning("could not save the index to %s (%s); serving it from memory", directory, exc)
    return index, {}


def _apply_edits(catalog: dict[str, Any], edits: Mapping[str, Any]) -> None:
    for item_id, record in edits.items():
        if record is None:
            catalog.pop(item_id, None)
        else:
            catalog[item_id] = record


def _clean_item(row: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for key in ITEM_FIELDS:
        value = row.get(key)
        if value is None or (isinstance(value, float) and value != value):
            value = ""
        out[key] = str(value)
    return out
