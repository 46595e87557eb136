"""An in-memory network for simulations: many peers in one trio run, on trio's clock.

:class:`SimWorld` is the medium: it hands out one :class:`SimNetwork` (the
:class:`~drekifs.cluster.net.Network` of one peer) per address and models

- **loss**: each datagram is lost with probability ``loss``, plus what a one-way lossy link
  (:meth:`SimWorld.set_link_loss`) and bursts (``bursts``, a :class:`GilbertElliott` chain per
  directed link) add. Calls behave like a reliable stream: a leg that would be lost is
  retransmitted after ``CALL_RTO``; they only fail on a partition or a crash;
- **delay**: each datagram, and each leg of a call, takes a random time in ``delay`` (uniform),
  or from ``latency`` (a :class:`LogNormal`: a long tail), plus half the round trip between
  the regions of its ends (:meth:`SimWorld.place`), plus its bytes over the sender's
  ``bandwidth`` (one queue per sender);
- **processing**: a receiving peer handles one message at a time, each costing
  ``handler_cost`` (seconds per message, per byte; measured from the real handlers), so a busy
  peer delays its answers; a slow peer (:meth:`SimWorld.set_slow`) handles every message that
  many seconds late, as a peer whose event loop is held up by other work;
- **partitions**: :meth:`SimWorld.partition` cuts groups of addresses from each other, also
  what is already in flight;
- **crashes and restarts**: :meth:`SimWorld.crash` cancels the tasks a peer runs through
  :meth:`SimWorld.start_soon` and makes its messages vanish, those in flight included;
  :meth:`SimWorld.network` gives the address a fresh network again (a restart).

Every message goes through msgpack, as on the wire: the receiver gets a copy, values that do not
encode fail at the sender, and a datagram that would not fit in ``MAX_DATAGRAM`` once sealed
raises ValueError, as the real transport does.

It is deterministic for a seed: whether a datagram is lost and how long it takes are derived from
a keyed hash of (seed, sender, receiver, send time, bytes), never from a shared random stream, so
trio's shuffling of tasks runnable at the same instant does not change any message's fate;
deliveries and handling happen in one task, in order of (time, send order); a link's bursts are
a function of time alone.
Use it under ``trio.testing.MockClock(autojump_threshold=0)``: simulated time then passes as fast
as the CPU allows.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import heapq
import math
import random
import statistics
import struct
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgpack
import trio

from drekifs.cluster.net import (
    MAX_DATAGRAM,
    SEAL_OVERHEAD,
    CallHandler,
    DatagramHandler,
    PeerAddr,
    PeerUnreachable,
    RemoteError,
)

# What a peer's CPU spends on one message it receives: a sealed PING opened, decoded, handled and
# its ACK encoded and sealed took 12.8 us, a push-pull of 2,710 bytes 37.5 ns per byte each way
# (bench/swim_handler_cost.py, this VM).
HANDLER_COST = (12.8e-6, 37.5e-9)
CALL_RTO = 0.2  # s: a lost segment of a call is sent again after TCP's minimum timeout (Linux)
WIRE_OVERHEAD = SEAL_OVERHEAD + 28  # bytes on the link besides the message: seal, IPv4 + UDP


@dataclass(frozen=True, slots=True)
class LogNormal:
    """Link delays with a long tail: ``floor + median * exp(sigma * Z)``, Z standard normal,
    capped at ``cap`` seconds (sigma 0.5: p99 about 3.2x the median)."""

    median: float
    sigma: float = 0.5
    floor: float = 0.0
    cap: float = 5.0

    def draw(self, uniform: float) -> float:
        z = _NORMAL.inv_cdf(min(max(uniform, 1e-12), 1 - 1e-12))
        return min(self.floor + self.median * math.exp(self.sigma * z), self.cap)


@dataclass(frozen=True, slots=True)
class GilbertElliott:
    """Bursty loss at each peer's link, one chain its way out, one its way in: a good state and
    a bad one, held for exponentially distributed times of mean ``mean_good`` and ``mean_bad``
    seconds, losing ``loss_good`` and ``loss_bad`` of the datagrams through them. A datagram
    crosses two ends; the default loses 0.5% at each (about 1% a datagram) in bursts of about
    0.5 s that lose half, as a congested host or a fading link does: every path to a peer
    suffers at once, so indirect probes do not route around it."""

    mean_good: float = 49.5
    mean_bad: float = 0.5
    loss_good: float = 0.0
    loss_bad: float = 0.5

    @property
    def average(self) -> float:
        """The long-run fraction of datagrams lost at one end."""
        total = self.mean_good + self.mean_bad
        return (self.mean_good * self.loss_good + self.mean_bad * self.loss_bad) / total


_NORMAL = statistics.NormalDist()


def addr_of(index: int) -> PeerAddr:
    """The simulated address of peer number ``index`` (10.x.y.z, one port)."""
    return (f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}", 7946)


Tap = Callable[[float, PeerAddr, PeerAddr, str, Any], None]


def _copy(data: bytes) -> Any:
    # Not strict about map keys: let the protocol see (and reject) whatever a peer could send.
    return msgpack.unpackb(data, strict_map_key=False)


class SimNetwork:
    """One peer's network in a :class:`SimWorld`."""

    def __init__(self, world: SimWorld, addr: PeerAddr) -> None:
        self.addr = addr
        self.crashed = False
        self.busy_until = -math.inf  # when this peer's CPU is done with what it was given
        self.sending_until = -math.inf  # when its link has sent what it was given
        self._world = world
        self._on_datagram: DatagramHandler | None = None
        self._methods: dict[str, CallHandler] = {}

    def send_datagram(self, to: PeerAddr, msg: Any) -> None:
        data = msgpack.packb(msg)
        if len(data) + SEAL_OVERHEAD > MAX_DATAGRAM:
            raise ValueError(f"datagram of {len(data)} bytes does not fit in {MAX_DATAGRAM}")
        self._world._send(self, to, data, msg)

    def on_datagram(self, handler: DatagramHandler) -> None:
        self._on_datagram = handler

    def register(self, method: str, handler: CallHandler, *, inline: bool = False) -> None:
        self._methods[method] = handler

    async def call(self, to: PeerAddr, method: str, args: Any, *, timeout: float) -> Any:
        """The handler runs in the caller's task (the callee's side cannot crash mid-call)."""
        world = self._world
        request = msgpack.packb(args)
        world.stats["calls"] += 1
        if world.tap is not None:
            world.tap(trio.current_time(), self.addr, to, method, args)
        draws = world._fate(self.addr, to, method.encode() + request)
        with trio.move_on_after(timeout):
            await trio.sleep_until(world._arrival(self, to, len(request), draws[0], draws[1]))
            callee = world._reachable(self, to)
            if callee is not None:
                await trio.sleep_until(world._handled(callee, trio.current_time(), len(request)))
                callee = world._reachable(self, to)
            if callee is not None:
                handler = callee._methods.get(method)
                reply: bytes | None = None
                error: RemoteError | None = None
                if handler is None:
                    error = RemoteError(errno.ENOSYS, f"no method {method}")
                else:
                    try:
                        reply = msgpack.packb(await handler(self.addr, _copy(request)))
                    except RemoteError as e:
                        error = e
                    except Exception as e:
                        world.stats["call_errors"] += 1
                        error = RemoteError(errno.EIO, f"{type(e).__name__}: {e}")
                size = len(reply) if reply is not None else 64
                await trio.sleep_until(world._arrival(callee, self.addr, size, draws[2], draws[3]))
                await trio.sleep_until(world._handled(self, trio.current_time(), size))
                if world._reachable(callee, self.addr) is self:
                    if error is not None:
                        raise error
                    assert reply is not None
                    return _copy(reply)
            # Lost in a partition or with a crashed peer: nothing comes back.
            await trio.sleep_forever()
        world.stats["calls_unreachable"] += 1
        raise PeerUnreachable(f"{to[0]}:{to[1]} did not answer {method} in {timeout} s")


