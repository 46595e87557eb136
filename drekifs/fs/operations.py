"""FUSE requests, translated: the kernel asks; the namespace, the stores and the status files
answer.

Two kinds of inodes: the world's directories (regions, nodes, store roots, ``.dreki``), from the
namespace; and store entries, whose numbers carry the store and entry id (inodes.py). Every
handler goes through :func:`request`, which counts it and turns an unexpected exception into EIO
with a log line naming the URN: pyfuse3 ends the whole mount on any exception that is not a
FUSEError, and no request may do that. A failure that repeats (a down owner polled by a
program) is logged once per interval with a count (drekifs/logs.py).
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyfuse3
from pyfuse3 import FUSEError

from ..logs import LogLimiter
from ..stores.base import Key, Store
from ..stores.keys import split_key
from ..stores.record import DIR, FILE, SYMLINK, Record, StoreError
from ..urn import URN
from . import inodes
from .attrs import metadata_changes, record_attrs
from .files import OpenFile, OpenFiles
from .invalidate import Invalidator
from .namespace import Entry, Kind, Namespace, diff
from .remote import RemoteDirHandle, RemoteFileHandle, RemoteStores
from .requestloop import RequestLoop
from .status import StatusFiles

log = logging.getLogger(__name__)

XATTR_URN = b"user.dreki.urn"
XATTR_STORE = b"user.dreki.store"
XATTR_VERSION = b"user.dreki.version"
XATTR_OWNER = b"user.dreki.owner"
ACL_PREFIX = b"system.posix_acl_"
MAX_NAME = 255
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
NODE_CACHE = 20_000

# Failures that are part of normal life: not worth a log line each.
# ESTALE: an inode whose entry went meanwhile (the kernel then looks the name up again).
QUIET_ERRNOS = frozenset({errno.ENOENT, errno.ENODATA, errno.ENOSYS, errno.EEXIST, errno.ESTALE})


class QuietError(FUSEError):
    """An errno that is routine where it is raised (cp -a's ACLs): logged at debug level only."""


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def request(fn: F) -> F:
    """Count the request; map any non-FUSE exception to EIO with a line naming the URN."""
    op = fn.__name__

    @functools.wraps(fn)
    async def handler(self: Operations, *args: Any) -> Any:
        self.counts[op] += 1
        try:
            if self.request_loop is None:
                return await fn(self, *args)
            # The request's coroutine, handing the seat on if it waits (~1,000 instructions
            # a request more than an inline copy of run(), which no test would reach).
            return await self.request_loop.run(fn(self, *args))
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


@dataclass(slots=True)
class DirHandle:
    node: Entry | StoreNode
    # Store directories: (inode, name, record) by inode, as the store had them at ``changes``.
    listing: list[tuple[int, bytes, Record]] | None = None
    changes: int = 0
    ns: Namespace | None = None  # the namespace the node was resolved in


@dataclass(slots=True)
class FileHandle:
    file: OpenFile | None = None  # store files
    content: bytes | None = None  # status files


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
        self.request_loop = request_loop  # the daemon's, when installed (fs/requestloop.py)
        self.ns = namespace
        self.status = status
        self.data_dir = data_dir
        self.cache_timeout = cache_timeout
        self.stores = stores or {}
        self.node = node
        self.slots = slots or inodes.StoreSlots()
        self.by_slot = {self.slots.slot(name): s for name, s in self.stores.items()}
        self.invalidator = Invalidator()
        self.counts: Counter[str] = Counter()
        self.failures = LogLimiter(log)  # per-request failures: a line per errno, URN, interval
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.files = OpenFiles()
        self.remote = remote
        if remote is not None:
            remote.invalidator = self.invalidator
            remote.domain = namespace.world.domain
            remote.roots_of = lambda node, store: [
                e.ino for e in self.ns.store_roots.get((node, store), ())
            ]
        self._handles: dict[int, Any] = {}
        self._next_fh = itertools.count(1)
        self._attr_cache: dict[int, pyfuse3.EntryAttributes] = {}
        # A name absent from a store: inode 0 tells the kernel to keep the negative entry as
        # long as a positive one (cheaper than an ENOENT, which it keeps for no time at all:
        # cp's lookup of each new name, a shell's probing). Anything that later creates the
        # name elsewhere than through the kernel invalidates it (_store_changed). Until the
        # invalidation lands (or if it were missed), a CREATE of the name is answered ESTALE,
        # so the kernel looks it up again (see create).
        self._absent = pyfuse3.EntryAttributes()
        self._absent.st_ino = 0
        self._absent.entry_timeout = cache_timeout
        # Store inodes resolved, each valid while its store has not changed (tar, find, rsync
        # ask about one inode several times in a row).
        self._nodes: dict[int, tuple[StoreNode, int]] = {}
        for store in self.stores.values():
            store.watchers.append(functools.partial(self._store_changed, store))
            store.before_drop.append(functools.partial(self._dropping, store))

    # -- namespace and store changes -------------------------------------------------------

    def set_namespace(self, new: Namespace, changed_status: tuple[str, ...] = ()) -> None:
        """Serve ``new`` from now on and have the kernel forget what changed."""
        old, self.ns = self.ns, new
        self._attr_cache = {}
        self._nodes = {}
        changes = diff(old, new, changed_status)
        for parent, name, ino in changes.entries:
            self.invalidator.entry(parent, name, ino)
        for ino in changes.inodes:
            self.invalidator.inode(ino)

    def _store_changed(self, store: Store, key: bytes, origin: object, carried: bool) -> None:
        """A change that did not come through this mount: the kernel's caches must drop it,
        on every path of the location (queued: invalidating here could deadlock)."""
        if carried:
            return  # moved with its directory: same inode, and the directory's names suffice
        if origin is self and not self.ns.listed_twice:
            return  # the kernel saw it happen (the usual case: decided before parsing the key)
        loc, parts = split_key(key)
        if not parts:
            return
        roots = self.ns.store_roots.get((loc, store.name), ())
        if origin is self and len(roots) < 2:
            return  # the kernel saw it happen; a node listed twice shows it on the other path
        slot = self.slots.slot(store.name)
        parent = store.get(loc, parts[:-1])
        rec = store.get(loc, parts)
        for root in roots:
            if len(parts) == 1:
                parent_ino = root.ino
            elif parent is not None:
                parent_ino = inodes.pack(root.alias, slot, parent.eid)
            else:
                continue
            self.invalidator.entry(parent_ino, parts[-1])
            self.invalidator.inode(parent_ino)
            if rec is not None:
                ino = inodes.pack(root.alias, slot, rec.eid)
                if self.files.get(store, rec.eid) is not None:
                    # Open here: its readers keep their pages (close-to-open), sizes follow.
                    self.invalidator.attributes(ino)
                else:
                    self.invalidator.inode(ino)

    def _dropping(self, store: Store, rec: Record) -> None:
        """A file's entry is about to go (unlinked or replaced, here or by a peer): if it is
        open here, its handles keep it (files.OpenFile.orphan), and the kernel's attributes
        of it go (st_nlink is 0 now)."""
        f = self.files.get(store, rec.eid)
        if f is None:
            return
        where = store.locate(rec.eid)  # still known for a moment: its key, for log lines
        f.orphan(rec, where[1] if where is not None else ())
        slot = self.slots.slot(store.name)
        for root in self.ns.store_roots.get((f.loc, store.name), ()):
            self.invalidator.attributes(inodes.pack(root.alias, slot, rec.eid))

    # -- resolving inodes ------------------------------------------------------------------

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
            if op in ("read", "write", "release", "flush", "fsync", "readdir", "releasedir"):
                handle = self._handles.get(args[0])
                if isinstance(handle, FileHandle) and handle.file is not None:
                    return self._file_urn(handle.file)
                if isinstance(handle, DirHandle):
                    return str(self._urn_of(handle.node))
                if self.remote and isinstance(handle, RemoteFileHandle):
                    return self.remote.file_urn(handle.file)
                if self.remote and isinstance(handle, RemoteDirHandle):
                    return self.remote.dir_urn(handle)
                return f"file handle {args[0]}"
            if op == "statfs":
                return self.ns.world.domain
            node = self._node(args[0]) if args else None
            urn = self._urn_of(node)
            if op in ("lookup", "mkdir", "mknod", "create", "unlink", "rmdir", "symlink"):
                return str(urn.child(args[1]))
            if op == "rename":
                new_parent = self._urn_of(self._node(args[2]))
                return f"{urn.child(args[1])} -> {new_parent.child(args[3])}"
            return str(urn)
        except Exception:  # a log line must never fail the request
            slot = inodes.store_slot(args[0]) if args and isinstance(args[0], int) else 0
            if slot:  # an entry that went (ESTALE)
                store = self.by_slot.get(slot)
                name = store.name if store is not None else f"store slot {slot}"
                return f"{name} entry {args[0] & inodes.EID_MASK} (gone)"
            return f"inode {args[0]}" if args and isinstance(args[0], int) else "?"

    def _file_urn(self, f: OpenFile) -> str:
        """An open file's URN, wherever it is now (renamed while open or not)."""
        where = f.store.locate(f.eid)
        roots = self.ns.store_roots.get((where[0], f.store.name)) if where else None
        if not where or not roots:
            return f"{f.store.name} entry {f.eid} (no path: unlinked)"
        root = roots[0].urn
        return str(URN(root.world, root.segments, root.store, where[1]))

    def _urn_of(self, node: Entry | StoreNode | None) -> URN:
        if node is None:
            raise FUSEError(errno.ENOENT)
        if isinstance(node, Entry):
            return node.urn
        if node.root is not None:
            return node.root.urn
        return URN(self.ns.world.domain, node.segments, node.store.name, node.parts)

    def _node(self, ino: int) -> Entry | StoreNode:
        """What an inode is now. A store entry that went is ESTALE, unless it is a file still
        open here (an orphan, _orphan): the kernel asks by inode, and ESTALE makes it
        look the name up again where that helps (open, stat, chmod... of a name whose cached
        entry another peer removed or replaced: fs/namei.c retries with LOOKUP_REVAL)."""
        cached = self._nodes.get(ino)  # store inodes only
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
                self._remember(node)
                return node
        slot = inodes.store_slot(ino)
        if slot:
            store = self.by_slot.get(slot)
            if store is not None:
                si = inodes.unpack(ino)
                where = store.locate(si.eid)
                if where is not None:
                    loc, parts = where
                    segments = self.ns.alias_paths.get((loc, si.alias))
                    rec = store.get(loc, parts)
                    if segments is not None and rec is not None and rec.eid == si.eid:
                        node = StoreNode(ino, store, loc, segments, si.alias, parts, rec)
                        self._remember(node)
                        return node
                f = self.files.get(store, si.eid)
                if f is not None and f.gone is not None:
                    segments = self.ns.alias_paths.get((f.loc, si.alias))
                    if segments is not None:
                        return StoreNode(ino, store, f.loc, segments, si.alias, f.parts, f.gone)
            raise FUSEError(errno.ESTALE)
        e = self.ns.get(ino)
        if e is None:
            raise FUSEError(errno.ENOENT)
        if e.kind is Kind.STORE:
            store = self._store_at(e)
            if store is not None:
                rec = store.get(e.location, ())
                return StoreNode(ino, store, e.location, e.urn.segments, e.alias, (), rec, e)
        return e

    def _remember(self, node: StoreNode) -> None:
        """Keep what an inode is, for the requests that follow (valid until the store changes)."""
        if len(self._nodes) >= NODE_CACHE:
            self._nodes.clear()
        self._nodes[node.ino] = (node, node.store.changes)

    def _store_at(self, e: Entry) -> Store | None:
        """The store served at a store root: global everywhere, local ones on this node only."""
        name = e.urn.store or ""
        if name == "global" or e.location == self.node:
            return self.stores.get(name)
        return None

    def _orphan(self, node: StoreNode) -> OpenFile | None:
        """The open file a store inode answers from once its entry went (OpenFile.orphan):
        whatever changes it stays there, as its old key may be another entry's now."""
        f = self.files.by_key.get((node.store.name, node.rec.eid)) if self.files.by_key else None
        return f if f is not None and f.gone is not None else None

    def _store_node(self, ino: int) -> StoreNode:
        node = self._node(ino)
        if isinstance(node, StoreNode):
            return node
        raise self._refuse(node)

    def _child(self, parent: StoreNode, name: bytes) -> StoreNode | None:
        parts = (*parent.parts, name)
        rec = parent.store.get(parent.loc, parts)
        if rec is None:
            return None
        ino = inodes.pack(parent.alias, self.slots.slot(parent.store.name), rec.eid)
        return StoreNode(ino, parent.store, parent.loc, parent.segments, parent.alias, parts, rec)

    @staticmethod
    def _check_name(name: bytes) -> None:
        if len(name) > MAX_NAME:
            raise FUSEError(errno.ENAMETOOLONG)

    # -- attributes ------------------------------------------------------------------------

    def _attrs(self, node: Entry | StoreNode) -> pyfuse3.EntryAttributes:
        if isinstance(node, StoreNode):
            return self._store_attrs(node)
        if node.kind is Kind.STATUS_FILE:
            return self._status_attrs(node)
        attr = self._attr_cache.get(node.ino)
        if attr is not None:
            return attr
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.ino
        attr.st_mode = node.mode
        attr.st_nlink = node.nlink
        attr.st_uid = self.uid
        attr.st_gid = self.gid
        attr.st_size = 0
        attr.st_blksize = 4096
        attr.st_blocks = 0
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = node.mtime_ns
        attr.entry_timeout = attr.attr_timeout = self.cache_timeout
        if node.kind is not Kind.STORE:
            self._attr_cache[node.ino] = attr
        return attr

    def _store_attrs(self, node: StoreNode) -> pyfuse3.EntryAttributes:
        rec = node.rec
        if self.files.by_key and rec.kind != DIR:  # a file written here: its buffer's size
            f = self.files.by_key.get((node.store.name, rec.eid))
            if f is not None:
                if f.gone is not None:  # its entry went: its handles' own (st_nlink 0)
                    return f.orphan_attrs(node.ino, self.cache_timeout)
                if f.dirty:
                    return f.attrs(node.ino, rec, self.cache_timeout)
        attrs = node.attrs
        if attrs is None:
            mtime = None
            if node.root is not None and not rec.mtime_ns:
                mtime = node.root.mtime_ns  # a root nobody wrote in yet
            attrs = node.attrs = record_attrs(node.ino, rec, self.cache_timeout, mtime_ns=mtime)
        return attrs

    def _status_attrs(self, e: Entry) -> pyfuse3.EntryAttributes:
        spec = self.status.get(e.status or "")
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
        volatile = bool(spec and spec.volatile)
        mtime = time.time_ns() if volatile else e.mtime_ns
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = mtime
        attr.entry_timeout = self.cache_timeout
        attr.attr_timeout = 0.0 if volatile else self.cache_timeout
        return attr

    def _refuse(self, node: Entry | StoreNode) -> FUSEError:
        """The errno for changing something that cannot change here."""
        if isinstance(node, Entry) and node.kind is Kind.STORE:
            return FUSEError(errno.EROFS)  # another node's store: not served by this peer yet
        return FUSEError(errno.EPERM)  # world directories and .dreki are read-only

    # -- lookups and attributes ------------------------------------------------------------

    @request
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        self._check_name(name)
        if self.remote and (r := self.remote.ref(self.ns, parent_inode)):
            return await self.remote.lookup(r, name)
        parent = self._node(parent_inode)
        if isinstance(parent, StoreNode):
            child = self._child(parent, name)
            if child is None:
                if log.isEnabledFor(logging.DEBUG):  # as an ENOENT would be, for SIGUSR1 sessions
                    args = (parent_inode, name)
                    log.debug(
                        "lookup %s: %s", self.describe("lookup", args), os.strerror(errno.ENOENT)
                    )
                return self._absent
            return self._store_attrs(child)
        e = self.ns.child(parent_inode, name)
        if e is None:
            raise FUSEError(errno.ENOENT)
        return self._attrs(self._node(e.ino))

    @request
    async def getattr(self, inode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        if self.remote and (r := self.remote.ref(self.ns, inode)):
            return await self.remote.getattr(r)
        return self._attrs(self._node(inode))

    @request
    async def forget(self, inode_list: Any) -> None:
        pass  # inodes are derived (namespace, store entry ids): nothing to free

    @request
    async def setattr(
        self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        if self.remote and (r := self.remote.ref(self.ns, inode)):
            return await self.remote.setattr(r, attr, fields)
        node = self._store_node(inode)
        store, loc, parts = node.store, node.loc, node.parts
        rec: Record | None = node.rec
        f = self.files.get(store, node.rec.eid)
        if f is not None and f.gone is not None:
            return self._set_orphan(f, inode, attr, fields)
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
                rec = store.write_value(loc, parts, node.rec.eid, bytes(value), self)
        changes = metadata_changes(attr, fields)
        if changes:
            if f is not None and f.dirty:
                # Bytes not committed yet: the change waits with them, one version at close.
                f.set_metadata(changes)
                held = True
            else:
                rec = store.update(loc, parts, self, **changes)
        if held and f is not None:
            self._unsaved_changed(f)
            if rec is node.rec:  # what the commit will make of it
                return f.attrs(inode, rec, self.cache_timeout)
        if rec is node.rec:
            return self._store_attrs(node)
        if rec is None:
            return self._attrs(self._node(inode))
        # What the store answered is what a new lookup would find: no need to ask again.
        return self._store_attrs(
            StoreNode(inode, store, loc, node.segments, node.alias, parts, rec, node.root)
        )

    def _set_orphan(
        self, f: OpenFile, inode: int, attr: Any, fields: Any
    ) -> pyfuse3.EntryAttributes:
        if fields.update_size:
            f.truncate(attr.st_size)
        changes = metadata_changes(attr, fields)
        if changes:
            f.set_metadata(changes)
        return f.orphan_attrs(inode, self.cache_timeout)

    @request
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        if self.remote and (r := self.remote.ref(self.ns, inode)):
            return await self.remote.readlink(r)
        node = self._node(inode)
        if isinstance(node, StoreNode) and node.rec.kind == SYMLINK:
            return node.rec.target
        raise FUSEError(errno.EINVAL)

    # -- creating and removing -------------------------------------------------------------

    def _create(
        self, parent_inode: int, name: bytes, kind: int, mode: int, ctx: Any, target: bytes = b""
    ) -> StoreNode:
        self._check_name(name)
        parent = self._store_node(parent_inode)
        if not parent.is_dir:
            raise FUSEError(errno.ENOTDIR)
        parts = (*parent.parts, name)
        store = parent.store
        rec = store.create(
            parent.loc, parts, kind, stat.S_IMODE(mode), ctx.uid, ctx.gid, target, self
        )
        ino = inodes.pack(parent.alias, self.slots.slot(store.name), rec.eid)
        return StoreNode(ino, store, parent.loc, parent.segments, parent.alias, parts, rec)

    @request
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        if self.remote and (r := self.remote.ref(self.ns, parent_inode)):
            self._check_name(name)
            return await self.remote.make(r, name, DIR, mode, ctx)
        return self._store_attrs(self._create(parent_inode, name, DIR, mode, ctx))

    @request
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        if not stat.S_ISREG(mode):
            raise FUSEError(errno.EPERM)  # no devices, FIFOs or sockets in a store
        if self.remote and (r := self.remote.ref(self.ns, parent_inode)):
            self._check_name(name)
            return await self.remote.make(r, name, FILE, mode, ctx)
        return self._store_attrs(self._create(parent_inode, name, FILE, mode, ctx))

    @request
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        if self.remote and (r := self.remote.ref(self.ns, parent_inode)):
            self._check_name(name)
            return await self.remote.make(r, name, SYMLINK, 0o777, ctx, target)
        return self._store_attrs(self._create(parent_inode, name, SYMLINK, 0o777, ctx, target))

    @request
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        try:
            if self.remote and (r := self.remote.ref(self.ns, parent_inode)):
                self._check_name(name)
                rfh, rhandle, attr = await self.remote.create(r, name, mode, ctx)
                self._handles[rfh] = rhandle
                return pyfuse3.FileInfo(fh=rfh, keep_cache=False), attr
            node = self._create(parent_inode, name, FILE, mode, ctx)
        except (StoreError, FUSEError) as e:
            if e.errno != errno.EEXIST or flags & os.O_EXCL:
                raise
            # The kernel held a negative entry for a name made meanwhile (by a peer, or through
            # another path of this node). Not opened here: the kernel checks no permission and
            # truncates nothing for a file it believes it created. ESTALE makes it look the name
            # up again and open what it finds, as any open, with O_TRUNC (fs/namei.c retries
            # the whole open once with LOOKUP_REVAL, and a negative entry then always goes).
            raise FUSEError(errno.ESTALE) from None
        self._remember(node)  # the WRITE, SETATTRs and RELEASE that follow ask about it
        f = self.files.open(node.store, node.loc, node.rec.eid)
        if f.buffer is None and f.handles == 1:
            f.buffer = bytearray()  # new and empty: no need to read it from the store
        fh = next(self._next_fh)
        self._handles[fh] = FileHandle(file=f)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._store_attrs(node)

    @request
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        if self.remote and (r := self.remote.ref(self.ns, parent_inode)):
            return await self.remote.remove(r, name, is_dir=False)
        parent = self._store_node(parent_inode)
        parent.store.remove(parent.loc, (*parent.parts, name), is_dir=False, origin=self)

    @request
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        if self.remote and (r := self.remote.ref(self.ns, parent_inode)):
            return await self.remote.remove(r, name, is_dir=True)
        parent = self._store_node(parent_inode)
        parent.store.remove(parent.loc, (*parent.parts, name), is_dir=True, origin=self)

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
        self._check_name(name_new)
        if self.remote:
            r_old = self.remote.ref(self.ns, parent_old)
            r_new = self.remote.ref(self.ns, parent_new)
            if r_old and r_new:
                if flags & RENAME_EXCHANGE:
                    raise FUSEError(errno.EINVAL)
                noreplace = bool(flags & RENAME_NOREPLACE)
                return await self.remote.rename(r_old, name_old, r_new, name_new, noreplace)
            if r_old or r_new:
                raise FUSEError(errno.EXDEV)
        old = self._node(parent_old)
        new = self._node(parent_new)
        if not isinstance(old, StoreNode):
            raise self._refuse(old)
        if not isinstance(new, StoreNode):
            raise FUSEError(errno.EXDEV if new.kind is Kind.STORE else errno.EPERM)
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
            origin=self,
        )

    @request
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        raise FUSEError(errno.EPERM)  # no hard links in drekifs

    # -- directories -----------------------------------------------------------------------

    @request
    async def opendir(self, inode: int, ctx: Any) -> int:
        if self.remote and (r := self.remote.ref(self.ns, inode)):
            rfh, rhandle = await self.remote.opendir(r)
            self._handles[rfh] = rhandle
            return rfh
        node = self._node(inode)
        handle = DirHandle(node)
        if isinstance(node, StoreNode):
            if not node.is_dir:
                raise FUSEError(errno.ENOTDIR)
            slot = self.slots.slot(node.store.name)
            handle.changes = node.store.changes
            handle.ns = self.ns
            handle.listing = sorted(
                (inodes.pack(node.alias, slot, rec.eid), name, rec)
                for name, rec in node.store.children(node.loc, node.parts).items()
            )
        elif not node.kind.is_dir:
            raise FUSEError(errno.ENOTDIR)
        fh = next(self._next_fh)
        self._handles[fh] = handle
        return fh

    @request
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        handle = self._handles.get(fh)
        if isinstance(handle, RemoteDirHandle) and self.remote:
            return self.remote.readdir(handle, start_id, token)
        if not isinstance(handle, DirHandle):
            raise FUSEError(errno.EBADF)
        node = handle.node
        if isinstance(node, StoreNode):
            assert handle.listing is not None
            listing = handle.listing
            store = node.store
            unchanged = store.changes == handle.changes
            current = handle.ns is self.ns  # else its paths may be gone: resolve, don't keep
            # Cursors are inode numbers: a listing resumes after the last one it gave.
            for i in range(bisect_left(listing, (start_id + 1,)), len(listing)):
                ino, name, rec = listing[i]
                if unchanged:  # the record opendir read is still the entry's
                    parts = (*node.parts, name)
                    child = StoreNode(ino, store, node.loc, node.segments, node.alias, parts, rec)
                else:
                    child = self._child(node, name)
                    if child is None or child.ino != ino:
                        continue  # gone since opendir
                # The kernel asks for attributes again after a CREATE or a timeout: have the
                # entry ready, as a lookup would.
                if current:
                    self._remember(child)
                if not pyfuse3.readdir_reply(token, name, self._store_attrs(child), ino):
                    break
            return
        e = self.ns.get(node.ino)
        if e is None:
            return  # removed while listed: the listing ends
        entries = self.ns.entries
        order = e.order
        for i in range(e.after(start_id), len(order)):
            child_entry = entries[order[i]]
            attrs = self._attrs(self._node(child_entry.ino))
            if not pyfuse3.readdir_reply(token, child_entry.name, attrs, child_entry.ino):
                break

    @request
    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    @request
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        handle = self._handles.get(fh)
        if isinstance(handle, DirHandle) and isinstance(handle.node, StoreNode):
            await handle.node.store.sync()

    # -- files -----------------------------------------------------------------------------

    @request
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if self.remote and (r := self.remote.ref(self.ns, inode)):
            rfh, rhandle = await self.remote.open(r, flags)
            self._handles[rfh] = rhandle
            return pyfuse3.FileInfo(fh=rfh, keep_cache=rhandle.keep_cache)
        node = self._node(inode)
        fh = next(self._next_fh)
        if isinstance(node, StoreNode):
            if self.files.by_key and self._orphan(node):
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
            self._handles[fh] = FileHandle(file=f)
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)
        if node.kind.is_dir:
            raise FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise FUSEError(errno.EPERM)
        spec = self.status.get(node.status or "")
        self._handles[fh] = FileHandle(content=spec.render() if spec else b"")
        # Volatile files bypass the page cache, so a read is never cut at a stale size.
        volatile = bool(spec and spec.volatile)
        return pyfuse3.FileInfo(fh=fh, direct_io=volatile, keep_cache=not volatile)

    def _file(self, fh: int) -> FileHandle:
        handle = self._handles.get(fh)
        if not isinstance(handle, FileHandle):
            raise FUSEError(errno.EBADF)
        return handle

    @request
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handles.get(fh)
        if isinstance(handle, RemoteFileHandle) and self.remote:
            return await self.remote.read(handle, off, size)
        handle = self._file(fh)
        if handle.file is not None:
            return handle.file.read(off, size)
        return (handle.content or b"")[off : off + size]

    @request
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handles.get(fh)
        if isinstance(handle, RemoteFileHandle) and self.remote:
            return await self.remote.write(handle, off, buf)
        handle = self._file(fh)
        f = handle.file
        if f is None:
            raise FUSEError(errno.EBADF)
        written = f.write(off, buf)
        self._unsaved_changed(f)
        return written

    def _unsaved_changed(self, f: OpenFile) -> None:
        """A file being written here changed without a store change (bytes, or metadata held
        for the commit): on a node listed twice, the kernel's attributes of its other paths
        must go (the store's watcher does it for changes that reach the store)."""
        if not self.ns.listed_twice:
            return  # every WRITE asks: the usual answer without a lookup
        roots = self.ns.store_roots.get((f.loc, f.store.name), ())
        if len(roots) > 1:
            slot = self.slots.slot(f.store.name)
            for root in roots:
                self.invalidator.attributes(inodes.pack(root.alias, slot, f.eid))

    def _commit(self, f: OpenFile) -> None:
        if f.dirty:
            f.commit(self)

    @request
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._handles.get(fh)
        if isinstance(handle, RemoteFileHandle) and self.remote:
            return await self.remote.fsync(handle)
        handle = self._file(fh)
        if handle.file is not None:
            self._commit(handle.file)
            await handle.file.store.sync()

    @request
    async def flush(self, fh: int) -> None:
        # close(2): only another node's file can have bytes to send (and an error to return);
        # answered at once for all others. Without other nodes' stores (no key ring), ENOSYS:
        # the kernel then never sends FLUSH again, which saves a request per close.
        if self.remote is None:
            raise FUSEError(errno.ENOSYS)
        handle = self._handles.get(fh)
        if isinstance(handle, RemoteFileHandle):
            await self.remote.flush(handle)

    @request
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if isinstance(handle, RemoteFileHandle) and self.remote:
            return await self.remote.release(handle)
        if isinstance(handle, FileHandle) and handle.file is not None:
            self._commit(handle.file)
            self.files.close(handle.file)

    # -- extended attributes ---------------------------------------------------------------

    @request
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        # Asked for security.capability before every write: answer without looking anything up.
        if not name.startswith(b"user."):
            raise FUSEError(errno.ENODATA)
        if self.remote and (r := self.remote.ref(self.ns, inode)):
            return await self.remote.getxattr(self.ns.world.domain, r, name)
        node = self._node(inode)
        if name == XATTR_URN:
            return str(self._urn_of(node)).encode("utf-8", "surrogateescape")
        if isinstance(node, Entry):
            if name == XATTR_STORE and node.urn.store is not None:
                return node.urn.store.encode()
            raise FUSEError(errno.ENODATA)
        if name == XATTR_STORE:
            return node.store.name.encode()
        if name == XATTR_OWNER:
            v = node.rec.version
            return (v.peer if v else node.loc).encode()
        if name == XATTR_VERSION:
            v = node.rec.version
            if v is None:
                raise FUSEError(errno.ENODATA)
            return f"{v.hlc} {v.peer}".encode()
        value = node.rec.xattrs.get(name)
        if value is None:
            raise FUSEError(errno.ENODATA)
        return value

    @request
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        # The user.dreki.* attributes are computed, read by name, and not listed: rsync -X,
        # cp -a and tar --xattrs copy what is listed, and would carry them to other files
        # (or try to remove them here).
        if self.remote and (r := self.remote.ref(self.ns, inode)):
            return await self.remote.listxattr(r)
        node = self._node(inode)
        if isinstance(node, Entry):
            return []
        return sorted(node.rec.xattrs)

    @request
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        if name.startswith(ACL_PREFIX):
            raise QuietError(errno.EOPNOTSUPP)  # cp -a tries on every file: refuse, it carries on
        if name.startswith(b"user.dreki."):
            raise FUSEError(errno.EPERM)
        if self.remote and (r := self.remote.ref(self.ns, inode)):
            if not name.startswith(b"user."):
                raise FUSEError(errno.EOPNOTSUPP)
            return await self.remote.setxattr(r, name, value)
        node = self._node(inode)
        if not isinstance(node, StoreNode):
            raise self._refuse(node)
        if not name.startswith(b"user."):
            raise FUSEError(errno.EOPNOTSUPP)
        if orphan := self._orphan(node):
            orphan.set_xattrs({**node.rec.xattrs, name: value})
            return
        node.store.set_xattr(node.loc, node.parts, name, value, origin=self)

    @request
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        if name.startswith(ACL_PREFIX):
            raise FUSEError(errno.EOPNOTSUPP)
        if name.startswith(b"user.dreki."):
            raise FUSEError(errno.EPERM)
        if self.remote and (r := self.remote.ref(self.ns, inode)):
            return await self.remote.removexattr(r, name)
        node = self._node(inode)
        if not isinstance(node, StoreNode):
            raise self._refuse(node)
        if orphan := self._orphan(node):
            if name not in node.rec.xattrs:
                raise FUSEError(errno.ENODATA)
            orphan.set_xattrs({k: v for k, v in node.rec.xattrs.items() if k != name})
            return
        node.store.remove_xattr(node.loc, node.parts, name, origin=self)

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

    async def commit_open_files(self) -> None:
        """At unmount: hand every dirty buffer to its store."""
        for f in list(self.files.by_key.values()):
            self._commit(f)
