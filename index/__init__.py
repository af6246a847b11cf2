"""Item vector index: numpy + faiss only; knows vectors and ids, not models."""

from index.faiss_index import IndexConfig, ItemIndex, UnknownItemError, search_without_threads, tune_faiss
from index.persist import IndexMismatchError

__all__ = [
    "IndexConfig",
    "IndexMismatchError",
    "ItemIndex",
    "UnknownItemError",
    "search_without_threads",
    "tune_faiss",
]
