"""An in-memory network for simulations: many peers in one trio run, on trio's clock.

:class:`SimWorld` is the medium: it hands out one :class:`SimNetwork` (the
:class:`~drekifs.cluster.net.Network` of one peer) per address and models

- **loss**: each datagram is lost with probability ``loss`` (calls are not: they behave like a
  reliable stream and only fail on a partition or a crash);
- **delay**: each datagram, and each leg of a call, takes a random time in ``delay``;
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
deliveries happen in one task, in order of (time, send order).
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
import struct
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
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
        there, back = world._fate(self.addr, to, method.encode() + request)[1:]
        with trio.move_on_after(timeout):
            await trio.sleep(there)
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
                await trio.sleep(back)
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

    ``loss`` (0..1) and ``delay`` ((low, high) seconds) may be changed at any time. ``tap``, if
    set, is called with (time, from, to, kind, message) for every datagram sent (kind
    "datagram") and call made (kind: the method), lost ones included: tests read the traffic.
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        loss: float = 0.0,
        delay: tuple[float, float] = (0.0002, 0.002),
    ) -> None:
        self.seed = seed
        self._key = hashlib.blake2b(str(seed).encode(), digest_size=32).digest()
        self.loss = loss
        self.delay = delay
        self.tap: Tap | None = None
        self.stats: Counter[str] = Counter()
        self._nets: dict[PeerAddr, SimNetwork] = {}
        self._lives: Counter[PeerAddr] = Counter()
        self._scopes: dict[PeerAddr, list[trio.CancelScope]] = {}
        self._groups: dict[PeerAddr, int] = {}
        self._heap: list[tuple[float, int, SimNetwork, PeerAddr, bytes]] = []
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

    # -- The medium ---------------------------------------------------------------------------

    def _fate(self, source: PeerAddr, to: PeerAddr, data: bytes) -> tuple[float, float, float]:
        """(a uniform draw for loss, two delays) for one message, from its keyed hash."""
        h = hashlib.blake2b(digest_size=24, key=self._key)
        h.update(f"{source[0]}:{source[1]}>{to[0]}:{to[1]}@".encode())
        h.update(struct.pack("<d", trio.current_time()))
        h.update(data)
        digest = h.digest()
        low, high = self.delay
        a, b, c = (int.from_bytes(digest[i : i + 8], "little") / 2**64 for i in (0, 8, 16))
        return a, low + b * (high - low), low + c * (high - low)

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
        draw, delay, _ = self._fate(source.addr, to, data)
        due = trio.current_time() + delay
        if draw < self.loss:
            self.stats["lost"] += 1
            return
        self._sent += 1
        heapq.heappush(self._heap, (due, self._sent, source, to, data))
        if due < self._next_due and self._wake is not None:
            self._wake.set()

    async def _deliver_loop(self) -> None:
        heap = self._heap
        while True:
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                _, _, source, to, data = heapq.heappop(heap)
                target = self._reachable(source, to)
                if target is None or target._on_datagram is None:
                    self.stats["undeliverable"] += 1
                    continue
                self.stats["delivered"] += 1
                target._on_datagram(source.addr, _copy(data))
            self._next_due = heap[0][0] if heap else math.inf
            self._wake = trio.Event()
            with trio.move_on_at(self._next_due):
                await self._wake.wait()
