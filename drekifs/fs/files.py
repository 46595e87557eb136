"""Open files: per-inode write buffers, committed to the store on fsync and on release.

A file's bytes are read from the store until somebody writes; then the whole value is held in
a buffer here, changed in place by each WRITE, and handed to the store (one new version) on
fsync and at the latest on release. Metadata changed while the bytes wait (``cp -a``'s utimes
and chmod after its write, a ``chown`` during a long write) waits with them and goes out in the
same version: one close, one version. FLUSH commits nothing here (answered ENOSYS without a key
ring: the kernel then skips it for every close, which saves one request per file); limits are
checked at WRITE time, so the error that matters (EFBIG) reaches the writer, and fsync reports
the rest. (Other nodes' files, remotestores.py, are sent at FLUSH.)

A file whose entry goes while it is open (unlink, a rename or a peer's version over it) stays
here for its handles, with st_nlink 0, until the last close: its bytes are taken from the store
just before they go (Store.before_drop).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pyfuse3

from ..stores.base import Key, Store
from ..stores.keys import check_xattrs
from ..stores.record import Record
from .attrs import record_attrs


@dataclass(eq=False, kw_only=True)
class Unsaved:
    """What a file being written here holds beyond its record, until its bytes are committed:
    the times of its last write and change, and metadata set meanwhile (perm, uid, gid,
    atime_ns...), committed with the bytes in one version. Shared by local and remote files."""

    buffer: bytearray | None = None  # the whole value, once written (or kept after unlink)
    dirty: bool = False  # holds what the store (or the owner) does not have yet
    mtime_ns: int = 0  # of the last write (or the time set since, the epoch included)
    ctime_ns: int = 0  # of the last change
    metadata: dict[str, int] = field(default_factory=dict)  # set since: perm, uid, atime_ns...
    # Once its entry went (unlinked, or replaced by a rename or by a peer): its last record.
    # Its handles keep its bytes, and what they write and set, to themselves until the last
    # close, as POSIX keeps an unlinked file (st_nlink 0); nothing reaches a store. (A class
    # default, not an __init__ argument: one cost each file of a cold tar ~900 instructions.)
    gone: Record | None = field(default=None, init=False)

    def went(self, rec: Record) -> None:
        """Its entry went, its bytes in the buffer: from now on it answers for itself."""
        if not self.dirty:  # its times are the record's
            self.mtime_ns, self.ctime_ns = rec.mtime_ns, rec.ctime_ns
        self.gone = rec

    def orphan_attrs(self, ino: int, timeout: float) -> pyfuse3.EntryAttributes:
        assert self.gone is not None
        attrs = self.attrs(ino, self.gone, timeout)
        attrs.st_nlink = 0
        return attrs

    def wrote(self) -> None:
        self.mtime_ns = self.ctime_ns = time.time_ns()

    def set_metadata(self, changes: dict[str, int]) -> None:
        """A SETATTR while the bytes wait: kept for their commit instead of a version of its
        own. An explicit mtime holds until the next write moves it, as on any filesystem."""
        metadata = self.metadata
        for name, value in changes.items():
            if name == "mtime_ns":
                self.mtime_ns = value
            else:
                metadata[name] = value
        self.ctime_ns = time.time_ns()

    def attrs(self, ino: int, rec: Record, timeout: float) -> pyfuse3.EntryAttributes:
        """``rec``'s attributes as the commit will make them: the buffer's size, the held
        metadata and times."""
        if self.metadata:
            rec = rec.but(**self.metadata)
        ctime = max(self.ctime_ns, rec.ctime_ns)
        size = len(self.buffer or b"")
        return record_attrs(ino, rec, timeout, size=size, mtime_ns=self.mtime_ns, ctime_ns=ctime)


@dataclass(eq=False)
class OpenFile(Unsaved):
    """What the handles of one inode share."""

    store: Store
    loc: str
    eid: int
    handles: int = 0
    reserved: int = 0  # disk room held in the store for the buffer's commit (ENOSPC early)
    parts: Key = field(default=(), init=False)  # its key when it went (for log lines)

    def orphan(self, rec: Record, parts: Key) -> None:
        """Its entry is about to go: take its bytes while the store still has them."""
        self.load()
        self.went(rec)
        self.parts = parts

    def set_xattrs(self, xattrs: dict[bytes, bytes]) -> None:
        """An orphan's xattrs: held to the caps a store's entry is (ENOSPC), as they are
        in this daemon's memory until the last close."""
        assert self.gone is not None
        check_xattrs(xattrs)
        self.gone = self.gone.but(xattrs=xattrs)
        self.ctime_ns = time.time_ns()

    def load(self) -> bytearray:
        if self.buffer is None:
            self.buffer = bytearray(self.store.read(self.eid))
        return self.buffer

    def write(self, offset: int, data: bytes) -> int:
        buf = self.load()
        end = offset + len(data)
        self.store.check_size(end)
        if end > self.reserved:
            self._reserve(max(end, len(buf)))
        if offset > len(buf):
            buf.extend(bytes(offset - len(buf)))
        buf[offset:end] = data
        self.dirty = True
        self.wrote()
        return len(data)

    def truncate(self, size: int) -> None:
        self.store.check_size(size)
        buf = self.load()
        self._reserve(size)
        if size < len(buf):
            del buf[size:]
        else:
            buf.extend(bytes(size - len(buf)))
        self.dirty = True
        self.wrote()

    def _reserve(self, size: int) -> None:
        """Room on disk for a commit of ``size`` bytes, held from the write that needs it (a
        full disk is ENOSPC at write(2), not a failure at close that nobody sees)."""
        if size > self.reserved:
            self.store.reserve(size - self.reserved)
            self.reserved = size

    def unreserve(self) -> None:
        if self.reserved:
            self.store.unreserve(self.reserved)
            self.reserved = 0

    def read(self, offset: int, size: int) -> bytes:
        if self.buffer is not None:
            return bytes(self.buffer[offset : offset + size])
        return self.store.read(self.eid, offset, size)

    def commit(self, origin: object) -> Record | None:
        """Hand a dirty buffer to the store (in memory; the store's writer takes it to disk),
        with the metadata set meanwhile, in one version, wherever the entry is now (renamed
        while open or not). When it is gone, the bytes are kept for the handles still open,
        and go nowhere. Returns the new record, if any.
        """
        if not self.dirty or self.gone is not None:
            return None
        self.dirty = False
        metadata, self.metadata = self.metadata, {}
        reserved, self.reserved = self.reserved, 0  # write_value spends it
        return self.store.write_value(
            self.loc,
            None,
            self.eid,
            bytes(self.buffer or b""),
            origin,
            self.mtime_ns,
            reserved=reserved,
            **metadata,
        )


@dataclass
class OpenFiles:
    """Open files, each shared by all its handles, whichever path opened it."""

    by_key: dict[tuple[str, int], OpenFile] = field(default_factory=dict)

    def get(self, store: Store, eid: int) -> OpenFile | None:
        return self.by_key.get((store.name, eid))

    def open(self, store: Store, loc: str, eid: int) -> OpenFile:
        key = (store.name, eid)
        f = self.by_key.get(key)
        if f is None:
            f = self.by_key[key] = OpenFile(store, loc, eid)
        f.handles += 1
        return f

    def close(self, f: OpenFile) -> None:
        f.handles -= 1
        key = (f.store.name, f.eid)
        if f.handles == 0:
            f.unreserve()
            if self.by_key.get(key) is f:
                del self.by_key[key]
