"""FUSE requests, translated: the kernel asks, the namespace and the status files answer.

Every handler goes through :func:`request`, which counts it and turns an unexpected exception
into EIO with a log line naming the URN: pyfuse3 ends the whole mount on any exception that is
not a FUSEError, and no request may do that.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pyfuse3
from pyfuse3 import FUSEError

from .invalidate import Invalidator
from .namespace import Entry, Kind, Namespace, diff
from .status import StatusFiles

log = logging.getLogger(__name__)

XATTR_URN = b"user.dreki.urn"
XATTR_STORE = b"user.dreki.store"
ACL_PREFIX = b"system.posix_acl_"

# Failures that are part of normal life: not worth a log line each.
QUIET_ERRNOS = frozenset({errno.ENOENT, errno.ENODATA, errno.ENOSYS})

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def request(fn: F) -> F:
    """Count the request; map any non-FUSE exception to EIO with a line naming the URN."""
    op = fn.__name__

    @functools.wraps(fn)
    async def handler(self: Operations, *args: Any) -> Any:
        self.counts[op] += 1
        try:
            return await fn(self, *args)
        except FUSEError as e:
            if e.errno not in QUIET_ERRNOS:
                log.info("%s %s: %s", op, self.describe(op, args), os.strerror(e.errno))
            raise
        except Exception:
            log.exception("%s %s failed unexpectedly; answered EIO", op, self.describe(op, args))
            raise FUSEError(errno.EIO) from None

    return handler  # type: ignore[return-value]


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False  # no NFS export: never asked for "." or ".."
    enable_writeback_cache = False  # it breaks >> and changes made elsewhere
    enable_acl = False

    def __init__(
        self,
        namespace: Namespace,
        status: StatusFiles,
        data_dir: Path | None = None,
        cache_timeout: float = 3600.0,
    ) -> None:
        super().__init__()
        self.ns = namespace
        self.status = status
        self.data_dir = data_dir
        self.cache_timeout = cache_timeout
        self.invalidator = Invalidator()
        self.counts: Counter[str] = Counter()
        self.uid = os.getuid()
        self.gid = os.getgid()
        self._handles: dict[int, bytes] = {}
        self._next_fh = itertools.count(1)
        self._attr_cache: dict[int, pyfuse3.EntryAttributes] = {}

    # -- namespace changes -----------------------------------------------------------------

    def set_namespace(self, new: Namespace, changed_status: tuple[str, ...] = ()) -> None:
        """Serve ``new`` from now on and have the kernel forget what changed."""
        old, self.ns = self.ns, new
        self._attr_cache = {}
        changes = diff(old, new, changed_status)
        for parent, name, ino in changes.entries:
            self.invalidator.entry(parent, name, ino)
        for ino in changes.inodes:
            self.invalidator.inode(ino)

    def status_changed(self, *names: str) -> None:
        for name in names:
            e = self.ns.status_entry(name)
            if e is not None:
                self.invalidator.inode(e.ino)

    # -- helpers ---------------------------------------------------------------------------

    def describe(self, op: str, args: tuple) -> str:
        """The URN a request is about, for log lines."""
        try:
            if op in ("read", "release", "flush", "fsync", "readdir", "releasedir", "write"):
                return f"fh {args[0]}"
            if op == "statfs":
                return self.ns.world.domain
            entry = self.ns.get(args[0]) if args else None
            if entry is None:
                return f"inode {args[0]}" if args else ""
            if op in ("lookup", "mkdir", "mknod", "create", "unlink", "rmdir", "symlink"):
                return str(entry.urn.child(args[1]))
            if op == "rename":
                return f"{entry.urn.child(args[1])} -> inode {args[2]} {args[3]!r}"
            if op == "link":
                return f"{entry.urn} -> inode {args[1]} {args[2]!r}"
            return str(entry.urn)
        except Exception:  # a log line must never fail the request
            return repr(args[:2])

    def _entry(self, ino: int) -> Entry:
        e = self.ns.get(ino)
        if e is None:
            raise FUSEError(errno.ENOENT)
        return e

    def _attrs(self, e: Entry) -> pyfuse3.EntryAttributes:
        if e.kind is Kind.STATUS_FILE:
            return self._status_attrs(e)
        attr = self._attr_cache.get(e.ino)
        if attr is not None:
            return attr
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = e.ino
        attr.st_mode = e.mode
        attr.st_nlink = e.nlink
        attr.st_uid = self.uid
        attr.st_gid = self.gid
        attr.st_size = 0
        attr.st_blksize = 4096
        attr.st_blocks = 0
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = e.mtime_ns
        attr.entry_timeout = attr.attr_timeout = self.cache_timeout
        self._attr_cache[e.ino] = attr
        return attr

    def _status_attrs(self, e: Entry, content: bytes | None = None) -> pyfuse3.EntryAttributes:
        spec = self.status.get(e.status or "")
        if content is None:
            content = spec.render() if spec else b""
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = e.ino
        attr.st_mode = e.mode
        attr.st_nlink = 1
        attr.st_uid = self.uid
        attr.st_gid = self.gid
        attr.st_size = len(content)
        attr.st_blksize = 4096
        attr.st_blocks = (len(content) + 511) // 512
        mtime = time.time_ns() if spec and spec.volatile else e.mtime_ns
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = mtime
        timeout = 0.0 if spec and spec.volatile else self.cache_timeout
        attr.entry_timeout = self.cache_timeout
        attr.attr_timeout = timeout
        return attr

    def _refuse(self, e: Entry) -> FUSEError:
        """The errno for changing something in ``e``: world dirs and .dreki are read-only."""
        if e.kind is Kind.STORE:
            return FUSEError(errno.EROFS)  # writable from the stores issue on
        return FUSEError(errno.EPERM)

    # -- lookups and attributes ------------------------------------------------------------

    @request
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        e = self.ns.child(parent_inode, name)
        if e is None:
            if self.ns.get(parent_inode) is None:
                raise FUSEError(errno.ENOENT)
            if len(name) > 255:
                raise FUSEError(errno.ENAMETOOLONG)
            raise FUSEError(errno.ENOENT)
        return self._attrs(e)

    @request
    async def getattr(self, inode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._attrs(self._entry(inode))

    @request
    async def forget(self, inode_list: Any) -> None:
        pass  # world inodes are derived from the namespace: nothing to free

    @request
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        raise self._refuse(self._entry(inode))

    @request
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        self._entry(inode)
        raise FUSEError(errno.EINVAL)

    # -- directories -----------------------------------------------------------------------

    @request
    async def opendir(self, inode: int, ctx: Any) -> int:
        e = self._entry(inode)
        if not e.kind.is_dir:
            raise FUSEError(errno.ENOTDIR)
        return inode  # cursors are inodes: a handle needs no state

    @request
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        e = self.ns.get(fh)
        if e is None:
            return  # removed while listed: the listing ends
        entries = self.ns.entries
        order = e.order
        for i in range(e.after(start_id), len(order)):
            child = entries[order[i]]
            if not pyfuse3.readdir_reply(token, child.name, self._attrs(child), child.ino):
                break

    @request
    async def releasedir(self, fh: int) -> None:
        pass

    # -- files -----------------------------------------------------------------------------

    @request
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        e = self._entry(inode)
        if e.kind.is_dir:
            raise FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise FUSEError(errno.EPERM)
        spec = self.status.get(e.status or "")
        content = spec.render() if spec else b""
        fh = next(self._next_fh)
        self._handles[fh] = content
        # Volatile files bypass the page cache, so a read is never cut at a stale size.
        volatile = bool(spec and spec.volatile)
        return pyfuse3.FileInfo(fh=fh, direct_io=volatile, keep_cache=not volatile)

    @request
    async def read(self, fh: int, off: int, size: int) -> bytes:
        content = self._handles.get(fh)
        if content is None:
            raise FUSEError(errno.EBADF)
        return content[off : off + size]

    @request
    async def release(self, fh: int) -> None:
        self._handles.pop(fh, None)

    # -- extended attributes ---------------------------------------------------------------

    @request
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        # Asked for security.capability before every write: answer without looking anything up.
        if name == XATTR_URN:
            return self._entry(inode).urn_bytes
        if name == XATTR_STORE:
            e = self._entry(inode)
            if e.urn.store is not None:
                return e.urn.store.encode()
        raise FUSEError(errno.ENODATA)

    @request
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        e = self._entry(inode)
        return [XATTR_URN, XATTR_STORE] if e.urn.store is not None else [XATTR_URN]

    @request
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        e = self._entry(inode)
        if name.startswith(ACL_PREFIX):
            raise FUSEError(errno.EOPNOTSUPP)  # cp -a tries: refuse, it carries on
        if name.startswith(b"user.dreki."):
            raise FUSEError(errno.EPERM)
        raise self._refuse(e)

    @request
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        e = self._entry(inode)
        if name.startswith(ACL_PREFIX):
            raise FUSEError(errno.EOPNOTSUPP)
        if name.startswith(b"user.dreki."):
            raise FUSEError(errno.EPERM)
        raise FUSEError(errno.ENODATA) if e.kind is Kind.STORE else self._refuse(e)

    # -- changes: refused in this tree (the stores issue makes store directories writable) --

    @request
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        raise self._refuse(self._entry(parent_inode))

    @request
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        raise self._refuse(self._entry(parent_inode))

    @request
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        raise self._refuse(self._entry(parent_inode))

    @request
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        raise self._refuse(self._entry(parent_inode))

    @request
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        p = self._entry(parent_inode)
        if self.ns.child(parent_inode, name) is None:
            raise FUSEError(errno.ENOENT)
        raise self._refuse(p)

    @request
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        p = self._entry(parent_inode)
        if self.ns.child(parent_inode, name) is None:
            raise FUSEError(errno.ENOENT)
        raise self._refuse(p)

    @request
    async def rename(
        self,
        parent_old: int,
        name_old: bytes,
        parent_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        p = self._entry(parent_old)
        if self.ns.child(parent_old, name_old) is None:
            raise FUSEError(errno.ENOENT)
        raise self._refuse(p)

    @request
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        raise FUSEError(errno.EPERM)  # no hard links in drekifs

    # -- the filesystem --------------------------------------------------------------------

    @request
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = 4096
        out.f_namemax = 255
        if self.data_dir is not None:
            # The data lives on the data directory's filesystem: its space is ours.
            try:
                st = os.statvfs(self.data_dir)
                out.f_frsize = st.f_frsize
                out.f_blocks, out.f_bfree, out.f_bavail = st.f_blocks, st.f_bfree, st.f_bavail
            except OSError:
                pass
        out.f_files = len(self.ns.entries)
        out.f_ffree = out.f_favail = 1 << 32
        return out
