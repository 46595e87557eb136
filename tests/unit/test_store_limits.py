"""The store's limits, enforced where a request would cross them: long paths stored and read
back (LMDB's 511-byte keys notwithstanding), ENAMETOOLONG past MAX_PATH, xattr caps, and keys
from peers checked one by one."""

from __future__ import annotations

import errno
from pathlib import Path

import lmdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drekifs.stores import keys
from drekifs.stores.keys import MAX_PATH, MAX_XATTR_BYTES, MAX_XATTR_NAMES, db_key, entry_key
from drekifs.stores.lmdb import LmdbStore
from drekifs.stores.record import DIR, FILE, SYMLINK, StoreError
from drekifs.stores.version import HybridClock

LOC = "node1.dc2.scw.fr.eu.inf.random.sh"


def open_store(path: Path, peer: str = "p1") -> LmdbStore:
    return LmdbStore("global", path, peer=peer, replicated=True, max_value=1 << 20)


def code(fn, *args, **kw) -> int:
    with pytest.raises(StoreError) as info:
        fn(*args, **kw)
    return info.value.errno


def deep(n: int, width: int = 255) -> tuple[bytes, ...]:
    return tuple(bytes([97 + i % 26]) * width for i in range(n))


def make_dirs(s: LmdbStore, parts: tuple[bytes, ...]) -> None:
    for i in range(1, len(parts) + 1):
        s.create(LOC, parts[:i], DIR, 0o755, 0, 0)


@given(st.lists(st.binary(min_size=1, max_size=255).filter(lambda b: b"\0" not in b), max_size=20))
def test_db_keys_fit_lmdb_and_keep_a_directory_together(names: list[bytes]) -> None:
    parts = tuple(n.replace(b"/", b"_") for n in names)
    for name in (b"a", b"z" * 255):
        key = entry_key(LOC, (*parts, name))
        dbkey = db_key(key)
        assert len(dbkey) <= 511
        # Every child of one directory shares the head's form, whatever its name's length.
        assert dbkey.endswith(name)
        assert dbkey[: -len(name)] == keys.db_head(keys.children_prefix(LOC, parts))


