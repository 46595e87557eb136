"""Plumtree epidemic broadcast (Leitão, Pereira, Rodrigues, "Epidemic Broadcast Trees", 2007)
over any :class:`~drekifs.cluster.net.Network`.

One :class:`Broadcast` per peer. A message is pushed whole to the *eager* neighbours and only
announced (IHAVE, its id) to the *lazy* ones. Every neighbour starts eager, so the first messages
flood; a peer that receives a copy it already has answers PRUNE and the link turns lazy on both
sides. What remains eager is the set of first-arrival links: a spanning tree, shared by every
source, over which later messages cost one push per peer and no duplicates. Repair is lazy: a
peer that hears an IHAVE for a message it lacks waits ``ihave_delay`` for the eager copy, then
GRAFTs the announcer, which pushes it and becomes a tree link. The optimization of section 3.8
swaps a tree link for a lazy one whose IHAVE says it is more than ``optimization_threshold`` hops
closer to the source.

Transport: pushes (eager gossip and answers to GRAFTs, payloads of up to ~1 MiB) are calls of
``plumtree.gossip`` over the reliable stream, answered None; IHAVE, GRAFT and PRUNE are small
datagrams (IHAVE and GRAFT split to fit). Datagrams share the network's single handler with SWIM:
the owner demultiplexes and hands Plumtree's to :meth:`Broadcast.handle_datagram`.

Deviation from the paper: a push that fails (PeerUnreachable) demotes the peer to lazy instead of
dropping it, since a call may fail to a live peer too (a broken connection); the membership,
through :meth:`Broadcast.set_neighbours`, decides who is gone, and a dead lazy peer only costs
lost IHAVE datagrams until then.

Neighbours are a bounded subset of the live members (:mod:`.view`): about ln(n) + 3 of them.
Only trio's clock is read, so a :class:`trio.testing.MockClock` drives it in simulation.
"""

from __future__ import annotations

import collections
import logging
import math
import random
from typing import Any

import trio

from drekifs.cluster.net import Network, PeerAddr, PeerUnreachable, RemoteError, addr_text
from drekifs.cluster.plumtree.config import PlumtreeConfig
from drekifs.cluster.plumtree.messages import (
    GOSSIP_METHOD,
    Graft,
    IHave,
    Malformed,
    Prune,
    check_mid,
    chunk_graft,
    chunk_ihave,
    decode_datagram,
    decode_gossip,
    encode_gossip,
    encode_prune,
    is_plumtree,
)
from drekifs.cluster.plumtree.missing import MissingIds
from drekifs.cluster.plumtree.peers import PeerSets
from drekifs.cluster.plumtree.seen import Seen, SeenIds
from drekifs.cluster.plumtree.store import MessageStore
from drekifs.cluster.plumtree.view import choose_neighbours

log = logging.getLogger(__name__)


