"""Requests about stores reached by calls (``stores.remote.RemoteStore``: other nodes' local
stores, over RPC): each one answered by whoever holds the store (the owner).

Operations sends here every request whose inode is such a store's root or an entry below it
(:meth:`RemoteStores.serves`, :meth:`RemoteStores.ref`). Entries keep the owner's entry ids,
with a slot of this peer's for the (node, store) pair (``store@node`` in slots.json), so inode
numbers are stable across remounts here and never collide with local ones.

Nothing is cached for long: the kernel keeps remote entries, attributes and pages for
``REMOTE_TIMEOUT`` seconds, and this side what it resolved, unless the owner says sooner that
they changed (store.changed). An open within that time asks nothing and reads the kernel's
pages; a later one asks the owner (stat and the first 128 KiB in one round trip) and drops
them. A file's bytes are buffered while it is written, shared by the handles of this mount,
and sent to the owner as one new version at every close(2) (FLUSH) and fsync that finds them
unsaved: close returns once they are on the owner's disk (close-to-open, as NFS), or fails
when the owner did not take them. Those bytes are then dropped, never sent later into a file
the application was told was not written, and every handle open on the file gets the error
once, at its next close or fsync (as Linux reports a lost writeback to each open file).
An owner that is down or does not answer gives EHOSTDOWN within the call timeout.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyfuse3
import trio
from pyfuse3 import FUSEError

from ..logs import LogLimiter
from ..stores.base import Key
from ..stores.record import FILE, SYMLINK, Record, StoreError
from ..stores.remote import RemoteStore
from ..urn import URN
from . import inodes
from .attrs import metadata_changes, record_attrs
from .files import Unsaved
from .namespace import Entry, Kind
from .tree import RENAME_EXCHANGE, RENAME_NOREPLACE, Attrs, MountState

log = logging.getLogger(__name__)

REMOTE_TIMEOUT = 1.0  # seconds the kernel and this side keep what an owner said


def slot_name(node: str, store: str) -> str:
    return f"{store}@{node}"


@dataclass(slots=True)
class RemoteRef:
    """An inode of another node's store, as far as it is known without asking."""

    ino: int
    client: RemoteStore
    alias: int
    segments: tuple[str, ...]
    root: Entry | None  # the store's root directory (a world inode), else None


@dataclass(eq=False)
class RemoteFile(Unsaved):
    client: RemoteStore
    parts: Key
    eid: int
    ino: int
    segments: tuple[str, ...] = ()  # the owner's path in the world, as this file was opened
    handles: int = 0
    changes: int = 0  # changes so far: a commit clears ``dirty`` only if none came meanwhile
    lost: int = 0  # times unsaved bytes were dropped, the owner not taking them
    lost_errno: int = 0  # why, the last time
    # One load or commit at a time: the owner may serve two requests of one connection in
    # either order, and an older buffer must never land last.
    lock: trio.Lock = field(default_factory=trio.Lock)

    def changed(self) -> None:
        self.dirty = True
        self.wrote()
        self.changes += 1

    def set_metadata(self, changes: dict[str, int]) -> None:
        super().set_metadata(changes)
        self.changes += 1  # a commit already under way must not clear ``dirty``


@dataclass(slots=True)
class RemoteFileHandle:
    file: RemoteFile
    data: bytes | None = None  # the whole value as the open found it, when small
    keep_cache: bool = False  # the kernel's pages of it are known current
    writable: bool = False  # opened for writing: its closes send and report (as NFS's)
    lost_seen: int = -1  # file.lost when this handle last reported (or opened)

    def __post_init__(self) -> None:
        if self.lost_seen < 0:
            self.lost_seen = self.file.lost  # bytes lost before it opened are not its own


PREFETCH = 128 << 10  # bytes fetched with an open: a small file costs one round trip
SMALL = 4096  # values this small come with their lookup: ``cat`` of a new key, one round trip


@dataclass(slots=True)
class RemoteDirHandle:
    ref: RemoteRef
    parts: Key = ()
    listing: list[tuple[int, bytes, Record]] = field(default_factory=list)


