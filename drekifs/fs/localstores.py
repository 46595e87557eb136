"""Requests about the stores held in this process (the global store, this node's local ones),
answered through ``stores.base.Store``.

Such a store answers at once and tells its watchers of every change (kernelcache.py), so the
kernel may keep its entries and attributes for ``cache_timeout``. A file's bytes are buffered
while it is written (files.py) and committed as one version on fsync and release.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any

import pyfuse3
from pyfuse3 import FUSEError

from ..stores.base import Store
from ..stores.record import DIR, FILE, SYMLINK, Record
from ..urn import URN
from . import inodes
from .attrs import metadata_changes, record_attrs
from .files import OpenFile, OpenFiles
from .kernelcache import KernelCache
from .namespace import Entry, Namespace
from .storenodes import StoreNode, StoreNodes
from .tree import RENAME_EXCHANGE, RENAME_NOREPLACE, Attrs, MountState

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StoreDirHandle:
    node: StoreNode
    # (inode, name, record) by inode, as the store had them at ``changes``.
    listing: list[tuple[int, bytes, Record]]
    changes: int
    ns: Namespace  # the namespace the node was resolved in


class LocalStores:
    def __init__(
        self,
        state: MountState,
        stores: dict[str, Store],
        node: str | None,
        origin: object,
    ) -> None:
        self.state = state
        self.stores = stores
        self.node = node  # this peer's node: its local stores are served here
        self.origin = origin  # what this mount's changes are made as (watchers skip them)
        self.by_slot = {state.slots.slot(name): s for name, s in stores.items()}
        self.files = OpenFiles()
        self.nodes = StoreNodes(state, self.by_slot, self.store_at, self.files)
        self.cache = KernelCache(state, self.files, origin)
        for store in stores.values():
            self.cache.watch(store)
        # A name absent from a store: inode 0 tells the kernel to keep the negative entry as
        # long as a positive one (cheaper than an ENOENT, which it keeps for no time at all:
        # cp's lookup of each new name, a shell's probing). Anything that later creates the
        # name elsewhere than through the kernel invalidates it (kernelcache.py). Until the
        # invalidation lands (or if it were missed), a CREATE of the name is answered ESTALE,
        # so the kernel looks it up again (see create).
        self._absent = pyfuse3.EntryAttributes()
        self._absent.st_ino = 0
        self._absent.entry_timeout = state.cache_timeout

    def store_at(self, e: Entry) -> Store | None:
        """The store served at a store root: global everywhere, local ones on this node only."""
        name = e.urn.store or ""
        if name == "global" or e.location == self.node:
            return self.stores.get(name)
        return None

    def root_attrs(self, e: Entry) -> Attrs | None:
        store = self.store_at(e)
        return None if store is None else self.attrs(self.nodes.root(e, store))

    # -- attributes ------------------------------------------------------------------------

    def attrs(self, node: StoreNode) -> Attrs:
        rec = node.rec
        files = self.files.by_key
        if files and rec.kind != DIR:  # a file written here: its buffer's size
            f = files.get((node.store.name, rec.eid))
            if f is not None:
                if f.gone is not None:  # its entry went: its handles' own (st_nlink 0)
                    return f.orphan_attrs(node.ino, self.state.cache_timeout)
                if f.dirty:
                    return f.attrs(node.ino, rec, self.state.cache_timeout)
        attrs = node.attrs
        if attrs is None:
            mtime = None
            if node.root is not None and not rec.mtime_ns:
                mtime = node.root.mtime_ns  # a root nobody wrote in yet
            attrs = node.attrs = record_attrs(
                node.ino, rec, self.state.cache_timeout, mtime_ns=mtime
            )
        return attrs

    # -- names and attributes --------------------------------------------------------------

    async def lookup(self, parent: int, name: bytes) -> Attrs:
        node = self.nodes.node(parent)
        child = self.nodes.child(node, name)
        if child is None:
            if log.isEnabledFor(logging.DEBUG):  # as an ENOENT would be, for SIGUSR1 sessions
                log.debug("lookup %s: %s", self.urn(parent).child(name), os.strerror(errno.ENOENT))
            return self._absent
        return self.attrs(child)

    async def getattr(self, ino: int) -> Attrs:
        return self.attrs(self.nodes.node(ino))

    async def setattr(self, ino: int, attr: Any, fields: Any) -> Attrs:
        node = self.nodes.node(ino)
        store, loc, parts = node.store, node.loc, node.parts
        rec: Record | None = node.rec
        timeout = self.state.cache_timeout
        f = self.files.get(store, node.rec.eid)
        if f is not None and f.gone is not None:
            return self._set_orphan(f, ino, attr, fields)
        held = False  # a change kept with the file's unsaved bytes, not in the store
        if fields.update_size:
            if node.is_dir:
                raise FUSEError(errno.EISDIR)
            if f is not None:
                f.truncate(attr.st_size)
                held = True
            else:
                value = bytearray(store.read(node.rec.eid))
                store.check_size(attr.st_size)
                del value[attr.st_size :]
                value.extend(bytes(attr.st_size - len(value)))
                rec = store.write_value(loc, parts, node.rec.eid, bytes(value), self.origin)
        changes = metadata_changes(attr, fields)
        if changes:
            if f is not None and f.dirty:
                # Bytes not committed yet: the change waits with them, one version at close.
                f.set_metadata(changes)
                held = True
            else:
                rec = store.update(loc, parts, self.origin, **changes)
        if held and f is not None:
            self.cache.unsaved_changed(f)
            if rec is node.rec:  # what the commit will make of it
                return f.attrs(ino, rec, timeout)
        if rec is node.rec:
            return self.attrs(node)
        if rec is None:
            return self.attrs(self.nodes.node(ino))
        # What the store answered is what a new lookup would find: no need to ask again.
        return self.attrs(
            StoreNode(ino, store, loc, node.segments, node.alias, parts, rec, node.root)
        )

    def _set_orphan(self, f: OpenFile, ino: int, attr: Any, fields: Any) -> Attrs:
        if fields.update_size:
            f.truncate(attr.st_size)
        changes = metadata_changes(attr, fields)
        if changes:
            f.set_metadata(changes)
        return f.orphan_attrs(ino, self.state.cache_timeout)

    async def readlink(self, ino: int) -> bytes:
        node = self.nodes.node(ino)
        if node.rec.kind == SYMLINK:
            return node.rec.target
        raise FUSEError(errno.EINVAL)

    # -- creating and removing -------------------------------------------------------------

    def _create(
        self, parent_ino: int, name: bytes, kind: int, mode: int, ctx: Any, target: bytes = b""
    ) -> StoreNode:
        parent = self.nodes.node(parent_ino)
        if not parent.is_dir:
            raise FUSEError(errno.ENOTDIR)
        parts = (*parent.parts, name)
        store = parent.store
        rec = store.create(
            parent.loc, parts, kind, stat.S_IMODE(mode), ctx.uid, ctx.gid, target, self.origin
        )
        ino = inodes.pack(parent.alias, self.state.slots.slot(store.name), rec.eid)
        return StoreNode(ino, store, parent.loc, parent.segments, parent.alias, parts, rec)

    async def make(
        self, parent: int, name: bytes, kind: int, mode: int, ctx: Any, target: bytes = b""
    ) -> Attrs:
        return self.attrs(self._create(parent, name, kind, mode, ctx, target))

    async def create(
        self, parent: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[object, pyfuse3.FileInfo, Attrs]:
        node = self._create(parent, name, FILE, mode, ctx)
        self.nodes.remember(node)  # the WRITE, SETATTRs and RELEASE that follow ask about it
        f = self.files.open(node.store, node.loc, node.rec.eid)
        if f.buffer is None and f.handles == 1:
            f.buffer = bytearray()  # new and empty: no need to read it from the store
        return f, pyfuse3.FileInfo(keep_cache=True), self.attrs(node)

    async def remove(self, parent: int, name: bytes, is_dir: bool) -> None:
        node = self.nodes.node(parent)
        node.store.remove(node.loc, (*node.parts, name), is_dir=is_dir, origin=self.origin)

    async def rename(
        self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes, flags: int
    ) -> None:
        old = self.nodes.node(parent_old)
        new = self.nodes.node(parent_new)
        if old.store is not new.store or old.loc != new.loc or old.alias != new.alias:
            # Atomic within one store at one location, seen through one path; across two
            # paths of one node it is EXDEV, as across two bind mounts.
            raise FUSEError(errno.EXDEV)
        if flags & RENAME_EXCHANGE:
            raise FUSEError(errno.EINVAL)
        old.store.rename(
            old.loc,
            (*old.parts, name_old),
            (*new.parts, name_new),
            noreplace=bool(flags & RENAME_NOREPLACE),
            origin=self.origin,
        )

    # -- directories -----------------------------------------------------------------------

    async def opendir(self, ino: int) -> object:
        node = self.nodes.node(ino)
        if not node.is_dir:
            raise FUSEError(errno.ENOTDIR)
        slot = self.state.slots.slot(node.store.name)
        listing = sorted(
            (inodes.pack(node.alias, slot, rec.eid), name, rec)
            for name, rec in node.store.children(node.loc, node.parts).items()
        )
        return StoreDirHandle(node, listing, node.store.changes, self.state.ns)

    async def readdir(self, handle: Any, start_id: int, token: Any) -> None:
        if not isinstance(handle, StoreDirHandle):
            raise FUSEError(errno.EBADF)
        node = handle.node
        listing = handle.listing
        store = node.store
        unchanged = store.changes == handle.changes
        current = handle.ns is self.state.ns  # else its paths may be gone: resolve, don't keep
        # Cursors are inode numbers: a listing resumes after the last one it gave.
        for i in range(bisect_left(listing, (start_id + 1,)), len(listing)):
            ino, name, rec = listing[i]
            if unchanged:  # the record opendir read is still the entry's
                parts = (*node.parts, name)
                child = StoreNode(ino, store, node.loc, node.segments, node.alias, parts, rec)
            else:
                found = self.nodes.child(node, name)
                if found is None or found.ino != ino:
                    continue  # gone since opendir
                child = found
            # The kernel asks for attributes again after a CREATE or a timeout: have the
            # entry ready, as a lookup would.
            if current:
                self.nodes.remember(child)
            if not pyfuse3.readdir_reply(token, name, self.attrs(child), ino):
                break

    async def fsyncdir(self, handle: Any) -> None:
        if isinstance(handle, StoreDirHandle):
            await handle.node.store.sync()

    # -- files -----------------------------------------------------------------------------

    async def open(self, ino: int, flags: int) -> tuple[object, pyfuse3.FileInfo]:
        node = self.nodes.node(ino)
        if self.files.by_key and self.nodes.orphan(node):
            # Its name went (here or by a peer): a kernel still holding the name opens
            # what it names now instead (ESTALE: it looks it up again). Reopening through
            # /proc/PID/fd is refused the same way.
            raise FUSEError(errno.ESTALE)
        if node.is_dir:
            raise FUSEError(errno.EISDIR)
        if node.rec.kind != FILE:
            raise FUSEError(errno.ELOOP)
        f = self.files.open(node.store, node.loc, node.rec.eid)
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            f.truncate(0)
        return f, pyfuse3.FileInfo(keep_cache=True)

    async def read(self, handle: Any, off: int, size: int) -> bytes:
        if type(handle) is not OpenFile:
            raise FUSEError(errno.EBADF)
        return handle.read(off, size)

    async def write(self, handle: Any, off: int, buf: bytes) -> int:
        if type(handle) is not OpenFile:
            raise FUSEError(errno.EBADF)
        written = handle.write(off, buf)
        self.cache.unsaved_changed(handle)
        return written

    def _commit(self, f: OpenFile) -> None:
        if f.dirty:
            f.commit(self.origin)

    async def flush(self, handle: Any) -> None:
        pass  # committed at fsync and release: close has nothing to report

    async def fsync(self, handle: Any) -> None:
        if type(handle) is OpenFile:
            self._commit(handle)
            await handle.store.sync()

    async def release(self, handle: Any) -> None:
        if type(handle) is OpenFile:
            self._commit(handle)
            self.files.close(handle)

    async def commit_all(self) -> None:
        """At unmount: hand every dirty buffer to its store."""
        for f in list(self.files.by_key.values()):
            self._commit(f)

    # -- extended attributes ---------------------------------------------------------------

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        node = self.nodes.node(ino)
        if name == b"user.dreki.urn":
            return str(self._urn_of(node)).encode("utf-8", "surrogateescape")
        if name == b"user.dreki.store":
            return node.store.name.encode()
        if name == b"user.dreki.owner":
            v = node.rec.version
            return (v.peer if v else node.loc).encode()
        if name == b"user.dreki.version":
            v = node.rec.version
            if v is None:
                raise FUSEError(errno.ENODATA)
            return f"{v.hlc} {v.peer}".encode()
        value = node.rec.xattrs.get(name)
        if value is None:
            raise FUSEError(errno.ENODATA)
        return value

    async def listxattr(self, ino: int) -> list[bytes]:
        return sorted(self.nodes.node(ino).rec.xattrs)

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        node = self.nodes.node(ino)
        if not name.startswith(b"user."):
            raise FUSEError(errno.EOPNOTSUPP)
        if orphan := self.nodes.orphan(node):
            orphan.set_xattrs({**node.rec.xattrs, name: value})
            return
        node.store.set_xattr(node.loc, node.parts, name, value, origin=self.origin)

    async def removexattr(self, ino: int, name: bytes) -> None:
        node = self.nodes.node(ino)
        if orphan := self.nodes.orphan(node):
            if name not in node.rec.xattrs:
                raise FUSEError(errno.ENODATA)
            orphan.set_xattrs({k: v for k, v in node.rec.xattrs.items() if k != name})
            return
        node.store.remove_xattr(node.loc, node.parts, name, origin=self.origin)

    # -- for log lines ---------------------------------------------------------------------

    def _urn_of(self, node: StoreNode) -> URN:
        if node.root is not None:
            return node.root.urn
        return URN(self.state.ns.world.domain, node.segments, node.store.name, node.parts)

    def urn(self, ino: int) -> URN:
        return self._urn_of(self.nodes.node(ino))

    def handle_urn(self, handle: Any) -> str:
        if isinstance(handle, StoreDirHandle):
            return str(self._urn_of(handle.node))
        if isinstance(handle, OpenFile):
            return self.file_urn(handle)
        return "?"

    def file_urn(self, f: OpenFile) -> str:
        """An open file's URN, wherever it is now (renamed while open or not)."""
        where = f.store.locate(f.eid)
        roots = self.state.ns.store_roots.get((where[0], f.store.name)) if where else None
        if not where or not roots:
            return f"{f.store.name} entry {f.eid} (no path: unlinked)"
        root = roots[0].urn
        return str(URN(root.world, root.segments, root.store, where[1]))

    def gone_inode(self, ino: int) -> str | None:
        """For a log line about an inode whose entry went: which store it was of."""
        slot = inodes.store_slot(ino)
        if not slot:
            return None
        store = self.by_slot.get(slot)
        name = store.name if store is not None else f"store slot {slot}"
        return f"{name} entry {ino & inodes.EID_MASK} (gone)"
