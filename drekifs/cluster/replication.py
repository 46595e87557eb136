"""The global store, replicated: every write broadcast (Plumtree), every replica repaired
(anti-entropy), every version merged by the store's own rules (stores/conflicts.py).

:class:`GlobalReplica` is the store as both protocols see it — Plumtree's message cache
(message id = entry key + version) and anti-entropy's entry source — and :class:`Replication`
runs them: a local write (a store change whose origin is not replication) is broadcast; every
change, local or merged, updates the hash tree; membership gives both their peers.

On the wire an entry is ``[record (Record.pack()), value or None]``; a message id is
``hlc (8 bytes) | length of peer (1) | peer | key``, or, when that would be over Plumtree's
200 bytes (keys run to 4 KiB), ``... | peer | \x01 | 16-byte BLAKE2b digest of the key``, and
then the entry carries its key: ``[record, value, key]``. A peer that has not seen that key
lately cannot tell from the id whether it has the version, so it asks (one GRAFT) and drops
the duplicate.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from collections.abc import Iterable
from typing import Any

import msgpack
import trio

from ..stores.keys import HASHED
from ..stores.record import TOMBSTONE_GRACE, Record, StoreError
from ..stores.replica import Replica
from ..stores.version import Version
from .antientropy import AntiEntropy, HashTree
from .net import Network, PeerAddr
from .plumtree import Broadcast, PlumtreeConfig
from .plumtree.messages import MAX_ID
from .rejoin import EXCHANGE_TIMEOUT, RETURN_PUSH_LIMIT, brought_news

log = logging.getLogger(__name__)

ORIGIN = "replication"
_HLC = struct.Struct(">Q")
COLLECT_EVERY = 3600.0  # at the most: a grace under 4 hours is collected every quarter of it
SAVE_EVERY = 60.0  # seconds between saves of the peers' confirmations (and at a clean stop)
SEND_EVERY = 0.02  # seconds local writes gather before they are broadcast
BUILD_CHUNK = 5_000  # keys hashed into the tree per step at start, between other work


KEY_DIGEST = 16
LONG_KEYS = 10_000  # digests of long keys remembered, to answer IHAVEs and GRAFTs by id


def key_digest(key: bytes) -> bytes:
    return HASHED + hashlib.blake2b(key, digest_size=KEY_DIGEST).digest()


def message_id(key: bytes, version: Version) -> bytes:
    peer = version.peer.encode()[:255]
    head = _HLC.pack(version.hlc) + bytes([len(peer)]) + peer
    if len(head) + len(key) > MAX_ID:
        return head + key_digest(key)
    return head + key


def split_message_id(mid: bytes) -> tuple[bytes, Version]:
    """The entry key (or its digest: see is_digest) and the version a message id names;
    ValueError when it names none."""
    if len(mid) < 10:
        raise ValueError("not a message id")
    n = mid[8]
    peer, key = mid[9 : 9 + n], mid[9 + n :]
    if len(peer) != n or not key:
        raise ValueError("not a message id")
    return key, Version(_HLC.unpack(mid[:8])[0], peer.decode("utf-8", "replace"))


def is_digest(key: bytes) -> bool:
    """A message id's key part is a digest (no entry key starts with HASHED: keys.py)."""
    return key[:1] == HASHED


def _entry(raw: Any) -> tuple[Record, bytes | None]:
    if not isinstance(raw, list | tuple) or len(raw) not in (2, 3):
        raise ValueError("an entry is [record, value] or [record, value, key]")
    packed, value = raw[0], raw[1]
    if not isinstance(packed, bytes) or not (value is None or isinstance(value, bytes)):
        raise ValueError("an entry is [record bytes, value bytes or nil]")
    rec = Record.unpack(packed)
    if rec.version is None:
        raise ValueError("a replicated entry has a version")
    return rec, value


def entry_message(key: bytes, rec: Record, value: bytes | None) -> tuple[bytes, list]:
    """An entry as Plumtree carries it, and its id: the key too when the id has only its
    digest (an id that names the key ends with it; a digest-named key is longer than it)."""
    assert rec.version is not None
    mid = message_id(key, rec.version)
    if mid.endswith(key):
        return mid, [rec.pack(), value]
    return mid, [rec.pack(), value, key]


