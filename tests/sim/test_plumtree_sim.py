"""Plumtree broadcast in the simulated network: delivery, tree formation and pruning, repair at
10% loss and around a crash, membership changes, junk input, determinism. All on trio's
MockClock (the ``autojump_clock`` fixture): simulated seconds cost only the CPU they need."""

from __future__ import annotations

import contextlib
import inspect
import random
import re
from typing import Any

import msgpack
import pytest
import trio
from hypothesis import example, given, settings
from hypothesis import strategies as st
from trio.testing import MockClock

from drekifs.cluster.net import MAX_DATAGRAM
from drekifs.cluster.plumtree import GOSSIP_METHOD, Broadcast, PlumtreeConfig
from drekifs.cluster.plumtree import broadcast as broadcast_module
from drekifs.cluster.plumtree.messages import (
    MAX_HOPS,
    Graft,
    IHave,
    Malformed,
    Prune,
    chunk_graft,
    chunk_ihave,
    decode_datagram,
    decode_gossip,
    encode_gossip,
    ihave_entry_size,
    packed_bin_size,
    packed_uint_size,
)
from drekifs.cluster.plumtree.missing import MissingIds
from drekifs.cluster.plumtree.seen import SeenIds
from drekifs.cluster.plumtree.view import choose_neighbours

from ..harness.plumtree_cluster import BroadcastCluster, DictStore
from ..harness.simnet import SEAL_OVERHEAD, SimWorld

CONFIG = PlumtreeConfig()
LINK = (0.019, 0.021)


def assert_sound(cluster: BroadcastCluster) -> None:
    """No bug surfaced: no handler raised, nothing was malformed, no call failed oddly."""
    totals = cluster.totals()
    assert totals["internal_errors"] == 0
    assert totals["malformed"] == 0
    assert totals["store_errors"] == 0
    assert cluster.world.stats["call_errors"] == 0


def connected(cluster: BroadcastCluster) -> bool:
    adjacent: dict[str, set[str]] = {name: set() for name in cluster.peers}
    for edge in cluster.tree_edges():
        a, b = tuple(edge)
        adjacent[a].add(b)
        adjacent[b].add(a)
    start = next(iter(adjacent))
    reached, frontier = {start}, [start]
    while frontier:
        for other in adjacent[frontier.pop()]:
            if other not in reached:
                reached.add(other)
                frontier.append(other)
    return len(reached) == len(adjacent)


async def spread(cluster: BroadcastCluster, source: str, mid: bytes, timeout: float = 10) -> float:
    """Broadcast ``mid`` from ``source``; the simulated seconds until every running peer has it
    (fails the test otherwise), after which the traffic is left 1 s to settle."""
    cluster.broadcast(source, mid, {"v": mid})
    took = await cluster.wait_delivered(mid, timeout)
    assert took is not None, f"{len(cluster.missing(mid))} peers missed {mid!r}"
    await trio.sleep(1)
    return took


# -- The pieces ------------------------------------------------------------------------------


def test_view_is_symmetric_bounded_and_connected() -> None:
    names = [f"node{i:04d}" for i in range(1000)]
    rings = CONFIG.rings(len(names))
    assert CONFIG.view_size(1000) == 10 and rings == 5
    views = {name: set(choose_neighbours(name, names, rings)) for name in names}
    for name, view in views.items():
        assert name not in view and 2 <= len(view) <= 2 * rings
        assert all(name in views[other] for other in view)  # symmetric
    reached, frontier = {names[0]}, [names[0]]
    while frontier:
        for other in views[frontier.pop()]:
            if other not in reached:
                reached.add(other)
                frontier.append(other)
    assert len(reached) == len(names)
    # Small clusters: everyone; a death changes only the dead member's ring neighbours' views.
    assert set(choose_neighbours("a", ["a", "b", "c"], 2)) == {"b", "c"}
    after = {n: set(choose_neighbours(n, names[1:], rings)) for n in names[1:]}
    changed = [n for n in names[1:] if after[n] != views[n] - {names[0]}]
    assert set(changed) <= views[names[0]]


