"""A bf16 matmul for the few rows of a decode step, on CPUs with AVX512-BF16.

A decode step multiplies 1-16 rows by every weight of the model, so it is bound by how fast the
weights stream from memory. oneDNN, torch's kernel for bf16 on the CPU, reads a weight at ~15-20
GB/s there on the 2-core reference machine (AMD EPYC, AVX512-BF16), where a plain sum of the same
bytes reads ~30 (BENCHMARKS.md §7, stop 25). `model/csrc/bf16_gemm.cpp` reads each weight as one
sequential stream per 16 output rows and multiplies with VDPBF16PS: 1.5-1.7x oneDNN for one row
of SmolLM2's 3072x576 gate/up weight, 1.0-1.3x for 9 rows (a speculative check), still ahead at
16.

It is a small C++ file compiled once with the machine's `g++` (`$CXX`) into a cache directory
(`cache_dir()`: `$R2EC_KERNEL_CACHE`, else `kernels/` in r2ec's cache, `~/.cache/r2ec`) and
called through ctypes, which releases the GIL; the file is named by a hash of the source and
flags, and written to a temporary name first, then renamed. A library already there (the Docker
image builds one with `--build`) needs no compiler. Where the CPU lacks AVX512-BF16, no
compiler is found, the build fails, or `R2EC_BF16_KERNEL=off`, `unavailable_reason()` says why and
the engine keeps oneDNN (model/engine.py `Linear`). `python -m model.bf16_gemm` builds it ahead of
time (the Docker image does) and prints what it found.

Numerics: each output is a float32 sum in k order rounded once to bf16, as oneDNN rounds, in
another summation order, so a few outputs differ from `F.linear`'s in the last bit
(tests/model/test_bf16_gemm.py). Exact mode (`R2EC_EXACT_DECODE`) never takes it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from model.backbone import default_cache_dir
from model.data.dataset import fsync_path

# The most rows one call takes: every row count up to 16 ran faster than oneDNN's prepacked
# weights in the stop-25 sweep (BENCHMARKS.md §7). The engine sends it every matmul of that
# many rows (decode steps, speculative checks, short prefills such as the closing marker's);
# longer prefills stay on oneDNN, whose blocking reuses each weight across rows.
ROWS = 16

SOURCE = Path(__file__).with_name("csrc") / "bf16_gemm.cpp"
FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16")
OFF_VALUES = ("0", "off", "false", "no", "onednn")
X86_64 = ("x86_64", "AMD64")  # platform.machine() of the CPUs the kernel is built for


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cache_dir() -> Path:
    """`$R2EC_KERNEL_CACHE`, else `kernels/` in r2ec's cache, where the converted backbones live
    (`$R2EC_CACHE_DIR`, else `~/.cache/r2ec`)."""
    if os.environ.get("R2EC_KERNEL_CACHE"):
        return Path(os.environ["R2EC_KERNEL_CACHE"])
    return default_cache_dir() / "kernels"


def _compiler_name() -> str:
    return os.environ.get("CXX", "g++")


def _compiler() -> str | None:
    return shutil.which(_compiler_name())


def library_path() -> Path:
    """Where the built kernel lives: named by a hash of its source and flags, so an edit rebuilds
    it and a library built ahead of time (the Docker image) is found without a compiler."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    return cache_dir() / f"bf16_gemm-{key}.so"


