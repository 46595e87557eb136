"""The async store interface: a store reached by calls (another node's local store, over RPC).

Where :class:`~drekifs.stores.base.Store` is a store in this process — answered at once, and
telling its watchers of every change as it happens — a ``RemoteStore`` answers later, may fail
with EHOSTDOWN when whoever holds it does not answer within a bounded time, and tells of
changes only when its holder says so (batched, and best effort). The filesystem (fs/remotestores.py)
serves any ``RemoteStore`` the same way, without knowing how it is reached:
``cluster/storerpc.StoreClient`` implements it over the peers' RPC; a consistent store would
implement it on its own engine.

Entries are addressed as in ``Store``: a key (the path below the store's root, a tuple of byte
strings) or an entry id (``eid``, the holder's, never reused). Errors are
:class:`~drekifs.stores.record.StoreError` with the errno the same request would get from the
holder's own mount; EHOSTDOWN when it cannot be asked. No call hangs past its timeout.
"""

from __future__ import annotations

from typing import Protocol

from .base import Key
from .record import Record


class RemoteStore(Protocol):
    node: str  # the location the store belongs to (a node's DNS name): where it is held
    name: str  # the store's name there ("local", or a --store name)

    # -- stat, get, list -------------------------------------------------------------------
    async def stat(self, parts: Key) -> Record:
        """The live entry at ``parts`` (ENOENT when absent); the root always exists."""

    async def lookup(self, parts: Key, small: int) -> tuple[Record, bytes | None]:
        """stat, and the value with it when it is at most ``small`` bytes (one round trip)."""

    async def locate(self, eid: int) -> tuple[Key, Record]:
        """Where the entry ``eid`` is now, and its record (ENOENT once it is gone)."""

    async def children(self, parts: Key) -> list[tuple[bytes, Record]]:
        """The live entries of a directory, every one of them (paged below if need be)."""

    async def open(self, eid: int, size: int) -> tuple[Key, Record, bytes]:
        """Where the entry is, its record and its first ``size`` bytes, at once."""

    async def read(self, eid: int, offset: int, size: int) -> bytes:
        """A file's bytes, by entry id: short only at the end of the value."""

    # -- put, delete, and the rest of what a filesystem does -------------------------------
    async def create(
        self, parts: Key, kind: int, perm: int, uid: int, gid: int, target: bytes = b""
    ) -> Record: ...

    async def put(
        self, parts: Key, eid: int, value: bytes, *, durable: bool = False, **fields: int
    ) -> Record | None:
        """One new version of the file ``eid`` (and metadata ``fields``); None when it is
        gone. ``durable``: on the holder's disk when this returns."""

    async def update(self, parts: Key, eid: int | None = None, **fields: int) -> Record:
        """Metadata (perm, uid, gid, mtime_ns, atime_ns); ``eid`` finds it if it moved."""

    async def remove(self, parts: Key, *, is_dir: bool) -> None: ...

    async def rename(self, src: Key, dst: Key, *, noreplace: bool) -> None: ...

    async def set_xattr(self, parts: Key, eid: int, name: bytes, value: bytes) -> Record: ...

    async def remove_xattr(self, parts: Key, eid: int, name: bytes) -> Record: ...

    # -- durability ------------------------------------------------------------------------
    async def sync(self) -> None:
        """Return once every change the holder acknowledged is on its disk (fsync)."""
