"""The R²ec model: one causal LM, two heads on the same final hidden states.

- lm_head writes the reasoning o_1..o_T about the user's history (`reason`).
- rec_head scores items: h_T is the final-layer hidden state of the last token of
  [user prompt; reasoning; closing marker] (`user_vectors`), h_v the same for an
  item prompt (`item_vectors`), and s(u, v) = cos(h_T, h_v) / tau (`score`).
  (R²ec, arXiv 2505.16994 §3.1.) Raw hidden states are strongly anisotropic, so
  both sides are L2-normalised before the inner product (docs/architecture.md §6).

Shapes: B users (or B*G rollouts), T tokens, L padded length, H hidden, N items.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from model.constrained import (
    FormatStart,
    Grammar,
    PhraseChoice,
    TitleList,
    TitleListProcessor,
    TitleLists,
    TokenStrings,
)
from model.cowatch import CoWatch
from model.prompts import (
    HistoryEntry,
    PromptConfig,
    item_message,
    render,
    turn_end_id,
    user_message,
    whole_characters,
)
from model.rationale import (
    LATELY,
    LIKES,
    MAX_LIKED,
    MOSTLY,
    NEXT,
    PICKS,
    RATED,
    ItemFacts,
    decade_phrases,
    drifting_genres,
    liked_genres,
    likes_phrases,
    rated_highest,
)
from model.special_text import SpecialText, one_line, strip_bidi

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    """How reasoning is written. Greedy unless `do_sample`."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError("temperature must be > 0 when sampling")


@dataclass
class Rollout:
    """Reasoning for a batch; row i belongs to user i // num_generations."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]  # reasoning tokens, ending with the stop token if one came
    texts: list[str]  # decoded without special tokens
    num_generations: int = 1


@dataclass
class PaddedBatch:
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (B, L)
    completion_mask: torch.Tensor  # (B, L) 1 where the token is a reasoning token

    def rows(self, n: int) -> PaddedBatch:
        """The first n rows (views)."""
        return PaddedBatch(
            self.input_ids[:n], self.attention_mask[:n], self.position_ids[:n], self.completion_mask[:n]
        )


def length_batches(lengths: Sequence[int], batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Indices sorted by length (so each batch carries little padding), this process's share
    (every `world`-th from `rank`), in chunks of `batch_size`."""
    mine = sorted(range(len(lengths)), key=lambda i: lengths[i])[rank::world]
    return [mine[lo : lo + batch_size] for lo in range(0, len(mine), batch_size)]


