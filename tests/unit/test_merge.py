"""Replicas of the global store merging each other's versions: replace, ignore, conflicts kept
as sibling copies, writes over deletes, entries before their parents — and the same outcome in
every order (hypothesis)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drekifs.cluster.replication import GlobalReplica, message_id
from drekifs.stores.conflicts import CONFLICT_MARK, Action, decide
from drekifs.stores.keys import entry_key, split_key
from drekifs.stores.lmdb import LmdbStore
from drekifs.stores.record import DIR, FILE, TOMBSTONE, Record
from drekifs.stores.replica import Replica
from drekifs.stores.version import HybridClock, Version

LOC = "w.test"


def replica(tmp: Path, peer: str, start_ms: int = 1_000_000) -> LmdbStore:
    ms = iter(itertools.count(start_ms))
    clock = HybridClock(wall_ns=lambda: next(ms) * 1_000_000)
    return LmdbStore(
        "global", tmp / peer, peer=peer, replicated=True, max_value=1 << 20, clock=clock
    )


def write(store: LmdbStore, parts: tuple[bytes, ...], value: bytes) -> None:
    rec = store.get(LOC, parts)
    if rec is None:
        rec = store.create(LOC, parts, FILE, 0o644, 0, 0)
    store.write_value(LOC, parts, rec.eid, value)


def ship(src: LmdbStore, dst: LmdbStore, parts: tuple[bytes, ...]) -> bool:
    key = entry_key(LOC, parts)
    exported = src.export(key)
    assert exported is not None
    return dst.merge(key, *exported)


def names(store: LmdbStore, parts: tuple[bytes, ...] = ()) -> list[bytes]:
    return sorted(store.children(LOC, parts))


def test_the_lmdb_store_is_a_replica(tmp_path: Path) -> None:
    """The peer replicates the global store because it is a Replica (a runtime check of its
    members): one renamed or lost would turn replication off without a word."""
    assert isinstance(replica(tmp_path, "a"), Replica)


def test_replace_then_ignore_then_write_over(tmp_path: Path) -> None:
    a, b = replica(tmp_path, "a"), replica(tmp_path, "b")
    write(a, (b"f",), b"one")
    assert ship(a, b, (b"f",))
    assert b.read(b.get(LOC, (b"f",)).eid) == b"one"  # type: ignore[union-attr]
    assert not ship(a, b, (b"f",))  # the same version again: nothing to do
    write(b, (b"f",), b"two")  # written over what b had seen
    assert ship(b, a, (b"f",))
    assert a.read(a.get(LOC, (b"f",)).eid) == b"two"  # type: ignore[union-attr]
    assert names(a) == [b"f"] and a.conflicts == 0
    assert not ship(a, b, (b"f",))  # a's copy of b's version is b's version


def test_concurrent_writes_keep_the_loser_as_the_same_copy_everywhere(tmp_path: Path) -> None:
    a, b = replica(tmp_path, "a"), replica(tmp_path, "b", start_ms=2_000_000)
    write(a, (b"f",), b"base")
    ship(a, b, (b"f",))
    write(a, (b"f",), b"from a")
    write(b, (b"f",), b"from b")  # neither saw the other: concurrent; b's HLC is larger
    ship(a, b, (b"f",))
    ship(b, a, (b"f",))
    for r in (a, b):
        listing = names(r)
        assert len(listing) == 2 and listing[0] == b"f", listing
        assert listing[1].startswith(b"f" + CONFLICT_MARK + b"a-")
        assert r.read(r.get(LOC, (b"f",)).eid) == b"from b"  # type: ignore[union-attr]
        assert r.read(r.get(LOC, (listing[1],)).eid) == b"from a"  # type: ignore[union-attr]
    assert names(a) == names(b)
    # Deleting the copy resolves it: the loser arriving again changes nothing.
    copy = names(a)[1]
    a.remove(LOC, (copy,), is_dir=False)
    ship(a, b, (copy,))
    assert names(b) == [b"f"]
    assert not ship(a, b, (b"f",))


def test_a_write_concurrent_with_a_delete_wins(tmp_path: Path) -> None:
    a, b = replica(tmp_path, "a", start_ms=5_000_000), replica(tmp_path, "b")
    write(a, (b"f",), b"base")
    ship(a, b, (b"f",))
    a.remove(LOC, (b"f",), is_dir=False)  # larger HLC, but a delete
    write(b, (b"f",), b"kept")
    ship(a, b, (b"f",))
    ship(b, a, (b"f",))
    for r in (a, b):
        assert names(r) == [b"f"]
        assert r.read(r.get(LOC, (b"f",)).eid) == b"kept"  # type: ignore[union-attr]


def test_an_entry_before_its_parent_shows_once_the_parent_arrives(tmp_path: Path) -> None:
    a, b = replica(tmp_path, "a"), replica(tmp_path, "b")
    a.create(LOC, (b"d",), DIR, 0o755, 0, 0)
    write(a, (b"d", b"x"), b"inside")
    ship(a, b, (b"d", b"x"))
    assert b.get(LOC, (b"d",)) is None
    ship(a, b, (b"d",))
    assert names(b, (b"d",)) == [b"x"]
    # The directory's link count is b's own count of its subdirectories, not a's.
    a.create(LOC, (b"d", b"sub"), DIR, 0o755, 0, 0)
    ship(a, b, (b"d", b"sub"))
    assert b.get(LOC, (b"d",)).subdirs == 1  # type: ignore[union-attr]


def test_deletes_replicate(tmp_path: Path) -> None:
    a, b = replica(tmp_path, "a"), replica(tmp_path, "b")
    write(a, (b"f",), b"x")
    ship(a, b, (b"f",))
    a.remove(LOC, (b"f",), is_dir=False)
    assert ship(a, b, (b"f",))
    assert names(b) == [] and b.value_bytes == 0


versions = st.lists(
    st.tuples(st.integers(1, 50), st.sampled_from(["p", "q", "r"]), st.booleans()),
    min_size=1,
    max_size=5,
    unique_by=lambda t: (t[0], t[1]),
)


@settings(max_examples=60, deadline=None)
@given(versions, st.randoms(use_true_random=False))
def test_every_order_gives_the_same_winner(spec, rnd) -> None:
    """Concurrent versions (none saw another), each a write or a delete: whatever the order of
    arrival, the same one wins."""
    recs = [
        Record(FILE if alive else TOMBSTONE, 0, version=Version(hlc, peer))
        for hlc, peer, alive in spec
    ]
    outcomes = set()
    for _ in range(4):
        order = list(recs)
        rnd.shuffle(order)
        current: Record | None = None
        for rec in order:
            if decide(current, rec).action in (Action.REPLACE, Action.REPLACE_KEEP):
                current = rec
        assert current is not None
        outcomes.add(current.version)
    assert len(outcomes) == 1


def test_old_tombstones_are_collected_recent_ones_kept(tmp_path: Path) -> None:
    a = replica(tmp_path, "a")  # its clock starts at 1,000,000 ms
    write(a, (b"old",), b"x")
    write(a, (b"new",), b"y")
    a.remove(LOC, (b"old",), is_dir=False)
    a.remove(LOC, (b"new",), is_dir=False)
    old_ms = a._record(entry_key(LOC, (b"old",))).version.hlc >> 16  # type: ignore[union-attr]
    seen: list[tuple[bytes, ...]] = []
    a.watchers.append(lambda key, origin, carried: seen.append(split_key(key)[1]))
    assert a.collect_tombstones(cutoff_ms=old_ms + 1) == 1  # only the older delete
    assert a._record(entry_key(LOC, (b"old",))) is None
    assert a._record(entry_key(LOC, (b"new",))).kind == TOMBSTONE  # type: ignore[union-attr]
    assert a.digest(entry_key(LOC, (b"old",))) is None and seen == [(b"old",)]
    assert a.collect_tombstones(cutoff_ms=old_ms + 1) == 0


def test_a_replica_away_too_long_drops_old_entries_of_others_keeps_its_own(tmp_path) -> None:
    a = replica(tmp_path, "a")
    write(a, (b"mine",), b"a wrote it")
    theirs = Record(FILE, 0, size=3, version=Version((1_000_000 << 16) + 5, "z"))
    a.merge(entry_key(LOC, (b"theirs",)), theirs, b"old")
    recent = Record(FILE, 0, size=3, version=Version((9_000_000 << 16), "z"))
    a.merge(entry_key(LOC, (b"recent",)), recent, b"new")
    assert a.forget_stale(cutoff_ms=5_000_000) == 1
    assert names(a) == [b"mine", b"recent"]
    assert a.value_bytes == len(b"a wrote it") + 3


def test_a_broadcast_payload_must_be_the_version_its_id_names(tmp_path: Path) -> None:
    a, b = replica(tmp_path / "a", "a"), replica(tmp_path / "b", "b")
    write(a, (b"k",), b"one")
    key = entry_key(LOC, (b"k",))
    rec, value = a.export(key)  # type: ignore[misc]
    assert rec.version is not None
    payload = [rec.pack(), value]
    other = message_id(key, Version(rec.version.hlc + 1, rec.version.peer))
    with pytest.raises(ValueError, match="names"):
        GlobalReplica(b).deliver(other, payload)
    assert b.get(LOC, (b"k",)) is None
    assert GlobalReplica(b).deliver(message_id(key, rec.version), payload)
    assert b.read(b.get(LOC, (b"k",)).eid) == b"one"  # type: ignore[union-attr]


def test_a_graft_is_served_for_a_version_written_over_another(tmp_path: Path) -> None:
    """A message id names (hlc, peer), not the context a version was written over: an entry
    written twice (its version has a context) must still be served when a peer grafts it, and
    a superseded id must not be."""
    a = replica(tmp_path / "a", "a")
    write(a, (b"k",), b"one")
    key = entry_key(LOC, (b"k",))
    first = a.get(LOC, (b"k",)).version  # type: ignore[union-attr]
    write(a, (b"k",), b"two")
    rec, value = a.export(key)  # type: ignore[misc]
    assert rec.version is not None and rec.version.context  # written over "one"
    assert GlobalReplica(a).get(message_id(key, rec.version)) == [rec.pack(), value]
    assert GlobalReplica(a).get(message_id(key, first)) is None  # superseded
