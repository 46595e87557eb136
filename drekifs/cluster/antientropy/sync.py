"""Anti-entropy: compare hash trees with one random peer, repair both sides.

One exchange, driven by the initiator (the responder keeps no state between calls):

1. ``ae2.start``: our root and our sketch of the items (hashtree.Sketch, 60 bytes). The peer
   answers "in sync" when the roots agree (one round trip). When the sketches' difference peels
   (a few items differ) and accounts for the roots' difference, it answers with its entries we
   lack and the elements of ours it lacks: we merge, push those (``ae.merge``), and the
   exchange is over in two round trips. Otherwise it answers with its level-1 hashes.
2. ``ae2.down``: the descent, two levels a round trip: our hashes of one level under the nodes
   that differ; the peer answers a bitmap of the children that differ and its hashes one level
   further down (at depth 4: twice, the second answer naming the differing leaf buckets).
3. ``ae2.leaves``: our short item ids (4 bytes naming a (key, digest) pair) of the differing
   leaf buckets; the peer answers its entries whose ids we lack (pull, merged here), and a
   bitmap of our ids it lacks.
4. ``ae.merge`` (push): our entries the peer lacks, except those whose pair the pull replaced
   here (the peer's version won).

Hashes travel as 4-byte windows of the 16-byte ones (hashtree.SHORT_BYTES), another window each
exchange, so a chance equality (2**-32) lasts one exchange. Bytes grow with the difference: per
differing node 64 bytes (16 children x 4) and two bits, 4 bytes per pair of a differing bucket,
and the differing entries (the winner's side only, for a key newer here: its id goes, the
peer's entry comes back and loses, ours goes). Every message is bounded (config.reply_bytes /
request_bytes) and checked (:mod:`.wire`). A peer that does not know ``ae2.*`` (ENOSYS) gets
the first protocol (``ae.root`` / ``ae.nodes`` / ``ae.leaves`` / ``ae.export``: full hashes,
one level per round trip, then a separate export), which is still served.
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

from drekifs.cluster.antientropy import hashtree, wire
from drekifs.cluster.antientropy.config import AntiEntropyConfig
from drekifs.cluster.antientropy.hashtree import (
    HASH_BYTES,
    ITEM_ID_BYTES,
    SHORT_BYTES,
    WINDOWS,
    HashTree,
)
from drekifs.cluster.antientropy.source import EntrySource
from drekifs.cluster.antientropy.wire import Malformed, packed_size
from drekifs.cluster.net import Network, PeerAddr, PeerUnreachable, RemoteError

log = logging.getLogger(__name__)

ROOT, NODES, LEAVES, EXPORT, MERGE = "ae.root", "ae.nodes", "ae.leaves", "ae.export", "ae.merge"
START, DOWN, LISTING = "ae2.start", "ae2.down", "ae2.leaves"
# Work done between two checkpoints, so the daemon's other tasks (SWIM's acks, FUSE) wait
# milliseconds, not the seconds a page of tiny entries takes (docs/decisions.md, "A busy peer").
MERGE_SLICE = 256  # entries merged into the store: ~9 ms at 34 us an entry
EXPORT_SLICE = 1024  # entries read for a page: ~6 ms at 6 us an entry
LISTING_SLICE = 256  # buckets listed


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
        # ae2.down: a node's grandchildren take fanout**2 * 4 bytes in a reply, at most.
        self._max_down = max(
            1,
            min(
                self.config.max_items,
                self.config.reply_bytes // (shape.fanout * shape.fanout * SHORT_BYTES),
            ),
        )
        # ae2.leaves: short ids in one request (4 bytes, and a count per bucket).
        self._max_ids = max(1, min(self.config.max_items, self.config.request_bytes // 8))
        # One request served at a time: a member that comes back is exchanged with by every
        # peer that sees it, and four listings of 100,000 ids served at once took the loop in
        # steps too long for its acks (bench/busy_peer.py). The others wait their turn.
        self._serving = trio.Semaphore(1)
        self._serve(ROOT, self._on_root, needs_tree=True)
        self._serve(NODES, self._on_nodes, needs_tree=True)
        self._serve(LEAVES, self._on_leaves, needs_tree=True)
        self._serve(EXPORT, self._on_export, needs_tree=False)
        self._serve(MERGE, self._on_merge, needs_tree=False)
        self._serve(START, self._on_start, needs_tree=True)
        self._serve(DOWN, self._on_down, needs_tree=True)
        self._serve(LISTING, self._on_listing, needs_tree=True)

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

    async def sync(
        self, addr: PeerAddr, *, push: bool = True, push_limit: int | None = None
    ) -> SyncResult:
        """One exchange with ``addr``: pull what differs and (``push``) push it back, unless
        the peer lacks more than ``push_limit`` entries (then it is left to pull them itself).
        Raises PeerUnreachable, RemoteError, or Malformed (a reply of the wrong shape)."""
        if not self.tree.ready:
            raise RuntimeError("the hash tree is still being built")
        result = SyncResult(self._name(addr), exchanges=1)
        started = trio.current_time()
        self.counters["syncs"] += 1
        try:
            await self._exchange(addr, result, push, push_limit)
        finally:
            result.seconds = trio.current_time() - started
        self.counters["in_sync" if result.in_sync else "repairs"] += 1
        self._record(result.peer, "in sync" if result.in_sync else "repaired", result)
        if self.on_sync is not None:
            self.on_sync(result)
        return result

    async def _exchange(
        self, addr: PeerAddr, result: SyncResult, push: bool, push_limit: int | None = None
    ) -> None:
        tree, shape = self.tree, self.tree.shape
        call = self._caller(addr, result)
        # Each exchange another window: an equality by chance in one lasts one exchange. (Not
        # drawn from self.rng, whose draws pick the peers.)
        window = self.counters["syncs"] % WINDOWS
        start = {
            "shape": shape.to_wire(),
            "root": tree.root(),
            "w": window,
            "sketch": tree.sketch().to_bytes(),
        }
        try:
            reply = await call(START, start)
        except RemoteError as e:
            if e.code != errno.ENOSYS:
                raise
            self.counters["first_protocol"] += 1  # an older peer
            await self._exchange_v1(call, result, push)
            return
        if isinstance(reply, dict) and "entries" in reply:
            if await self._listed_by_sketch(call, reply, result, push):
                return
            # Not a list of ours (a mix of items that passed for one): descend instead.
            self.counters["sketch_refused"] += 1
            reply = await call(START, {**start, "sketch": None})
        hashes = wire.field(reply, "hashes")
        if hashes is None:
            result.in_sync = True
            return
        # Too many differences for the sketch: descend, two levels a round trip, from the
        # level-1 nodes that differ (``nodes`` at ``level``: ours to send the children of).
        theirs = wire.short_hashes(hashes, shape.fanout)
        level, nodes = 1, self._differing_short(0, [0], theirs, window)
        while level < shape.depth and nodes:
            differing, below = await self._descend(call, window, level, nodes)
            if below is None:
                level, nodes = level + 1, differing
            else:
                level, nodes = level + 2, self._differing_short(level + 1, differing, below, window)
        if not nodes:
            return  # the difference was written away meanwhile
        result.buckets = len(nodes)
        lacking = await self._reconcile(call, window, nodes, result)
        if push and (push_limit is None or len(lacking) <= push_limit):
            await self._push(call, lacking, result)
        elif push:
            self.counters["push_left_to_peer"] += 1

    async def _listed_by_sketch(
        self, call: Callable, reply: Any, result: SyncResult, push: bool
    ) -> bool:
        """The peer peeled the difference from our sketch: its entries we lack are here, and
        the elements of ours it lacks; merge, and push those the pull did not replace. False
        (after the merge) when an element names no item here: the peel was wrong."""
        tree = self.tree
        entries = wire.entries(wire.field(reply, "entries"), self.config)
        width = tree.sketch().element_bytes
        want = wire.elements(wire.field(reply, "want"), width, self.config)
        if len(want) > hashtree.MAX_PEELED:
            raise Malformed("more elements than a sketch lists")
        listed = [tree.key_of(e) for e in want]
        result.pulled += len(entries)
        result.changed_here += await self._merge(entries)
        if None in listed:
            return False
        result.buckets = len({e >> 32 for e in want} | {tree.bucket(k) for k, _ in entries})
        self.counters["sketch_listed"] += 1
        if push:
            # An element whose item is gone here (the peer's version won) names no key now.
            keys = [k for k in map(tree.key_of, want) if k is not None]
            await self._push(call, keys, result)
        return True

    async def _descend(
        self, call: Callable, window: int, level: int, nodes: list[int]
    ) -> tuple[list[int], bytes | None]:
        """Send our short hashes of the children of ``nodes`` (at ``level``), paged; the
        children that differ, and the peer's short hashes of their own children (None when
        those children are leaves)."""
        tree, fanout = self.tree, self.tree.shape.fanout
        last = level + 1 == tree.shape.depth
        differing: list[int] = []
        below: list[bytes] = []
        for at in range(0, len(nodes), self._max_down):
            chunk = nodes[at : at + self._max_down]
            hashes = b"".join(tree.short_children(level, n, window) for n in chunk)
            args = {"w": window, "level": level, "nodes": chunk, "hashes": hashes}
            reply = await call(DOWN, args)
            bits = wire.set_bits(wire.field(reply, "bits"), len(chunk) * fanout)
            children = [chunk[i // fanout] * fanout + i % fanout for i in bits]
            differing.extend(children)
            theirs = wire.field(reply, "hashes")
            if last:
                if theirs is not None:
                    raise Malformed("hashes below leaf buckets")
            else:
                below.append(wire.short_hashes(theirs, len(children) * fanout))
        return differing, None if last else b"".join(below)

    def _differing_short(
        self, level: int, nodes: list[int], theirs: bytes, window: int
    ) -> list[int]:
        """The children of ``nodes`` (at ``level``) whose short hashes differ from ``theirs``."""
        return [c for _, c in _diff_children(self.tree, level, nodes, theirs, window)]

    async def _reconcile(
        self, call: Callable, window: int, buckets: list[int], result: SyncResult
    ) -> list[bytes]:
        """List our short ids of ``buckets`` (paged; a bucket bigger than a request goes in id
        ranges), merge the peer's entries we lack; our keys whose pairs the peer lacks and
        that the pull did not replace here (to push)."""
        tree, limit = self.tree, self._max_ids
        listed: dict[int, list[tuple[bytes, bytes]]] = {}
        for n, b in enumerate(buckets):  # a hash per item: 35,000 buckets took 0.5 s at once
            if n % LISTING_SLICE == LISTING_SLICE - 1:
                await trio.lowlevel.checkpoint()
            listed[b] = sorted(tree.short_ids(b, window))
        lacking: list[bytes] = []
        pos, after = 0, None  # the next request starts at buckets[pos], ids past ``after``
        while pos < len(buckets):
            chunk: list[int] = []
            sent: list[list[tuple[bytes, bytes]]] = []
            count, upto = 0, None
            for b in buckets[pos : pos + self.config.max_items]:
                pairs = listed[b]
                if not chunk and after is not None:
                    pairs = [p for p in pairs if p[0] > after]
                if count + len(pairs) > limit:
                    if chunk:
                        break
                    pairs = pairs[:limit]  # one bucket over a request's ids: a range of it
                    upto = pairs[-1][0]
                chunk.append(b)
                sent.append(pairs)
                count += len(pairs)
                if upto is not None:
                    break
            ids = [pair for pairs in sent for pair in pairs]
            args = {
                "w": window,
                "buckets": chunk,
                "counts": [len(pairs) for pairs in sent],
                "ids": b"".join(i for i, _ in ids),
                "after": after,
                "upto": upto,
            }
            reply = await call(LISTING, args)
            entries = wire.entries(wire.field(reply, "entries"), self.config)
            more = wire.field(reply, "next")
            last = len(chunk) - 1
            if more is None:
                stop, handled = len(chunk), len(ids)
                pos, after = (pos + last, upto) if upto is not None else (pos + len(chunk), None)
            else:
                if not isinstance(more, list) or len(more) != 2 or not entries:
                    raise Malformed("bad continuation")
                stop = wire.integer(more[0], 0, len(chunk), "next")
                cut = None if more[1] is None else wire.short_hashes(more[1], 1)
                if stop == 0 and (cut is None or (after is not None and cut <= after)):
                    raise Malformed("a continuation that makes no progress")
                if stop == last and upto is not None and cut is not None and cut > upto:
                    raise Malformed("a continuation past the range asked")
                handled = sum(map(len, sent[:stop]))
                if cut is not None:
                    handled += sum(1 for i, _ in sent[stop] if i <= cut)
                pos, after = pos + stop, cut
            for i in wire.set_bits(wire.field(reply, "lack"), handled):
                lacking.append(ids[i][1])
            asked = set(chunk[: stop + 1])
            if any(tree.bucket(k) not in asked for k, _ in entries):
                raise Malformed("an entry not asked for")
            result.pulled += len(entries)
            result.changed_here += await self._merge(entries)
        # A pair the pull replaced here (the peer's version won) need not go back.
        return [k for k, i in await _current(tree, lacking, listed, window)]

    async def _exchange_v1(self, call: Callable, result: SyncResult, push: bool) -> None:
        """The first protocol (full hashes, one level per round trip), for older peers."""
        tree, fanout = self.tree, self.tree.shape.fanout
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
        return [c for _, c in _diff_children(self.tree, level, nodes, theirs, None)]

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
            result.changed_here += await self._merge(entries)
            start += done

    async def _push(self, call: Callable, keys: list[bytes], result: SyncResult) -> None:
        start = 0
        while start < len(keys):
            page, start = await self._export_page(keys, start, self.config.request_bytes)
            if not page:
                continue
            reply = await call(MERGE, {"entries": page})
            result.pushed += len(page)
            result.changed_there += wire.integer(
                wire.field(reply, "changed"), 0, len(page) + 1, "changed"
            )

    # -- Both sides ---------------------------------------------------------------------------

    async def _export_page(
        self, keys: list[bytes], start: int, budget: int
    ) -> tuple[list[list], int]:
        """Our entries for keys[start:], as many as fit in ``budget`` bytes (at least one);
        and where the next page starts."""
        out: list[list] = []
        size, at, batch = 0, start, self.config.export_batch
        yielded = start
        while at < len(keys) and len(out) < self.config.max_items:
            if at - yielded >= EXPORT_SLICE:  # a 2 MiB page is ~10^5 tiny entries
                await trio.lowlevel.checkpoint()
                yielded = at
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

    async def _merge(self, entries: list[tuple[bytes, Any]]) -> int:
        """Merge a peer's entries into the store (which keeps the tree up to date, as every
        write does), MERGE_SLICE at a time: a page of tiny entries merged at once held the
        daemon's loop for seconds, and its SWIM acks with it (docs/decisions.md)."""
        changed = 0
        for at in range(0, len(entries), MERGE_SLICE):
            if at:
                await trio.lowlevel.checkpoint()
            try:
                n = self.source.merge(entries[at : at + MERGE_SLICE])
            except (ValueError, TypeError) as e:
                raise Malformed(f"entries refused by the store: {e}") from None
            self.counters["keys_repaired"] += n
            changed += n
        return changed

    # -- Serving ------------------------------------------------------------------------------

    def _serve(self, method: str, fn: Callable[[Any], Awaitable[Any]], *, needs_tree: bool) -> None:
        async def handler(source: PeerAddr, args: Any) -> Any:
            self.counters["served"] += 1
            self.counters["bytes_received"] += packed_size([method, args])
            if needs_tree and not self.tree.ready:
                raise RemoteError(errno.EAGAIN, "hash tree still being built")
            try:
                async with self._serving:
                    reply = await fn(args)
            except Malformed as e:
                self.counters["bad_requests"] += 1
                raise RemoteError(errno.EINVAL, f"{method}: {e}") from None
            self.counters["bytes_sent"] += packed_size(reply)
            return reply

        self.net.register(method, handler)

    async def _on_start(self, args: Any) -> dict[str, Any]:
        tree = self.tree
        if wire.field(args, "shape") != tree.shape.to_wire():
            raise Malformed("the hash tree shapes differ")
        theirs = wire.tree_hash(wire.field(args, "root"))
        window = wire.window(wire.field(args, "w"))
        sketch = wire.field(args, "sketch")  # None: descend (our list was refused)
        if sketch is not None:
            sketch = wire.sketch(sketch, tree.sketch().size)
        ours = tree.root()
        if ours == theirs:
            return {"hashes": None}
        listed = None if sketch is None else await self._list_by_sketch(ours, theirs, sketch)
        if listed is not None:
            return listed
        return {"hashes": tree.short_children(0, 0, window)}

    async def _list_by_sketch(self, ours: bytes, theirs: bytes, sketch: bytes) -> dict | None:
        """Our entries the initiator lacks and the elements of its we lack, when the sketches'
        difference peels, agrees with the roots' (their first 4 bytes differ by the XOR of the
        listed items' ids: a sketch out of step with its tree is not trusted) and every
        element of ours names an item here; None to descend instead."""
        tree = self.tree
        peeled = hashtree.peel(tree.sketch(), sketch)
        if peeled is None or not (peeled[0] or peeled[1]):
            return None
        only_theirs, only_ours = peeled
        if len(only_theirs) > self.config.max_items:
            return None  # a list the initiator may not take: the descent pages it
        account = int.from_bytes(ours[:SHORT_BYTES], "big") ^ int.from_bytes(
            theirs[:SHORT_BYTES], "big"
        )
        for elem in only_theirs + only_ours:
            account ^= elem & 0xFFFFFFFF
        if account:
            return None
        keys = [tree.key_of(e) for e in only_ours]
        if None in keys:
            return None  # not an item of ours: a mix of items passed for one
        page, taken = await self._export_page(keys, 0, self.config.reply_bytes)
        if taken < len(keys):
            return None  # more than one reply holds: the descent pages it
        self.counters["sketch_peeled"] += 1
        width = tree.sketch().element_bytes
        return {"entries": page, "want": b"".join(e.to_bytes(width, "big") for e in only_theirs)}

    async def _on_down(self, args: Any) -> dict[str, Any]:
        shape = self.tree.shape
        window = wire.window(wire.field(args, "w"))
        level = wire.integer(wire.field(args, "level"), 1, shape.depth, "level")
        nodes = wire.int_list(wire.field(args, "nodes"), shape.width(level), self.config, "nodes")
        if len(nodes) > self._max_down:
            raise Malformed("too many nodes")
        hashes = wire.short_hashes(wire.field(args, "hashes"), len(nodes) * shape.fanout)
        return self._compare(level, nodes, hashes, window)

    def _compare(self, level: int, nodes: list[int], theirs: bytes, window: int) -> dict[str, Any]:
        """Which children of ``nodes`` differ from ``theirs``, and our hashes below them."""
        tree = self.tree
        found = _diff_children(tree, level, nodes, theirs, window)
        bits = wire.bitmap([at for at, _ in found], len(nodes) * tree.shape.fanout)
        if level + 1 == tree.shape.depth:
            return {"bits": bits, "hashes": None}
        below = b"".join(tree.short_children(level + 1, c, window) for _, c in found)
        return {"bits": bits, "hashes": below}

    async def _on_listing(self, args: Any) -> dict[str, Any]:
        config, tree = self.config, self.tree
        window = wire.window(wire.field(args, "w"))
        buckets = wire.int_list(wire.field(args, "buckets"), tree.shape.leaves, config, "buckets")
        counts = wire.int_list(wire.field(args, "counts"), config.max_items + 1, config, "counts")
        if len(counts) != len(buckets) or sum(counts) > self._max_ids:
            raise Malformed("counts do not match the buckets")
        ids = wire.short_hashes(wire.field(args, "ids"), sum(counts))
        after, upto = wire.field(args, "after"), wire.field(args, "upto")
        after = None if after is None else wire.short_hashes(after, 1)
        upto = None if upto is None else wire.short_hashes(upto, 1)
        # Per bucket: our pairs they did not list (in id order), and their ids we lack; the
        # first bucket past ``after``, the last up to ``upto``.
        missing: list[tuple[int, bytes, bytes]] = []  # (bucket index, id, key)
        lack: list[list[tuple[int, bytes]]] = []  # per bucket: (position in ids, id)
        at, last = 0, len(buckets) - 1
        for i, (bucket, count) in enumerate(zip(buckets, counts, strict=True)):
            if i % LISTING_SLICE == LISTING_SLICE - 1:
                await trio.lowlevel.checkpoint()
            end = at + count * SHORT_BYTES
            theirs = [ids[j : j + SHORT_BYTES] for j in range(at, end, SHORT_BYTES)]
            if theirs != sorted(theirs):
                raise Malformed("ids not in order")
            low = after if i == 0 else None
            high = upto if i == last else None
            ours = sorted(
                (item, key)
                for item, key in tree.short_ids(bucket, window)
                if (low is None or item > low) and (high is None or item <= high)
            )
            have = {item for item, _ in ours}
            listed = set(theirs)
            missing.extend((i, item, key) for item, key in ours if item not in listed)
            first = at // SHORT_BYTES
            lack.append([(first + n, item) for n, item in enumerate(theirs) if item not in have])
            at = end
        page, taken = await self._export_page([k for _, _, k in missing], 0, config.reply_bytes)
        if taken >= len(missing):
            positions = [p for per in lack for p, _ in per]
            return {"entries": page, "lack": wire.bitmap(positions, sum(counts)), "next": None}
        # The page ended within bucket ``stop``: what is before its first id left is done.
        stop = missing[taken][0]
        before = missing[taken - 1] if taken else None
        cut = before[1] if before is not None and before[0] == stop else None
        positions = [p for per in lack[:stop] for p, _ in per]
        size = sum(counts[:stop])
        if cut is not None:
            positions += [p for p, item in lack[stop] if item <= cut]
            start = sum(counts[:stop]) * SHORT_BYTES
            size += sum(
                1
                for j in range(start, start + counts[stop] * SHORT_BYTES, SHORT_BYTES)
                if ids[j : j + SHORT_BYTES] <= cut
            )
        return {"entries": page, "lack": wire.bitmap(positions, size), "next": [stop, cut]}

    async def _on_root(self, args: Any) -> dict[str, Any]:
        if wire.field(args, "shape") != self.tree.shape.to_wire():
            raise Malformed("the hash tree shapes differ")
        theirs = wire.tree_hash(wire.field(args, "root"))
        ours = self.tree.root()
        return {"root": ours, "children": None if ours == theirs else self.tree.children(0, 0)}

    async def _on_nodes(self, args: Any) -> dict[str, Any]:
        shape = self.tree.shape
        level = wire.integer(wire.field(args, "level"), 0, shape.depth, "level")
        nodes = wire.int_list(wire.field(args, "nodes"), shape.width(level), self.config, "nodes")
        if len(nodes) > self._max_nodes:
            raise Malformed("too many nodes")
        return {"hashes": b"".join(self.tree.children(level, n) for n in nodes)}

    async def _on_leaves(self, args: Any) -> dict[str, Any]:
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
            if i % LISTING_SLICE == LISTING_SLICE - 1:
                await trio.lowlevel.checkpoint()
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

    async def _on_export(self, args: Any) -> dict[str, Any]:
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
        page, taken = await self._export_page(keys, 0, config.reply_bytes)
        # Items answered: all up to the first one whose key did not make it into the page.
        answered = bisect.bisect_right(done, taken) if taken < len(keys) else len(buckets)
        return {"entries": page, "done": max(1, answered) if buckets else 0}

    async def _on_merge(self, args: Any) -> dict[str, Any]:
        entries = wire.entries(wire.field(args, "entries"), self.config)
        if sum(len(k) for k, _ in entries) > self.config.request_bytes:
            raise Malformed("entries: too many bytes")
        return {"changed": await self._merge(entries)}

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


