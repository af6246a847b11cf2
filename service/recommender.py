"""Batch inference: a checkpoint + its catalog -> ranked items for a micro-batch of queries.

`Recommender.prepare(query)` does a request's own work once, before its batch: check the history
against the catalog, render the user prompt, hash the reasoning-cache key. The service reads the
cache with that key, then hands the `PreparedQuery` to the batch.

`Recommender.recommend_batch(queries)` serves a whole micro-batch (docs/architecture.md §4):
  1. tokenize every query's prompt (one tokenizer call);
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

A query that streams (`PreparedQuery.on_text`) gets its whole reasoning text in one call as
soon as it is known, between steps 3 and 4: this path generates the batch at once, so there is
nothing finer to hand out.

Per-query problems (unknown item ids, empty history) come back as `QueryError` values in the
output list, so one bad query never fails its batch-mates. The model must only run on one
thread: the service calls `recommend_batch` and the catalog's edits from a single worker thread.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from model.checkpoint import Checkpoint, load_checkpoint
from model.prompts import user_message
from model.r2ec import GenerationSettings
from model.samples import history_entries
from service.catalog import Catalog
from service.types import (
    CachedReasoning,
    EmptyHistoryError,
    PreparedQuery,
    Query,
    QueryError,
    Result,
    ScoredItem,
    Timings,
    UnknownItemsError,
)

log = logging.getLogger(__name__)


class Recommender:
    """A loaded checkpoint and its catalog, under one model version."""

    def __init__(self, checkpoint: Checkpoint, catalog: Catalog) -> None:
        self.checkpoint = checkpoint
        self.model = checkpoint.model
        self.catalog = catalog
        self.version = checkpoint.version
        self.generate_calls = 0  # `generate` invocations, for tests and metrics

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
        """Load a checkpoint and open its catalog (load <ckpt>/index/ if it matches, else build
        it from the checkpoint's item vectors and save it there)."""
        start = time.perf_counter()
        ckpt = load_checkpoint(path, dtype=dtype, num_threads=threads)
        catalog = Catalog.open(
            ckpt, kind=index_kind, nprobe=index_nprobe, ef_search=index_ef_search, persist_edits=persist_edits
        )
        engine = cls(ckpt, catalog)
        log.info(
            "loaded model %s from %s: %d items, %s index, %.1fs",
            engine.version,
            path,
            len(catalog.index),
            catalog.index.kind,
            time.perf_counter() - start,
        )
        return engine

    # ---------------------------------------------------------------- one query
    def prepare(self, query: Query) -> PreparedQuery:
        """Check the history against the catalog, render the user prompt and hash the cache key,
        once per request. Raises UnknownItemsError (naming every unknown id) for a history the
        client sent; a stored history drops items deleted since they were recorded instead.
        Raises EmptyHistoryError when no item is left."""
        titles, unknown = self.catalog.lookup(e.item_id for e in query.history)
        if unknown:
            if query.stored_user is None:
                raise UnknownItemsError(unknown)
            known = tuple(e for e in query.history if e.item_id in titles)
            log.info(
                "user %s: %d stored items no longer in the catalog",
                query.stored_user,
                len(query.history) - len(known),
            )
            query = dataclasses.replace(query, history=known)
        history = query.history
        if not history:
            raise EmptyHistoryError(query.stored_user)
        entries = history_entries(
            [e.item_id for e in history],
            [float("nan") if e.rating is None else e.rating for e in history],
            [e.timestamp for e in history] if all(e.timestamp is not None for e in history) else None,
            titles,
        )
        prompt = self.model.render_message(user_message(entries, self.model.prompts))
        key = self._key(prompt, query.max_reasoning_tokens) if query.wants_reasoning else None
        return PreparedQuery(query=query, model_version=self.version, prompt=prompt, cache_key=key)

    def _key(self, prompt: str, budget: int) -> str:
        """sha256 of (model version, rendered prompt = the history window, generation settings)."""
        material = json.dumps([self.version, prompt, budget, "greedy"])
        return hashlib.sha256(material.encode()).hexdigest()

    def _ready(self, query: Query | PreparedQuery) -> PreparedQuery:
        """A query prepared for this model. One prepared for another version (a reload landed
        between the cache lookup and this batch) is prepared again: its prompt, key and cached
        reasoning belong to the old model."""
        if isinstance(query, PreparedQuery):
            if query.model_version == self.version:
                return query
            return dataclasses.replace(self.prepare(query.query), on_text=query.on_text)
        return self.prepare(query)

    # ---------------------------------------------------------------- the batch
    def recommend_batch(self, queries: Sequence[Query | PreparedQuery]) -> list[Result | QueryError]:
        """Answer a micro-batch; output i belongs to query i (a Result or a QueryError)."""
        start = time.perf_counter()
        out: list[Result | QueryError | None] = [None] * len(queries)
        ok: list[int] = []
        ready: list[PreparedQuery] = []
        for i, q in enumerate(queries):
            try:
                ready.append(self._ready(q))
            except QueryError as exc:
                out[i] = exc
                continue
            ok.append(i)
        if not ok:
            return out  # type: ignore[return-value]
        asked = [p.query for p in ready]
        # one tokenizer call for the batch; the chat template already holds the special tokens
        prompt_ids = self.model.tokenizer([p.prompt for p in ready], add_special_tokens=False)["input_ids"]

        # split: off / cache hit / needs generation (deduplicated by prompt)
        completions: list[tuple[int, ...]] = [()] * len(ok)
        texts: list[str | None] = [None] * len(ok)
        status = ["off"] * len(ok)
        todo: dict[str, list[int]] = {}  # prompt -> positions in `ok`
        for j, p in enumerate(ready):
            if not p.query.wants_reasoning:
                texts[j] = "" if p.query.reasoning else None
                continue
            if p.cached is not None:  # read under p.cache_key, which names this model version
                completions[j], texts[j], status[j] = p.cached.completion_ids, p.cached.text, "hit"
                continue
            status[j] = "miss"
            todo.setdefault(p.prompt, []).append(j)

        generate_ms = 0.0
        if todo:
            t = time.perf_counter()
            rows = [positions[0] for positions in todo.values()]
            budget = max(asked[j].max_reasoning_tokens for js in todo.values() for j in js)
            rollout = self.model.reason_from_ids(
                [prompt_ids[j] for j in rows], GenerationSettings(max_new_tokens=budget)
            )
            self.generate_calls += 1
            generate_ms = (time.perf_counter() - t) * 1e3
            for row, positions in enumerate(todo.values()):
                full = rollout.completion_ids[row]
                for j in positions:
                    m = asked[j].max_reasoning_tokens
                    completions[j] = tuple(full[:m])
                    texts[j] = rollout.texts[row] if len(full) <= m else self._decode(full[:m])

        # Streaming: each query's reasoning is known now (generated or cached), before scoring.
        for j, p in enumerate(ready):
            if p.on_text is not None and texts[j]:
                self._notify(p.on_text, texts[j])

        t = time.perf_counter()
        with torch.no_grad():
            vectors = (
                self.model.user_vectors_from_ids(prompt_ids, [list(c) for c in completions]).cpu().numpy()
            )  # (B, H) float32, normalised
        k_max = max(q.k for q in asked)
        # exclude_history: the history's items and every other item the user has an event for
        exclude = [
            {e.item_id for e in q.history} | q.exclude_items if q.exclude_history else set() for q in asked
        ]
        ids, cos, titles = self.catalog.search(vectors, k_max, exclude)  # (B, K)
        score_ms = (time.perf_counter() - t) * 1e3
        done = time.perf_counter()
        for j, i in enumerate(ok):
            q = asked[j]
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
                cache_key=ready[j].cache_key,
                generated=generated,
            )
        return out  # type: ignore[return-value]

    @staticmethod
    def _notify(on_text: Callable[[str], None], text: str) -> None:
        """Hand a reasoning piece to the query's stream. A broken callback (a client gone, a
        closed loop) costs that stream its text, never the batch its answers."""
        try:
            on_text(text)
        except Exception:
            log.exception("on_text callback failed; the batch goes on")

    def _decode(self, ids: Sequence[int]) -> str:
        return self.model.tokenizer.decode(list(ids), skip_special_tokens=True).strip()