class Broadcast:
    """This peer's side of the broadcast tree (see the module docstring).

    ``counters`` (all monotonic): ``broadcasts`` (local), ``datagrams`` (Plumtree's received),
    ``gossip_received`` (pushes received), ``neighbours_added`` / ``neighbours_removed`` (as
    membership changes), ``delivered`` (new messages from peers), ``duplicates`` (copies of a
    message already delivered: each one is answered PRUNE), ``stale`` (copies the store already had
    or found superseded), ``gossip_sent``, ``gossip_failed``, ``gossip_refused``,
    ``gossip_errors`` (a push the transport would not take), ``sends_dropped``,
    ``ihave_sent`` / ``ihave_ids``, ``graft_sent`` / ``graft_ids``, ``graft_served``,
    ``graft_unknown``, ``graft_gave_up``, ``prune_sent``, ``prune_received``, ``optimized``,
    ``missing_full``, ``ihave_dropped``, ``malformed``, ``not_running``, ``store_errors``,
    ``internal_errors`` (a bug: tests assert 0).
    """

    def __init__(
        self,
        name: str,
        net: Network,
        config: PlumtreeConfig,
        store: MessageStore,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.net = net
        self.config = config
        self.store = store
        self.counters: collections.Counter[str] = collections.Counter()
        self._rng = rng if rng is not None else random.Random()
        self._peers = PeerSets()
        self._members = 1
        self._seen = SeenIds(config.seen_ttl, config.max_seen)
        self._missing = MissingIds(config.max_missing, config.max_announcers)
        # Announcements for the next IHAVE batch: (id, our hops, the peer that sent it to us).
        self._ihave_queue: collections.deque[tuple[bytes, int, PeerAddr | None]] = (
            collections.deque()
        )
        self._ihave_ready = trio.Event()
        self._timer_wake: trio.Event | None = None
        self._timer_at = math.inf  # when the graft loop wakes next
        self._sending = 0
        self._nursery: trio.Nursery | None = None
        net.register(GOSSIP_METHOD, self._serve_gossip)

    # -- Public API ---------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled: the IHAVE batches, the graft timers and every push run in
        this task's nursery."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                nursery.start_soon(self._ihave_loop)
                nursery.start_soon(self._graft_loop)
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def broadcast(self, mid: bytes, payload: Any) -> None:
        """Spread a local write (the caller has delivered it to its own store already).
        ValueError for an id that is not 1 to 200 bytes; RuntimeError when not running."""
        try:
            check_mid(mid)
        except Malformed as e:
            raise ValueError(str(e)) from None
        if self._nursery is None:
            raise RuntimeError("Broadcast is not running")
        self.counters["broadcasts"] += 1
        self._missing.received(mid)
        self._seen.add(mid, 0, None, trio.current_time())
        self._forward(mid, 0, payload, None)

    def set_neighbours(self, members: dict[str, PeerAddr]) -> None:
        """The live members, name -> address (this peer may be among them); call again whenever
        the membership changes. The neighbours are chosen among them (:mod:`.view`); new
        neighbours start eager, gone ones are dropped."""
        names = choose_neighbours(self.name, members, self.config.rings(len(members)))
        self._members = len(members.keys() | {self.name})
        added, removed = self._peers.replace({name: members[name] for name in names})
        self.counters["neighbours_added"] += added
        self.counters["neighbours_removed"] += removed

    def handle_datagram(self, source: PeerAddr, msg: Any) -> bool:
        """A datagram from the network: True if it was Plumtree's (handled, or counted as
        malformed), False if it belongs to someone else (SWIM). Never raises, never blocks."""
        if not is_plumtree(msg):
            return False
        self.counters["datagrams"] += 1
        if self._nursery is None:
            self.counters["not_running"] += 1
            return True
        try:
            datagram = decode_datagram(msg)
        except Malformed:
            self.counters["malformed"] += 1
            return True
        try:
            if isinstance(datagram, IHave):
                self._on_ihave(source, datagram)
            elif isinstance(datagram, Graft):
                self._on_graft(source, datagram)
            elif isinstance(datagram, Prune):
                self.counters["prune_received"] += 1
                self._peers.make_lazy(source)
        except Exception:
            # A bug must not take the transport down; tests assert this stays 0.
            self.counters["internal_errors"] += 1
            log.exception("plumtree failed on a datagram from %s", addr_text(source))
        return True

    def stats(self) -> dict[str, Any]:
        """For ``.dreki/replication``: the tree links, the repair in progress, the memory."""
        peers = self._peers
        return {
            "members": self._members,
            "neighbours": len(peers),
            "eager": peers.names(peers.eager),
            "lazy": peers.names(peers.lazy),
            "pending_grafts": len(self._missing),
            "ids_remembered": len(self._seen),
            "ihave_queued": len(self._ihave_queue),
            "sends_in_flight": self._sending,
            "counters": dict(sorted(self.counters.items())),
        }

    @property
    def eager(self) -> list[PeerAddr]:
        return list(self._peers.eager)

    @property
    def lazy(self) -> list[PeerAddr]:
        return list(self._peers.lazy)

    # -- Receiving ----------------------------------------------------------------------------

    async def _serve_gossip(self, source: PeerAddr, args: Any) -> None:
        """A push: handled at once (forwarding is spawned), answered None."""
        self.counters["gossip_received"] += 1
        if self._nursery is None:
            self.counters["not_running"] += 1
            return None
        try:
            gossip = decode_gossip(args)
        except Malformed:
            self.counters["malformed"] += 1
            return None
        try:
            self._receive(source, gossip.mid, gossip.hops + 1, gossip.payload)
        except Exception:
            self.counters["internal_errors"] += 1
            log.exception("plumtree failed on a push from %s", addr_text(source))
        return None

    def _receive(self, source: PeerAddr, mid: bytes, hops: int, payload: Any) -> None:
        now = trio.current_time()
        if self._seen.get(mid, now) is not None:
            # A second copy: the link closes a cycle of the tree. Tell the sender to stop pushing
            # (even a peer we do not count as a neighbour: its view may differ from ours).
            self.counters["duplicates"] += 1
            self._peers.make_lazy(source)
            self._send(source, encode_prune())
            self.counters["prune_sent"] += 1
            return
        self._missing.received(mid)
        try:
            new = self.store.deliver(mid, payload)
        except Exception:
            self.counters["store_errors"] += 1
            log.exception("the store failed to deliver a message from %s", addr_text(source))
            return
        self._seen.add(mid, hops, source, now)
        if not new:
            # Known already (anti-entropy got it first) or superseded: nothing to forward, and
            # the link did nothing wrong.
            self.counters["stale"] += 1
            return
        self.counters["delivered"] += 1
        self._peers.make_eager(source)
        self._forward(mid, hops, payload, source)

    def _on_ihave(self, source: PeerAddr, ihave: IHave) -> None:
        now = trio.current_time()
        deadline = now + self.config.ihave_delay
        for mid, hops in ihave.entries:
            seen = self._seen.get(mid, now)
            if seen is not None:
                self._maybe_optimize(source, mid, hops, seen)
                continue
            if mid in self._missing:
                self._missing.announce(mid, source, hops, deadline)
                continue
            if self._has(mid):
                continue
            if not self._missing.announce(mid, source, hops, deadline):
                self.counters["missing_full"] += 1
                continue
            if deadline < self._timer_at and self._timer_wake is not None:
                self._timer_wake.set()

    def _maybe_optimize(self, source: PeerAddr, mid: bytes, hops: int, seen: Seen) -> None:
        """The lazy link from ``source`` reaches the source more than threshold hops sooner
        than our tree link: swap them (GRAFT without ids, PRUNE the old parent)."""
        parent = seen.parent
        if (
            not self.config.optimize
            or parent is None
            or parent == source
            or hops + 1 + self.config.optimization_threshold >= seen.hops
            or source not in self._peers.lazy
            or parent not in self._peers.eager
        ):
            return
        self.counters["optimized"] += 1
        self._peers.make_eager(source)
        self._send_graft(source, [])
        self._peers.make_lazy(parent)
        self._send(parent, encode_prune())
        self.counters["prune_sent"] += 1
        seen.parent, seen.hops = source, hops + 1

    def _on_graft(self, source: PeerAddr, graft: Graft) -> None:
        self._peers.make_eager(source)
        now = trio.current_time()
        for mid in graft.mids:
            try:
                payload = self.store.get(mid)
            except Exception:
                self.counters["store_errors"] += 1
                log.exception("the store failed to read a message for %s", addr_text(source))
                continue
            if payload is None:
                self.counters["graft_unknown"] += 1
                continue
            self.counters["graft_served"] += 1
            seen = self._seen.get(mid, now)
            self._push(source, encode_gossip(mid, seen.hops if seen is not None else 0, payload))

    # -- Sending ------------------------------------------------------------------------------

    def _forward(self, mid: bytes, hops: int, payload: Any, source: PeerAddr | None) -> None:
        """Push to every eager neighbour but ``source``; announce to the lazy ones (batched)."""
        targets = [addr for addr in self._peers.eager if addr != source]
        # No neighbour is always pushed to first (on the real transport sends queue for bandwidth).
        self._rng.shuffle(targets)
        if targets:
            msg = encode_gossip(mid, hops, payload)
            for addr in targets:
                self._push(addr, msg)
        if len(self._ihave_queue) >= self.config.max_ihave_queue:
            self._ihave_queue.popleft()
            self.counters["ihave_dropped"] += 1
        self._ihave_queue.append((mid, hops, source))
        self._ihave_ready.set()

    def _push(self, to: PeerAddr, msg: dict[str, Any]) -> None:
        if self._nursery is None:
            return
        if self._sending >= self.config.max_sends:
            self.counters["sends_dropped"] += 1
            return
        self._sending += 1
        self._nursery.start_soon(self._push_task, to, msg)

    async def _push_task(self, to: PeerAddr, msg: dict[str, Any]) -> None:
        try:
            await self.net.call(to, GOSSIP_METHOD, msg, timeout=self.config.call_timeout)
            self.counters["gossip_sent"] += 1
        except PeerUnreachable:
            # Lazy, not dropped: the membership says who is gone (see the module docstring).
            self.counters["gossip_failed"] += 1
            self._peers.make_lazy(to)
        except RemoteError:
            self.counters["gossip_refused"] += 1
            self._peers.make_lazy(to)
        except Exception as e:
            # One message the transport would not take (too big, a bug): an error for that
            # message, never for the task group the whole broadcast runs in.
            self.counters["gossip_errors"] += 1
            log.error("plumtree: a push to %s failed: %s", addr_text(to), e)
        finally:
            self._sending -= 1

    def _send(self, to: PeerAddr, msg: dict[str, Any]) -> None:
        try:
            self.net.send_datagram(to, msg)
        except ValueError:
            # Chunking keeps every datagram within the budget: this is a bug.
            self.counters["internal_errors"] += 1
            log.exception("plumtree datagram too big")

    def _send_graft(self, to: PeerAddr, mids: list[bytes]) -> None:
        cfg = self.config
        for msg in chunk_graft(mids, cfg.datagram_budget, cfg.max_ids_per_datagram):
            self._send(to, msg)
            self.counters["graft_sent"] += 1
        self.counters["graft_ids"] += len(mids)

    # -- Loops --------------------------------------------------------------------------------

    async def _ihave_loop(self) -> None:
        """Every batch interval with news: one IHAVE (or a few) per lazy neighbour."""
        cfg = self.config
        while True:
            await self._ihave_ready.wait()
            await trio.sleep(cfg.ihave_batch_interval)
            self._ihave_ready = trio.Event()
            queue, self._ihave_queue = list(self._ihave_queue), collections.deque()
            now = trio.current_time()
            for addr in list(self._peers.lazy):
                # Not to whoever pushed the message to us: it has it.
                entries = [(mid, hops) for mid, hops, source in queue if source != addr]
                if not entries:
                    continue
                for msg in chunk_ihave(entries, cfg.datagram_budget, cfg.max_ids_per_datagram):
                    self._send(addr, msg)
                    self.counters["ihave_sent"] += 1
                self.counters["ihave_ids"] += len(entries)
            self._seen.expire(now)

    async def _graft_loop(self) -> None:
        """The timers of missing messages: GRAFT the next announcer of each one that expired,
        one datagram (or a few) per announcer."""
        cfg = self.config
        while True:
            now = trio.current_time()
            grafts: dict[PeerAddr, list[bytes]] = {}
            for mid, wanted in self._missing.due(now):
                if self._seen.get(mid, now) is not None or self._has(mid):
                    self._missing.received(mid)
                elif wanted.grafts >= cfg.max_graft_attempts:
                    # Anti-entropy will bring it.
                    self.counters["graft_gave_up"] += 1
                    self._missing.received(mid)
                else:
                    addr = wanted.announcers[wanted.grafts % len(wanted.announcers)][0]
                    wanted.grafts += 1
                    self._missing.reschedule(mid, now + cfg.graft_timeout)
                    grafts.setdefault(addr, []).append(mid)
            for addr, mids in grafts.items():
                self._peers.make_eager(addr)
                self._send_graft(addr, mids)
            wake = self._timer_wake = trio.Event()
            self._timer_at = self._missing.next_deadline()
            with trio.move_on_at(self._timer_at):
                await wake.wait()

    def _has(self, mid: bytes) -> bool:
        try:
            return self.store.has(mid)
        except Exception:
            self.counters["store_errors"] += 1
            log.exception("the store failed to look a message up")
            return False
