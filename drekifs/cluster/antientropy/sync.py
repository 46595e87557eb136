"""Anti-entropy: compare hash trees with one random peer, repair both sides.

One exchange, driven by the initiator (the responder keeps no state between calls):

1. ``ae.root``: send our root; the peer answers its root, and its level-1 hashes when the roots
   differ (so an exchange between peers in sync costs one small round trip).
2. ``ae.nodes``, one call per level (more only if a level's hashes outgrow a reply): the child
   hashes of every node that differs, compared locally to find the next level's differing nodes.
3. ``ae.leaves``: the item ids (8 bytes naming a (key, digest) pair) of the differing leaf
   buckets, paged. Ids rather than keys: keys run to kilobytes, and most pairs of a differing
   bucket are equal on both sides.
4. ``ae.export`` (pull): the peer's entries for its ids we lack (a key we lack, or hold at
   another version); merged into our store, which picks winners and keeps conflicts.
5. ``ae.merge`` (push): our entries whose ids the peer lacks, except those whose pair now
   equals one of the peer's (the pull just gave us its version, and it won here).

Bytes grow with the difference: hashes of the differing paths (16 bytes x fanout per differing
node), 8 bytes per pair of the differing buckets (a few pairs each), and the differing entries.
Every message is bounded (config.reply_bytes / request_bytes) and checked (:mod:`.wire`).
"""

from __future__ import annotations

import bisect
import errno
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from random import Random
from typing import Any

import trio

from drekifs.cluster.antientropy import wire
from drekifs.cluster.antientropy.config import AntiEntropyConfig
from drekifs.cluster.antientropy.hashtree import HASH_BYTES, ITEM_ID_BYTES, HashTree
from drekifs.cluster.antientropy.source import EntrySource
from drekifs.cluster.antientropy.wire import Malformed, packed_size
from drekifs.cluster.net import Network, PeerAddr, PeerUnreachable, RemoteError

log = logging.getLogger(__name__)

ROOT, NODES, LEAVES, EXPORT, MERGE = "ae.root", "ae.nodes", "ae.leaves", "ae.export", "ae.merge"


@dataclass(slots=True)
class SyncResult:
    """What one exchange (or a full sync's exchanges together) did, seen from the initiator."""

    peer: str
    in_sync: bool = False
    """The roots agreed (at the start of the last exchange)."""
    buckets: int = 0
    """Leaf buckets that differed."""
    pulled: int = 0
    """Entries received."""
    pushed: int = 0
    """Entries sent."""
    changed_here: int = 0
    changed_there: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    round_trips: int = 0
    seconds: float = 0.0
    exchanges: int = 0

    def add(self, other: SyncResult) -> None:
        self.in_sync = other.in_sync
        for name in _SUMMED:
            setattr(self, name, getattr(self, name) + getattr(other, name))


_SUMMED = (
    "buckets",
    "pulled",
    "pushed",
    "changed_here",
    "changed_there",
    "bytes_sent",
    "bytes_received",
    "round_trips",
    "seconds",
    "exchanges",
)


@dataclass(slots=True)
class _PeerRecord:
    at: float
    result: str
    last: dict[str, Any] = field(default_factory=dict)