def test_messages_round_trip_and_fit() -> None:
    mids = [bytes([i]) * 200 for i in range(20)]
    datagrams = chunk_ihave([(m, 3) for m in mids], CONFIG.datagram_budget, 64)
    assert len(datagrams) > 1
    got = []
    for d in datagrams:
        assert len(msgpack.packb(d)) + SEAL_OVERHEAD <= MAX_DATAGRAM
        decoded = decode_datagram(msgpack.unpackb(msgpack.packb(d)))
        assert isinstance(decoded, IHave)
        got += decoded.entries
    assert got == [(m, 3) for m in mids]
    grafts = chunk_graft([b"a", b"b", b"c"], CONFIG.datagram_budget, 2)
    assert [decode_datagram(g) for g in grafts] == [Graft([b"a", b"b"]), Graft([b"c"])]
    assert chunk_graft([], 1300, 64) == [{"pt": "graft", "i": []}]
    assert decode_datagram({"pt": "prune"}) == Prune()
    g = decode_gossip(encode_gossip(b"id", 4, {"x": [1, 2]}))
    assert (g.mid, g.hops, g.payload) == (b"id", 4, {"x": [1, 2]})


@given(st.binary(min_size=1, max_size=300), st.integers(0, (1 << 32) - 1))
@example(b"x" * 255, 127)
@example(b"x" * 256, 128)
@example(b"x" * 65_535, 255)
@example(b"x" * 65_536, 256)
@example(b"x", 65_536)
@settings(max_examples=200, deadline=None)
def test_computed_sizes_are_msgpacks(mid: bytes, hops: int) -> None:
    """IHAVE and GRAFT entries are sized without packing them: the sizes must be msgpack's."""
    capped = min(hops, MAX_HOPS)
    assert ihave_entry_size(mid, capped) == len(msgpack.packb([mid, capped]))
    assert packed_bin_size(len(mid)) == len(msgpack.packb(mid))
    # The whole range it accepts, not only the capped hops an IHAVE carries (the examples
    # above 65,535 reach the 5-byte branch only here), and a clear refusal beyond it.
    assert packed_uint_size(hops) == len(msgpack.packb(hops))
    with pytest.raises(ValueError):
        packed_uint_size(1 << 32)


@pytest.mark.parametrize(
    "junk",
    [
        {"pt": "ihave", "i": [[b"", 1]]},
        {"pt": "ihave", "i": [[b"x" * 201, 1]]},
        {"pt": "ihave", "i": [[b"x", -1]]},
        {"pt": "ihave", "i": [[b"x", True]]},
        {"pt": "ihave", "i": [[b"x"]]},
        {"pt": "ihave", "i": [[b"x", 1]] * 257},
        {"pt": "ihave", "i": "no"},
        {"pt": "graft", "i": ["str"]},
        {"pt": "graft"},
        {"pt": "nope"},
        {"pt": None},
    ],
)
def test_malformed_datagrams_are_refused(junk: Any) -> None:
    with pytest.raises(Malformed):
        decode_datagram(junk)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.binary(max_size=8) | st.text(max_size=8),
        lambda c: st.one_of(
            st.lists(c, max_size=4),
            st.dictionaries(st.sampled_from(["pt", "i", "h", "p", "x"]), c, max_size=4),
        ),
        max_leaves=12,
    )
)
def test_decoders_raise_only_malformed(junk: Any) -> None:
    for decode in (decode_datagram, decode_gossip):
        with contextlib.suppress(Malformed):
            decode(junk)


def test_seen_ids_expire_and_are_bounded() -> None:
    seen = SeenIds(ttl=10, limit=3)
    for i in range(5):
        seen.add(bytes([i]), i, None, now=float(i))
    assert len(seen) == 3 and seen.get(b"\x01", 4.0) is None and seen.get(b"\x04", 4.0)
    assert seen.get(b"\x04", 14.0) is None and len(seen) == 0


def test_missing_ids_timers_and_announcers() -> None:
    missing = MissingIds(limit=2, max_announcers=2)
    a, b, c = ("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.3", 1)
    assert missing.announce(b"m", a, 1, 5.0)
    assert missing.announce(b"m", b, 1, 9.0)  # the timer stays at the first deadline
    assert missing.announce(b"m", c, 1, 9.0)  # remembered no more announcers
    assert missing.announce(b"n", a, 1, 6.0)
    assert not missing.announce(b"o", a, 1, 6.0)  # full
    assert missing.due(4.9) == []
    [(mid, wanted)] = missing.due(5.0)
    assert mid == b"m" and [x for x, _ in wanted.announcers] == [a, b]
    missing.reschedule(b"m", 7.0)
    missing.received(b"n")
    assert [m for m, _ in missing.due(100.0)] == [b"m"]


