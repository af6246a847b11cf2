"""SASRec (Kang & McAuley, ICDM 2018) as a reference baseline under the same harness.

A small causal transformer over item-id embeddings, trained on the very prepared samples
R²ec trains on (each train sample's <= 20-item history and its target), scored against the
whole catalog like every other model here. It has no text and no reasoning: it shows where
an id-based sequential recommender of the field stands on the same split and mask.

Training follows RecBole's SASRec with `loss_type: CE`: every prefix of a user's sequence
is a sample (the prepared train split already is that), the hidden state at the last
position predicts the sample's target, cross-entropy over the full catalog, item
embeddings shared between input and output.

Shapes: B sequences, L positions (max_len), D hidden, N items (+1 for padding at row 0).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SASRecConfig:
    """Hyper-parameters; the sizes, dropout and learning rate are RecBole 1.2's SASRec.yaml;
    not RecBole's are max_len (the prepared histories hold <= 20 items; RecBole's 50), the
    batch (256; RecBole trains with 2048) and the epochs (a CPU-minutes budget and no early
    stopping; RecBole runs up to 300, stopping on valid MRR@10): 10, the default of `r2ec eval
    --baseline sasrec` and of `evaluate_sasrec`, as every documented SASRec number.

    hidden_size: D, the item embedding and transformer width; inner_size: feed-forward width.
    num_layers / num_heads: transformer blocks and attention heads.
    dropout: on embeddings, attention and the feed-forward layers.
    max_len: positions; longer histories keep their latest items.
    epochs / batch_size / learning_rate / weight_decay: Adam training schedule.
    seed: initialisation and batch order.
    """

    hidden_size: int = 64
    inner_size: int = 256
    num_layers: int = 2
    num_heads: int = 2
    dropout: float = 0.5
    max_len: int = 20
    epochs: int = 10  # the one default: cli/eval.py reads it
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads})")
        if min(self.max_len, self.epochs, self.batch_size) < 1:
            raise ValueError("max_len, epochs and batch_size must be >= 1")


class SASRec(nn.Module):
    def __init__(self, num_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.items = nn.Embedding(num_items + 1, cfg.hidden_size, padding_idx=0)  # row 0 = padding
        self.positions = nn.Embedding(cfg.max_len, cfg.hidden_size)
        layer = nn.TransformerEncoderLayer(
            cfg.hidden_size,
            cfg.num_heads,
            dim_feedforward=cfg.inner_size,
            dropout=cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=False,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        for block in self.encoder.layers:  # RecBole's FeedForward drops out after its second layer
            block.dropout = nn.Identity()  # only (torch's also drops between the two)
        self.norm = nn.LayerNorm(cfg.hidden_size)
        self.drop = nn.Dropout(cfg.dropout)
        nn.init.normal_(self.items.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        """seqs (B, L) of item rows, left-padded with 0 -> hidden state at each position (B, L, D)."""
        B, L = seqs.shape
        x = self.items(seqs) + self.positions(torch.arange(L, device=seqs.device))
        x = self.drop(self.norm(x))
        # Causal and padding masks as one additive mask with a finite "minus infinity", as
        # RecBole does: a padded query row (it sees only padding) then stays finite instead of
        # NaN, which would leak into real rows through 0 * NaN in the next layer.
        future = torch.triu(torch.ones(L, L, dtype=torch.bool, device=seqs.device), diagonal=1)
        blocked = future.unsqueeze(0) | (seqs == 0).unsqueeze(1)  # (B, L, L)
        mask = torch.zeros(blocked.shape, device=seqs.device).masked_fill(blocked, -1e4)
        return self.encoder(x, mask=mask.repeat_interleave(self.cfg.num_heads, dim=0))

    def catalog_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., N): inner product with every real item (padding row dropped)."""
        return hidden @ self.items.weight[1:].T


def _sequences(samples: pd.DataFrame, row: dict[str, int], max_len: int) -> np.ndarray:
    """Left-padded item rows (S, L) of each sample's history (0 = padding)."""
    seqs = np.zeros((len(samples), max_len), dtype=np.int64)
    for s, hist in enumerate(samples["history_item_ids"]):
        ids = [row[str(i)] + 1 for i in hist if str(i) in row][-max_len:]
        if ids:
            seqs[s, -len(ids) :] = ids
    return seqs


def train_sasrec(
    train: pd.DataFrame, items: pd.DataFrame, cfg: SASRecConfig | None = None, progress: bool = True
) -> tuple[SASRec, dict]:
    """Fit SASRec on the train split's samples; returns the model (in eval mode) and stats."""
    cfg = cfg or SASRecConfig()
    torch.manual_seed(cfg.seed)
    row = {str(i): j for j, i in enumerate(items["item_id"].astype(str))}
    seqs = torch.from_numpy(_sequences(train, row, cfg.max_len))
    targets = torch.tensor([row[str(t)] for t in train["target_item_id"]])
    model = SASRec(len(row), cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    start, losses = time.perf_counter(), []
    bar = tqdm(range(cfg.epochs), desc="train sasrec", unit="epoch", disable=not progress)
    for _ in bar:
        model.train()
        total, count = 0.0, 0
        for batch in torch.randperm(len(seqs), generator=gen).split(cfg.batch_size):
            hidden = model(seqs[batch])[:, -1]  # (B, D): after the latest item
            loss = F.cross_entropy(model.catalog_logits(hidden), targets[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(batch), count + len(batch)
        losses.append(total / count)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    stats = {"epochs": cfg.epochs, "loss": losses, "seconds": time.perf_counter() - start, **asdict(cfg)}
    log.info("sasrec: %d epochs in %.1fs, final loss %.3f", cfg.epochs, stats["seconds"], losses[-1])
    return model, stats


@torch.no_grad()
def sasrec_scores(model: SASRec, samples: pd.DataFrame, items: pd.DataFrame) -> torch.Tensor:
    """(S, N) catalog scores for each sample: the hidden state after its last history item."""
    row = {str(i): j for j, i in enumerate(items["item_id"].astype(str))}
    seqs = torch.from_numpy(_sequences(samples, row, model.cfg.max_len))
    # PyTorch's inference fast path for encoder layers turns the padded rows' attention into
    # NaN with this mask (seen with torch 2.13); the regular path is exact and fast enough here.
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        return model.catalog_logits(model(seqs)[:, -1])
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
