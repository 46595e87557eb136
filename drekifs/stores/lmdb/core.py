"""What every side of an :class:`~drekifs.stores.lmdb.LmdbStore` stands on: the store's state,
reads through the changes not yet on disk, and the few primitives every change is made of.

A read looks at the newest first: the ``pending`` layer (changes as they are made), the group
in flight (being committed by writer.py), a bounded cache of what LMDB said, then LMDB. A change
goes to ``pending`` and to the caches at once (:meth:`LmdbCore._put` and its siblings), wakes
the writer, and is told to the watchers. Reads go through LMDB's map of the data file, which
:meth:`LmdbCore.trim` drops from the daemon's RSS now and then (readmap.py).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import lmdb
import trio

from ..base import Watcher
from ..keys import INLINE_HEAD, Parts, db_key, eid_key, entry_key, label, split_key
from ..record import DIR, TOMBSTONE, Record, StoreError
from ..version import HybridClock
from . import readmap
from .layer import Layer
from .schema import Db

log = logging.getLogger(__name__)

CACHE_ENTRIES = 20_000
# Value bytes a group may hold before it commits without waiting out the window (writer.py's
# GROUP_WINDOW): what a fast writer can pile up in memory is bounded by this, not by its speed.
GROUP_BYTES = 16 << 20
# Free disk a change needs besides twice the bytes waiting for the disk (LMDB writes new pages
# before it frees old ones): a page or two of tree per change, and a reserve only deletes and
# truncates may use, so that a full store can always be emptied.
SPACE_PER_CHANGE = 8 << 10
SPACE_RESERVE = 1 << 20
# Trim the map once reads may have mapped this much (each miss counts a fault-around window).
TRIM_AFTER_BYTES = 16 << 20
FAULT_AROUND = 64 << 10
# Entries on one LMDB leaf page, about: a scan faults once per leaf, and each fault maps up to
# FAULT_AROUND of the file (value pages written at the same time lie between entry pages).
ENTRIES_PER_LEAF = 16
MISSING = object()  # not in this layer or cache (None there means: deleted)


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


class LmdbCore(_Slots):
    """The state and primitives GroupCommit (writer.py), ReplicaSide (replica.py) and LmdbStore
    (store.py) share. LmdbStore.__init__ sets every attribute: the ones declared here, and
    those each side declares for itself. Not thread-safe: it belongs to one trio loop."""

    name: str
    path: Path
    uid: int
    gid: int
    clock: HybridClock
    env: lmdb.Environment
    _entries: Db
    _values: Db
    _eids: Db
    _meta: Db
    _heads: Db
    _next_eid: int
    value_bytes: int  # bytes in all live values
    # Changes not on disk yet: ``pending`` takes them, ``inflight`` is the group committing.
    _pending: Layer
    _inflight: Layer
    _dirty: trio.Event  # something is pending: the writer wakes
    _full: trio.Event  # the pending group holds GROUP_BYTES: commit it now
    changes: int  # changes applied in memory
    watchers: list[Watcher]
    before_drop: list[Callable[[Record], None]]  # see _dropping
    # Disk room (check_room): bytes open files hold for their commit, and the bytes of
    # changes check_room may admit before it asks statvfs again.
    reserved: int
    _room: int
    # Bounded caches of LMDB reads, kept current by every change (_put, _set_eid).
    _records: dict[bytes, Record | None]
    _where: dict[int, bytes | None]
    _mapped: int  # bytes reads may have mapped since the last trim (an estimate)
    _map_ranges: readmap.Ranges | None

    # -- reading ---------------------------------------------------------------------------

    def _layers(self) -> tuple[Layer, Layer]:
        return self._pending, self._inflight

    def _record(self, key: bytes) -> Record | None:
        # Newest first: changes not on disk (pending, then in flight), the cache, LMDB. Written
        # out rather than a loop over _layers(): every request reads a few records.
        rec = self._pending.entries.get(key, MISSING)
        if rec is MISSING:
            rec = self._inflight.entries.get(key, MISSING)
            if rec is MISSING:
                rec = self._records.get(key, MISSING)
        if rec is not MISSING:
            return rec  # type: ignore[return-value]
        with self.env.begin(db=self._entries) as txn:
            raw = txn.get(key if len(key) <= INLINE_HEAD else db_key(key))
        rec = Record.unpack(raw) if raw is not None else None
        self._remember(self._records, key, rec)
        self._touched(FAULT_AROUND)
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

    def locate(self, eid: int) -> tuple[str, Parts] | None:
        """Where the entry ``eid`` is now."""
        key = self._key_of(eid)
        return split_key(key) if key is not None else None

    def _key_of(self, eid: int) -> bytes | None:
        """The entries key of the entry ``eid`` now; None when it is gone."""
        key = self._pending.eids.get(eid, MISSING)
        if key is MISSING:
            key = self._inflight.eids.get(eid, MISSING)
            if key is MISSING:
                key = self._where.get(eid, MISSING)
                if key is MISSING:
                    with self.env.begin(db=self._eids) as txn:
                        key = txn.get(eid_key(eid))
                    self._remember(self._where, eid, key)
                    self._touched(FAULT_AROUND)
        return key  # type: ignore[return-value]

    def read(self, eid: int, offset: int = 0, size: int | None = None) -> bytes:
        """Bytes of a file's value; only the slice asked for is copied."""
        for layer in self._layers():
            value = layer.values.get(eid, MISSING)
            if value is not MISSING:
                value = value or b""
                return value[offset : None if size is None else offset + size]  # type: ignore
        with self.env.begin(db=self._values, buffers=True) as txn:
            buf = txn.get(eid_key(eid))
            if buf is None:
                return b""
            out = bytes(buf[offset : None if size is None else offset + size])
        self._touched(FAULT_AROUND + len(out))
        return out

    # -- the primitives of every change ---------------------------------------------------

    def _now(self) -> int:
        return time.time_ns()

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

    def _count(self, delta: int) -> None:
        self.value_bytes = max(0, self.value_bytes + delta)
        self._pending.value_bytes = self.value_bytes

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

    # -- the map -------------------------------------------------------------------------

    async def run_trimmer(self, every: float = 5.0) -> None:
        """Trim the map now and then (see trim); cheap: one read of /proc/self/maps."""
        while True:
            await trio.sleep(every)
            self.trim()

    def trim(self) -> int:
        """Drop LMDB's mapped pages from this process (bytes unmapped): the pages stay in the
        kernel's cache, and the next read maps them again (readmap.py says why that is safe)."""
        self._mapped = 0
        if self._map_ranges is None:
            # The map is made once, at its full size, when the environment opens: it never moves.
            self._map_ranges = readmap.ranges(os.path.join(self.env.path(), "data.mdb"))
            if self._map_ranges is None:
                return 0
        total, ok = readmap.unmap(self._map_ranges)
        if not ok:
            self._map_ranges = None  # look again next time
        return total
