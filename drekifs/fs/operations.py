"""FUSE requests, translated: each goes to the tree its inode belongs to (tree.py).

Three trees answer: the world's directories and status files (worlddirs.py), the stores held
in this process (localstores.py, through ``stores.base.Store``) and the stores reached by
calls (remotestores.py, through ``stores.remote.RemoteStore``). :meth:`Operations.tree_of`
picks one by the inode's kind; this class only checks what is the same everywhere (names,
system xattrs), numbers the handles and keeps the safety net.

Every handler goes through :func:`request`, which counts it and turns an unexpected exception
into EIO with a log line naming the URN: pyfuse3 ends the whole mount on any exception that is
not a FUSEError, and no request may do that. A failure that repeats (a down owner polled by a
program) is logged once per interval with a count (drekifs/logs.py).
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pyfuse3
from pyfuse3 import FUSEError

from ..logs import LogLimiter
from ..stores.base import Store
from ..stores.record import DIR, FILE, SYMLINK, StoreError
from . import inodes
from .invalidate import Invalidator
from .localstores import LocalStores
from .namespace import Entry, Kind, Namespace
from .remotestores import RemoteStores
from .status import StatusFiles
from .tree import MountState, Tree
from .worlddirs import WorldDirs, refusal

if TYPE_CHECKING:
    from .requestloop import RequestLoop

log = logging.getLogger(__name__)

ACL_PREFIX = b"system.posix_acl_"
MAX_NAME = 255

# Failures that are part of normal life: not worth a log line each.
# ESTALE: an inode whose entry went meanwhile (the kernel then looks the name up again).
QUIET_ERRNOS = frozenset({errno.ENOENT, errno.ENODATA, errno.ENOSYS, errno.EEXIST, errno.ESTALE})
# Requests whose first argument is a file handle, not an inode.
BY_HANDLE = frozenset({"read", "write", "release", "flush", "fsync", "readdir", "releasedir"})


class QuietError(FUSEError):
    """An errno that is routine where it is raised (cp -a's ACLs): logged at debug level only."""


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def request(fn: F) -> F:
    """Count the request; map any non-FUSE exception to EIO with a line naming the URN.

    ``fn`` may be a plain function that checks the request and returns its tree's coroutine:
    a coroutine fewer per request than an ``async def`` awaiting it (docs/decisions.md)."""
    op = fn.__name__

    @functools.wraps(fn)
    async def handler(self: Operations, *args: Any) -> Any:
        self.counts[op] += 1
        try:
            loop = self.request_loop
            if loop is None:
                return await fn(self, *args)
            # The request's coroutine, handing the seat on if it waits (requestloop.py).
            return await loop.run(fn(self, *args))
        except FUSEError as e:
            if e.errno not in QUIET_ERRNOS and not isinstance(e, QuietError):
                self.failed(op, args, e.errno, os.strerror(e.errno))
            elif log.isEnabledFor(logging.DEBUG):  # everyday answers, for SIGUSR1 sessions
                log.debug("%s %s: %s", op, self.describe(op, args), os.strerror(e.errno))
            raise
        except StoreError as e:
            if e.errno not in QUIET_ERRNOS:
                self.failed(op, args, e.errno, str(e))
            raise FUSEError(e.errno) from None
        except Exception as e:
            self.failed(op, args, type(e), None)
            raise FUSEError(errno.EIO) from None

    return handler  # type: ignore[return-value]


async def nothing() -> None:
    """What a request returning its tree's coroutine returns when there is nothing to do."""


def check_name(name: bytes) -> None:
    if len(name) > MAX_NAME:
        raise FUSEError(errno.ENAMETOOLONG)


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
        stores: dict[str, Store] | None = None,
        node: str | None = None,
        slots: inodes.StoreSlots | None = None,
        remote: RemoteStores | None = None,
        *,
        request_loop: RequestLoop | None = None,
    ) -> None:
        super().__init__()
        self.state = MountState(
            namespace,
            Invalidator(),
            slots or inodes.StoreSlots(),
            cache_timeout,
            os.getuid(),
            os.getgid(),
        )
        self.status = status
        self.data_dir = data_dir
        self.request_loop = request_loop
        self.counts: Counter[str] = Counter()
        self.failures = LogLimiter(log)  # per-request failures: a line per errno, URN, interval
        self.local = LocalStores(self.state, stores or {}, node, origin=self)
        self.world = WorldDirs(self.state, status, self.local.root_attrs)
        self.remote = remote
        if remote is not None:
            remote.attach(self.state)
        self._handles: dict[int, tuple[Tree, Any]] = {}
        self._next_fh = itertools.count(1)

    # -- what the daemon and tests look at -------------------------------------------------

    @property
    def ns(self) -> Namespace:
        return self.state.ns

    @property
    def invalidator(self) -> Invalidator:
        return self.state.invalidator

    @property
    def stores(self) -> dict[str, Store]:
        return self.local.stores

    @property
    def cache_timeout(self) -> float:
        return self.state.cache_timeout

    def set_namespace(self, new: Namespace, changed_status: tuple[str, ...] = ()) -> None:
        """Serve ``new`` from now on and have the kernel forget what changed."""
        old, self.state.ns = self.state.ns, new
        self.world.namespace_changed()
        self.local.nodes.clear()
        self.local.cache.namespace_changed(old, new, changed_status)

    async def commit_open_files(self) -> None:
        """At unmount: hand every dirty buffer of the stores held here to its store."""
        await self.local.commit_all()

    # -- which tree answers ----------------------------------------------------------------

    def tree_of(self, ino: int) -> Tree:
        """The tree an inode belongs to: a store entry's by its slot, a store root's by who
        serves the store, anything else the world's."""
        slot = inodes.store_slot(ino)
        if slot:
            remote = self.remote
            if remote is not None and slot in remote.by_slot:
                return remote
            return self.local  # its stores, or ESTALE for a slot nobody serves any more
        e = self.state.ns.get(ino)
        if e is not None and e.kind is Kind.STORE:
            if self.local.store_at(e) is not None:
                return self.local
            if self.remote is not None and self.remote.serves(e):
                return self.remote
        return self.world

    def _handle(self, fh: int) -> tuple[Tree, Any]:
        found = self._handles.get(fh)
        if found is None:
            raise FUSEError(errno.EBADF)
        return found

    def _new_handle(self, tree: Tree, handle: object) -> int:
        fh = next(self._next_fh)
        self._handles[fh] = (tree, handle)
        return fh

    # -- log lines -------------------------------------------------------------------------

    def failed(self, op: str, args: tuple, kind: object, detail: str | None) -> None:
        """A request's failure, logged: once per interval for the same kind of failure of the
        same URN (of the same store, when its owner is down), the repeats counted. No
        ``detail``: an unexpected exception (being handled), logged with its traceback."""
        level = logging.INFO if detail is not None else logging.ERROR
        if not log.isEnabledFor(level):
            return
        where = self.describe(op, args)
        # Everything of a down owner fails alike: one line for all of its store.
        about = "::".join(where.split("::", 2)[:2]) if kind == errno.EHOSTDOWN else where
        if detail is None:
            msg = "%s %s failed unexpectedly; answered EIO"
            self.failures.log(level, (kind, about), msg, op, where, exc_info=True)
        else:
            self.failures.log(level, (kind, about), "%s %s: %s", op, where, detail)

    def describe(self, op: str, args: tuple) -> str:
        """The URN a request is about, for log lines."""
        try:
            if op in BY_HANDLE:
                found = self._handles.get(args[0])
                if found is None:
                    return f"file handle {args[0]}"
                return found[0].handle_urn(found[1])
            if op == "statfs":
                return self.state.ns.world.domain
            if not args:
                return "?"
            urn = self.tree_of(args[0]).urn(args[0])
            if op in ("lookup", "mkdir", "mknod", "create", "unlink", "rmdir", "symlink"):
                return str(urn.child(args[1]))
            if op == "rename":
                new_parent = self.tree_of(args[2]).urn(args[2])
                return f"{urn.child(args[1])} -> {new_parent.child(args[3])}"
            return str(urn)
        except Exception:  # a log line must never fail the request
            if args and isinstance(args[0], int):
                return self.local.gone_inode(args[0]) or f"inode {args[0]}"
            return "?"

    # -- names and attributes --------------------------------------------------------------

    @request
    def lookup(
        self, parent_inode: int, name: bytes, ctx: Any
    ) -> Awaitable[pyfuse3.EntryAttributes]:
        check_name(name)
        return self.tree_of(parent_inode).lookup(parent_inode, name)

    @request
    def getattr(self, inode: int, ctx: Any) -> Awaitable[pyfuse3.EntryAttributes]:
        return self.tree_of(inode).getattr(inode)

    @request
    async def forget(self, inode_list: Any) -> None:
        pass  # inodes are derived (namespace, store entry ids): nothing to free

    @request
    def setattr(
        self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any
    ) -> Awaitable[pyfuse3.EntryAttributes]:
        return self.tree_of(inode).setattr(inode, attr, fields)

    @request
    def readlink(self, inode: int, ctx: Any) -> Awaitable[bytes]:
        return self.tree_of(inode).readlink(inode)

    # -- creating and removing -------------------------------------------------------------

    @request
    def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Awaitable[Any]:
        check_name(name)
        return self.tree_of(parent_inode).make(parent_inode, name, DIR, mode, ctx)

    @request
    def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        if not stat.S_ISREG(mode):
            raise FUSEError(errno.EPERM)  # no devices, FIFOs or sockets in a store
        check_name(name)
        return self.tree_of(parent_inode).make(parent_inode, name, FILE, mode, ctx)

    @request
    def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        check_name(name)
        tree = self.tree_of(parent_inode)
        return tree.make(parent_inode, name, SYMLINK, 0o777, ctx, target)

    @request
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        check_name(name)
        tree = self.tree_of(parent_inode)
        try:
            handle, info, attrs = await tree.create(parent_inode, name, mode, flags, ctx)
        except (StoreError, FUSEError) as e:
            if e.errno != errno.EEXIST or flags & os.O_EXCL:
                raise
            # The kernel held a negative entry for a name made meanwhile (by a peer, or through
            # another path of this node). Not opened here: the kernel checks no permission and
            # truncates nothing for a file it believes it created. ESTALE makes it look the name
            # up again and open what it finds, as any open, with O_TRUNC (fs/namei.c retries
            # the whole open once with LOOKUP_REVAL, and a negative entry then always goes).
            raise FUSEError(errno.ESTALE) from None
        info.fh = self._new_handle(tree, handle)
        return info, attrs

    @request
    def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> Awaitable[None]:
        return self.tree_of(parent_inode).remove(parent_inode, name, False)

    @request
    def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> Awaitable[None]:
        return self.tree_of(parent_inode).remove(parent_inode, name, True)

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
        check_name(name_new)
        old, new = self.tree_of(parent_old), self.tree_of(parent_new)
        if old is new:
            return await old.rename(parent_old, name_old, parent_new, name_new, flags)
        if old is self.remote or new is self.remote:
            raise FUSEError(errno.EXDEV)  # another node's store and anything else
        if old is self.world:
            raise refusal(self.state.ns.get(parent_old))
        # From a store held here into the world: a store root served by nobody is another
        # store (EXDEV); a world directory takes nothing (EPERM).
        target: Entry | None = self.state.ns.get(parent_new)
        raise FUSEError(
            errno.EXDEV if target is not None and target.kind is Kind.STORE else errno.EPERM
        )

    @request
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        raise FUSEError(errno.EPERM)  # no hard links in drekifs

    # -- directories -----------------------------------------------------------------------

    @request
    async def opendir(self, inode: int, ctx: Any) -> int:
        tree = self.tree_of(inode)
        return self._new_handle(tree, await tree.opendir(inode))

    @request
    def readdir(self, fh: int, start_id: int, token: Any) -> Awaitable[None]:
        tree, handle = self._handle(fh)
        return tree.readdir(handle, start_id, token)

    @request
    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    @request
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        found = self._handles.get(fh)
        if found is not None:
            await found[0].fsyncdir(found[1])

    # -- files -----------------------------------------------------------------------------

    @request
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        tree = self.tree_of(inode)
        handle, info = await tree.open(inode, flags)
        info.fh = self._new_handle(tree, handle)
        return info

    @request
    def read(self, fh: int, off: int, size: int) -> Awaitable[bytes]:
        tree, handle = self._handle(fh)
        return tree.read(handle, off, size)

    @request
    def write(self, fh: int, off: int, buf: bytes) -> Awaitable[int]:
        tree, handle = self._handle(fh)
        return tree.write(handle, off, buf)

    @request
    def fsync(self, fh: int, datasync: bool) -> Awaitable[None]:
        tree, handle = self._handle(fh)
        return tree.fsync(handle)

    @request
    async def flush(self, fh: int) -> None:
        # close(2): only another node's file can have bytes to send (and an error to return).
        # Without other nodes' stores (no key ring), ENOSYS: the kernel then never sends
        # FLUSH again, which saves a request per close.
        if self.remote is None:
            raise FUSEError(errno.ENOSYS)
        found = self._handles.get(fh)
        if found is not None:
            await found[0].flush(found[1])

    @request
    def release(self, fh: int) -> Awaitable[None]:
        found = self._handles.pop(fh, None)
        if found is None:
            return nothing()
        return found[0].release(found[1])

    # -- extended attributes ---------------------------------------------------------------

    @request
    def getxattr(self, inode: int, name: bytes, ctx: Any) -> Awaitable[bytes]:
        # Asked for security.capability before every write: answer without looking anything up.
        if not name.startswith(b"user."):
            raise FUSEError(errno.ENODATA)
        return self.tree_of(inode).getxattr(inode, name)

    @request
    def listxattr(self, inode: int, ctx: Any) -> Awaitable[list[bytes]]:
        # The user.dreki.* attributes are computed, read by name, and not listed: rsync -X,
        # cp -a and tar --xattrs copy what is listed, and would carry them to other files
        # (or try to remove them here).
        return self.tree_of(inode).listxattr(inode)

    @request
    def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> Awaitable[None]:
        if name.startswith(ACL_PREFIX):
            raise QuietError(errno.EOPNOTSUPP)  # cp -a tries on every file: refuse, it carries on
        if name.startswith(b"user.dreki."):
            raise FUSEError(errno.EPERM)
        return self.tree_of(inode).setxattr(inode, name, value)

    @request
    def removexattr(self, inode: int, name: bytes, ctx: Any) -> Awaitable[None]:
        if name.startswith(ACL_PREFIX):
            raise FUSEError(errno.EOPNOTSUPP)
        if name.startswith(b"user.dreki."):
            raise FUSEError(errno.EPERM)
        return self.tree_of(inode).removexattr(inode, name)

    # -- the filesystem --------------------------------------------------------------------

    @request
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = 4096
        out.f_namemax = MAX_NAME
        if self.data_dir is not None:
            # The data lives on the data directory's filesystem: its space is ours.
            try:
                st = os.statvfs(self.data_dir)
                out.f_frsize = st.f_frsize
                out.f_blocks, out.f_bfree, out.f_bavail = st.f_blocks, st.f_bfree, st.f_bavail
                out.f_files, out.f_ffree, out.f_favail = st.f_files, st.f_ffree, st.f_favail
            except OSError:
                pass
        return out
