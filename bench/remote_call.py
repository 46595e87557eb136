"""Latency of a remote call on loopback: the transport against a bare TCP request/response.

    .venv/bin/python bench/remote_call.py [--calls 2000]

Three measurements of ``--calls`` sequential calls each, 100 bytes each way, after a warm-up
over an established connection:

- **bare**: a blocking Python socket client (TCP_NODELAY) and an echo server in another process
  that reads 100 bytes and writes them back. No framing, no crypto, no event loop: the floor.
- **trio server**: the same client, the same echo in another process, served by trio: what
  the event loop alone costs (a wake-up from epoll, a task step per read and write).
- **transport**: ``Transport.call`` to a Transport in another process whose handler returns 100
  bytes (sealed frames both ways, msgpack, sequence checks, one task per request served).
- **transport, one process**: both transports in one trio loop (one core does both sides).

The handler is registered ``inline`` (it never waits), as the store's small methods are.
Prints p50/p90/p99 in microseconds, the ratio of transport to bare, and the CPU time one call
costs both sides together (the one-process run). Takes a few seconds.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from drekifs.cluster.keyring import KeyRing
from drekifs.cluster.transport import Transport

PAYLOAD = 100
WORLD = "bench.world"
KEY_ENV = "DREKIFS_BENCH_KEY"


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    s = sorted(samples)
    return tuple(s[min(len(s) - 1, int(len(s) * q))] * 1e6 for q in (0.5, 0.9, 0.99))


# -- servers (in a child process) -----------------------------------------------------------------


def serve_bare() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        print(listener.getsockname()[1], flush=True)
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while True:
                data = b""
                while len(data) < PAYLOAD:
                    chunk = conn.recv(PAYLOAD - len(data))
                    if not chunk:
                        return
                    data += chunk
                conn.sendall(data)


def serve_trio() -> None:
    async def echo(stream: trio.SocketStream) -> None:
        while True:
            data = b""
            while len(data) < PAYLOAD:
                chunk = await stream.receive_some(PAYLOAD - len(data))
                if not chunk:
                    return
                data += chunk
            await stream.send_all(data)

    async def main() -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        print(listeners[0].socket.getsockname()[1], flush=True)
        await trio.serve_listeners(echo, listeners)  # SocketStream: TCP_NODELAY

    trio.run(main)


def serve_transport() -> None:
    ring = KeyRing((base64.b64decode(os.environ[KEY_ENV]),))
    reply = b"r" * PAYLOAD

    async def answer(peer, args) -> bytes:
        return reply

    async def main() -> None:
        t = Transport(WORLD, ring, ("127.0.0.1", 0))
        t.register("bench", answer, inline=True)
        async with trio.open_nursery() as nursery:
            await nursery.start(t.serve)
            print(t.addr[1], flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)  # until the parent is done
            nursery.cancel_scope.cancel()

    trio.run(main)


def child(kind: str, ring: KeyRing) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, **{KEY_ENV: base64.b64encode(ring.primary).decode()})
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


# -- clients --------------------------------------------------------------------------------------


def bench_bare(port: int, calls: int) -> list[float]:
    payload = b"q" * PAYLOAD
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        samples = []
        for i in range(calls + calls // 10):
            start = time.perf_counter()
            s.sendall(payload)
            got = 0
            while got < PAYLOAD:
                got += len(s.recv(PAYLOAD - got))
            if i >= calls // 10:  # the first tenth warms up
                samples.append(time.perf_counter() - start)
    return samples


async def timed_calls(client: Transport, to: tuple[str, int], calls: int) -> list[float]:
    args = b"q" * PAYLOAD
    for _ in range(calls // 10):
        assert len(await client.call(to, "bench", args, timeout=5)) == PAYLOAD
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        await client.call(to, "bench", args, timeout=5)
        samples.append(time.perf_counter() - start)
    return samples


def bench_transport(ring: KeyRing, port: int | None, calls: int) -> tuple[list[float], float]:
    """To the child's transport on ``port``, or (None) to one in this process; the samples,
    and this process's CPU seconds per call (with port None: both sides of a call)."""

    async def main() -> tuple[list[float], float]:
        client = Transport(WORLD, ring, ("127.0.0.1", 0))
        async with trio.open_nursery() as nursery:
            await nursery.start(client.serve)
            if port is None:
                server = Transport(WORLD, ring, ("127.0.0.1", 0))

                async def answer(peer, args) -> bytes:
                    return b"r" * PAYLOAD

                server.register("bench", answer, inline=True)
                await nursery.start(server.serve)
                to = server.addr
            else:
                to = ("127.0.0.1", port)
            cpu = time.process_time()
            samples = await timed_calls(client, to, calls)
            cpu = (time.process_time() - cpu) / (calls + calls // 10)  # with the warm-up
            assert client.counters["tcp.connected"] == 1  # one connection throughout
            nursery.cancel_scope.cancel()
        return samples, cpu

    return trio.run(main)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--serve", choices=["bare", "trio", "transport"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve == "bare":
        return serve_bare()
    if args.serve == "trio":
        return serve_trio()
    if args.serve == "transport":
        return serve_transport()

    ring = KeyRing.generate()
    results = {}
    proc, port = child("bare", ring)
    try:
        results["bare socket (2 processes)"] = bench_bare(port, args.calls)
    finally:
        proc.kill()
        proc.wait()
    proc, port = child("trio", ring)
    try:
        results["bare trio server (2 processes)"] = bench_bare(port, args.calls)
    finally:
        proc.kill()
        proc.wait()
    proc, port = child("transport", ring)
    try:
        results["Transport.call (2 processes)"], _ = bench_transport(ring, port, args.calls)
    finally:
        proc.kill()
        proc.wait()
    results["Transport.call (1 process)"], both_sides = bench_transport(ring, None, args.calls)

    print(f"{args.calls} sequential calls, {PAYLOAD} bytes each way, loopback; microseconds")
    print(f"{'':30} {'p50':>8} {'p90':>8} {'p99':>8}")
    table = {name: percentiles(s) for name, s in results.items()}
    for name, (p50, p90, p99) in table.items():
        print(f"{name:30} {p50:8.0f} {p90:8.0f} {p99:8.0f}")
    bare = table["bare socket (2 processes)"][0]
    for name in list(table)[1:]:
        print(f"ratio p50 {name}: {table[name][0] / bare:.1f}x bare")
    print(f"CPU per call, both sides of it in one process: {both_sides * 1e6:.0f} us")


if __name__ == "__main__":
    main()
