"""A peer that crashes and restarts at once: do the others suspect it? SWIM on real transports.

    .venv/bin/python bench/swim_restart.py [--peers 5] [--runs 10] [--watch 5]

Each run starts ``--peers`` memberships, each on its own Transport on 127.0.0.1 (real UDP and
TCP, one process), waits until all see all alive, then crashes the last one (its membership
and transport cancelled, no leave) and starts it again at once on the same port with the next
incarnation, as a daemon restarted by systemd would be. For ``--watch`` seconds it counts the
other peers' reports of it as suspect or dead, and what the restarted transport refused
(``udp.dropped.*``, e.g. datagrams sealed for its previous life since issue 17) and how many
times the others learnt a new instance from a RETRY. Prints one line per run and the totals.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from drekifs.cluster.keyring import KeyRing
from drekifs.cluster.swim.config import SwimConfig
from drekifs.cluster.swim.membership import Membership
from drekifs.cluster.transport import Transport

WORLD = "bench.world"
CONVERGE = 30.0  # seconds a start may take before the run fails


async def one_run(peers: int, watch: float) -> dict[str, Any]:
    ring = KeyRing.generate()
    victim = f"n{peers - 1}"
    reports: collections.Counter[str] = collections.Counter()
    async with trio.open_nursery() as top:
        transports = []
        for _ in range(peers):
            t = Transport(WORLD, ring, ("127.0.0.1", 0))
            await top.start(t.serve)
            transports.append(t)
        seeds = {f"n{i}": t.addr for i, t in enumerate(transports)}

        async def run_peer(name: str, t: Transport, incarnation: int, task_status) -> None:
            m = Membership(name, t, SwimConfig(), incarnation=incarnation)
            m.set_seeds(seeds)
            if name != victim:
                m.watchers.append(
                    lambda info: (
                        reports.update([str(info.state)])
                        if info.name == victim and str(info.state) in ("suspect", "dead")
                        else None
                    )
                )
            with trio.CancelScope() as scope:
                task_status.started((m, scope))
                await m.run()

        running = [await top.start(run_peer, f"n{i}", t, 0) for i, t in enumerate(transports)]
        with trio.fail_after(CONVERGE):
            while any(
                sum(1 for x in m.members() if str(x.state) == "alive") < peers for m, _ in running
            ):
                await trio.sleep(0.05)
        reports.clear()
        running[-1][1].cancel()  # the crash: no leave
        await transports[-1].aclose()
        restarted = Transport(WORLD, ring, transports[-1].addr)
        await top.start(restarted.serve)
        await top.start(run_peer, victim, restarted, 1)
        await trio.sleep(watch)
        top.cancel_scope.cancel()
    return {
        "suspect": reports["suspect"],
        "dead": reports["dead"],
        "refused": {k: v for k, v in restarted.counters.items() if k.startswith("udp.dropped.")},
        "relearnt": sum(t.counters["udp.receiver-restarted"] for t in transports[:-1]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", type=int, default=5)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--watch", type=float, default=5.0)
    args = p.parse_args()
    total: collections.Counter[str] = collections.Counter()
    for n in range(args.runs):
        r = trio.run(one_run, args.peers, args.watch)
        print(f"run {n + 1}: {r}")
        total.update(suspect=r["suspect"], dead=r["dead"], relearnt=r["relearnt"])
        total.update(r["refused"])
    print(f"{args.runs} runs, {args.peers} peers: {dict(total)}")


if __name__ == "__main__":
    main()
