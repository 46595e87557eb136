"""What a store inode of this process is now: node resolution for localstores.py.

A store entry's inode carries its path alias, store slot and entry id (inodes.py); resolving
it asks the store where that entry is now. tar, find and rsync ask about one inode several
times in a row, so what an inode resolved to is kept while its store has not changed (a change
counter, ``Store.changes``), and checked cheaply once it has.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass

import pyfuse3
from pyfuse3 import FUSEError

from ..stores.base import Key, Store
from ..stores.record import Record
from . import inodes
from .files import OpenFile, OpenFiles
from .namespace import Entry
from .tree import MountState

NODE_CACHE = 20_000  # inodes remembered; cleared whole when full (cheaper than an LRU)


@dataclass(slots=True)
class StoreNode:
    """A directory or file inside a store, as one request sees it."""

    ino: int
    store: Store
    loc: str
    segments: tuple[str, ...]  # the location's path: which alias of it
    alias: int
    parts: Key
    rec: Record
    root: Entry | None = None  # set for a store's root (a world inode)
    # Its attributes, once asked for: valid as long as the node (its store unchanged), unless a
    # file being written here overrides size and mtime (then never kept).
    attrs: pyfuse3.EntryAttributes | None = None

    @property
    def is_dir(self) -> bool:
        return self.rec.is_dir


class StoreNodes:
    """Inodes of the stores held in this process -> StoreNode, cached per store change."""

    def __init__(
        self,
        state: MountState,
        by_slot: dict[int, Store],
        store_at: Callable[[Entry], Store | None],
        files: OpenFiles,
    ) -> None:
        self.state = state
        self.by_slot = by_slot
        self.store_at = store_at  # the store served at a store root, if this tree serves it
        self.files = files
        self.cache: dict[int, tuple[StoreNode, int]] = {}

    def clear(self) -> None:
        self.cache = {}

    def remember(self, node: StoreNode) -> None:
        """Keep what an inode is, for the requests that follow (valid until the store changes)."""
        if len(self.cache) >= NODE_CACHE:
            self.cache.clear()
        self.cache[node.ino] = (node, node.store.changes)

    def node(self, ino: int) -> StoreNode:
        """What an inode is now. An entry that went is ESTALE, unless it is a file still open
        here (an orphan, OpenFile.orphan): the kernel asks by inode, and ESTALE makes it look
        the name up again where that helps (open, stat, chmod... of a name whose cached entry
        another peer removed or replaced: fs/namei.c retries with LOOKUP_REVAL)."""
        cached = self.cache.get(ino)
        if cached is not None:
            node, seen = cached
            store = node.store
            if seen == store.changes:
                return node
            # The store changed since: still there, under the same path? (An entry id is
            # never reused, so the same id at the same path is the same entry.)
            rec = store.get(node.loc, node.parts)
            if rec is not None and rec.eid == node.rec.eid:
                if rec is not node.rec:
                    node = StoreNode(
                        ino, store, node.loc, node.segments, node.alias, node.parts, rec, node.root
                    )
                self.remember(node)
                return node
        ns = self.state.ns
        slot = inodes.store_slot(ino)
        if slot:
            store = self.by_slot.get(slot)
            if store is not None:
                si = inodes.unpack(ino)
                where = store.locate(si.eid)
                if where is not None:
                    loc, parts = where
                    segments = ns.alias_paths.get((loc, si.alias))
                    rec = store.get(loc, parts)
                    if segments is not None and rec is not None and rec.eid == si.eid:
                        node = StoreNode(ino, store, loc, segments, si.alias, parts, rec)
                        self.remember(node)
                        return node
                f = self.files.get(store, si.eid)
                if f is not None and f.gone is not None:
                    segments = ns.alias_paths.get((f.loc, si.alias))
                    if segments is not None:
                        return StoreNode(ino, store, f.loc, segments, si.alias, f.parts, f.gone)
            raise FUSEError(errno.ESTALE)
        e = ns.get(ino)
        if e is None:
            raise FUSEError(errno.ENOENT)
        root_store = self.store_at(e)
        if root_store is None:  # routed here, so served here: the world changed meanwhile
            raise FUSEError(errno.ESTALE)
        return self.root(e, root_store)

    def root(self, e: Entry, store: Store) -> StoreNode:
        rec = store.get(e.location, ())
        assert rec is not None  # a store's root always exists
        return StoreNode(e.ino, store, e.location, e.urn.segments, e.alias, (), rec, e)

    def child(self, parent: StoreNode, name: bytes) -> StoreNode | None:
        parts = (*parent.parts, name)
        rec = parent.store.get(parent.loc, parts)
        if rec is None:
            return None
        ino = inodes.pack(parent.alias, self.state.slots.slot(parent.store.name), rec.eid)
        return StoreNode(ino, parent.store, parent.loc, parent.segments, parent.alias, parts, rec)

    def orphan(self, node: StoreNode) -> OpenFile | None:
        """The open file a store inode answers from once its entry went (OpenFile.orphan):
        whatever changes it stays there, as its old key may be another entry's now."""
        files = self.files.by_key
        f = files.get((node.store.name, node.rec.eid)) if files else None
        return f if f is not None and f.gone is not None else None
