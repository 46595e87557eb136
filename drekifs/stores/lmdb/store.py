"""The filesystem operations of a store in LMDB: the Store interface of stores/base.py.

Listing a directory (whole, or a page from a cursor), creating, writing a file's bytes, changing
metadata and xattrs, removing and renaming, each with the errno a filesystem gives; and disk
room held for open files. Reads of one entry, and the primitives every change is made of, are
core.py's; getting the changes to disk is writer.py's; the replica side is replica.py's.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import trio

from ..keys import (
    MAX_PATH,
    PATH_CHECK,
    Parts,
    check_path,
    check_target,
    check_xattrs,
    children_prefix,
    db_head,
    entry_key,
    path_bytes,
)
from ..record import DIR, FILE, NO_XATTRS, SYMLINK, TOMBSTONE, Record, StoreError
from ..version import HybridClock, Version, first_version
from . import schema
from .core import CACHE_ENTRIES, ENTRIES_PER_LEAF, FAULT_AROUND, MISSING, SPACE_PER_CHANGE
from .layer import Layer
from .replica import ReplicaSide
from .writer import GroupCommit


@dataclass
class StoreStats:
    name: str
    entries: int
    bytes: int
    last_write_ns: int


class LmdbStore(ReplicaSide, GroupCommit):
    """Entries of one store (the Store interface of base.py, and the Replica interface of
    replica.py), at every location it exists in. Not thread-safe: it belongs to one trio loop.
    """

    def __init__(
        self,
        name: str,
        path: Path,
        *,
        peer: str,
        replicated: bool,
        max_value: int,
        clock: HybridClock | None = None,
        map_size: int = 1 << 40,
        uid: int = 0,
        gid: int = 0,
    ) -> None:
        self.name = name
        self.peer = peer
        self.replicated = replicated
        self.max_value = max_value
        self.clock = clock or HybridClock()
        self.uid, self.gid = uid, gid
        self.path = path
        self.env, dbs, saved = schema.open_store(name, path, map_size)
        self._entries, self._values, self._eids, self._meta, self._heads = dbs
        self._head_of = {}
        self._next_eid = saved.next_eid
        self.last_write_ns = saved.last_write_ns
        self.value_bytes = saved.value_bytes
        self._pending = Layer()
        self._inflight = Layer()
        self._dirty = trio.Event()
        self._full = trio.Event()
        self._commit_lock = trio.Lock()
        self.changes = 0
        self.committed = 0
        self.commit_error = None
        self.watchers = []
        self.before_drop = []
        self.conflicts = 0
        self.reserved = 0
        self._room = 0
        self._records = {}
        self._where = {}
        self._mapped = 0
        self._map_ranges = None
        self._kept = []
        self._take_up_unsaved()

    # -- listing ---------------------------------------------------------------------------

    def children(self, loc: str, parts: Parts) -> dict[bytes, Record]:
        """Live entries of the directory ``parts``, by name."""
        prefix = children_prefix(loc, parts)
        dbprefix = db_head(prefix)
        out: dict[bytes, Record] = {}
        records, where = self._records, self._where
        # A listing is usually followed by a lookup of each child (ls -l, tar, rsync): what
        # LMDB just said goes to the read caches, unless a change not yet on disk shadows it.
        shadowed = self._pending.entries.keys() | self._inflight.entries.keys()
        moved = self._pending.eids.keys() | self._inflight.eids.keys()
        with self.env.begin(db=self._entries) as txn:
            cursor = txn.cursor()
            if cursor.set_range(dbprefix):
                for key, raw in cursor:
                    if not key.startswith(dbprefix):
                        break
                    rec = Record.unpack(raw)
                    name = key[len(dbprefix) :]
                    out[name] = rec
                    key = prefix + name
                    if len(records) < CACHE_ENTRIES and key not in shadowed:  # never thrash
                        records[key] = rec
                        if len(where) < CACHE_ENTRIES and rec.alive and rec.eid not in moved:
                            where[rec.eid] = key
        self._touched(FAULT_AROUND * (1 + len(out) // ENTRIES_PER_LEAF))
        for layer in (self._inflight, self._pending):  # newest last
            for name in layer.children.get(prefix, ()):
                rec = layer.entries.get(prefix + name, MISSING)
                if rec is None:
                    out.pop(name, None)
                elif rec is not MISSING:
                    out[name] = rec  # type: ignore[assignment]
        return {n: r for n, r in out.items() if r.alive}

    def children_page(
        self, loc: str, parts: Parts, after: bytes, n: int
    ) -> tuple[list[tuple[bytes, Record]], bool]:
        """Up to ``n`` live entries of ``parts`` named after ``after``, in bytes order, and
        whether more follow. Reads LMDB from ``after`` on (a cursor), so a page of a large
        directory costs the page, not the directory; changes not on disk yet are merged in."""
        prefix = children_prefix(loc, parts)
        dbprefix = db_head(prefix)
        # Changes not yet on disk, in the range: they win over what LMDB says.
        layered: dict[bytes, Record | None] = {}
        for layer in (self._inflight, self._pending):  # newest last
            for name in layer.children.get(prefix, ()):
                if name > after:
                    rec = layer.entries.get(prefix + name, MISSING)
                    if rec is not MISSING:
                        layered[name] = rec  # type: ignore[assignment]
        merged: dict[bytes, Record] = {}
        scanned = 0
        with self.env.begin(db=self._entries) as txn:
            cursor = txn.cursor()
            # Enough live entries for the page and one more (to tell whether more follow); a
            # name in ``layered`` may replace or hide what the cursor finds, so count those out.
            if cursor.set_range(dbprefix + after):
                for key, raw in cursor:
                    if not key.startswith(dbprefix):
                        break
                    name = key[len(dbprefix) :]
                    if name == after:
                        continue
                    scanned += 1
                    if name in layered:
                        continue
                    rec = Record.unpack(raw)
                    if rec.alive:
                        merged[name] = rec
                        if len(merged) > n:
                            break
        self._touched(FAULT_AROUND * (1 + scanned // ENTRIES_PER_LEAF))
        for name, rec in layered.items():
            if rec is not None and rec.alive:
                merged[name] = rec
        # LMDB stopped after n + 1 live names (or ran out): the first n of all merged are
        # the page, and anything LMDB did not read sorts after them.
        names = sorted(merged)
        return [(name, merged[name]) for name in names[:n]], len(names) > n

    def has_children(self, loc: str, parts: Parts) -> bool:
        return bool(self.children_page(loc, parts, b"", 1)[0])

    # -- changing --------------------------------------------------------------------------

    def _version(self, previous: Record | None) -> Version | None:
        if not self.replicated:
            return None
        hlc = self.clock.now()
        if previous is not None and previous.version is not None:
            return previous.version.successor(hlc, self.peer)
        return first_version(hlc, self.peer)

    def _parent_dir(self, loc: str, parts: Parts) -> Record:
        parent = self.get(loc, parts[:-1])
        if parent is None:
            raise StoreError(errno.ENOENT, f"{self._label(loc, parts[:-1])} does not exist")
        if not parent.is_dir:
            raise StoreError(errno.ENOTDIR, f"{self._label(loc, parts[:-1])} is not a directory")
        return parent

    def create(
        self,
        loc: str,
        parts: Parts,
        kind: int,
        perm: int,
        uid: int,
        gid: int,
        target: bytes = b"",
        origin: object = None,
    ) -> Record:
        """A new file, directory or symlink. EEXIST if the name is taken; ENAMETOOLONG past
        the path limits (keys.py)."""
        key = entry_key(loc, parts)
        # The key's length bounds the path's: the full checks only for a long one. (Names
        # are checked where they come in: the kernel, the store RPC, the URN parser.)
        if len(key) > len(loc) + 2 + PATH_CHECK:
            check_path(self.name, loc, parts)
        if target:
            check_target(target)
        parent = self._parent_dir(loc, parts)
        previous = self._record(key)
        if previous is not None and previous.alive:
            raise StoreError(errno.EEXIST, f"{self._label(loc, parts)} exists")
        self.check_room(len(target))
        now = self._now()
        eid = self._alloc()
        rec = Record(
            kind,
            eid,
            perm & 0o7777,
            uid,
            gid,
            now,
            now,
            len(target) if kind == SYMLINK else 0,
            NO_XATTRS,
            target,
            self._version(previous),
            now,
        )
        self._put(key, rec)
        self._set_eid(eid, key)
        self._touch_dir(loc, parts[:-1], now, 1 if kind == DIR else 0, parent)
        self._notify(key, origin)
        return rec

    def reserve(self, nbytes: int) -> None:
        """Hold room for bytes an open file will commit (check_room, then counted in it)."""
        budget = self._room - 2 * nbytes - SPACE_PER_CHANGE
        if budget >= 0:  # check_room's fast path, inline: one write of every cp'd file
            self._room = budget
        else:
            self.check_room(nbytes)
        self.reserved += nbytes

    def unreserve(self, nbytes: int) -> None:
        self.reserved = max(0, self.reserved - nbytes)

    def check_size(self, size: int) -> None:
        if size > self.max_value:
            raise StoreError(
                errno.EFBIG, f"a value in store {self.name} is at most {self.max_value} bytes"
            )

    def write_value(
        self,
        loc: str,
        parts: Parts | None,
        eid: int,
        value: bytes,
        origin: object = None,
        mtime_ns: int | None = None,
        reserved: int = 0,
        **fields: object,
    ) -> Record | None:
        """Set a file's bytes (and metadata ``fields``, as in update): one new version. None
        when the entry is gone or is another one now (unlinked or replaced while open): the
        write has nowhere to go. ``parts`` None: wherever the entry ``eid`` is now (a file
        written while open may have been renamed meanwhile). ``reserved``: bytes the caller
        holds room for already (reserve); ENOSPC if the rest does not fit."""
        self.check_size(len(value))
        if reserved:
            self.reserved = max(0, self.reserved - reserved)  # spent here, whatever follows
        if len(value) > reserved:
            self.check_room(len(value) - reserved)
        if parts is None:
            key = self._key_of(eid)  # type: ignore[assignment]
            if key is None or not key.startswith(entry_key(loc, ())):
                return None
        else:
            key = entry_key(loc, parts)
        rec = self._record(key)
        if rec is None or not rec.alive or rec.eid != eid:
            return None
        now = self._now()
        mtime = now if mtime_ns is None else mtime_ns  # an explicit 0 is the epoch
        changes: dict[str, object] = {
            "size": len(value),
            "mtime_ns": mtime,
            "atime_ns": mtime,
            "ctime_ns": now,
            "version": self._version(rec),
        }
        if fields:  # metadata set while the bytes waited: it may set atime and ctime too
            changes.update(fields)
        new = rec.but(**changes)
        self._put(key, new)
        self._hold_value(eid, bytes(value))
        self._count(len(value) - rec.size)
        self._notify(key, origin)
        return new

    def update(self, loc: str, parts: Parts, origin: object = None, **fields) -> Record:
        """Change metadata (perm, uid, gid, mtime_ns, xattrs...); ctime moves."""
        key = entry_key(loc, parts)
        rec = self.get(loc, parts)
        if rec is None:
            raise StoreError(errno.ENOENT, f"{self._label(loc, parts)} does not exist")
        fields.setdefault("ctime_ns", self._now())
        if "xattrs" in fields:
            check_xattrs(fields["xattrs"])
            self.check_room(sum(map(len, fields["xattrs"].values())))
        else:
            self.check_room(freeing=True)
        if "perm" in fields:
            fields["perm"] &= 0o7777
        # An explicit change (chmod, utimes, xattrs) is a new version, for directories too;
        # a directory's times moving with its children are not (_touch_dir).
        self._put(key, rec.but(version=self._version(rec), **fields))
        self._notify(key, origin)
        return self.get(loc, parts)  # type: ignore[return-value]

    def remove(self, loc: str, parts: Parts, *, is_dir: bool, origin: object = None) -> Record:
        """unlink (``is_dir`` False) or rmdir (True), with their errnos."""
        rec = self.get(loc, parts)
        label = self._label(loc, parts)
        if rec is None or not parts:
            raise StoreError(errno.ENOENT, f"{label} does not exist")
        if is_dir and not rec.is_dir:
            raise StoreError(errno.ENOTDIR, f"{label} is not a directory")
        if not is_dir and rec.is_dir:
            raise StoreError(errno.EISDIR, f"{label} is a directory")
        if rec.is_dir and self.has_children(loc, parts):
            raise StoreError(errno.ENOTEMPTY, f"{label} is not empty")
        now = self._now()
        self._drop(loc, parts, rec, now)
        self._touch_dir(loc, parts[:-1], now, -1 if rec.is_dir else 0)
        self._notify(entry_key(loc, parts), origin)
        return rec

    def _drop(self, loc: str, parts: Parts, rec: Record, now: int) -> None:
        """Delete one entry: a tombstone in a replicated store, gone otherwise."""
        key = entry_key(loc, parts)
        if self.replicated:
            self._put(key, Record(TOMBSTONE, 0, 0, 0, 0, now, now, version=self._version(rec)))
        else:
            self._put(key, None)
        if rec.kind == FILE:
            self._dropping(rec)
        if rec.eid:
            self._pending.values[rec.eid] = None
            self._set_eid(rec.eid, None)
        if rec.kind == FILE:
            self._count(-rec.size)

    def walk(self, loc: str, parts: Parts) -> Iterator[tuple[Parts, Record]]:
        """The directory ``parts`` and everything below it, parents first."""
        rec = self.get(loc, parts)
        if rec is None:
            return
        stack = [(parts, rec)]
        while stack:
            p, r = stack.pop()
            yield p, r
            if r.is_dir:
                for name, child in sorted(self.children(loc, p).items(), reverse=True):
                    stack.append(((*p, name), child))

    def rename(
        self, loc: str, src: Parts, dst: Parts, *, noreplace: bool = False, origin: object = None
    ) -> None:
        """Atomic in memory (and so on disk: one group commits it whole)."""
        rec = self.get(loc, src)
        if rec is None or not src:
            raise StoreError(errno.ENOENT, f"{self._label(loc, src)} does not exist")
        if not dst:
            raise StoreError(errno.EBUSY, "the store's root cannot be replaced")
        self._parent_dir(loc, dst)
        if src == dst:
            return
        if dst[: len(src)] == src:
            raise StoreError(errno.EINVAL, f"cannot move {self._label(loc, src)} into itself")
        check_path(self.name, loc, dst)
        self.check_room(freeing=True)
        moved = list(self.walk(loc, src))
        self._check_moved_paths(loc, src, dst, moved)
        target = self.get(loc, dst)
        now = self._now()
        if target is not None:
            label = self._label(loc, dst)
            if noreplace:
                raise StoreError(errno.EEXIST, f"{label} exists")
            if rec.is_dir and not target.is_dir:
                raise StoreError(errno.ENOTDIR, f"{label} is not a directory")
            if not rec.is_dir and target.is_dir:
                raise StoreError(errno.EISDIR, f"{label} is a directory")
            if target.is_dir and self.has_children(loc, dst):
                raise StoreError(errno.ENOTEMPTY, f"{label} is not empty")
            self._drop(loc, dst, target, now)
            if target.is_dir:
                self._touch_dir(loc, dst[:-1], now, -1)
        keys: list[tuple[bytes, bytes]] = []  # (old, new) of each entry moved, src's first
        for old_parts, old in moved:
            new_parts = dst + old_parts[len(src) :]
            new_key = entry_key(loc, new_parts)
            previous = self._record(new_key)
            changes: dict = {"version": self._version(previous)}
            if old_parts == src:
                changes["ctime_ns"] = now
            self._put(new_key, old.but(**changes))
            self._set_eid(old.eid, new_key)
            old_key = entry_key(loc, old_parts)
            keys.append((old_key, new_key))
            if self.replicated:
                tomb = Record(TOMBSTONE, 0, 0, 0, 0, now, now, version=self._version(old))
                self._put(old_key, tomb)
            else:
                self._put(old_key, None)
        shift = 1 if rec.is_dir else 0
        self._touch_dir(loc, src[:-1], now, -shift)
        self._touch_dir(loc, dst[:-1], now, shift)
        # Every entry below a moved directory changed key: replication must hear each one.
        for i, (old_key, new_key) in enumerate(keys):
            self._notify(old_key, origin, i > 0)
            self._notify(new_key, origin, i > 0)

    def _check_moved_paths(
        self, loc: str, src: Parts, dst: Parts, moved: list[tuple[Parts, Record]]
    ) -> None:
        """ENAMETOOLONG before anything moves when an entry below ``src`` would end up
        with a path over the limit under ``dst``."""
        grow = path_bytes(dst) - path_bytes(src)
        if grow <= 0:
            return
        longest = max((parts for parts, _ in moved), key=path_bytes)
        if path_bytes(longest) + grow > MAX_PATH:
            check_path(self.name, loc, dst + longest[len(src) :])

    def set_xattr(
        self,
        loc: str,
        parts: Parts,
        name: bytes,
        value: bytes,
        flags: int = 0,
        origin: object = None,
    ) -> Record:
        rec = self.get(loc, parts)
        if rec is None:
            raise StoreError(errno.ENOENT, f"{self._label(loc, parts)} does not exist")
        if flags & os.XATTR_CREATE and name in rec.xattrs:
            raise StoreError(errno.EEXIST, f"xattr {name!r} exists")
        if flags & os.XATTR_REPLACE and name not in rec.xattrs:
            raise StoreError(errno.ENODATA, f"no xattr {name!r}")
        return self.update(loc, parts, origin, xattrs={**rec.xattrs, name: value})

    def remove_xattr(self, loc: str, parts: Parts, name: bytes, origin: object = None) -> Record:
        rec = self.get(loc, parts)
        if rec is None:
            raise StoreError(errno.ENOENT, f"{self._label(loc, parts)} does not exist")
        if name not in rec.xattrs:
            raise StoreError(errno.ENODATA, f"no xattr {name!r}")
        xattrs = {k: v for k, v in rec.xattrs.items() if k != name}
        return self.update(loc, parts, origin, xattrs=xattrs)

    def stats(self) -> StoreStats:
        with self.env.begin() as txn:
            entries = txn.stat(self._entries)["entries"]
        return StoreStats(self.name, entries, self.value_bytes, self.last_write_ns)
