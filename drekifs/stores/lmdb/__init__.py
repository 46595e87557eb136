"""The stores of this process, in LMDB: one environment per store (store.py)."""

from .store import LmdbStore, StoreStats

__all__ = ["LmdbStore", "StoreStats"]
