"""R²ec model core: backbone loading, prompts, the two-head model, RecPO, evaluation.

With 2 torch threads and any other busy process, OpenMP's spin-waiting makes
generation ~10x slower on the 2-core machines this runs on (docs/architecture.md §6), and the
policy is read once when libgomp loads, so it must be set before torch is
imported. `setdefault` keeps a user's explicit choice.

This is the one place it is set: entry points (the `r2ec` command, bench/) import `model`
before torch or faiss.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# How long (busy-wait iterations, roughly 0.1-0.3 ms here) OpenMP's threads spin after a
# kernel before they sleep, for a process meant to have cores of its own (`r2ec serve`; see
# `spin_between_kernels`; GOMP_SPINCOUNT=0 where it shares them, as deploy/k8s sets).
SERVE_SPINCOUNT = "10000"


def spin_between_kernels() -> None:
    """Let OpenMP's threads spin briefly between kernels instead of sleeping at once: for a
    process that has its cores to itself, i.e. `r2ec serve`, one replica per container or host.

    A decode step is ~120 matmuls ~10 µs apart, and a sleeping thread takes tens of µs to wake
    for each, so with sleeping threads a batch-1 step takes 1.34x as long (BENCHMARKS.md §4,
    "OpenMP threads that spin between kernels"; bench/bench_spin.py). The cost: while another
    process keeps a core busy, spinning threads take its time and a step gets 2.4x slower;
    `GOMP_SPINCOUNT=0` (read,
    like the policy, once when libgomp loads) makes them sleep at once again. Must run before
    torch is imported; a value the user set is kept."""
    os.environ.setdefault("GOMP_SPINCOUNT", SERVE_SPINCOUNT)
