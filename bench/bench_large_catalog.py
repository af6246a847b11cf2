"""A large catalog on one replica: memory by catalog size, what an item edit costs, items/s encoded.

    python3 bench/bench_large_catalog.py memory --checkpoint checkpoints/current --items 200000
    python3 bench/bench_large_catalog.py edits  --checkpoint checkpoints/current --items 200000
    python3 bench/bench_large_catalog.py encode --checkpoint checkpoints/current --data data/ml-100k/loo
    python3 bench/bench_large_catalog.py batch  --checkpoint checkpoints/current --batch-items 256 [--tiny]
    python3 bench/bench_large_catalog.py follow --checkpoint checkpoints/current --batch-items 1000 [--tiny]

`memory` and `edits` serve a stand-in of `--items` items (`write_stand_in`): a copy of the
checkpoint, its model, with synthetic items (titles of its catalog's words) and their vectors
drawn from its vectors plus noise, normalised. Not what encoding them would give: it measures
the memory and time a catalog that size costs, not its quality (encoding 200k items on a CPU
takes hours: `encode`).

memory: each run in a process of its own loads the checkpoint as the service does
(`Recommender.load`: model, catalog, index, title index) and prints VmRSS in MB: the checkpoint
itself (base), then the stand-in at a first start (its index built and saved), at a restart
(the saved index loaded) and during a reload (a second load beside the first, what a reload
holds until its swap). The item table is mapped from item_vectors.npy (as shipped) or read into
memory (`--table read`: as before journey 39's finding 4), in the same run; and one restart
without the title index, to show its share.

edits: in process, on the stand-in: what PUT /items costs (encode, index, the edit log's
append: median and p90 of `--edits`; first `--edits` more with the catalog's lock a plain
threading.Lock, as before index/fair_lock.py, for their median, p90 and max), the bytes an
edit appends, and the full save the log triggers every SNAPSHOT_EVERY edits; with a thread
searching meanwhile (batches of 8 user vectors, k 10), the longest search during the edits and
during the full save, and during the full save as it was done before (the index's lock held
through the write and its flush).

encode: items/s of `encode_catalog` (what `r2ec checkpoint init` runs) on the checkpoint's
model, `--encode-items` items of `--data`'s catalog, at each `--batch-sizes`.

batch: what POST /items:batch saves against one PUT per item, in process on a copy of the
checkpoint (`--tiny`: an untrained tiny-model checkpoint over its items instead, as the tests
use): `--batch-items` new items upserted one by one (`Catalog.upsert`, what each PUT runs:
encode alone, index, one log append and flush) against the same texts under other ids as one
batch the way the service runs it (`Catalog.encode_items` on EDIT_BATCH_CHUNK items at a time,
each chunk a turn of the model thread, then `Catalog.edit_many`: one index pass, one append),
`--rounds` times in turn; items/s of each, their ratio, and how long one chunk holds the
model thread (what a recommendation waiting for it waits at most, beside the apply), at each
of `--chunks` (chunk sizes; default the service's).

follow: what a replica pays for a batch another replica made, when the batch filled the edit
log and its full save cut the log before this replica's watch tick (review 40 sync, finding 2):
on a copy of the checkpoint (`--tiny` as for batch), the writer takes `--batch-items` new items
as one batch (encoded EDIT_BATCH_CHUNK at a time, `Catalog.edit_many`; SNAPSHOT_EVERY set to
the batch's size, which is SNAPSHOT_EVERY itself at the default 1000), which starts a full save;
then two followers over the same directory, opened before the batch (replicas on one volume,
sharing the model in this process), each sync once (`Catalog.sync_edits`, encoding
EDIT_BATCH_CHUNK items per call as the service's sync does): one as before the previous edit
log (index/journal.py `read_previous` reads nothing, so the batch is encoded: the code before
this change), one as now. The items each encoded, the seconds its sync took and how its vectors
compare with the writer's, `--rounds` times, which follower goes first alternating.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory in MB: all of it (VmRSS), or the anonymous part (RssAnon:
    not pages of files, which the kernel can drop and read again)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_stand_in(source: Path, out: Path, n: int, seed: int = 0) -> Path:
    """`source` (a checkpoint) copied to `out` with `n` synthetic items and vectors."""
    import numpy as np
    import pandas as pd

    from model.checkpoint import ITEMS_FILE, META_FILE, VECTORS_FILE, resolve_checkpoint

    source = resolve_checkpoint(source)
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("index"))
    items = pd.read_parquet(source / ITEMS_FILE)
    vectors = np.load(source / VECTORS_FILE)
    rng, r = np.random.default_rng(seed), random.Random(seed)
    words = sorted({w for t in items.title for w in t.replace(",", " ").split() if w.isalpha()})
    genres = sorted({g.strip() for gs in items.genres for g in str(gs).split(",") if g.strip()})

    def title() -> str:
        t = [r.choice(words) for _ in range(r.randint(1, 4))]
        if r.random() < 0.5:  # a word no other title has, half the time
            t.insert(
                r.randrange(len(t) + 1), "".join(r.choices(string.ascii_lowercase, k=r.randint(3, 9))).title()
            )
        return " ".join(t)

    frame = pd.DataFrame(
        {
            "item_id": [f"sku-{i}" for i in range(n)],
            "title": [title() for _ in range(n)],
            "year": [str(r.randint(1930, 2024)) for _ in range(n)],
            "genres": [", ".join(r.sample(genres, r.randint(1, 3))) for _ in range(n)],
            "description": [""] * n,
        }
    )
    frame.to_parquet(out / ITEMS_FILE, index=False)
    v = vectors[rng.integers(0, len(vectors), n)] + 0.05 * rng.standard_normal(
        (n, vectors.shape[1]), np.float32
    )
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    np.save(out / VECTORS_FILE, v.astype(np.float32))
    meta = json.loads((out / META_FILE).read_text())
    (out / META_FILE).write_text(json.dumps({**meta, "num_items": n, "version": f"stand-in-{n}"}))
    return out


# ------------------------------------------------------------------------------ memory
def memory_child(spec: dict) -> dict:
    """One load (two for a reload) in this process; VmRSS after it."""
    import numpy as np

    if spec["table"] == "read":  # as before: the table read into memory beside the index
        real_load = np.load
        np.load = lambda file, mmap_mode=None, **kw: real_load(file, **kw)
    if not spec["titles"]:
        from service.catalog import Catalog

        Catalog.build_titles = lambda self, **kw: None
    from service.recommender import Recommender

    kwargs = {"dtype": "bfloat16", "threads": 2, "warmup_requests": 0}
    started = time.perf_counter()
    engine = Recommender.load(spec["path"], **kwargs)
    out = {"rss": rss_mb(), "anon": rss_mb("RssAnon"), "load_s": time.perf_counter() - started}
    out["items"] = len(engine.catalog)  # (and the first engine held through a reload's load)
    if spec["reload"]:
        second = Recommender.load(spec["path"], **kwargs)
        out["reload_rss"] = rss_mb()
        del second
    return out


def run_child(spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, __file__, "child", json.dumps(spec)], capture_output=True, text=True, env=env
    )
    if done.returncode:
        sys.exit(f"{spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory(args: argparse.Namespace, tmp: Path) -> None:
    base = shutil.copytree(args.checkpoint, tmp / "base", ignore=shutil.ignore_patterns("index"))
    big = write_stand_in(args.checkpoint, tmp / "big", args.items)
    runs = [
        ("base", base, "mapped", "first start", True, False),
        ("base", base, "mapped", "restart", True, False),
        ("base", base, "mapped", "reload", True, True),
    ]
    for table in args.table:
        runs += [
            (f"{args.items:,}", big, table, "first start", True, False),
            (f"{args.items:,}", big, table, "restart", True, False),
            (f"{args.items:,}", big, table, "reload", True, True),
        ]
    runs.append((f"{args.items:,}", big, "mapped", "restart, no title index", False, False))
    print("| items | item table | run | load s | RSS MB (anonymous) | RSS during a reload MB |")
    print("|---|---|---|---|---|---|")
    for label, path, table, what, titles, reload in runs:
        if what == "first start":
            shutil.rmtree(path / "index", ignore_errors=True)
        got = run_child({"path": str(path), "table": table, "titles": titles, "reload": reload})
        during = f"{got['reload_rss']:.0f}" if "reload_rss" in got else ""
        rss = f"{got['rss']:.0f} ({got['anon']:.0f})"
        print(f"| {label} | {table} | {what} | {got['load_s']:.1f} | {rss} | {during} |", flush=True)


# ------------------------------------------------------------------------------ edits
class Searcher:
    """A thread searching the catalog in a loop (batches of 8 user vectors, k 10), timing each."""

    def __init__(self, catalog, vectors) -> None:
        self.catalog, self.vectors = catalog, vectors
        self.times: list[tuple[float, float]] = []  # (start, seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from index import search_without_threads

        search_without_threads()
        exclude = [set()] * len(self.vectors)
        while not self._stop.is_set():
            t = time.perf_counter()
            self.catalog.search(self.vectors, 10, exclude)
            self.times.append((t, time.perf_counter() - t))

    def longest(self, start: float, end: float) -> float:
        """The longest search that overlapped [start, end], in ms."""
        return 1e3 * max((s for t, s in self.times if t <= end and t + s >= start), default=0.0)

    def median(self, start: float, end: float) -> float:
        return 1e3 * statistics.median([s for t, s in self.times if start <= t and t + s <= end] or [0.0])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def edits(args: argparse.Namespace, tmp: Path) -> None:
    import numpy as np

    from index import journal
    from service.recommender import Recommender

    big = write_stand_in(args.checkpoint, tmp / "big", args.items)
    engine = Recommender.load(big, dtype="bfloat16", threads=2, warmup_requests=0)
    catalog = engine.catalog
    catalog.snapshot_every = 10**9  # the full save timed on its own, below
    os.sync()  # the stand-in's files on the disk: an edit's flush does not wait behind their writeback
    directory = catalog._directory
    rng = np.random.default_rng(0)
    users = np.asarray(catalog.checkpoint.item_vectors[rng.integers(0, len(catalog), 8)], dtype=np.float32)
    searcher = Searcher(catalog, users)
    time.sleep(2.0)
    quiet = (time.perf_counter() - 2.0, time.perf_counter())
    took, encoding, sizes = [], [], []
    encode_item = catalog.encode_item

    def timed_encode(item):
        t = time.perf_counter()
        vector = encode_item(item)
        encoding.append(time.perf_counter() - t)
        return vector

    catalog.encode_item = timed_encode  # what of an edit is the model's
    appending: list[float] = []
    append = journal.append

    def timed_append(*args, **kwargs):
        t = time.perf_counter()
        append(*args, **kwargs)
        appending.append(time.perf_counter() - t)

    journal.append = timed_append  # and the log's write and flush

    def edit_loop(tag: str, offset: int) -> tuple[list[float], list[int]]:
        took, sizes = [], []
        for i in range(args.edits):
            size = (journal.stamp(directory) or (0, 0))[1]
            t = time.perf_counter()
            if i % 2:
                catalog.upsert(f"sku-{i + offset}", {"title": f"Edited {i}", "year": "2024"})  # a replacement
            else:
                catalog.upsert(f"{tag}new-{i}", {"title": f"New Product {i}", "genres": "Drama"})
            took.append(time.perf_counter() - t)
            sizes.append((journal.stamp(directory) or (0, 0))[1] - size)
        return took, sizes

    # first as before index/fair_lock.py: the catalog's lock a threading.Lock, which a search
    # loop can keep from an edit for as long as it runs; then the catalog's own (first come,
    # first served), whose figures are the table's
    fair_lock, catalog._lock = catalog._lock, threading.Lock()
    plain_took, _ = edit_loop("plain-", 1000)
    catalog._lock = fair_lock
    del encoding[:], appending[:]
    t_edits = time.perf_counter()
    took, sizes = edit_loop("", 0)
    edits_window = (t_edits, time.perf_counter())
    time.sleep(0.5)  # a search started in the window ends before the saves below begin
    edit_encoding = encoding[: len(took)]  # (not the edits between the saves below)
    edit_appending = appending[: len(took)]
    saves = {"new": [], "old": []}
    for round_ in range(2):  # in turn, twice: the first flush of a run pays for earlier writes
        # as before: the index's lock held through the whole write and its flush
        t = time.perf_counter()
        with catalog.index._lock:
            catalog.index.save(tmp / f"old-save-{round_}", {"model_version": "old"})
        saves["old"].append((t, time.perf_counter()))
        time.sleep(0.5)
        catalog.upsert(f"between-{round_}", {"title": "Between Saves"})
        t = time.perf_counter()
        assert catalog._save_snapshot()
        saves["new"].append((t, time.perf_counter()))
        time.sleep(0.5)
    searcher.stop()
    faiss_mb = sum(p.stat().st_size for p in directory.glob("index-*.faiss")) / 1e6
    json_mb = (directory / "index.json").stat().st_size / 1e6

    def ms(values: list[float], suffix: bool = True) -> str:
        values = sorted(1e3 * v for v in values)
        return f"{values[len(values) // 2]:.0f} / {values[int(0.9 * len(values))]:.0f}" + " ms" * suffix

    def each(windows: list[tuple[float, float]], fn=None) -> str:
        return ", ".join(f"{b - a:.2f} s" if fn is None else f"{fn(a, b):.0f} ms" for a, b in windows)

    rows = [
        ("an edit (PUT /items: encode + index + log append), median / p90", ms(took)),
        ("of which encoding the item, median / p90", ms(edit_encoding)),
        ("of which the log's append and its flush to the disk, median / p90", ms(edit_appending)),
        ("the rest (the index change, the record's stat and read), median / p90",
         ms([a - b - c for a, b, c in zip(took, edit_encoding, edit_appending, strict=True)])),
        ("as before index/fair_lock.py (a threading.Lock), an edit, median / p90 / max",
         f"{ms(plain_took, suffix=False)} / {1e3 * max(plain_took):.0f} ms"),
        ("bytes an edit appends to the log", f"{statistics.median(sizes):.0f}"),
        ("a search (8 users, k 10), median, nothing else running", f"{searcher.median(*quiet):.1f} ms"),
        ("longest search overlapping the edits (the encodes share the 2 cores)",
         f"{searcher.longest(*edits_window):.1f} ms"),
        (f"full save, every SNAPSHOT_EVERY edits ({faiss_mb:.0f} MB faiss + {json_mb:.0f} MB json)",
         each(saves["new"])),
        ("longest search overlapping it", each(saves["new"], searcher.longest)),
        ("as before, on every edit: a full save with the index lock held", each(saves["old"])),
        ("longest search overlapping it", each(saves["old"], searcher.longest)),
    ]  # fmt: skip
    print(f"{args.items:,} items, dim {catalog.index.dim}, {catalog.index.kind}; {len(took)} edits")
    print("| measurement | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


# ------------------------------------------------------------------------------ encode
def encode(args: argparse.Namespace, tmp: Path) -> None:
    import torch

    from model.checkpoint import encode_catalog, load_checkpoint_model
    from model.data import load_prepared

    torch.set_num_threads(args.threads)
    model = load_checkpoint_model(args.checkpoint, dtype="bfloat16", device=args.device)
    items = load_prepared(args.data).items.sample(n=args.encode_items, random_state=0).reset_index(drop=True)
    encode_catalog(model, items, batch_size=32)  # warm
    print(f"{args.encode_items} items of {args.data}, {model.device}, bf16, {args.threads} threads")
    print("| batch size | items/s (2 runs) | with the resume directory (2 runs) |")
    print("|---|---|---|")
    for batch_size in args.batch_sizes:
        rates: dict[bool, list[str]] = {False: [], True: []}
        for run in range(4):  # in turn: plain, resumable, plain, resumable
            partial = tmp / f"partial-{batch_size}-{run}" if run % 2 else None
            t = time.perf_counter()
            encode_catalog(model, items, batch_size=batch_size, partial=partial)
            rates[partial is not None].append(f"{args.encode_items / (time.perf_counter() - t):.1f}")
        print(f"| {batch_size} | {', '.join(rates[False])} | {', '.join(rates[True])} |", flush=True)


# ------------------------------------------------------------------------------ batch
def batch(args: argparse.Namespace, tmp: Path) -> None:
    import numpy as np
    import pandas as pd

    from model.checkpoint import ITEMS_FILE, create_base_checkpoint, item_record, resolve_checkpoint
    from service.recommender import Recommender
    from service.state import EDIT_BATCH_CHUNK

    source = resolve_checkpoint(args.checkpoint)
    if args.tiny:
        path, dtype = tmp / "tiny", "float32"
        items = pd.read_parquet(source / ITEMS_FILE)
        create_base_checkpoint(path, "tiny", items, dtype=dtype, progress=False)
    else:
        path, dtype = tmp / "copy", "bfloat16"
        shutil.copytree(source, path, ignore=shutil.ignore_patterns("index"))
    engine = Recommender.load(path, dtype=dtype, threads=args.threads, warmup_requests=0)
    catalog = engine.catalog
    catalog.snapshot_every = 10**9  # a full save every 1,000 edits would land in one side only
    r = random.Random(0)
    words = sorted({w for t in catalog.titles.values() for w in t.replace(",", " ").split() if w.isalpha()})
    n = args.batch_items

    def texts() -> list[dict[str, str]]:
        return [
            {"title": " ".join(r.choice(words) for _ in range(r.randint(2, 5))),
             "year": str(r.randint(1930, 2024)), "genres": "Drama, Comedy"}
            for _ in range(n)
        ]  # fmt: skip

    catalog.edit_many({f"warm-{i}": t for i, t in enumerate(texts()[:EDIT_BATCH_CHUNK])})  # warm both paths
    catalog.upsert("warm-single", texts()[0])
    sizes = args.chunks or [EDIT_BATCH_CHUNK]
    singles: list[float] = []
    rates: dict[int, list[float]] = {c: [] for c in sizes}
    holds: dict[int, list[float]] = {c: [] for c in sizes}
    applies: list[float] = []
    cosines: list[float] = []
    for round_ in range(args.rounds):  # in turn: one by one, then a batch at each chunk size
        fields = texts()
        t = time.perf_counter()
        for i, f in enumerate(fields):
            catalog.upsert(f"single-{round_}-{i}", f)
        singles.append(n / (time.perf_counter() - t))
        for size in sizes:
            upserts = {f"batch-{size}-{round_}-{i}": f for i, f in enumerate(fields)}  # the same texts
            t = time.perf_counter()
            catalog.check_texts(list(upserts.values()))  # as ServiceState.edit_items runs it
            items = [{"item_id": i, **item_record(f)} for i, f in upserts.items()]
            chunks = []
            for start in range(0, n, size):  # each a turn of the model thread in the service
                c = time.perf_counter()
                chunks.append(catalog.encode_items(items[start : start + size]))
                holds[size].append(time.perf_counter() - c)
            a = time.perf_counter()
            done = catalog.edit_many(upserts, (), np.concatenate(chunks))
            applies.append(time.perf_counter() - a)
            rates[size].append(n / (time.perf_counter() - t))
            assert len(done.replaced) == n and not any(done.replaced.values())
            # the same text encoded alone (a PUT) and in a padded batch: the cosine of the two
            cosines += [
                float(
                    catalog.index.vector(f"single-{round_}-{i}")
                    @ catalog.index.vector(f"batch-{size}-{round_}-{i}")
                )
                for i in range(n)
            ]
    model = "tiny (untrained, float32)" if args.tiny else f"{engine.version} (bf16)"
    print(f"{model}, {len(catalog):,} items after, dim {catalog.index.dim}, {args.threads} threads, "
          f"{n} items a side, {args.rounds} rounds in turn")  # fmt: skip
    print("| edits | items/s (each round) | against one by one | a chunk on the model thread, median / max |")
    print("|---|---|---|---|")
    print(f"| one by one (Catalog.upsert, what a PUT runs) | {', '.join(f'{x:.1f}' for x in singles)} | | |")
    for size in sizes:
        ratios = ", ".join(f"{b / s:.2f}x" for b, s in zip(rates[size], singles, strict=True))
        held = sorted(1e3 * h for h in holds[size])
        print(f"| one batch, chunks of {size}{' (the default)' if size == EDIT_BATCH_CHUNK else ''} | "
              f"{', '.join(f'{x:.1f}' for x in rates[size])} | {ratios} | "
              f"{held[len(held) // 2]:.0f} / {held[-1]:.0f} ms |")  # fmt: skip
    applied = sorted(1e3 * x for x in applies)
    print(f"\nthe apply of {n} upserts (edit_many: one index pass, one log append and its flush), "
          f"median / max: {applied[len(applied) // 2]:.0f} / {applied[-1]:.0f} ms")  # fmt: skip
    print(f"cos(a PUT's vector, the batch's) for the same text, min / median: "
          f"{min(cosines):.6f} / {statistics.median(cosines):.6f}")  # fmt: skip


# ------------------------------------------------------------------------------ follow
def follow(args: argparse.Namespace, tmp: Path) -> None:
    import numpy as np
    import pandas as pd

    from index import journal
    from model.checkpoint import ITEMS_FILE, create_base_checkpoint, load_checkpoint, resolve_checkpoint
    from service.catalog import Catalog
    from service.state import EDIT_BATCH_CHUNK

    source = resolve_checkpoint(args.checkpoint)
    if args.tiny:
        path, dtype = tmp / "tiny", "float32"
        create_base_checkpoint(
            path, "tiny", pd.read_parquet(source / ITEMS_FILE), dtype=dtype, progress=False
        )
    else:
        path, dtype = tmp / "copy", "bfloat16"
        shutil.copytree(source, path, ignore=shutil.ignore_patterns("index"))
    ckpt = load_checkpoint(path, dtype=dtype, num_threads=args.threads)
    writer = Catalog.open(ckpt)
    followers = {"before": Catalog.open(ckpt), "now": Catalog.open(ckpt)}  # replicas on one volume
    n = args.batch_items
    writer.snapshot_every = n  # the batch fills the log: a full save at once
    directory = writer._directory
    r = random.Random(0)
    words = sorted({w for t in writer.titles.values() for w in t.replace(",", " ").split() if w.isalpha()})
    encoded: dict[str, int] = {}

    def chunked(name: str, catalog: Catalog):
        def encode(items):
            encoded[name] += len(items)
            return np.concatenate(
                [
                    catalog.encode_items(items[i : i + EDIT_BATCH_CHUNK])
                    for i in range(0, len(items), EDIT_BATCH_CHUNK)
                ]
            )

        return encode

    read_previous = journal.read_previous
    rows = []
    for round_ in range(args.rounds):
        upserts = {
            f"r{round_}-{i}": {"title": " ".join(r.choice(words) for _ in range(r.randint(2, 5))),
                               "year": str(r.randint(1930, 2024)), "genres": "Drama, Comedy"}
            for i in range(n)
        }  # fmt: skip
        t = time.perf_counter()
        items = [{"item_id": i, **f} for i, f in upserts.items()]
        vectors = np.concatenate(
            [writer.encode_items(items[i : i + EDIT_BATCH_CHUNK]) for i in range(0, n, EDIT_BATCH_CHUNK)]
        )
        writer.edit_many(upserts, (), vectors)
        writer.wait_saved()
        wrote = time.perf_counter() - t
        assert not journal.path_of(directory).exists(), "the batch did not start a full save"
        kept_mb = journal.previous_of(directory).stat().st_size / 1e6
        order = ["before", "now"] if round_ % 2 == 0 else ["now", "before"]
        for name in order:
            catalog = followers[name]
            encoded[name] = 0
            journal.read_previous = (lambda d: []) if name == "before" else read_previous
            try:
                t = time.perf_counter()
                applied = catalog.sync_edits(chunked(name, catalog))
                took = time.perf_counter() - t
            finally:
                journal.read_previous = read_previous
            assert applied == n, (name, applied)
            cos = [float(catalog.index.vector(i) @ writer.index.vector(i)) for i in upserts]
            rows.append((round_, name, encoded[name], took, min(cos), wrote, kept_mb))
    model = "tiny (untrained, float32)" if args.tiny else f"{ckpt.version} (bf16)"
    print(f"{model}, {len(writer):,} items after, dim {writer.index.dim}, {args.threads} threads, "
          f"a batch of {n} that fills the edit log, {args.rounds} rounds")  # fmt: skip
    print("| round | follower | items encoded | sync s | min cos(its vector, the writer's) | "
          "the writer's batch + full save s | previous log MB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for round_, name, count, took, cos, wrote, kept_mb in rows:
        label = "before (encodes the batch)" if name == "before" else "now (the previous log)"
        print(f"| {round_ + 1} | {label} | {count} | {took:.2f} | {cos:.6f} | {wrote:.1f} | {kept_mb:.1f} |")
    for round_ in range(args.rounds):
        times = {name: took for r_, name, _, took, *_ in rows if r_ == round_}
        print(f"round {round_ + 1}: the follower's sync {times['before'] / times['now']:.0f}x faster now")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "child":
        print(json.dumps(memory_child(json.loads(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("memory", "edits", "encode", "batch", "follow"))
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/current"))
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--table", nargs="+", default=["read", "mapped"], choices=("read", "mapped"))
    parser.add_argument("--edits", type=int, default=40)
    parser.add_argument("--data", type=Path, default=Path("data/ml-100k/loo"))
    parser.add_argument("--encode-items", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-items", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--chunks", type=int, nargs="+", help="batch: chunk sizes (default: EDIT_BATCH_CHUNK)"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="batch, follow: the tiny untrained model, not the checkpoint's"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="r2ec-large-catalog-") as tmp:
        run = {"memory": memory, "edits": edits, "encode": encode, "batch": batch, "follow": follow}
        run[args.what](args, Path(tmp))


if __name__ == "__main__":
    main()
