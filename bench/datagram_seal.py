"""CPU time of one datagram through the transport: seal on the sender, open on the receiver.

    .venv/bin/python bench/datagram_seal.py [--datagrams 20000] [--size 100] [--runs 5]

Two transports in one process, no sockets: the sender's ``send_datagram`` writes into a list
instead of a UDP socket, and each captured datagram is handed to the receiver's datagram path
(``Transport._datagram``), as ``recvfrom`` would. Whatever the transports say to each other
first (nothing before issue 17; since, the receiver's instance learned with a HELLO) is passed
along before the clock starts. Timed: ``--datagrams`` messages of ``--size`` bytes, each sealed
(pack, stamp, seal, sendto's bytes) and opened (split, authenticate, replay check, unpack,
handler); prints the best of ``--runs`` runs in µs of CPU per datagram. The socket calls themselves
are left out: they cost the same before and after.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from drekifs.cluster.keyring import KeyRing
from drekifs.cluster.transport import Transport

WORLD = "bench.world"


class Capture:
    """Stands for a UDP socket: keeps what is sent."""

    def __init__(self) -> None:
        self.out: list[tuple[bytes, tuple[str, int]]] = []

    def sendto(self, data: bytes, to: tuple[str, int]) -> int:
        self.out.append((data, to))
        return len(data)


def pair() -> tuple[Transport, Transport, Capture, Capture]:
    ring = KeyRing.generate()
    a = Transport(WORLD, ring, ("127.0.0.1", 1))
    b = Transport(WORLD, ring, ("127.0.0.1", 2))
    caps = Capture(), Capture()
    for t, cap in zip((a, b), caps, strict=True):
        t._udp = cap  # type: ignore[assignment]
        t._state = "serving"
    return a, b, *caps


def pump(a: Transport, b: Transport, ca: Capture, cb: Capture) -> None:
    """Deliver everything sent either way until nothing more is said (bounded)."""
    for _ in range(100):
        if not ca.out and not cb.out:
            return
        for cap, src, dst in ((ca, a, b), (cb, b, a)):
            out, cap.out = cap.out, []
            for data, _ in out:
                dst._datagram(data, src.addr)
    raise RuntimeError("the transports never stopped talking")


def run(n: int, size: int) -> float:
    a, b, ca, cb = pair()
    got: list[Any] = []
    b.on_datagram(lambda src, msg: got.append(msg))
    a.send_datagram(b.addr, b"warm-up")
    pump(a, b, ca, cb)
    assert got == [b"warm-up"], got
    msg = b"x" * size
    receive = b._datagram
    src = a.addr
    start = time.process_time()  # CPU time: the machine may be shared
    for _ in range(n):
        a.send_datagram(b.addr, msg)
        data, _ = ca.out.pop()
        receive(data, src)
    elapsed = time.process_time() - start
    assert len(got) == n + 1 and not cb.out, (len(got), cb.out[:1])
    return elapsed / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datagrams", type=int, default=20_000)
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    best = min(run(args.datagrams, args.size) for _ in range(args.runs))
    print(f"seal + open, {args.size}-byte message: {best:.2f} µs a datagram (best of {args.runs})")


if __name__ == "__main__":
    main()
