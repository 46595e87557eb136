"""SWIM membership in the simulated network: convergence, failure detection, refutation,
partitions, leaving, loss, junk, and a 1,000-peer join. All on trio's MockClock (the
``autojump_clock`` fixture): simulated seconds cost only the CPU they need."""

from __future__ import annotations

import collections
import contextlib
import random
from typing import Any

import msgpack
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from drekifs.cluster.net import MAX_DATAGRAM, PeerUnreachable, RemoteError
from drekifs.cluster.swim import PUSH_PULL, Membership, SwimConfig
from drekifs.cluster.swim.awareness import Awareness
from drekifs.cluster.swim.broadcasts import BroadcastQueue
from drekifs.cluster.swim.messages import Malformed, decode_datagram, decode_push_pull
from drekifs.cluster.swim.suspicion import Suspicion

from ..harness.simnet import SEAL_OVERHEAD, SimWorld
from ..harness.swim_cluster import SimCluster

CONFIG = SwimConfig()


def deaths(cluster: SimCluster, subject: str | None = None) -> list:
    return [
        o
        for o in cluster.observations
        if o.state == "dead" and (subject is None or o.subject == subject)
    ]


def totals(cluster: SimCluster) -> collections.Counter[str]:
    total: collections.Counter[str] = collections.Counter()
    for peer in cluster.peers.values():
        total.update(peer.counters)
    return total


def assert_sound(cluster: SimCluster) -> None:
    """No bug surfaced: no handler raised, no datagram was malformed, no call failed oddly."""
    counters = totals(cluster)
    assert counters["internal_errors"] == 0
    assert counters["malformed"] == 0
    assert counters["watcher_errors"] == 0
    assert cluster.world.stats["call_errors"] == 0


# -- The pieces ------------------------------------------------------------------------------


def test_suspicion_shrinks_logarithmically_to_the_minimum() -> None:
    s = Suspicion("a", k=3, min_timeout=2.0, max_timeout=12.0, start=100.0)
    assert s.deadline == 112.0
    assert not s.confirm("a")  # the first accuser does not confirm itself
    assert s.confirm("b")
    assert s.deadline == pytest.approx(100 + 12 - 10 * 0.5)  # log 2 / log 4
    assert not s.confirm("b")
    assert s.confirm("c") and s.confirm("d")
    assert s.deadline == 102.0
    assert not s.confirm("e")  # k reached
    # Nobody to confirm (tiny cluster): half the maximum, time enough to refute over a lossy link.
    assert Suspicion("a", k=0, min_timeout=2.0, max_timeout=12.0, start=0.0).deadline == 6.0


def test_awareness_is_clamped_and_scales() -> None:
    a = Awareness(8)
    a.apply(-3)
    assert a.score == 0 and a.scale(1.0) == 1.0
    a.apply(20)
    assert a.score == 7 and a.scale(0.5) == 4.0


def test_broadcast_queue_limits_replaces_and_fits() -> None:
    q = BroadcastQueue()
    q.push("a", {"k": "a", "n": "a", "i": 1})
    q.push("a", {"k": "s", "n": "a", "i": 1})  # replaces
    q.push("b", {"k": "a", "n": "b", "i": 1, "pad": "x" * 100})
    assert len(q) == 2
    first = q.take(1000, limit=3)
    assert [u["n"] for u in first] == ["b", "a"]  # newest first
    assert first[1]["k"] == "s"
    small = q.take(50, limit=3)  # b does not fit
    assert [u["n"] for u in small] == ["a"]
    q.take(1000, limit=3)
    assert q.transmits("a") is None and q.transmits("b") == 2
    q.take(1000, limit=3)
    assert len(q) == 0