async def test_long_paths_are_stored_listed_and_read_back(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    parts = deep(15)  # 15 * 256 - 1 = 3,839 bytes below the root
    make_dirs(s, parts)
    f = s.create(LOC, (*parts, b"f" * 200), FILE, 0o644, 0, 0)
    s.write_value(LOC, (*parts, b"f" * 200), f.eid, b"deep")
    s.create(LOC, (*parts, b"l"), SYMLINK, 0o777, 0, 0, target=b"t" * 4095)
    await s.sync()  # would fail for good with MDB_BAD_VALSIZE if a key were over 511 bytes
    assert s.commit_error is None and s.committed == s.changes
    s.env.close()
    s = open_store(tmp_path)
    assert set(s.children(LOC, parts)) == {b"f" * 200, b"l"}
    assert [n for n, _ in s.children_page(LOC, parts, b"", 10)[0]] == [b"f" * 200, b"l"]
    assert s.read(s.get(LOC, (*parts, b"f" * 200)).eid) == b"deep"  # type: ignore[union-attr]
    assert s.locate(f.eid) == (LOC, (*parts, b"f" * 200))
    # Scans (the hash tree's, tombstone collection's) see the whole key.
    scanned = {k for k, _ in s.iter_digests()}
    assert entry_key(LOC, (*parts, b"f" * 200)) in scanned
    # Deleting it deletes it, tombstone and all.
    s.remove(LOC, (*parts, b"l"), is_dir=False)
    await s.sync()
    s.env.close()
    s = open_store(tmp_path)
    assert set(s.children(LOC, parts)) == {b"f" * 200}


async def test_path_limit_is_enametoolong_at_the_request(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    parts = deep(15)
    make_dirs(s, parts)
    room = MAX_PATH - keys.path_bytes(parts) - 1
    s.create(LOC, (*parts, b"x" * room), FILE, 0o644, 0, 0)  # exactly MAX_PATH: fine
    assert keys.path_bytes((*parts, b"x" * room)) == MAX_PATH
    assert code(s.create, LOC, (*parts, b"y" * (room + 1)), DIR, 0o755, 0, 0) == errno.ENAMETOOLONG
    assert code(s.create, LOC, (b"n" * 256,), FILE, 0o644, 0, 0) == errno.ENAMETOOLONG
    assert code(s.create, LOC, (b"l",), SYMLINK, 0o777, 0, 0, target=b"t" * 4096) == (
        errno.ENAMETOOLONG
    )
    # A rename that would carry an entry below it past the limit moves nothing.
    s.create(LOC, (b"top",), DIR, 0o755, 0, 0)
    s.create(LOC, (b"top", b"in"), DIR, 0o755, 0, 0)
    s.create(LOC, (b"top", b"in", b"f" * 255), FILE, 0o644, 0, 0)
    before = s.changes
    dst = (*parts, b"z" * (room - 10))
    assert code(s.rename, LOC, (b"top",), dst) == errno.ENAMETOOLONG
    assert s.changes == before and s.get(LOC, (b"top", b"in", b"f" * 255)) is not None
    await s.sync()
    assert s.commit_error is None


async def test_xattr_caps_are_enospc_at_setxattr(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    s.create(LOC, (b"f",), FILE, 0o644, 0, 0)
    for i in range(MAX_XATTR_NAMES):
        s.set_xattr(LOC, (b"f",), b"user.%d" % i, b"")
    assert code(s.set_xattr, LOC, (b"f",), b"user.more", b"") == errno.ENOSPC
    s.create(LOC, (b"g",), FILE, 0o644, 0, 0)
    s.set_xattr(LOC, (b"g",), b"user.big", b"v" * (MAX_XATTR_BYTES - 8))
    assert code(s.set_xattr, LOC, (b"g",), b"user.b2", b"v") == errno.ENOSPC
    s.set_xattr(LOC, (b"g",), b"user.big", b"small")  # replacing within the cap is fine
    await s.sync()
    assert s.commit_error is None


def test_keys_from_peers_are_checked_one_by_one(tmp_path: Path) -> None:
    a = open_store(tmp_path / "a", "pa")
    b = open_store(tmp_path / "b", "pb")
    rec = a.create(LOC, (b"ok",), FILE, 0o644, 0, 0)
    for bad in [
        b"\x01" + b"x" * 32 + b"\0name",  # a hashed head is no location
        LOC.encode() + b"\0a//b\0c",  # an empty name
        LOC.encode() + b"\0\0" + b"n" * 256,  # a name too long
        LOC.encode() + b"\0" + b"/".join(deep(17)) + b"\0n",  # a path too long
    ]:
        assert code(b.merge, bad, rec, b"") == errno.EINVAL
    assert b.merge(entry_key(LOC, (b"ok",)), rec, b"")
    big = rec.but(xattrs={b"user.%d" % i: b"" for i in range(MAX_XATTR_NAMES + 1)})
    assert code(b.merge, entry_key(LOC, (b"x",)), big, b"") == errno.ENOSPC


async def test_a_schema_1_store_moves_its_long_keys(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    parts = (*deep(1, 250), b"d")  # a head of 35 + 252 bytes: hashed in schema 2
    make_dirs(s, parts)
    f = s.create(LOC, (*parts, b"f"), FILE, 0o644, 0, 0)
    await s.sync()
    s.env.close()
    # Rewrite it as schema 1 had it: the key whole, no heads.
    env = lmdb.open(str(tmp_path), max_dbs=8)
    entries, meta = env.open_db(b"entries"), env.open_db(b"meta")
    key = entry_key(LOC, (*parts, b"f"))
    with env.begin(write=True) as txn:
        raw = txn.get(db_key(key), db=entries)
        txn.delete(db_key(key), db=entries)
        txn.put(key, raw, db=entries)
        txn.drop(env.open_db(b"heads", txn=txn), delete=False)
        txn.put(b"schema", (1).to_bytes(8, "big"), db=meta)
    env.close()
    s = open_store(tmp_path)
    assert set(s.children(LOC, parts)) == {b"f"}
    assert s.locate(f.eid) == (LOC, (*parts, b"f"))
    assert key in {k for k, _ in s.iter_digests()}


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 255), min_size=1, max_size=20))
def test_any_depth_within_the_limit_commits(tmp_path_factory, widths: list[int]) -> None:
    import trio

    path = tmp_path_factory.mktemp("s")
    s = LmdbStore("global", path, peer="p", replicated=True, max_value=1 << 20, clock=HybridClock())
    parts: tuple[bytes, ...] = ()
    for i, w in enumerate(widths):
        name = bytes([97 + i % 26]) * w
        if keys.path_bytes((*parts, name)) > MAX_PATH:
            assert code(s.create, LOC, (*parts, name), DIR, 0o755, 0, 0) == errno.ENAMETOOLONG
            break
        s.create(LOC, (*parts, name), DIR, 0o755, 0, 0)
        parts = (*parts, name)
    trio.run(s.sync)
    assert s.commit_error is None
    s.env.close()
    s = LmdbStore("global", path, peer="p", replicated=True, max_value=1 << 20)
    for i in range(1, len(parts) + 1):
        assert s.get(LOC, parts[:i]) is not None
    s.env.close()


def test_a_peers_bad_entry_fails_alone_in_an_exchange(tmp_path: Path) -> None:
    """Anti-entropy hands a batch of entries to the replica: one it refuses (a bad key, too
    many xattrs, junk) is counted and logged; the others are merged all the same."""
    from drekifs.cluster.replication import GlobalReplica

    a = open_store(tmp_path / "a", "pa")
    b = open_store(tmp_path / "b", "pb")
    rec = a.create(LOC, (b"ok",), FILE, 0o644, 0, 0)
    big = rec.but(xattrs={b"user.%d" % i: b"" for i in range(MAX_XATTR_NAMES + 1)})
    replica = GlobalReplica(b)
    changed = replica.merge(
        [
            (entry_key(LOC, (b"first",)), [rec.pack(), b"1"]),
            (LOC.encode() + b"\0a//b\0c", [rec.pack(), b""]),
            (entry_key(LOC, (b"fat",)), [big.pack(), b""]),
            (entry_key(LOC, (b"junk",)), [b"not msgpack", None]),
            (entry_key(LOC, (b"last",)), [rec.pack(), b"2"]),
        ]
    )
    assert changed == 2 and replica.refused == 3
    assert b.get(LOC, (b"first",)) is not None and b.get(LOC, (b"last",)) is not None
    assert b.get(LOC, (b"fat",)) is None
