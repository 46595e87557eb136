"""The simulated network models what costs and what fails: CPU per message in a queue, slow
peers, bandwidth, long-tailed and regional delays, bursty and one-way loss, in datagrams and
calls alike; and stays deterministic for a seed."""

from __future__ import annotations

import itertools
import statistics
from typing import Any

import msgpack
import pytest
import trio

from drekifs.cluster.net import PeerAddr, PeerUnreachable

from ..harness.simnet import (
    CALL_RTO,
    HANDLER_COST,
    WIRE_OVERHEAD,
    GilbertElliott,
    LogNormal,
    SimNetwork,
    SimWorld,
    addr_of,
)

A, B, C = addr_of(1), addr_of(2), addr_of(3)


def receiver(world: SimWorld, addr: PeerAddr) -> tuple[SimNetwork, list[tuple[float, Any]]]:
    """A network at ``addr`` that records (time handled, message) of every datagram."""
    got: list[tuple[float, Any]] = []
    net = world.network(addr)
    net.on_datagram(lambda source, msg: got.append((trio.current_time(), msg)))
    return net, got


async def test_a_busy_peer_handles_one_message_at_a_time(autojump_clock: Any) -> None:
    async with SimWorld(seed=1, delay=(0.001, 0.001)) as world:
        sender = world.network(A)
        _, got = receiver(world, B)
        start = trio.current_time()
        for i in range(1000):
            sender.send_datagram(B, {"i": i})
        await trio.sleep(1)
        assert [m["i"] for _, m in got] == list(range(1000))
        per_message, per_byte = HANDLER_COST
        # The last waits behind the 999 before it.
        assert got[-1][0] - start >= 0.001 + 1000 * per_message
        assert got[-1][0] - start < 0.001 + 1000 * (per_message + 20 * per_byte) + 1e-6
        # No queue without load: one message alone is handled after its delay and cost only.
        assert got[0][0] - start < 0.001 + 2 * per_message + 20 * per_byte


async def test_a_slow_peer_handles_everything_late(autojump_clock: Any) -> None:
    async with SimWorld(seed=2, delay=(0.001, 0.001)) as world:
        sender = world.network(A)
        _, slow = receiver(world, B)
        _, quick = receiver(world, C)
        world.set_slow(B, 2.0)
        start = trio.current_time()
        sender.send_datagram(B, {"x": 1})
        sender.send_datagram(C, {"x": 1})
        await trio.sleep(3)
        assert 2.001 <= slow[0][0] - start < 2.002
        assert quick[0][0] - start < 0.002
        # Calls too: the callee's handler starts 2 s late.
        world.network(addr_of(4)).register("echo", echo)
        world.set_slow(addr_of(4), 2.0)
        before = trio.current_time()
        assert await sender.call(addr_of(4), "echo", 5, timeout=5) == 5
        assert 2.002 <= trio.current_time() - before < 2.01
        with pytest.raises(PeerUnreachable):
            await sender.call(addr_of(4), "echo", 5, timeout=1)


async def echo(source: PeerAddr, args: Any) -> Any:
    return args


async def test_one_way_loss(autojump_clock: Any) -> None:
    async with SimWorld(seed=3) as world:
        a, from_b = receiver(world, A)
        b, from_a = receiver(world, B)
        world.set_link_loss(A, B, 1.0)
        for i in range(50):
            a.send_datagram(B, {"i": i})
            b.send_datagram(A, {"i": i})
        await trio.sleep(1)
        assert not from_a and len(from_b) == 50
        # A call's lost segments come again: slower, not failed.
        b.register("echo", echo)
        before = trio.current_time()
        assert await a.call(B, "echo", 1, timeout=5) == 1
        assert trio.current_time() - before >= CALL_RTO


async def test_bursts_lose_in_runs_and_depend_on_time_alone(autojump_clock: Any) -> None:
    model = GilbertElliott(mean_good=4.5, mean_bad=0.5, loss_bad=1.0)

    async def fates(seed: int) -> list[bool]:
        async with SimWorld(seed=seed, bursts=model, delay=(0.001, 0.001)) as world:
            sender = world.network(A)
            _, got = receiver(world, B)
            for i in range(2000):  # one every 10 ms: 20 s
                sender.send_datagram(B, {"i": i})
                await trio.sleep(0.01)
            await trio.sleep(0.1)
            kept = {m["i"] for _, m in got}
            return [i not in kept for i in range(2000)]

    lost = await fates(4)
    assert lost == await fates(4)
    assert lost != await fates(5)
    rate = sum(lost) / len(lost)
    # Two ends lose 10% each on average; losses come in runs (independent loss at this
    # rate would make runs of about 1.2).
    assert 0.08 < rate < 0.35, rate
    runs = [len(list(run)) for is_lost, run in itertools.groupby(lost) if is_lost]
    assert statistics.mean(runs) > 10, statistics.mean(runs)


async def test_long_tails_regions_and_bandwidth(autojump_clock: Any) -> None:
    latency = LogNormal(median=0.001, sigma=0.5)
    async with SimWorld(seed=6, latency=latency, handler_cost=(0.0, 0.0)) as world:
        sender = world.network(A)
        _, got = receiver(world, B)
        far = [addr_of(10 + i) for i in range(3)]
        far_got = [receiver(world, addr)[1] for addr in far]
        world.place({A: 0, B: 0, far[0]: 1, far[1]: 2, far[2]: 1})
        start = trio.current_time()
        for i in range(2000):
            sender.send_datagram(B, {"i": i})
        for addr in far:
            sender.send_datagram(addr, {"i": 0})
        await trio.sleep(1)
        delays = sorted(t - start for t, _ in got)
        median, p99 = delays[1000], delays[1980]
        assert 0.0009 < median < 0.0011 and 2.5 < p99 / median < 4.5
        rtt = world.region_rtt(0, 1)
        assert 0.05 <= rtt <= 0.15 and world.region_rtt(1, 0) == rtt
        assert world.region_rtt(1, 1) == 0.0
        assert far_got[0][0][0] - start >= rtt / 2
        assert far_got[2][0][0] - start >= rtt / 2
        assert far_got[1][0][0] - start >= world.region_rtt(0, 2) / 2
    # 1 MB/s: ten 1,000-byte datagrams leave one after the other.
    async with SimWorld(seed=7, delay=(0.0, 0.0), bandwidth=1e6, handler_cost=(0, 0)) as world:
        sender = world.network(A)
        _, got = receiver(world, B)
        start = trio.current_time()
        for _ in range(10):
            sender.send_datagram(B, {"pad": "x" * 990})
        await trio.sleep(1)
        assert len(got) == 10
        size = len(msgpack.packb({"pad": "x" * 990})) + WIRE_OVERHEAD
        assert got[-1][0] - start == pytest.approx(10 * size / 1e6)
