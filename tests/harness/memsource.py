"""A dict-backed :class:`EntrySource` with last-writer-wins: for tests, benches and simulations.

An entry is ``[hlc, peer, value]``; ``value`` None is a tombstone (a delete is a version). The
larger (hlc, peer) wins, as in :meth:`drekifs.stores.version.Version.beats`. Every change is
mirrored into the given :class:`HashTree`, as the real store does on each write.
"""

from __future__ import annotations

from typing import Any

from drekifs.cluster.antientropy.hashtree import HashTree
from drekifs.cluster.antientropy.source import version_digest

Entry = tuple[int, str, bytes | None]


class MemorySource:
    def __init__(self, tree: HashTree | None = None) -> None:
        self.tree = tree if tree is not None else HashTree()
        self.entries: dict[bytes, Entry] = {}

    # -- Local writes -------------------------------------------------------------------------

    def put(self, key: bytes, hlc: int, peer: str, value: bytes | None) -> None:
        """Store this version unconditionally (a local write, or a test's setup)."""
        self.entries[key] = (hlc, peer, value)
        self.tree.set(key, version_digest(hlc, peer))

    def collect(self, key: bytes) -> None:
        """Drop ``key`` altogether (a tombstone past its grace period)."""
        if self.entries.pop(key, None) is not None:
            self.tree.remove(key)

    # -- EntrySource --------------------------------------------------------------------------

    def digest(self, key: bytes) -> bytes | None:
        entry = self.entries.get(key)
        return None if entry is None else version_digest(entry[0], entry[1])

    def export(self, keys: list[bytes]) -> list[tuple[bytes, Any]]:
        out = []
        for key in keys:
            entry = self.entries.get(key)
            if entry is not None:
                out.append((key, list(entry)))
        return out

    def merge(self, entries: list[tuple[bytes, Any]]) -> int:
        checked = [(key, self._check(key, entry)) for key, entry in entries]  # all or nothing
        changed = 0
        for key, entry in checked:
            current = self.entries.get(key)
            if current is None or (entry[0], entry[1]) > (current[0], current[1]):
                self.put(key, *entry)
                changed += 1
        return changed

    @staticmethod
    def _check(key: Any, entry: Any) -> Entry:
        if not isinstance(key, bytes) or not isinstance(entry, list | tuple) or len(entry) != 3:
            raise ValueError("malformed entry")
        hlc, peer, value = entry
        if (
            type(hlc) is not int
            or hlc < 0
            or not isinstance(peer, str)
            or not (value is None or isinstance(value, bytes))
        ):
            raise ValueError("malformed entry")
        return (hlc, peer, value)