def left_pad_mask(lengths: Sequence[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mask and position ids (B, width) for rows of these lengths, left-padded."""
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):
        if n:
            mask[i, width - n :] = 1
    return mask, (mask.cumsum(-1) - 1).clamp(min=0)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> PaddedBatch:
    """Left-pad so every row's last real token sits at position L-1.

    Position ids count real tokens only, so a padded row gets the same positions
    (and so the same hidden states) as the row run alone.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, seq in enumerate(seqs):
        if seq:
            ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
    mask, positions = left_pad_mask([len(s) for s in seqs], width)
    return PaddedBatch(
        ids.to(device), mask.to(device), positions.to(device), torch.zeros_like(mask).to(device)
    )


# End-of-turn tokens of common chat templates: Gemma's turn ends with <end_of_turn> while its
# eos_token is <eos>, Llama 3's with <|eot_id|>; ChatML models' (SmolLM2, Qwen) eos is <|im_end|>.
END_OF_TURN = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>")


def _token_ids(value: object) -> list[int]:
    """An `eos_token_id` setting (None, an id, or a list of ids) as a list."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, lm: PreTrainedModel | None = None) -> list[int]:
    """The tokens that end a reasoning. First the one the chat template closes an assistant
    turn with (`turn_end_id`; the tokenizer's EOS when it writes none): how the `rationale`
    stage ends a taught text (`R2ec.completion_ids`). Then the tokenizer's EOS, the model's
    own stop tokens (`generation_config.eos_token_id`, an id or a list, e.g. Llama 3.1's
    <|eom_id|>; `config.eos_token_id` when it lists none), and any common end-of-turn token
    the vocabulary has."""
    generation = getattr(lm, "generation_config", None)
    model_eos = _token_ids(getattr(generation, "eos_token_id", None))
    model_eos = model_eos or _token_ids(getattr(getattr(lm, "config", None), "eos_token_id", None))
    vocab = tokenizer.get_vocab()
    found = [turn_end_id(tokenizer), tokenizer.eos_token_id, *model_eos, *(vocab.get(t) for t in END_OF_TURN)]
    ids = list(dict.fromkeys(int(i) for i in found if i is not None))
    if not ids:
        raise ValueError(
            f"no stop token for the backbone {getattr(tokenizer, 'name_or_path', '')!r}: its tokenizer has "
            "no eos_token and neither its chat template nor its generation_config names one; set "
            "eos_token in tokenizer_config.json"
        )
    return ids


def reasoning_text(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """A reasoning's token ids as the text it is shown and cached as: decoded without special
    tokens, white space around it removed, and an unfinished character at its end left out (a
    budget that stops inside a character written in several tokens, as CJK, Thai or emoji are,
    decoded to a trailing U+FFFD: "Rated highest: 千と千尋の神隠し; 卧虎藏\ufffd"). The token ids
    (what h_T is read after) keep every token; only the text drops the partial character.
    Every backend and the stream (model/generation.py `TextStream`) decode through this."""
    return whole_characters(tokenizer.decode(list(ids), skip_special_tokens=True)).strip()


def _through_stop(seq: list[int], stop_ids: Sequence[int]) -> list[int]:
    """A generated row up to and including its first stop token (the rest is padding). The
    stop token stays: it is part of what the policy wrote, so RecPO's token loss trains
    stopping, and h_T is read after it exactly as in training."""
    for j, tok in enumerate(seq):
        if tok in stop_ids:
            return seq[: j + 1]
    return seq


class R2ec:
    """Wraps a causal LM (optionally a peft model) with the R²ec user/item encoders."""

    def __init__(
        self,
        lm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        prompts: PromptConfig | None = None,
        tau: float = 0.02,
    ) -> None:
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.lm = lm
        self.tokenizer = tokenizer
        self.prompts = prompts or PromptConfig()
        self.tau = tau
        self._marker_ids = tokenizer(self.prompts.closing_marker, add_special_tokens=False)["input_ids"]
        self._special = SpecialText.of(tokenizer)  # what `catalog_text` breaks up
        self.stop_ids = stop_token_ids(tokenizer, lm)
        self._token_strings: TokenStrings | None = None  # built on the first `title_lists`
        # What other users watched next (model/cowatch.py), when the prompts name co-watch
        # hints; a checkpoint carries it, training builds it from its data.
        self.cowatch: CoWatch | None = None

    # -- plumbing ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @property
    def hidden_size(self) -> int:
        return int(self.lm.config.hidden_size)

    @property
    def pad_id(self) -> int:
        """The tokenizer's pad token (model/backbone.py makes it EOS when absent), or the first
        stop token for a tokenizer with neither: masks come from lengths, not pad ids."""
        pad = self.tokenizer.pad_token_id
        return int(self.stop_ids[0] if pad is None else pad)

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        # The chat template already carries its special tokens.
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def decoder_hidden(self, batch: PaddedBatch) -> torch.Tensor:
        """Final-layer hidden states (B, L, H) from the base model, no LM head."""
        out = self.lm.get_decoder()(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
        return out.last_hidden_state

    # -- prompts ----------------------------------------------------------------------------
    def catalog_text(self, text: str, shown: bool = True) -> str:
        """An item's text (a title, genre, ...) as a prompt and the claims' grammars carry it:
        one line (model/special_text.py `one_line`), with every special-token string of the
        tokenizer broken by a space ("<|im_end|>" -> "< |im_end|>") so it tokenizes as plain
        text, and (`shown`: a title, year or genre, which the reasoning may copy) without
        bidirectional controls (`strip_bidi`). A catalog prepared now holds none of these
        (`r2ec data prepare` and `checkpoint init` refuse them, PUT /items too); one in a
        checkpoint written before may."""
        if not text:
            return text
        text = self._special.plain(one_line(text))
        return strip_bidi(text) if shown else text

    def special_token_in(self, text: str) -> str | None:
        """The first special-token string of the tokenizer that `text` holds (what
        `catalog_text` breaks up), or None."""
        return self._special.find(text)

    def _catalog_history(self, history: Sequence[HistoryEntry]) -> list[HistoryEntry]:
        return [e if (t := self.catalog_text(e.title)) == e.title else replace(e, title=t) for e in history]

    def _catalog_item(self, item: Mapping[str, object]) -> Mapping[str, object]:
        fields = ("title", "year", "genres", "description")
        clean = {
            k: self.catalog_text(v, shown=k != "description")
            for k in fields
            if isinstance(v := item.get(k), str)
        }
        return item if all(item.get(k) == v for k, v in clean.items()) else {**item, **clean}

    def user_prompt(
        self,
        history: Sequence[HistoryEntry],
        without: Mapping[tuple[str, str], float] | None = None,
        catalog: Mapping[str, str] | None = None,
        hints: Sequence[str] | None = None,
    ) -> str:
        """The rendered user prompt, co-watch hints included when the prompts name them
        (`without`: pair counts to leave out of the hints, a training sample's own user's;
        `catalog`: item_id -> title of the items that may be hinted, named by these titles,
        the served catalog after edits; default: the table's own). `hints`: those titles
        already looked up (`hint_titles`), so that a caller that also builds the history's
        `title_lists` gives both the same ones. Titles go in as `catalog_text` has them."""
        if not self.prompts.cowatch_hints:
            return self.render_message(user_message(self._catalog_history(history), self.prompts))
        if hints is None:
            hints = self.hint_titles(history, without, catalog)
        hints = [self.catalog_text(t) for t in hints]
        return self.render_message(user_message(self._catalog_history(history), self.prompts, hints))

    def hint_titles(
        self,
        history: Sequence[HistoryEntry],
        without: Mapping[tuple[str, str], float] | None = None,
        catalog: Mapping[str, str] | None = None,
    ) -> list[str]:
        """The titles the user prompt's co-watch line names, strongest first (`user_prompt`'s
        arguments); [] when the prompts name none."""
        k = self.prompts.cowatch_hints
        if not k:
            return []
        if self.cowatch is None:
            raise ValueError("the prompts name co-watch hints but the model has no co-watch table")
        ids = [e.item_id for e in history]
        if any(i is None for i in ids):
            raise ValueError("co-watch hints need every history entry's item_id")
        names = self.cowatch.titles if catalog is None else catalog
        return [names[j] for j in self.cowatch.hints(ids, k, without, allowed=names)]

    def user_prompt_ids(
        self,
        histories: Sequence[Sequence[HistoryEntry]],
        without: Sequence[Mapping[tuple[str, str], float] | None] | None = None,
    ) -> list[list[int]]:
        without = without if without is not None else [None] * len(histories)
        return self._encode([self.user_prompt(h, w) for h, w in zip(histories, without, strict=True)])

    def user_prompt_head(self) -> list[int]:
        """The tokens every user prompt starts with (chat template, system turn, instruction):
        the common prefix of two prompts that differ from their first history line on, less
        one token, in case the tokenizer merges the head's last piece with a title."""
        a, b = (
            self._encode([self.render_message(user_message(h, self.prompts))])[0]
            for h in ([HistoryEntry("Alpha", 5.0)], [HistoryEntry("9 zulu")])
        )
        return a[: max(0, len(os.path.commonprefix([a, b])) - 1)]

    def item_prompt_ids(self, items: Sequence[Mapping[str, object]]) -> list[list[int]]:
        """Item prompts as token ids, each item's text cut to the prompts' token budgets
        (model/prompts.py `item_message`): every item vector (checkpoint init, an item edit,
        training's item table, retraining) is encoded from these."""
        ids = self._encode(
            [
                self.render_message(item_message(self._catalog_item(it), self.prompts, self.tokenizer))
                for it in items
            ]
        )
        return [p + self._marker_ids for p in ids] if self.prompts.marker_on_items else ids

    def encode_text(self, texts: Sequence[str]) -> list[list[int]]:
        """Plain text to token ids, no special tokens (a special-token string in it is broken up,
        model/special_text.py)."""
        return self._encode([self._special.plain(t) for t in texts])

    def completion_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Reasoning texts as the model would write them: tokens, then the stop token that
        closes the chat template's assistant turn (`stop_token_ids`; how the `rationale` stage
        teacher-forces a text, stopping included)."""
        return [ids + [self.stop_ids[0]] for ids in self.encode_text(texts)]

    def render_message(self, message: str) -> str:
        """One turn through the chat template with this model's system prompt."""
        return render(self.tokenizer, message, self.prompts.system_prompt)

    # -- lm_head: reasoning -----------------------------------------------------------------
    @torch.no_grad()
    def reason(
        self,
        histories: Sequence[Sequence[HistoryEntry]],
        settings: GenerationSettings = GenerationSettings(),
        num_generations: int = 1,
        constraints: Sequence[Grammar | None] | None = None,
    ) -> Rollout:
        """Write `num_generations` reasoning texts per history in one batched `generate`
        (`constraints`: see `reason_from_ids`)."""
        prompt_ids = self.user_prompt_ids(histories)
        return self.reason_from_ids(prompt_ids, settings, num_generations, constraints)

    def token_strings(self) -> TokenStrings:
        """Every token's text (model/constrained.py), built on first use (~0.7 s for SmolLM2)."""
        if self._token_strings is None:
            self._token_strings = TokenStrings(self.tokenizer, self.stop_ids)
        return self._token_strings

    def title_lists(
        self,
        histories: Sequence[Sequence[HistoryEntry]],
        without: Sequence[Mapping[tuple[str, str], float] | None] | None = None,
        catalog: Mapping[str, str] | None = None,
        hints: Sequence[Sequence[str]] | None = None,
        facts: Sequence[Sequence[ItemFacts]] | None = None,
        max_liked: int = MAX_LIKED,
    ) -> list[Grammar]:
        """Per history, the grammar its reasoning's claims are decoded under
        (model/constrained.py): "Rated highest:" over the prompt window's titles that are truly among
        its highest-rated (model/rationale.py `rated_highest`; none when none is rated), so
        the list the reader sees is true of their history, and, for
        a model trained to end with "Picks:" (`PromptConfig.hint_picks`), that list over the
        prompt's co-watch hints (`without`, `catalog`: as the prompt was rendered; `hints`: the
        titles the prompts named, per history, when the caller has them). `facts`: per history,
        each entry's genres and decade (model/rationale.py `ItemFacts`); with them the other
        sentences are decoded over what holds for the window too: "Likes A, B and C" over its
        genres that hold (`liked_genres`), ", mostly 1990s" over its decades (`decade_phrases`),
        "Lately more D." over its drifting genres (`drifting_genres`; where none drifts, only a
        stop, or "Picks:" / "Next:" for a model trained to write it, may follow the rated list);
        where no genre holds or none drifts, "Likes" / "Lately more" may not be written anywhere (an
        empty `PhraseChoice`); each sentence may then be followed only by one of the format's
        later sentences that can hold, or a stop (`follow`). Without them those sentences are
        free. Where no title can be listed (a window of blank titles, or no ratings), "Rated
        highest:" may not be written. `max_liked`: how many of
        the genres that hold "Likes" may name from (the heaviest first; bench/bench_grammar.py
        measures the cap)."""
        window, strings, picks = self.prompts.max_history, self.token_strings(), self.prompts.hint_picks
        without = without if without is not None else [None] * len(histories)
        if hints is not None and len(hints) != len(histories):
            raise ValueError(f"{len(hints)} hint lists for {len(histories)} histories")
        if facts is not None and [len(f) for f in facts] != [len(h) for h in histories]:
            raise ValueError("facts must give one ItemFacts per history entry")
        if max_liked < 1:  # 0 would leave the sentence free, not forbid it
            raise ValueError(f"max_liked must be >= 1, got {max_liked}")
        out: list[Grammar] = []
        for j, (h, w) in enumerate(zip(histories, without, strict=True)):
            recent = self._catalog_history(list(h)[-window:])  # as the prompt shows them
            # only the window's titles that are truly among its highest-rated (none when unrated)
            titles = rated_highest([(e.title, e.rating) for e in recent])
            if not picks:
                named: Sequence[str] = []
            else:
                named = hints[j] if hints is not None else self.hint_titles(h, w, catalog)
                # a blank title cannot be listed: without one "Picks:" is neither offered nor free
                named = [self.catalog_text(t) for t in named if t and t.strip()]
            lists: list[TitleList | PhraseChoice | FormatStart] = []
            # what may come right after the rated list, besides a stop; "Next:" starts the free
            # hindsight guess of a model trained to write it (`PromptConfig.hindsight`)
            guess = [" " + NEXT] if self.prompts.hindsight else []
            follow = [" " + LATELY, *guess]
            drift: list[PhraseChoice] = []
            if facts is not None:
                window_facts = [
                    f if all(g == self.catalog_text(g) for g in f.genres)
                    else replace(f, genres=tuple(self.catalog_text(g) for g in f.genres))
                    for f in list(facts[j])[-window:]
                ]  # fmt: skip
                seen = list(zip(window_facts, [e.rating for e in recent], strict=True))
                decades = decade_phrases([(f.decade, r) for f, r in seen])
                drifting = drifting_genres([f.genres for f, _ in seen])
                # after each sentence, only the format's later ones that can hold, or a stop:
                # no free text between or after them ("... mostly 1990s. Rated highest; ...")
                last = [*guess, *([" " + PICKS] if named else []), ""]
                after_drift = [" " + LATELY] if drifting else []
                after_likes = [*([" " + RATED] if titles else []), *after_drift, *last]
                # a window without genres: no phrase, so "Likes" may not be written at all
                liked = liked_genres([(f.genres, r) for f, r in seen])
                ends = (MOSTLY, ".") if decades else (".",)
                phrases = likes_phrases(liked[:max_liked], ends=ends)
                lists.append(PhraseChoice(phrases, strings, LIKES, follow=after_likes))
                if decades:
                    lists.append(PhraseChoice(decades, strings, MOSTLY, follow=after_likes))
                # nothing drifts: no phrase, so no "Lately more" anywhere, and the rated list may
                # not lead into one
                drift.append(PhraseChoice([f" {g}." for g in drifting], strings, LATELY, follow=last))
                if not drifting:
                    follow = guess
            if named:
                follow.append(" " + PICKS)
            lists += [TitleList(titles, strings, follow=follow or ""), *drift]  # "": only a stop
            if named:
                lists.append(TitleList(named, strings, max_entries=picks, trigger=PICKS, follow=""))
            if facts is not None and self.prompts.taste_format:
                # the first sentence too: one that can hold, or a stop (listed last: module
                # docstring of model/constrained.py, `FormatStart`)
                openings = [*([LIKES] if liked else []), *([RATED] if titles else [])]
                openings += [LATELY] * bool(drifting) + [f.lstrip() for f in last if f]
                lists.append(FormatStart(openings, strings))
            out.append(lists[0] if len(lists) == 1 else TitleLists(lists))
        return out

    @torch.no_grad()
    def reason_from_ids(
        self,
        prompt_ids: list[list[int]],
        settings: GenerationSettings,
        num_generations: int = 1,
        constraints: Sequence[Grammar | None] | None = None,
    ) -> Rollout:
        """`constraints`: one per prompt (or None), see `title_lists`."""
        rows = [p for p in prompt_ids for _ in range(num_generations)]  # (B*G)
        if settings.max_new_tokens == 0:
            return Rollout(rows, [[] for _ in rows], ["" for _ in rows], num_generations)
        batch = left_pad(rows, self.pad_id, self.device)
        processors = LogitsProcessorList()
        if constraints is not None and any(c is not None for c in constraints):
            processors.append(TitleListProcessor(constraints, batch.input_ids.shape[1], num_generations))
        sampling = (
            {"do_sample": True, "temperature": settings.temperature, "top_k": settings.top_k}
            if settings.do_sample
            else {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
        )
        out = self.lm.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=settings.max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=self.stop_ids,
            logits_processor=processors,
            **sampling,
        )
        new = out[:, batch.input_ids.shape[1] :].tolist()  # (B*G, <=T)
        completions = [_through_stop(seq, self.stop_ids) for seq in new]
        texts = [reasoning_text(self.tokenizer, c) for c in completions]
        return Rollout(rows, completions, texts, num_generations)

    # -- rec_head: vectors and scores -------------------------------------------------------
    def user_sequences(
        self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]
    ) -> list[list[int]]:
        """[prompt; reasoning; closing marker] per row: what h_T is read at the end of."""
        return [list(p) + list(c) + self._marker_ids for p, c in zip(prompt_ids, completion_ids, strict=True)]

    def user_batch(
        self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]
    ) -> PaddedBatch:
        """`user_sequences`, left-padded, reasoning positions marked."""
        batch = left_pad(self.user_sequences(prompt_ids, completion_ids), self.pad_id, self.device)
        width = batch.input_ids.shape[1]
        for i, c in enumerate(completion_ids):
            end = width - len(self._marker_ids)
            batch.completion_mask[i, end - len(c) : end] = 1
        return batch

    def user_vectors_from_ids(
        self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """Normalised h_T (B, H), float32. Gradients flow if enabled by the caller."""
        batch = self.user_batch(prompt_ids, completion_ids)
        hidden = self.decoder_hidden(batch)[:, -1]  # (B, H)
        return F.normalize(hidden.float(), dim=-1)

    @torch.no_grad()
    def user_vectors(
        self,
        histories: Sequence[Sequence[HistoryEntry]],
        rollout: Rollout | None = None,
    ) -> torch.Tensor:
        """h_T after the reasoning in `rollout`, or straight after the prompt when None
        (the paper's "w/o reasoning" mode)."""
        if rollout is None:
            prompt_ids = self.user_prompt_ids(histories)
            return self.user_vectors_from_ids(prompt_ids, [[] for _ in prompt_ids])
        return self.user_vectors_from_ids(rollout.prompt_ids, rollout.completion_ids)

    def item_vectors_from_ids(self, item_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Normalised h_v (N, H) for already-tokenised item prompts, one batch."""
        batch = left_pad(item_ids, self.pad_id, self.device)
        return F.normalize(self.decoder_hidden(batch)[:, -1].float(), dim=-1)

    # -- frozen lower layers ----------------------------------------------------------------
    def frozen_layers(self) -> int:
        """How many of the lowest decoder layers hold no trainable parameter (0 when the
        embeddings train or the decoder is not a plain stack of `layers` + `norm`).

        Their outputs for a fixed prompt never change during training, so they can be
        computed once and reused (`lower_hidden` / `item_vectors_from_lower`)."""
        dec = self.lm.get_decoder()
        layers = getattr(dec, "layers", None)
        if layers is None or not hasattr(dec, "norm"):
            return 0
        if any(p.requires_grad for p in dec.get_input_embeddings().parameters()):
            return 0
        for i, layer in enumerate(layers):
            if any(p.requires_grad for p in layer.parameters()):
                return i
        return 0  # nothing in the stack trains (only heads, or nothing): no split to exploit

    @torch.no_grad()
    def cacheable_layers(self) -> int:
        """`frozen_layers()` when running the layers above them from their cached outputs gives
        the full forward's final states, checked on a short sequence; else 0. A decoder that
        transforms `inputs_embeds` before its layers (Granite multiplies them by its
        `embedding_multiplier`) would do that to the cached states too."""
        layers = self.frozen_layers()
        if layers == 0:
            return 0
        ids = [self.tokenizer.encode("Check the layer split.", add_special_tokens=False)]
        training = self.lm.training
        self.lm.eval()  # no dropout in either pass
        try:
            split = self.hidden_from_lower(self.lower_hidden(ids, layers), layers).float()
            full = self.decoder_hidden(left_pad(ids, self.pad_id, self.device)).float()
        finally:
            self.lm.train(training)
        error = float((split - full).norm() / full.norm())
        if error > 1e-2:
            log.warning(
                "the %d frozen layers are not cached: running the layers above them from their "
                "outputs gives other states than one forward (relative error %.3g; model type %s)",
                layers, error, getattr(self.lm.config, "model_type", "?"),
            )  # fmt: skip
            return 0
        return layers

    @contextmanager
    def _layer_range(self, start: int, stop: int, final_norm: bool) -> Iterator[torch.nn.Module]:
        """The decoder with only layers [start, stop) (and optionally no final norm), so its
        public forward runs part of the stack. Not thread-safe: training only."""
        dec = self.lm.get_decoder()
        layers, norm = dec.layers, dec.norm
        dec.layers = torch.nn.ModuleList(list(layers)[start:stop])
        if not final_norm:
            dec.norm = torch.nn.Identity()
        try:
            yield dec
        finally:
            dec.layers, dec.norm = layers, norm

    @torch.no_grad()
    def lower_hidden(self, ids: Sequence[Sequence[int]], layers: int) -> list[torch.Tensor]:
        """Per sequence, the input of decoder layer `layers` (len_i, H), model dtype, on the CPU."""
        batch = left_pad(ids, self.pad_id, self.device)
        with self._layer_range(0, layers, final_norm=False) as dec:
            hidden = dec(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            ).last_hidden_state
        width = hidden.shape[1]
        return [hidden[i, width - len(seq) :].cpu() for i, seq in enumerate(ids)]

    def hidden_from_lower(self, lower: Sequence[torch.Tensor], layers: int) -> torch.Tensor:
        """Final-layer hidden states (B, L, H), left-padded like `left_pad`, from `lower_hidden`
        outputs: runs only layers [layers, end) and the final norm. Equal to `decoder_hidden`
        on the same sequences while the layers below `layers` stay frozen."""
        width = max(len(h) for h in lower)
        hidden = lower[0].new_zeros((len(lower), width, self.hidden_size))
        for i, h in enumerate(lower):
            hidden[i, width - len(h) :] = h
        mask, position_ids = left_pad_mask([len(h) for h in lower], width)
        total = len(self.lm.get_decoder().layers)
        with self._layer_range(layers, total, final_norm=True) as dec:
            return dec(
                inputs_embeds=hidden.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=position_ids.to(self.device),
                use_cache=False,
            ).last_hidden_state

    def item_vectors_from_lower(self, lower: Sequence[torch.Tensor], layers: int) -> torch.Tensor:
        """Normalised h_v (N, H) from `lower_hidden` outputs: runs only layers [layers, end).
        Equal to `item_vectors_from_ids` while layers below `layers` stay frozen."""
        return F.normalize(self.hidden_from_lower(lower, layers)[:, -1].float(), dim=-1)

    @torch.no_grad()
    def item_vectors(
        self,
        items: Sequence[Mapping[str, object]],
        batch_size: int = 32,
        progress: bool = False,
    ) -> torch.Tensor:
        """Encode a catalog: (N, H) float32, rows in the order of `items`.

        Prompts are sorted by length so each batch carries little padding.
        """
        ids = self.item_prompt_ids(items)
        out = torch.empty((len(ids), self.hidden_size), dtype=torch.float32)
        bar = tqdm(total=len(ids), desc="encode items", unit="item", disable=not progress)
        for chunk in length_batches([len(p) for p in ids], batch_size):
            out[chunk] = self.item_vectors_from_ids([ids[i] for i in chunk]).cpu()
            bar.update(len(chunk))
        bar.close()
        return out

    def score(self, user_vecs: torch.Tensor, item_vecs: torch.Tensor) -> torch.Tensor:
        """s(u, v) = cos(h_T, h_v) / tau for normalised inputs: (B, H) x (N, H) -> (B, N)."""
        return user_vecs @ item_vecs.T / self.tau
