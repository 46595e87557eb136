"""A cluster of :class:`Membership` peers on a :class:`~tests.harness.simnet.SimWorld`.

What the tests and the benchmark share: peers named ``node0000``... at ``10.x.y.z:7946``, each
with its incarnation "saved" in a dict that survives crashes (the daemon keeps it in LMDB), and a
log of every state change any peer observed. Peers see the whole world as their DNS seeds unless
told otherwise. Also: the LAN the benchmarks and tests model (:data:`LAN_LATENCY`), Lifeguard's
slow-peer test (:func:`slow_peer_run`), and mechanisms switched off (:class:`NoRefutation`)
for the tests that show a check can fail.
"""

from __future__ import annotations

import gc
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio

from drekifs.cluster.net import PeerAddr
from drekifs.cluster.swim.config import SwimConfig
from drekifs.cluster.swim.membership import Membership
from drekifs.cluster.swim.state import MemberInfo
from tests.harness.simnet import LogNormal, SimWorld, addr_of

# One-way delay on a LAN: 0.5 ms on median, a tail to a few ms (p99 1.6 ms, p99.99 3.2 ms).
LAN_LATENCY = LogNormal(median=0.0005, sigma=0.5, floor=0.00005)


class NoRefutation(Membership):
    """A peer that never refutes an accusation (test-only: the mechanism switched off)."""

    def _refute(self, accused: int) -> None:
        self.counters["refutations_skipped"] += 1


@dataclass(frozen=True, slots=True)
class Observation:
    """``observer`` saw ``subject`` become ``state`` (or change) at simulated ``time``."""

    time: float
    observer: str
    subject: str
    state: str
    incarnation: int


class SimCluster:
    """Membership peers on ``world``; ``size`` names exist from the start (the DNS world)."""

    def __init__(
        self,
        world: SimWorld,
        size: int,
        config: SwimConfig,
        *,
        membership: type[Membership] = Membership,
    ) -> None:
        self.world = world
        self.config = config
        self.membership = membership
        self.addrs: dict[str, PeerAddr] = {}
        self.peers: dict[str, Membership] = {}  # the running ones
        self.saved: dict[str, int] = {}  # name -> incarnation, as on each peer's disk
        self.saves: list[tuple[float, str, int]] = []  # (time, name, incarnation), in order
        self.observations: list[Observation] = []
        self.watch: Callable[[Observation], None] | None = None
        self._lives = 0
        for _ in range(size):
            self.add_name()

    @property
    def names(self) -> list[str]:
        return list(self.addrs)

    def add_name(self) -> str:
        """One more node in the DNS world; returns its name."""
        index = len(self.addrs)
        name = f"node{index:04d}"
        self.addrs[name] = addr_of(index)
        return name

    def start(
        self,
        name: str,
        *,
        seeds: Iterable[str] | None = None,
        config: SwimConfig | None = None,
        incarnation: int | None = None,
        preload: list[MemberInfo] | None = None,
    ) -> Membership:
        """Start (or restart) ``name`` with its saved incarnation (or ``incarnation``), knowing
        ``preload`` already (see :meth:`Membership.preload`)."""
        addr = self.addrs[name]
        self._lives += 1
        peer = self.membership(
            name,
            self.world.network(addr),
            config or self.config,
            incarnation=self.saved.get(name, 0) if incarnation is None else incarnation,
            save_incarnation=lambda inc: self._save(name, inc),
            rng=self.world.rng(f"swim/{name}/{self._lives}"),
            wallclock=trio.current_time,
        )
        peer.watchers.append(lambda info: self._observe(name, info))
        if preload is not None:
            peer.preload(preload)
        chosen = self.addrs if seeds is None else {s: self.addrs[s] for s in seeds}
        peer.set_seeds(dict(chosen))
        self.peers[name] = peer
        self.world.start_soon(addr, peer.run)
        return peer

    def start_converged(self, names: Iterable[str]) -> None:
        """Start ``names`` as a cluster that has already converged (everybody alive in its
        first incarnation), without simulating the O(n^2) gossip of getting there."""
        names = list(names)
        now = trio.current_time()
        infos = [
            MemberInfo(n, "alive", self.addrs[n], self.saved.get(n, 0) + 1, now, {}) for n in names
        ]
        # A million member records in a few seconds: the cyclic GC would rescan them all again
        # and again while they are made (none of them is garbage).
        gc.disable()
        try:
            for name in names:
                self.start(name, preload=infos)
        finally:
            gc.enable()

    def crash(self, name: str) -> None:
        self.world.crash(self.addrs[name])
        self.peers.pop(name, None)

    def _save(self, name: str, incarnation: int) -> None:
        self.saved[name] = incarnation
        self.saves.append((trio.current_time(), name, incarnation))

    def _observe(self, observer: str, info: MemberInfo) -> None:
        obs = Observation(trio.current_time(), observer, info.name, info.state, info.incarnation)
        self.observations.append(obs)
        if self.watch is not None:
            self.watch(obs)

    # -- Views --------------------------------------------------------------------------------

    def views(self, subject: str) -> dict[str, str | None]:
        """What each running peer (but ``subject``) believes of ``subject``."""
        return {n: p.state_of(subject) for n, p in self.peers.items() if n != subject}

    def converged(self) -> bool:
        """Every running peer sees every running peer alive."""
        running = list(self.peers)
        return all(
            peer.state_of(other) == "alive" for peer in self.peers.values() for other in running
        )

    async def wait_for(
        self, predicate: Callable[[], bool], timeout: float, step: float = 0.25
    ) -> float | None:
        """Simulated seconds until ``predicate()`` holds (checked every ``step``), or None
        after ``timeout``."""
        start = trio.current_time()
        with trio.move_on_after(timeout):
            while not predicate():
                await trio.sleep(step)
            return trio.current_time() - start
        return None


@dataclass(frozen=True, slots=True)
class SlowPeerResult:
    """What a slow-peer run saw: every "dead" any peer reported (none is true: nobody
    crashed), and how busy the failure detector was."""

    slow: list[str]
    deaths: list[Observation]
    suspicions: int
    refutations: int

    @property
    def dead_subjects(self) -> set[str]:
        return {o.subject for o in self.deaths}


async def slow_peer_run(
    cluster: SimCluster, slow: int, late: float, duration: float, rng_seed: int
) -> SlowPeerResult:
    """Lifeguard's slow-peer test on a converged ``cluster``: ``slow`` random peers handle every
    message ``late`` seconds late for ``duration`` simulated seconds; nobody crashes."""
    cluster.start_converged(cluster.names)
    chosen = sorted(random.Random(rng_seed).sample(cluster.names, slow))
    for name in chosen:
        cluster.world.set_slow(cluster.addrs[name], late)
    await trio.sleep(duration)
    counters = [p.counters for p in cluster.peers.values()]
    return SlowPeerResult(
        chosen,
        [o for o in cluster.observations if o.state == "dead"],
        sum(c["suspicions"] for c in counters),
        sum(c["refutations"] for c in counters),
    )
