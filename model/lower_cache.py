"""The frozen lower layers' outputs of fixed training sequences, kept after their first use.

With LoRA on the top layers only (`lora_layers`), the layers below never change, so a
sequence's input to the first trainable layer is a constant. Item prompts are cached up front
(model/item_table.py). User sequences are cached here, lazily: the contrastive stage's
[prompt; marker] and the rationale stage's [prompt; rationale; stop; marker] are fixed per
training sample, so the first visit of a sample runs the whole model and every later visit
(a run that revisits samples, e.g. with `train_samples_per_user`) runs only the trainable
top: 8 of SmolLM2's 30 layers in the ml-100k recipe.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence

import torch

from model.r2ec import R2ec

log = logging.getLogger(__name__)


class LowerCache:
    """key -> the input of decoder layer `layers` for that key's sequence (len, H), on the CPU
    in the model's dtype, up to `max_gb`; keys past the budget are computed every time."""

    def __init__(self, layers: int, max_gb: float) -> None:
        if layers < 1:
            raise ValueError("a lower-layer cache needs frozen layers (lora_layers below the depth)")
        self.layers, self.max_bytes = layers, int(max_gb * 1e9)
        self.store: dict[Hashable, torch.Tensor] = {}
        self.bytes = 0
        self.hits = self.misses = 0

    def hidden(self, model: R2ec, keys: Sequence[Hashable], seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        """Final-layer hidden states (B, L, H) of `seqs`, left-padded like `left_pad`, with
        gradient through the trainable top layers; `keys[i]` names `seqs[i]`, which must be the
        same sequence every time the key comes back."""
        lowers: list[torch.Tensor | None] = [self.store.get(k) for k in keys]
        missing = [i for i, h in enumerate(lowers) if h is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = model.lower_hidden([seqs[i] for i in missing], self.layers)
            for i, h in zip(missing, fresh, strict=True):
                lowers[i] = h = h.clone()  # own storage: a view would pin the whole padded batch
                size = h.numel() * h.element_size()
                if self.bytes + size <= self.max_bytes:
                    self.store[keys[i]], self.bytes = h, self.bytes + size
        return model.hidden_from_lower(lowers, self.layers)

    def stats(self) -> dict[str, float]:
        total = max(1, self.hits + self.misses)
        return {"user_cache/hit_rate": self.hits / total, "user_cache/gb": self.bytes / 1e9}
