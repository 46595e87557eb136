"""Plumtree broadcast and anti-entropy together, in simulation: writes through crashes, restarts
and a 50|50 partition, then convergence after the heal.

    .venv/bin/python bench/sim_replication.py                 # 1,000 peers, 5 seeds, ~3 min
    .venv/bin/python bench/sim_replication.py --peers 100 --writes 200 --seeds 3
    .venv/bin/python bench/sim_replication.py --check         # exit 1 on a miss

Runs tests/harness/replication_cluster.py (both protocols per peer, durable dict stores,
membership given by the harness) on tests/harness/simnet.py (in memory, trio's MockClock): times
are simulated seconds, deterministic for a seed; wall times are what the simulation cost. Seeds
run in ``--jobs`` processes. See bench/README.md for the scenario and how to read the table.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# The repository root: drekifs from this checkout and the simulations in tests/harness/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from drekifs.cluster.rejoin import RETURN_EXCHANGES
from tests.harness.replication_cluster import (
    ANTIENTROPY,
    BROADCAST,
    Outcome,
    ReplConfig,
    Scenario,
    run_scenario,
    run_seeded,
)
from tests.harness.simnet import SimWorld

LINK = (0.019, 0.021)  # one-way delay: 20 ms, +-1 ms so no two messages arrive at one instant


@dataclass(frozen=True)
class Job:
    seed: int
    scenario: Scenario
    loss: float
    rejoin: int


@dataclass
class Result:
    seed: int
    out: Outcome
    wall: float


def run_one(job: Job) -> Result:
    async def main() -> Outcome:
        async with SimWorld(seed=job.seed, loss=job.loss, delay=LINK) as world:
            config = ReplConfig(call_loss=job.loss, rejoin_exchanges=job.rejoin)
            return await run_scenario(world, job.scenario, config)

    wall = time.perf_counter()
    out = run_seeded(main, job.seed)
    return Result(job.seed, out, time.perf_counter() - wall)


def share(out: Outcome) -> tuple[float, float, float]:
    """(broadcast, anti-entropy, superseded) shares of (write, other peer) pairs."""
    total = max(1, sum(out.arrivals.values()))
    a = out.arrivals
    return (
        a.get(BROADCAST, 0) / total,
        a.get(ANTIENTROPY, 0) / total,
        a.get("superseded", 0) / total,
    )


def report(results: list[Result]) -> list[str]:
    """Print the table; the misses."""
    misses = []
    print(
        "\n| seed | writes | converged after heal | lost | messages/peer: IHAVE/GRAFT/PRUNE, "
        "pushes, AE calls | broadcast / AE / superseded | catch-ups (s) | rejoin exchanges "
        "started / due | sim s | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        o, n = r.out, r.out.peers
        m = o.messages
        b, ae, sup = share(o)
        conv = "never" if o.converged_after is None else f"{o.converged_after:.2f} s"
        ups = ", ".join("failed" if c.seconds is None else f"{c.seconds:.2f}" for c in o.catch_ups)
        print(
            f"| {r.seed} | {o.writes} | {conv} | {o.lost} | "
            f"{m['datagrams'] / n:.1f}, {m['pushes'] / n:.1f}, {m['ae_calls'] / n:.1f} | "
            f"{b:.1%} / {ae:.1%} / {sup:.1%} | {ups} | {o.rejoins} / {o.rejoins_due} | "
            f"{o.sim_seconds:.1f} | {r.wall:.1f} |"
        )
        if o.converged_after is None:
            misses.append(f"seed {r.seed}: no convergence")
        if o.lost:
            misses.append(f"seed {r.seed}: {o.lost} (peer, acknowledged write) pairs lost")
        bugs = sum(
            o.totals.get(k, 0)
            for k in ("internal_errors", "malformed", "store_errors", "ae_errors", "ae_bad_replies")
        )
        if bugs or o.foreign:
            misses.append(f"seed {r.seed}: {bugs} protocol errors, {o.foreign} foreign datagrams")
    done = [r.out.converged_after for r in results if r.out.converged_after is not None]
    if done:
        print(
            f"\nconvergence after the heal: median {statistics.median(done):.2f} s, "
            f"max {max(done):.2f} s (membership detection is {ReplConfig().detect:.0f} s of it)"
        )
    shares = [share(r.out) for r in results]
    print(
        "delivered by broadcast {:.1%}, repaired by anti-entropy {:.1%}, superseded {:.1%} "
        "(mean over seeds)".format(*(statistics.mean(s[i] for s in shares) for i in range(3)))
    )
    return misses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--writes", type=int, default=20, help="at random peers over 20 s")
    parser.add_argument("--same-key", type=int, default=5, help="keys written on both sides")
    parser.add_argument("--keys", type=int, default=0, help="keys written (0: 3/5 of writes)")
    parser.add_argument("--loss", type=float, default=0.05)
    parser.add_argument(
        "--rejoin",
        type=int,
        default=RETURN_EXCHANGES,
        help="returning members each peer tries, until one exchange brings news (the daemon's "
        f"rule: {RETURN_EXCHANGES}); 0 for none",
    )
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--check", action="store_true", help="exit 1 on a miss")
    args = parser.parse_args()
    scenario = Scenario(
        peers=args.peers,
        writes=args.writes,
        keys=args.keys or max(1, args.writes * 3 // 5),
        same_key_pairs=args.same_key,
    )
    print(
        f"Replication (Plumtree + anti-entropy), {args.peers} peers, links "
        f"{LINK[0] * 1000:.0f}-{LINK[1] * 1000:.0f} ms, {args.loss:.0%} loss of datagrams and "
        f"calls, seeds {args.first_seed}..{args.first_seed + args.seeds - 1}"
    )
    print(f"scenario: {scenario}")
    jobs = [
        Job(seed, scenario, args.loss, args.rejoin)
        for seed in range(args.first_seed, args.first_seed + args.seeds)
    ]
    total = time.perf_counter()
    if args.jobs > 1:
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            results = pool.map(run_one, jobs, chunksize=1)
    else:
        results = [run_one(job) for job in jobs]
    misses = report(results)
    print(f"total wall {time.perf_counter() - total:.1f} s ({args.jobs} processes)")
    for miss in misses:
        print(f"MISSED: {miss}")
    return 1 if args.check and misses else 0


if __name__ == "__main__":
    sys.exit(main())
