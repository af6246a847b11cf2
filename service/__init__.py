"""The online service (FastAPI, `r2ec serve`) and, without HTTP, the same model from Python.

    import service
    rec = service.load("checkpoints/current")      # as `r2ec serve` loads it
    result = rec.recommend([("50", 5), ("172", 5)], k=10)
    result.items[0].item_id, result.items[0].score, result.reasoning

The names below are imported on first use, so `import service.config` stays light (no torch).
README, "Use the model from Python"; service/offline.py.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the module that defines it
_EXPORTS = {
    "load": "service.offline",
    "DETERMINISTIC": "service.offline",
    "Recommender": "service.recommender",
    "Event": "service.store",
    "Query": "service.types",
    "Result": "service.types",
    "ScoredItem": "service.types",
    "QueryError": "service.types",
    "InvalidQueryError": "service.types",
    "UnknownItemsError": "service.types",
    "EmptyHistoryError": "service.types",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'service' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