class SimWorld:
    """The simulated medium between peers; an async context manager that runs deliveries.

    ``loss`` (0..1), ``delay`` ((low, high) seconds), ``latency`` (replaces ``delay`` when set),
    ``bursts``, ``bandwidth`` (bytes per second a peer's link sends; None: no limit) and
    ``handler_cost`` ((seconds per message, seconds per byte) of the receiver's CPU) may be
    changed at any time. ``tap``, if set, is called with (time, from, to, kind, message) for
    every datagram sent (kind "datagram") and call made (kind: the method), lost ones included:
    tests read the traffic.
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        loss: float = 0.0,
        delay: tuple[float, float] = (0.0002, 0.002),
        latency: LogNormal | None = None,
        bursts: GilbertElliott | None = None,
        bandwidth: float | None = None,
        handler_cost: tuple[float, float] = HANDLER_COST,
    ) -> None:
        self.seed = seed
        self._key = hashlib.blake2b(str(seed).encode(), digest_size=32).digest()
        self.loss = loss
        self.delay = delay
        self.latency = latency
        self.bursts = bursts
        self.bandwidth = bandwidth
        self.handler_cost = handler_cost
        self.tap: Tap | None = None
        self._slow: dict[PeerAddr, float] = {}
        self._link_loss: dict[tuple[PeerAddr, PeerAddr], float] = {}
        self._regions: dict[PeerAddr, int] = {}
        self._region_rtt: dict[tuple[int, int], float] = {}
        self._rtt_range = (0.05, 0.15)
        self._burst_state: dict[tuple[PeerAddr, str], list[Any]] = {}
        self.stats: Counter[str] = Counter()
        self._nets: dict[PeerAddr, SimNetwork] = {}
        self._lives: Counter[PeerAddr] = Counter()
        self._scopes: dict[PeerAddr, list[trio.CancelScope]] = {}
        self._groups: dict[PeerAddr, int] = {}
        # (due, order, sender, receiver, bytes, handled): arrivals, then their handling
        self._heap: list[tuple[float, int, SimNetwork, PeerAddr, bytes, bool]] = []
        self._sent = 0
        self._next_due = math.inf
        self._wake: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    async def __aenter__(self) -> SimWorld:
        self._stack = contextlib.AsyncExitStack()
        self._nursery = await self._stack.enter_async_context(trio.open_nursery())
        self._nursery.start_soon(self._deliver_loop)
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        assert self._stack is not None and self._nursery is not None
        self._nursery.cancel_scope.cancel()  # every peer's tasks and the deliveries
        try:
            return await self._stack.__aexit__(*exc_info)
        finally:
            self._nursery = None

    # -- Peers --------------------------------------------------------------------------------

    def rng(self, label: str) -> random.Random:
        """A random stream for ``label`` derived from the world's seed (for the peers' own
        random choices: reproducible whatever else draws random numbers)."""
        return random.Random(f"{self.seed}/{label}")

    def network(self, addr: PeerAddr) -> SimNetwork:
        """A new network for ``addr``: a peer's first start, or its restart after a crash."""
        current = self._nets.get(addr)
        if current is not None and not current.crashed:
            raise ValueError(f"{addr} is already up")
        self._lives[addr] += 1
        net = SimNetwork(self, addr)
        self._nets[addr] = net
        return net

    def start_soon(self, addr: PeerAddr, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``fn(*args)`` as one of ``addr``'s tasks: a crash of ``addr`` cancels it."""
        if self._nursery is None:
            raise RuntimeError("the SimWorld is not running (use it as 'async with')")
        scope = trio.CancelScope()
        self._scopes.setdefault(addr, []).append(scope)

        async def peer_task() -> None:
            with scope:
                await fn(*args)

        self._nursery.start_soon(peer_task)

    def crash(self, addr: PeerAddr) -> None:
        """``addr`` stops dead: its tasks are cancelled, its messages vanish."""
        net = self._nets.get(addr)
        if net is not None:
            net.crashed = True
        for scope in self._scopes.pop(addr, []):
            scope.cancel()
        self.stats["crashes"] += 1

    def is_up(self, addr: PeerAddr) -> bool:
        net = self._nets.get(addr)
        return net is not None and not net.crashed

    def partition(self, *groups: Iterable[PeerAddr]) -> None:
        """Cut each group from the others (replacing any partition); addresses in no group
        still reach everyone."""
        self._groups = {addr: i for i, group in enumerate(groups) for addr in group}

    def heal(self) -> None:
        """End every partition."""
        self._groups = {}

    def set_slow(self, addr: PeerAddr, seconds: float) -> None:
        """``addr`` handles every message it receives ``seconds`` late (0: on time again)."""
        if seconds > 0:
            self._slow[addr] = seconds
        else:
            self._slow.pop(addr, None)

    def set_link_loss(self, source: PeerAddr, to: PeerAddr, loss: float) -> None:
        """Datagrams from ``source`` to ``to`` (that way only) are lost with ``loss`` more."""
        if loss > 0:
            self._link_loss[(source, to)] = loss
        else:
            self._link_loss.pop((source, to), None)

    def place(self, regions: dict[PeerAddr, int], rtt: tuple[float, float] = (0.05, 0.15)) -> None:
        """Put addresses in regions: between two regions a message takes half a round trip
        more, the round trip drawn once per pair of regions from ``rtt`` (seconds)."""
        self._regions = dict(regions)
        self._region_rtt = {}
        self._rtt_range = rtt

    def region_rtt(self, a: int, b: int) -> float:
        """The round trip added between regions ``a`` and ``b`` (0 within one)."""
        if a == b:
            return 0.0
        pair = (min(a, b), max(a, b))
        rtt = self._region_rtt.get(pair)
        if rtt is None:
            low, high = self._rtt_range
            rtt = low + self._uniform(f"rtt/{pair}") * (high - low)
            self._region_rtt[pair] = rtt
        return rtt

    # -- The medium ---------------------------------------------------------------------------

    def _uniform(self, label: str) -> float:
        digest = hashlib.blake2b(label.encode(), digest_size=8, key=self._key).digest()
        return int.from_bytes(digest, "little") / 2**64

    def _fate(
        self, source: PeerAddr, to: PeerAddr, data: bytes
    ) -> tuple[float, float, float, float]:
        """Four uniform draws for one message, from its keyed hash: loss and delay of the way
        there, of the way back (a call's reply)."""
        h = hashlib.blake2b(digest_size=32, key=self._key)
        h.update(f"{source[0]}:{source[1]}>{to[0]}:{to[1]}@".encode())
        h.update(struct.pack("<d", trio.current_time()))
        h.update(data)
        digest = h.digest()
        a, b, c, d = (int.from_bytes(digest[i : i + 8], "little") / 2**64 for i in (0, 8, 16, 24))
        return a, b, c, d

    def _loss(self, source: PeerAddr, to: PeerAddr) -> float:
        """The chance that a datagram sent now from ``source`` to ``to`` is lost."""
        kept = (1 - self.loss) * (1 - self._link_loss.get((source, to), 0.0))
        if self.bursts is not None:
            kept *= 1 - self._burst_loss(source, to)
        return 1 - kept

    def _burst_loss(self, source: PeerAddr, to: PeerAddr) -> float:
        """The loss of the two ends' Gilbert-Elliott states now: the sender's way out, the
        receiver's way in (a fading link or a congested host loses all of its traffic)."""
        model = self.bursts
        assert model is not None
        kept = (1 - self._burst_state_of(source, "out", model)) * (
            1 - self._burst_state_of(to, "in", model)
        )
        return 1 - kept

    def _burst_state_of(self, addr: PeerAddr, way: str, model: GilbertElliott) -> float:
        """The loss of ``addr``'s ``way`` now. Its periods come from the keyed hash of (end,
        period number), so they depend on time alone."""
        now = trio.current_time()
        key = (addr, way)
        state = self._burst_state.get(key)
        label = f"burst/{addr[0]}:{addr[1]}/{way}/"
        if state is None:
            start_bad = model.mean_bad / (model.mean_good + model.mean_bad)
            state = self._burst_state[key] = [0, now, self._uniform(label) < start_bad]
        index, end, bad = state
        for _ in range(100_000):  # a few periods at a time, unless a link sat unused for days
            if now < end:
                break
            if index > 0:
                bad = not bad
            index += 1
            mean = model.mean_bad if bad else model.mean_good
            end += -mean * math.log(1 - self._uniform(label + str(index)))
        state[:] = [index, end, bad]
        return model.loss_bad if bad else model.loss_good

    def _arrival(
        self, source: SimNetwork, to: PeerAddr, size: int, lose: float, delay: float
    ) -> float:
        """When ``size`` bytes sent now from ``source`` reach ``to`` (a call's leg: a lost
        segment comes again after CALL_RTO)."""
        now = trio.current_time()
        sent = now
        if self.bandwidth:
            sent = max(now, source.sending_until) + (size + WIRE_OVERHEAD) / self.bandwidth
            source.sending_until = sent
        extra = CALL_RTO if lose < self._loss(source.addr, to) else 0.0
        return sent + self._delay(source.addr, to, delay) + extra

    def _delay(self, source: PeerAddr, to: PeerAddr, uniform: float) -> float:
        if self.latency is not None:
            delay = self.latency.draw(uniform)
        else:
            low, high = self.delay
            delay = low + uniform * (high - low)
        if self._regions:
            a, b = self._regions.get(source, 0), self._regions.get(to, 0)
            if a != b:
                delay += self.region_rtt(a, b) / 2
        return delay

    def _handled(self, target: SimNetwork, arrived: float, size: int) -> float:
        """When ``target`` is done handling ``size`` bytes that arrived at ``arrived``: after
        its slowness, behind what it was already handling."""
        per_message, per_byte = self.handler_cost
        start = max(arrived + self._slow.get(target.addr, 0.0), target.busy_until)
        done = start + per_message + per_byte * size
        target.busy_until = done
        return done

    def _reachable(self, source: SimNetwork, to: PeerAddr) -> SimNetwork | None:
        """The network at ``to`` if ``source`` can reach it now."""
        target = self._nets.get(to)
        if target is None or target.crashed or source.crashed:
            return None
        group, other = self._groups.get(source.addr), self._groups.get(to)
        if group is not None and other is not None and group != other:
            return None
        return target

    def _send(self, source: SimNetwork, to: PeerAddr, data: bytes, msg: Any) -> None:
        self.stats["datagrams"] += 1
        if self.tap is not None:
            self.tap(trio.current_time(), source.addr, to, "datagram", msg)
        lose, delay = self._fate(source.addr, to, data)[:2]
        if lose < self._loss(source.addr, to):
            self.stats["lost"] += 1
            return
        sent = trio.current_time()
        if self.bandwidth:
            sent = max(sent, source.sending_until) + (len(data) + WIRE_OVERHEAD) / self.bandwidth
            source.sending_until = sent
        self._push(sent + self._delay(source.addr, to, delay), source, to, data, False)

    def _push(
        self, due: float, source: SimNetwork, to: PeerAddr, data: bytes, handled: bool
    ) -> None:
        self._sent += 1
        heapq.heappush(self._heap, (due, self._sent, source, to, data, handled))
        if due < self._next_due and self._wake is not None:
            self._wake.set()

    async def _deliver_loop(self) -> None:
        heap = self._heap
        while True:
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                due, _, source, to, data, handled = heapq.heappop(heap)
                target = self._reachable(source, to)
                if target is None or target._on_datagram is None:
                    self.stats["undeliverable"] += 1
                    continue
                if not handled:
                    # In the receiver's queue: its handler runs (and answers) once done.
                    done = self._handled(target, due, len(data))
                    if done > now:
                        self._push(done, source, to, data, True)
                        continue
                self.stats["delivered"] += 1
                target._on_datagram(source.addr, _copy(data))
            self._next_due = heap[0][0] if heap else math.inf
            self._wake = trio.Event()
            with trio.move_on_at(self._next_due):
                await self._wake.wait()
