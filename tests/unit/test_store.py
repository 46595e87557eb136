"""The LMDB store on its own: entries, errnos, renames, group commits, reopening."""

from __future__ import annotations

import errno
import tempfile
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from drekifs.stores import keys
from drekifs.stores.keys import children_prefix, entry_key, split_key
from drekifs.stores.lmdb import LmdbStore
from drekifs.stores.lmdb import core as lmdb_core
from drekifs.stores.record import DIR, FILE, SYMLINK, Record, StoreError
from drekifs.stores.version import HybridClock, Version

LOC = "n1.w.test"


def open_store(path: Path, replicated: bool = True, max_value: int = 1 << 20) -> LmdbStore:
    return LmdbStore("global", path, peer="p1", replicated=replicated, max_value=max_value)


def code(fn, *args, **kw) -> int:
    with pytest.raises(StoreError) as info:
        fn(*args, **kw)
    return info.value.errno


def test_keys() -> None:
    for parts in [(), (b"a",), (b"a", b"b", b"c")]:
        assert split_key(entry_key(LOC, parts)) == (LOC, parts)
    assert entry_key(LOC, (b"a", b"b")).startswith(children_prefix(LOC, (b"a",)))
    # Location heads are cached, boundedly: many locations (from peers) stay right and few.
    for i in range(5000):
        loc = f"n{i}.example"
        assert entry_key(loc, (b"x", b"y")) == loc.encode() + b"\0x\0y"
    assert len(keys._LOC_HEADS) <= 4096
    assert entry_key(LOC, ()) == LOC.encode() + b"\0"


