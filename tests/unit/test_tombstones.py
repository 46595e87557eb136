"""A delete stays deleted: a tombstone goes only once every member heard of has exchanged
since its delete, and the peer's confirmations survive a restart."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from drekifs.cluster.replication import Replication
from drekifs.stores.keys import entry_key
from drekifs.stores.lmdb import LmdbStore
from drekifs.stores.record import FILE, TOMBSTONE
from drekifs.stores.version import LOGICAL_BITS, Version

from ..harness.simnet import SimWorld

GRACE = 60.0


def replication(path: Path) -> tuple[LmdbStore, Replication]:
    store = LmdbStore("global", path, peer="a", replicated=True, max_value=1 << 20)
    return store, Replication("a", SimWorld().network(("10.0.0.1", 1)), store, GRACE)


def synced(repl: Replication, peer: str, started: float) -> None:
    repl._synced(SimpleNamespace(peer=peer, seconds=time.time() - started))


async def test_tombstones_wait_for_every_member_heard_of(tmp_path: Path) -> None:
    store, repl = replication(tmp_path / "g")
    store.create("loc", (b"k",), FILE, 0o644, 0, 0)
    store.remove("loc", (b"k",), is_dir=False)
    key = entry_key("loc", (b"k",))
    now = time.time()
    repl.note_members(["a", "b", "c"])  # this peer itself never waits
    assert repl.collect_horizon(now)[1] == ["b", "c"]
    # Well past the grace, but b and c never exchanged since the delete: kept.
    assert repl.collect_horizon(now + 10 * GRACE)[0] == 0.0
    assert await repl.collect() == 0 and store._record(key).kind == TOMBSTONE  # type: ignore[union-attr]
    # b exchanged after the delete; c still has not: kept.
    synced(repl, "b", now + 1)
    assert repl.collect_horizon(now + 10 * GRACE)[0] == 0.0
    # c too: deletes before the older of their exchanges may go, once past the grace.
    synced(repl, "c", now + 2)
    horizon, waiting = repl.collect_horizon(now + 10 * GRACE)
    assert horizon == pytest.approx(now + 1, abs=0.01) and waiting == ["b", "c"]
    assert repl.collect_horizon(now + 2)[0] == pytest.approx(now + 2 - GRACE, abs=0.01)
    # A member removed from the world no longer holds anything back.
    repl.note_members(["d"])
    assert repl.collect_horizon(now + 10 * GRACE)[0] == 0.0
    repl.note_members((), world=["a", "b", "c"])
    assert repl.collect_horizon(now + 10 * GRACE)[0] == pytest.approx(now + 1, abs=0.01)


async def test_confirmations_survive_a_restart(tmp_path: Path) -> None:
    store, repl = replication(tmp_path / "g")
    repl.note_members(["b", "c"])
    synced(repl, "b", 1_000.0)
    repl.save_confirmed()
    store.env.close()
    store, repl = replication(tmp_path / "g")
    assert repl.confirmed == {"b": pytest.approx(1_000.0, abs=0.01), "c": 0.0}
    store.env.close()


async def test_a_peer_away_past_the_grace_drops_what_others_wrote_before_it(
    tmp_path: Path,
) -> None:
    """At start, the latest confirmation older than the grace: entries other peers wrote
    before the grace go (to be fetched again), this peer's own stay, whatever their age."""
    store, repl = replication(tmp_path / "g")
    old = int((time.time() - 2 * GRACE) * 1000) << LOGICAL_BITS
    rec = store.create("loc", (b"x",), FILE, 0o644, 0, 0)
    assert store.merge(entry_key("loc", (b"mine",)), rec.but(version=Version(old, "a")), b"")
    theirs = rec.but(version=Version(old, "b"))
    assert store.merge(entry_key("loc", (b"theirs",)), theirs, b"")
    recent = rec.but(version=Version(int(time.time() * 1000) << LOGICAL_BITS, "b"))
    assert store.merge(entry_key("loc", (b"recent",)), recent, b"")
    repl.note_members(["b"])
    synced(repl, "b", time.time() - 3 * GRACE)  # the last exchange, three graces ago
    repl.save_confirmed()
    await store.sync()
    store.env.close()
    store, repl = replication(tmp_path / "g")
    assert repl.dropped_stale == 1
    assert store.get("loc", (b"theirs",)) is None
    assert store.get("loc", (b"mine",)) is not None and store.get("loc", (b"recent",))
    store.env.close()
