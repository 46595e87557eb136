"""Plumtree broadcast and anti-entropy together, as the daemon wires them, on a SimWorld.

What ``tests/sim/test_replication_sim.py`` and ``bench/sim_replication.py`` share. Each simulated
peer has a durable :class:`SimReplica` (a dict store with the real store's winner rule: the
larger (hlc, peer) wins; it is both Plumtree's MessageStore and anti-entropy's EntrySource, and
keeps its :class:`HashTree` in step with every change), and, while it runs, a :class:`Broadcast`
and an :class:`AntiEntropy` over one network (datagrams go to ``Broadcast.handle_datagram``;
anti-entropy only makes calls). As in :mod:`drekifs.cluster.replication`, a local write is
broadcast at once with message id ``hlc | peer | key``, anti-entropy runs every interval with a
random live peer, a restarted peer catches up with ``full_sync`` against one live peer (trying
others if that fails), and a caught-up peer exchanges at once with members that come back by
the daemon's own rule (:mod:`drekifs.cluster.rejoin`: a few, until one exchange brings news).

The membership is given, not simulated: :class:`ReplicationCluster` plays SWIM. Every peer's
live set is what the harness knows (running peers on its side of a partition), applied
``detect`` simulated seconds after a crash, restart, partition or heal (a restarted peer knows
its own view at once). Stores survive crashes: a crash loses no acknowledged write. Calls are
lost with probability ``call_loss`` (:class:`~tests.harness.plumtree_cluster.LossyCalls`),
datagrams with the world's ``loss``; both are counted per protocol by :class:`CountingNet`.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing

from drekifs.cluster.antientropy import AntiEntropy, AntiEntropyConfig, HashTree, TreeShape
from drekifs.cluster.net import PeerAddr, PeerUnreachable, RemoteError
from drekifs.cluster.plumtree import Broadcast, PlumtreeConfig
from drekifs.cluster.rejoin import (
    EXCHANGE_TIMEOUT,
    RETURN_EXCHANGES,
    RETURN_PUSH_LIMIT,
    brought_news,
    came_back,
    exchange_with_returning,
)
from drekifs.cluster.replication import message_id, split_message_id
from drekifs.stores.version import HybridClock, Version
from tests.harness.memsource import Entry, MemorySource
from tests.harness.plumtree_cluster import LossyCalls
from tests.harness.simnet import SimWorld, addr_of

HARNESS: PeerAddr = ("harness", 0)  # the owner of the harness's own timers (never crashed)
BROADCAST, ANTIENTROPY, LOCAL = "broadcast", "antientropy", "local"


class SimReplica(MemorySource):
    """A durable dict store: entries ``(hlc, peer, value)``, the larger (hlc, peer) wins.

    ``arrived`` records how each version held here at some point got here (``local``,
    ``broadcast`` or ``antientropy``), keyed by (key, hlc, peer): the bench's delivery shares.
    ``clock`` is the real store's :class:`~drekifs.stores.version.HybridClock`, on simulated
    time, kept past every version seen.
    """

    def __init__(self, name: str, shape: TreeShape) -> None:
        super().__init__(HashTree(shape))
        self.name = name
        # The store's own clock, read off trio's (simulated) one.
        self.clock = HybridClock(wall_ns=lambda: int(trio.current_time() * 1e9))
        self.arrived: dict[tuple[bytes, int, str], str] = {}

    def write(self, key: bytes, value: bytes) -> Entry:
        """A local write now; its entry (the version is new and beats what is here)."""
        self._apply(key, (self.clock.now(), self.name, value), LOCAL)
        return self.entries[key]

    def rebuild_tree(self) -> None:
        """A restart: the hash tree is rebuilt from what the store holds."""
        self.tree = HashTree(self.tree.shape, ready=False)
        self.tree.start_build()
        self.tree.build(self.iter_digests())
        self.tree.finish_build()

    def iter_digests(self) -> Iterable[tuple[bytes, bytes]]:
        for key in list(self.entries):
            digest = self.digest(key)
            assert digest is not None
            yield key, digest

    def version(self, key: bytes) -> tuple[int, str] | None:
        entry = self.entries.get(key)
        return None if entry is None else (entry[0], entry[1])

    # -- Plumtree's MessageStore --------------------------------------------------------------

    def has(self, mid: bytes) -> bool:
        key, v = split_message_id(mid)
        held = self.version(key)
        return held is not None and held >= (v.hlc, v.peer)

    def get(self, mid: bytes) -> Any | None:
        key, v = split_message_id(mid)
        entry = self.entries.get(key)
        if entry is None or (entry[0], entry[1]) != (v.hlc, v.peer):
            return None  # superseded: the newer version travels on its own
        return list(entry)

    def deliver(self, mid: bytes, payload: Any) -> bool:
        key, v = split_message_id(mid)
        entry = self._check(key, payload)
        if (entry[0], entry[1]) != (v.hlc, v.peer):
            raise ValueError("the payload is not the version its id names")
        return self._apply(key, entry, BROADCAST)

    # -- anti-entropy's EntrySource (digest and export: MemorySource's) -----------------------

    def merge(self, entries: list[tuple[bytes, Any]]) -> int:
        checked = [(key, self._check(key, entry)) for key, entry in entries]  # all or nothing
        return sum(self._apply(key, entry, ANTIENTROPY) for key, entry in checked)

    def _apply(self, key: bytes, entry: Entry, how: str) -> bool:
        held = self.version(key)
        if held is not None and held >= (entry[0], entry[1]):
            return False
        self.put(key, *entry)  # the tree follows
        self.clock.observe(entry[0])
        self.arrived.setdefault((key, entry[0], entry[1]), how)
        return True


class CountingNet(LossyCalls):
    """:class:`LossyCalls` that counts every call by method prefix (``plumtree``, ``ae``) in
    the shared ``counts``, lost ones included."""

    def __init__(self, inner: Any, world: SimWorld, loss: float, counts: collections.Counter):
        super().__init__(inner, world, loss)
        self.counts = counts

    async def call(self, to: PeerAddr, method: str, args: Any, *, timeout: float) -> Any:
        self.counts[method.split(".", 1)[0]] += 1
        return await super().call(to, method, args, timeout=timeout)


@dataclass(frozen=True)
class ReplConfig:
    """The knobs of a simulated cluster (the protocols' own configs inside)."""

    plumtree: PlumtreeConfig = field(default_factory=PlumtreeConfig)
    antientropy: AntiEntropyConfig = field(default_factory=AntiEntropyConfig)
    shape: TreeShape = field(default_factory=lambda: TreeShape(fanout_bits=4, depth=2))
    """Small: the default 65,536 buckets cost ~1 MiB a peer, and a run holds few keys."""
    call_loss: float = 0.0
    detect: float = 2.0
    """Simulated seconds before every peer's live set follows a change (SWIM's detection)."""
    rejoin_exchanges: int = RETURN_EXCHANGES
    """Members that come back tried at once, per peer, until one exchange brings news (the
    daemon's rule); 0 for none."""
    catch_up_tries: int = 8
    """Peers a restarted one tries in turn for its full sync."""


@dataclass(frozen=True)
class Write:
    """An acknowledged write: in ``writer``'s durable store when :meth:`write` returned."""

    key: bytes
    hlc: int
    writer: str
    at: float


class SimPeer:
    """One life of a peer: its network, Broadcast and AntiEntropy (the store outlives it)."""

    def __init__(self, cluster: ReplicationCluster, name: str, life: int) -> None:
        world, config = cluster.world, cluster.config
        self.name = name
        self.store = cluster.stores[name]
        self.net = CountingNet(
            world.network(cluster.addrs[name]), world, config.call_loss, cluster.calls
        )
        self.broadcast = Broadcast(
            name,
            self.net,
            config.plumtree,
            self.store,
            rng=world.rng(f"plumtree/{name}/{life}"),
        )
        self.antientropy = AntiEntropy(
            name,
            self.net,
            self.store.tree,
            self.store,
            config=config.antientropy,
            rng=world.rng(f"ae/{name}/{life}"),
        )
        self.net.on_datagram(self._datagram)
        self.view: dict[str, PeerAddr] = {}
        self.caught_up = False  # until then, members that come back are not exchanged with
        self.foreign = 0

    def _datagram(self, source: PeerAddr, msg: Any) -> None:
        if not self.broadcast.handle_datagram(source, msg):
            self.foreign += 1  # anti-entropy sends none: nothing else should arrive

    def set_view(self, view: dict[str, PeerAddr]) -> list[str]:
        """The live members this peer sees; returns those that came back (new in the view)."""
        back = came_back(self.name, self.view, view)
        self.view = view
        self.broadcast.set_neighbours(view)
        self.antientropy.set_peers(view)
        return back


@dataclass(frozen=True)
class Snapshot:
    """What the harness knew at one instant: the running peers and the partition."""

    running: frozenset[str]
    groups: dict[str, int]


@dataclass
class CatchUp:
    name: str
    at: float
    seconds: float | None = None  # None: no full sync succeeded
    pulled: int = 0
    tries: int = 0


class ReplicationCluster:
    """``size`` simulated replicating peers on ``world`` (see the module docstring)."""

    def __init__(self, world: SimWorld, size: int, config: ReplConfig) -> None:
        self.world = world
        self.config = config
        self.names = [f"node{i:04d}" for i in range(size)]
        self.addrs = {name: addr_of(i) for i, name in enumerate(self.names)}
        self.stores = {name: SimReplica(name, config.shape) for name in self.names}
        self.peers: dict[str, SimPeer] = {}  # running
        self.calls: collections.Counter[str] = collections.Counter()
        self.retired: collections.Counter[str] = collections.Counter()  # counters of past lives
        self.writes: list[Write] = []
        self.catch_ups: list[CatchUp] = []
        self.rejoins = 0  # exchanges with members that came back, started
        self.rejoins_due = 0  # members that came back, summed over the peers that saw them
        self.unsent = 0  # writes not broadcast (their peer was not running yet)
        self._groups: dict[str, int] = {}
        self._lives: collections.Counter[str] = collections.Counter()
        self._rng = world.rng("replsim")

    # -- Life and death ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start every peer with an empty store; returns when all run and know each other."""
        for name in self.names:
            self._launch(name)
        self.update_membership(self._snapshot())
        for peer in self.peers.values():
            peer.caught_up = True  # every store is empty: nothing to catch up with
        await trio.sleep(0.001)  # let every run() open its nursery

    def _launch(self, name: str) -> SimPeer:
        self._lives[name] += 1
        peer = SimPeer(self, name, self._lives[name])
        self.peers[name] = peer
        addr = self.addrs[name]
        self.world.start_soon(addr, peer.broadcast.run)
        self.world.start_soon(addr, peer.antientropy.run)
        return peer

    def crash(self, name: str) -> None:
        """``name`` stops dead (its store survives); the others notice after ``detect``."""
        peer = self.peers.pop(name)
        self.world.crash(self.addrs[name])
        self.retired.update(peer.broadcast.counters)
        self.retired.update({f"ae_{k}": v for k, v in peer.antientropy.counters.items()})
        self._later()

    def restart(self, name: str) -> None:
        """``name`` comes back with its durable store: it sees its side at once and catches up
        with one live peer; the others notice it after ``detect``."""
        self.stores[name].rebuild_tree()
        peer = self._launch(name)
        peer.set_view(self.view_of(name, self._snapshot()))
        self.world.start_soon(self.addrs[name], self._catch_up, peer)
        self._later()

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut the groups from each other (names in no group reach everyone); the peers see
        the other side gone after ``detect``."""
        self._groups = {name: i for i, group in enumerate(groups) for name in group}
        self.world.partition(*({self.addrs[n] for n in group} for group in groups))
        self._later()

    def heal(self) -> None:
        self._groups = {}
        self.world.heal()
        self._later()

    def _snapshot(self) -> Snapshot:
        return Snapshot(frozenset(self.peers), dict(self._groups))

    def _later(self) -> None:
        """The membership as it is now, applied ``detect`` seconds from now."""
        snapshot = self._snapshot()

        async def after() -> None:
            await trio.sleep(self.config.detect)
            self.update_membership(snapshot)

        self.world.start_soon(HARNESS, after)

    # -- Membership ---------------------------------------------------------------------------

    def view_of(self, name: str, snapshot: Snapshot) -> dict[str, PeerAddr]:
        """What SWIM would tell ``name`` of ``snapshot``: the running peers on its side, and
        itself."""
        groups = snapshot.groups
        side = groups.get(name)
        return {
            other: self.addrs[other]
            for other in sorted(snapshot.running | {name})
            if side is None or groups.get(other, side) == side
        }

    def update_membership(self, snapshot: Snapshot) -> None:
        """Every running peer learns its live set as of ``snapshot``; a caught-up one
        exchanges at once with the members that came back (as the daemon's
        ``_follow_members``)."""
        for name, peer in list(self.peers.items()):
            back = peer.set_view(self.view_of(name, snapshot))
            if back and peer.caught_up:
                self.rejoins_due += len(back)
                self.world.start_soon(self.addrs[name], self._rejoin, peer, back, dict(peer.view))

    async def _rejoin(self, peer: SimPeer, back: list[str], alive: dict[str, PeerAddr]) -> None:
        async def exchange(name: str, addr: PeerAddr) -> bool:
            self.rejoins += 1
            with trio.move_on_after(EXCHANGE_TIMEOUT):
                result = await _quietly(peer.antientropy.sync(addr, push_limit=RETURN_PUSH_LIMIT))
                return result is not None and brought_news(result)
            return False

        await exchange_with_returning(
            back, alive, exchange, self._rng, limit=self.config.rejoin_exchanges
        )

    async def _catch_up(self, peer: SimPeer) -> None:
        """The restarted peer's full sync with one live peer (random order, bounded tries)."""
        record = CatchUp(peer.name, trio.current_time())
        self.catch_ups.append(record)
        others = sorted(n for n in peer.view if n != peer.name)
        peer.antientropy.rng.shuffle(others)
        for name in others[: self.config.catch_up_tries]:
            record.tries += 1
            with trio.move_on_after(60):
                result = await _quietly(peer.antientropy.full_sync(self.addrs[name]))
                if result is not None:
                    record.seconds = trio.current_time() - record.at
                    record.pulled = result.pulled
                    break
        peer.caught_up = True

    # -- Writes and views ---------------------------------------------------------------------

    def write(self, name: str, key: bytes, value: bytes) -> Write:
        """A local write at running peer ``name``: stored (acknowledged), then broadcast."""
        peer = self.peers[name]
        hlc, writer, value = peer.store.write(key, value)
        try:
            peer.broadcast.broadcast(message_id(key, Version(hlc, writer)), [hlc, writer, value])
        except RuntimeError:  # restarted this instant, not running yet: anti-entropy carries it
            self.unsent += 1
        w = Write(key, hlc, writer, trio.current_time())
        self.writes.append(w)
        return w

    def roots(self) -> dict[str, bytes]:
        return {name: store.tree.root() for name, store in self.stores.items()}

    def converged(self) -> bool:
        """Every peer (running or not) holds the same (key -> version) map: equal roots."""
        return len(set(self.roots().values())) == 1

    def lost_writes(self) -> list[tuple[str, Write]]:
        """(peer, write) pairs where the peer holds neither the write nor a later version."""
        out = []
        for w in self.writes:
            for name, store in self.stores.items():
                held = store.version(w.key)
                if held is None or held < (w.hlc, w.writer):
                    out.append((name, w))
        return out

    def arrivals(self) -> collections.Counter[str]:
        """How acknowledged writes reached the other peers: ``broadcast``, ``antientropy``, or
        ``superseded`` (a later version got there first, so this one never had to)."""
        out: collections.Counter[str] = collections.Counter()
        for w in self.writes:
            for name, store in self.stores.items():
                if name != w.writer:
                    out[store.arrived.get((w.key, w.hlc, w.writer), "superseded")] += 1
        return out

    def totals(self) -> collections.Counter[str]:
        """Protocol counters of every life of every peer (anti-entropy's prefixed ``ae_``)."""
        total = collections.Counter(self.retired)
        for peer in self.peers.values():
            total.update(peer.broadcast.counters)
            total.update({f"ae_{k}": v for k, v in peer.antientropy.counters.items()})
        return total

    def messages(self) -> dict[str, int]:
        """Messages sent (lost ones included): Plumtree's datagrams and pushes, anti-entropy's
        calls."""
        return {
            "datagrams": self.world.stats["datagrams"],
            "pushes": self.calls["plumtree"],
            "ae_calls": self.calls["ae"],
        }

    async def wait_converged(self, timeout: float, step: float = 0.25) -> float | None:
        """Simulated seconds until :meth:`converged` (checked every ``step``), None after
        ``timeout``."""
        start = trio.current_time()
        with trio.move_on_after(timeout):
            while not self.converged():
                await trio.sleep(step)
            return trio.current_time() - start
        return None


def run_seeded(main: Callable[[], Awaitable[Outcome]], seed: int) -> Outcome:
    """``trio.run(main)`` on a MockClock, deterministic for ``seed``: trio breaks ties between
    tasks runnable at one instant with its own random stream (private; seeded here when
    present), and which write an exchange sees can hang on such a tie."""
    scheduler_rng = getattr(getattr(trio, "_core", None), "_run", None)
    scheduler_rng = getattr(scheduler_rng, "_r", None)
    if isinstance(scheduler_rng, random.Random):
        scheduler_rng.seed(f"replsim/{seed}")
    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def _quietly(exchange: Awaitable[Any]) -> Any | None:
    """An exchange's result, or None when the peer was unreachable or refused (logged by
    :class:`AntiEntropy` itself through its counters)."""
    try:
        return await exchange
    except (PeerUnreachable, RemoteError, RuntimeError):
        return None


@dataclass
class Scenario:
    """The run of the brief: writes at random running peers, crashes and restarts among them,
    one partition in two halves with writes on both sides, then heal and wait for convergence.
    Times in simulated seconds from the start."""

    peers: int = 100
    writes: int = 200
    write_span: float = 20.0
    keys: int = 120
    """Keys written (fewer than writes: later writes supersede earlier ones)."""
    crashes: tuple[tuple[float, float], ...] = ((3.0, 9.0), (8.0, 15.0))
    """(crash, restart) times of distinct random peers."""
    partition: tuple[float, float] = (10.0, 40.0)
    same_key_pairs: int = 10
    """Keys written on both sides during the partition (a conflict each)."""
    max_wait: float = 300.0
    """Simulated seconds after the heal before giving up on convergence."""


@dataclass
class Outcome:
    converged_after: float | None
    lost: int
    writes: int
    arrivals: dict[str, int]
    messages: dict[str, int]
    totals: dict[str, int]
    catch_ups: list[CatchUp]
    rejoins: int
    rejoins_due: int
    sim_seconds: float
    peers: int
    foreign: int


async def run_scenario(world: SimWorld, sc: Scenario, config: ReplConfig) -> Outcome:
    """Run ``sc`` on ``world`` (a fresh one, under a MockClock) and measure it."""
    rng = random.Random(f"{world.seed}/scenario")
    cluster = ReplicationCluster(world, sc.peers, config)
    await cluster.start()
    t0 = trio.current_time()
    victims = rng.sample(cluster.names, len(sc.crashes))
    half = set(rng.sample(cluster.names, sc.peers // 2))
    sides = [sorted(half), sorted(set(cluster.names) - half)]
    events: list[tuple[float, int, Callable[[], None]]] = []

    def at(t: float, fn: Callable[[], None]) -> None:
        events.append((t, len(events), fn))

    for victim, (down, up) in zip(victims, sc.crashes, strict=True):
        at(down, lambda v=victim: cluster.crash(v))
        at(up, lambda v=victim: cluster.restart(v))
    at(sc.partition[0], lambda: cluster.partition(*sides))
    at(sc.partition[1], cluster.heal)
    for i in range(sc.writes):
        at(sc.write_span * (i + 1) / (sc.writes + 1), lambda i=i: _write(cluster, rng, sc, i))
    lo, hi = sc.partition[0], min(sc.partition[1], sc.write_span)
    for j in range(sc.same_key_pairs):  # the same key on both sides while apart
        t = lo + (hi - lo) * (j + 0.5) / sc.same_key_pairs
        for side in sides:
            at(t, lambda s=side, j=j: _write_on(cluster, rng, s, b"both\0%d" % j, j))
    for t, _, fn in sorted(events, key=lambda e: (e[0], e[1])):
        await trio.sleep_until(t0 + t)
        fn()
    await trio.sleep_until(t0 + sc.partition[1])
    waited = await cluster.wait_converged(sc.max_wait)
    return Outcome(
        converged_after=waited,
        lost=len(cluster.lost_writes()),
        writes=len(cluster.writes),
        arrivals=dict(cluster.arrivals()),
        messages=cluster.messages(),
        totals=dict(cluster.totals()),
        catch_ups=cluster.catch_ups,
        rejoins=cluster.rejoins,
        rejoins_due=cluster.rejoins_due,
        sim_seconds=trio.current_time() - t0,
        peers=sc.peers,
        foreign=sum(p.foreign for p in cluster.peers.values()),
    )


def _write(cluster: ReplicationCluster, rng: random.Random, sc: Scenario, i: int) -> None:
    name = rng.choice(sorted(cluster.peers))
    cluster.write(name, b"key\0%d" % rng.randrange(sc.keys), b"v%d" % i)


def _write_on(
    cluster: ReplicationCluster, rng: random.Random, side: list[str], key: bytes, j: int
) -> None:
    running = [n for n in side if n in cluster.peers]
    if running:
        cluster.write(rng.choice(running), key, b"side%d" % j)