class GlobalReplica:
    """The global store as Plumtree's MessageStore and anti-entropy's EntrySource."""

    def __init__(self, store: Replica) -> None:
        self.store = store
        self.merged = 0  # entries from peers that changed something here
        self.refused = 0  # entries from peers this store would not take (each logged)
        self._long_keys: dict[bytes, bytes] = {}  # digest -> key, of long keys seen lately

    def remember_long(self, key: bytes) -> bytes:
        """A long key's digest, remembered so that ids naming it can be answered."""
        digest = key_digest(key)
        if digest not in self._long_keys and len(self._long_keys) >= LONG_KEYS:
            self._long_keys.pop(next(iter(self._long_keys)))
        self._long_keys[digest] = key
        return digest

    def _key_of(self, part: bytes) -> bytes | None:
        return self._long_keys.get(part) if is_digest(part) else part

    # -- Plumtree --------------------------------------------------------------------------

    def has(self, mid: bytes) -> bool:
        part, version = split_message_id(mid)
        key = self._key_of(part)
        return key is not None and self.store.has_version(key, version)

    def get(self, mid: bytes) -> Any | None:
        part, version = split_message_id(mid)
        key = self._key_of(part)
        exported = self.store.export(key) if key is not None else None
        current = exported[0].version if exported is not None else None
        if current is None or not version.same_write(current):
            return None  # superseded: the newer version travels on its own
        rec, value = exported
        return entry_message(key, rec, value)[1]

    def deliver(self, mid: bytes, payload: Any) -> bool:
        part, version = split_message_id(mid)
        rec, value = _entry(payload)
        key = part
        if is_digest(part):
            key = payload[2] if len(payload) == 3 else None
            if not isinstance(key, bytes) or key_digest(key) != part:
                raise ValueError("the payload's key is not the one its message id names")
            self.remember_long(key)
        assert rec.version is not None  # _entry refuses an entry without one
        if not version.same_write(rec.version):
            # Plumtree remembers ids: an id over another version would stand for the wrong one.
            raise ValueError("the payload is not the version its message id names")
        return self._merge_one(key, rec, value)

    # -- anti-entropy ----------------------------------------------------------------------

    def digest(self, key: bytes) -> bytes | None:
        return self.store.digest(key)

    def export(self, keys: list[bytes]) -> list[tuple[bytes, Any]]:
        out = []
        for key in keys:
            exported = self.store.export(key)
            if exported is not None:
                out.append((key, [exported[0].pack(), exported[1]]))
        return out

    def merge(self, entries: list[tuple[bytes, Any]]) -> int:
        """Each entry on its own: one this store refuses is logged and counted, and never
        stops the others (nor fails the exchange that brought them)."""
        changed = 0
        for key, raw in entries:
            try:
                rec, value = _entry(raw)
                changed += self._merge_one(key, rec, value)
            except (ValueError, TypeError, KeyError, StoreError) as e:
                self._refuse(key, e)
        return changed

    def _refuse(self, key: object, e: Exception) -> None:
        self.refused += 1
        shown = key[:120] if isinstance(key, bytes) else type(key).__name__
        log.warning("replication: an entry refused (%s): %s", shown, e)

    def _merge_one(self, key: bytes, rec: Record, value: bytes | None) -> bool:
        if value is not None and len(value) > self.store.max_value:
            raise ValueError(f"a value of {len(value)} bytes, over {self.store.max_value}")
        try:
            changed = self.store.merge(key, rec, value, ORIGIN)
        except StoreError as e:
            raise ValueError(str(e)) from None
        self.merged += changed
        return changed


