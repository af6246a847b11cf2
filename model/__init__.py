"""R²ec model core: backbone loading, prompts, the two-head model, RecPO, evaluation.

With 2 torch threads and any other busy process, OpenMP's spin-waiting makes
generation ~10x slower on the 2-core machines this runs on (docs/architecture.md §6), and the
policy is read once when libgomp loads, so it must be set before torch is
imported. `setdefault` keeps a user's explicit choice.

This is the one place it is set: entry points (the `r2ec` command, bench/) import `model`
before torch or faiss. Where something loaded OpenMP first (`import torch` in a notebook's
first cell) and the environment sets no policy, the default here comes too late:
`omp_policy_warning` says so, and `Recommender.load` logs it.
"""

import os
import sys


def _openmp_loaded() -> bool:
    """Whether an OpenMP runtime (torch's or faiss's libgomp, Intel's libiomp) is in this process
    already: torch imported, or the library mapped (Linux's /proc/self/maps)."""
    if "torch" in sys.modules:
        return True
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return any("libgomp" in line or "libiomp" in line for line in maps)
    except OSError:
        return False


# True where OpenMP was loaded before this package with no OMP_WAIT_POLICY in the environment:
# the policy is read once, at the library's load, so the setdefault below has no effect
POLICY_TOO_LATE = "OMP_WAIT_POLICY" not in os.environ and _openmp_loaded()

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def omp_policy_warning() -> str | None:
    """What to do where the PASSIVE default came too late (`POLICY_TOO_LATE`), else None.
    Measured in BENCHMARKS.md §3 ("torch imported before the project")."""
    if not POLICY_TOO_LATE:
        return None
    return (
        "torch (OpenMP) was loaded before the `model` package, so its default OMP_WAIT_POLICY=PASSIVE "
        "came too late: OpenMP threads spin between kernels, which makes generation several times "
        "slower wherever other processes use the cores (BENCHMARKS.md §3). Set OMP_WAIT_POLICY=PASSIVE "
        "in the environment before Python starts (in Jupyter, `%env` is too late once torch is loaded: "
        "set it in the kernel's environment), or import `service` or `model` before torch; setting "
        "OMP_WAIT_POLICY yourself, to any value, silences this"
    )


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
