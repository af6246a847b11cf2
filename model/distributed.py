"""Thin helpers over torch.distributed that are no-ops in a single process.

`torchrun --nproc_per_node N` / `accelerate launch` set RANK and WORLD_SIZE; we pick
gloo on CPU and nccl on GPU. Gradients are averaged explicitly after each backward
(`all_reduce_gradients`), the same arithmetic DDP does, because the trainer calls the
model's decoder and generate() directly rather than one forward() DDP could hook.
"""

from __future__ import annotations

import os
import random
import re
from typing import Any

import numpy as np
import torch
import torch.distributed as td


def init() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not td.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())  # nccl and all_gather_object use the current device
        td.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def default_device() -> torch.device:
    """This process's GPU when there is one (cuda:LOCAL_RANK), else the CPU."""
    return torch.device(f"cuda:{local_rank()}") if torch.cuda.is_available() else torch.device("cpu")


def check_device_name(name: str) -> str:
    """A device setting: auto, cpu, cuda or cuda:N; anything else is a ValueError (so "cudax"
    or "cuda:" fails here, not later inside torch)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return name


def resolve_device(name: str) -> torch.device:
    """A device setting → a torch device; "auto" and a bare "cuda" mean this process's GPU.
    ValueError for a GPU this machine does not have, before any model is loaded onto it."""
    if check_device_name(name) == "auto":
        return default_device()
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device")
    device = default_device() if name == "cuda" else torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {name!r} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)"
        )
    return device


def _comm_device() -> torch.device:
    # nccl moves only GPU tensors; gloo only CPU ones.
    return default_device() if td.get_backend() == "nccl" else torch.device("cpu")


def active() -> bool:
    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def rank() -> int:
    return td.get_rank() if active() else 0


def world_size() -> int:
    return td.get_world_size() if active() else 1


def barrier() -> None:
    if active():
        td.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes; the result stays on t's device whatever the backend needs."""
    if active():
        moved = t.to(_comm_device())
        td.all_reduce(moved, op=td.ReduceOp.SUM)
        return moved.to(t.device)
    return t


def any_flag(flag: bool) -> bool:
    """True on every process if it is True on any (so all stop at the same step)."""
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return bool(t.item())


def broadcast_parameters(params: list[torch.nn.Parameter]) -> None:
    if active():
        for p in params:
            td.broadcast(p.data, src=0)


def all_reduce_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average .grad over processes (what DDP's reducer does, without bucketing)."""
    if not active():
        return
    world = td.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        td.all_reduce(p.grad, op=td.ReduceOp.SUM)
        p.grad.div_(world)


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's rows; gradients flow back to each process's own rows."""
    if not active():
        return t
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t), dim=0)


def gather_objects(obj: list[Any]) -> list[Any]:
    """Concatenate every process's list, rank order."""
    if not active():
        return list(obj)
    out: list[list[Any]] = [[] for _ in range(td.get_world_size())]
    td.all_gather_object(out, list(obj))
    return [x for part in out for x in part]


def gather_rng_states() -> list[dict]:
    """Every process's RNG states (torch, CUDA, numpy, python), rank order: what an exact
    resume restores. Collective: every process calls it. Only tensors and plain Python values
    (numpy's key as an int64 tensor), so that the resume state loads with
    torch.load(weights_only=True), which unpickles nothing else (model/train.py)."""
    name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    numpy_state = (str(name), torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    rng = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()  # sampling on the GPU draws from this one
    return gather_objects([rng])


def restore_rng_state(states: list[dict]) -> None:
    """Set this process's RNGs from `gather_rng_states()`'s list (rank 0's when the run now
    has more processes than saved it); numpy's key as a tensor, or as the uint32 array the
    resume states of earlier versions hold."""
    rng = states[rank()] if rank() < len(states) else states[0]
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    name, key, *rest = rng["numpy"]
    key = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
    np.random.set_state((name, key.astype(np.uint32), *rest))
    random.setstate(rng["python"])