# -- Clusters --------------------------------------------------------------------------------


async def test_small_cluster_delivers_to_all_and_forms_a_tree(autojump_clock: Any) -> None:
    async with SimWorld(seed=1, delay=LINK) as world:
        cluster = BroadcastCluster(world, 30, CONFIG)
        await cluster.start()
        first = await spread(cluster, "node0000", b"first")
        assert first < 0.5
        first_totals = cluster.totals()
        assert first_totals["duplicates"] > 30  # everybody started eager: a flood
        rng = random.Random(1)
        for i in range(3):
            await spread(cluster, rng.choice(cluster.names), b"warm%d" % i)
        # The eager links are now a spanning tree: n - 1 links, connected.
        assert len(cluster.tree_edges()) == 29 and connected(cluster)
        before = cluster.totals()
        for i in range(5):
            await spread(cluster, rng.choice(cluster.names), b"m%d" % i)
        after = cluster.totals() - before
        assert after["delivered"] == 5 * 29
        assert after["duplicates"] <= 0.1 * after["delivered"]
        assert after["gossip_sent"] == after["delivered"]  # one push per delivery
        assert after["graft_ids"] == 0
        stats = cluster.peers["node0003"].stats()
        assert stats["neighbours"] == len(stats["eager"]) + len(stats["lazy"]) > 0
        assert stats["pending_grafts"] == 0 and stats["ids_remembered"] == 9
        assert_sound(cluster)


async def test_hundred_peers_deliver_to_all(autojump_clock: Any) -> None:
    async with SimWorld(seed=2, delay=LINK) as world:
        cluster = BroadcastCluster(world, 100, CONFIG)
        await cluster.start()
        for i in range(3):
            assert await spread(cluster, f"node{i * 30:04d}", b"m%d" % i) < 1.0
        assert max(len(p.eager) + len(p.lazy) for p in cluster.peers.values()) <= 10
        assert_sound(cluster)


async def test_ten_percent_loss_still_reaches_everyone(autojump_clock: Any) -> None:
    async with SimWorld(seed=3, loss=0.1, delay=LINK) as world:
        cluster = BroadcastCluster(world, 60, CONFIG, call_loss=0.1)
        await cluster.start()
        rng = random.Random(3)
        for i in range(8):
            await spread(cluster, rng.choice(cluster.names), b"m%d" % i, timeout=5)
        totals = cluster.totals()
        assert sum(net.lost for net in cluster.nets.values()) > 0
        assert world.stats["lost"] > 0
        assert totals["graft_ids"] > 0 and totals["gossip_failed"] > 0  # repair did happen
        assert_sound(cluster)


async def test_a_crashed_tree_peer_is_routed_around(autojump_clock: Any) -> None:
    async with SimWorld(seed=4, delay=LINK) as world:
        cluster = BroadcastCluster(world, 50, CONFIG)
        await cluster.start()
        for i in range(3):
            await spread(cluster, f"node{i:04d}", b"warm%d" % i)
        links = {name: len(peer.eager) for name, peer in cluster.peers.items()}
        victim = max(links, key=lambda n: (links[n], n))
        assert links[victim] >= 2  # an inner node of the tree
        cluster.crash(victim)
        before = cluster.totals()
        # Nobody is told: lazy IHAVE and GRAFT route around the hole.
        for i in range(3):
            await spread(cluster, "node0010" if victim != "node0010" else "node0011", b"c%d" % i)
        assert (cluster.totals() - before)["graft_ids"] > 0
        # Then the membership drops it: the tree heals and stays a tree.
        cluster.update_membership()
        for i in range(4):
            await spread(cluster, f"node00{20 + i}", b"d%d" % i)
        assert len(cluster.tree_edges()) == 48 and connected(cluster)
        assert_sound(cluster)


async def test_membership_changes_add_and_drop_neighbours(autojump_clock: Any) -> None:
    async with SimWorld(seed=5, delay=LINK) as world:
        cluster = BroadcastCluster(world, 20, CONFIG)
        await cluster.start(cluster.names[:15])
        await spread(cluster, "node0000", b"a")
        await cluster.start(cluster.names[15:])  # five join; everyone learns of them
        await spread(cluster, "node0001", b"b")
        assert all(b"a" not in cluster.stores[n].payloads for n in cluster.names[15:])
        cluster.crash("node0002")
        cluster.update_membership()
        dead = cluster.addrs["node0002"]
        assert all(dead not in p.eager + p.lazy for p in cluster.peers.values())
        await spread(cluster, "node0019", b"c")
        assert_sound(cluster)