class Replication:
    """Broadcast and anti-entropy for one peer's global store (run it in the peer's nursery)."""

    def __init__(
        self,
        name: str,
        net: Network,
        store: Replica,
        tombstone_grace: float = TOMBSTONE_GRACE,
    ) -> None:
        self.name = name
        self.store = store
        self.tombstone_grace = tombstone_grace
        self.collected = 0
        # Members heard of (alive once, or dead, or left: they may hold a replica) -> the wall
        # time at which the last exchange this peer completed with them started (0: none yet).
        # A tombstone goes only once every one of them has exchanged since its delete.
        self.confirmed: dict[str, float] = self._load_confirmed()
        self._confirmed_saved = 0.0
        self.dropped_stale = self._drop_if_stale()
        self.replica = GlobalReplica(store)
        self.tree = HashTree(ready=False, digest_of=store.digest)
        self.broadcast = Broadcast(name, net, PlumtreeConfig(), self.replica)
        self.antientropy = AntiEntropy(name, net, self.tree, self.replica)
        self.antientropy.on_sync = self._synced
        # Local writes waiting to be broadcast: a burst on one key (create, write, chown,
        # utimes) goes out once, as its last version, off the request path.
        self._outgoing: dict[bytes, None] = {}
        self._wake = trio.Event()
        store.watchers.append(self._changed)

    def _drop_if_stale(self) -> int:
        """Away (no exchange with any peer) for longer than the tombstone grace period: what
        others wrote before then may have been deleted and forgotten meanwhile; drop it before
        serving, and fetch what still exists (the catch-up at start). The last exchange is the
        latest confirmation (``last_contact_s``: what stores kept before confirmations)."""
        last = max(self.confirmed.values(), default=0.0) or self.store.meta_int("last_contact_s")
        if not last or time.time() - last <= self.tombstone_grace:
            return 0
        cutoff_ms = int((time.time() - self.tombstone_grace) * 1000)
        return self.store.forget_stale(cutoff_ms)

    # -- who has seen the deletes ----------------------------------------------------------

    def _load_confirmed(self) -> dict[str, float]:
        raw = self.store.meta_bytes("confirmed")
        try:
            return {str(k): float(v) for k, v in msgpack.unpackb(raw).items()} if raw else {}
        except (ValueError, TypeError, AttributeError):
            log.error("replication: the saved peer confirmations are unreadable; starting over")
            return {}

    def save_confirmed(self) -> None:
        self._confirmed_saved = time.time()
        self.store.set_meta_bytes("confirmed", msgpack.packb(self.confirmed))

    def note_members(self, heard: Iterable[str], world: Iterable[str] | None = None) -> None:
        """Members heard of join the peers every tombstone waits for; with ``world``, those
        no longer in it leave (a node removed from DNS can no longer bring anything back)."""
        changed = False
        for name in heard:
            if name != self.name and name not in self.confirmed:
                self.confirmed[name] = 0.0
                changed = True
        if world is not None:
            keep = set(world)
            for name in [n for n in self.confirmed if n not in keep]:
                del self.confirmed[name]
                changed = True
        if changed:
            self.save_confirmed()

    def _synced(self, result: Any) -> None:
        """An exchange completed (anti-entropy's on_sync): the peer holds every tombstone
        this one held when it started (the exchange pushes what the peer lacks)."""
        started = time.time() - result.seconds
        name = result.peer
        if name != self.name and started > self.confirmed.get(name, 0.0):
            self.confirmed[name] = started
            if time.time() - self._confirmed_saved >= SAVE_EVERY:
                self.save_confirmed()

    def collect_horizon(self, now: float | None = None) -> tuple[float, list[str]]:
        """Deletes before this wall time may be forgotten, and the members holding it back
        (those that have not exchanged since the grace period began)."""
        now = time.time() if now is None else now
        horizon = now - self.tombstone_grace
        waiting = sorted(n for n, t in self.confirmed.items() if t < horizon)
        return min([horizon, *(self.confirmed[n] for n in waiting)]), waiting

    def _changed(self, key: bytes, origin: object, carried: bool) -> None:
        self.tree.mark(key)  # settled when anti-entropy next reads the tree, or at a send
        if origin != ORIGIN:
            self._outgoing[key] = None
            self._wake.set()

    async def _send_loop(self) -> None:
        while True:
            await self._wake.wait()
            await trio.sleep(SEND_EVERY)
            self._wake = trio.Event()
            self.tree.settle()  # here rather than in the next exchange's first request
            keys, self._outgoing = self._outgoing, {}
            for key in keys:
                exported = self.store.export(key)
                if exported is None or exported[0].version is None:
                    continue
                rec, value = exported
                mid, payload = entry_message(key, rec, value)
                if len(payload) == 3:
                    self.replica.remember_long(key)
                try:
                    self.broadcast.broadcast(mid, payload)
                except ValueError as e:  # a bug: anti-entropy carries it all the same
                    log.error("replication: not broadcast: %s", e)

    def set_members(self, alive: dict[str, PeerAddr]) -> None:
        """The live members (this peer may be among them): neighbours and exchange partners."""
        self.broadcast.set_neighbours(alive)
        self.antientropy.set_peers(alive)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.broadcast.run)
            nursery.start_soon(self._send_loop)
            task_status.started()
            await self._build_tree()
            nursery.start_soon(self.antientropy.run)
            nursery.start_soon(self._collect_loop)

    async def _collect_loop(self) -> None:
        """Tombstones older than the grace period that every member heard of has since
        exchanged past go, a batch at a time, every quarter of the grace (at most hourly)."""
        try:
            while True:
                await trio.sleep(min(COLLECT_EVERY, self.tombstone_grace / 4))
                await self.collect()
        finally:
            self.save_confirmed()  # at a clean stop too

    async def collect(self) -> int:
        horizon, waiting = self.collect_horizon()
        if waiting:
            log.info("replication: tombstones before %s kept for %s, not exchanged with since",
                     time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(horizon)),
                     ", ".join(waiting[:5]) + (" ..." if len(waiting) > 5 else ""))  # fmt: skip
        cutoff_ms = int(horizon * 1000)
        total = 0
        while True:
            gone = self.store.collect_tombstones(cutoff_ms)
            self.collected += gone
            total += gone
            if gone:
                log.info("replication: %d tombstones collected", gone)
            await trio.sleep(0)
            if gone < 10_000:
                break
        return total

    async def _build_tree(self) -> None:
        """The tree from what is on disk, a chunk at a time (reads go on meanwhile); changes
        made during the build are applied on top (the tree takes updates while building)."""
        self.tree.start_build()
        items = self.store.iter_digests()
        while True:
            chunk = [item for _, item in zip(range(BUILD_CHUNK), items, strict=False)]
            if not chunk:
                break
            self.tree.build(chunk)
            await trio.sleep(0)
        self.tree.finish_build()
        log.info("replication: hash tree of %d global entries ready", len(self.tree))

    async def catch_up(self, alive: dict[str, PeerAddr]) -> bool:
        """A (re)joining peer: exchange with live peers until one full sync succeeds."""
        while not self.tree.ready:
            await trio.sleep(0.05)
        for name in sorted(alive, key=lambda _: self.antientropy.rng.random()):
            if name == self.name:
                continue
            try:
                with trio.move_on_after(60):
                    result = await self.antientropy.full_sync(alive[name])
                    log.info("replication: caught up with %s (%s)", name, result)
                    return True
            except Exception as e:  # unreachable, refused, malformed: try another one
                log.info("replication: catching up with %s failed: %s", name, e)
        return False

    async def exchange(self, name: str, addr: PeerAddr) -> bool:
        """One exchange with a member that just came back; True if it completed and changed
        something here (see rejoin.py; failures are only logged)."""
        try:
            with trio.move_on_after(EXCHANGE_TIMEOUT):
                result = await self.antientropy.sync(addr, push_limit=RETURN_PUSH_LIMIT)
                log.info("replication: exchanged with %s, back: %s", name, result)
                return brought_news(result)
        except Exception as e:
            log.info("replication: exchange with %s failed: %s", name, e)
        return False

    def stats(self) -> dict[str, Any]:
        return {
            "broadcast": self.broadcast.stats(),
            "antientropy": self.antientropy.stats(),
            "local_writes_waiting": len(self._outgoing),
            "merged": self.replica.merged,
            "conflicts": self.store.conflicts,
            "tree_keys": len(self.tree),
            "tree_ready": self.tree.ready,
            "tombstones_collected": self.collected,
            "stale_entries_dropped_at_start": self.dropped_stale,
            "tombstone_grace_s": self.tombstone_grace,
            "tombstones_wait_for": self.collect_horizon()[1],
        }
