"""The world's directories (regions, nodes, store roots nobody serves here, ``.dreki``) and the
status files: read-only, from the namespace (namespace.py) and status.py.

A store root served by a store tree is that tree's inode; listing its parent still shows it
with the attributes that tree gives (``root_attrs``).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyfuse3
from pyfuse3 import FUSEError

from ..urn import URN
from .namespace import Entry, Kind
from .status import StatusFiles
from .tree import Attrs, MountState


@dataclass(slots=True)
class WorldDirHandle:
    entry: Entry


@dataclass(slots=True)
class StatusHandle:
    content: bytes


def refusal(e: Entry | None) -> FUSEError:
    """The errno for changing something of the world here."""
    if e is not None and e.kind is Kind.STORE:
        return FUSEError(errno.EROFS)  # another node's store: not served by this peer
    return FUSEError(errno.EPERM)  # world directories and .dreki are read-only


class WorldDirs:
    def __init__(
        self,
        state: MountState,
        status: StatusFiles,
        root_attrs: Callable[[Entry], Attrs | None],
    ) -> None:
        self.state = state
        self.status = status
        # A store root's attributes as the tree serving it gives them; None: served here.
        self.root_attrs = root_attrs
        self._attr_cache: dict[int, Attrs] = {}

    def namespace_changed(self) -> None:
        self._attr_cache = {}

    def entry(self, ino: int) -> Entry:
        e = self.state.ns.get(ino)
        if e is None:
            raise FUSEError(errno.ENOENT)
        return e

    # -- attributes ------------------------------------------------------------------------

    def attrs(self, e: Entry) -> Attrs:
        if e.kind is Kind.STATUS_FILE:
            return self._status_attrs(e)
        if e.kind is Kind.STORE:
            served = self.root_attrs(e)
            if served is not None:
                return served
        attr = self._attr_cache.get(e.ino)
        if attr is not None:
            return attr
        state = self.state
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = e.ino
        attr.st_mode = e.mode
        attr.st_nlink = e.nlink
        attr.st_uid = state.uid
        attr.st_gid = state.gid
        attr.st_size = 0
        attr.st_blksize = 4096
        attr.st_blocks = 0
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = e.mtime_ns
        attr.entry_timeout = attr.attr_timeout = state.cache_timeout
        if e.kind is not Kind.STORE:
            self._attr_cache[e.ino] = attr
        return attr

    def _status_attrs(self, e: Entry) -> Attrs:
        spec = self.status.get(e.status or "")
        content = spec.render() if spec else b""
        state = self.state
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = e.ino
        attr.st_mode = e.mode
        attr.st_nlink = 1
        attr.st_uid = state.uid
        attr.st_gid = state.gid
        attr.st_size = len(content)
        attr.st_blksize = 4096
        attr.st_blocks = (len(content) + 511) // 512
        volatile = bool(spec and spec.volatile)
        mtime = time.time_ns() if volatile else e.mtime_ns
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = mtime
        attr.entry_timeout = state.cache_timeout
        attr.attr_timeout = 0.0 if volatile else state.cache_timeout
        return attr

    # -- names and attributes --------------------------------------------------------------

    async def lookup(self, parent: int, name: bytes) -> Attrs:
        e = self.state.ns.child(parent, name)
        if e is None:
            raise FUSEError(errno.ENOENT)
        return self.attrs(e)

    async def getattr(self, ino: int) -> Attrs:
        return self.attrs(self.entry(ino))

    async def setattr(self, ino: int, attr: Any, fields: Any) -> Attrs:
        raise refusal(self.entry(ino))

    async def readlink(self, ino: int) -> bytes:
        self.entry(ino)
        raise FUSEError(errno.EINVAL)

    # -- changes: none ---------------------------------------------------------------------

    async def make(
        self, parent: int, name: bytes, kind: int, mode: int, ctx: Any, target: bytes = b""
    ) -> Attrs:
        raise refusal(self.entry(parent))

    async def create(
        self, parent: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[object, pyfuse3.FileInfo, Attrs]:
        raise refusal(self.entry(parent))

    async def remove(self, parent: int, name: bytes, is_dir: bool) -> None:
        raise refusal(self.entry(parent))

    async def rename(
        self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes, flags: int
    ) -> None:
        raise refusal(self.entry(parent_old))

    # -- directories -----------------------------------------------------------------------

    async def opendir(self, ino: int) -> object:
        e = self.entry(ino)
        if not e.kind.is_dir:
            raise FUSEError(errno.ENOTDIR)
        return WorldDirHandle(e)

    async def readdir(self, handle: Any, start_id: int, token: Any) -> None:
        if not isinstance(handle, WorldDirHandle):
            raise FUSEError(errno.EBADF)
        ns = self.state.ns
        e = ns.get(handle.entry.ino)
        if e is None:
            return  # removed while listed: the listing ends
        entries = ns.entries
        order = e.order
        for i in range(e.after(start_id), len(order)):
            child = entries[order[i]]
            if not pyfuse3.readdir_reply(token, child.name, self.attrs(child), child.ino):
                break

    async def fsyncdir(self, handle: Any) -> None:
        pass

    # -- status files ----------------------------------------------------------------------

    async def open(self, ino: int, flags: int) -> tuple[object, pyfuse3.FileInfo]:
        e = self.entry(ino)
        if e.kind.is_dir:
            raise FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise FUSEError(errno.EPERM)
        spec = self.status.get(e.status or "")
        # Volatile files bypass the page cache, so a read is never cut at a stale size.
        volatile = bool(spec and spec.volatile)
        info = pyfuse3.FileInfo(direct_io=volatile, keep_cache=not volatile)
        return StatusHandle(spec.render() if spec else b""), info

    async def read(self, handle: Any, off: int, size: int) -> bytes:
        if not isinstance(handle, StatusHandle):
            raise FUSEError(errno.EBADF)
        return handle.content[off : off + size]

    async def write(self, handle: Any, off: int, buf: bytes) -> int:
        raise FUSEError(errno.EBADF)

    async def flush(self, handle: Any) -> None:
        pass

    async def fsync(self, handle: Any) -> None:
        pass

    async def release(self, handle: Any) -> None:
        pass

    # -- extended attributes ---------------------------------------------------------------

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        e = self.entry(ino)
        if name == b"user.dreki.urn":
            return str(e.urn).encode("utf-8", "surrogateescape")
        if name == b"user.dreki.store" and e.urn.store is not None:
            return e.urn.store.encode()
        raise FUSEError(errno.ENODATA)

    async def listxattr(self, ino: int) -> list[bytes]:
        self.entry(ino)
        return []

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        raise refusal(self.entry(ino))

    async def removexattr(self, ino: int, name: bytes) -> None:
        raise refusal(self.entry(ino))

    # -- for log lines ---------------------------------------------------------------------

    def urn(self, ino: int) -> URN:
        return self.entry(ino).urn

    def handle_urn(self, handle: Any) -> str:
        if isinstance(handle, WorldDirHandle):
            return str(handle.entry.urn)
        return "a status file"
