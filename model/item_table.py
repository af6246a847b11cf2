"""The item table H_V: every catalog item's normalised vector, as training sees it.

Targets and sampled negatives are encoded live (with gradient) and written back row by
row; the whole catalog is re-encoded every `refresh_every` steps and before each eval.
When LoRA adapts only the top layers, each item prompt's output of
the frozen layers below is computed once and kept (`cache_lower`), so live encoding runs
only the trainable layers. Under torchrun each process encodes a shard of a refresh.

Shapes: N items, H hidden, C columns (items) of a batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from model import distributed as dist
from model.r2ec import R2ec, length_batches

log = logging.getLogger(__name__)


@dataclass
class ItemTable:
    """The full catalog's normalised vectors, refreshed lazily (docs/architecture.md §3 step 7)."""

    item_ids: list[str]
    prompt_ids: list[list[int]]
    vectors: torch.Tensor  # (N, H) float32, detached
    row: dict[str, int] = field(default_factory=dict)
    log_q: torch.Tensor | None = None  # (N,) log share of training targets, for logQ correction
    # Each item's input to decoder layer `lower_layers` (len_i, H): the layers below it are
    # frozen, so item encoding with gradient runs only the trainable top (`cache_lower`).
    lower: list[torch.Tensor] | None = None
    lower_layers: int = 0

    def set_target_counts(self, targets: list[str]) -> None:
        """log q(item) from the training targets (add-one smoothed)."""
        counts = torch.ones(len(self.item_ids))
        for t in targets:
            if t in self.row:
                counts[self.row[t]] += 1
        self.log_q = (counts / counts.sum()).log()

    @classmethod
    def build(cls, model: R2ec, items: list[dict]) -> ItemTable:
        ids = [str(it["item_id"]) for it in items]
        table = cls(ids, model.item_prompt_ids(items), torch.zeros(len(ids), model.hidden_size))
        table.row = {item: i for i, item in enumerate(ids)}
        return table

    @torch.no_grad()
    def refresh(self, model: R2ec, batch_size: int = 32, progress: bool = False) -> None:
        """Re-encode every item; each process encodes a shard, then all gather."""
        chunks = length_batches(self.lengths, batch_size, dist.rank(), dist.world_size())
        out = torch.zeros_like(self.vectors)
        bar = tqdm(
            total=sum(map(len, chunks)),
            desc="refresh item table",
            unit="item",
            disable=not progress,
            leave=False,
        )
        for chunk in chunks:
            out[chunk] = self.encode_rows(model, chunk).cpu()
            bar.update(len(chunk))
        bar.close()
        self.vectors = dist.all_reduce_sum(out)  # each row was written by exactly one process

    @property
    def lengths(self) -> list[int]:
        return [len(p) for p in self.prompt_ids]

    def encode(self, model: R2ec, item_ids: list[str]) -> torch.Tensor:
        """Normalised vectors (n, H) of these items under the current weights, with gradient
        when enabled; from the frozen-layer cache when there is one."""
        return self.encode_rows(model, [self.row[i] for i in item_ids])

    def encode_rows(self, model: R2ec, rows: list[int]) -> torch.Tensor:
        if self.lower is None:
            return model.item_vectors_from_ids([self.prompt_ids[r] for r in rows])
        return model.item_vectors_from_lower([self.lower[r] for r in rows], self.lower_layers)

    def cache_lower(self, model: R2ec, max_gb: float, batch_size: int = 32, progress: bool = False) -> None:
        """Run every item prompt once through the model's frozen lower layers and keep the
        result, when there are frozen layers (LoRA on the top layers only) that the model can
        run the rest from (`R2ec.cacheable_layers`) and the cache fits in `max_gb`. Live item
        encoding (the bulk of a contrastive step) then costs only the trainable layers: 8 of
        SmolLM2's 30 in the ml-100k recipe."""
        self.lower, self.lower_layers = None, model.cacheable_layers()
        tokens = sum(self.lengths)
        size_gb = tokens * model.hidden_size * next(model.lm.parameters()).element_size() / 1e9
        if self.lower_layers == 0 or size_gb > max_gb:
            log.info("item layer cache off (frozen layers %d, %.2f GB)", self.lower_layers, size_gb)
            return
        lower: list[torch.Tensor | None] = [None] * len(self.prompt_ids)
        bar = tqdm(total=len(lower), desc="cache frozen layers", unit="item", disable=not progress)
        for chunk in length_batches(self.lengths, batch_size):
            hidden = model.lower_hidden([self.prompt_ids[i] for i in chunk], self.lower_layers)
            for i, h in zip(chunk, hidden, strict=True):
                lower[i] = h.clone()  # own storage: a view would pin the whole padded batch
            bar.update(len(chunk))
        bar.close()
        self.lower = lower
        log.info("item layer cache: %d layers x %d items, %.2f GB", self.lower_layers, len(lower), size_gb)

    def history_mask(self, histories: list[list[str]], repeat: int = 1) -> torch.Tensor:
        """(len(histories) * repeat, N) bool: True where the item is in that row's history."""
        mask = torch.zeros(len(histories) * repeat, len(self.item_ids), dtype=torch.bool)
        for u, hist in enumerate(histories):
            cols = [self.row[i] for i in hist if i in self.row]
            mask[u * repeat : (u + 1) * repeat, cols] = True
        return mask

    def log_q_of(self, item_ids: list[str]) -> torch.Tensor:
        """log q (C,) of these items, from `set_target_counts`."""
        return self.log_q[[self.row[i] for i in item_ids]]

    def sample_uniform(self, n: int) -> list[str]:
        """n items drawn uniformly from the catalog, different on each process (mixed negative
        sampling, Yang et al. 2020): they correct in-batch negatives' popularity skew and, being
        encoded live like the targets, cannot be told apart from them by staleness."""
        if n == 0:
            return []
        seed = int(torch.randint(2**31 - 1, (1,))) + dist.rank()  # advances the (saved) torch RNG
        picks = torch.randint(len(self.item_ids), (n,), generator=torch.Generator().manual_seed(seed))
        return [self.item_ids[i] for i in picks.tolist()]

    def update(self, item_ids: list[str], vectors: torch.Tensor) -> None:
        # Out of place: the old table may still be part of a graph awaiting backward.
        rows = torch.tensor([self.row[i] for i in item_ids])
        self.vectors = self.vectors.index_copy(0, rows, vectors.detach().float().cpu())
