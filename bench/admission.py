"""What a flood of connections that never authenticate does to a real peer's new connections.

    .venv/bin/python bench/admission.py [--probes 100] [--flood 2540]

A server Transport in a process of its own (echo handler, the limits of each case), the flood of
tests/mounted/flood.py (silent connections from 160 addresses 127.0.x.y and 40 from 127.0.0.1,
each opened again when closed), and a real client on 127.0.0.1 that opens a *new* connection
for every call (a fresh Transport each time: connect, handshake, call): ``--probes`` of them,
one every 50 ms. Each case prints the probes that failed, p50/p99 of those that did not, the
server's CPU share, and its evictions and handshake timeouts per second.

Cases (each flood --flood connections in all, 40 of them from the client's own address):
- **no flood**: the floor.
- **held**: the default limits (4,096 handshakes): the flood is held, closed after the 5 s
  handshake timeout and opened again.
- **churn**: 256 handshakes for the same flood: every new connection evicts the oldest.
- **churn, refusing**: the mutation check of the eviction: the same, but a full budget refuses
  the new connection (as admission did before issue 17) instead of evicting the oldest.
- **timeout 1 s**: the default budget and a 1 s handshake timeout (the "short pre-auth
  timeout" idea): the flood is closed, and opened again, five times as often.
- **timeout 30 s**: and a 30 s one (no timeout, hence no re-opening, while probing).
Takes about five minutes (``--cases`` picks some).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from drekifs.cluster import admission
from drekifs.cluster.keyring import KeyRing
from drekifs.cluster.limits import Limits
from drekifs.cluster.transport import Transport

ROOT = Path(__file__).resolve().parent.parent
WORLD = "bench.world"
KEY_ENV = "DREKIFS_BENCH_KEY"
ADDRESSES = 160
OWN = 40
PROBE_EVERY = 0.05
SETTLE = 6.0  # seconds of flood before probing: past one handshake timeout


def flood_sources(total: int) -> list[str]:
    others = total - OWN
    per, extra = divmod(others, ADDRESSES)
    out = [f"127.0.{1 + i // 200}.{2 + i % 200}={per + (i < extra)}" for i in range(ADDRESSES)]
    return [*out, f"127.0.0.1={OWN}"]


# -- the server (a child process) -----------------------------------------------------------------


def refuse_when_full(self: admission.Admission, host: str):
    """Admission.arrive as it was before issue 17: a full budget refuses the newcomer."""
    full = len(self._handshakes) >= self.limits.max_handshakes
    of_host = self._handshakes_of.get(host, {})
    ticket = admission.Ticket(host)
    if full or len(of_host) >= self.limits.max_handshakes_per_host:
        ticket.state = admission.GONE
        return ticket, ticket  # evicted at once: the new connection is closed
    self._handshakes[ticket] = None
    self._handshakes_of.setdefault(host, {})[ticket] = None
    return ticket, None


async def serve(limits: Limits) -> None:
    logging.getLogger("drekifs").setLevel(logging.ERROR)  # the drops are counted
    ring = KeyRing((base64.b64decode(os.environ[KEY_ENV]),))
    t = Transport(WORLD, ring, ("127.0.0.1", 0), limits=limits)

    async def echo(peer, args):
        return args

    t.register("echo", echo, inline=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(t.serve)
        print(t.addr[1], flush=True)
        while True:  # counters on stdin's request, one JSON line each
            line = await trio.to_thread.run_sync(sys.stdin.readline)
            if not line:
                nursery.cancel_scope.cancel()
                return
            times = os.times()
            print(json.dumps({**t.counters, "cpu": times.user + times.system}), flush=True)


# -- the bench -------------------------------------------------------------------------------------


def raise_nofile() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def probe(ring: KeyRing, port: int) -> float | None:
    """One call on a new connection from 127.0.0.1: its time, or None if it failed."""
    client = Transport(WORLD, ring, ("127.0.0.1", 0))
    async with trio.open_nursery() as nursery:
        await nursery.start(client.serve)
        start = time.monotonic()
        try:
            await client.call(("127.0.0.1", port), "echo", 1, timeout=2.0)
        except Exception:
            took = None
        else:
            took = time.monotonic() - start
        await client.aclose()
    return took


def run_case(name: str, args: list[str], flood: int, probes: int, ring: KeyRing) -> None:
    env = {**os.environ, KEY_ENV: base64.b64encode(ring.primary).decode()}
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert server.stdin is not None and server.stdout is not None
    port = int(server.stdout.readline())

    def counters() -> dict:
        server.stdin.write("\n")
        server.stdin.flush()
        return json.loads(server.stdout.readline())

    flooder = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if flood:
                status = os.path.join(tmp, "status")
                flooder = subprocess.Popen(
                    [
                        *(sys.executable, "-m", "tests.mounted.flood"),
                        *(f"127.0.0.1:{port}", status, *flood_sources(flood)),
                    ],
                    cwd=ROOT,
                )
                time.sleep(SETTLE)
            before, t0 = counters(), time.monotonic()
            took = []
            for i in range(probes):
                time.sleep(max(0.0, t0 + i * PROBE_EVERY - time.monotonic()))
                took.append(trio.run(probe, ring, port))
            after, elapsed = counters(), time.monotonic() - t0
        finally:
            if flooder is not None:
                flooder.kill()
                flooder.wait()
            server.stdin.close()
            server.wait(timeout=10)
    ok = sorted(t for t in took if t is not None)

    def rate(key: str) -> float:
        return (after.get(key, 0) - before.get(key, 0)) / elapsed

    p50 = ok[len(ok) // 2] * 1000 if ok else float("nan")
    p99 = ok[min(len(ok) - 1, int(len(ok) * 0.99))] * 1000 if ok else float("nan")
    print(
        f"{name:18} failed {probes - len(ok):3}/{probes}  p50 {p50:7.1f} ms  p99 {p99:7.1f} ms"
        f"  server CPU {(after['cpu'] - before['cpu']) / elapsed:4.0%}"
        f"  evicted {rate('tcp.refused.handshake-evicted'):6.0f}/s"
        f"  timed out {rate('tcp.dropped.handshake-timeout'):5.0f}/s",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--flood", type=int, default=2540)
    parser.add_argument("--cases", help="the cases to run, by number (1-6), e.g. 2,3")
    parser.add_argument("--serve", nargs=3, metavar=("HANDSHAKES", "TIMEOUT", "MUTATION"))
    a = parser.parse_args()
    raise_nofile()
    if a.serve:
        handshakes, timeout, mutation = a.serve
        if mutation == "refuse":
            admission.Admission.arrive = refuse_when_full  # type: ignore[method-assign]
        limits = Limits(max_handshakes=int(handshakes), handshake_timeout=float(timeout))
        trio.run(serve, limits)
        return
    ring = KeyRing.generate()
    default = Limits()
    cases = [
        ("no flood", [str(default.max_handshakes), "5", "-"], 0),
        ("held", [str(default.max_handshakes), "5", "-"], a.flood),
        ("churn", ["256", "5", "-"], a.flood),
        ("churn, refusing", ["256", "5", "refuse"], a.flood),
        ("timeout 1 s", [str(default.max_handshakes), "1", "-"], a.flood),
        ("timeout 30 s", [str(default.max_handshakes), "30", "-"], a.flood),
    ]
    if a.cases:
        cases = [cases[int(n) - 1] for n in a.cases.split(",")]
    for name, args, flood in cases:
        run_case(name, args, flood, a.probes, ring)


if __name__ == "__main__":
    main()
