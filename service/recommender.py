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
  4. ONE `vectors` call over [prompt; reasoning; closing marker] gives h_T for every query
     whose cache entry did not carry it and whose generation did not (the engine reads h_T off
     its KV cache as a text ends; with `prefill_batch_tokens` (R2EC_PREFILL_BATCH_TOKENS) the
     queries without reasoning are prefilled together, in forwards of up to that many
     positions, `DecoderEngine.prefill_many`; by default each is a prefill of its own);
  5. ONE index search (k = the batch's largest k) with per-query history exclusion (`_answer`).

`Recommender.answer_cached(prepared)` answers a cache hit whose entry carries h_T: step 5 alone,
through the same `_answer`, without the batch (service/state.py).

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
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from model import omp_policy_warning
from model.checkpoint import CURRENT_FILE, Checkpoint, CheckpointError, list_versions, load_checkpoint
from model.engine import Quantize
from model.generation import BackendName, EngineBackend, Sequence_, make_backend
from model.r2ec import GenerationSettings, reasoning_text
from model.rationale import ItemFacts
from model.samples import history_entries
from service.catalog import Catalog
from service.continuous import Running
from service.store import Event
from service.types import (
    CachedReasoning,
    EmptyHistoryError,
    HistoryEntry,
    InvalidQueryError,
    PreparedQuery,
    Query,
    QueryError,
    Result,
    ScoredItem,
    Timings,
    UnknownItemsError,
    as_item_id,
    as_item_ids,
    whole,
)

log = logging.getLogger(__name__)

# First in every reasoning cache key (`Recommender._key`): changed where no entry cached before may
# be read again. "cache-2" since 0.2.0: a release before it indexed its entries by user only from
# the erasure's commit on (service/store.py USER_CACHE_KEY), so an erasure cannot find the rest,
# and some of them (held-claims-6, from f3031b5) had this code's keys, so they were served.
# "cache-3": keys name the model's fingerprint (`Recommender.fingerprint`), not only its version;
# a cache-2 entry may hold another model's answer under the same version (journey 40, F3)
CACHE_FORMAT = "cache-3"
FINGERPRINT_HEX = 16  # hex digits of `Recommender.fingerprint` (64 bits)


class Recommender:
    """A loaded checkpoint and its catalog, under one model version."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        catalog: Catalog,
        *,
        backend: BackendName = "engine",
        slots: int = 8,
        quantize: Quantize = "none",
        constrain_titles: bool = True,
        exact_decode: bool = False,
        speculative_tokens: int = 8,
        prefill_batch_tokens: int = 0,
    ) -> None:
        self.checkpoint = checkpoint
        self.model = checkpoint.model
        self.catalog = catalog
        self.version = checkpoint.version
        # how reasoning is written and h_T read (model/generation.py): the lean decoder with h_T
        # from its KV cache, or transformers' generate + a second forward (the reference)
        self.backend = make_backend(
            self.model,
            backend,
            slots=slots,
            quantize=quantize,
            exact=exact_decode,
            speculative_tokens=speculative_tokens,
            prefill_tokens=prefill_batch_tokens,
        )
        self.constrain_titles = constrain_titles  # model/constrained.py
        if constrain_titles:  # built here, at load, not on the event loop by the first request
            self.model.token_strings()
        # what decides this model's answers beyond its files (`fingerprint`)
        engine = self.backend.engine if isinstance(self.backend, EngineBackend) else None
        drafter = self.backend.drafter
        self.serving: dict[str, Any] = {
            "dtype": str(self.model.lm.dtype).removeprefix("torch."),
            "device": self.model.device.type,
            "backend": self.backend.name,
            "quantize": engine.quantize if engine is not None else "none",
            "exact_decode": engine.exact if engine is not None else None,
            "speculative_tokens": drafter.tokens if drafter is not None else 0,
            "constrain_titles": constrain_titles,
        }
        material = json.dumps([checkpoint.digest or self.version, self.serving], sort_keys=True)
        # The model's identity, in short hex: a hash of its checkpoint's files (r2ec.json, the
        # weights, the tokenizer, the co-watch table and the backbone's name: model/checkpoint.py
        # `model_digest`) and of the serving settings that change what it writes or where h_T
        # lands (`serving`: dtype, device kind, backend, int8 weights, exact decode, speculative
        # drafts, the claims' grammar). Two replicas of one arm share it wherever their copies
        # of the checkpoint lie; a copy with one weight or prompt setting changed, or the same
        # checkpoint in float32 beside bfloat16, does not. The reasoning cache is keyed on it
        # (`_key`), and each answer names it (service/routes.py).
        self.fingerprint = hashlib.sha256(material.encode()).hexdigest()[:FINGERPRINT_HEX]
        self.generate_calls = 0  # `generate` invocations, for tests and metrics
        # how answers name the checkpoint (Result.checkpoint): its directory's name; the service
        # names it as r2ec_model_info does, from the checkpoint root (service/state.py `_adopt`)
        self.label = checkpoint.path.name
        self._runner: DecodeRunner | None = None

    @classmethod
    def load(
        cls,
        path: Path | str,
        *,
        dtype: str = "bfloat16",
        threads: int | None = None,
        device: str = "cpu",
        index_kind: str = "flat",
        index_nprobe: int | None = None,
        index_ef_search: int | None = None,
        persist_edits: bool = True,
        backend: BackendName = "engine",
        slots: int = 8,
        quantize: Quantize = "none",
        constrain_titles: bool = True,
        exact_decode: bool = False,
        speculative_tokens: int = 8,
        warmup_requests: int = 0,
        prefill_batch_tokens: int = 0,
        allow_backbone_mismatch: bool | None = None,
    ) -> Recommender:
        """Load a checkpoint onto `device` (R2EC_DEVICE) and open its catalog (load
        <ckpt>/index/ if it matches, else build it from the checkpoint's item vectors and save it
        there). Only the model moves: item vectors and the FAISS index stay on the CPU.
        `warmup_requests`: made-up queries answered before it serves (`warm_up`).
        `allow_backbone_mismatch`: serve it over a backbone other than the one its r2ec.json
        records (R2EC_ALLOW_BACKBONE_MISMATCH; model/backbone_digest.py), refused otherwise.

        These defaults are not `r2ec serve`'s (16 decode slots, 2 warm-up queries): the service
        passes every argument from its Settings (`Settings.load_kwargs`). From Python, load
        with `service.load(path)`, which does the same with serve's defaults; in bf16 the
        warm-up's texts change how later reasoning is drafted, and so the last bits of scores
        (README, "Use the model from Python").

        Logs a WARNING where torch (OpenMP) was loaded before `model` with no OMP_WAIT_POLICY
        set, so the PASSIVE default of model/__init__.py could not take effect."""
        start = time.perf_counter()
        if (late := omp_policy_warning()) is not None:
            log.warning("%s", late)
        ckpt = load_checkpoint(
            path,
            dtype=dtype,
            num_threads=threads,
            device=device,
            allow_backbone_mismatch=allow_backbone_mismatch,
        )
        catalog = Catalog.open(
            ckpt, kind=index_kind, nprobe=index_nprobe, ef_search=index_ef_search, persist_edits=persist_edits
        )
        engine = cls(
            ckpt,
            catalog,
            backend=backend,
            slots=slots,
            quantize=quantize,
            constrain_titles=constrain_titles,
            exact_decode=exact_decode,
            speculative_tokens=speculative_tokens,
            prefill_batch_tokens=prefill_batch_tokens,
        )
        log.info(
            "loaded model %s (fingerprint %s) from %s on %s (%s backend): %d items, %s index, %.1fs",
            engine.version,
            engine.fingerprint,
            path,
            engine.model.device,
            engine.backend.name,
            len(catalog.index),
            catalog.index.kind,
            time.perf_counter() - start,
        )
        engine.check()
        engine.warm_up(warmup_requests)
        return engine

    @classmethod
    def load_or_fall_back(cls, path: Path | str, **kwargs: Any) -> Recommender:
        """`load` for a replica's start. Where `path` is a versions root whose CURRENT version
        fails to load or to answer (`check`), its newest other version that does serves
        instead, with an ERROR naming both: the checkpoint watch keeps trying the one CURRENT
        names (r2ec_model_outdated is 1 meanwhile), as a running replica keeps its model when
        the pointer moves to a damaged one. So a replica restarted while CURRENT is damaged (a
        deploy, a drained node) still serves, rather than the whole fleet going down with it.
        Older versions are tried first, newest first: one newer than CURRENT's may be what an
        operator rolled back from."""
        try:
            return cls.load(path, **kwargs)
        except Exception as exc:
            root = Path(path)
            if not (root / CURRENT_FILE).is_file():
                raise
            named = (root / CURRENT_FILE).read_text(encoding="utf-8", errors="replace").strip()
            versions = [v for v in list_versions(root) if v != named]  # oldest first
            # the versions before the named one, newest first, then those after it: a newer one
            # may be what an operator rolled back from (version ids sort by their time)
            older, newer = [v for v in versions if v < named], [v for v in versions if v > named]
            for version in [*reversed(older), *newer]:
                try:
                    engine = cls.load(root / version, **kwargs)
                except Exception as other:
                    log.warning("version %s does not load either: %s", version, other)
                    continue
                log.error(
                    "%s names %r, which does not load (%s); serving %s, the newest older version "
                    "that does (or, with none, the oldest newer one), until it does",
                    root / CURRENT_FILE,
                    named,
                    exc,
                    version,
                )
                return engine
            raise

    def check(self) -> None:
        """One made-up query without reasoning through the whole path (prompt, forward, h_T, the
        index search) before the model serves, at a start or a reload: a model that cannot
        answer it (weights that load but hold NaN, damaged bytes safetensors cannot tell) is
        refused with CheckpointError, so a reload keeps the model serving and a start fails
        with one line, rather than a ready replica answering every request with a 500."""
        first = next(iter(self.catalog.titles), None)
        if first is None:  # no items: nothing to rank, nothing to check
            return
        try:
            (answer,) = self.recommend_batch([Query(history=(Event(item_id=first),), k=1, reasoning=False)])
        except Exception as exc:  # the batch itself failed
            answer = exc
        finally:
            self.generate_calls = 0
        if isinstance(answer, Exception):
            raise CheckpointError(
                f"model {self.version} loads but cannot answer a query: {type(answer).__name__}: {answer}"
            ) from answer

    def warm_up(self, requests: int) -> None:
        """Answer `requests` made-up reasoning queries before serving (R2EC_WARMUP_REQUESTS), so
        the first real request meets kernels already set up and a speculative drafter with
        texts to draft from (model/speculative.py): without them a first request took 1.3 s
        where later ones take ~0.7 (README). Each query is 3 of the catalog's items; nothing is
        stored or cached, `generate_calls` stays 0, and a failure is logged, not raised (`check`
        has refused a model that cannot answer at all)."""
        if requests < 1:
            return
        start = time.perf_counter()
        ids = list(itertools.islice(self.catalog.titles, 3 * requests))
        queries = [
            Query(history=tuple(Event(item_id=i, rating=5.0) for i in ids[j : j + 3]))
            for j in range(0, len(ids), 3)
        ]
        try:
            failed = [r for r in self.recommend_batch(queries) if isinstance(r, Exception)]
        except Exception:
            log.exception("warm-up of model %s failed; serving anyway", self.version)
            return
        finally:
            self.generate_calls = 0
        if failed:
            log.warning(
                "warm-up of model %s: %d of %d queries failed: %s",
                self.version,
                len(failed),
                len(queries),
                failed[0],
            )
        drafter = self.backend.drafter
        log.info(
            "warmed up model %s with %d queries in %.1fs (%d texts to draft from)",
            self.version,
            len(queries),
            time.perf_counter() - start,
            0 if drafter is None else len(drafter),
        )

    # ---------------------------------------------------------------- one query
    def prepare(self, query: Query) -> PreparedQuery:
        """Check the history against the catalog, render the user prompt and hash the cache key,
        once per request. Raises UnknownItemsError (naming every unknown id) for a history the
        client sent; a stored history drops items deleted since they were recorded instead.
        Raises EmptyHistoryError when no item is left, and UnknownItemsError for candidates the
        catalog does not hold (a candidate deleted after this check is not ranked)."""
        if query.candidates is not None:
            unknown = self.catalog.unknown(sorted(query.candidates))
            if unknown:
                raise UnknownItemsError(unknown, where="candidates")
        titles, unknown = self.catalog.lookup(e.item_id for e in query.history)
        if unknown:
            if query.stored_user is None:
                raise UnknownItemsError(unknown)
            known = tuple(e for e in query.history if e.item_id in titles)
            # no user id in the line: logs outlive a user's erasure
            log.info("a stored history: %d items no longer in the catalog", len(query.history) - len(known))
            query = dataclasses.replace(query, history=known)
        history = query.history
        if not history:
            raise EmptyHistoryError(query.stored_user, all_deleted=bool(unknown))
        entries = history_entries(
            [e.item_id for e in history],
            [float("nan") if e.rating is None else e.rating for e in history],
            [e.timestamp for e in history] if all(e.timestamp is not None for e in history) else None,
            titles,
            # ages, shown when the model's prompts include time; counted to the hour, so such a
            # prompt (and its cached reasoning) stays the same for up to an hour
            now=int(time.time()) // 3600 * 3600,
        )
        # the co-watch titles are looked up once, so the prompt and the grammar of its "Picks:"
        # list name the same ones even if a catalog edit lands in between
        hints = self.model.hint_titles(entries, catalog=self.catalog.titles)
        prompt = self.model.user_prompt(entries, hints=hints)
        if not query.wants_reasoning:  # one prefill: tokenized here, so the batcher can count it
            return PreparedQuery(
                query=query,
                model_version=self.version,
                prompt=prompt,
                cache_key=None,
                fingerprint=self.fingerprint,
                prompt_ids=tuple(self._tokens(prompt)),
            )
        constraint, grammar = None, "free"
        if self.constrain_titles:  # the genres and decade each history item has in the served catalog
            facts = [ItemFacts.from_row(self.catalog.item(str(e.item_id)) or {}) for e in entries]
            constraint = self.model.title_lists([entries], hints=[hints], facts=[facts])[0]
            # the prompt names titles, not genres or years: an edit of those changes the grammar,
            # not the prompt
            window = facts[-self.model.prompts.max_history :]
            grammar = json.dumps(["held-claims-6", [[f.genres, f.decade] for f in window]])
        return PreparedQuery(
            query=query,
            model_version=self.version,
            fingerprint=self.fingerprint,
            prompt=prompt,
            cache_key=self._key(prompt, query.max_reasoning_tokens, grammar),
            constraint=constraint,
            grammar=grammar,
        )

    def _key(self, prompt: str, budget: int, grammar: str) -> str:
        """sha256 of (model version and fingerprint, rendered prompt = the history window,
        generation settings,
        the grammar: what it constrains and the window's genres and decades it was built from),
        so reasoning cached under an older grammar or before a genre or year edit is not served
        under this one. Older grammars: until stop 29 the rated list could name any window
        title; until stop 30 the decades and the drift were free; until held-claims-3 a "Lately
        more" where nothing drifts or a "Likes" where no genre holds could be written outside
        the rated list; until held-claims-4 a title spelt in pieces of characters (CJK, emoji)
        was not held to the list, nor one holding "Rated highest:"; until held-claims-5 a genre
        rated below the history's mean could be "liked" and a title rated below it "rated
        highest", and an unrated history could have a rated list; until held-claims-6 a model
        taught the format could begin its text with anything (model/constrained.py
        `FormatStart`). `CACHE_FORMAT` leads: see there. The fingerprint keeps apart models that
        share a version string (a copied checkpoint with other weights) and one checkpoint served
        with settings that change its texts or h_T (bfloat16 and float32 arms on one Redis),
        each of which would otherwise serve the other's cached answers, items included."""
        model = [self.version, self.fingerprint]
        material = json.dumps([CACHE_FORMAT, *model, prompt, budget, "greedy", grammar])
        return hashlib.sha256(material.encode()).hexdigest()

    def prepared_here(self, prepared: PreparedQuery) -> bool:
        """Whether `prepared` was prepared by this model: its version and fingerprint (a reload
        of a copy with the same version and other weights is another model)."""
        return prepared.model_version == self.version and prepared.fingerprint == self.fingerprint

    def _ready(self, query: Query | PreparedQuery) -> PreparedQuery:
        """A query prepared for this model. One prepared for another (a reload landed between
        the cache lookup and this batch) is prepared again: its prompt, key and cached
        reasoning belong to the old model."""
        if not isinstance(query, Query | PreparedQuery):
            raise InvalidQueryError("query", f"must be a Query, got {type(query).__name__}")
        if isinstance(query, PreparedQuery):
            if self.prepared_here(query):
                return query
            again = self.prepare(query.query)
            return dataclasses.replace(again, on_text=query.on_text, queued_at=query.queued_at)
        return self.prepare(query)

    # ---------------------------------------------------------------- the batch
    def _ready_or_error(self, query: Query | PreparedQuery) -> PreparedQuery | QueryError:
        """`_ready`, with what the query itself is to blame for as a value: a QueryError, or a
        TypeError/ValueError from a query made past Query's own checks (as InvalidQueryError),
        so it fails that query alone, never its batch-mates."""
        try:
            return self._ready(query)
        except QueryError as exc:
            return exc
        except (TypeError, ValueError) as exc:
            log.warning("a query could not be prepared: %s: %s", type(exc).__name__, exc)
            error = InvalidQueryError("query", f"{type(exc).__name__}: {exc}")
            error.__cause__ = exc
            return error

    def recommend_batch(self, queries: Sequence[Query | PreparedQuery]) -> list[Result | QueryError]:
        """Answer a micro-batch; output i belongs to query i (a Result or a QueryError: an
        unknown item, an empty history, a query of the wrong type; never raised, so one bad
        query does not fail the others). Any number of queries: the engine backend decodes up
        to `slots` at once and starts the next as one ends. Reasoning is written for every
        query at once; h_T after it then costs no second pass, while a query without reasoning
        is one prefill of its own prompt, or with `prefill_batch_tokens` one row of a prefill
        shared with the batch's others."""
        start = time.perf_counter()
        out: list[Result | QueryError | None] = [None] * len(queries)
        ok: list[int] = []
        ready: list[PreparedQuery] = []
        for i, q in enumerate(queries):
            p = self._ready_or_error(q)
            if isinstance(p, QueryError):
                out[i] = p
                continue
            ready.append(p)
            ok.append(i)
        if not ok:
            return out  # type: ignore[return-value]
        asked = [p.query for p in ready]
        # one tokenizer call for the prompts `prepare` did not tokenize; the chat template already
        # holds the special tokens
        untokenized = [j for j, p in enumerate(ready) if not p.prompt_ids]
        prompt_ids = [list(p.prompt_ids) for p in ready]
        if untokenized:
            more = self.model.tokenizer([ready[j].prompt for j in untokenized], add_special_tokens=False)
            for j, ids in zip(untokenized, more["input_ids"], strict=True):
                prompt_ids[j] = ids

        # split: off / cache hit / needs generation (deduplicated by prompt)
        completions: list[tuple[int, ...]] = [()] * len(ok)
        texts: list[str | None] = [None] * len(ok)
        status = ["off"] * len(ok)
        todo: dict[str, list[int]] = {}  # prompt -> positions in `ok`
        for j, p in enumerate(ready):
            if not p.query.wants_reasoning:
                texts[j] = None  # no reasoning asked for, or a budget of 0 tokens: none written
                continue
            if p.cached is not None:  # read under p.cache_key, which names this model version
                completions[j], texts[j], status[j] = p.cached.completion_ids, p.cached.text, "hit"
                continue
            status[j] = "miss"
            todo.setdefault((p.prompt, p.grammar), []).append(j)  # one text per prompt and grammar

        generate_ms = 0.0
        have: dict[int, np.ndarray] = {}  # position -> h_T already known
        if todo:
            t = time.perf_counter()
            rows = [positions[0] for positions in todo.values()]
            budget = max(asked[j].max_reasoning_tokens for js in todo.values() for j in js)
            rollout, generated = self.backend.generate(
                [prompt_ids[j] for j in rows],
                GenerationSettings(max_new_tokens=budget),
                [ready[j].constraint for j in rows],
            )
            self.generate_calls += 1
            generate_ms = (time.perf_counter() - t) * 1e3
            for row, positions in enumerate(todo.values()):
                full = rollout.completion_ids[row]
                for j in positions:
                    m = asked[j].max_reasoning_tokens
                    completions[j] = tuple(full[:m])
                    texts[j] = rollout.texts[row] if len(full) <= m else self._decode(full[:m])
                    if len(full) <= m:  # h_T came with the generation (a truncated row needs its own)
                        have[j] = generated[row].numpy()

        # Streaming: each query's reasoning is known now (generated or cached), before scoring.
        for j, p in enumerate(ready):
            if p.on_text is not None and texts[j]:
                self._notify(p.on_text, texts[j])

        # h_T: a hit that carries its vector needs no forward pass (the service answers those
        # without a batch, ServiceState.recommend; a caller of this method may still send one)
        t = time.perf_counter()
        vectors = np.empty((len(ready), self.model.hidden_size), dtype=np.float32)  # (B, H)
        forward = []
        for j, p in enumerate(ready):
            if status[j] == "hit" and p.cached is not None and p.cached.vector is not None:
                vectors[j] = p.cached.vector
            elif j in have:
                vectors[j] = have[j]
            else:
                forward.append(j)
        if forward:
            vectors[forward] = self.backend.vectors(
                [prompt_ids[j] for j in forward], [list(completions[j]) for j in forward]
            ).numpy()  # normalised
        results = self._answer(
            ready,
            vectors,
            completions,
            texts,
            status,
            score_started=t,
            batch_started=start,
            generate_ms=generate_ms,
        )
        for i, result in zip(ok, results, strict=True):
            out[i] = result
        return out  # type: ignore[return-value]

    def answer_cached(self, prepared: PreparedQuery) -> Result:
        """A cache hit that carries its h_T (`prepared.cached.vector`): one index search, no
        model, so it may run off the model thread (the catalog's lock orders it with item
        edits). Same items, scores and reply as the batch gives that query, with no queue and
        no generation in its timings."""
        cached = prepared.cached
        if cached is None or cached.vector is None or not self.prepared_here(prepared):
            raise ValueError("answer_cached needs a cache hit with its vector, prepared by this model")
        if prepared.on_text is not None and cached.text:  # a stream gets the reasoning first
            self._notify(prepared.on_text, cached.text)
        start = time.perf_counter()
        vectors = np.asarray(cached.vector, dtype=np.float32)[None, :]  # (1, H)
        return self._answer(
            [prepared], vectors, [cached.completion_ids], [cached.text], ["hit"], score_started=start
        )[0]

    def _answer(
        self,
        ready: Sequence[PreparedQuery],
        vectors: np.ndarray,
        completions: Sequence[tuple[int, ...]],
        texts: Sequence[str | None],
        status: Sequence[str],
        *,
        score_started: float,
        batch_started: float | Sequence[float] | None = None,
        generate_ms: float | Sequence[float] = 0.0,
    ) -> list[Result]:
        """(B, H) user vectors -> one Result per query: ONE index search (k = the largest k, each
        row excluding its own history) and the replies. The batch and a cached h_T both end
        here, so the two paths cannot rank differently. `batch_started` is when the batch began
        (its queries' queue time ends there); None: no queue (a cached h_T). Continuous batching
        gives both per query (each joined the decode at its own time)."""
        asked = [p.query for p in ready]
        k_max = max(q.k for q in asked)
        # exclude_history: the history's items and every other item the user has an event for
        exclude = [
            ({e.item_id for e in q.history} | q.seen_items if q.exclude_history else set()) | q.exclude_items
            for q in asked
        ]
        only = [q.candidates for q in asked]
        ids, cos, titles = self.catalog.search(vectors, k_max, exclude, only)  # (B, K)
        stops = set(self.model.stop_ids)
        done = time.perf_counter()
        score_ms = (done - score_started) * 1e3
        results = []
        started = batch_started if isinstance(batch_started, Sequence) else [batch_started] * len(ready)
        gen_ms = generate_ms if isinstance(generate_ms, Sequence) else [generate_ms] * len(ready)
        for j, (p, q) in enumerate(zip(ready, asked, strict=True)):
            n = min(q.k, len(ids[j]))
            items = tuple(
                ScoredItem(ids[j][r], titles[j][r], float(cos[j, r]) / self.model.tau, r + 1)
                for r in range(n)
            )
            # to cache: a new reasoning, or a hit from an entry without h_T (now with it)
            fresh = status[j] == "miss" or (
                status[j] == "hit" and p.cached is not None and p.cached.vector is None
            )
            generated = CachedReasoning(completions[j], texts[j] or "", vectors[j].copy()) if fresh else None
            waited_from = q.submitted_at if p.queued_at is None else p.queued_at
            queue_ms = 0.0 if started[j] is None else max(0.0, (started[j] - waited_from) * 1e3)
            results.append(
                Result(
                    items=items,
                    reasoning=texts[j],
                    model_version=self.version,
                    fingerprint=self.fingerprint,
                    checkpoint=self.label,
                    timings=Timings(
                        queue_ms=queue_ms,
                        generate_ms=gen_ms[j],
                        score_ms=score_ms,
                        total_ms=(done - q.submitted_at) * 1e3,
                    ),
                    reasoning_tokens=len(completions[j]),
                    read_items=tuple(e.item_id for e in q.history[-self.model.prompts.max_history :]),
                    reasoning_cut=texts[j] is not None and not set(completions[j][-1:]) & stops,
                    cache=status[j],
                    cache_key=p.cache_key,
                    generated=generated,
                )
            )
        return results

    # ---------------------------------------------------------------- the Python API
    def recommend(
        self,
        history: Iterable[HistoryEntry],
        *,
        k: int = 10,
        reasoning: bool = True,
        max_reasoning_tokens: int = 64,
        exclude_history: bool = True,
        seen_items: Iterable[str] = (),
        exclude_items: Iterable[str] = (),
        candidates: Iterable[str] | None = None,
    ) -> Result:
        """One user's top-`k` items, through the service's own path (what POST /recommend
        answers for the same history and settings).

        `history`, oldest first: Events, `(item_id, rating)` or `(item_id, rating, timestamp)`
        tuples, dicts with those keys, or bare ids; ids may be ints. `seen_items`: items the
        user has had beyond this history, excluded with it (a dataset's or a store's whole
        record: the prompt reads only the latest `max_history`). `exclude_items` are never
        returned; `candidates` ranks only those ids (`score` gives every one of them a score).

        Raises InvalidQueryError (a field of the wrong type or out of range, named),
        UnknownItemsError (ids the catalog lacks) or EmptyHistoryError, all QueryError."""
        query = Query(
            history=history,  # type: ignore[arg-type]  # normalised to Events by Query
            k=k,
            reasoning=reasoning,
            max_reasoning_tokens=max_reasoning_tokens,
            exclude_history=exclude_history,
            seen_items=seen_items,  # type: ignore[arg-type]
            exclude_items=exclude_items,  # type: ignore[arg-type]
            candidates=candidates,  # type: ignore[arg-type]
        )
        (result,) = self.recommend_batch([query])
        if isinstance(result, QueryError):
            raise result
        return result

    def score(
        self,
        history: Iterable[HistoryEntry],
        item_ids: Iterable[str],
        *,
        reasoning: bool = True,
        max_reasoning_tokens: int = 64,
    ) -> dict[str, float]:
        """The score (cos(h_T, h_v)/tau, as `recommend` ranks by) of every id in `item_ids`
        for this history, in the order given: items in the history are scored too, and no
        `k` cuts the list. Each is the score the whole-catalog ranking gives it. Raises as
        `recommend` does (UnknownItemsError for an id the catalog lacks)."""
        ids = as_item_ids(item_ids, "item_ids")
        if not ids:
            raise InvalidQueryError("item_ids", "is empty: give at least one id to score")
        result = self.recommend(
            history,
            k=len(ids),
            reasoning=reasoning,
            max_reasoning_tokens=max_reasoning_tokens,
            exclude_history=False,
            candidates=ids,
        )
        scores = {i.item_id: i.score for i in result.items}
        return {i: scores[i] for i in ids}

    def similar_items(self, item_id: str, k: int = 10) -> list[ScoredItem]:
        """The `k` items whose vectors lie nearest `item_id`'s ("more like this"), best first,
        from the served index (item edits included), without running the model. Their
        `score` is the cosine of the two item vectors (not over tau, unlike `recommend`'s).
        Items of the same text as `item_id` (ml-100k lists 18 films twice) are left out with it,
        as a history's are. UnknownItemsError for an id the catalog lacks."""
        wanted, k = as_item_id(item_id), whole(k, "k", least=1)
        if self.catalog.item(wanted) is None:
            raise UnknownItemsError([wanted], where="item_id")
        vector = self.catalog.index.vector(wanted)[None, :]  # (1, H), normalised
        ids, cos, titles = self.catalog.search(vector, k, [{wanted}])
        n = len(ids[0])  # fewer than k where the catalog holds fewer; cos is -inf past them
        return [ScoredItem(ids[0][r], titles[0][r], float(cos[0, r]), r + 1) for r in range(n)]

    @staticmethod
    def _notify(on_text: Callable[[str], None], text: str) -> None:
        """Hand a reasoning piece to the query's stream. A broken callback (a client gone, a
        closed loop) costs that stream its text, never the batch its answers."""
        try:
            on_text(text)
        except Exception:
            log.exception("on_text callback failed; the batch goes on")

    def _decode(self, ids: Sequence[int]) -> str:
        return reasoning_text(self.model.tokenizer, ids)  # a character cut short left out

    def _tokens(self, prompt: str) -> list[int]:
        """A rendered prompt's token ids (the chat template already holds the special tokens)."""
        return self.model.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    # ---------------------------------------------------------------- continuous batching
    @property
    def continuous(self) -> bool:
        """Whether this model can serve by continuous batching (the `engine` backend)."""
        return isinstance(self.backend, EngineBackend)

    @property
    def decode_matmuls(self) -> str:
        """Which matmul path the decode steps take, for /metrics: the engine's
        (`DecoderEngine.matmul_path`: "bf16_kernel", "onednn", "cuda", "int8+" in front with
        int8 weights), or "hf" (transformers' forward)."""
        if not isinstance(self.backend, EngineBackend):
            return "hf"
        return self.backend.engine.matmul_path

    def draft_counts(self) -> tuple[int, int]:
        """Draft tokens checked and confirmed so far by this model's speculative decoding
        (model/speculative.py); (0, 0) without it."""
        drafter = self.backend.drafter
        return (0, 0) if drafter is None else (drafter.drafted, drafter.accepted)

    @property
    def prefill_batch_tokens(self) -> int:
        """The most positions one batched prefill of no-reasoning requests computes
        (R2EC_PREFILL_BATCH_TOKENS); 0 where each is prefilled alone: batching off, exact
        decoding, or the `hf` backend."""
        return self.backend.prefill_tokens if isinstance(self.backend, EngineBackend) else 0

    def prefill_tokens(self, prepared: PreparedQuery) -> int | None:
        """For continuous batching's admission (service/continuous.py `prefill_cost`): the
        positions the prefill that answers `prepared` computes, where it is answered by one
        prefill batched with others and takes no decode slot (no reasoning, or a cached reasoning
        without its h_T: [prompt; (reasoning;) marker], less the shared prompt head); 0 for a
        cache hit with its h_T (an index search); None where it decodes or this model prefills
        each request alone (`prefill_batch_tokens` 0). Runs on the event loop: the prompt is
        tokenized by `prepare` already, except for a cached reasoning without h_T (rare)."""
        if not self.prefill_batch_tokens:
            return None
        cached = prepared.cached
        if cached is not None and cached.vector is not None:
            return 0
        if prepared.query.wants_reasoning and cached is None:
            return None
        ids = list(prepared.prompt_ids) or self._tokens(prepared.prompt)
        if cached is not None:
            ids += cached.completion_ids
        engine = self.backend.engine  # type: ignore[union-attr]  # an EngineBackend: batching is on
        return engine.computed_tokens(ids + list(self.model._marker_ids), reuse_prefix=True)

    def runner(self) -> DecodeRunner:
        """The model-thread half of continuous batching for this model (one per Recommender)."""
        if self._runner is None:
            self._runner = DecodeRunner(self)
        return self._runner


@dataclasses.dataclass
class _Job:
    prepared: PreparedQuery
    status: str  # "miss" (writes its reasoning), "hit" (cached reasoning, no h_T) or "off"
    completion: tuple[int, ...]
    text: str | None
    started: float  # admitted to the decode


class DecodeRunner:
    """Continuous batching's model-thread half (service/continuous.py) for one Recommender.

    Each request becomes one sequence of the engine's ContinuousDecoder (model/generation.py):
    a reasoning request decodes its own budget and streams its text (`PreparedQuery.on_text`);
    a cache hit without h_T and a no-reasoning request only prefill [prompt; (reasoning;)
    marker], together with the others of their tick and without a slot (unless batching is
    off: `Recommender.prefill_batch_tokens`). A sequence that ends is answered by
    `Recommender._answer`, the same search and reply as the static batch, with its own queue
    and generation times."""

    def __init__(self, recommender: Recommender) -> None:
        if not recommender.continuous:
            raise ValueError("continuous batching needs the 'engine' generation backend")
        self.rec = recommender
        self.decoder = recommender.backend.decoder()  # type: ignore[union-attr]
        self.jobs: dict[Sequence_, _Job] = {}

    @property
    def idle(self) -> bool:
        return self.decoder.idle

    def add(self, item: Query | PreparedQuery) -> Running | Result | QueryError:
        rec = self.rec
        p = rec._ready_or_error(item)
        if isinstance(p, QueryError):
            return p
        q, cached = p.query, p.cached
        if cached is not None and cached.vector is not None:
            return rec.answer_cached(p)
        prompt_ids = list(p.prompt_ids) or rec._tokens(p.prompt)
        on_text = p.on_text
        if not q.wants_reasoning:
            job = _Job(p, "off", (), None, time.perf_counter())
            seq = Sequence_(prompt_ids, 0)
        elif cached is not None:  # h_T after the cached reasoning: one prefill, nothing written
            job = _Job(p, "hit", cached.completion_ids, cached.text, time.perf_counter())
            seq = Sequence_(prompt_ids + list(cached.completion_ids), 0)
            if on_text is not None and cached.text:
                rec._notify(on_text, cached.text)
        else:
            job = _Job(p, "miss", (), None, time.perf_counter())
            seq = Sequence_(prompt_ids, q.max_reasoning_tokens, on_text=on_text, constraint=p.constraint)
            rec.generate_calls += 1
        self.decoder.add(seq)
        self.jobs[seq] = job
        return Running(seq)

    def step(self) -> list[tuple[Sequence_, Result]]:
        finished = self.decoder.step()
        if not finished:
            return []
        now = time.perf_counter()
        jobs = [self.jobs.pop(seq) for seq in finished]
        completions = [
            tuple(s.completion_ids) if j.status == "miss" else j.completion
            for s, j in zip(finished, jobs, strict=True)
        ]
        texts = [s.text if j.status == "miss" else j.text for s, j in zip(finished, jobs, strict=True)]
        results = self.rec._answer(
            [j.prepared for j in jobs],
            np.stack([s.vector.numpy() for s in finished]),
            completions,
            texts,
            [j.status for j in jobs],
            score_started=now,
            batch_started=[j.started for j in jobs],
            generate_ms=[(now - j.started) * 1e3 for j in jobs],
        )
        return list(zip(finished, results, strict=True))

    def cancel(self, handle: Sequence_) -> None:
        self.decoder.cancel(handle)
        self.jobs.pop(handle, None)
