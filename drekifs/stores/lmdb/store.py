"""A store in one LMDB environment, with its changes committed in groups off the event loop.

On disk (``<data-dir>/stores/<name>/``, one environment per store), named databases::

    entries  loc \\0 parent \\0 name  ->  Record.pack()     the entry ``parent/name`` at ``loc``
             loc \\0                  ->  Record.pack()     the store's root directory at ``loc``
             \\x01 digest name        ->  Record.pack()     the same, when ``loc \\0 parent \\0``
                                                         is over 256 bytes (keys.py)
    heads    \\x01 digest             ->  loc \\0 parent \\0  what each digest stands for
    values   eid (8 bytes, big end)  ->  the file's bytes
    eids     eid                     ->  entry key          (entry ids are inode numbers' base)
    meta     b"schema" -> 2, b"next_eid" -> u64, b"last_write_ns" -> u64,
             b"value_bytes" -> u64 (bytes in all live values),
             b"x.<name>" -> u64 (numbers of other parts: b"x.incarnation", membership's)

``loc`` is the location's DNS name (for local stores, the node's), ``parent`` the "/"-joined path
of the directory (empty at the root). A directory's children are the keys under one prefix,
already in name order.

Durability. Every change is applied at once to an in-memory layer (``pending``), which readers
consult before LMDB, and is then written by a single writer, in a worker thread, in one LMDB
transaction per group with LMDB's full sync (``sync=True``, ``metasync=True``: data pages,
fsync, meta page, fsync). So a request never waits for a disk flush, a burst of changes costs one
flush, and LMDB's copy-on-write pages keep the file consistent through any crash or power loss.
``sync()`` returns once everything changed before it is on disk: that is what ``fsync`` waits
for, and what a write needs to survive power loss. A killed daemon loses what nobody fsynced:
the changes of its last milliseconds, and the bytes of files still open for writing (the
filesystem hands them to the store at release and fsync).
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import trio

from .. import unsaved
from ..base import Watcher
from ..conflicts import conflict_name, decide
from ..keys import (
    HASHED_HEAD,
    INLINE_HEAD,
    MAX_PATH,
    PATH_CHECK,
    Parts,
    check_entry_key,
    check_path,
    check_target,
    check_xattrs,
    children_prefix,
    db_head,
    db_key,
    eid_key,
    entry_key,
    is_hashed,
    label,
    path_bytes,
    split_key,
)
from ..record import DIR, FILE, NO_XATTRS, SYMLINK, TOMBSTONE, Record, StoreError
from ..version import LOGICAL_BITS, HybridClock, Version, first_version, version_digest

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)  # madvise, for trim()
SCHEMA = 2  # 2: long heads hashed (keys.py); a schema 1 store is rewritten at open
CACHE_ENTRIES = 20_000
# Seconds a group of changes gathers before it commits (fsync never waits for it). 100 ms
# rather than 20: a cp -a of small files cost the daemon ~9% less CPU (fewer transactions and
# thread hand-offs; docs/stores.md), and a crash loses at most this much of what nobody fsynced.
GROUP_WINDOW = 0.1
# Value bytes a group may hold before it commits without waiting out the window: what a fast
# writer can pile up in memory is bounded by this, not by its speed.
GROUP_BYTES = 16 << 20
# Free disk a change needs besides twice the bytes waiting for the disk (LMDB writes new pages
# before it frees old ones): a page or two of tree per change, and a reserve only deletes and
# truncates may use, so that a full store can always be emptied.
SPACE_PER_CHANGE = 8 << 10
SPACE_RESERVE = 1 << 20
# Trim the map once reads may have mapped this much (each miss counts a fault-around window).
TRIM_AFTER_BYTES = 16 << 20
_FAULT_AROUND = 64 << 10
# Entries on one LMDB leaf page, about: a scan faults once per leaf, and each fault maps up to
# _FAULT_AROUND of the file (value pages written at the same time lie between entry pages).
_ENTRIES_PER_LEAF = 16
_U64 = struct.Struct(">Q")
_MISSING = object()


@dataclass
class _Layer:
    """Changes not yet on disk. ``None`` means: delete from disk."""

    entries: dict[bytes, Record | None] = field(default_factory=dict)
    values: dict[int, bytes | None] = field(default_factory=dict)
    eids: dict[int, bytes | None] = field(default_factory=dict)
    children: dict[bytes, set[bytes]] = field(default_factory=dict)
    next_eid: int | None = None
    last_write_ns: int | None = None
    value_bytes: int | None = None
    held: int = 0  # bytes of the values in ``values`` (GROUP_BYTES)

    def __bool__(self) -> bool:
        return bool(self.entries or self.values or self.eids)

    def __len__(self) -> int:
        return len(self.entries) + len(self.values)


@dataclass
class StoreStats:
    name: str
    entries: int
    bytes: int
    last_write_ns: int


class _Slots:
    # Attributes kept out of LmdbStore's instance dict: past 30 keys CPython 3.11 stops
    # sharing the dict's keys, and every attribute read of the store costs more (a 30th one
    # cost +8,000 instructions per file of bench/handlers.py --cp, 1.5%). The ones read
    # least per request live here; the dict holds 25.
    __slots__ = (
        "_head_of",
        "_heads",
        "_kept",
        "_map_ranges",
        "_mapped",
        "_room",
        "before_drop",
        "commit_error",
        "conflicts",
        "path",
        "reserved",
    )


class LmdbStore(_Slots):
    """Entries of one store (the Store interface of base.py), at every location it exists in.
    Not thread-safe: it belongs to one trio loop."""

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
        path.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(
            str(path),
            map_size=map_size,
            max_dbs=8,
            sync=True,
            metasync=True,
            readahead=True,
            mode=0o600,  # data.mdb and lock.mdb: the daemon's alone (py-lmdb's default is 0755)
        )
        self._entries = self.env.open_db(b"entries")
        self._values = self.env.open_db(b"values")
        self._eids = self.env.open_db(b"eids")
        self._meta = self.env.open_db(b"meta")
        self._heads = self.env.open_db(b"heads")
        self._head_of: dict[bytes, bytes] = {}  # digest -> head, for scans (bounded)
        with self.env.begin(write=True, db=self._meta) as txn:
            schema = txn.get(b"schema")
            if schema is None:
                txn.put(b"schema", _U64.pack(SCHEMA))
            elif _U64.unpack(schema)[0] == 1:
                self._upgrade_from_1(txn)
                txn.put(b"schema", _U64.pack(SCHEMA))
            elif _U64.unpack(schema)[0] != SCHEMA:
                raise StoreError(errno.EPROTO, f"store {name} at {path} has schema {schema!r}")
            raw = txn.get(b"next_eid")
            self._next_eid = _U64.unpack(raw)[0] if raw else 1
            raw = txn.get(b"last_write_ns")
            self.last_write_ns = _U64.unpack(raw)[0] if raw else 0
            raw = txn.get(b"value_bytes")
        self.value_bytes = _U64.unpack(raw)[0] if raw else self._count_value_bytes()
        self._pending = _Layer()
        self._inflight = _Layer()
        self._dirty = trio.Event()
        self._full = trio.Event()  # the pending group holds GROUP_BYTES: commit it now
        self._commit_lock = trio.Lock()
        self.changes = 0  # changes applied in memory
        self.committed = 0  # changes on disk
        self.commit_error: str | None = None
        self.watchers: list[Watcher] = []
        self.before_drop: list[Callable[[Record], None]] = []  # see _dropping
        self.conflicts = 0  # concurrent versions settled since the start (replication)
        # Disk room (check_room): bytes open files hold for their commit, and the last statvfs.
        self.reserved = 0
        self._room = 0  # bytes of changes check_room may admit before it asks statvfs again
        # Bounded caches of LMDB reads, kept current by every change (_put, _set_eid).
        self._records: dict[bytes, Record | None] = {}
        self._where: dict[int, bytes | None] = {}
        self._mapped = 0  # bytes reads may have mapped since the last trim (an estimate)
        self._map_ranges: list[tuple[int, int]] | None = None
        self._kept: list[Path] = []  # files of unsaved changes taken up: gone once committed
        self._take_up_unsaved()

    # -- what a stop could not commit (unsaved.py) -------------------------------------------

    def _take_up_unsaved(self) -> None:
        """Changes an earlier run kept in a file when it could not commit them at exit:
        applied as changes not yet on disk (the writer commits them first)."""
        for path in unsaved.find(self.path):
            try:
                kept = unsaved.load(path)
            except ValueError as e:
                log.error("store %s: %s; left in place", self.name, e)
                continue
            for key, raw in kept.entries:
                self._put(key, Record.unpack(raw) if raw is not None else None)
            for eid, value in kept.values:
                if value is None:
                    self._pending.values[eid] = None
                else:
                    self._hold_value(eid, value)
            for eid, key in kept.eids:
                self._set_eid(eid, key)
            if kept.next_eid is not None and kept.next_eid > self._next_eid:
                self._next_eid = self._pending.next_eid = kept.next_eid
            if kept.value_bytes is not None:
                self.value_bytes = self._pending.value_bytes = kept.value_bytes
            self._kept.append(path)
            log.warning(
                "store %s: %d changes an earlier run could not save taken up from %s",
                self.name,
                kept.changes,
                path,
            )

    def _keep_unsaved(self) -> Path:
        """Everything not on disk, to a file the next open takes up (OSError: nowhere)."""
        layer = _merge(self._inflight, self._pending)
        return unsaved.dump(
            self.name,
            self.path,
            {
                "changes": self.changes - self.committed,
                "entries": [
                    [k, r.pack() if r is not None else None] for k, r in layer.entries.items()
                ],
                "values": [[e, v] for e, v in layer.values.items()],
                "eids": [[e, k] for e, k in layer.eids.items()],
                "next_eid": layer.next_eid,
                "value_bytes": layer.value_bytes,
            },
        )

    def _upgrade_from_1(self, txn: lmdb.Transaction) -> None:
        """Schema 1 kept every key whole: those with a head over INLINE_HEAD bytes move to
        their hashed form (keys.py). One pass at the first open, in the opening transaction."""
        moved = [
            (key, raw)
            for key, raw in txn.cursor(db=self._entries)
            if len(key) > INLINE_HEAD and db_key(key) != key
        ]
        for key, raw in moved:
            txn.delete(key, db=self._entries)
            txn.put(db_key(key), raw, db=self._entries)
            cut = key.rfind(b"\0") + 1
            txn.put(db_head(key[:cut]), key[:cut], db=self._heads)
        if moved:
            log.info("store %s: %d keys with long paths moved to schema 2", self.name, len(moved))

    def _whole_key(self, txn: lmdb.Transaction, dbkey: bytes) -> bytes | None:
        """The entry key an ``entries`` key stands for (None: a digest nobody wrote down)."""
        if not is_hashed(dbkey):
            return dbkey
        digest = dbkey[:HASHED_HEAD]
        head = self._head_of.get(digest)
        if head is None:
            head = txn.get(digest, db=self._heads)
            if head is None:
                log.error("store %s: no head for a hashed key; entry skipped", self.name)
                return None
            self._remember(self._head_of, digest, head)
        return head + dbkey[HASHED_HEAD:]

    def _count_value_bytes(self) -> int:
        with self.env.begin(db=self._entries) as txn:
            return sum(
                rec.size
                for rec in (Record.unpack(raw) for raw in txn.cursor().iternext(keys=False))
                if rec.kind == FILE
            )

    # -- reading ---------------------------------------------------------------------------

    def _layers(self) -> tuple[_Layer, _Layer]:
        return self._pending, self._inflight

    def _record(self, key: bytes) -> Record | None:
        # Newest first: changes not on disk (pending, then in flight), the cache, LMDB. Written
        # out rather than a loop over _layers(): every request reads a few records.
        rec = self._pending.entries.get(key, _MISSING)
        if rec is _MISSING:
            rec = self._inflight.entries.get(key, _MISSING)
            if rec is _MISSING:
                rec = self._records.get(key, _MISSING)
        if rec is not _MISSING:
            return rec  # type: ignore[return-value]
        with self.env.begin(db=self._entries) as txn:
            raw = txn.get(key if len(key) <= INLINE_HEAD else db_key(key))
        rec = Record.unpack(raw) if raw is not None else None
        self._remember(self._records, key, rec)
        self._touched(_FAULT_AROUND)
        return rec

    def _touched(self, nbytes: int) -> None:
        """Count what a read may have mapped; trim once it adds up (bounds RSS between trims)."""
        self._mapped += nbytes
        if self._mapped >= TRIM_AFTER_BYTES:
            self.trim()

    @staticmethod
    def _remember(cache: dict, key: object, value: object) -> None:
        """A bounded cache of what LMDB said: an entry costs a transaction and an unpack."""
        if len(cache) >= CACHE_ENTRIES:
            cache.clear()
        cache[key] = value

    def get(self, loc: str, parts: Parts) -> Record | None:
        """The live entry at ``parts`` (None if absent or deleted). The root always exists."""
        rec = self._record(entry_key(loc, parts))
        if rec is None:
            return None if parts else self._root(loc)
        return rec if rec.kind != TOMBSTONE else None

    def _root(self, loc: str) -> Record:
        return Record(DIR, 0, 0o755, self.uid, self.gid, 0, 0)

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
        self._touched(_FAULT_AROUND * (1 + len(out) // _ENTRIES_PER_LEAF))
        for layer in (self._inflight, self._pending):  # newest last
            for name in layer.children.get(prefix, ()):
                rec = layer.entries.get(prefix + name, _MISSING)
                if rec is None:
                    out.pop(name, None)
                elif rec is not _MISSING:
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
                    rec = layer.entries.get(prefix + name, _MISSING)
                    if rec is not _MISSING:
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
        self._touched(_FAULT_AROUND * (1 + scanned // _ENTRIES_PER_LEAF))
        for name, rec in layered.items():
            if rec is not None and rec.alive:
                merged[name] = rec
        # LMDB stopped after n + 1 live names (or ran out): the first n of all merged are
        # the page, and anything LMDB did not read sorts after them.
        names = sorted(merged)
        return [(name, merged[name]) for name in names[:n]], len(names) > n

    def has_children(self, loc: str, parts: Parts) -> bool:
        return bool(self.children_page(loc, parts, b"", 1)[0])

    def locate(self, eid: int) -> tuple[str, Parts] | None:
        """Where the entry ``eid`` is now."""
        key = self._key_of(eid)
        return split_key(key) if key is not None else None

    def _key_of(self, eid: int) -> bytes | None:
        """The entries key of the entry ``eid`` now; None when it is gone."""
        key = self._pending.eids.get(eid, _MISSING)
        if key is _MISSING:
            key = self._inflight.eids.get(eid, _MISSING)
            if key is _MISSING:
                key = self._where.get(eid, _MISSING)
                if key is _MISSING:
                    with self.env.begin(db=self._eids) as txn:
                        key = txn.get(eid_key(eid))
                    self._remember(self._where, eid, key)
                    self._touched(_FAULT_AROUND)
        return key  # type: ignore[return-value]

    def read(self, eid: int, offset: int = 0, size: int | None = None) -> bytes:
        """Bytes of a file's value; only the slice asked for is copied."""
        for layer in self._layers():
            value = layer.values.get(eid, _MISSING)
            if value is not _MISSING:
                value = value or b""
                return value[offset : None if size is None else offset + size]  # type: ignore
        with self.env.begin(db=self._values, buffers=True) as txn:
            buf = txn.get(eid_key(eid))
            if buf is None:
                return b""
            out = bytes(buf[offset : None if size is None else offset + size])
        self._touched(_FAULT_AROUND + len(out))
        return out

    # -- changing --------------------------------------------------------------------------

    def _now(self) -> int:
        return time.time_ns()

    def _version(self, previous: Record | None) -> Version | None:
        if not self.replicated:
            return None
        hlc = self.clock.now()
        if previous is not None and previous.version is not None:
            return previous.version.successor(hlc, self.peer)
        return first_version(hlc, self.peer)

    def _put(self, key: bytes, rec: Record | None) -> None:
        p = self._pending
        p.entries[key] = rec
        self._records[key] = rec  # what LMDB will say once committed
        if key.count(b"\0") == 2:
            prefix, _, name = key.rpartition(b"\0")
            p.children.setdefault(prefix + b"\0", set()).add(name)
        p.last_write_ns = time.time_ns()
        self.changes += 1
        self._dirty.set()

    def _hold_value(self, eid: int, value: bytes) -> None:
        p = self._pending
        p.values[eid] = value
        p.held += len(value)
        if p.held >= GROUP_BYTES:
            self._full.set()

    def _set_eid(self, eid: int, key: bytes | None) -> None:
        self._pending.eids[eid] = key
        self._where[eid] = key

    def _alloc(self) -> int:
        eid = self._next_eid
        self._next_eid += 1
        self._pending.next_eid = self._next_eid
        return eid

    def _dropping(self, rec: Record) -> None:
        """A file's value is about to go (unlinked, replaced, deleted by a peer, forgotten):
        whoever still needs its bytes (a file open on the mount) takes them now."""
        for hook in self.before_drop:
            try:
                hook(rec)
            except Exception:
                where = self.locate(rec.eid)
                what = self._label(*where) if where else f"{self.name} entry {rec.eid}"
                log.exception("keeping the bytes of %s for its open handles failed", what)

    def _notify(self, key: bytes, origin: object, carried: bool = False) -> None:
        for watcher in self.watchers:
            try:
                watcher(key, origin, carried)
            except Exception:
                log.exception("store %s watcher failed", self.name)

    def _parent_dir(self, loc: str, parts: Parts) -> Record:
        parent = self.get(loc, parts[:-1])
        if parent is None:
            raise StoreError(errno.ENOENT, f"{self._label(loc, parts[:-1])} does not exist")
        if not parent.is_dir:
            raise StoreError(errno.ENOTDIR, f"{self._label(loc, parts[:-1])} is not a directory")
        return parent

    def _touch_dir(
        self, loc: str, parts: Parts, now: int, subdirs: int = 0, rec: Record | None = None
    ) -> None:
        """A directory's entries changed: its mtime and ctime move (its version does not: a
        directory's content is its children's business, not a replicated write). ``rec`` is
        its record, when the caller has just read it."""
        if rec is None:
            rec = self.get(loc, parts)
            if rec is None:
                return
        self._put(
            entry_key(loc, parts),
            rec.but(
                mtime_ns=now, ctime_ns=now, atime_ns=now, subdirs=max(0, rec.subdirs + subdirs)
            ),
        )

    def _label(self, loc: str, parts: Parts) -> str:
        return label(self.name, loc, parts)

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

    def check_room(self, nbytes: int = 0, *, freeing: bool = False) -> None:
        """ENOSPC unless the disk holds ``nbytes`` more beside everything waiting to be
        committed: a full disk is refused at the request, never discovered at the commit.
        Each change spends a budget worked out at the last statvfs (one per commit, or when
        the budget runs out): a comparison per request, not a system call."""
        budget = self._room - 2 * nbytes - SPACE_PER_CHANGE
        if budget >= (-SPACE_RESERVE if freeing else 0):
            self._room = budget
            return
        waiting = self._pending.held + self._inflight.held + self.reserved
        changes = len(self._pending) + len(self._inflight)
        try:
            st = os.statvfs(self.path)
        except OSError:
            return  # no answer: the commit will tell
        free = st.f_bavail * st.f_frsize
        # What the disk can take beyond the changes waiting and the deletes' reserve.
        self._room = free - 2 * waiting - SPACE_PER_CHANGE * changes - SPACE_RESERVE
        budget = self._room - 2 * nbytes - SPACE_PER_CHANGE
        if budget < (-SPACE_RESERVE if freeing else 0):
            raise StoreError(
                errno.ENOSPC,
                f"store {self.name}: {free} bytes free in {self.path}, not enough for "
                f"{nbytes} bytes more beside the {waiting} bytes waiting for the disk",
            )
        self._room = budget

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

    def _count(self, delta: int) -> None:
        self.value_bytes = max(0, self.value_bytes + delta)
        self._pending.value_bytes = self.value_bytes

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

    # -- replication (global) -------------------------------------------------------------

    def digest(self, key: bytes) -> bytes | None:
        """What anti-entropy compares: a hash of the entry's version (tombstones included)."""
        rec = self._record(key)
        return version_digest(rec.version) if rec is not None and rec.version else None

    def has_version(self, key: bytes, version: Version) -> bool:
        """Whether this replica holds ``version`` of the entry, or one written over it."""
        rec = self._record(key)
        return rec is not None and rec.version is not None and rec.version.covers(version)

    def export(self, key: bytes) -> tuple[Record, bytes | None] | None:
        """The entry as replication sends it: its record, and its bytes for a file."""
        rec = self._record(key)
        if rec is None or rec.version is None:
            return None
        return rec, self.read(rec.eid) if rec.kind == FILE else None

    def iter_digests(self) -> Iterator[tuple[bytes, bytes]]:
        """(key, digest) of every replicated entry (to build a hash tree at start; later
        changes come through the watchers)."""
        for key, rec in self._scan():
            if rec.version is not None:
                yield key, version_digest(rec.version)

    def merge(
        self, key: bytes, rec: Record, value: bytes | None, origin: object = "replication"
    ) -> bool:
        """Apply a version another peer wrote (conflicts.py decides); True if anything changed.
        Entry ids and subdirectory counts are this replica's own: the remote ones are ignored.
        An entry may arrive before its parent directory: it is kept, and shows once the parent
        does (anti-entropy brings it)."""
        if rec.version is None:
            raise StoreError(errno.EINVAL, "a replicated entry has a version")
        try:
            loc, parts = check_entry_key(key)
        except ValueError as e:
            raise StoreError(errno.EINVAL, str(e)) from None
        if not parts:
            return False  # store roots are not entries
        if rec.alive:
            check_xattrs(rec.xattrs)
            check_target(rec.target)
            self.check_room(len(value or b""))
        else:
            self.check_room(freeing=True)
        self.clock.observe(rec.version.hlc)
        local = self._record(key)
        decision = decide(local, rec)
        if decision.copies_remote:
            return self._keep_copy(loc, parts, rec, value, origin)
        if not decision.replaces:
            return False
        if decision.copies_local and local is not None:
            old = self.read(local.eid) if local.kind == FILE else None
            self._keep_copy(loc, parts, local, old, origin)
        self._replace(loc, parts, key, local, rec, value)
        self._notify(key, origin)
        return True

    def _scan(self) -> Iterator[tuple[bytes, Record]]:
        """Every entry as it is now: LMDB, with the changes not yet on disk over it."""
        newer: dict[bytes, Record | None] = {}
        for layer in (self._inflight, self._pending):  # the newest last
            newer.update(layer.entries)
        with self.env.begin(db=self._entries) as txn:
            for dbkey, raw in txn.cursor():
                key = self._whole_key(txn, dbkey)
                if key is not None and key not in newer:
                    yield key, Record.unpack(raw)
        for key, rec in newer.items():
            if rec is not None:
                yield key, rec

    def _forget(self, key: bytes, rec: Record) -> None:
        """An entry leaves this replica without a trace (no tombstone): replication's own
        bookkeeping, so the watchers hear it with replication as the origin."""
        if rec.alive:
            self._drop_value(rec)
            self._set_eid(rec.eid, None)
        self._put(key, None)
        self._notify(key, "replication")

    def collect_tombstones(self, cutoff_ms: int, limit: int = 10_000) -> int:
        """Forget tombstones of deletes older than ``cutoff_ms`` (wall clock): their key leaves
        the store and the hash tree. At most ``limit`` per call (the caller comes back)."""
        if not self.replicated:
            return 0
        old = list(
            itertools.islice(
                (
                    (key, rec)
                    for key, rec in self._scan()
                    if not rec.alive and rec.version and rec.version.hlc >> LOGICAL_BITS < cutoff_ms
                ),
                limit,
            )
        )
        for key, rec in old:
            self._forget(key, rec)
        return len(old)

    def forget_stale(self, cutoff_ms: int) -> int:
        """Drop every entry whose version is older than ``cutoff_ms`` and was written by
        another peer: for a replica away longer than the tombstone grace period, whose old
        entries may have been deleted elsewhere with the tombstones since collected. What
        still exists comes back from the peers; its own writes stay (never lose them)."""
        if not self.replicated:
            return 0
        stale = [
            (key, rec)
            for key, rec in self._scan()
            if rec.version
            and rec.version.peer != self.peer
            and rec.version.hlc >> LOGICAL_BITS < cutoff_ms
        ]
        for key, rec in stale:
            self._forget(key, rec)
        if stale:
            log.warning(
                "store %s: away past the tombstone grace period; %d old entries of other peers "
                "dropped, to be fetched again",
                self.name,
                len(stale),
            )
        return len(stale)

    def _keep_copy(
        self, loc: str, parts: Parts, loser: Record, value: bytes | None, origin: object
    ) -> bool:
        assert loser.version is not None
        name = conflict_name(parts[-1], loser.version)
        log.warning(
            "store %s: concurrent writes to %s; %s kept as %s",
            self.name,
            self._label(loc, parts),
            loser.version.peer,
            name.decode("utf-8", "replace"),
        )
        self.conflicts += 1
        return self.merge(entry_key(loc, (*parts[:-1], name)), loser, value, origin)

    def _replace(
        self,
        loc: str,
        parts: Parts,
        key: bytes,
        local: Record | None,
        rec: Record,
        value: bytes | None,
    ) -> None:
        was_alive = local is not None and local.alive
        was_dir = was_alive and local.is_dir  # type: ignore[union-attr]
        now = self._now()
        if not rec.alive:
            new = Record(TOMBSTONE, 0, 0, 0, 0, rec.mtime_ns, rec.ctime_ns, version=rec.version)
            if was_alive:
                assert local is not None
                self._drop_value(local)
                self._set_eid(local.eid, None)
        else:
            same_kind = was_alive and local is not None and local.kind == rec.kind
            if was_alive and local is not None and not same_kind:
                # Another kind of entry now: another inode, so no cache mistakes one for the other.
                self._drop_value(local)
                self._set_eid(local.eid, None)
                was_alive = False
            eid = local.eid if same_kind and local is not None else self._alloc()
            subdirs = local.subdirs if was_dir and rec.is_dir and local is not None else 0
            size = len(value or b"") if rec.kind == FILE else rec.size
            new = rec.but(eid=eid, subdirs=subdirs, size=size)
            if rec.kind == FILE:
                old = local.size if same_kind and local is not None else 0
                self._hold_value(eid, bytes(value or b""))
                self._count(size - old)
            if not was_alive:
                self._set_eid(eid, key)
        self._put(key, new)
        delta = int(new.alive and new.is_dir) - int(was_dir)
        if (local is not None and local.alive) != new.alive or delta:
            self._touch_dir(loc, parts[:-1], now, delta)

    def _drop_value(self, rec: Record) -> None:
        if rec.kind == FILE:
            self._dropping(rec)
            self._pending.values[rec.eid] = None
            self._count(-rec.size)

    # -- to disk ---------------------------------------------------------------------------

    async def run_trimmer(self, every: float = 5.0) -> None:
        """Trim the map now and then (see trim); cheap: one read of /proc/self/maps."""
        while True:
            await trio.sleep(every)
            self.trim()

    async def run_writer(self, group_window: float = GROUP_WINDOW) -> None:
        """Commit groups of changes as they come (cancel to stop; then call close()).

        A group gathers what changes in ``group_window`` seconds after its first change: one
        thread hand-off and one flush for a burst, not one per change (fsync does not wait).
        """
        while True:
            await self._dirty.wait()
            with trio.move_on_after(group_window):
                await self._full.wait()  # a heavy group does not wait out the window
            self._dirty = trio.Event()
            try:
                await self.commit()
            except StoreError:
                self._dirty.set()  # logged; the group is pending again: retry it
                await trio.sleep(1)

    async def commit(self) -> None:
        """Write what is pending now, in one transaction, and wait for it to be on disk."""
        async with self._commit_lock:
            if not self._pending:
                return
            batch, self._pending = self._pending, _Layer()
            self._full = trio.Event()
            self._inflight = batch
            upto = self.changes
            try:
                await trio.to_thread.run_sync(self._write, batch)
            except lmdb.Error as e:
                # Keep the group: it goes back under anything changed since, and is retried.
                self._pending = _merge(batch, self._pending)
                self._inflight = _Layer()
                self.commit_error = str(e)
                log.error("store %s: cannot commit %d changes: %s", self.name, len(batch), e)
                raise StoreError(errno.ENOSPC if "MAP_FULL" in str(e) else errno.EIO, str(e)) from e
            self._inflight = _Layer()
            for path in self._kept:  # taken up, and now on disk
                path.unlink(missing_ok=True)
            self._kept = []
            self._room = min(self._room, 0)  # what it took shows in the next statvfs
            self._touched(_FAULT_AROUND + 4096 * len(batch))  # the writer read the map
            self.commit_error = None
            self.committed = max(self.committed, upto)
            if batch.last_write_ns:
                self.last_write_ns = batch.last_write_ns

    async def sync(self) -> None:
        """Return once every change made before the call is on disk (fsync)."""
        target = self.changes
        while self.committed < target:
            await self.commit()

    def _write(self, batch: _Layer) -> None:
        with self.env.begin(write=True) as txn:
            for key, rec in batch.entries.items():
                dbkey = db_key(key)
                if rec is None:
                    txn.delete(dbkey, db=self._entries)
                    continue
                if is_hashed(dbkey):
                    cut = key.rfind(b"\0") + 1
                    txn.put(dbkey[:HASHED_HEAD], key[:cut], db=self._heads)
                # Always within LMDB's 511 bytes (keys.db_key; test_store_limits): no change
                # can be refused here, and so none can hold its group up forever.
                txn.put(dbkey, rec.pack(), db=self._entries)
            for eid, value in batch.values.items():
                if value is None:
                    txn.delete(eid_key(eid), db=self._values)
                else:
                    txn.put(eid_key(eid), value, db=self._values)
            for eid, key in batch.eids.items():
                if key is None:
                    txn.delete(eid_key(eid), db=self._eids)
                else:
                    txn.put(eid_key(eid), key, db=self._eids)
            if batch.next_eid is not None:
                txn.put(b"next_eid", _U64.pack(batch.next_eid), db=self._meta)
            if batch.last_write_ns is not None:
                txn.put(b"last_write_ns", _U64.pack(batch.last_write_ns), db=self._meta)
            if batch.value_bytes is not None:
                txn.put(b"value_bytes", _U64.pack(batch.value_bytes), db=self._meta)

    def trim(self) -> int:
        """Drop LMDB's mapped pages from this process (bytes unmapped).

        Reads go through a read-only shared map of the data file, so every page ever read
        stays counted in the daemon's RSS although it is page cache, not the daemon's memory.
        MADV_DONTNEED on that map only unmaps: the pages stay cached by the kernel, and the next
        read maps them again (a minor fault). Nothing can be lost: the map is never written.
        """
        self._mapped = 0
        if self._map_ranges is None:
            # The map is made once, at its full size, when the environment opens: it never moves.
            data = os.path.join(self.env.path(), "data.mdb")
            try:
                with open("/proc/self/maps") as maps:
                    lines = [ln.split()[0] for ln in maps if ln.rstrip().endswith(" " + data)]
            except OSError:
                return 0
            self._map_ranges = [(int(a, 16), int(b, 16)) for a, b in (r.split("-") for r in lines)]
        total = 0
        for start, end in self._map_ranges:
            if _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4) == 0:
                total += end - start
            else:
                self._map_ranges = None  # look again next time
        return total

    def meta_int(self, name: str) -> int:
        """A number kept beside the entries (membership's incarnation), 0 when never set."""
        raw = self.meta_bytes(name)
        return _U64.unpack(raw)[0] if raw else 0

    def set_meta_int(self, name: str, value: int) -> None:
        """Set it, durably, before returning (one small synchronous transaction)."""
        self.set_meta_bytes(name, _U64.pack(value))

    def meta_bytes(self, name: str) -> bytes | None:
        """Bytes kept beside the entries by other parts (replication's peers), or None."""
        with self.env.begin(db=self._meta) as txn:
            raw = txn.get(b"x." + name.encode())
        return bytes(raw) if raw is not None else None

    def set_meta_bytes(self, name: str, value: bytes) -> None:
        with self.env.begin(write=True, db=self._meta) as txn:
            txn.put(b"x." + name.encode(), value)

    async def close(self, attempts: int = 3) -> Path | None:
        """Commit everything and close. When the commit keeps failing, what it could not
        save is kept in a file (unsaved.py) and its path returned: the caller must say so;
        OSError when even that was impossible (then the log has the changes' count)."""
        try:
            for attempt in range(attempts):
                try:
                    await self.sync()
                    return None
                except StoreError as e:
                    log.error(
                        "store %s: cannot save at exit (try %d): %s", self.name, attempt + 1, e
                    )
                    await trio.sleep(0.2 * (attempt + 1))
            where = self._keep_unsaved()
            log.error(
                "store %s: %d changes could not be saved; kept in %s for the next start",
                self.name,
                self.changes - self.committed,
                where,
            )
            return where
        finally:
            self.env.close()

    def stats(self) -> StoreStats:
        with self.env.begin() as txn:
            entries = txn.stat(self._entries)["entries"]
        return StoreStats(self.name, entries, self.value_bytes, self.last_write_ns)


def _merge(older: _Layer, newer: _Layer) -> _Layer:
    out = _Layer(
        {**older.entries, **newer.entries},
        {**older.values, **newer.values},
        {**older.eids, **newer.eids},
        {},
        newer.next_eid or older.next_eid,
        newer.last_write_ns or older.last_write_ns,
        newer.value_bytes if newer.value_bytes is not None else older.value_bytes,
    )
    out.held = older.held + newer.held
    for layer in (older, newer):
        for prefix, names in layer.children.items():
            out.children.setdefault(prefix, set()).update(names)
    return out
