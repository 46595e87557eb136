"""Plumtree and anti-entropy together (tests/harness/replication_cluster.py) on the simulated
network: the store's winner rule, writes through crashes, restarts and a partition with writes on
both sides, convergence after the heal with no acknowledged write lost, determinism. All on
trio's MockClock: simulated seconds cost only the CPU they need."""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio

from drekifs.cluster.antientropy import AntiEntropy, HashTree, SyncResult, TreeShape
from drekifs.cluster.rejoin import RETURN_EXCHANGES, came_back, exchange_with_returning
from drekifs.cluster.replication import Replication, message_id
from drekifs.stores.keys import entry_key
from drekifs.stores.lmdb import LmdbStore
from drekifs.stores.record import DIR, FILE
from drekifs.stores.version import Version

from ..harness.replication_cluster import (
    ANTIENTROPY,
    BROADCAST,
    LOCAL,
    Outcome,
    ReplConfig,
    ReplicationCluster,
    Scenario,
    SimReplica,
    run_scenario,
    run_seeded,
)
from ..harness.simnet import SimWorld, addr_of

LINK = (0.019, 0.021)
LOSS = 0.05


def small(peers: int = 30, **kw: Any) -> Scenario:
    """The bench's scenario, cut down: fewer peers and writes, the same shape in time."""
    return Scenario(peers=peers, writes=kw.pop("writes", 40), keys=25, same_key_pairs=4, **kw)


def simulate(seed: int, scenario: Scenario, config: ReplConfig | None = None) -> Outcome:
    async def main() -> Outcome:
        async with SimWorld(seed=seed, loss=LOSS, delay=LINK) as world:
            return await run_scenario(world, scenario, config or ReplConfig(call_loss=LOSS))

    return run_seeded(main, seed)


def assert_sound(out: Outcome) -> None:
    """Converged, nothing lost, no bug surfaced in either protocol."""
    assert out.converged_after is not None, "no convergence after the heal"
    assert out.lost == 0
    for counter in ("internal_errors", "malformed", "store_errors", "ae_errors", "ae_bad_replies"):
        assert out.totals.get(counter, 0) == 0, counter
    assert out.totals.get("ae_bad_requests", 0) == 0
    assert out.foreign == 0
    assert all(c.seconds is not None for c in out.catch_ups), out.catch_ups


# -- The store ------------------------------------------------------------------------------


def mid(key: bytes, hlc: int, peer: str) -> bytes:
    return message_id(key, Version(hlc, peer))


async def test_replica_keeps_the_newer_version_and_its_tree(autojump_clock: Any) -> None:
    a, b = SimReplica("a", TreeShape(4, 2)), SimReplica("b", TreeShape(4, 2))
    hlc, peer, _ = a.write(b"k\0x", b"1")
    m = mid(b"k\0x", hlc, peer)
    assert a.has(m) and a.get(m) == [hlc, "a", b"1"]
    assert not b.has(m) and b.get(m) is None
    assert b.deliver(m, a.get(m)) and not b.deliver(m, a.get(m))
    assert b.tree.root() == a.tree.root() and b.clock.last >= hlc
    # b writes over it (its clock is past a's version): the old id is superseded there.
    newer = b.write(b"k\0x", b"2")
    assert newer[:2] > (hlc, "a") and b.has(m) and b.get(m) is None
    # An older version merged by anti-entropy changes nothing; the newer one does.
    assert b.merge([(b"k\0x", [hlc, "a", b"1"])]) == 0
    assert a.merge(b.export([b"k\0x"])) == 1
    assert a.tree.root() == b.tree.root()
    assert a.arrived[(b"k\0x", newer[0], "b")] == ANTIENTROPY
    assert b.arrived[(b"k\0x", hlc, "a")] == BROADCAST
    assert a.arrived[(b"k\0x", hlc, "a")] == LOCAL
    # Ties break on the peer name, as Version.beats.
    c = SimReplica("c", TreeShape(4, 2))
    assert c.merge([(b"t\0", [7, "a", b"x"]), (b"t\0", [7, "b", b"y"])]) == 2
    assert c.merge([(b"t\0", [7, "a", b"x"])]) == 0 and c.entries[b"t\0"][1] == "b"
    # A payload that is not the version its id names is refused.
    with pytest.raises(ValueError):
        c.deliver(mid(b"t\0", 9, "a"), [8, "a", b"x"])
    # A rebuilt tree (a restart) equals the one kept up to date.
    root = a.tree.root()
    a.rebuild_tree()
    assert a.tree.root() == root and a.tree.ready


