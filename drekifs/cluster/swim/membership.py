"""SWIM membership with the Lifeguard refinements, over any :class:`~drekifs.cluster.net.Network`.

One :class:`Membership` per peer. Its loops, all in the nursery of :meth:`Membership.run`:

- **probe**: every probe interval, the next member of a shuffled round-robin is pinged; without
  an ack within the probe timeout, ``indirect_checks`` other members are asked to ping it for us
  (and to nack if they get no ack either, Lifeguard); without any ack by the end of the interval
  it is suspected. A suspect member's ping carries the suspicion first, so it can refute at
  once (Lifeguard's buddy system).
- **suspicion timers**: one per suspect member, shrinking with independent confirmations
  (:mod:`.suspicion`); on expiry the member is declared dead.
- **gossip**: every gossip interval while there is news, ``gossip_nodes`` random members get a
  datagram of piggybacked updates (:mod:`.broadcasts`); pings and acks carry news too.
- **push-pull**: a full state exchange with a random member over a reliable call, from time to
  time, and at start with a few seeds (the join) so a new peer learns everybody at once.
- **reconnect**: a dead or never-heard-from member is pushed-pulled now and then, so partitions
  heal and late starters are found.

A member that hears it is suspected or dead refutes with a higher incarnation, saved through
``save_incarnation`` before it is announced, so a peer restarted with its saved incarnation never
reuses one. The peer's own health (:mod:`.awareness`) stretches its probe interval and timeouts
when its probes fail for lack of its own timeliness. Only trio's clock is read (wall-clock time
only for the ``since`` field), so a :class:`trio.testing.MockClock` drives it in simulation.
"""

from __future__ import annotations

import collections
import errno
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio

from drekifs.cluster.net import Network, PeerAddr, PeerUnreachable, RemoteError, addr_text
from drekifs.cluster.swim.awareness import Awareness
from drekifs.cluster.swim.broadcasts import BroadcastQueue
from drekifs.cluster.swim.config import SwimConfig
from drekifs.cluster.swim.messages import (
    ACK,
    GOSSIP,
    NACK,
    PING,
    PING_REQ,
    Alive,
    Datagram,
    Dead,
    Malformed,
    Suspect,
    Update,
    decode_datagram,
    decode_push_pull,
    encode_entry,
    encode_update,
)
from drekifs.cluster.swim.state import GONE_STATES, LIVE_STATES, Member, MemberInfo, State
from drekifs.cluster.swim.suspicion import Suspicion

log = logging.getLogger(__name__)

PUSH_PULL = "swim.pushpull"

SaveIncarnation = Callable[[int], None]
Watcher = Callable[[MemberInfo], None]

# Room for the "u" key (2 bytes) and an array header of up to 65,535 updates (3 bytes).
_UPDATES_OVERHEAD = 5


@dataclass(slots=True)
class _Pending:
    """A ping waiting for its ack: ours, or one sent on behalf of a requester."""

    acked: trio.Event = field(default_factory=trio.Event)
    nacks: int = 0


@dataclass(slots=True)
class _SuspicionTimer:
    """A running suspicion and the cancel scope its timer task sleeps in."""

    suspicion: Suspicion
    incarnation: int
    scope: trio.CancelScope
    cancelled: bool = False  # ended by a refutation or a death, not by the timeout