def test_config_timeouts() -> None:
    low, high = CONFIG.suspicion_timeouts(100)
    assert (low, high) == (4.0, 24.0)
    assert CONFIG.suspicion_timeouts(3)[0] == 2.0
    assert CONFIG.retransmit_limit(100) == 15
    assert CONFIG.push_pull_period(1000) == 180.0
    assert CONFIG.suspicion_k(4) == 0 and CONFIG.suspicion_k(5) == 3


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64) + 1, 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.sampled_from(["ping", "ack", "nack", "preq", "gossip", "a", "s", "d", "l"]),
    lambda inner: (
        st.lists(inner, max_size=6)
        | st.dictionaries(
            st.sampled_from(["t", "s", "n", "a", "w", "u", "k", "i", "m", "f", "j"])
            | st.text(max_size=3),
            inner,
            max_size=6,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(_values)
def test_decoders_accept_or_raise_malformed(value: Any) -> None:
    for decode in (decode_datagram, decode_push_pull):
        with contextlib.suppress(Malformed):
            decode(value)


# -- Simulations -----------------------------------------------------------------------------


async def test_peers_from_dns_seeds_converge(autojump_clock: Any) -> None:
    async with SimWorld(seed=1, loss=0.01) as world:
        cluster = SimCluster(world, 20, CONFIG)
        for name in cluster.names:
            cluster.start(name)
        assert await cluster.wait_for(cluster.converged, 30) is not None
        peer = cluster.peers["node0007"]
        members = {m.name: m for m in peer.members()}
        assert set(members) == set(cluster.names)
        assert all(m.state == "alive" and m.incarnation == 1 for m in members.values())
        assert members["node0003"].addr == cluster.addrs["node0003"]
        assert not deaths(cluster)
        assert_sound(cluster)


async def test_seeds_never_heard_from_are_unknown(autojump_clock: Any) -> None:
    async with SimWorld(seed=2) as world:
        cluster = SimCluster(world, 8, CONFIG)
        for name in cluster.names[:5]:  # three nodes of the DNS world never start
            cluster.start(name)
        await trio.sleep(30)
        for peer in cluster.peers.values():
            infos = {m.name: m for m in peer.members()}
            for silent in cluster.names[5:]:
                assert infos[silent].state == "unknown" and infos[silent].incarnation == 0
            for name in cluster.names[:5]:
                assert infos[name].state == "alive"
        # A node that vanished from DNS is dropped.
        peer = cluster.peers["node0000"]
        peer.set_seeds({n: cluster.addrs[n] for n in cluster.names[:4]})
        assert peer.state_of("node0004") is None and peer.state_of("node0007") is None
        await trio.sleep(5)  # news about node0004 keeps coming: it stays dropped
        assert peer.state_of("node0004") is None
        assert_sound(cluster)


async def test_crash_is_detected_by_everyone(autojump_clock: Any) -> None:
    async with SimWorld(seed=3, loss=0.01) as world:
        cluster = SimCluster(world, 30, CONFIG)
        cluster.start_converged(cluster.names)
        await trio.sleep(5)
        start = trio.current_time()
        cluster.crash("node0011")

        def all_dead() -> bool:
            return all(s == "dead" for s in cluster.views("node0011").values())

        took = await cluster.wait_for(all_dead, 30)
        assert took is not None and took < 10, took
        times = sorted(o.time - start for o in deaths(cluster, "node0011"))
        assert len(times) == 29 and times[len(times) // 2] < 6
        assert all(o.subject == "node0011" for o in deaths(cluster))
        counters = totals(cluster)
        assert counters["suspicions"] >= 29 and counters["probe_failures"] >= 1
        assert_sound(cluster)


async def test_restart_comes_back_with_a_higher_saved_incarnation(autojump_clock: Any) -> None:
    async with SimWorld(seed=4, loss=0.01) as world:
        cluster = SimCluster(world, 12, CONFIG)
        cluster.start_converged(cluster.names)
        announced: list[tuple[float, int]] = []  # (time, incarnation) node0005 spoke of itself

        def tap(time: float, source: Any, to: Any, kind: str, msg: Any) -> None:
            if source != cluster.addrs["node0005"]:
                return
            if kind == "datagram":
                updates = msg.get("u", [])
                incs = [u["i"] for u in updates if u["n"] == "node0005" and u["k"] == "a"]
            else:
                incs = [e[3] for e in msg["m"] if e[0] == "node0005"]
            announced.extend((time, inc) for inc in incs)

        world.tap = tap
        await trio.sleep(3)
        cluster.crash("node0005")
        dead = await cluster.wait_for(
            lambda: all(s == "dead" for s in cluster.views("node0005").values()), 30
        )
        assert dead is not None
        await trio.sleep(5)
        cluster.start("node0005")  # saved incarnation 1: this life is 2
        back = await cluster.wait_for(
            lambda: all(s == "alive" for s in cluster.views("node0005").values()), 10
        )
        assert back is not None
        assert {m.name: m.incarnation for m in cluster.peers["node0001"].members()}["node0005"] == 2
        # Lost its disk: starts from 0, is told it is dead in its life 2, refutes with 3.
        cluster.crash("node0005")
        await cluster.wait_for(
            lambda: all(s == "dead" for s in cluster.views("node0005").values()), 30
        )
        peer = cluster.start("node0005", incarnation=0)
        back = await cluster.wait_for(
            lambda: all(s == "alive" for s in cluster.views("node0005").values()), 15
        )
        assert back is not None
        assert peer.counters["refutations"] >= 1 and peer.incarnation >= 3
        # Nothing was ever announced before it was saved.
        saves = [(t, inc) for t, name, inc in cluster.saves if name == "node0005"]
        for time, inc in announced:
            assert any(t <= time and s >= inc for t, s in saves), (time, inc)
        assert_sound(cluster)


async def test_suspected_member_refutes_before_it_dies(autojump_clock: Any) -> None:
    async with SimWorld(seed=5) as world:
        cluster = SimCluster(world, 10, CONFIG)
        cluster.start_converged(cluster.names)
        await trio.sleep(2)
        # A peer that wrongly suspects node0004 (as one that lost its acks would).
        liar = world.network(("10.9.9.9", 7946))
        accusation = {"k": "s", "n": "node0004", "i": 1, "f": "liar"}
        liar.send_datagram(cluster.addrs["node0000"], {"t": "gossip", "u": [accusation]})
        await trio.sleep(10)
        suspect = cluster.peers["node0004"]
        assert suspect.counters["refutations"] == 1 and suspect.incarnation == 2
        assert cluster.saved["node0004"] == 2
        assert any(o.subject == "node0004" and o.state == "suspect" for o in cluster.observations)
        assert not deaths(cluster)
        assert all(s == "alive" for s in cluster.views("node0004").values())
        assert_sound(cluster)


async def test_suspicion_of_a_later_life_starts_over(autojump_clock: Any) -> None:
    """A suspicion of incarnation 2 reaching a peer that suspects incarnation 1 means the member
    refuted (the peer missed it): the old timer must not count it as a confirmation and kill
    the later life on the old clock (slow peers died this way)."""
    async with SimWorld(seed=15) as world:
        cluster = SimCluster(world, 10, CONFIG)
        cluster.start_converged(cluster.names)
        await trio.sleep(1)
        cluster.crash("node0004")  # nobody refutes: only the injected news moves it
        peer = cluster.peers["node0000"]
        liar = world.network(("10.9.9.9", 7946))
        for accuser, incarnation in (("a", 1), ("b", 2)):
            update = {"k": "s", "n": "node0004", "i": incarnation, "f": accuser}
            liar.send_datagram(cluster.addrs["node0000"], {"t": "gossip", "u": [update]})
            await trio.sleep(0.01)
        info = {m.name: m for m in peer.members()}["node0004"]
        assert (info.state, info.incarnation) == ("suspect", 2)
        assert peer.counters["suspicions_superseded"] == 1
        assert peer.counters["confirmations"] == 0
        # Its timer restarted: the new life dies no sooner than the minimum after its suspicion.
        low = CONFIG.suspicion_timeouts(10)[0]
        start = trio.current_time()
        await cluster.wait_for(lambda: peer.state_of("node0004") == "dead", 30, step=0.05)
        assert trio.current_time() - start >= low - 0.011  # started 0.01 s before ``start``
        assert_sound(cluster)


async def test_partition_heals(autojump_clock: Any) -> None:
    async with SimWorld(seed=6, loss=0.01) as world:
        cluster = SimCluster(world, 20, CONFIG)
        cluster.start_converged(cluster.names)
        await trio.sleep(2)
        left, right = cluster.names[:10], cluster.names[10:]
        world.partition([cluster.addrs[n] for n in left], [cluster.addrs[n] for n in right])

        def split() -> bool:
            return all(cluster.peers[a].state_of(b) == "dead" for a in left for b in right) and all(
                cluster.peers[b].state_of(a) == "dead" for a in left for b in right
            )

        assert await cluster.wait_for(split, 40) is not None
        await trio.sleep(40)  # long past gossip to the dead: only reconnects can heal it
        world.heal()
        healed = await cluster.wait_for(cluster.converged, 90)
        assert healed is not None, totals(cluster)
        assert_sound(cluster)


async def test_leave_is_left_not_dead(autojump_clock: Any) -> None:
    async with SimWorld(seed=7, loss=0.01) as world:
        cluster = SimCluster(world, 15, CONFIG)
        cluster.start_converged(cluster.names)
        await trio.sleep(3)
        with trio.fail_after(3):
            await cluster.peers["node0009"].leave()
        cluster.crash("node0009")  # the daemon stops after leaving
        gone = await cluster.wait_for(
            lambda: all(s == "left" for s in cluster.views("node0009").values()), 5
        )
        assert gone is not None
        await trio.sleep(30)
        assert all(s == "left" for s in cluster.views("node0009").values())
        assert not deaths(cluster)
        assert_sound(cluster)


async def test_lossy_network_makes_no_false_death(autojump_clock: Any) -> None:
    async with SimWorld(seed=8, loss=0.10, delay=(0.0005, 0.01)) as world:
        cluster = SimCluster(world, 30, CONFIG)
        cluster.start_converged(cluster.names)
        await trio.sleep(90)
        counters = totals(cluster)
        assert counters["probe_failures"] > 0  # the loss did bite
        assert not deaths(cluster)
        # A suspicion may be open at any instant at 10% loss (one started at 89.5 s with the
        # defaults of issue 17): every one is refuted within a second.
        assert await cluster.wait_for(cluster.converged, 1.0, step=0.05) is not None
        assert not deaths(cluster)
        assert_sound(cluster)


async def test_junk_is_ignored_and_counted(autojump_clock: Any) -> None:
    async with SimWorld(seed=9) as world:
        cluster = SimCluster(world, 5, CONFIG)
        cluster.start_converged(cluster.names)
        await trio.sleep(2)
        rng = random.Random(9)
        junk_net = world.network(("10.9.9.9", 7946))
        target = cluster.addrs["node0002"]
        valid = [
            {"t": "ping", "s": 1, "n": "node0002"},
            {"t": "preq", "s": 1, "n": "node0001", "a": ["10.0.0.1", 7946], "w": 100},
            {"t": "gossip", "u": [{"k": "a", "n": "x", "i": 1, "a": ["1.2.3.4", 1], "m": {}}]},
        ]
        weird: list[Any] = [None, True, -1, 2**64 - 1, 1.5, "x", b"\x00", [], {}, [1, 2], {"": {}}]
        for _ in range(300):
            msg: Any = rng.choice(valid)
            msg = msgpack.unpackb(msgpack.packb(msg), strict_map_key=False)
            if rng.random() < 0.2:
                msg = rng.choice(weird)
            else:
                key = rng.choice(list(msg))
                if rng.random() < 0.2:
                    del msg[key]
                else:
                    msg[key] = rng.choice(weird)
            junk_net.send_datagram(target, msg)
        junk_net.send_datagram(target, {1: 2, "t": "ping"})
        for args in ({"n": 5, "m": []}, {"n": "x", "m": [[1]]}, [], None):
            with pytest.raises(RemoteError):
                await junk_net.call(target, PUSH_PULL, args, timeout=2)
        await trio.sleep(5)
        counters = cluster.peers["node0002"].counters
        assert counters["malformed"] >= 250
        assert counters["internal_errors"] == 0
        assert cluster.converged() and not deaths(cluster)
        assert totals(cluster)["internal_errors"] == 0


async def test_datagrams_fit_with_large_meta(autojump_clock: Any) -> None:
    """Many peers announcing the largest meta at once: every datagram still fits (the
    simulated network raises ValueError on any that would not)."""
    async with SimWorld(seed=10) as world:
        cluster = SimCluster(world, 40, CONFIG)
        sizes: list[int] = []

        def tap(time: float, source: Any, to: Any, kind: str, msg: Any) -> None:
            if kind == "datagram":
                sizes.append(len(msgpack.packb(msg)))

        world.tap = tap
        cluster.start_converged(cluster.names)
        for name in cluster.names:
            cluster.peers[name].update_meta({"stores": ["s" * 40] * 10, "v": name * 2})
        await trio.sleep(10)
        assert max(sizes) + SEAL_OVERHEAD <= MAX_DATAGRAM
        assert max(sizes) > MAX_DATAGRAM // 2  # datagrams were filled up
        meta = {m.name: m.meta for m in cluster.peers["node0000"].members()}
        assert meta["node0031"]["v"] == "node0031" * 2
        with pytest.raises(ValueError):
            cluster.peers["node0000"].update_meta({"x": "y" * 1000})
        assert_sound(cluster)


async def test_unreachable_push_pull_peer(autojump_clock: Any) -> None:
    async with SimWorld(seed=11) as world:
        net = world.network(("10.0.0.1", 1))
        with pytest.raises(PeerUnreachable):
            await net.call(("10.0.0.2", 1), PUSH_PULL, {}, timeout=1)
        peer = Membership("solo", net, CONFIG)
        peer.set_seeds({"other": ("10.0.0.2", 1)})
        world.start_soon(net.addr, peer.run)
        await trio.sleep(20)
        assert peer.state_of("other") == "unknown"
        assert peer.counters["push_pulls_failed"] >= 1


def test_same_seed_same_run() -> None:
    def run(seed: int) -> list:
        async def main() -> list:
            async with SimWorld(seed=seed, loss=0.05) as world:
                cluster = SimCluster(world, 12, CONFIG)
                for name in cluster.names:
                    cluster.start(name)
                await trio.sleep(5)
                cluster.crash("node0003")
                await trio.sleep(15)
                return [
                    (round(o.time, 9), o.observer, o.subject, o.state) for o in cluster.observations
                ]

        return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))

    first = run(12)
    assert first == run(12)
    assert first != run(13)


async def test_a_thousand_peers_learn_of_a_join_within_3_s(autojump_clock: Any) -> None:
    async with SimWorld(seed=14, loss=0.01) as world:
        cluster = SimCluster(world, 1000, CONFIG)
        cluster.start_converged(cluster.names)
        await trio.sleep(1)
        newcomer = cluster.add_name()
        knows: dict[str, float] = {}
        start = trio.current_time()

        def watch(o: Any) -> None:
            if o.subject == newcomer and o.state == "alive":
                knows.setdefault(o.observer, o.time - start)

        cluster.watch = watch
        cluster.start(newcomer, seeds=cluster.names[:3])
        took = await cluster.wait_for(lambda: len(knows) >= 1000, 3, step=0.1)
        assert took is not None, f"{len(knows)} of 1000 knew after 3 s"
        joined = cluster.peers[newcomer]
        assert sum(1 for m in joined.members() if m.state == "alive") == 1001