class AntiEntropy:
    """Periodic hash-tree anti-entropy for one peer.

    ``name`` is this peer's name (left out of the peers to pick); ``tree`` must be kept up to
    date by the store on every write (``tree.set`` / ``tree.remove``, or ``tree.mark``);
    ``source`` gives and takes entries. Serves ``ae.*`` calls from construction on; :meth:`run`
    initiates exchanges.
    """

    def __init__(
        self,
        name: str,
        net: Network,
        tree: HashTree,
        source: EntrySource,
        *,
        config: AntiEntropyConfig | None = None,
        rng: Random | None = None,
    ) -> None:
        self.name = name
        self.net = net
        self.tree = tree
        self.source = source
        self.config = config or AntiEntropyConfig()
        self.rng = rng or Random()
        self.counters: Counter[str] = Counter()
        # Called after every exchange that completed (in sync or repaired), whoever started it.
        self.on_sync: Callable[[SyncResult], None] | None = None
        self._peers: dict[str, PeerAddr] = {}
        self._names: dict[PeerAddr, str] = {}
        self._records: dict[str, _PeerRecord] = {}
        shape = tree.shape
        # A node's children take fanout * 16 bytes in a reply.
        self._max_nodes = max(
            1, min(self.config.max_items, self.config.reply_bytes // (shape.fanout * HASH_BYTES))
        )
        self._serve(ROOT, self._on_root, needs_tree=True)
        self._serve(NODES, self._on_nodes, needs_tree=True)
        self._serve(LEAVES, self._on_leaves, needs_tree=True)
        self._serve(EXPORT, self._on_export, needs_tree=False)
        self._serve(MERGE, self._on_merge, needs_tree=False)

    # -- Peers and the periodic loop ----------------------------------------------------------

    def set_peers(self, peers: Mapping[str, PeerAddr]) -> None:
        """The peers to pick from (alive members, by name); this peer is left out."""
        self._peers = {n: a for n, a in peers.items() if n != self.name and a != self.net.addr}
        self._names = {a: n for n, a in self._peers.items()}

    async def run(self) -> None:
        """Every interval (jittered), one exchange with one random peer; never returns."""
        config = self.config
        while True:
            spread = config.jitter * (2 * self.rng.random() - 1)
            await trio.sleep(config.interval * (1 + spread))
            if not self._peers or not self.tree.ready:
                continue
            name = self.rng.choice(sorted(self._peers))
            await self._sync_logged(self._peers[name])

    async def _sync_logged(self, addr: PeerAddr) -> None:
        """One exchange, whatever goes wrong: counted and recorded, never raised."""
        peer = self._name(addr)
        try:
            await self.sync(addr)
        except PeerUnreachable:
            self.counters["unreachable"] += 1
            self._record(peer, "unreachable")
        except RemoteError as e:
            self.counters["remote_errors"] += 1
            self._record(peer, f"remote error {e.code}: {e}")
        except Malformed as e:
            self.counters["bad_replies"] += 1
            self._record(peer, f"bad reply: {e}")
        except Exception as e:  # a bug (ours or the store's): keep the loop alive, loudly
            log.exception("anti-entropy with %s failed", peer)
            self.counters["errors"] += 1
            self._record(peer, f"error: {type(e).__name__}: {e}")

    def _name(self, addr: PeerAddr) -> str:
        return self._names.get(addr) or f"{addr[0]}:{addr[1]}"

    def _record(self, peer: str, result: str, last: SyncResult | None = None) -> None:
        self._records[peer] = _PeerRecord(
            trio.current_time(), result, asdict(last) if last is not None else {}
        )

    # -- Initiating ---------------------------------------------------------------------------

    async def full_sync(self, addr: PeerAddr, *, push: bool = True) -> SyncResult:
        """Exchange with ``addr`` until both roots agree (at most config.full_sync_rounds
        exchanges): for a peer that joins or rejoins. ``push=False`` only pulls (a peer away
        past the tombstone grace period must not spread what others have since collected).
        Raises as :meth:`sync`."""
        total = SyncResult(self._name(addr))
        for _ in range(self.config.full_sync_rounds):
            total.add(await self.sync(addr, push=push))
            if total.in_sync:
                break
        return total

    async def sync(self, addr: PeerAddr, *, push: bool = True) -> SyncResult:
        """One exchange with ``addr``: pull what differs and (``push``) push it back. Raises
        PeerUnreachable, RemoteError, or Malformed (a reply of the wrong shape)."""
        if not self.tree.ready:
            raise RuntimeError("the hash tree is still being built")
        result = SyncResult(self._name(addr), exchanges=1)
        started = trio.current_time()
        self.counters["syncs"] += 1
        try:
            await self._exchange(addr, result, push)
        finally:
            result.seconds = trio.current_time() - started
        self.counters["in_sync" if result.in_sync else "repairs"] += 1
        self._record(result.peer, "in sync" if result.in_sync else "repaired", result)
        if self.on_sync is not None:
            self.on_sync(result)
        return result

    async def _exchange(self, addr: PeerAddr, result: SyncResult, push: bool) -> None:
        tree, fanout = self.tree, self.tree.shape.fanout
        call = self._caller(addr, result)
        reply = await call(ROOT, {"shape": tree.shape.to_wire(), "root": tree.root()})
        wire.tree_hash(wire.field(reply, "root"))
        children = wire.field(reply, "children")
        if children is None:
            result.in_sync = True
            return
        diff = self._differing(0, [0], wire.hashes(children, fanout))
        for level in range(1, tree.shape.depth):
            if not diff:
                break
            diff = self._differing(level, diff, await self._child_hashes(call, level, diff))
        if not diff:
            return  # the difference was written away meanwhile
        result.buckets = len(diff)
        remote = await self._listing(call, diff)

        pull: list[tuple[int, bytes]] = []  # (bucket, item id) of the peer's
        maybe_push: list[bytes] = []  # our keys
        for bucket in diff:
            theirs = remote.get(bucket, set())
            ours = tree.item_ids(bucket)
            pull.extend((bucket, i) for i in sorted(theirs) if i not in ours)
            maybe_push.extend(k for i, k in ours.items() if i not in theirs)
        await self._pull(call, pull, result)
        if push:
            # Keys whose pair here is now the peer's (its version won here) need not go back.
            keys = []
            for k in maybe_push:
                mine = tree.item_id(k)
                if mine is not None and mine not in remote.get(tree.bucket(k), ()):
                    keys.append(k)
            await self._push(call, keys, result)

    def _caller(
        self, addr: PeerAddr, result: SyncResult
    ) -> Callable[[str, dict[str, Any]], Awaitable[Any]]:
        """A call to ``addr`` that counts round trips and bytes into ``result``."""

        async def call(method: str, args: dict[str, Any]) -> Any:
            sent = packed_size([method, args])
            result.round_trips += 1
            result.bytes_sent += sent
            self.counters["bytes_sent"] += sent
            self.counters["calls"] += 1
            reply = await self.net.call(addr, method, args, timeout=self.config.call_timeout)
            received = packed_size(reply)
            result.bytes_received += received
            self.counters["bytes_received"] += received
            return reply

        return call

    def _differing(self, level: int, nodes: list[int], theirs: bytes) -> list[int]:
        """The children of ``nodes`` (at ``level``) whose hashes differ from ``theirs``."""
        fanout, tree = self.tree.shape.fanout, self.tree
        size = fanout * HASH_BYTES
        out = []
        for j, node in enumerate(nodes):
            ours = tree.children(level, node)
            other = theirs[j * size : (j + 1) * size]
            if ours == other:
                continue
            for c in range(fanout):
                at = c * HASH_BYTES
                if ours[at : at + HASH_BYTES] != other[at : at + HASH_BYTES]:
                    out.append(node * fanout + c)
        return out

    async def _child_hashes(self, call: Callable, level: int, nodes: list[int]) -> bytes:
        parts = []
        for at in range(0, len(nodes), self._max_nodes):
            chunk = nodes[at : at + self._max_nodes]
            reply = await call(NODES, {"level": level, "nodes": chunk})
            fanout = self.tree.shape.fanout
            parts.append(wire.hashes(wire.field(reply, "hashes"), len(chunk) * fanout))
        return b"".join(parts)

    async def _listing(self, call: Callable, buckets: list[int]) -> dict[int, set[bytes]]:
        """The peer's item ids in ``buckets``, by bucket."""
        config = self.config
        out: dict[int, set[bytes]] = {}
        todo, after = buckets, None
        while todo:
            chunk = todo[: config.max_items]
            reply = await call(LEAVES, {"buckets": chunk, "after": after})
            counts = wire.int_list(
                wire.field(reply, "counts"), config.max_items + 1, config, "counts"
            )
            ids = wire.ids(wire.field(reply, "ids"), sum(counts))
            more = wire.field(reply, "next")
            if len(counts) != len(chunk) if more is None else not 0 < len(counts) <= len(chunk):
                raise Malformed("counts do not match the buckets")
            at = 0
            for bucket, count in zip(chunk, counts, strict=False):
                got = out.setdefault(bucket, set())
                for j in range(at, at + count * ITEM_ID_BYTES, ITEM_ID_BYTES):
                    got.add(ids[j : j + ITEM_ID_BYTES])
                at += count * ITEM_ID_BYTES
            if more is None:
                todo, after = todo[len(chunk) :], None
                continue
            if not isinstance(more, list) or len(more) != 2 or not ids or not counts:
                raise Malformed("bad continuation")
            if wire.integer(more[0], 0, len(chunk), "next") != len(counts) - 1:
                raise Malformed("bad continuation")
            todo = todo[len(counts) - 1 :]
            after = wire.ids(more[1], 1)
        return out

    async def _pull(
        self, call: Callable, items: list[tuple[int, bytes]], result: SyncResult
    ) -> None:
        """The peer's entries for ``items`` ((bucket, item id)), merged here."""
        config, tree = self.config, self.tree
        limit = max(1, min(config.max_items, config.request_bytes // (ITEM_ID_BYTES + 4)))
        start = 0
        while start < len(items):
            chunk = items[start : start + limit]
            reply = await call(
                EXPORT,
                {"buckets": [b for b, _ in chunk], "ids": b"".join(i for _, i in chunk)},
            )
            done = wire.integer(wire.field(reply, "done"), 1, len(chunk) + 1, "done")
            entries = wire.entries(wire.field(reply, "entries"), config)
            asked = {b for b, _ in chunk[:done]}
            if len(entries) > done or any(tree.bucket(k) not in asked for k, _ in entries):
                raise Malformed("an entry not asked for")
            result.pulled += len(entries)
            result.changed_here += self._merge(entries)
            start += done

    async def _push(self, call: Callable, keys: list[bytes], result: SyncResult) -> None:
        start = 0
        while start < len(keys):
            page, start = self._export_page(keys, start, self.config.request_bytes)
            if not page:
                continue
            reply = await call(MERGE, {"entries": page})
            result.pushed += len(page)
            result.changed_there += wire.integer(
                wire.field(reply, "changed"), 0, len(page) + 1, "changed"
            )

    # -- Both sides ---------------------------------------------------------------------------

    def _export_page(self, keys: list[bytes], start: int, budget: int) -> tuple[list[list], int]:
        """Our entries for keys[start:], as many as fit in ``budget`` bytes (at least one);
        and where the next page starts."""
        out: list[list] = []
        size, at, batch = 0, start, self.config.export_batch
        while at < len(keys) and len(out) < self.config.max_items:
            chunk = keys[at : at + batch]
            exported = dict(self.source.export(chunk))
            for k in chunk:
                if k in exported:
                    pair = [k, exported[k]]
                    cost = packed_size(pair)
                    if out and (size + cost > budget or len(out) >= self.config.max_items):
                        return out, at
                    out.append(pair)
                    size += cost
                at += 1
        return out, at

    def _merge(self, entries: list[tuple[bytes, Any]]) -> int:
        """Merge a peer's entries into the store (which keeps the tree up to date, as every
        write does)."""
        if not entries:
            return 0
        try:
            changed = self.source.merge(entries)
        except (ValueError, TypeError) as e:
            raise Malformed(f"entries refused by the store: {e}") from None
        self.counters["keys_repaired"] += changed
        return changed

    # -- Serving ------------------------------------------------------------------------------

    def _serve(self, method: str, fn: Callable[[Any], Any], *, needs_tree: bool) -> None:
        async def handler(source: PeerAddr, args: Any) -> Any:
            self.counters["served"] += 1
            self.counters["bytes_received"] += packed_size([method, args])
            if needs_tree and not self.tree.ready:
                raise RemoteError(errno.EAGAIN, "hash tree still being built")
            try:
                reply = fn(args)
            except Malformed as e:
                self.counters["bad_requests"] += 1
                raise RemoteError(errno.EINVAL, f"{method}: {e}") from None
            self.counters["bytes_sent"] += packed_size(reply)
            return reply

        self.net.register(method, handler)

    def _on_root(self, args: Any) -> dict[str, Any]:
        if wire.field(args, "shape") != self.tree.shape.to_wire():
            raise Malformed("the hash tree shapes differ")
        theirs = wire.tree_hash(wire.field(args, "root"))
        ours = self.tree.root()
        return {"root": ours, "children": None if ours == theirs else self.tree.children(0, 0)}

    def _on_nodes(self, args: Any) -> dict[str, Any]:
        shape = self.tree.shape
        level = wire.integer(wire.field(args, "level"), 0, shape.depth, "level")
        nodes = wire.int_list(wire.field(args, "nodes"), shape.width(level), self.config, "nodes")
        if len(nodes) > self._max_nodes:
            raise Malformed("too many nodes")
        return {"hashes": b"".join(self.tree.children(level, n) for n in nodes)}

    def _on_leaves(self, args: Any) -> dict[str, Any]:
        config, tree = self.config, self.tree
        buckets = wire.int_list(wire.field(args, "buckets"), tree.shape.leaves, config, "buckets")
        after = wire.field(args, "after")
        if after is not None:
            after = wire.ids(after, 1)
        # Per bucket: its item ids, sorted (``after`` continues within the first bucket).
        limit = max(1, min(config.max_items, config.reply_bytes // (ITEM_ID_BYTES + 1)))
        ids: list[bytes] = []
        counts: list[int] = []
        for i, bucket in enumerate(buckets):
            counts.append(0)
            for item in sorted(tree.item_ids(bucket)):
                if i == 0 and after is not None and item <= after:
                    continue
                if len(ids) >= limit:
                    while counts[-1] == 0:  # end the page at the bucket of its last id
                        counts.pop()
                    return {
                        "ids": b"".join(ids),
                        "counts": counts,
                        "next": [len(counts) - 1, ids[-1]],
                    }
                ids.append(item)
                counts[-1] += 1
        return {"ids": b"".join(ids), "counts": counts, "next": None}

    def _on_export(self, args: Any) -> dict[str, Any]:
        config, tree = self.config, self.tree
        buckets = wire.int_list(wire.field(args, "buckets"), tree.shape.leaves, config, "buckets")
        ids = wire.ids(wire.field(args, "ids"), len(buckets))
        keys: list[bytes] = []
        done: list[int] = []  # how many of the asked items are covered by keys[:n]
        cache: dict[int, dict[bytes, bytes]] = {}
        for j, bucket in enumerate(buckets):
            if bucket not in cache:
                cache[bucket] = tree.item_ids(bucket)
            key = cache[bucket].get(ids[j * ITEM_ID_BYTES : (j + 1) * ITEM_ID_BYTES])
            if key is not None:  # None: written or collected since the listing
                keys.append(key)
            done.append(len(keys))
        page, taken = self._export_page(keys, 0, config.reply_bytes)
        # Items answered: all up to the first one whose key did not make it into the page.
        answered = bisect.bisect_right(done, taken) if taken < len(keys) else len(buckets)
        return {"entries": page, "done": max(1, answered) if buckets else 0}

    def _on_merge(self, args: Any) -> dict[str, Any]:
        entries = wire.entries(wire.field(args, "entries"), self.config)
        if sum(len(k) for k, _ in entries) > self.config.request_bytes:
            raise Malformed("entries: too many bytes")
        return {"changed": self._merge(entries)}

    # -- Reporting ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """For ``.dreki/replication``: the tree, the counters, and the last exchange with each
        peer (``at`` in trio seconds)."""
        return {
            "name": self.name,
            "ready": self.tree.ready,
            "keys": len(self.tree),
            "root": self.tree.root().hex(),
            "shape": self.tree.shape.to_wire(),
            "interval": self.config.interval,
            "peers": {
                name: {"at": rec.at, "result": rec.result, **rec.last}
                for name, rec in sorted(self._records.items())
            },
            "counters": dict(self.counters),
        }
