"""Plumtree broadcast in simulation: tree formation, redundancy, loss and a crash in the tree.

    .venv/bin/python bench/sim_broadcast.py              # everything, a few minutes
    .venv/bin/python bench/sim_broadcast.py --peers 200 --measured 5
    .venv/bin/python bench/sim_broadcast.py --check      # exit 1 when a target is missed

Every scenario runs drekifs.cluster.plumtree on tests/harness/simnet.py (in memory, trio's
MockClock): times are simulated seconds, deterministic for a seed; wall times are what the
simulation cost. See bench/README.md for what each scenario does and how to read the tables.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

# The repository root: drekifs from this checkout and the simulations in tests/harness/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simclock import quantile, simulate

from drekifs.cluster.plumtree import PlumtreeConfig
from tests.harness.plumtree_cluster import BroadcastCluster
from tests.harness.simnet import SimWorld

LINK = (0.019, 0.021)  # one-way delay: 20 ms, +-1 ms so no two messages arrive at one instant
PAYLOAD = b"x" * 1024  # what rides is opaque; its size does not change simulated times
TARGET_999 = 1.0  # s to 99.9% of peers
TARGET_ALL = 2.0  # s to 100%
TARGET_REDUNDANCY = 0.1  # duplicates / useful deliveries after the warm-up
SETTLE = 2.0  # s after the last delivery: late duplicates, IHAVEs and PRUNEs are counted


@dataclass
class One:
    """One broadcast: when peers got it, what it cost."""

    t999: float
    t100: float | None  # None: some live peer never got it (within the wait)
    missed: int
    messages: int  # calls and datagrams sent by every peer, lost ones included
    pushes: int
    duplicates: int
    deliveries: int
    grafts: int


@dataclass
class Run:
    label: str
    peers: int
    first: One | None = None
    measured: list[One] = field(default_factory=list)
    tree_edges: int = 0
    tree_connected: bool = False
    wall: float = 0.0
    setup_wall: float = 0.0
    notes: list[str] = field(default_factory=list)


def traffic(cluster: BroadcastCluster) -> int:
    stats = cluster.world.stats
    return stats["datagrams"] + stats["calls"] + sum(net.lost for net in cluster.nets.values())


async def one_broadcast(cluster: BroadcastCluster, source: str, mid: bytes, wait: float) -> One:
    before, sent = cluster.totals(), traffic(cluster)
    start = trio.current_time()
    cluster.broadcast(source, mid, PAYLOAD)
    await cluster.wait_delivered(mid, wait)
    await trio.sleep(SETTLE)
    after = cluster.totals() - before
    times = [t - start for n, t in cluster.delivered(mid).items() if n != source]
    live = len(cluster.peers) - 1
    missed = live - len(times)
    return One(
        t999=quantile(times, 0.999) if times else float("inf"),
        t100=max(times) if not missed and times else None,
        missed=missed,
        messages=traffic(cluster) - sent,
        pushes=after["gossip_sent"] + after["gossip_failed"],
        duplicates=after["duplicates"],
        deliveries=after["delivered"],
        grafts=after["graft_ids"],
    )


def connected(cluster: BroadcastCluster) -> bool:
    edges = cluster.tree_edges()
    adjacent: dict[str, set[str]] = {name: set() for name in cluster.peers}
    for edge in edges:
        a, b = tuple(edge)
        adjacent[a].add(b)
        adjacent[b].add(a)
    start = next(iter(adjacent))
    reached, frontier = {start}, [start]
    while frontier:  # bounded: each peer enters once
        for other in adjacent[frontier.pop()]:
            if other not in reached:
                reached.add(other)
                frontier.append(other)
    return len(reached) == len(adjacent)


def scenario(
    label: str,
    seed: int,
    peers: int,
    config: PlumtreeConfig,
    *,
    loss: float = 0.0,
    warmup: int = 4,
    measured: int = 10,
    crash: bool = False,
) -> Run:
    """A first write into a fresh cluster, ``warmup`` more, then ``measured`` ones, each from a
    random peer, one at a time. With ``crash``, the peer with the most tree links crashes after
    the warm-up and the measured writes go on without telling anyone (half of them), then with
    the membership updated as SWIM would (the other half)."""
    run = Run(label, peers)

    async def main() -> None:
        async with SimWorld(seed=seed, loss=loss, delay=LINK) as world:
            rng = random.Random(seed)
            wall = time.perf_counter()
            cluster = BroadcastCluster(world, peers, config, call_loss=loss)
            await cluster.start()
            run.setup_wall = time.perf_counter() - wall
            source = rng.choice(cluster.names)
            run.first = await one_broadcast(cluster, source, b"first", 30)
            for i in range(warmup):
                await one_broadcast(cluster, rng.choice(list(cluster.peers)), b"w%d" % i, 30)
            if crash:
                by_links = {n: len(p.eager) for n, p in cluster.peers.items()}
                victim = max(by_links, key=lambda n: (by_links[n], n))
                run.notes.append(f"crashed {victim}, {by_links[victim]} tree links")
                cluster.crash(victim)
            for i in range(measured):
                if crash and i == measured // 2:
                    await trio.sleep(3)  # SWIM's detection, roughly
                    cluster.update_membership()
                    run.notes.append(f"membership updated before write {i}")
                name = rng.choice(list(cluster.peers))
                run.measured.append(await one_broadcast(cluster, name, b"m%d" % i, 30))
            run.tree_edges = len(cluster.tree_edges())
            run.tree_connected = connected(cluster)
            totals = cluster.totals()
            run.notes.append(
                "totals: "
                + ", ".join(
                    f"{k} {totals[k]}"
                    for k in (
                        "optimized",
                        "graft_ids",
                        "graft_gave_up",
                        "prune_sent",
                        "gossip_failed",
                        "sends_dropped",
                    )
                )
            )
            bad = totals["internal_errors"] + totals["malformed"]
            if bad:
                run.notes.append(f"internal errors or malformed: {bad}")

    _, run.wall = simulate(main)
    return run


def fmt(t: float | None) -> str:
    return "never" if t is None else f"{t:.3f}"


def report(run: Run) -> list[str]:
    """Print a run; the targets it misses."""
    misses: list[str] = []
    n = run.peers
    first = run.first
    assert first is not None
    print(f"\n## {run.label}: {n} peers (wall {run.wall:.1f} s, setup {run.setup_wall:.1f} s)")
    print(
        "  first write (all eager, tree forming): "
        f"99.9% {fmt(first.t999)} s, 100% {fmt(first.t100)} s, missed {first.missed}, "
        f"{first.messages / n:.1f} messages/peer, {first.pushes / n:.2f} pushes/peer, "
        f"duplicates/deliveries {first.duplicates / max(first.deliveries, 1):.2f}"
    )
    m = run.measured
    if m:
        t999 = [o.t999 for o in m]
        t100 = [o.t100 for o in m]
        dup, useful = sum(o.duplicates for o in m), sum(o.deliveries for o in m)
        redundancy = dup / max(useful, 1)
        print(
            f"  {len(m)} writes after warm-up: 99.9% median {statistics.median(t999):.3f} s "
            f"(max {max(t999):.3f}), 100% median "
            f"{fmt(statistics.median([t for t in t100 if t is not None] or [0.0]))} s "
            f"(max {fmt(None if None in t100 else max(t for t in t100 if t is not None))}), "
            f"missed {sum(o.missed for o in m)}"
        )
        print(
            f"  per write: {statistics.mean(o.messages for o in m) / n:.1f} messages/peer, "
            f"{statistics.mean(o.pushes for o in m) / n:.2f} pushes/peer, "
            f"{statistics.mean(o.grafts for o in m):.1f} ids grafted; "
            f"redundancy {dup}/{useful} = {redundancy:.4f}"
        )
        print(f"  tree: {run.tree_edges} eager links, connected {run.tree_connected}")
        if sum(o.missed for o in m):
            misses.append(f"{run.label}: a live peer missed a write")
    for note in run.notes:
        print(f"  {note}")
    return misses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--measured", type=int, default=10)
    parser.add_argument("--loss", type=float, default=0.1)
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    config = PlumtreeConfig()
    print(f"Plumtree, {args.peers} peers, links {LINK[0] * 1000:.0f}-{LINK[1] * 1000:.0f} ms")
    print(f"config: {config}")
    misses: list[str] = []
    total = time.perf_counter()

    base = scenario(
        "no loss", args.seed, args.peers, config, warmup=args.warmup, measured=args.measured
    )
    misses += report(base)
    assert base.first is not None
    if base.first.t999 > TARGET_999 or base.first.t100 is None or base.first.t100 > TARGET_ALL:
        misses.append("no loss: first write too slow")
    for o in base.measured:
        if o.t999 > TARGET_999 or o.t100 is None or o.t100 > TARGET_ALL:
            misses.append("no loss: a write after warm-up too slow")
            break
    dup = sum(o.duplicates for o in base.measured)
    if dup / max(sum(o.deliveries for o in base.measured), 1) > TARGET_REDUNDANCY:
        misses.append("no loss: redundancy above target")

    lossy = scenario(
        f"{args.loss:.0%} loss (datagrams and calls)",
        args.seed,
        args.peers,
        config,
        loss=args.loss,
        warmup=args.warmup,
        measured=args.measured,
    )
    misses += report(lossy)
    assert lossy.first is not None
    if lossy.first.missed:
        misses.append("loss: the first write missed a peer")

    crashed = scenario(
        "crash in the tree",
        args.seed,
        args.peers,
        config,
        warmup=args.warmup,
        measured=args.measured,
        crash=True,
    )
    misses += report(crashed)

    print(f"\ntotal wall {time.perf_counter() - total:.1f} s")
    for miss in misses:
        print(f"MISSED: {miss}")
    return 1 if args.check and misses else 0


if __name__ == "__main__":
    sys.exit(main())
