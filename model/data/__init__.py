"""Dataset preparation: sources -> (history, target) samples -> train/valid/test parquet.

Pure pandas/numpy; imports nothing from torch, ``index`` or ``service``.

    path = prepare_ml100k("data", protocol="loo")   # -> data/ml-100k/loo/
    ds = load_prepared(path)
    ds.split("train"), ds.item_titles(), format_stats(ds.meta)
"""

from .amazon import prepare_amazon
from .atomic import prepare_atomic
from .dataset import SPLITS, DataError, PreparedDataset, format_stats, load_prepared
from .movielens import prepare_ml100k
from .splits import PROTOCOLS

__all__ = [
    "DataError",
    "PROTOCOLS",
    "PreparedDataset",
    "SPLITS",
    "format_stats",
    "load_prepared",
    "prepare_amazon",
    "prepare_atomic",
    "prepare_ml100k",
]
