"""Keeping the kernel's cache of the stores held here true: their watchers, and the world's
changes, turned into invalidations (queued: invalidate.py says why).

The kernel keeps store entries and attributes for ``cache_timeout`` (an hour by default), so
every change it did not see happen — a peer's, the control socket's, one made through the
other path of a node listed twice — must reach it as an invalidation.
"""

from __future__ import annotations

import functools

from ..stores.base import Store
from ..stores.keys import split_key
from ..stores.record import Record
from . import inodes
from .files import OpenFile, OpenFiles
from .namespace import Namespace, diff
from .tree import MountState


class KernelCache:
    def __init__(self, state: MountState, files: OpenFiles, origin: object) -> None:
        self.state = state
        self.files = files
        self.origin = origin  # changes made with this origin were made through this mount

    def watch(self, store: Store) -> None:
        store.watchers.append(functools.partial(self.changed, store))
        store.before_drop.append(functools.partial(self.dropping, store))

    def namespace_changed(self, old: Namespace, new: Namespace, status: tuple[str, ...]) -> None:
        """The world changed: the kernel forgets what differs."""
        inv = self.state.invalidator
        changes = diff(old, new, status)
        for parent, name, ino in changes.entries:
            inv.entry(parent, name, ino)
        for ino in changes.inodes:
            inv.inode(ino)

    def changed(self, store: Store, key: bytes, origin: object, carried: bool) -> None:
        """A change that did not come through this mount: the kernel's caches must drop it,
        on every path of the location."""
        if carried:
            return  # moved with its directory: same inode, and the directory's names suffice
        ns = self.state.ns
        if origin is self.origin and not ns.listed_twice:
            return  # the kernel saw it happen (the usual case: decided before parsing the key)
        loc, parts = split_key(key)
        if not parts:
            return
        roots = ns.store_roots.get((loc, store.name), ())
        if origin is self.origin and len(roots) < 2:
            return  # the kernel saw it happen; a node listed twice shows it on the other path
        inv = self.state.invalidator
        slot = self.state.slots.slot(store.name)
        parent = store.get(loc, parts[:-1])
        rec = store.get(loc, parts)
        for root in roots:
            if len(parts) == 1:
                parent_ino = root.ino
            elif parent is not None:
                parent_ino = inodes.pack(root.alias, slot, parent.eid)
            else:
                continue
            inv.entry(parent_ino, parts[-1])
            inv.inode(parent_ino)
            if rec is not None:
                ino = inodes.pack(root.alias, slot, rec.eid)
                if self.files.get(store, rec.eid) is not None:
                    # Open here: its readers keep their pages (close-to-open), sizes follow.
                    inv.attributes(ino)
                else:
                    inv.inode(ino)

    def dropping(self, store: Store, rec: Record) -> None:
        """A file's entry is about to go (unlinked or replaced, here or by a peer): if it is
        open here, its handles keep it (files.OpenFile.orphan), and the kernel's attributes
        of it go (st_nlink is 0 now)."""
        f = self.files.get(store, rec.eid)
        if f is None:
            return
        where = store.locate(rec.eid)  # still known for a moment: its key, for log lines
        f.orphan(rec, where[1] if where is not None else ())
        slot = self.state.slots.slot(store.name)
        for root in self.state.ns.store_roots.get((f.loc, store.name), ()):
            self.state.invalidator.attributes(inodes.pack(root.alias, slot, rec.eid))

    def unsaved_changed(self, f: OpenFile) -> None:
        """A file being written here changed without a store change (bytes, or metadata held
        for the commit): on a node listed twice, the kernel's attributes of its other paths
        must go (the store's watcher does it for changes that reach the store)."""
        ns = self.state.ns
        if not ns.listed_twice:
            return  # every WRITE asks: the usual answer without a lookup
        roots = ns.store_roots.get((f.loc, f.store.name), ())
        if len(roots) > 1:
            slot = self.state.slots.slot(f.store.name)
            for root in roots:
                self.state.invalidator.attributes(inodes.pack(root.alias, slot, f.eid))
