"""What one SWIM datagram costs the peer that receives it: the CPU of the simulation's model.

    .venv/bin/python bench/swim_handler_cost.py [--rounds 5] [--peers 100]

Feeds a running :class:`Membership` of ``--peers`` members a PING (it answers an ACK: decode,
piggyback, msgpack-encode the reply) and, separately, the ACK of one of its own probes, through
its datagram handler, and prints the best round's microseconds per datagram; then the same PING
sealed, through a real :class:`Transport`'s receive path (open, replay check, decode, handler,
encode and seal of the ACK; only the socket's send is left out). tests/harness/simnet.py's
``HANDLER_COST`` is the last figure.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from drekifs.cluster import frames
from drekifs.cluster.keyring import KeyRing
from drekifs.cluster.net import PeerAddr
from drekifs.cluster.swim import Membership, SwimConfig
from drekifs.cluster.swim.state import MemberInfo
from drekifs.cluster.transport import Transport


class _Sink:
    """A network that encodes what is sent, as the transport would, and drops it."""

    def __init__(self, addr: PeerAddr) -> None:
        self.addr = addr
        self.sent = 0

    def send_datagram(self, to: PeerAddr, msg: Any) -> None:
        msgpack.packb(msg)
        self.sent += 1

    def on_datagram(self, handler: Any) -> None:
        self.handler = handler

    def register(self, method: str, handler: Any, *, inline: bool = False) -> None:
        pass

    async def call(self, to: PeerAddr, method: str, args: Any, *, timeout: float) -> Any:
        raise NotImplementedError


class _NoSocket:
    def sendto(self, data: bytes, to: PeerAddr) -> None:
        pass


def _through_transport(
    config: SwimConfig, infos: list[MemberInfo], rounds: int, count: int
) -> float:
    """Microseconds per sealed PING received and answered by a Transport (best round)."""
    ring = KeyRing.generate()
    sender = Transport("bench", ring, ("10.0.0.1", 7946))
    receiver = Transport("bench", ring, ("10.0.0.0", 7946))
    receiver._udp = _NoSocket()  # type: ignore[assignment]  # the send, not the socket
    member = Membership("node0000", receiver, config)
    member.preload(infos)
    member._nursery = object()  # type: ignore[assignment]  # "running", without its loops
    aad = frames.datagram_aad(b"bench")
    packed = frames.pack({"t": "ping", "s": 7, "n": "node0000"})
    best = float("inf")
    for r in range(rounds):
        now_ms = int(time.time() * 1000)
        sealed = [
            sender._ep.keys.seal(frames.pack_datagram(now_ms, r * count + i, packed), aad)
            for i in range(count)
        ]
        start = time.perf_counter()
        for data in sealed:
            receiver._datagram(data, ("10.0.0.1", 7946))
        best = min(best, (time.perf_counter() - start) / count)
    assert member.counters["datagrams"] == rounds * count, member.counters
    return best * 1e6


def measure(peers: int, rounds: int, count: int) -> dict[str, float]:
    async def main() -> dict[str, float]:
        net = _Sink(("10.0.0.0", 7946))
        # Probing and gossip far apart: only the datagrams fed here run the handler.
        config = SwimConfig(probe_interval=1e6, probe_timeout=1e5, push_pull_interval=1e6)
        member = Membership("node0000", net, config)
        infos = [
            MemberInfo(f"node{i:04d}", "alive", (f"10.0.0.{i}", 7946), 1, 0.0, {})
            for i in range(peers)
        ]
        member.preload(infos)
        results: dict[str, float] = {}
        async with trio.open_nursery() as nursery:
            await nursery.start(member.run)
            ping = msgpack.unpackb(msgpack.packb({"t": "ping", "s": 7, "n": "node0000"}))
            source = ("10.0.0.1", 7946)
            best = float("inf")
            for _ in range(rounds):
                start = time.perf_counter()
                for _ in range(count):
                    net.handler(source, dict(ping))
                best = min(best, (time.perf_counter() - start) / count)
            results["ping_to_ack"] = best * 1e6
            best = float("inf")
            ack = {"t": "ack", "s": 12345}
            for _ in range(rounds):
                start = time.perf_counter()
                for _ in range(count):
                    net.handler(source, dict(ack))  # not pending: counted as late, dropped
                best = min(best, (time.perf_counter() - start) / count)
            results["ack"] = best * 1e6
            request = msgpack.unpackb(
                msgpack.packb({"n": "node0001", "j": False, "m": member._state()})
            )
            size = len(msgpack.packb(request))
            best = float("inf")
            for _ in range(rounds):
                start = time.perf_counter()
                for _ in range(count // 100):
                    msgpack.packb(await member._serve_push_pull(source, request))
                best = min(best, (time.perf_counter() - start) / (count // 100))
            results["push_pull"] = best * 1e6
            results["push_pull_bytes"] = size
            results["sealed_ping_to_ack"] = _through_transport(config, infos, rounds, count)
            nursery.cancel_scope.cancel()
        return results

    return trio.run(main)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--peers", type=int, default=100)
    parser.add_argument("--count", type=int, default=20000)
    args = parser.parse_args()
    r = measure(args.peers, args.rounds, args.count)
    print(f"SWIM datagram handler, {args.peers} members, best of {args.rounds} rounds:")
    print(f"  PING -> ACK   {r['ping_to_ack']:6.1f} us per datagram")
    print(f"  ACK (late)    {r['ack']:6.1f} us per datagram")
    print(
        f"  push-pull served ({r['push_pull_bytes']:.0f} bytes each way) {r['push_pull']:7.1f} us"
        f" = {r['push_pull'] * 1000 / r['push_pull_bytes'] / 2:.1f} ns per byte"
    )
    print(f"  sealed PING -> sealed ACK, through the transport  {r['sealed_ping_to_ack']:6.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