async def test_superseded_messages_are_neither_grafted_nor_forwarded(autojump_clock: Any) -> None:
    async with SimWorld(seed=6, delay=LINK) as world:
        cluster = BroadcastCluster(world, 10, CONFIG)
        await cluster.start()
        for name in cluster.names[1:]:
            cluster.stores[name].supersede(b"old")  # they know a newer version
        cluster.broadcast("node0000", b"old", 1)
        await trio.sleep(2)
        assert cluster.missing(b"old") == cluster.names[1:]
        totals = cluster.totals()
        assert totals["stale"] > 0 and totals["delivered"] == 0 and totals["graft_ids"] == 0
        assert totals["prune_sent"] == 0  # a stale copy is no cycle
        assert_sound(cluster)


async def test_junk_is_ignored_and_counted(autojump_clock: Any) -> None:
    async with SimWorld(seed=7, delay=LINK) as world:
        cluster = BroadcastCluster(world, 5, CONFIG)
        await cluster.start()
        peer = cluster.peers["node0001"]
        src = cluster.addrs["node0002"]
        assert not peer.handle_datagram(src, {"t": "ping", "s": 1})  # SWIM's: not ours
        assert not peer.handle_datagram(src, [1, 2])
        assert peer.handle_datagram(src, {"pt": "ihave", "i": [[b"", 1]]})
        assert peer.handle_datagram(src, {"pt": 7})
        # A junk call through the network, and a peer sending junk datagrams.
        attacker = world.network(("10.9.9.9", 1))
        assert (
            await attacker.call(peer.net.addr, GOSSIP_METHOD, {"pt": "gossip"}, timeout=1) is None
        )
        assert await attacker.call(peer.net.addr, GOSSIP_METHOD, [b"x"], timeout=1) is None
        attacker.send_datagram(peer.net.addr, {"pt": "graft", "i": [1]})
        attacker.send_datagram(peer.net.addr, {"t": "ack"})
        await trio.sleep(0.1)
        assert peer.counters["malformed"] == 5
        assert cluster.foreign == 1  # the ack: not Plumtree's, left to the demux's other owner
        # It still works.
        await spread(cluster, "node0001", b"ok")
        assert peer.counters["internal_errors"] == 0


async def test_ids_are_checked_and_not_running_is_refused(autojump_clock: Any) -> None:
    world = SimWorld(seed=8)
    peer = Broadcast("a", world.network(("10.0.0.1", 1)), CONFIG, DictStore())
    with pytest.raises(ValueError):
        peer.broadcast(b"", 1)
    with pytest.raises(RuntimeError):
        peer.broadcast(b"x", 1)
    assert peer.handle_datagram(("10.0.0.2", 1), {"pt": "prune"})
    assert peer.counters["not_running"] == 1


def test_deterministic_for_a_seed() -> None:
    def once() -> tuple[dict[str, Any], ...]:
        async def main() -> tuple[dict[str, Any], ...]:
            async with SimWorld(seed=9, loss=0.1, delay=LINK) as world:
                cluster = BroadcastCluster(world, 40, CONFIG, call_loss=0.1)
                await cluster.start()
                rng = random.Random(9)
                for i in range(4):
                    await spread(cluster, rng.choice(cluster.names), b"m%d" % i, timeout=5)
                times = {m: cluster.delivered(m) for m in (b"m0", b"m1", b"m2", b"m3")}
                return times, dict(cluster.totals()), dict(world.stats)

        return trio.run(main, clock=MockClock(autojump_threshold=0))

    assert once() == once()


def test_counter_names_are_documented() -> None:
    """Every counter the code increments is in the class docstring."""
    used = set(re.findall(r'counters\["(\w+)"\]', inspect.getsource(broadcast_module)))
    assert {"duplicates", "delivered", "internal_errors"} <= used  # the pattern finds them
    doc = Broadcast.__doc__ or ""
    assert sorted(name for name in used if f"``{name}``" not in doc) == []
