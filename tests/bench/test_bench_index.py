"""bench/bench_index.py measures what the service builds: its defaults are index/faiss_index.py's
parameters, and `--checkpoint` measures a checkpoint's own item vectors."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "bench" / "bench_index.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_index", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_defaults_are_the_services_index_parameters_and_a_checkpoint_can_be_measured(
    versions_root, monkeypatch, capsys
):
    from index.faiss_index import IndexConfig, default_nlist

    bench, service = _bench(), IndexConfig()
    argv = ["bench_index.py", "--checkpoint", str(versions_root / "v0"), "--recall-queries", "3"]
    monkeypatch.setattr(sys, "argv", [*argv, "--queries", "1", "2", "--repeats", "1", "--blas-repeats", "1"])
    bench.main()
    out = capsys.readouterr().out
    assert "8 of its items indexed, 3 held out as the queries" in out  # the tiny catalog's 11
    rows = [line.split("|")[2:4] for line in out.splitlines() if line.startswith("| 8 |")][:3]
    params = [f"M={service.hnsw_m} efC={service.ef_construction} efS={service.ef_search}"]
    assert [(k.strip(), p.strip()) for k, p in rows] == [  # 8 items train no ivf: flat, as served
        ("flat", "exact"),
        ("ivf", "exact"),
        ("hnsw", params[0]),
    ]
    assert default_nlist(100_000) == 1265 and default_nlist(10**7) == 4096  # what a bare run builds