def build(compiler: str) -> Path:
    """Compile the kernel into the cache unless it is there; its path. Any x86-64 compiler
    with AVX-512 support builds it; only running it needs the CPU's AVX512-BF16."""
    path = library_path()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        cmd = [compiler, *FLAGS, str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-2000:]}")
        # mkstemp made it 0600 and the linker only adds execute bits: readable by every user, as
        # the image's non-root server loads what root built
        os.chmod(tmp, 0o755)
        fsync_path(Path(tmp))  # on the disk before its name: a power loss leaves no empty library
        os.replace(tmp, path)  # a concurrent build writes the same bytes under the same name
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@functools.cache
def _load() -> tuple[ctypes._CFuncPtr | None, str | None]:
    """(the kernel's entry point, None) or (None, why it is not used)."""
    if os.environ.get("R2EC_BF16_KERNEL", "auto").strip().lower() in OFF_VALUES:
        return None, "turned off by R2EC_BF16_KERNEL"
    if sys.platform != "linux" or platform.machine() not in X86_64:
        return None, f"not an x86-64 Linux machine ({sys.platform}, {platform.machine()})"
    if "avx512_bf16" not in _cpu_flags():
        return None, "the CPU has no AVX512-BF16"
    try:  # whatever goes wrong (no HOME, an unreadable cache, a failed build) leaves oneDNN in place
        path, compiler = library_path(), _compiler()
        if not path.exists() and compiler is None:
            return None, f"no C++ compiler ({_compiler_name()}) to build {SOURCE.name}"
        cached = path.exists()
        try:
            lib = ctypes.CDLL(str(path if cached else build(compiler)))
        except OSError as damaged:  # a library in the cache that does not load (cut short): built again
            if not cached or compiler is None:
                raise
            try:
                path.unlink(missing_ok=True)  # (another process sharing the cache may have done it)
                lib = ctypes.CDLL(str(build(compiler)))
            except Exception as exc:
                raise OSError(f"{damaged}; building it again: {exc}") from exc
    except Exception as exc:  # noqa: BLE001
        return None, f"could not build or load {SOURCE.name}: {exc}"
    fn = lib.r2ec_bf16_gemm
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int] * 4
    fn.restype = ctypes.c_int
    return fn, None


def unavailable_reason() -> str | None:
    """None when the kernel runs on this machine (building it on first call), else why not."""
    return _load()[1]


def fits(weight: torch.Tensor) -> bool:
    """Whether `weight` (N, K) can take the kernel: bf16 on the CPU, N a multiple of 16, K even."""
    return (
        weight.dim() == 2
        and weight.dtype == torch.bfloat16
        and weight.device.type == "cpu"
        and weight.shape[0] % 16 == 0
        and weight.shape[1] % 2 == 0
    )


def pack(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) -> the kernel's layout [N/16][K/2][16][2] (a copy; `fits(weight)` must hold)."""
    n, k = weight.shape
    return weight.detach().reshape(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x (M, K) bf16 times the packed weight's (N, K) transposed: (M, N) bf16, M <= ROWS."""
    fn, reason = _load()
    if fn is None:
        raise RuntimeError(f"the bf16 kernel is not available: {reason}")
    if (
        packed.dim() != 4
        or tuple(packed.shape[2:]) != (16, 2)
        or packed.dtype != torch.bfloat16
        or not packed.is_contiguous()
        or packed.device.type != "cpu"
    ):
        raise ValueError("packed must come from pack(): contiguous bfloat16 [N/16][K/2][16][2] on the CPU")
    groups, pairs = packed.shape[0], packed.shape[1]
    n, k = groups * 16, pairs * 2
    if x.dim() != 2 or x.shape[1] != k or x.dtype != torch.bfloat16 or x.device.type != "cpu":
        raise ValueError(f"x must be (M, {k}) bfloat16 on the CPU, got {tuple(x.shape)} {x.dtype}")
    m = x.shape[0]
    if not 1 <= m <= ROWS:
        raise ValueError(f"the kernel takes 1..{ROWS} rows, got {m}")
    x = x.contiguous()
    y = torch.empty(m, n, dtype=torch.bfloat16)
    rc = fn(x.data_ptr(), packed.data_ptr(), y.data_ptr(), m, n, k, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"r2ec_bf16_gemm returned {rc} for M={m} N={n} K={k}")
    return y


def main(argv: list[str] | None = None) -> int:
    """`python -m model.bf16_gemm`: build the kernel if this machine runs it, and say so.
    `--build`: build it whatever this CPU is (an image built on one machine, run on another);
    fails without a compiler."""
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--build"]:
        if platform.machine() not in X86_64:
            print(f"bf16 kernel not built: {platform.machine()} is not x86-64 (the engine uses oneDNN)")
            return 0
        compiler = _compiler()
        if compiler is None:
            print(f"no C++ compiler ({_compiler_name()})", file=sys.stderr)
            return 1
        print(f"bf16 kernel built: {build(compiler)}")
        return 0
    if argv:
        print("usage: python -m model.bf16_gemm [--build]", file=sys.stderr)
        return 2
    reason = unavailable_reason()
    if reason is None:
        print(f"bf16 kernel ready: {library_path()}")
    else:
        print(f"bf16 kernel not used: {reason} (the engine keeps oneDNN's matmuls)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