def _diff_children(
    tree: HashTree, level: int, nodes: list[int], theirs: bytes, window: int | None
) -> list[tuple[int, int]]:
    """(position among the nodes' children, child index) of the children of ``nodes`` (at
    ``level``) whose hashes differ from ``theirs`` (``fanout`` hashes a node): the short ones
    of ``window``, or the full ones when it is None (the first protocol)."""
    fanout = tree.shape.fanout
    each = HASH_BYTES if window is None else SHORT_BYTES
    size = fanout * each
    out = []
    for j, node in enumerate(nodes):
        if window is None:
            ours = tree.children(level, node)
        else:
            ours = tree.short_children(level, node, window)
        other = theirs[j * size : (j + 1) * size]
        if ours == other:
            continue
        for c in range(fanout):
            at = c * each
            if ours[at : at + each] != other[at : at + each]:
                out.append((j * fanout + c, node * fanout + c))
    return out


async def _current(
    tree: HashTree, keys: list[bytes], listed: dict[int, list[tuple[bytes, bytes]]], window: int
) -> list[tuple[bytes, bytes]]:
    """(key, short id) of ``keys`` whose pair here is still the one listed."""
    was = {key: item for pairs in listed.values() for item, key in pairs}
    out = []
    for n, key in enumerate(keys):
        if n % EXPORT_SLICE == EXPORT_SLICE - 1:
            await trio.lowlevel.checkpoint()
        digest = tree.get(key)
        if digest is None:
            continue
        now = hashtree.item_hash(key, digest)[window * SHORT_BYTES : (window + 1) * SHORT_BYTES]
        if now == was.get(key):
            out.append((key, now))
    return out
