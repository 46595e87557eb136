"""The group-commit writer: a store's changes, on disk in groups, off the event loop.

Durability. Every change is applied at once to an in-memory layer (``pending``, layer.py), which
readers consult before LMDB, and is then written by a single writer, in a worker thread, in one
LMDB transaction per group with LMDB's full sync (``sync=True``, ``metasync=True``: data pages,
fsync, meta page, fsync). So a request never waits for a disk flush, a burst of changes costs one
flush, and LMDB's copy-on-write pages keep the file consistent through any crash or power loss.
``sync()`` returns once everything changed before it is on disk: that is what ``fsync`` waits
for, and what a write needs to survive power loss. A killed daemon loses what nobody fsynced:
the changes of its last milliseconds, and the bytes of files still open for writing (the
filesystem hands them to the store at release and fsync). What a stopping daemon cannot commit
is kept in a file and taken up at the next open (unsaved.py).
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import lmdb
import trio

from .. import unsaved
from ..keys import HASHED_HEAD, db_key, eid_key, is_hashed, key_head
from ..record import Record, StoreError
from .core import FAULT_AROUND, LmdbCore
from .layer import Layer, merge_layers
from .schema import U64

log = logging.getLogger(__name__)

# Seconds a group of changes gathers before it commits (fsync never waits for it). 100 ms
# rather than 20: a cp -a of small files cost the daemon ~9% less CPU (fewer transactions and
# thread hand-offs; docs/stores.md), and a crash loses at most this much of what nobody fsynced.
# A group holding core.GROUP_BYTES of values commits without waiting out the window.
GROUP_WINDOW = 0.1


class GroupCommit(LmdbCore):
    """A store's side that takes its changes to disk: the writer task, sync, close."""

    _commit_lock: trio.Lock  # one commit at a time: the writer's, or sync's
    committed: int  # changes on disk
    commit_error: str | None  # the last commit's failure, until one succeeds
    last_write_ns: int  # the newest change on disk
    _kept: list[Path]  # files of unsaved changes taken up: gone once committed

    # -- to disk ---------------------------------------------------------------------------

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
            batch, self._pending = self._pending, Layer()
            self._full = trio.Event()
            self._inflight = batch
            upto = self.changes
            try:
                # Shielded: a group out of pending lands or goes back. Cancelled while waiting
                # for a worker thread (the daemon stopping), it was stranded in flight, and the
                # exit's sync spun forever (test_store: ..._cancelled_while_waiting_...).
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._write, batch)
            except lmdb.Error as e:
                # Keep the group: it goes back under anything changed since, and is retried.
                self._pending = merge_layers(batch, self._pending)
                self._inflight = Layer()
                self.commit_error = str(e)
                log.error("store %s: cannot commit %d changes: %s", self.name, len(batch), e)
                raise StoreError(errno.ENOSPC if "MAP_FULL" in str(e) else errno.EIO, str(e)) from e
            except BaseException:
                self._pending = merge_layers(batch, self._pending)  # anything else: kept too
                self._inflight = Layer()
                raise
            self._inflight = Layer()
            for path in self._kept:  # taken up, and now on disk
                path.unlink(missing_ok=True)
            self._kept = []
            self._room = min(self._room, 0)  # what it took shows in the next statvfs
            self._touched(FAULT_AROUND + 4096 * len(batch))  # the writer read the map
            self.commit_error = None
            self.committed = max(self.committed, upto)
            if batch.last_write_ns:
                self.last_write_ns = batch.last_write_ns

    async def sync(self) -> None:
        """Return once every change made before the call is on disk (fsync)."""
        target = self.changes
        while self.committed < target:
            await self.commit()

    def _write(self, batch: Layer) -> None:
        with self.env.begin(write=True) as txn:
            for key, rec in batch.entries.items():
                dbkey = db_key(key)
                if rec is None:
                    txn.delete(dbkey, db=self._entries)
                    continue
                if is_hashed(dbkey):
                    txn.put(dbkey[:HASHED_HEAD], key_head(key), db=self._heads)
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
                txn.put(b"next_eid", U64.pack(batch.next_eid), db=self._meta)
            if batch.last_write_ns is not None:
                txn.put(b"last_write_ns", U64.pack(batch.last_write_ns), db=self._meta)
            if batch.value_bytes is not None:
                txn.put(b"value_bytes", U64.pack(batch.value_bytes), db=self._meta)

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
        layer = merge_layers(self._inflight, self._pending)
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
