"""A store's replica side: what replication (cluster/replication.py) asks of the global store.

The replica interface (stores/replica.py) as LMDB keeps it: an entry's version and its digest,
the entry as replication sends it, every digest for the hash tree, the merge of a version
another peer wrote (conflicts.py decides, a concurrent loser kept beside it as a conflict copy),
the forgetting of old tombstones and of a long-absent replica's stale entries, and numbers and
bytes kept beside the entries by other parts (replication's peers; membership's incarnation,
in the local store).
"""

from __future__ import annotations

import errno
import itertools
import logging
from collections.abc import Iterator

import lmdb

from ..conflicts import conflict_name, decide
from ..keys import (
    HASHED_HEAD,
    Parts,
    check_entry_key,
    check_target,
    check_xattrs,
    entry_key,
    is_hashed,
    whole_key,
)
from ..record import FILE, TOMBSTONE, Record, StoreError
from ..version import LOGICAL_BITS, Version, version_digest
from .core import LmdbCore
from .schema import U64

log = logging.getLogger(__name__)


class ReplicaSide(LmdbCore):
    """The replica interface of stores/replica.py, over LmdbCore's state and primitives.
    A store not ``replicated`` (a local one) keeps no versions: it forgets nothing."""

    peer: str  # this replica's peer id: the writer its own versions name
    replicated: bool
    max_value: int
    conflicts: int  # concurrent versions settled since the start
    _head_of: dict[bytes, bytes]  # digest -> head, for scans (bounded)

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
        return whole_key(head, dbkey)

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

    # -- kept beside the entries -----------------------------------------------------------

    def meta_int(self, name: str) -> int:
        """A number kept beside the entries (membership's incarnation), 0 when never set."""
        raw = self.meta_bytes(name)
        return U64.unpack(raw)[0] if raw else 0

    def set_meta_int(self, name: str, value: int) -> None:
        """Set it, durably, before returning (one small synchronous transaction)."""
        self.set_meta_bytes(name, U64.pack(value))

    def meta_bytes(self, name: str) -> bytes | None:
        """Bytes kept beside the entries by other parts (replication's peers), or None."""
        with self.env.begin(db=self._meta) as txn:
            raw = txn.get(b"x." + name.encode())
        return bytes(raw) if raw is not None else None

    def set_meta_bytes(self, name: str, value: bytes) -> None:
        with self.env.begin(write=True, db=self._meta) as txn:
            txn.put(b"x." + name.encode(), value)
