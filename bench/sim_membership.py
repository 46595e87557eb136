"""SWIM membership in simulation: failure detection, join spread, partitions and restarts.

    .venv/bin/python bench/sim_membership.py            # everything, a few minutes
    .venv/bin/python bench/sim_membership.py --seeds 5 --join-seeds 1 --no-reference
    .venv/bin/python bench/sim_membership.py --check    # exit 1 when a target is missed

Every scenario runs drekifs.cluster.swim on tests/harness/simnet.py (in memory, trio's MockClock):
times are simulated seconds, deterministic for a seed; wall times are what the simulation cost.
See bench/README.md for what each scenario does and how to read the tables.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import trio

# The repository root: drekifs from this checkout and the simulations in tests/harness/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simclock import quantile, simulate

from drekifs.cluster.swim import SwimConfig
from tests.harness.simnet import SimWorld
from tests.harness.swim_cluster import Observation, SimCluster

MEMBERLIST_MEDIAN = 9.9  # s: memberlist (LAN profile), 100 peers, 1% loss, one crash
MEMBERLIST_LAN = SwimConfig(  # memberlist's DefaultLANConfig, as near as these knobs go
    suspicion_mult=4, suspicion_max_timeout_mult=6, suspicion_confirmations=2
)
TARGET_MEDIAN = 6.0
TARGET_JOIN = 3.0


# -- Crash detection -------------------------------------------------------------------------


def crash_run(seed: int, config: SwimConfig, peers: int, loss: float) -> dict[str, Any]:
    """One crash in a converged cluster: when each other peer marked it dead, false deaths."""

    async def main() -> dict[str, Any]:
        async with SimWorld(seed=seed, loss=loss) as world:
            cluster = SimCluster(world, peers, config)
            cluster.start_converged(cluster.names)
            await trio.sleep(5)  # probe rounds and phases settle
            victim = random.Random(seed).choice(cluster.names)
            crashed_at = trio.current_time()
            detected: dict[str, float] = {}
            false: list[Observation] = []

            def watch(o: Observation) -> None:
                if o.state != "dead":
                    return
                if o.subject == victim:
                    detected.setdefault(o.observer, o.time - crashed_at)
                else:
                    false.append(o)

            cluster.watch = watch
            false.extend(o for o in cluster.observations if o.state == "dead")
            cluster.crash(victim)
            await cluster.wait_for(lambda: len(detected) >= peers - 1, 60, step=0.5)
            await trio.sleep(10)  # keep watching for false deaths after the detection
            return {
                "detected": list(detected.values()),
                "missed": peers - 1 - len(detected),
                "false": len(false),
                "false_subjects": len({o.subject for o in false}),
            }

    result, wall = simulate(main)
    result["wall"] = wall
    return result


def crash_scenario(label: str, config: SwimConfig, seeds: int, peers: int, loss: float) -> dict:
    times: list[float] = []
    false = missed = false_subjects = 0
    wall = 0.0
    per_seed: list[float] = []
    for seed in range(seeds):
        r = crash_run(seed, config, peers, loss)
        times += r["detected"]
        false += r["false"]
        false_subjects += r["false_subjects"]
        missed += r["missed"]
        wall += r["wall"]
        per_seed.append(statistics.median(r["detected"]) if r["detected"] else float("nan"))
    return {
        "label": label,
        "median": statistics.median(times),
        "p99": quantile(times, 0.99),
        "max": max(times),
        "seed_medians": (min(per_seed), max(per_seed)),
        "false": false,
        "false_subjects": false_subjects,
        "missed": missed,
        "samples": len(times),
        "wall": wall,
        "seeds": seeds,
    }


# -- Join spread -----------------------------------------------------------------------------


def join_run(seed: int, config: SwimConfig, peers: int, loss: float) -> dict[str, Any]:
    """A converged cluster; a new peer joins knowing 3 seeds: when each peer learns of it."""

    async def main() -> dict[str, Any]:
        async with SimWorld(seed=seed, loss=loss) as world:
            cluster = SimCluster(world, peers, config)
            setup = time.perf_counter()
            cluster.start_converged(cluster.names)
            await trio.sleep(2)
            setup = time.perf_counter() - setup
            newcomer = cluster.add_name()
            knows: dict[str, float] = {}
            start = trio.current_time()

            def watch(o: Observation) -> None:
                if o.subject == newcomer and o.state == "alive":
                    knows.setdefault(o.observer, o.time - start)

            cluster.watch = watch
            wall = time.perf_counter()
            cluster.start(newcomer, seeds=random.Random(seed).sample(cluster.names, 3))
            await cluster.wait_for(lambda: len(knows) >= peers, 10, step=0.05)
            joined = cluster.peers[newcomer]
            learned = sum(1 for m in joined.members() if m.state == "alive")
            return {
                "times": sorted(knows.values()),
                "learned": learned,
                "setup": setup,
                "wall": time.perf_counter() - wall,
            }

    result, wall = simulate(main)
    result["total_wall"] = wall
    return result


# -- Partition, crash and restart ------------------------------------------------------------


def story_run(seed: int, config: SwimConfig, peers: int, loss: float) -> tuple[list[str], float]:
    """A partition that heals, then a crash and two restarts (disk kept, then disk lost)."""
    lines: list[str] = []

    async def main() -> None:
        async with SimWorld(seed=seed, loss=loss) as world:
            cluster = SimCluster(world, peers, config)
            names = cluster.names
            t0 = trio.current_time()

            def say(text: str) -> None:
                lines.append(f"  t={trio.current_time() - t0:7.2f} s  {text}")

            def count(state: str, subjects: list[str], observers: list[str]) -> int:
                return sum(
                    cluster.peers[o].state_of(s) == state
                    for o in observers
                    for s in subjects
                    if o != s
                )

            for name in names:
                cluster.start(name)
            took = await cluster.wait_for(cluster.converged, 60)
            say(f"{peers} peers started from DNS seeds; all see all alive after {took:.2f} s")
            await trio.sleep(5)
            a, b = names[: peers // 2], names[peers // 2 :]
            world.partition([cluster.addrs[n] for n in a], [cluster.addrs[n] for n in b])
            say(f"partition: {len(a)} | {len(b)} peers")
            pairs = 2 * len(a) * len(b)

            def split() -> bool:
                return count("dead", b, a) + count("dead", a, b) == pairs

            took = await cluster.wait_for(split, 60)
            say(f"each side sees the other dead after {took:.2f} s")
            await trio.sleep(60)
            world.heal()
            healed_at = trio.current_time()
            say("partition healed (60 s later: past gossip to the dead)")
            for _ in range(12):
                took = await cluster.wait_for(cluster.converged, 10)
                alive = count("alive", names, names)
                if took is not None:
                    break
                say(f"  ... {alive} of {peers * (peers - 1)} views alive")
            refutations = sum(p.counters["refutations"] for p in cluster.peers.values())
            say(
                f"all see all alive again, {trio.current_time() - healed_at:.2f} s after the "
                f"heal; refutations so far: {refutations}"
            )
            victim = names[3]
            old = cluster.saved[victim]
            await trio.sleep(5)
            cluster.crash(victim)
            say(f"{victim} crashes (incarnation {old} saved)")
            took = await cluster.wait_for(
                lambda: all(s == "dead" for s in cluster.views(victim).values()), 60
            )
            say(f"everyone sees {victim} dead after {took:.2f} s")
            await trio.sleep(5)
            peer = cluster.start(victim)
            say(f"{victim} restarts with its saved incarnation: announces {peer.incarnation}")
            took = await cluster.wait_for(
                lambda: all(s == "alive" for s in cluster.views(victim).values()), 30
            )
            incs = {
                m.incarnation
                for n, p in cluster.peers.items()
                if n != victim
                for m in p.members()
                if m.name == victim
            }
            say(f"everyone sees it alive after {took:.2f} s, incarnation {sorted(incs)}")
            before = peer.incarnation
            await trio.sleep(5)
            cluster.crash(victim)
            await cluster.wait_for(
                lambda: all(s == "dead" for s in cluster.views(victim).values()), 60
            )
            say(f"{victim} crashes again; dead everywhere in its life {before}")
            peer = cluster.start(victim, incarnation=0)
            say(f"{victim} restarts with its disk lost: starts at incarnation {peer.incarnation}")
            took = await cluster.wait_for(
                lambda: all(s == "alive" for s in cluster.views(victim).values()), 30
            )
            saves = [inc for _, n, inc in cluster.saves if n == victim]
            say(
                f"told it is dead, it refuted {peer.counters['refutations']}x, now incarnation "
                f"{peer.incarnation} (saved first: {saves[-1] == peer.incarnation}); everyone "
                f"sees it alive after {took:.2f} s"
            )
            errors = sum(
                p.counters["internal_errors"] + p.counters["malformed"]
                for p in cluster.peers.values()
            )
            say(f"internal errors + malformed datagrams: {errors}")

    _, wall = simulate(main)
    return lines, wall


# -- Output ----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=30, help="crash runs (default 30)")
    parser.add_argument(
        "--reference-seeds",
        type=int,
        default=10,
        help="crash runs with memberlist's LAN timing (default 10)",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip those")
    parser.add_argument("--peers", type=int, default=100)
    parser.add_argument("--loss", type=float, default=0.01)
    parser.add_argument("--join-peers", type=int, default=1000)
    parser.add_argument("--join-seeds", type=int, default=3)
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args()
    config = SwimConfig()
    ok = True

    print(
        f"SWIM membership, simulated: {args.peers} peers, {args.loss:.0%} datagram loss, "
        f"delay 0.2-2 ms"
    )
    low, high = config.suspicion_timeouts(args.peers)
    print(
        f"defaults: probe {config.probe_interval} s / timeout {config.probe_timeout} s, "
        f"{config.indirect_checks} indirect, suspicion {low:.1f}-{high:.1f} s with "
        f"{config.suspicion_confirmations} confirmations, gossip {config.gossip_interval} s "
        f"x {config.gossip_nodes}, retransmit x{config.retransmit_limit(args.peers)}"
    )
    print()
    print("1. One peer crashes: seconds until each other peer marks it dead")
    rows = [crash_scenario("drekifs", config, args.seeds, args.peers, args.loss)]
    if not args.no_reference:
        rows.append(
            crash_scenario(
                "memberlist timing, this sim",
                MEMBERLIST_LAN,
                args.reference_seeds,
                args.peers,
                args.loss,
            )
        )
    header = (
        f"  {'':30} {'runs':>5} {'samples':>8} {'median':>7} {'p99':>6} {'max':>6} "
        f"{'run medians':>12} {'false deaths':>13} {'missed':>7} {'wall':>7}"
    )
    print(header)
    for r in rows:
        lo, hi = r["seed_medians"]
        print(
            f"  {r['label']:30} {r['seeds']:5d} {r['samples']:8d} {r['median']:6.2f}s "
            f"{r['p99']:5.2f}s {r['max']:5.2f}s {lo:5.2f}-{hi:5.2f}s "
            f"{r['false']:13d} {r['missed']:7d} {r['wall']:6.1f}s"
        )
    print(f"  {'memberlist (published)':30} {'':5} {'':8} {MEMBERLIST_MEDIAN:6.2f}s")
    met = rows[0]["median"] <= TARGET_MEDIAN and rows[0]["false"] == 0 and not rows[0]["missed"]
    ok &= met
    print(
        f"  target: median <= {TARGET_MEDIAN} s, no false death: {'[met]' if met else '[missed]'}"
    )
    print()

    print(f"2. A peer joins {args.join_peers} (knowing 3 seeds): seconds until peers know it")
    print(
        f"  {'seed':>4} {'50%':>7} {'99%':>7} {'100%':>7} {'knew':>6} {'it learned':>10} "
        f"{'setup wall':>10} {'join wall':>10} {'total wall':>10}"
    )
    worst = 0.0
    for seed in range(args.join_seeds):
        r = join_run(seed, config, args.join_peers, args.loss)
        t = r["times"]
        complete = len(t) >= args.join_peers
        last = t[-1] if complete else float("inf")
        worst = max(worst, last)
        print(
            f"  {seed:4d} {quantile(t, 0.5):6.2f}s {quantile(t, 0.99):6.2f}s "
            f"{last:6.2f}s {len(t):6d} {r['learned']:10d} {r['setup']:9.1f}s "
            f"{r['wall']:9.1f}s {r['total_wall']:9.1f}s"
        )
    met = worst <= TARGET_JOIN
    ok &= met
    print(f"  target: everyone within {TARGET_JOIN} s: {'[met]' if met else '[missed]'}")
    print()

    print("3. Partition and heal, crash and restarts (50 peers, 1% loss)")
    lines, wall = story_run(1, config, 50, args.loss)
    print("\n".join(lines))
    print(f"  wall {wall:.1f} s")
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