class RemoteStores:
    """Remote requests, translated to store.* calls (cluster/storerpc.py)."""

    def __init__(
        self,
        node: str,
        client_of: Callable[[str, str], RemoteStore | None],
        max_value: int,
    ) -> None:
        self.node = node
        self.client_of = client_of  # (node, store) -> a client, None without a transport
        self.max_value = max_value
        self.state: MountState | None = None  # the mount's, once attached
        self.by_slot: dict[int, tuple[str, str]] = {}
        self._seen: dict[int, tuple[float, Key, Record]] = {}
        # Small values that came with a lookup, for the open and read that usually follow;
        # as current as the entry in _seen beside them, and forgotten with it.
        self._small: dict[int, bytes] = {}
        # (node, store, key) -> the inodes it has here (one per path of the node)
        self._inos: dict[tuple[str, str, Key], set[int]] = {}
        self.invalidator: Any = None  # the mount's, once attached
        self._files: dict[tuple[str, str, int], RemoteFile] = {}
        self.limited = LogLimiter(log)  # bytes not taken, again and again: a line an interval

    def attach(self, state: MountState) -> None:
        """Serve in the mount whose trees share ``state`` (Operations calls it)."""
        self.state = state
        self.invalidator = state.invalidator
        self.by_slot = {
            slot: tuple(name.split("@", 1)[::-1])  # type: ignore[misc]
            for name, slot in state.slots.slots.items()
            if "@" in name
        }

    @property
    def domain(self) -> str:
        return self.state.ns.world.domain if self.state is not None else ""

    def roots_of(self, node: str, store: str) -> list[int]:
        assert self.state is not None
        return [e.ino for e in self.state.ns.store_roots.get((node, store), ())]

    # -- resolving -------------------------------------------------------------------------

    def serves(self, e: Entry) -> bool:
        """Whether a store root of the world is served here: another node's store (not the
        global one) with a way to reach it."""
        if e.location == self.node or e.urn.store == "global":
            return False
        return self.client_of(e.location, e.urn.store or "") is not None

    def _ref(self, ino: int) -> RemoteRef:
        ref = self.ref(ino)
        if ref is None:  # routed here a moment ago: the world changed meanwhile
            raise FUSEError(errno.ESTALE)
        return ref

    def ref(self, ino: int) -> RemoteRef | None:
        """The remote inode ``ino`` is, or None when it is not a remote one. Cheap."""
        assert self.state is not None
        ns = self.state.ns
        slot = inodes.store_slot(ino)
        if slot:
            pair = self.by_slot.get(slot)
            if pair is None:
                return None
            si = inodes.unpack(ino)
            node, store = pair
            client = self.client_of(node, store)
            segments = ns.alias_paths.get((node, si.alias))
            if client is None or segments is None:
                raise FUSEError(errno.ENOENT)
            return RemoteRef(ino, client, si.alias, segments, None)
        e = ns.get(ino)
        if e is None or e.kind is not Kind.STORE or e.location == self.node:
            return None
        if e.urn.store == "global":
            return None
        client = self.client_of(e.location, e.urn.store or "")
        if client is None:
            return None  # no transport: served empty and read-only, as before
        return RemoteRef(ino, client, e.alias, e.urn.segments, e)

    def _slot(self, client: RemoteStore) -> int:
        assert self.state is not None
        name = slot_name(client.node, client.name)
        slot = self.state.slots.slot(name)
        self.by_slot[slot] = (client.node, client.name)
        return slot

    def child_ino(self, ref: RemoteRef, eid: int) -> int:
        return inodes.pack(ref.alias, self._slot(ref.client), eid)

    def _remember(self, ino: int, parts: Key, rec: Record) -> None:
        known = self._seen.get(ino)
        if known is not None and known[2].ctime_ns > rec.ctime_ns and known[2].eid == rec.eid:
            return  # an answer older than what is known (replies may cross)
        if len(self._seen) > 50_000:
            self._forget_all()
        self._seen[ino] = (trio.current_time() + REMOTE_TIMEOUT, parts, rec)
        self._small.pop(ino, None)
        pair = self.by_slot.get(inodes.unpack(ino).slot)
        if pair is not None:
            self._inos.setdefault((*pair, parts), set()).add(ino)

    def _forget(self, ino: int) -> None:
        self._seen.pop(ino, None)
        self._small.pop(ino, None)

    def _forget_all(self) -> None:
        self._seen.clear()
        self._small.clear()
        self._inos.clear()

    def changed(self, node: str, store: str, keys: list[Key]) -> None:
        """The owner says these keys changed: forget them here and in the kernel (queued
        invalidations: this runs in a request handler of the transport, not of FUSE).
        No keys: too many changed, forget everything of that store."""
        inv = self.invalidator
        for f in self._files.values():
            same_store = (f.client.node, f.client.name) == (node, store)
            if same_store and not f.dirty and f.gone is None:
                f.buffer = None  # changed there: read it again (an unlinked one cannot be)
        if inv is None:
            return
        if not keys:
            for (n, s, _), inos in list(self._inos.items()):
                if (n, s) == (node, store):
                    for ino in inos:
                        self._forget(ino)
                        inv.inode(ino)
            for root in self.roots_of(node, store):
                inv.inode(root)
            return
        for parts in keys:
            for ino in self._inos.pop((node, store, parts), ()):
                self._forget(ino)
                inv.inode(ino)
            parent = parts[:-1]
            parents = (
                self.roots_of(node, store) if not parent else self._inos.get((node, store, parent))
            )
            for p in parents or ():
                self._forget(p)
                inv.entry(p, parts[-1])
                inv.inode(p)

    async def resolve(self, ref: RemoteRef) -> tuple[Key, Record]:
        seen = self._seen.get(ref.ino)
        if seen is not None and seen[0] > trio.current_time():
            return seen[1], seen[2]
        if ref.root is not None:
            parts: Key = ()
            rec = await ref.client.stat(())
        else:
            with _gone_is_stale():
                parts, rec = await ref.client.locate(ref.ino & inodes.EID_MASK)
        self._remember(ref.ino, parts, rec)
        return parts, rec

    async def _dir(self, ref: RemoteRef) -> Key:
        parts, rec = await self.resolve(ref)
        if not rec.is_dir:
            raise FUSEError(errno.ENOTDIR)
        return parts

    def _urn(self, ref: RemoteRef, parts: Key) -> URN:
        return URN(self.domain, ref.segments, ref.client.name, parts)

    def urn(self, ino: int) -> URN:
        """As last known here (for log lines: asks nobody)."""
        ref = self._ref(ino)
        if ref.root is not None:
            return ref.root.urn
        seen = self._seen.get(ino)
        if seen is None:
            raise LookupError(f"remote inode {ino} not resolved yet")
        return self._urn(ref, seen[1])

    def handle_urn(self, handle: Any) -> str:
        if isinstance(handle, RemoteFileHandle):
            return self.file_urn(handle.file)
        if isinstance(handle, RemoteDirHandle):
            return self.dir_urn(handle)
        return "?"

    def file_urn(self, f: RemoteFile) -> str:
        return str(URN(self.domain, f.segments, f.client.name, f.parts))

    def dir_urn(self, handle: RemoteDirHandle) -> str:
        return str(self._urn(handle.ref, handle.parts))

    # -- attributes ------------------------------------------------------------------------

    def attrs(self, ino: int, client: RemoteStore, rec: Record) -> pyfuse3.EntryAttributes:
        """As the owner said, or as this mount is writing it."""
        f = None if rec.is_dir else self._files.get(_file_key(client, rec.eid))
        if f is not None and f.dirty:
            return f.attrs(ino, rec, REMOTE_TIMEOUT)
        return record_attrs(ino, rec, REMOTE_TIMEOUT)

    def _entry(self, ref: RemoteRef, parts: Key, rec: Record) -> pyfuse3.EntryAttributes:
        ino = self.child_ino(ref, rec.eid)
        self._remember(ino, parts, rec)
        return self.attrs(ino, ref.client, rec)

    # -- requests --------------------------------------------------------------------------

    async def lookup(self, parent: int, name: bytes) -> Attrs:
        ref = self._ref(parent)
        parts = (*await self._dir(ref), name)
        rec, data = await ref.client.lookup(parts, SMALL)
        attr = self._entry(ref, parts, rec)
        if data is not None and len(data) == rec.size:
            self._small[attr.st_ino] = data
        return attr

    async def getattr(self, ino: int) -> Attrs:
        ref = self._ref(ino)
        eid = ref.ino & inodes.EID_MASK
        f = None if ref.root is not None else self._files.get(_file_key(ref.client, eid))
        if f is not None and f.gone is not None:  # unlinked here while open: its handles' own
            return f.orphan_attrs(ref.ino, REMOTE_TIMEOUT)
        _, rec = await self.resolve(ref)
        return self.attrs(ref.ino, ref.client, rec)

    async def setattr(self, ino: int, attr: Any, fields: Any) -> Attrs:
        ref = self._ref(ino)
        parts, rec = await self.resolve(ref)
        client = ref.client
        fresh: Record | None = None
        if fields.update_size:
            if rec.is_dir:
                raise FUSEError(errno.EISDIR)
            self._check_size(attr.st_size)
            f = self._files.get(_file_key(client, rec.eid))
            if f is not None:
                buf = await self._load(f)
                del buf[attr.st_size :]
                buf.extend(bytes(attr.st_size - len(buf)))
                f.changed()
            else:
                value = bytearray(await client.read(rec.eid, 0, rec.size))
                del value[attr.st_size :]
                value.extend(bytes(attr.st_size - len(value)))
                fresh = await client.put(parts, rec.eid, bytes(value))
        changes = metadata_changes(attr, fields)
        if changes:
            f = self._files.get(_file_key(client, rec.eid))
            if f is not None and f.dirty:
                # Bytes not sent yet: the change goes with them (one call, one version).
                f.set_metadata(changes)
            else:
                fresh = await client.update(parts, rec.eid, **changes)
        if fresh is not None:  # what the owner answered; else what was known stays as it was
            rec = fresh
            self._remember(ref.ino, parts, rec)
        return self.attrs(ref.ino, client, rec)

    async def readlink(self, ino: int) -> bytes:
        ref = self._ref(ino)
        _, rec = await self.resolve(ref)
        if rec.kind != SYMLINK:
            raise FUSEError(errno.EINVAL)
        return rec.target

    async def make(
        self, parent: int, name: bytes, kind: int, mode: int, ctx: Any, target: bytes = b""
    ) -> Attrs:
        return await self._make(self._ref(parent), name, kind, mode, ctx, target)

    async def _make(
        self, parent: RemoteRef, name: bytes, kind: int, mode: int, ctx: Any, target: bytes = b""
    ) -> Attrs:
        parts = (*await self._dir(parent), name)
        rec = await parent.client.create(parts, kind, stat.S_IMODE(mode), ctx.uid, ctx.gid, target)
        return self._entry(parent, parts, rec)

    async def create(
        self, parent: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[object, pyfuse3.FileInfo, Attrs]:
        ref = self._ref(parent)
        attr = await self._make(ref, name, FILE, mode, ctx)
        parts = (*await self._dir(ref), name)
        eid = attr.st_ino & inodes.EID_MASK
        f = self._open_file(ref.client, ref.segments, parts, eid, attr.st_ino)
        return RemoteFileHandle(f, writable=True), pyfuse3.FileInfo(keep_cache=False), attr

    async def remove(self, parent: int, name: bytes, is_dir: bool) -> None:
        ref = self._ref(parent)
        parts = (*await self._dir(ref), name)
        kept = [] if is_dir else await self._keep_open_content(ref.client, parts)
        await ref.client.remove(parts, is_dir=is_dir)
        _went(kept)

    async def _keep_open_content(
        self, client: RemoteStore, parts: Key
    ) -> list[tuple[RemoteFile, Record, bytearray]]:
        """An entry about to go: handles open on it here keep what it held (its bytes and
        record, for _went once it is gone). Only what goes through this mount: the owner
        drops the bytes of what it or another node removes."""
        kept = []
        for f in list(self._files.values()):
            if f.client is client and f.parts == parts:
                with contextlib.suppress(StoreError, FUSEError):
                    rec = await client.stat(parts)
                    if rec.eid == f.eid:
                        kept.append((f, rec, await self._load(f)))
        return kept

    async def rename(
        self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes, flags: int
    ) -> None:
        old, new = self._ref(parent_old), self._ref(parent_new)
        if flags & RENAME_EXCHANGE:
            raise FUSEError(errno.EINVAL)
        noreplace = bool(flags & RENAME_NOREPLACE)
        if old.client is not new.client or old.alias != new.alias:
            raise FUSEError(errno.EXDEV)
        src = (*await self._dir(old), name_old)
        dst = (*await self._dir(new), name_new)
        kept = await self._keep_open_content(old.client, dst) if src != dst else []
        await old.client.rename(src, dst, noreplace=noreplace)
        _went(kept)
        # Paths below src moved: what is remembered by path is wrong now (1 s of it at most).
        self._forget_all()
        for f in self._files.values():
            if f.client is old.client and f.parts[: len(src)] == src:
                f.parts = dst + f.parts[len(src) :]

    async def opendir(self, ino: int) -> object:
        ref = self._ref(ino)
        parts = await self._dir(ref)
        handle = RemoteDirHandle(ref, parts)
        for name, rec in await ref.client.children(parts):
            ino = self.child_ino(ref, rec.eid)
            self._remember(ino, (*parts, name), rec)
            handle.listing.append((ino, name, rec))
        handle.listing.sort()
        return handle

    async def readdir(self, handle: Any, start_id: int, token: Any) -> None:
        if not isinstance(handle, RemoteDirHandle):
            raise FUSEError(errno.EBADF)
        listing = handle.listing
        for i in range(bisect_right(listing, (start_id, b"\xff" * 256)), len(listing)):
            ino, name, rec = listing[i]
            if not pyfuse3.readdir_reply(token, name, self.attrs(ino, handle.ref.client, rec), ino):
                break

    async def fsyncdir(self, handle: Any) -> None:
        """On the owner's disk when this returns, as fsync of a directory here."""
        if isinstance(handle, RemoteDirHandle):
            await handle.ref.client.sync()

    # -- files -----------------------------------------------------------------------------

    def _check_size(self, size: int) -> None:
        if size > self.max_value:
            raise FUSEError(errno.EFBIG)

    def _open_file(
        self, client: RemoteStore, segments: tuple[str, ...], parts: Key, eid: int, ino: int
    ) -> RemoteFile:
        key = _file_key(client, eid)
        f = self._files.get(key)
        if f is None:
            f = self._files[key] = RemoteFile(client, parts, eid, ino, segments)
        f.parts = parts
        f.handles += 1
        return f

    async def open(self, ino: int, flags: int) -> tuple[object, pyfuse3.FileInfo]:
        ref = self._ref(ino)
        f = None
        if ref.root is None:
            f = self._files.get(_file_key(ref.client, ref.ino & inodes.EID_MASK))
        if f is not None:
            if f.gone is not None:  # its name went: the kernel looks it up again (ESTALE)
                raise FUSEError(errno.ESTALE)
            # Open here already, its bytes maybe still on their way to the owner: they are
            # the truth on this mount (an answer of the owner could predate them).
            f.handles += 1
            handle = RemoteFileHandle(f)
        else:
            handle = await self._open_anew(ref, flags)
        handle.writable = flags & os.O_ACCMODE != os.O_RDONLY
        if flags & os.O_TRUNC and handle.writable:
            handle.file.buffer = bytearray()
            handle.file.changed()
        return handle, pyfuse3.FileInfo(keep_cache=handle.keep_cache)

    async def _open_anew(self, ref: RemoteRef, flags: int) -> RemoteFileHandle:
        """A file not open on this mount yet: what the owner says of it, or said < 1 s ago."""
        data: bytes | None = None
        seen = self._seen.get(ref.ino)
        keep = seen is not None and seen[0] > trio.current_time()
        if keep and flags & os.O_ACCMODE != os.O_RDONLY:
            # Written: asked again (one round trip), as the owner tells of changes in batches
            # (storerpc.NOTIFY_EVERY): bytes written into an entry it removed meanwhile would
            # be dropped at release. Gone: ESTALE, and the kernel looks the name up again.
            self._forget(ref.ino)
            keep = False
        if keep:
            # Known current (learned < 1 s ago, and the owner would have said otherwise): the
            # kernel's pages of it are good too; a change would have invalidated them.
            _, parts, rec = seen  # type: ignore[misc]
            data = self._small.get(ref.ino)
        elif ref.root is None and flags & os.O_ACCMODE == os.O_RDONLY:
            # Close-to-open, as NFS: a reader sees the value as it was when it opened.
            with _gone_is_stale():
                parts, rec, data = await ref.client.open(ref.ino & inodes.EID_MASK, PREFETCH)
            self._remember(ref.ino, parts, rec)
            if len(data) != rec.size:
                data = None  # larger than the prefetch: read as asked
        else:
            parts, rec = await self.resolve(ref)
        if rec.is_dir:
            raise FUSEError(errno.EISDIR)
        if rec.kind != FILE:
            raise FUSEError(errno.ELOOP)
        f = self._open_file(ref.client, ref.segments, parts, rec.eid, ref.ino)
        return RemoteFileHandle(f, data, keep)

    async def _load(self, f: RemoteFile) -> bytearray:
        if f.buffer is not None:
            return f.buffer
        async with f.lock:
            return await self._load_locked(f)

    async def _load_locked(self, f: RemoteFile) -> bytearray:
        if f.buffer is None:
            parts, rec = f.parts, await f.client.stat(f.parts)
            if rec.eid != f.eid:
                raise FUSEError(errno.ESTALE)
            f.parts = parts
            f.buffer = bytearray(await f.client.read(f.eid, 0, rec.size))
        return f.buffer

    async def read(self, handle: RemoteFileHandle, off: int, size: int) -> bytes:
        f = handle.file
        if f.buffer is not None:
            return bytes(f.buffer[off : off + size])
        if handle.data is not None:
            return handle.data[off : off + size]
        return await f.client.read(f.eid, off, size)

    async def write(self, handle: RemoteFileHandle, off: int, buf: bytes) -> int:
        f = handle.file
        end = off + len(buf)
        self._check_size(end)
        value = await self._load(f)
        if off > len(value):
            value.extend(bytes(off - len(value)))
        value[off:end] = buf
        f.changed()
        return len(buf)

    async def _commit(self, f: RemoteFile) -> None:
        """Send the bytes, on the owner's disk when this returns (what close and fsync
        promise); ``dirty`` (and so the size getattr reports from the buffer) stays until the
        owner has them, and stays if another write came meanwhile. Raises what the owner said
        (StoreError), the bytes kept: the caller decides whether they are lost."""
        if not f.dirty or f.gone is not None:
            # Nothing to send, nor being sent: no lock (taking one yields). Or unlinked here:
            # nowhere to go, as locally; the open handles keep the bytes.
            return
        async with f.lock:
            if not f.dirty:
                return
            upto = f.changes
            value = bytes(f.buffer or b"")
            # ESTALE, the owner not knowing the file (removed by another node, or lost in a
            # crash of the owner) is an error: the bytes were not taken.
            rec = await f.client.put(
                f.parts, f.eid, value, durable=True, mtime_ns=f.mtime_ns, **f.metadata
            )
            if rec is not None:
                self._remember(f.ino, f.parts, rec)
            if f.changes == upto:
                # The owner has it all: later opens read from there again, so a change made
                # elsewhere meanwhile is seen (and a later write starts from it).
                f.dirty = False
                if f.gone is None:  # unlinked here meanwhile: its handles read the buffer
                    f.buffer = None
                f.metadata = {}

    def _drop(self, f: RemoteFile, e: StoreError | FUSEError, when: str) -> None:
        """The owner did not take the unsaved bytes: drop them (never sent later, into a file
        the application was told was not written) and count the loss, which every handle
        open on the file reports once (_report_lost)."""
        code = e.errno or errno.EIO
        size = len(f.buffer or b"")
        f.lost += 1
        f.lost_errno = code
        f.dirty = False
        f.buffer = None
        f.metadata = {}
        f.changes += 1  # a commit of the dropped bytes still under way must not count
        inos = self._inos.get((f.client.node, f.client.name, f.parts)) or {f.ino}
        for ino in inos | {f.ino}:
            self._forget(ino)
            if self.invalidator is not None:
                self.invalidator.inode(ino)  # the kernel's pages hold the dropped bytes
        urn = self.file_urn(f)
        why = str(e) if isinstance(e, StoreError) else os.strerror(code)
        self.limited.log(
            logging.WARNING,
            ("not taken", urn),
            "%s: %d bytes written here not taken by the owner %s (%s): dropped; %s",
            urn,
            size,
            f.client.node,
            why,
            when,
        )

    @staticmethod
    def _report_lost(h: RemoteFileHandle) -> None:
        """Bytes of the file were dropped since this handle last heard: say so, once."""
        f = h.file
        if h.lost_seen != f.lost:
            h.lost_seen = f.lost
            raise FUSEError(f.lost_errno)

    async def commit_all(self) -> None:
        """At unmount: send what is still buffered, each owner bounded by the call timeout."""
        for f in list(self._files.values()):
            try:
                await self._commit(f)
            except (StoreError, FUSEError) as e:
                self._drop(f, e, "at unmount")

    async def flush(self, handle: RemoteFileHandle) -> None:
        """close(2) of a descriptor (every one, dup()'d ones too): the file's unsaved bytes
        go to the owner now; the close fails if it does not take them (they are dropped).
        Nothing unsaved: no call at all. A reader's close sends nothing and fails for
        nothing (as NFS): it is no writer's word that the bytes were taken."""
        if not handle.writable:
            return
        f = handle.file
        if f.dirty:
            try:
                await self._commit(f)
            except (StoreError, FUSEError) as e:
                errname = errno.errorcode.get(e.errno or errno.EIO, "EIO")
                self._drop(f, e, f"close() returns {errname}")
        self._report_lost(handle)

    async def fsync(self, handle: RemoteFileHandle) -> None:
        """A failure keeps the bytes: fsync may be tried again, and close reports it."""
        f = handle.file
        if f.dirty:
            await self._commit(f)  # durable: the owner synced with the bytes
        else:
            await f.client.sync()
        self._report_lost(handle)

    async def release(self, handle: RemoteFileHandle) -> None:
        """The last close of a handle (its FLUSH came before). Unsaved bytes here came after
        the last FLUSH of every handle (written through a shared mapping): sent, or dropped
        with a WARNING, as nobody is left to tell (the kernel ignores RELEASE's answer)."""
        f = handle.file
        try:
            if f.handles <= 1 and f.dirty:
                try:
                    await self._commit(f)
                except (StoreError, FUSEError) as e:
                    self._drop(f, e, "written after the last close: nobody left to tell")
        finally:
            f.handles -= 1
            key = _file_key(f.client, f.eid)
            if f.handles <= 0 and self._files.get(key) is f:
                del self._files[key]

    # -- extended attributes ---------------------------------------------------------------

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        ref = self._ref(ino)
        parts, rec = await self.resolve(ref)
        if name == b"user.dreki.urn":
            return str(self._urn(ref, parts)).encode("utf-8", "surrogateescape")
        if name == b"user.dreki.store":
            return ref.client.name.encode()
        if name == b"user.dreki.owner":
            return ref.client.node.encode()
        if name == b"user.dreki.version":
            raise FUSEError(errno.ENODATA)  # local stores keep no versions
        value = rec.xattrs.get(name)
        if value is None:
            raise FUSEError(errno.ENODATA)
        return value

    async def listxattr(self, ino: int) -> list[bytes]:
        ref = self._ref(ino)
        _, rec = await self.resolve(ref)
        return sorted(rec.xattrs)

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        if not name.startswith(b"user."):
            raise FUSEError(errno.EOPNOTSUPP)
        ref = self._ref(ino)
        parts, rec = await self.resolve(ref)
        self._remember(ref.ino, parts, await ref.client.set_xattr(parts, rec.eid, name, value))

    async def removexattr(self, ino: int, name: bytes) -> None:
        ref = self._ref(ino)
        parts, rec = await self.resolve(ref)
        self._remember(ref.ino, parts, await ref.client.remove_xattr(parts, rec.eid, name))


def _file_key(client: RemoteStore, eid: int) -> tuple[str, str, int]:
    return (client.node, client.name, eid)


def _went(kept: list[tuple[RemoteFile, Record, bytearray]]) -> None:
    """Their entries went: from now on they answer for themselves (files.Unsaved.went), with
    the bytes loaded before (the owner's notice of the change may have dropped them since)."""
    for f, rec, buffer in kept:
        if f.buffer is None:
            f.buffer = buffer
        f.went(rec)


@contextlib.contextmanager
def _gone_is_stale() -> Iterator[None]:
    """An entry asked for by its id is gone: ESTALE, so the kernel looks its name up again
    (as for local stores, Operations._node)."""
    try:
        yield
    except StoreError as e:
        if e.errno != errno.ENOENT:
            raise
        raise FUSEError(errno.ESTALE) from None
