"""The store interface: what the filesystem (and the control socket) may ask of any store.

A store holds entries — files, directories, symlinks — at *locations* (a region's or node's DNS
name), each addressed by a key: a tuple of byte strings, the path below the store's root.
``LmdbStore`` (stores/lmdb) implements it for the global store and this node's local stores.
Another node's stores are reached through :class:`~drekifs.stores.remote.RemoteStore`
(stores/remote.py): the same operations in async form, which cluster/storerpc.py's
``StoreClient`` implements by calls to the node that owns them. What replication needs of a
store is :class:`~drekifs.stores.replica.Replica` (stores/replica.py). Nothing here knows of
FUSE or paths on a mount.

Errors are :class:`~drekifs.stores.record.StoreError` with the errno a filesystem would give.
Every change takes an ``origin``: watchers are told who made it, so the mount that made a change
does not invalidate its own kernel cache, and everybody else's change does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from .record import Record

Key = tuple[bytes, ...]
# watcher(entry key, origin, carried): called synchronously after every change of an entry (a
# directory's times moving with its children excepted). The entry key is the store's own, bytes
# (``location \0 parent \0 name``, replication's unit; keys.split_key gives the location
# and key). ``carried``: an entry below a renamed directory, moved with it (a new key and a
# tombstone or nothing at the old one, the same entry id): replication needs each one, a cache
# keyed by inode or by the directory's name nothing more than the directory's own two calls.
Watcher = Callable[[bytes, object, bool], None]


class Store(Protocol):
    name: str
    max_value: int
    watchers: list[Watcher]
    # Called with a file's record just before its value goes (unlink, replaced by a rename or
    # by a peer's version, forgotten): its bytes can still be read by its entry id.
    before_drop: list[Callable[[Record], None]]
    changes: int  # changes made so far: anything read before is stale once it moves

    # -- stat, get, list -------------------------------------------------------------------
    def get(self, loc: str, parts: Key) -> Record | None:
        """The live entry at ``parts`` (stat); the root (empty key) always exists."""

    def read(self, eid: int, offset: int = 0, size: int | None = None) -> bytes:
        """A file's bytes (get), by entry id, sliced."""

    def children(self, loc: str, parts: Key) -> dict[bytes, Record]:
        """The live entries of a directory (list a prefix, one level)."""

    def children_page(
        self, loc: str, parts: Key, after: bytes, n: int
    ) -> tuple[list[tuple[bytes, Record]], bool]:
        """Up to ``n`` live entries of a directory named after ``after`` (bytes order), and
        whether more follow: a long listing page by page, each costing its page only."""

    def locate(self, eid: int) -> tuple[str, Key] | None:
        """Where an entry is now, by its id."""

    # -- put, delete, and the rest of what a filesystem does -------------------------------
    def create(
        self,
        loc: str,
        parts: Key,
        kind: int,
        perm: int,
        uid: int,
        gid: int,
        target: bytes = b"",
        origin: object = None,
    ) -> Record: ...

    def write_value(
        self,
        loc: str,
        parts: Key | None,
        eid: int,
        value: bytes,
        origin: object = None,
        mtime_ns: int | None = None,
        reserved: int = 0,
        **fields: object,
    ) -> Record | None:
        """A file's bytes (and metadata ``fields``), one new version; None when the entry is
        gone. ``parts`` None: wherever the entry ``eid`` is now at ``loc`` (renamed or not)."""

    def update(self, loc: str, parts: Key, origin: object = None, **fields: object) -> Record: ...

    def remove(self, loc: str, parts: Key, *, is_dir: bool, origin: object = None) -> Record: ...

    def rename(
        self, loc: str, src: Key, dst: Key, *, noreplace: bool = False, origin: object = None
    ) -> None: ...

    def set_xattr(
        self,
        loc: str,
        parts: Key,
        name: bytes,
        value: bytes,
        flags: int = 0,
        origin: object = None,
    ) -> Record: ...

    def remove_xattr(self, loc: str, parts: Key, name: bytes, origin: object = None) -> Record: ...

    def check_size(self, size: int) -> None:
        """EFBIG when a value of ``size`` bytes would not fit."""

    def reserve(self, nbytes: int) -> None:
        """Hold disk room for ``nbytes`` an open file will commit; ENOSPC when there is none
        (write_value's ``reserved`` then spends it)."""

    def unreserve(self, nbytes: int) -> None: ...

    # -- durability ------------------------------------------------------------------------
    async def sync(self) -> None:
        """Return once every change made before the call is on disk."""
