"""SWIM membership in simulation: failure detection, slow peers, join spread, partitions, restarts.

    .venv/bin/python bench/sim_membership.py            # everything, ten minutes or so
    .venv/bin/python bench/sim_membership.py --seeds 5 --slow-seeds 5 --join-seeds 1
    .venv/bin/python bench/sim_membership.py --check    # exit 1 when a target is missed
    .venv/bin/python bench/sim_membership.py --sweep    # the settings table of docs/decisions.md

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

from drekifs.cluster.swim import Membership, SwimConfig
from tests.harness.simnet import GilbertElliott, SimWorld
from tests.harness.swim_cluster import (
    LAN_LATENCY,
    NoRefutation,
    Observation,
    SimCluster,
    slow_peer_run,
)

# memberlist's DefaultLANConfig (config.go): probe 1 s / 0.5 s, 3 indirect checks, awareness 8,
# gossip 3 peers every 200 ms, retransmit 4; SuspicionMult 4, SuspicionMaxTimeoutMult 6, and
# (state.go) k = SuspicionMult - 2 = 2 confirmations; the same timeout formulas as ours.
MEMBERLIST_LAN = SwimConfig(
    suspicion_mult=4, suspicion_max_timeout_mult=6, suspicion_confirmations=2, retransmit_mult=4
)
TARGET_MEDIAN = 7.0
TARGET_JOIN = 3.0

# -- The network ---------------------------------------------------------------------------


def lan(seed: int, loss: float, bursty: bool = False) -> SimWorld:
    """A LAN: long-tailed delays, each peer's CPU per message; ``loss`` independent, or in
    bursts of the same average (Gilbert-Elliott at both ends of each datagram)."""
    if not bursty:
        return SimWorld(seed=seed, loss=loss, latency=LAN_LATENCY)
    per_end = loss / 2
    bursts = GilbertElliott(mean_good=0.5 * 0.5 / per_end - 0.5, mean_bad=0.5, loss_bad=0.5)
    return SimWorld(seed=seed, latency=LAN_LATENCY, bursts=bursts)


# -- Crash detection -------------------------------------------------------------------------


def crash_run(
    seed: int,
    config: SwimConfig,
    peers: int,
    loss: float,
    *,
    bursty: bool = False,
    membership: type[Membership] = Membership,
    watch_after: float = 10.0,
) -> dict[str, Any]:
    """One crash in a converged cluster: when each other peer marked it dead, false deaths."""

    async def main() -> dict[str, Any]:
        async with lan(seed, loss, bursty) as world:
            cluster = SimCluster(world, peers, config, membership=membership)
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
            await trio.sleep(watch_after)  # keep watching for false deaths after the detection
            return {
                "detected": list(detected.values()),
                "missed": peers - 1 - len(detected),
                "false": len(false),
                "false_subjects": len({o.subject for o in false}),
            }

    result, wall = simulate(main)
    result["wall"] = wall
    return result


def crash_scenario(
    label: str, config: SwimConfig, seeds: int, peers: int, loss: float, **kw: Any
) -> dict:
    times: list[float] = []
    false = missed = false_subjects = 0
    wall = 0.0
    per_seed: list[float] = []
    for seed in range(seeds):
        r = crash_run(seed, config, peers, loss, **kw)
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


# -- Slow peers --------------------------------------------------------------------------------


def slow_scenario(
    label: str,
    config: SwimConfig,
    seeds: int,
    peers: int,
    *,
    slow: int = 5,
    late: float = 2.0,
    duration: float = 60.0,
    loss: float = 0.0,
    membership: type[Membership] = Membership,
) -> dict[str, Any]:
    """Lifeguard's test: ``slow`` of ``peers`` handle every message ``late`` s late; nobody
    crashes, so every "dead" any peer reports is false."""
    deaths = subjects = suspicions = refutations = 0
    bad_runs = 0
    wall = 0.0
    for seed in range(seeds):

        async def main(seed: int = seed) -> Any:
            async with lan(seed, loss) as world:
                cluster = SimCluster(world, peers, config, membership=membership)
                return await slow_peer_run(cluster, slow, late, duration, seed)

        r, w = simulate(main)
        deaths += len(r.deaths)
        subjects += len(r.dead_subjects)
        bad_runs += bool(r.deaths)
        suspicions += r.suspicions
        refutations += r.refutations
        wall += w
    return {
        "label": label,
        "seeds": seeds,
        "deaths": deaths,
        "subjects": subjects,
        "bad_runs": bad_runs,
        "suspicions": suspicions / seeds,
        "refutations": refutations / seeds,
        "wall": wall,
    }


def print_slow(rows: list[dict[str, Any]]) -> None:
    print(
        f"  {'':34} {'runs':>5} {'false deaths':>13} {'peers':>6} {'runs hit':>8} "
        f"{'suspicions/run':>15} {'refutations/run':>16} {'wall':>7}"
    )
    for r in rows:
        print(
            f"  {r['label']:34} {r['seeds']:5d} {r['deaths']:13d} {r['subjects']:6d} "
            f"{r['bad_runs']:8d} {r['suspicions']:15.0f} {r['refutations']:16.0f} "
            f"{r['wall']:6.1f}s"
        )


SWEEP = [(1.5, 3), (2.0, 3), (2.5, 3), (3.0, 3), (4.0, 2)]  # (suspicion_mult, confirmations)


def sweep(
    settings: list[tuple[float, int]], seeds: int, slow_seeds: int, peers: int, loss: float
) -> None:
    """Detection vs false deaths over suspicion settings: the table in docs/decisions.md."""
    print(
        f"Settings sweep: {peers} peers; detection at {loss:.0%} loss ({seeds} crashes), slow "
        f"peers (5 handle every message 2 s late, 60 s, {slow_seeds} runs)"
    )
    print(
        f"  {'mult':>4} {'k':>2} {'min-max s':>10} {'median':>7} {'p99':>6} "
        f"{'false (crash)':>13} {'false (slow)':>12} {'peers':>6} {'runs hit':>8}"
    )
    for mult, k in settings:
        config = SwimConfig(suspicion_mult=mult, suspicion_confirmations=k)
        low, high = config.suspicion_timeouts(peers)
        c = crash_scenario("", config, seeds, peers, loss)
        s = slow_scenario("", config, slow_seeds, peers)
        print(
            f"  {mult:4.1f} {k:2d} {low:4.0f}-{high:<5.0f} {c['median']:6.2f}s {c['p99']:5.2f}s "
            f"{c['false']:13d} {s['deaths']:12d} {s['subjects']:6d} {s['bad_runs']:8d}",
            flush=True,
        )


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
    parser.add_argument(
        "--slow-seeds", type=int, default=30, help="slow-peer runs of 60 s (default 30)"
    )
    parser.add_argument(
        "--sweep",
        nargs="*",
        metavar="MULT:K",
        help="only the table over suspicion settings (suspicion_mult:confirmations; default "
        + " ".join(f"{m:g}:{k}" for m, k in SWEEP)
        + ")",
    )
    parser.add_argument("--peers", type=int, default=100)
    parser.add_argument("--loss", type=float, default=0.01)
    parser.add_argument("--join-peers", type=int, default=1000)
    parser.add_argument("--join-seeds", type=int, default=3)
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args()
    config = SwimConfig()
    ok = True
    if args.sweep is not None:
        settings = [(float(m), int(k)) for m, k in (x.split(":") for x in args.sweep)]
        sweep(settings or SWEEP, args.seeds, args.slow_seeds, args.peers, args.loss)
        return 0

    print(
        f"SWIM membership, simulated: {args.peers} peers, {args.loss:.0%} datagram loss, "
        f"one-way delay lognormal (median {LAN_LATENCY.median * 1000:g} ms, sigma "
        f"{LAN_LATENCY.sigma}), {SimWorld().handler_cost[0] * 1e6:.1f} us of CPU per message"
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
    rows.append(
        crash_scenario(
            "drekifs, loss in bursts", config, args.seeds, args.peers, args.loss, bursty=True
        )
    )
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
    met = rows[0]["median"] <= TARGET_MEDIAN and rows[0]["false"] == 0 and not rows[0]["missed"]
    ok &= met
    print(
        f"  target: median <= {TARGET_MEDIAN} s, no false death: {'[met]' if met else '[missed]'}"
    )
    print()

    print(
        f"1b. Lifeguard's slow-peer test: 5 of {args.peers} peers handle every message 2 s late, "
        "60 s, nobody crashes"
    )
    slow_rows = [slow_scenario("drekifs", config, args.slow_seeds, args.peers)]
    if not args.no_reference:
        slow_rows.append(
            slow_scenario(
                "memberlist timing, this sim", MEMBERLIST_LAN, args.reference_seeds, args.peers
            )
        )
        slow_rows.append(
            slow_scenario(
                "drekifs, refutation off",
                config,
                min(3, args.slow_seeds),
                args.peers,
                membership=NoRefutation,
            )
        )
    print_slow(slow_rows)
    met = slow_rows[0]["deaths"] == 0
    ok &= met
    print(f"  target: no false death: {'[met]' if met else '[missed]'}")
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
