"""Generation backends: how reasoning is written and h_T read, behind one seam.

A backend turns prompts into (reasoning, h_T) for a batch:

- `hf`: transformers' `generate`, then a second forward over [prompt; reasoning; marker] for
  h_T (`R2ec.reason_from_ids` + `R2ec.user_vectors_from_ids`). The reference: every other
  backend is checked against it (tests/model/test_engine.py, bench/bench_decode.py).
- `engine`: model/engine.py's lean decoder. h_T comes from the generation's own KV cache: after
  the last reasoning token only that token and the closing marker are run (no second pass).
  Optionally int8 weights (`quantize="int8"`).

`ContinuousDecoder` is the engine's scheduler, the vLLM idea on a small scale: sequences join
the running decode batch at a token boundary (`add`, admitted by the next `step`) and leave
when they stop (EOS, end of turn or budget), so nobody waits for a whole batch to finish. The
service drives it one `step` at a time (service/continuous.py); `EngineBackend.generate` drives
it to completion for a fixed batch (training, eval, the static batcher).

When few greedy sequences are live, a step can write several tokens each: n-gram drafts
(model/speculative.py) are checked in one forward, and the tokens the model confirms are kept
(speculative decoding; the text stays the greedy text).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from model import bf16_gemm
from model.constrained import Grammar, constrain_logits
from model.engine import DecoderEngine, Quantize, unsupported_reason
from model.prompts import whole_characters
from model.r2ec import GenerationSettings, R2ec, Rollout, reasoning_text
from model.speculative import NgramDrafter

log = logging.getLogger(__name__)

# Rows one speculative forward checks, every live sequence's draft together: a bf16 matmul over
# up to 16 rows costs little more than one row does (model/bf16_gemm.py's kernel: 9 rows 1.3x,
# 16 rows 1.6-1.8x one row's time; oneDNN's prepacked weights where it does not run, 0.8-1.6x;
# BENCHMARKS.md §7's kernel table), so one sequence drafts 8 tokens, two 7 each, four 3 each,
# and from 6 sequences the plain batched step (which already shares its weight reads) is taken.
SPECULATIVE_ROWS = 16

BackendName = Literal["hf", "engine"]
GREEDY = GenerationSettings()


class Backend(Protocol):
    name: str
    drafter: NgramDrafter | None  # speculative decoding's drafts, None where it does not run

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        settings: GenerationSettings,
        constraints: Sequence[Grammar | None] | None = None,
    ) -> tuple[Rollout, torch.Tensor]:
        """Reasoning for each prompt and the normalised h_T after [prompt; reasoning; marker],
        (B, H) float32 on the CPU. `constraints`: per prompt, the grammar its title list is
        decoded under (`R2ec.title_lists`, model/constrained.py), or None."""
        ...

    def vectors(
        self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """h_T after [prompt; completion; marker] for reasoning already written, (B, H)."""
        ...


class HFBackend:
    """transformers' generate, then a second forward for h_T (the reference)."""

    name = "hf"
    drafter: NgramDrafter | None = None  # no speculative decoding

    def __init__(self, model: R2ec) -> None:
        self.model = model

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        settings: GenerationSettings,
        constraints: Sequence[Grammar | None] | None = None,
    ) -> tuple[Rollout, torch.Tensor]:
        rollout = self.model.reason_from_ids([list(p) for p in prompt_ids], settings, constraints=constraints)
        return rollout, self.vectors(rollout.prompt_ids, rollout.completion_ids)

    @torch.no_grad()
    def vectors(
        self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """h_T after [prompt; completion; marker] for reasoning already written (B, H)."""
        return self.model.user_vectors_from_ids(prompt_ids, completion_ids).cpu()


@dataclass(eq=False)
class Sequence_:
    """One prompt in the continuous decoder: what it asked, what it has written so far."""

    prompt_ids: list[int]
    max_new_tokens: int
    completion_ids: list[int] = field(default_factory=list)
    # called on the decoding thread with each new piece of text (see `TextStream`)
    on_text: Callable[[str], None] | None = None
    constraint: Grammar | None = None  # the grammar of its title list (model/constrained.py)
    vector: torch.Tensor | None = None  # normalised h_T (H,) float32, once finished
    text: str = ""
    done: bool = False
    cancelled: bool = False
    slot: int = -1
    _stream: TextStream | None = None


class TextStream:
    """Incremental detokenisation whose pieces concatenate to the final text exactly.

    The final text is `reasoning_text(tokenizer, ids)` (model/r2ec.py, as `R2ec.reason`
    returns it), so leading whitespace is never sent, trailing whitespace is held back until
    text follows it, and a piece that ends inside a multi-byte character waits for the rest; the
    last piece leaves out a character the budget cut short, as the final text does."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.sent = ""

    def update(self, ids: Sequence[int], final: bool = False) -> str:
        text = self.tokenizer.decode(list(ids), skip_special_tokens=True).lstrip()
        if not final and text.endswith("\ufffd"):  # an unfinished UTF-8 sequence
            return ""
        text = whole_characters(text).rstrip()  # final: a character cut short is never sent
        if not text.startswith(self.sent):  # a later token changed how earlier ones decode
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece


class ContinuousDecoder:
    """Token-level scheduling of prompts over a `DecoderEngine` (module docstring).

    Not thread-safe: one thread calls `add`, `cancel` and `step` (the service's model thread).
    `max_prefill_per_step` bounds how many new prompts one step admits, so a burst of arrivals
    delays the running sequences' next token by at most that many prefills.

    `drafter`: when given and decoding is greedy, up to 5 live sequences are decoded
    speculatively (`_speculate`), and every finished text joins the drafter's memory.

    `prefill_tokens`: sequences that write nothing (`max_new_tokens` 0: a no-reasoning request,
    or h_T after reasoning already written) take no slot: a step prefills every one waiting
    together (`DecoderEngine.prefill_many`), in forwards of at most that many computed
    positions (one prompt at least), before it admits the others. 0, or an engine in exact mode:
    each is prefilled alone in a free slot, as a decoding prompt is, and counts against
    `max_prefill_per_step`."""

    def __init__(
        self,
        model: R2ec,
        engine: DecoderEngine,
        settings: GenerationSettings = GREEDY,
        max_prefill_per_step: int = 1,
        drafter: NgramDrafter | None = None,
        prefill_tokens: int = 0,
    ) -> None:
        if prefill_tokens < 0:
            raise ValueError(f"prefill_tokens must be >= 0, got {prefill_tokens}")
        self.model = model
        self.engine = engine
        self.settings = settings
        self.max_prefill_per_step = max_prefill_per_step
        self.prefill_tokens = prefill_tokens if engine.can_prefill_many else 0
        # greedy only, and where the engine can check drafts (DecoderEngine.can_speculate)
        self.drafter = drafter if not settings.do_sample and engine.can_speculate else None
        self.marker = list(model._marker_ids)
        self.stop = set(model.stop_ids)
        self.waiting: deque[Sequence_] = deque()
        self.active: list[Sequence_] = []  # active[i] lives in engine slot i

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.active

    @property
    def capacity(self) -> int:
        return self.engine.slots

    def add(self, seq: Sequence_) -> Sequence_:
        if seq.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {seq.max_new_tokens}")
        if not seq.prompt_ids:
            raise ValueError("empty prompt")
        seq._stream = TextStream(self.model.tokenizer) if seq.on_text is not None else None
        self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence_) -> None:
        """Drop a sequence (its client went away); its slot is free for the next step. A finished
        one (its last text piece may reach a listener that cancels) is left as it is."""
        if seq.done:
            return
        seq.cancelled = True
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.active:
            self._release(seq)

    # ------------------------------------------------------------------ one step
    def step(self) -> list[Sequence_]:
        """Admit waiting prompts into free slots, then one decode step for every live sequence.
        Returns the sequences that finished in this step (with text and h_T)."""
        finished: list[Sequence_] = []
        if self.prefill_tokens and any(s.max_new_tokens == 0 for s in self.waiting):
            finished += self._prefill_together()
        admitted = 0
        while self.waiting and len(self.active) < self.engine.slots and admitted < self.max_prefill_per_step:
            seq = self.waiting.popleft()
            admitted += 1
            if self._admit(seq):
                finished.append(seq)
        if self.active and self.drafter is not None and self._speculate(finished):
            return finished
        if self.active:
            hidden = self.engine.decode([s.completion_ids[-1] for s in self.active])
            tokens = self._next_tokens(self.engine.logits(hidden), self.active)
            for seq, token in zip(list(self.active), tokens, strict=True):
                if self._append(seq, token):
                    finished.append(seq)
        return finished

    def _prefill_together(self) -> list[Sequence_]:
        """Every waiting sequence that writes nothing, answered by batched prefills of [prompt;
        marker] (`DecoderEngine.prefill_many`, no slot), in arrival order and in forwards of at
        most `prefill_tokens` computed positions; the others keep their place in the queue."""
        ready = [s for s in self.waiting if s.max_new_tokens == 0]
        self.waiting = deque(s for s in self.waiting if s.max_new_tokens != 0)
        batches: list[list[Sequence_]] = [[]]
        tokens = 0
        for seq in ready:
            cost = self.engine.computed_tokens(seq.prompt_ids + self.marker, reuse_prefix=True)
            if batches[-1] and tokens + cost > self.prefill_tokens:
                batches.append([])
                tokens = 0
            batches[-1].append(seq)
            tokens += cost
        for batch in batches:
            hidden = self.engine.prefill_many([s.prompt_ids + self.marker for s in batch], reuse_prefix=True)
            for seq, h_t in zip(batch, hidden, strict=True):
                self._done(seq, h_t)
        return ready

    def _admit(self, seq: Sequence_) -> bool:
        """Prefill a prompt into the next free slot; True when it is already finished (budget 0,
        or its first token stops it)."""
        slot = len(self.active)
        self.engine.reset(slot)
        seq.slot = slot
        if seq.max_new_tokens == 0:  # no reasoning: h_T straight after [prompt; marker]
            ids = seq.prompt_ids + self.marker
            hidden = self.engine.prefill(slot, ids, reuse_prefix=True, last_only=True)
            self._done(seq, hidden[-1])
            self.engine.reset(slot)
            return True
        hidden = self.engine.prefill(slot, seq.prompt_ids, reuse_prefix=True, last_only=True)
        self.active.append(seq)
        token = self._next_tokens(self.engine.logits(hidden[-1:]), [seq])[0]
        return self._append(seq, token)

    def _speculate(self, finished: list[Sequence_]) -> bool:
        """One step that may write several tokens per live sequence: each row's last written
        token and its draft (model/speculative.py) go through one forward
        (`DecoderEngine.extend`), then the greedy token after each position (under the row's
        title grammar) is kept while it equals the draft, plus the first one that does not.
        The drafts share a budget of SPECULATIVE_ROWS rows a forward, so the more sequences
        live, the shorter each draft; False (nothing done) when that leaves under 2 tokens a
        row or no row has a draft, and the step is a plain one."""
        seqs = list(self.active)
        n = len(seqs)
        per_row = SPECULATIVE_ROWS // n - 1  # draft tokens each row may check
        if per_row < 2:
            return False
        k = min(self.drafter.tokens, per_row)
        room = [min(k, s.max_new_tokens - len(s.completion_ids) - 1) for s in seqs]  # within budget
        drafts = [
            self.drafter.draft(s.prompt_ids + s.completion_ids, r) for s, r in zip(seqs, room, strict=True)
        ]
        width = max(map(len, drafts))
        if not width:
            return False
        cached = self.engine.lens[:n]  # each row's prompt and every written token but the last
        # rows with a shorter draft are padded with their last token: whatever the model makes of
        # a padding position is never kept, since only each row's own draft is compared
        last = [s.completion_ids[-1] for s in seqs]
        rows = [[t, *d] + [t] * (width - len(d)) for t, d in zip(last, drafts, strict=True)]
        hidden = self.engine.extend(rows)  # (n, width + 1, H)
        logits = self.engine.logits(hidden.reshape(n * (width + 1), -1)).view(n, width + 1, -1)
        news: list[list[int]] = []
        for i, (seq, draft) in enumerate(zip(seqs, drafts, strict=True)):
            new: list[int] = []
            for j in range(len(draft) + 1):
                token = self._next_tokens(logits[i, j : j + 1], [seq], [seq.completion_ids + new])[0]
                new.append(token)
                if j == len(draft) or token != draft[j]:
                    break
            news.append(new)
        # keep each row's confirmed draft tokens (its last new token is not in the cache), before
        # any sequence ends and the last live one moves into its slot
        for i, new in enumerate(news):
            self.engine.truncate(i, cached[i] + len(new))
        confirmed = 0  # draft tokens written (a row's new tokens but the first, up to its end)
        for seq, new, before in zip(seqs, news, cached, strict=True):
            for j, token in enumerate(new):
                if seq.cancelled:  # its on_text listener cancelled it: its slot is gone
                    break
                if self._ends(seq, token):  # `_append` then runs the marker after what precedes it
                    self.engine.truncate(seq.slot, before + 1 + j)
                confirmed += j > 0
                if self._append(seq, token):
                    finished.append(seq)
                    break
        self.drafter.count(sum(map(len, drafts)), confirmed)
        return True

    def _next_tokens(
        self,
        logits: torch.Tensor,
        seqs: Sequence[Sequence_],
        written: Sequence[Sequence[int]] | None = None,
    ) -> list[int]:
        """The next token of each row; `written`: the text each row's grammar reads (by default
        each sequence's completion so far)."""
        written = [q.completion_ids for q in seqs] if written is None else written
        logits = constrain_logits(
            logits,
            [
                None if q.constraint is None else q.constraint.allowed(w)
                for q, w in zip(seqs, written, strict=True)
            ],
        )
        s = self.settings
        if not s.do_sample:
            return logits.argmax(dim=-1).tolist()
        logits = logits / s.temperature
        if s.top_k:
            kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(F.softmax(logits, dim=-1), 1)[:, 0].tolist()

    def _append(self, seq: Sequence_, token: int) -> bool:
        """Record a written token; when it ends the sequence, read h_T and free the slot."""
        ended = self._ends(seq, token)
        seq.completion_ids.append(int(token))
        if seq._stream is not None and seq.on_text is not None and not ended:
            piece = seq._stream.update(seq.completion_ids)
            if piece:
                _call(seq.on_text, piece)
        if not ended:
            return False
        # The KV cache holds the prompt and every written token but the last: run that token
        # and the closing marker, and h_T is the marker's last hidden state. No second pass.
        hidden = self.engine.prefill(seq.slot, [seq.completion_ids[-1]] + self.marker, last_only=True)
        self._done(seq, hidden[-1])
        self._release(seq)
        return True

    def _ends(self, seq: Sequence_, token: int) -> bool:
        """Whether writing `token` ends the sequence (a stop token, or its budget is spent)."""
        return token in self.stop or len(seq.completion_ids) + 1 >= seq.max_new_tokens

    def _done(self, seq: Sequence_, h_t: torch.Tensor) -> None:
        seq.vector = F.normalize(h_t.float(), dim=-1).cpu()
        ids = seq.completion_ids
        seq.text = reasoning_text(self.model.tokenizer, ids) if ids else ""
        if self.drafter is not None:
            self.drafter.remember(ids)
        seq.done = True
        if seq._stream is not None and seq.on_text is not None:
            piece = seq._stream.update(ids, final=True)
            if piece:
                _call(seq.on_text, piece)

    def _release(self, seq: Sequence_) -> None:
        """Free the sequence's slot, moving the last live sequence into it (rows stay packed)."""
        i = self.active.index(seq)
        last = len(self.active) - 1
        if i != last:
            self.engine.move(last, i)
            self.active[i] = self.active[last]
            self.active[i].slot = i
        else:
            self.engine.reset(i)
        self.active.pop()


def _call(fn: Callable[[str], None], piece: str) -> None:
    try:
        fn(piece)
    except Exception:  # a listener's failure must not stop the decode batch
        log.exception("on_text callback failed")


class EngineBackend:
    """The lean decoder (model/engine.py) with h_T from its KV cache."""

    name = "engine"

    def __init__(
        self,
        model: R2ec,
        slots: int = 8,
        quantize: Quantize = "none",
        max_len: int = 1024,
        exact: bool = False,
        speculative_tokens: int = 8,
        prefill_tokens: int = 0,
    ) -> None:
        """By default the engine computes the prompt head all users share once
        (DecoderEngine.set_prefix) and copies its keys and values into each prompt, and a lone
        sequence's attention groups the query heads of a KV head: 1.10x throughput and 1.11x a
        batch-1 step, but in bf16 both round the last bits differently, enough to flip a
        near-tie in some greedy texts. `exact` (R2EC_EXACT_DECODE) does neither, and the engine
        writes the reference's tokens (BENCHMARKS.md §7).

        `speculative_tokens` (R2EC_SPECULATIVE_TOKENS): the longest draft a greedy sequence
        checks per forward (model/speculative.py; a lone one, several share SPECULATIVE_ROWS);
        0 turns speculative decoding off, and so do `exact` (a checked draft rounds unlike a
        plain decode step) and int8 weights (they serve one-row steps only, and a checked draft
        is several rows). The drafter's memory of recent texts is shared by every decoder of
        this backend.

        `prefill_tokens` (R2EC_PREFILL_BATCH_TOKENS): prompts that write nothing are prefilled
        together, up to this many computed positions a forward (`ContinuousDecoder`); 0 prefills
        each alone. Exact mode always prefills each alone (`prefill_tokens` reads 0 then)."""
        if prefill_tokens < 0:
            raise ValueError(f"prefill_tokens must be >= 0, got {prefill_tokens}")
        self.model = model
        self.engine = DecoderEngine(model.lm, slots=slots, max_len=max_len, quantize=quantize, exact=exact)
        reason = self.engine.kernel_reason  # why not the kernel, when not
        why = "" if reason is None else f" ({reason})"
        log.info("decode matmuls (up to %d rows): %s%s", bf16_gemm.ROWS, self.engine.matmul_path, why)
        if speculative_tokens < 0:
            raise ValueError(f"speculative_tokens must be >= 0, got {speculative_tokens}")
        speculates = speculative_tokens and self.engine.can_speculate
        self.drafter = NgramDrafter(speculative_tokens) if speculates else None
        if not exact:
            self.engine.set_prefix(model.user_prompt_head())
        self.prefill_tokens = prefill_tokens if self.engine.can_prefill_many else 0

    def decoder(self, settings: GenerationSettings = GREEDY) -> ContinuousDecoder:
        """A decoder that prefills every prompt it is given at its next step: a fixed batch's
        (`generate`) all at once; the service hands its decoder at most
        R2EC_MAX_PREFILL_PER_TICK new requests a tick (service/continuous.py), so running rows
        step between the prefills of a burst. Prompts that write nothing are prefilled together
        (`prefill_tokens`), without a slot."""
        return ContinuousDecoder(
            self.model,
            self.engine,
            settings,
            max_prefill_per_step=self.engine.slots,
            drafter=self.drafter,
            prefill_tokens=self.prefill_tokens,
        )

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        settings: GenerationSettings,
        constraints: Sequence[Grammar | None] | None = None,
    ) -> tuple[Rollout, torch.Tensor]:
        return self._run(prompt_ids, settings, constraints)  # `vectors` runs `_run` too, but writes nothing

    def _run(
        self,
        prompt_ids: Sequence[Sequence[int]],
        settings: GenerationSettings,
        constraints: Sequence[Grammar | None] | None = None,
    ) -> tuple[Rollout, torch.Tensor]:
        decoder = self.decoder(settings)
        limits = [None] * len(prompt_ids) if constraints is None else list(constraints)
        seqs = [
            decoder.add(Sequence_(list(p), settings.max_new_tokens, constraint=c))
            for p, c in zip(prompt_ids, limits, strict=True)
        ]
        while not decoder.idle:
            decoder.step()
        rollout = Rollout(
            [list(p) for p in prompt_ids], [s.completion_ids for s in seqs], [s.text for s in seqs]
        )
        return rollout, torch.stack([s.vector for s in seqs])

    def vectors(
        self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """h_T after [prompt; completion; marker] for reasoning already written: batched
        prefills of up to `prefill_tokens` positions (one prefill each with 0, or exact)."""
        seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
        return self._run(seqs, GenerationSettings(max_new_tokens=0))[1]


def make_backend(
    model: R2ec,
    name: BackendName = "engine",
    slots: int = 8,
    quantize: Quantize = "none",
    exact: bool = False,
    speculative_tokens: int = 8,
    prefill_tokens: int = 0,
) -> Backend:
    """`engine` when the model supports it (else `hf`, logged), `hf` when asked."""
    if name == "engine":
        reason = unsupported_reason(model.lm)
        if reason is None:
            return EngineBackend(
                model,
                slots=slots,
                quantize=quantize,
                exact=exact,
                speculative_tokens=speculative_tokens,
                prefill_tokens=prefill_tokens,
            )
        log.warning("generation backend 'engine' cannot run this model (%s); using 'hf'", reason)
    elif name != "hf":
        raise ValueError(f"unknown generation backend {name!r}: use 'hf' or 'engine'")
    return HFBackend(model)
