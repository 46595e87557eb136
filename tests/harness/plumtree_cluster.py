"""A cluster of :class:`Broadcast` peers on a :class:`~tests.harness.simnet.SimWorld`.

What the tests and the benchmark share: peers named ``node0000``... at ``10.x.y.z:7946`` (as
:mod:`tests.harness.swim_cluster`), each with a :class:`DictStore` that records when each
message was delivered, and the datagram demultiplexing the daemon does (Plumtree's datagrams to
:meth:`Broadcast.handle_datagram`, anything else counted as ``foreign``). The membership is
given, not simulated: :meth:`BroadcastCluster.update_membership` plays the part of SWIM telling
every peer the live members.

:class:`SimWorld` loses datagrams only (its calls behave as a reliable stream). With
``call_loss``, :class:`LossyCalls` also loses that fraction of the calls — the connection broke
before the request got through, the caller learns it a round trip later (PeerUnreachable) — so
pushes go missing too and the lazy repair has something to repair.
"""

from __future__ import annotations

import collections
import hashlib
import struct
from collections.abc import Callable, Iterable
from typing import Any

import msgpack
import trio

from drekifs.cluster.net import PeerAddr, PeerUnreachable
from drekifs.cluster.plumtree.broadcast import Broadcast
from drekifs.cluster.plumtree.config import PlumtreeConfig
from tests.harness.simnet import SimNetwork, SimWorld, addr_of


class DictStore:
    """A :class:`~drekifs.cluster.plumtree.store.MessageStore` in a dict: every id is its own
    key (nothing supersedes anything unless :meth:`supersede` says so)."""

    def __init__(self) -> None:
        self.payloads: dict[bytes, Any] = {}
        self.times: dict[bytes, float] = {}  # id -> simulated time it was delivered
        self.superseded: set[bytes] = set()

    def has(self, mid: bytes) -> bool:
        return mid in self.payloads or mid in self.superseded

    def get(self, mid: bytes) -> Any | None:
        return self.payloads.get(mid)

    def deliver(self, mid: bytes, payload: Any) -> bool:
        if self.has(mid):
            return False
        self.payloads[mid] = payload
        self.times[mid] = trio.current_time()
        return True

    def supersede(self, mid: bytes) -> None:
        self.superseded.add(mid)


class LossyCalls:
    """A :class:`SimNetwork` whose calls are lost with probability ``loss`` (deterministic for
    the world's seed: the fate of a call is a keyed hash of who, when and what)."""

    def __init__(self, inner: SimNetwork, world: SimWorld, loss: float) -> None:
        self.inner = inner
        self.addr = inner.addr
        self.loss = loss
        self.lost = 0
        self._world = world
        self._key = hashlib.blake2b(f"calls/{world.seed}".encode(), digest_size=32).digest()

    def send_datagram(self, to: PeerAddr, msg: Any) -> None:
        self.inner.send_datagram(to, msg)

    def on_datagram(self, handler: Callable[[PeerAddr, Any], None]) -> None:
        self.inner.on_datagram(handler)

    def register(self, method: str, handler: Any, *, inline: bool = False) -> None:
        self.inner.register(method, handler)

    async def call(self, to: PeerAddr, method: str, args: Any, *, timeout: float) -> Any:
        h = hashlib.blake2b(digest_size=8, key=self._key)
        h.update(f"{self.addr}>{to}@{method}".encode())
        h.update(struct.pack("<d", trio.current_time()))
        h.update(msgpack.packb(args))
        if int.from_bytes(h.digest(), "little") / 2**64 < self.loss:
            self.lost += 1
            with trio.move_on_after(timeout):
                await trio.sleep(2 * self._world.delay[1])
            raise PeerUnreachable(f"{to[0]}:{to[1]}: call lost")
        return await self.inner.call(to, method, args, timeout=timeout)


class BroadcastCluster:
    """Broadcast peers on ``world``; ``size`` names exist from the start."""

    def __init__(
        self, world: SimWorld, size: int, config: PlumtreeConfig, *, call_loss: float = 0.0
    ) -> None:
        self.world = world
        self.config = config
        self.call_loss = call_loss
        self.addrs: dict[str, PeerAddr] = {}
        self.peers: dict[str, Broadcast] = {}  # the running ones
        self.stores: dict[str, DictStore] = {}
        self.nets: dict[str, LossyCalls] = {}
        self.foreign = 0  # datagrams that were not Plumtree's
        self._lives = 0
        for _ in range(size):
            self.add_name()

    @property
    def names(self) -> list[str]:
        return list(self.addrs)

    def add_name(self) -> str:
        index = len(self.addrs)
        name = f"node{index:04d}"
        self.addrs[name] = addr_of(index)
        return name

    async def start(self, names: Iterable[str] | None = None) -> None:
        """Start ``names`` (default: every name) with empty stores, then tell every running
        peer the new membership; returns when they all run."""
        for name in self.names if names is None else names:
            self._lives += 1
            addr = self.addrs[name]
            net = LossyCalls(self.world.network(addr), self.world, self.call_loss)
            store = DictStore()
            peer = Broadcast(
                name,
                net,
                self.config,
                store,
                rng=self.world.rng(f"plumtree/{name}/{self._lives}"),
            )
            net.on_datagram(self._demux(peer))
            self.peers[name], self.stores[name], self.nets[name] = peer, store, net
            self.world.start_soon(addr, peer.run)
        self.update_membership()
        await trio.sleep(0.001)  # let every run() open its nursery

    def _demux(self, peer: Broadcast) -> Callable[[PeerAddr, Any], None]:
        def handler(source: PeerAddr, msg: Any) -> None:
            if not peer.handle_datagram(source, msg):
                self.foreign += 1

        return handler

    def update_membership(self) -> None:
        """What SWIM would do: every running peer learns the running peers."""
        alive = {name: self.addrs[name] for name in self.peers}
        for peer in self.peers.values():
            peer.set_neighbours(alive)

    def crash(self, name: str) -> None:
        self.world.crash(self.addrs[name])
        self.peers.pop(name, None)

    def broadcast(self, name: str, mid: bytes, payload: Any) -> None:
        """A local write at ``name``: delivered to its store, then spread."""
        assert self.stores[name].deliver(mid, payload)
        self.peers[name].broadcast(mid, payload)

    # -- Views --------------------------------------------------------------------------------

    def delivered(self, mid: bytes) -> dict[str, float]:
        """Running peer -> simulated time it got ``mid``."""
        out = {}
        for name in self.peers:
            t = self.stores[name].times.get(mid)
            if t is not None:
                out[name] = t
        return out

    def missing(self, mid: bytes) -> list[str]:
        return [n for n in self.peers if mid not in self.stores[n].payloads]

    def totals(self) -> collections.Counter[str]:
        """Every running peer's counters, summed."""
        total: collections.Counter[str] = collections.Counter()
        for peer in self.peers.values():
            total.update(peer.counters)
        return total

    def tree_edges(self) -> set[frozenset[str]]:
        """Eager links (either side's view) between running peers, by name."""
        by_addr = {addr: name for name, addr in self.addrs.items()}
        return {
            frozenset((name, by_addr[addr]))
            for name, peer in self.peers.items()
            for addr in peer.eager
            if by_addr.get(addr) in self.peers
        }

    async def wait_delivered(self, mid: bytes, timeout: float, step: float = 0.005) -> float | None:
        """Simulated seconds until every running peer has ``mid`` (checked every ``step``),
        or None after ``timeout``."""
        start = trio.current_time()
        with trio.move_on_after(timeout):
            while self.missing(mid):
                await trio.sleep(step)
            return trio.current_time() - start
        return None