async def test_entries_and_errnos(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    d = s.create(LOC, (b"d",), DIR, 0o755, 0, 0)
    f = s.create(LOC, (b"d", b"f"), FILE, 0o644, 0, 0)
    s.create(LOC, (b"l",), SYMLINK, 0o777, 0, 0, target=b"d/f")
    assert d.eid != f.eid
    assert s.write_value(LOC, (b"d", b"f"), f.eid, b"hello").size == 5
    assert s.read(f.eid) == b"hello" and s.read(f.eid, 1, 3) == b"ell"
    assert set(s.children(LOC, ())) == {b"d", b"l"}
    assert code(s.create, LOC, (b"d",), FILE, 0o644, 0, 0) == errno.EEXIST
    assert code(s.create, LOC, (b"x", b"y"), FILE, 0o644, 0, 0) == errno.ENOENT
    assert code(s.create, LOC, (b"l", b"y"), FILE, 0o644, 0, 0) == errno.ENOTDIR
    assert code(s.remove, LOC, (b"d",), is_dir=True) == errno.ENOTEMPTY
    assert code(s.remove, LOC, (b"d",), is_dir=False) == errno.EISDIR
    assert code(s.remove, LOC, (b"d", b"f"), is_dir=True) == errno.ENOTDIR
    assert code(s.write_value, LOC, (b"d", b"f"), f.eid, b"x" * (1 << 20 | 1)) == errno.EFBIG
    await s.sync()
    assert s.committed == s.changes
    # Reopened: everything is there, entry ids go on from where they were.
    s.env.close()
    s = open_store(tmp_path)
    assert s.read(f.eid) == b"hello"
    assert s.locate(f.eid) == (LOC, (b"d", b"f"))
    assert s.create(LOC, (b"g",), FILE, 0o644, 0, 0).eid > f.eid


NAMES = st.sampled_from([b"a", b"b", b"ab", b"b\xff", b"c", b"d", b"e", b"f"])
STEPS = st.lists(st.tuples(st.sampled_from(["add", "remove", "commit"]), NAMES), max_size=40)


@settings(max_examples=60, deadline=None)
@given(steps=STEPS, n=st.integers(1, 4))
def test_pages_of_a_listing_are_the_listing(steps: list, n: int) -> None:
    """Paging through a directory gives exactly its children, in bytes order, whether they
    are on disk or still pending, deleted ones left out."""
    with tempfile.TemporaryDirectory() as tmp:
        s = open_store(Path(tmp))
        s.create(LOC, (b"d",), DIR, 0o755, 0, 0)
        s.create(LOC, (b"d", b"a"), DIR, 0o755, 0, 0)
        s.create(LOC, (b"d", b"a", b"inner"), FILE, 0o644, 0, 0)  # not a child of d
        for op, name in steps:
            parts = (b"d", name)
            rec = s.get(LOC, parts)
            if op == "add" and rec is None:
                s.create(LOC, parts, FILE, 0o644, 0, 0)
            elif op == "remove" and rec is not None and not s.has_children(LOC, parts):
                s.remove(LOC, parts, is_dir=rec.is_dir)
            elif op == "commit":
                trio.run(s.commit)
        want = sorted((name, rec.eid) for name, rec in s.children(LOC, (b"d",)).items())
        got, after = [], b""
        for _ in range(len(want) + 2):  # bounded: each page but the last holds n
            page, more = s.children_page(LOC, (b"d",), after, n)
            assert len(page) <= n and (len(page) == n or not more)
            got.extend((name, rec.eid) for name, rec in page)
            if not more:
                break
            after = page[-1][0]
        assert got == want
        s.env.close()


async def test_rename_moves_subtrees_and_keeps_ids(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    s.create(LOC, (b"a",), DIR, 0o755, 0, 0)
    s.create(LOC, (b"a", b"b"), DIR, 0o755, 0, 0)
    f = s.create(LOC, (b"a", b"b", b"f"), FILE, 0o644, 0, 0)
    s.write_value(LOC, (b"a", b"b", b"f"), f.eid, b"data")
    s.create(LOC, (b"z",), DIR, 0o755, 0, 0)
    assert code(s.rename, LOC, (b"a",), (b"a", b"b", b"c")) == errno.EINVAL
    assert code(s.rename, LOC, (b"a",), (b"z",), noreplace=True) == errno.EEXIST
    s.rename(LOC, (b"a",), (b"z",))  # onto an empty directory
    assert s.get(LOC, (b"a",)) is None
    assert s.locate(f.eid) == (LOC, (b"z", b"b", b"f"))
    assert s.read(f.eid) == b"data"
    # A write addressed by entry id alone (a file open while renamed) follows it.
    assert s.write_value(LOC, None, f.eid, b"moved").size == 5
    assert s.read(f.eid) == b"moved" and s.get(LOC, (b"z", b"b", b"f")).size == 5
    assert s.write_value("other.loc", None, f.eid, b"x") is None  # not at that location
    await s.commit()
    assert set(s.children(LOC, ())) == {b"z"}
    # Tombstones stay in a replicated store, with versions that saw what they replace.
    tomb = s._record(entry_key(LOC, (b"a", b"b", b"f")))
    assert tomb is not None and not tomb.alive and tomb.version is not None
    assert tomb.version.covers(f.version)


async def test_unlinked_while_open_write_goes_nowhere(tmp_path: Path) -> None:
    s = open_store(tmp_path, replicated=False)
    f = s.create(LOC, (b"f",), FILE, 0o644, 0, 0)
    s.remove(LOC, (b"f",), is_dir=False)
    g = s.create(LOC, (b"f",), FILE, 0o644, 0, 0)
    assert s.write_value(LOC, (b"f",), f.eid, b"old") is None
    assert s.write_value(LOC, None, f.eid, b"old") is None
    assert s.get(LOC, (b"f",)).eid == g.eid and s.read(g.eid) == b""


def test_record_round_trip() -> None:
    r = Record(
        FILE, 7, 0o640, 1, 2, 3, 4, 5, {b"user.a": b"1"}, b"", Version(9, "p", (("q", 3),)), 8, 2
    )
    assert Record.unpack(r.pack()) == r


def test_versions() -> None:
    clock = HybridClock(lambda: 1_000_000_000)
    a = Version(clock.now(), "a")
    b = a.successor(clock.now(), "b")
    c = Version(clock.now(), "c")
    assert b.covers(a) and not a.covers(b)
    assert b.concurrent(c) and c.beats(b)
    assert clock.now() > c.hlc


async def test_value_bytes_are_counted_and_kept(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    f = s.create(LOC, (b"f",), FILE, 0o644, 0, 0)
    s.write_value(LOC, (b"f",), f.eid, b"x" * 100)
    g = s.create(LOC, (b"g",), FILE, 0o644, 0, 0)
    s.write_value(LOC, (b"g",), g.eid, b"y" * 50)
    s.write_value(LOC, (b"f",), f.eid, b"x" * 10)
    assert s.stats().bytes == 60
    s.rename(LOC, (b"g",), (b"f",))  # replaces f
    assert s.stats().bytes == 50
    await s.sync()
    s.env.close()
    assert open_store(tmp_path).stats().bytes == 50


async def test_trim_unmaps_read_pages_and_loses_nothing(tmp_path: Path) -> None:
    s = open_store(tmp_path, max_value=1 << 20)
    eids = []
    for i in range(200):
        rec = s.create(LOC, (b"f%d" % i,), FILE, 0o644, 0, 0)
        s.write_value(LOC, (b"f%d" % i,), rec.eid, bytes([i]) * 20_000)
        eids.append(rec.eid)
    await s.sync()
    s._records.clear()

    def rss_file_kib() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssFile:"):
                return int(line.split()[1])
        return 0

    for i, eid in enumerate(eids):
        assert s.read(eid) == bytes([i]) * 20_000
    before = rss_file_kib()
    assert s.trim() > 0
    assert rss_file_kib() < before - 2000  # ~4 MB of values were mapped
    for i, eid in enumerate(eids):
        assert s.read(eid) == bytes([i]) * 20_000  # read again through the map


async def test_a_heavy_group_commits_without_waiting_out_the_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer gathers changes for a window; a group holding GROUP_BYTES of values commits
    at once, so a fast writer cannot pile up more than that in memory."""
    monkeypatch.setattr(lmdb_core, "GROUP_BYTES", 64 << 10)
    store = open_store(tmp_path / "s")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.run_writer, 30.0)  # a window no test waits out
        small = store.create("loc", (b"small",), FILE, 0o644, 0, 0)
        store.write_value("loc", (b"small",), small.eid, b"x" * 1000)
        await trio.sleep(0.3)
        assert store.committed == 0  # light: waits for the window
        big = store.create("loc", (b"big",), FILE, 0o644, 0, 0)
        store.write_value("loc", (b"big",), big.eid, b"y" * (64 << 10))
        with trio.fail_after(10):
            while store.committed < store.changes:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    await store.close()
    again = open_store(tmp_path / "s")
    assert again.read(big.eid) == b"y" * (64 << 10) and again.read(small.eid) == b"x" * 1000
    await again.close()


def test_the_store_keeps_its_instance_dict_small(tmp_path: Path) -> None:
    """Past 30 keys CPython 3.11 stops sharing an instance dict's keys, and every attribute
    read of the store costs more (+1.5% instructions per cp'd file): new ones go to _Slots."""
    s = open_store(tmp_path)
    assert len(vars(s)) < 30, sorted(vars(s))


async def test_a_commit_cancelled_while_waiting_for_a_thread_keeps_its_group(
    tmp_path: Path,
) -> None:
    # A daemon stopping cancels its writer; a commit waiting for a worker thread then (the
    # thread limiter is full) must not strand its group between pending and disk, or the
    # exit's sync spins forever and the changes never land.
    store = open_store(tmp_path / "s")
    store.create(LOC, (b"f",), FILE, 0o644, 0, 0)
    limiter = trio.to_thread.current_default_thread_limiter()
    tokens = limiter.total_tokens
    limiter.total_tokens = 1
    try:
        async with trio.open_nursery() as nursery, limiter:  # every worker thread busy
            nursery.start_soon(store.commit)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    finally:
        limiter.total_tokens = tokens
    with trio.fail_after(10):
        await store.sync()
    assert store.committed == store.changes
    assert await store.close() is None
    reopened = open_store(tmp_path / "s")
    assert reopened.get(LOC, (b"f",)) is not None
    await reopened.close()