# -- Whole runs -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_converges_after_crashes_and_a_partition(seed: int) -> None:
    out = simulate(seed, small())
    assert_sound(out)
    # Both protocols did their share: broadcast within each side, anti-entropy across it.
    assert out.arrivals.get(BROADCAST, 0) > out.arrivals.get(ANTIENTROPY, 0) > 0
    # Each restarted peer caught up: a full sync with some peer succeeded.
    assert len(out.catch_ups) == 2
    assert all(c.seconds is not None for c in out.catch_ups)
    # The detection delay bounds the convergence after the heal, plus a few exchanges.
    assert out.converged_after < ReplConfig().detect + 5


def test_sixty_peers_converge() -> None:
    assert_sound(simulate(7, small(60, writes=30)))


def test_without_exchanges_on_rejoin_periodic_anti_entropy_converges() -> None:
    """With no exchange on rejoin, only the periodic exchanges (every 20 s, jittered) repair
    the two sides: slower, but they converge."""
    config = ReplConfig(call_loss=LOSS, rejoin_exchanges=0)
    out = simulate(4, small(writes=20), config)
    assert_sound(out)
    assert out.converged_after > ReplConfig().detect + 1
    assert out.rejoins_due > 0 and out.rejoins == 0  # members came back; none was asked


def test_without_anti_entropy_the_sides_never_converge(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mutation check of the runs above: anti-entropy switched off (every exchange ends at
    once, as if in sync), the writes made while partitioned or down never cross, and the
    same run does not converge."""

    async def off(
        self: AntiEntropy, addr: Any, result: SyncResult, push: bool, push_limit: Any = None
    ) -> None:
        result.in_sync = True

    monkeypatch.setattr(AntiEntropy, "_exchange", off)
    out = simulate(1, small())
    assert out.converged_after is None
    assert out.arrivals.get(ANTIENTROPY, 0) == 0


async def test_returning_members_are_tried_until_one_exchange_brings_news() -> None:
    """The rule the daemon and the simulation share: a few returning members, in random
    order, one at a time, until one exchange brings entries this peer lacked."""
    alive = {f"n{i}": ("10.0.0.1", 7000 + i) for i in range(10)}
    tried: list[str] = []

    def exchanger(*with_news: str) -> Any:
        async def exchange(name: str, addr: Any) -> bool:
            assert addr == alive[name]
            tried.append(name)
            return name in with_news

        return exchange

    back = came_back("n0", {"n0", "n1"}, alive)
    assert back == [f"n{i}" for i in range(2, 10)]
    await exchange_with_returning(back, alive, exchanger(), random.Random(1))
    assert len(tried) == len(set(tried)) == RETURN_EXCHANGES and set(tried) <= set(back)
    first = tried[0]
    tried.clear()
    await exchange_with_returning(back, alive, exchanger(first), random.Random(1))
    assert tried == [first]  # the same seed, the same order: news at once, nothing more
    tried.clear()
    await exchange_with_returning(["gone", "n3"], alive, exchanger(), random.Random())
    assert tried == ["n3"]  # a member no longer alive is not tried
    tried.clear()
    await exchange_with_returning(back, alive, exchanger(), random.Random(), 0)
    assert tried == []


def test_rejoin_exchanges_follow_the_daemons_rule() -> None:
    """After the heal each caught-up peer tries a few returning members: far fewer
    exchanges than members that came back."""
    out = simulate(2, small(60, writes=30))
    assert_sound(out)
    assert 0 < out.rejoins <= RETURN_EXCHANGES * 60 < out.rejoins_due


def test_deterministic_for_a_seed() -> None:
    def once() -> tuple[Any, ...]:
        out = simulate(5, small(writes=20))
        catch_ups = [(c.name, c.seconds, c.pulled) for c in out.catch_ups]
        return out.converged_after, out.arrivals, out.messages, out.totals, catch_ups

    assert once() == once()


async def test_a_write_acknowledged_just_before_a_crash_is_not_lost(autojump_clock: Any) -> None:
    """The writer crashes before its broadcast leaves (no push got out): the write is in its
    durable store, and its catch-up after the restart pushes it to the others."""
    async with SimWorld(seed=11, loss=0.0, delay=LINK) as world:
        cluster = ReplicationCluster(world, 12, ReplConfig(detect=1.0))
        await cluster.start()
        cluster.write("node0003", b"k\0early", b"1")
        await trio.sleep(1)
        w = cluster.write("node0005", b"k\0late", b"2")
        cluster.crash("node0005")  # at the same instant: its pushes are cancelled
        await trio.sleep(3)
        assert all(s.version(b"k\0early") is not None for s in cluster.stores.values())
        assert [n for n, s in cluster.stores.items() if s.version(b"k\0late")] == ["node0005"]
        cluster.restart("node0005")
        assert await cluster.wait_converged(10) is not None
        assert not cluster.lost_writes()
        assert cluster.catch_ups[0].seconds is not None
        held = {s.version(w.key) for s in cluster.stores.values()}
        assert held == {(w.hlc, "node0005")}


def test_a_local_write_shows_in_the_hash_tree_at_the_next_read(tmp_path) -> None:
    """Replication marks each changed key; the tree anti-entropy reads is never behind the
    store (create, write, chmod, delete: each seen at the next read; that a burst costs one
    update is test_antientropy's marked-keys test)."""
    store = LmdbStore("global", tmp_path / "g", peer="a", replicated=True, max_value=1 << 20)
    repl = Replication("a", SimWorld().network(addr_of(0)), store)
    key = entry_key("loc", (b"k",))
    try:
        rec = store.create("loc", (b"k",), FILE, 0o644, 0, 0)
        assert repl.tree.get(key) == store.digest(key) is not None
        store.write_value("loc", (b"k",), rec.eid, b"bytes")
        store.update("loc", (b"k",), perm=0o600)
        assert repl.tree.get(key) == store.digest(key)
        store.remove("loc", (b"k",), is_dir=False)
        assert repl.tree.get(key) == store.digest(key)  # the tombstone's
        assert repl.tree.root() == tree_of(store).root()
    finally:
        store.env.close()


def test_a_directory_rename_shows_every_moved_entry_in_the_hash_tree(tmp_path) -> None:
    """Renaming a directory moves every entry below it: each new key and each old key's
    tombstone must reach the tree (and the broadcast), not only the directory's own two."""
    store = LmdbStore("global", tmp_path / "g", peer="a", replicated=True, max_value=1 << 20)
    repl = Replication("a", SimWorld().network(addr_of(0)), store)
    try:
        store.create("loc", (b"a",), DIR, 0o755, 0, 0)
        store.create("loc", (b"a", b"f"), FILE, 0o644, 0, 0)
        store.create("loc", (b"a", b"sub"), DIR, 0o755, 0, 0)
        store.create("loc", (b"a", b"sub", b"g"), FILE, 0o644, 0, 0)
        repl.tree.settle()  # written long ago: the tree holds them
        repl._outgoing.clear()
        heard: list[tuple[bytes, bool]] = []
        store.watchers.append(lambda key, origin, carried: heard.append((key, carried)))
        store.rename("loc", (b"a",), (b"z",))
        # Only the directory's own two keys are not "carried": the mount invalidates just those.
        uncarried = {key for key, carried in heard if not carried}
        assert uncarried == {entry_key("loc", (b"a",)), entry_key("loc", (b"z",))}
        assert dict(repl.tree.items()) == dict(store.iter_digests())
        moved = [(b"z",), (b"z", b"f"), (b"z", b"sub"), (b"z", b"sub", b"g")]
        gone = [(b"a",), (b"a", b"f"), (b"a", b"sub"), (b"a", b"sub", b"g")]
        assert set(repl._outgoing) == {entry_key("loc", p) for p in moved + gone}
    finally:
        store.env.close()


def tree_of(store: LmdbStore) -> HashTree:
    tree = HashTree()
    for key, digest in store.iter_digests():
        tree.set(key, digest)
    return tree
