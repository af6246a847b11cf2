"""Draft tokens for speculative decoding, looked up rather than generated.

A decode step of one or a few sequences reads every weight to write one token each
(BENCHMARKS.md §7: ~22 ms a step on 2 cores, memory-bound). Reading them for a handful of rows
costs about the same (a prepacked bf16 matmul over 8 rows takes no longer than over one, §7's
kernel table), so the decoder (model/generation.py, `ContinuousDecoder._speculate`) proposes k
tokens per sequence, runs them in one forward (`DecoderEngine.extend`) and keeps the longest
prefix the model itself would have written greedily, plus the model's own token after it. The
text is the greedy text: a draft can only save steps, never change a token (up to bf16
summation order, measured in bench/bench_agreement.py).

Where the draft comes from: no second model, but n-gram lookup, as in prompt lookup decoding
(Saxena 2023; transformers' `prompt_lookup_num_tokens`) and retrieval-based drafts (REST, He et
al. 2024). R²ec's reasoning is made for it: its format repeats ("Likes Drama, Comedy and
Romance, mostly 1990s. Rated highest: ...; .... Lately more Drama.") and the titles it lists
are copied from the prompt (model/constrained.py). So the last n tokens (n = max_ngram..1) are
looked up first in the sequence's own prompt and text, then in the texts this decoder wrote
recently, and the k tokens that followed them there are the draft.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence


def _find_last(ids: Sequence[int], key: tuple[int, ...]) -> int | None:
    """Where the tokens after the latest earlier occurrence of `key` in `ids` begin (the tail
    itself does not count), or None."""
    n = len(key)
    first = key[0]
    for s in range(len(ids) - n - 1, -1, -1):
        if ids[s] == first and tuple(ids[s : s + n]) == key:
            return s + n
    return None


class NgramDrafter:
    """Proposes up to `tokens` draft tokens after a context (module docstring).

    `memory`: how many recent texts (`remember`) the lookup reads beyond the sequence's own
    prompt and text (an evicted text's n-grams leave the index within `memory` more texts).
    `drafted` and `accepted` count the draft tokens its decoders checked and confirmed (the
    service's r2ec_draft_tokens metrics). Not thread-safe: one decoding thread uses it."""

    def __init__(self, tokens: int = 8, max_ngram: int = 3, memory: int = 256) -> None:
        if tokens < 1 or max_ngram < 1 or memory < 1:
            raise ValueError(f"need tokens, max_ngram and memory >= 1, got {tokens}, {max_ngram}, {memory}")
        self.tokens = tokens
        self.max_ngram = max_ngram
        self.memory = memory
        self._texts: deque[list[int]] = deque(maxlen=memory)
        # n-gram -> (text, where its continuation begins), the latest text that has it
        self._index: dict[tuple[int, ...], tuple[list[int], int]] = {}
        self._since_rebuild = 0
        self.drafted = 0
        self.accepted = 0

    def count(self, drafted: int, accepted: int) -> None:
        """Record one checked draft: its length and how many of its tokens were confirmed."""
        self.drafted += drafted
        self.accepted += accepted

    def __len__(self) -> int:
        return len(self._texts)

    def remember(self, ids: Sequence[int]) -> None:
        """Add a finished text to the lookup's memory (the oldest leaves once it is full)."""
        ids = list(ids)
        if len(ids) < 2:
            return
        self._texts.append(ids)
        self._since_rebuild += 1
        if self._since_rebuild >= self._texts.maxlen:  # drop evicted texts' n-grams from the index
            self._index = {}
            self._since_rebuild = 0
            for text in self._texts:
                self._add(text)
        else:
            self._add(ids)

    def _add(self, ids: list[int]) -> None:
        for n in range(1, self.max_ngram + 1):
            for s in range(len(ids) - n):  # a continuation must follow the n-gram
                self._index[tuple(ids[s : s + n])] = (ids, s + n)

    def draft(self, context: Sequence[int], limit: int | None = None) -> list[int]:
        """Up to min(tokens, limit) tokens that may follow `context` (the prompt and the text so
        far); [] when no n-gram of its tail is found."""
        k = self.tokens if limit is None else min(self.tokens, limit)
        if k < 1 or not context:
            return []
        for n in range(min(self.max_ngram, len(context)), 0, -1):
            key = tuple(context[-n:])
            at = _find_last(context, key)
            if at is not None:
                return list(context[at : at + k])
            hit = self._index.get(key)
            if hit is not None:
                text, at = hit
                return text[at : at + k]
        return []
