"""What counting the edit log costs an item edit (index/journal.py): the whole log read at each
edit (`journal.count`) against the counter that reads only what was appended since
(`journal.Counter`, what service/catalog.py asks after every edit).

    python3 bench/bench_journal.py --edits 1000 --dim 576
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from index import journal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=1000, help="edits appended (the default SNAPSHOT_EVERY)")
    parser.add_argument("--dim", type=int, default=576, help="vector size (SmolLM2-135M's hidden size)")
    args = parser.parse_args()
    vector = np.zeros(args.dim, np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        counter = journal.Counter(directory)
        whole = incremental = 0.0
        for n in range(args.edits):
            journal.append(directory, [{"item_id": str(n), "record": {"title": "x" * 40}, "vector": vector}])
            started = time.perf_counter()
            a = journal.count(directory)
            whole += time.perf_counter() - started
            started = time.perf_counter()
            b = counter()
            incremental += time.perf_counter() - started
            assert a == b == n + 1
        size = journal.path_of(directory).stat().st_size / 1e6
    print(f"{args.edits} edits of {args.dim}-d vectors, a {size:.1f} MB log:")
    print(f"  whole-log count at each edit: {whole * 1e3:.0f} ms in all")
    ratio = whole / incremental
    print(f"  journal.Counter:              {incremental * 1e3:.0f} ms in all ({ratio:.0f}x less)")


if __name__ == "__main__":
    main()
