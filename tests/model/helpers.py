"""Shared by the training tests: a few optimizer steps on one fixed batch."""

from __future__ import annotations

from collections.abc import Callable

import torch


def stats_over_steps(
    trainer, loss: Callable[[], tuple[torch.Tensor, dict[str, float]]], steps: int = 4
) -> list[dict[str, float]]:
    """`loss()`'s stats before each of `steps` optimizer updates and after the last one."""
    history = []
    for step in range(steps + 1):
        value, stats = loss()
        history.append(stats)
        if step < steps:
            value.backward()
            trainer.opt.step()
    return history