class Membership:
    """This peer's membership list and failure detector (see the module docstring)."""

    def __init__(
        self,
        name: str,
        net: Network,
        config: SwimConfig,
        *,
        incarnation: int = 0,
        meta: dict[str, Any] | None = None,
        save_incarnation: SaveIncarnation | None = None,
        rng: random.Random | None = None,
        wallclock: Callable[[], float] = time.time,
    ) -> None:
        """``incarnation`` is the last one saved; this life uses the next, saved here at once
        (an exception from ``save_incarnation`` propagates: nothing was announced)."""
        self.name = name
        self.net = net
        self.config = config
        self.watchers: list[Watcher] = []
        self.counters: collections.Counter[str] = collections.Counter()
        self._rng = rng if rng is not None else random.Random()
        self._wallclock = wallclock
        self._save = save_incarnation
        self._awareness = Awareness(config.awareness_max_multiplier)
        self._queue = BroadcastQueue()
        meta = dict(meta or {})
        self._check_meta(meta)
        if save_incarnation is not None:
            save_incarnation(incarnation + 1)
        self._me = Member(name, net.addr, incarnation + 1, State.ALIVE, wallclock(), meta)
        self._members: dict[str, Member] = {name: self._me}
        self._counts: collections.Counter[State] = collections.Counter({State.ALIVE: 1})
        self._names: list[str] = []  # every member but this peer, for random picks
        self._name_index: dict[str, int] = {}
        self._probe_order: list[str] = []
        self._probe_index = 0
        self._seeds: dict[str, PeerAddr] = {}
        self._vanished: set[str] = set()  # gone from DNS: news about them is ignored
        self._seeds_known = trio.Event()
        self._pending: dict[int, _Pending] = {}
        self._seq = self._rng.randrange(1 << 32)
        self._suspicions: dict[str, _SuspicionTimer] = {}
        self._ping_reqs = 0
        self._gossip_wake: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self._leaving = False
        self._announced = False  # preloaded from a view that has this life alive
        net.on_datagram(self._datagram)
        net.register(PUSH_PULL, self._serve_push_pull)

    # -- Public API ---------------------------------------------------------------------------

    @property
    def incarnation(self) -> int:
        """This peer's current incarnation (always saved before it was announced)."""
        return self._me.incarnation

    @property
    def health(self) -> int:
        """Lifeguard's local health score: 0 is healthy, up to awareness_max_multiplier - 1."""
        return self._awareness.score

    def members(self) -> list[MemberInfo]:
        """Every known node, this peer and seeds never heard from ("unknown") included."""
        return [m.info() for m in self._members.values()]

    def state_of(self, name: str) -> str | None:
        """``name``'s state ("unknown", "alive", "suspect", "dead", "left"), None if unknown."""
        member = self._members.get(name)
        return None if member is None else str(member.state)

    def set_seeds(self, seeds: dict[str, PeerAddr]) -> None:
        """The nodes of the DNS world, name -> address; call again when the world changes.

        New names join as "unknown" (never heard from). A name that was a seed and is no
        longer is dropped, and news about it is ignored until DNS names it again. Members
        learned by gossip that DNS never named are kept: this peer's DNS view may be the late one.
        A gone or unknown member's address follows DNS; a live member's address follows its own
        alive messages.
        """
        seeds = {name: (addr[0], addr[1]) for name, addr in seeds.items() if name != self.name}
        for name in self._seeds.keys() - seeds.keys():
            self._drop(name)
            self._vanished.add(name)
        for name, addr in seeds.items():
            self._vanished.discard(name)
            member = self._members.get(name)
            if member is None:
                self._add(Member(name, addr, 0, State.UNKNOWN, self._wallclock(), {}))
            elif member.state not in LIVE_STATES:
                member.addr = addr
        self._seeds = seeds
        self._seeds_known.set()

    def update_meta(self, meta: dict[str, Any]) -> None:
        """Announce new meta (a new incarnation, saved first). ValueError if it is too big;
        an exception from ``save_incarnation`` propagates (then nothing changed)."""
        meta = dict(meta)
        self._check_meta(meta)
        incarnation = self._me.incarnation + 1
        if self._save is not None:
            self._save(incarnation)
        self._me.incarnation = incarnation
        self._me.meta = meta
        self._enqueue(self.name, encode_update(self._alive_of_me()))
        self._notify(self._me)

    def preload(self, members: Iterable[MemberInfo]) -> None:
        """Take ``members`` as known, as if learned from a push-pull, without gossiping them.

        For simulations and benchmarks that start from a converged cluster of thousands of
        peers: converging through the protocol costs O(n^2 log n) messages to simulate.
        """
        states: dict[str, State] = {s: State(s) for s in ("alive", "dead", "left")}
        for info in members:
            state = states.get(info.state)
            if info.name == self.name:
                # The others know this life already: no need to announce it at start.
                self._announced |= info.incarnation == self._me.incarnation
                continue
            if state is None:
                continue
            if info.name in self._members:
                self._drop(info.name)
            addr = (info.addr[0], info.addr[1])
            self._add(Member(info.name, addr, info.incarnation, state, info.since, info.meta))
            if state == State.ALIVE:
                self._probe_order.append(info.name)
        self._rng.shuffle(self._probe_order)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the protocol until cancelled. Datagrams and calls that arrive while it is not
        running are ignored (counted as ``not_running``)."""
        if self._nursery is not None:
            raise RuntimeError("Membership.run is already running")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if not (self._leaving or self._announced):
                    self._enqueue(self.name, encode_update(self._alive_of_me()))
                # Random phases, so peers started together spread out; drawn here, in a fixed
                # order, so a simulation replays the same whatever order trio runs tasks in.
                config, rng = self.config, self._rng
                nursery.start_soon(self._probe_loop, rng.uniform(0, config.probe_interval))
                nursery.start_soon(self._gossip_loop, rng.uniform(0, config.gossip_interval))
                nursery.start_soon(
                    self._push_pull_loop, rng.uniform(0, config.push_pull_period(self._live))
                )
                nursery.start_soon(self._reconnect_loop, rng.uniform(0, config.reconnect_interval))
                nursery.start_soon(self._join)
                task_status.started()
        finally:
            self._nursery = None
            self._suspicions.clear()
            self._pending.clear()

    async def leave(self, timeout: float = 2.0) -> None:
        """Tell the cluster this peer leaves: it becomes "left", not "dead", everywhere.

        Returns once the news was sent its full count of times, or after ``timeout``. The
        peer stops probing and refuting; cancel :meth:`run` afterwards.
        """
        if self._leaving:
            return
        self._leaving = True
        me = self._me
        self._set_state(me, State.LEFT)
        self._notify(me)
        self._enqueue(me.name, encode_update(Dead(me.name, me.incarnation, me.name)))
        if self._nursery is None:
            return
        with trio.move_on_after(timeout):
            self._gossip()  # at once, rather than at the next gossip round
            while me.name in self._queue and self._live > 0:
                await trio.sleep(self.config.gossip_interval / 2)

    # -- Member bookkeeping -------------------------------------------------------------------

    @property
    def _live(self) -> int:
        """Members alive or suspect, this peer included: the cluster size n."""
        return self._counts[State.ALIVE] + self._counts[State.SUSPECT]

    def _now(self) -> float:
        try:
            return trio.current_time()
        except RuntimeError:  # set_seeds or preload before trio runs
            return float("-inf")

    def _add(self, member: Member) -> None:
        self._members[member.name] = member
        self._name_index[member.name] = len(self._names)
        self._names.append(member.name)
        self._counts[member.state] += 1

    def _drop(self, name: str) -> None:
        member = self._members.get(name)
        if member is None or member is self._me:
            return
        del self._members[name]
        self._counts[member.state] -= 1
        # Swap-remove keeps random picks O(1).
        index = self._name_index.pop(name)
        last = self._names.pop()
        if last != name:
            self._names[index] = last
            self._name_index[last] = index
        self._cancel_suspicion(name)
        self._queue.discard(name)

    def _set_state(self, member: Member, state: State) -> bool:
        """Change ``member``'s state; False if it already was ``state``."""
        if member.state == state:
            return False
        self._counts[member.state] -= 1
        self._counts[state] += 1
        member.state = state
        member.since = self._wallclock()
        member.changed_at = self._now()
        return True

    def _notify(self, member: Member) -> None:
        info = member.info()
        for watcher in list(self.watchers):
            try:
                watcher(info)
            except Exception:
                self.counters["watcher_errors"] += 1
                log.exception("membership watcher failed on %s", info)

    def _check_meta(self, meta: dict[str, Any]) -> None:
        if len(msgpack.packb(meta)) > self.config.max_meta_bytes:
            raise ValueError(f"meta exceeds {self.config.max_meta_bytes} bytes packed")

    def _alive_of_me(self) -> Alive:
        return Alive(self.name, self._me.incarnation, self._me.addr, self._me.meta)

    def _persist(self, incarnation: int) -> bool:
        """Save ``incarnation`` before it is announced; False (counted) if saving failed."""
        if self._save is None:
            return True
        try:
            self._save(incarnation)
        except Exception:
            self.counters["save_failed"] += 1
            log.exception("could not save incarnation %d", incarnation)
            return False
        return True

    def _random_members(
        self, k: int, wanted: Callable[[Member], bool], expected: int
    ) -> list[Member]:
        """Up to ``k`` distinct random members that are ``wanted``, ``expected`` being about
        how many are: a few random draws when most are, one scan when few are."""
        names = self._names
        if k <= 0 or not names or expected <= 0:
            return []
        if expected * 4 < len(names):
            pool = [m for m in map(self._members.__getitem__, names) if wanted(m)]
            return self._rng.sample(pool, min(k, len(pool)))
        chosen: dict[str, Member] = {}
        for _ in range(3 * len(names)):
            member = self._members[names[self._rng.randrange(len(names))]]
            if member.name not in chosen and wanted(member):
                chosen[member.name] = member
                if len(chosen) == k:
                    break
        return list(chosen.values())

    # -- Applying news ------------------------------------------------------------------------

    def _apply(self, update: Update) -> None:
        if isinstance(update, Alive):
            self._on_alive(update)
        elif isinstance(update, Suspect):
            self._on_suspect(update)
        else:
            self._on_dead(update)

    def _on_alive(self, alive: Alive) -> None:
        if alive.name == self.name:
            self._on_alive_about_me(alive)
            return
        if alive.name in self._vanished:
            self.counters["vanished_news"] += 1
            return
        member = self._members.get(alive.name)
        if member is not None and member.state != State.UNKNOWN:
            if alive.addr != member.addr:
                gone = member.state in GONE_STATES
                reclaim = self._now() - member.changed_at >= self.config.dead_reclaim
                if not (gone and (reclaim or alive.incarnation > member.incarnation)):
                    # Two nodes claim one name, or stale news of an old address.
                    self.counters["addr_conflicts"] += 1
                    return
            elif alive.incarnation <= member.incarnation:
                return
        if member is None or member.meta != alive.meta:
            try:
                self._check_meta(alive.meta)
            except ValueError:
                self.counters["malformed"] += 1
                return
        if member is None:
            member = Member(alive.name, alive.addr, 0, State.UNKNOWN, self._wallclock(), {})
            self._add(member)
        changed = member.addr != alive.addr or member.meta != alive.meta
        was_live = member.state in LIVE_STATES
        member.addr = alive.addr
        member.meta = alive.meta
        member.incarnation = alive.incarnation
        self._cancel_suspicion(member.name)
        changed |= self._set_state(member, State.ALIVE)
        if not was_live:
            # Probe it within this round rather than after a full one.
            position = self._rng.randint(self._probe_index, len(self._probe_order))
            self._probe_order.insert(position, member.name)
        self._enqueue(member.name, encode_update(alive))
        if changed:
            self._notify(member)

    def _on_alive_about_me(self, alive: Alive) -> None:
        me = self._me
        if self._leaving or alive.incarnation < me.incarnation:
            return
        if alive.incarnation == me.incarnation and (alive.addr, alive.meta) == (me.addr, me.meta):
            return  # our own news, coming back
        # A life of ours we do not know: a previous run whose incarnation was not saved, or
        # another node using our name. Either way, this life must be the newest.
        self._refute(alive.incarnation)

    def _on_suspect(self, suspect: Suspect) -> None:
        member = self._members.get(suspect.name)
        if member is None or member.state == State.UNKNOWN:
            return
        if suspect.incarnation < member.incarnation:
            return  # about a life already refuted
        timer = self._suspicions.get(suspect.name)
        if timer is not None and suspect.incarnation > timer.incarnation:
            # A later life is suspected: the member refuted the running suspicion (we missed its
            # alive message). Counting this as a confirmation would kill the later life on the
            # earlier one's clock; start over on the new incarnation instead.
            self._cancel_suspicion(suspect.name)
            self.counters["suspicions_superseded"] += 1
            member.incarnation = suspect.incarnation
            self._start_suspicion(member, suspect.accuser)
            self._enqueue(suspect.name, encode_update(suspect))
            self._notify(member)
            return
        if timer is not None:
            if timer.suspicion.confirm(suspect.accuser):
                self.counters["confirmations"] += 1
                # Pass it on: others count independent accusers too.
                self._enqueue(suspect.name, encode_update(suspect))
                if timer.suspicion.deadline <= self._now():
                    # Due already: expire now rather than race the timer task at this instant.
                    self._expire(suspect.name, timer)
                else:
                    timer.scope.deadline = timer.suspicion.deadline
            return
        if member.state != State.ALIVE:
            return
        if member is self._me:
            self._refute(suspect.incarnation)
            return
        if self._nursery is None:
            return
        member.incarnation = suspect.incarnation
        self._set_state(member, State.SUSPECT)
        self._start_suspicion(member, suspect.accuser)
        self.counters["suspicions"] += 1
        self._enqueue(suspect.name, encode_update(suspect))
        self._notify(member)

    def _on_dead(self, dead: Dead) -> None:
        member = self._members.get(dead.name)
        if member is None or member.state == State.UNKNOWN:
            return
        if dead.incarnation < member.incarnation:
            return
        if member is self._me:
            if not self._leaving:
                self._refute(dead.incarnation)
            return
        if member.state in GONE_STATES and not (member.state == State.DEAD and dead.left):
            return  # already gone (a leave may still correct a death: it was intended)
        self._cancel_suspicion(dead.name)
        member.incarnation = dead.incarnation
        self._set_state(member, State.LEFT if dead.left else State.DEAD)
        self.counters["leaves" if dead.left else "deaths"] += 1
        self._enqueue(dead.name, encode_update(dead))
        self._notify(member)

    def _refute(self, accused: int) -> None:
        """Someone believes an incarnation of ours ``accused`` is suspect, dead or not ours:
        announce a newer one (saved first; if saving fails, stay silent)."""
        incarnation = max(self._me.incarnation, accused) + 1
        if not self._persist(incarnation):
            return
        self._me.incarnation = incarnation
        # Lifeguard: being accused hints that we are the slow one.
        self._awareness.apply(1)
        self.counters["refutations"] += 1
        self._enqueue(self.name, encode_update(self._alive_of_me()))

    # -- Suspicion timers ---------------------------------------------------------------------

    def _start_suspicion(self, member: Member, accuser: str) -> None:
        assert self._nursery is not None
        n = self._live
        low, high = self.config.suspicion_timeouts(n)
        # Lifeguard's local health, applied to the suspicion too: a peer that knows it is slow
        # hears refutations late, by as much as it answers late, so it waits as much longer as
        # it stretches its probe interval (added, not multiplied: a peer cut from part of the
        # cluster also loses health, and must still see that part dead in bounded time).
        extra = self._awareness.scale(self.config.probe_interval) - self.config.probe_interval
        low, high = low + extra, high + extra
        suspicion = Suspicion(accuser, self.config.suspicion_k(n), low, high, self._now())
        timer = _SuspicionTimer(
            suspicion, member.incarnation, trio.CancelScope(deadline=suspicion.deadline)
        )
        self._suspicions[member.name] = timer
        self._nursery.start_soon(self._suspicion_timeout, member.name, timer)

    async def _suspicion_timeout(self, name: str, timer: _SuspicionTimer) -> None:
        # Confirmations move the scope's deadline; a refutation cancels it.
        with timer.scope:
            await trio.sleep_forever()
        self._expire(name, timer)

    def _expire(self, name: str, timer: _SuspicionTimer) -> None:
        """The suspicion's time is up: unless refuted meanwhile, the member is dead."""
        if timer.cancelled or self._suspicions.get(name) is not timer:
            return
        del self._suspicions[name]
        timer.cancelled = True  # the timer task, if still sleeping, must not expire it again
        timer.scope.cancel()
        member = self._members.get(name)
        if (
            member is not None
            and member.state == State.SUSPECT
            and member.incarnation == timer.incarnation
        ):
            self.counters["suspicion_timeouts"] += 1
            self._on_dead(Dead(name, member.incarnation, self.name))

    def _cancel_suspicion(self, name: str) -> None:
        timer = self._suspicions.pop(name, None)
        if timer is not None:
            timer.cancelled = True
            timer.scope.cancel()

    # -- Datagrams ----------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & ((1 << 63) - 1)
        return self._seq

    def _enqueue(self, name: str, update: dict[str, Any]) -> None:
        self._queue.push(name, update)
        if self._gossip_wake is not None:
            self._gossip_wake.set()

    def _take_updates(self, budget: int) -> list[dict[str, Any]]:
        return self._queue.take(budget, self.config.retransmit_limit(self._live))

    def _send(self, to: PeerAddr, msg: dict[str, Any], first: Update | None = None) -> None:
        """Send ``msg`` with as much news piggybacked as fits (``first`` before the rest)."""
        budget = self.config.datagram_budget - len(msgpack.packb(msg)) - _UPDATES_OVERHEAD
        updates = []
        if first is not None:
            encoded = encode_update(first)
            updates.append(encoded)
            budget -= len(msgpack.packb(encoded))
        updates.extend(self._take_updates(budget))
        if updates:
            msg["u"] = updates
        self.net.send_datagram(to, msg)

    def _datagram(self, source: PeerAddr, raw: Any) -> None:
        """Every datagram from the network: checked, its news applied, then answered."""
        self.counters["datagrams"] += 1
        if self._nursery is None:
            self.counters["not_running"] += 1
            return
        try:
            datagram = decode_datagram(raw)
        except Malformed:
            self.counters["malformed"] += 1
            return
        try:
            # News first: a suspect member pinged with its suspicion refutes in its ack.
            for update in datagram.updates:
                self._apply(update)
            self._answer(source, datagram)
        except Exception:
            # A bug must not take the transport down; tests assert this stays 0.
            self.counters["internal_errors"] += 1
            log.exception("membership failed on a datagram from %s", addr_text(source))

    def _answer(self, source: PeerAddr, datagram: Datagram) -> None:
        kind = datagram.kind
        if kind == PING:
            if datagram.target != self.name:
                # Meant for a node that had this address before us.
                self.counters["misdirected"] += 1
                return
            self._send(source, {"t": ACK, "s": datagram.seq})
        elif kind in (ACK, NACK):
            assert datagram.seq is not None
            pending = self._pending.get(datagram.seq)
            if pending is None:
                self.counters["late_" + kind + "s"] += 1
            elif kind == ACK:
                pending.acked.set()
            else:
                pending.nacks += 1
                self.counters["nacks"] += 1
        elif kind == PING_REQ:
            self._serve_ping_req(source, datagram)

    # -- Probing ------------------------------------------------------------------------------

    def _next_probe_target(self) -> Member | None:
        """The next live member in this round's shuffled order (a new round when it ends)."""
        for _ in range(len(self._probe_order) + 2):
            if self._probe_index >= len(self._probe_order):
                self._probe_order = [
                    name for name in self._names if self._members[name].state in LIVE_STATES
                ]
                self._rng.shuffle(self._probe_order)
                self._probe_index = 0
                if not self._probe_order:
                    return None
            name = self._probe_order[self._probe_index]
            self._probe_index += 1
            member = self._members.get(name)
            if member is not None and member.state in LIVE_STATES:
                return member
        return None

    async def _probe_loop(self, phase: float) -> None:
        interval = self.config.probe_interval
        await trio.sleep(phase)
        while True:
            start = trio.current_time()
            target = None if self._leaving else self._next_probe_target()
            if target is not None:
                await self._probe(target)
            await trio.sleep_until(start + self._awareness.scale(interval))

    async def _probe(self, target: Member) -> None:
        """One SWIM probe of ``target``: ping, then indirect pings, else suspect it."""
        config = self.config
        name, incarnation = target.name, target.incarnation
        start = trio.current_time()
        deadline = start + self._awareness.scale(config.probe_interval)
        seq = self._next_seq()
        pending = self._pending[seq] = _Pending()
        helpers: list[Member] = []
        try:
            buddy = None
            if target.state == State.SUSPECT:
                buddy = Suspect(name, incarnation, self.name)
            self._send(target.addr, {"t": PING, "s": seq, "n": name}, first=buddy)
            self.counters["probes"] += 1
            with trio.move_on_at(start + self._awareness.scale(config.probe_timeout)):
                await pending.acked.wait()
            if pending.acked.is_set():
                self.counters["acks"] += 1
                self._awareness.apply(-1)
                return
            helpers = self._random_members(
                config.indirect_checks,
                lambda m: m.state == State.ALIVE and m.name != name,
                self._counts[State.ALIVE] - 2,
            )
            # Helpers nack after 80% of what is left, so the nacks arrive before our deadline.
            nack_wait = min(
                self._awareness.scale(config.probe_timeout),
                0.8 * (deadline - trio.current_time()),
            )
            request = {"t": PING_REQ, "s": seq, "n": name, "a": list(target.addr)}
            request["w"] = max(1, int(nack_wait * 1000))
            for helper in helpers:
                self._send(helper.addr, dict(request))
                self.counters["ping_reqs"] += 1
            with trio.move_on_at(deadline):
                await pending.acked.wait()
            if pending.acked.is_set():
                self.counters["indirect_acks"] += 1
                self._awareness.apply(-1)
                return
        finally:
            del self._pending[seq]
        # Lifeguard: helpers that did not even nack point at our own links, not the target's.
        missed = len(helpers) - pending.nacks if helpers else 1
        self._awareness.apply(missed)
        self.counters["probe_failures"] += 1
        if not self._leaving:
            self._on_suspect(Suspect(name, incarnation, self.name))

    def _serve_ping_req(self, requester: PeerAddr, datagram: Datagram) -> None:
        assert self._nursery is not None
        if self._ping_reqs >= self.config.max_ping_reqs:
            self.counters["ping_reqs_dropped"] += 1
            return
        self._ping_reqs += 1
        self.counters["ping_reqs_served"] += 1
        self._nursery.start_soon(self._relay_ping, requester, datagram)

    async def _relay_ping(self, requester: PeerAddr, request: Datagram) -> None:
        """Ping ``request.target`` for ``requester``: forward its ack, or nack in time."""
        assert request.target_addr is not None and request.target is not None
        try:
            seq = self._next_seq()
            pending = self._pending[seq] = _Pending()
            try:
                self._send(request.target_addr, {"t": PING, "s": seq, "n": request.target})
                wait = request.nack_wait or self._awareness.scale(self.config.probe_timeout)
                with trio.move_on_after(wait):
                    await pending.acked.wait()
            finally:
                self._pending.pop(seq, None)
            if pending.acked.is_set():
                self._send(requester, {"t": ACK, "s": request.seq})
            elif request.nack_wait:
                self.net.send_datagram(requester, {"t": NACK, "s": request.seq})
        finally:
            self._ping_reqs -= 1

    # -- Gossip -------------------------------------------------------------------------------

    def _gossip(self) -> None:
        """One gossip round: news to a few live or recently dead members."""
        config = self.config
        now = self._now()

        def wanted(member: Member) -> bool:
            if member.state in LIVE_STATES:
                return True
            return (
                member.state == State.DEAD and now - member.changed_at < config.gossip_to_the_dead
            )

        expected = self._live - 1 + self._counts[State.DEAD]
        for member in self._random_members(config.gossip_nodes, wanted, expected):
            updates = self._take_updates(config.datagram_budget - 16)
            if not updates:
                return
            self.net.send_datagram(member.addr, {"t": GOSSIP, "u": updates})
            self.counters["gossips"] += 1

    async def _gossip_loop(self, phase: float) -> None:
        interval = self.config.gossip_interval
        tick = trio.current_time() + phase
        while True:
            if not self._queue:
                # Nothing to say: sleep until there is, then resume on this peer's beat.
                self._gossip_wake = trio.Event()
                await self._gossip_wake.wait()
                self._gossip_wake = None
                late = trio.current_time() - tick
                if late > 0:
                    tick += math.ceil(late / interval) * interval
            await trio.sleep_until(tick)
            self._gossip()
            tick += interval

    # -- Push-pull ----------------------------------------------------------------------------

    def _state(self) -> list[list]:
        return [
            encode_entry(m.name, m.addr, m.incarnation, m.state, m.meta)
            for m in self._members.values()
            if m.state != State.UNKNOWN
        ]

    def _merge(self, updates: list[Update]) -> None:
        for update in updates:
            self._apply(update)

    async def _push_pull(self, addr: PeerAddr, *, join: bool = False) -> bool:
        """Exchange full states with the peer at ``addr``; False if it did not answer."""
        self.counters["push_pulls"] += 1
        request = {"n": self.name, "j": join, "m": self._state()}
        try:
            reply = await self.net.call(
                addr, PUSH_PULL, request, timeout=self.config.push_pull_timeout
            )
        except (PeerUnreachable, RemoteError):
            self.counters["push_pulls_failed"] += 1
            return False
        try:
            _, _, updates = decode_push_pull(reply)
        except Malformed:
            self.counters["malformed"] += 1
            return False
        self._merge(updates)
        return True

    async def _serve_push_pull(self, source: PeerAddr, args: Any) -> dict[str, Any]:
        if self._nursery is None:
            self.counters["not_running"] += 1
            raise RemoteError(errno.EAGAIN, "membership not running")
        try:
            _, _, updates = decode_push_pull(args)
        except Malformed as e:
            self.counters["malformed"] += 1
            raise RemoteError(errno.EINVAL, f"malformed push-pull: {e}") from None
        self.counters["push_pulls_served"] += 1
        # Merge before answering: if the caller believes us dead, the reply carries our
        # refutation, and the caller learns it in this same exchange.
        self._merge(updates)
        return {"n": self.name, "m": self._state()}

    async def _push_pull_loop(self, phase: float) -> None:
        config = self.config
        await trio.sleep(phase)
        while True:
            peers = self._random_members(
                1, lambda m: m.state == State.ALIVE, self._counts[State.ALIVE] - 1
            )
            if peers and not self._leaving:
                await self._push_pull(peers[0].addr)
            await trio.sleep(config.push_pull_period(self._live))

    async def _reconnect_loop(self, phase: float) -> None:
        config = self.config
        await trio.sleep(phase)
        while True:
            lost = self._random_members(
                1,
                lambda m: m.state in (State.DEAD, State.UNKNOWN),
                self._counts[State.DEAD] + self._counts[State.UNKNOWN],
            )
            if lost and not self._leaving:
                self.counters["reconnects"] += 1
                await self._push_pull(lost[0].addr)
            await trio.sleep(config.reconnect_interval)

    async def _join(self) -> None:
        """Push-pull with a few seeds at once, batch after batch until one answers."""
        await self._seeds_known.wait()
        if self._live > 1:
            return  # a view to start from already (preloaded): the periodic push-pull will do
        config = self.config
        seeds = [self._members[name] for name in self._seeds if name in self._members]
        self._rng.shuffle(seeds)
        for round_ in range(config.join_rounds):
            batch = seeds[round_ * config.join_fanout : (round_ + 1) * config.join_fanout]
            if not batch or self._leaving:
                return
            answered = 0

            async def one(addr: PeerAddr) -> None:
                nonlocal answered
                answered += await self._push_pull(addr, join=True)

            async with trio.open_nursery() as nursery:
                for seed in batch:
                    nursery.start_soon(one, seed.addr)
            if answered:
                self.counters["joins"] += 1
                return
