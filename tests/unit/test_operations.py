"""The Operations class called directly (no kernel): answers, errnos, and the EIO safety net."""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest

from drekifs.fs import inodes
from drekifs.fs.namespace import ROOT_INODE, WORLD_INODE_BASE, Kind, Namespace, diff, world_inode
from drekifs.fs.operations import Operations
from drekifs.fs.status import StatusFiles
from drekifs.stores.keys import entry_key
from drekifs.stores.lmdb import LmdbStore
from drekifs.stores.record import FILE, Record
from drekifs.world import snapshot

from ..worlds import small_world
from .test_world import world_of

NODE = "web1.fr.eu.w.test"
CTX = SimpleNamespace(uid=0, gid=0, pid=1, umask=0o022)


def make_ops(tmp_path: Path | None = None, zone=None, now: float = 1000.0) -> Operations:
    snap = snapshot.advance(None, world_of(zone or small_world()), now)
    status = StatusFiles()
    status.add("hello", lambda: "hello\n")
    status.add("clock", lambda: "tick\n", volatile=True)
    stores = {}
    if tmp_path is not None:
        for name, replicated, limit in (("global", True, 1 << 20), ("local", False, 64 << 20)):
            stores[name] = LmdbStore(
                name, tmp_path / name, peer="p1", replicated=replicated, max_value=limit
            )
    return Operations(
        Namespace(snap, status.names()),
        status,
        stores=stores,
        node=NODE,
        slots=inodes.StoreSlots(),
    )


async def lookup_path(ops: Operations, path: str) -> pyfuse3.EntryAttributes:
    ino = ROOT_INODE
    attr = await ops.getattr(ino, None)
    for part in path.split("/"):
        attr = await ops.lookup(ino, part.encode(), None)
        ino = attr.st_ino
    return attr


async def errno_of(coro) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await coro
    return info.value.errno


async def test_lookup_getattr_and_xattrs() -> None:
    ops = make_ops()
    attr = await lookup_path(ops, "eu/fr/web1/local")
    assert attr.st_ino == world_inode("w.test:eu:fr:web1::local")
    assert attr.st_ino >= WORLD_INODE_BASE
    assert attr.st_mtime_ns == 1000 * 10**9
    assert await ops.getxattr(attr.st_ino, b"user.dreki.urn", None) == b"w.test:eu:fr:web1::local"
    assert await ops.getxattr(attr.st_ino, b"user.dreki.store", None) == b"local"
    assert await errno_of(ops.getxattr(attr.st_ino, b"security.capability", None)) == (
        errno.ENODATA
    )
    node = await lookup_path(ops, "eu/fr/web1")
    assert node.st_nlink == 4 and node.entry_timeout == 3600


async def test_status_files_sizes_and_reads() -> None:
    ops = make_ops()
    attr = await lookup_path(ops, ".dreki/hello")
    assert attr.st_size == 6 and attr.attr_timeout > 0
    info = await ops.open(attr.st_ino, os.O_RDONLY, None)
    assert info.keep_cache and not info.direct_io
    assert await ops.read(info.fh, 0, 100) == b"hello\n"
    assert await ops.read(info.fh, 3, 100) == b"lo\n"
    await ops.release(info.fh)
    clock = await lookup_path(ops, ".dreki/clock")
    assert clock.attr_timeout == 0
    assert (await ops.open(clock.st_ino, os.O_RDONLY, None)).direct_io
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        assert await errno_of(ops.open(attr.st_ino, flags, None)) == errno.EPERM


async def test_a_file_replaced_while_written_keeps_its_bytes_to_itself(tmp_path: Path) -> None:
    """A file renamed over while open for writing: at release its bytes go nowhere (its
    entry id is gone), and the new occupant of the name is untouched. (A file renamed while
    written is test_metadata_waiting_with_bytes_follows_the_entry's.)"""
    ops = make_ops(tmp_path)
    glob = (await lookup_path(ops, "global")).st_ino
    _, b = await ops.create(glob, b"b", 0o644, os.O_WRONLY, CTX)
    info, replaced = await ops.create(glob, b"c", 0o644, os.O_WRONLY, CTX)
    await ops.write(info.fh, 0, b"lost")
    await ops.rename(glob, b"b", glob, b"c", 0, CTX)
    assert await ops.read(info.fh, 0, 10) == b"lost"
    # Its inode answers from the open file; what is set on it stays there, not at its old key.
    info_ino = replaced.st_ino
    await ops.setxattr(info_ino, b"user.k", b"v", CTX)
    attr = SimpleNamespace(st_mode=0o600, st_size=2)
    await ops.setattr(info_ino, attr, SetFields(update_mode=True, update_size=True), None, CTX)
    got = await ops.getattr(info_ino, None)
    assert (got.st_nlink, got.st_mode & 0o777, got.st_size) == (0, 0o600, 2)
    assert await ops.getxattr(info_ino, b"user.k", None) == b"v"
    await ops.removexattr(info_ino, b"user.k", CTX)
    assert await errno_of(ops.removexattr(info_ino, b"user.k", CTX)) == errno.ENODATA
    assert await errno_of(ops.open(info_ino, os.O_RDONLY, None)) == errno.ESTALE
    await ops.fsync(info.fh, False)  # nothing to commit anywhere
    await ops.release(info.fh)
    c = await ops.lookup(glob, b"c", None)
    assert c.st_ino == b.st_ino and c.st_size == 0 and c.st_mode & 0o777 == 0o644
    assert await ops.listxattr(c.st_ino, None) == []
    assert await errno_of(ops.getattr(info_ino, None)) == errno.ESTALE  # closed: gone


class SetFields(SimpleNamespace):
    def __init__(self, **fields: bool) -> None:
        names = ("mode", "uid", "gid", "size", "atime", "mtime", "ctime")
        super().__init__(**{f"update_{n}": False for n in names})
        self.__dict__.update(fields)


async def test_an_open_file_a_peer_deleted_answers_from_its_handles(tmp_path: Path) -> None:
    """A peer's delete merged while the file is open here: the handles keep its bytes (taken
    before the store drops them), its inode says st_nlink 0 and the kernel is told; after the
    last release the inode is ESTALE (the kernel looks its name up again)."""
    ops = make_ops(tmp_path)
    store = ops.stores["global"]
    peer = LmdbStore("global", tmp_path / "peer", peer="p2", replicated=True, max_value=1 << 20)
    loc, key = "w.test", entry_key("w.test", (b"f",))
    rec = peer.create(loc, (b"f",), FILE, 0o640, 0, 0)
    peer.write_value(loc, (b"f",), rec.eid, b"from p2")
    store.merge(key, *peer.export(key))  # type: ignore[misc]
    glob = (await lookup_path(ops, "global")).st_ino
    f = await ops.lookup(glob, b"f", None)
    info = await ops.open(f.st_ino, os.O_RDONLY, None)
    ops.invalidator._attrs.clear()
    peer.remove(loc, (b"f",), is_dir=False)
    assert store.merge(key, *peer.export(key))  # type: ignore[misc]
    assert store.get(loc, (b"f",)) is None and f.st_ino in ops.invalidator._attrs
    attr = await ops.getattr(f.st_ino, None)
    assert (attr.st_nlink, attr.st_size, attr.st_mode) == (0, 7, stat.S_IFREG | 0o640)
    assert await ops.read(info.fh, 0, 100) == b"from p2"
    await ops.release(info.fh)
    assert await errno_of(ops.getattr(f.st_ino, None)) == errno.ESTALE
    assert (await ops.lookup(glob, b"f", None)).st_ino == 0


async def test_a_create_of_an_existing_name_is_looked_up_again(tmp_path: Path) -> None:
    """CREATE of a name that exists (made since the kernel cached its absence): ESTALE, so
    the kernel looks it up and opens it with its own permission checks; O_EXCL: EEXIST."""
    ops = make_ops(tmp_path)
    glob = (await lookup_path(ops, "global")).st_ino
    info, _ = await ops.create(glob, b"f", 0o644, os.O_WRONLY | os.O_CREAT, CTX)
    await ops.release(info.fh)
    await ops.mkdir(glob, b"d", 0o755, CTX)
    for name in (b"f", b"d"):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        assert await errno_of(ops.create(glob, name, 0o644, flags, CTX)) == errno.ESTALE
        flags |= os.O_EXCL
        assert await errno_of(ops.create(glob, name, 0o644, flags, CTX)) == errno.EEXIST


async def test_a_directory_renamed_elsewhere_invalidates_its_names_not_its_tree(
    tmp_path: Path,
) -> None:
    """A rename made elsewhere (here the control socket's origin) drops the directory's old
    and new names from the kernel; the entries it carried keep their inodes, so nothing is
    queued for them (a big tree would otherwise lose its page cache)."""
    ops = make_ops(tmp_path)
    store = ops.stores["global"]
    glob = (await lookup_path(ops, "global")).st_ino
    d = await ops.mkdir(glob, b"d", 0o755, CTX)
    _, f = await ops.create(d.st_ino, b"f", 0o644, os.O_WRONLY, CTX)
    ops.invalidator._entries.clear()
    ops.invalidator._inodes.clear()
    store.rename("w.test", (b"d",), (b"e",), origin="control")
    assert set(ops.invalidator._entries) == {(glob, b"d"), (glob, b"e")}
    assert ops.invalidator._inodes == {glob, d.st_ino}
    assert f.st_ino not in ops.invalidator._inodes | ops.invalidator._attrs


async def test_files_in_a_store(tmp_path: Path) -> None:
    ops = make_ops(tmp_path)
    root = (await lookup_path(ops, "eu/fr/web1/local")).st_ino
    d = await ops.mkdir(root, b"d", 0o755, CTX)
    info, attr = await ops.create(d.st_ino, b"f", 0o644, os.O_WRONLY, CTX)
    assert attr.st_ino < WORLD_INODE_BASE and inodes.is_store_inode(attr.st_ino)
    assert await ops.write(info.fh, 0, b"hello") == 5
    assert (await ops.getattr(attr.st_ino, None)).st_size == 5  # dirty, not yet committed
    assert await ops.write(info.fh, 10, b"!") == 1  # a hole
    await ops.release(info.fh)
    info = await ops.open(attr.st_ino, os.O_RDONLY, None)
    assert await ops.read(info.fh, 0, 100) == b"hello\0\0\0\0\0!"
    await ops.release(info.fh)
    assert (await ops.getattr(d.st_ino, None)).st_nlink == 2
    assert (await ops.getattr(root, None)).st_nlink == 3
    assert await ops.getxattr(attr.st_ino, b"user.dreki.urn", None) == (
        b"w.test:eu:fr:web1::local::d/f"
    )
    await ops.setxattr(attr.st_ino, b"user.color", b"blue", CTX)
    assert await ops.getxattr(attr.st_ino, b"user.color", None) == b"blue"
    assert await ops.listxattr(attr.st_ino, None) == [b"user.color"]
    await ops.rename(d.st_ino, b"f", root, b"g", 0, CTX)
    assert (await ops.lookup(root, b"g", None)).st_ino == attr.st_ino  # same inode after mv
    gone = await ops.lookup(d.st_ino, b"f", None)  # inode 0: absent, and the kernel keeps that
    assert gone.st_ino == 0 and gone.entry_timeout == ops.cache_timeout
    for store in ops.stores.values():
        await store.sync()


async def test_store_errnos(tmp_path: Path) -> None:
    ops = make_ops(tmp_path)
    glob = (await lookup_path(ops, "global")).st_ino
    local = (await lookup_path(ops, "eu/fr/web1/local")).st_ino
    other = (await lookup_path(ops, "eu/fr/db1/local")).st_ino  # another node's
    eu = (await lookup_path(ops, "eu")).st_ino
    await ops.mkdir(glob, b"d", 0o755, CTX)
    info, f = await ops.create(glob, b"f", 0o644, os.O_WRONLY, CTX)
    assert await errno_of(ops.write(info.fh, 0, b"x" * ((1 << 20) + 1))) == errno.EFBIG
    await ops.release(info.fh)
    cases = [
        (ops.mkdir(eu, b"x", 0o755, CTX), errno.EPERM),
        (ops.mkdir(other, b"x", 0o755, CTX), errno.EROFS),
        (ops.mkdir(glob, b"d", 0o755, CTX), errno.EEXIST),
        (ops.mkdir(glob, b"x" * 256, 0o755, CTX), errno.ENAMETOOLONG),
        (ops.rmdir(glob, b"f", CTX), errno.ENOTDIR),
        (ops.unlink(glob, b"d", CTX), errno.EISDIR),
        (ops.rename(glob, b"f", local, b"f", 0, CTX), errno.EXDEV),
        (ops.rename(glob, b"f", eu, b"f", 0, CTX), errno.EPERM),
        (ops.rename(glob, b"f", glob, b"d", 0, CTX), errno.EISDIR),
        (ops.rename(glob, b"d", glob, b"f", 0, CTX), errno.ENOTDIR),
        (ops.rename(glob, b"f", glob, b"d", 1, CTX), errno.EEXIST),  # RENAME_NOREPLACE
        (ops.setxattr(f.st_ino, b"system.posix_acl_access", b"", CTX), errno.EOPNOTSUPP),
        (ops.setxattr(f.st_ino, b"user.dreki.urn", b"x", CTX), errno.EPERM),
        (ops.setxattr(f.st_ino, b"trusted.x", b"x", CTX), errno.EOPNOTSUPP),
        (ops.removexattr(f.st_ino, b"user.none", CTX), errno.ENODATA),
        (ops.link(f.st_ino, glob, b"l", CTX), errno.EPERM),
        (ops.mknod(glob, b"fifo", 0o010644, 0, CTX), errno.EPERM),
        (ops.getattr(12345, None), errno.ENOENT),
    ]
    for i, (coro, expected) in enumerate(cases):
        assert await errno_of(coro) == expected, i
    ops.stores["global"].check_size(1 << 20)


async def test_unexpected_exception_becomes_eio_with_the_urn(caplog) -> None:
    ops = make_ops()
    eu = (await lookup_path(ops, "eu")).st_ino

    def broken(*args):
        raise RuntimeError("boom")

    ops.world.attrs = broken  # type: ignore[method-assign]  # a bug anywhere below a handler
    counts = dict(ops.counts)
    caplog.set_level(logging.ERROR)
    assert await errno_of(ops.lookup(eu, b"fr", None)) == errno.EIO
    assert "lookup w.test:eu:fr failed unexpectedly" in caplog.text
    assert "RuntimeError: boom" in caplog.text
    assert await errno_of(ops.getattr(eu, None)) == errno.EIO
    assert "getattr w.test:eu failed" in caplog.text
    assert ops.counts["lookup"] == counts["lookup"] + 1
    assert ops.counts["getattr"] == counts["getattr"] + 1


async def test_namespace_diff_names_what_the_kernel_must_forget() -> None:
    old = make_ops().ns
    zone = small_world()
    zone.lines = [ln for ln in zone.lines if "db1" not in ln]
    zone.region("de.eu", ["new.de.eu"]).node("new.de.eu")
    new = Namespace(snapshot.advance(old.snapshot, world_of(zone), 2000.0), ("hello", "clock"))
    changes = diff(old, new)
    fr = world_inode("w.test:eu:fr")
    de = world_inode("w.test:eu:de")
    assert [(p, n) for p, n, _ in changes.entries] == [(fr, b"db1")]  # the subtree goes with it
    assert set(changes.inodes) == {fr, de}
    for e in new.entries.values():
        if e.kind.is_dir:
            assert e.order == sorted(e.order)
            assert e.after(0) == 0 and e.after(1 << 63) == len(e.order)
    assert new.get(ROOT_INODE).kind is Kind.ROOT
    # A node listed twice gets one alias per path.
    roots = new.store_roots[("shared.w.test", "global")]
    assert len(roots) == 2 and roots[0].alias != roots[1].alias


def _setattr_fields(**on: bool) -> SimpleNamespace:
    names = ("size", "mode", "uid", "gid", "mtime", "atime", "ctime")
    return SimpleNamespace(**{f"update_{n}": on.get(n, False) for n in names})


async def test_metadata_set_while_writing_goes_out_with_the_bytes(tmp_path: Path) -> None:
    """cp -a writes, sets the times, then the mode, then closes: one version at close, with
    bytes, times and mode; meanwhile the mount shows them all (another handle included)."""
    ops = make_ops(tmp_path)
    glob = (await lookup_path(ops, "global")).st_ino
    info, attr = await ops.create(glob, b"f", 0o600, os.O_WRONLY, CTX)
    await ops.write(info.fh, 0, b"data")
    store = ops.stores["global"]
    before = store.changes
    when = 1_600_000_000 * 10**9
    times = SimpleNamespace(st_mtime_ns=when, st_atime_ns=when + 1, st_mode=0o100644)
    out = await ops.setattr(attr.st_ino, times, _setattr_fields(mtime=True, atime=True), None, CTX)
    assert (out.st_mtime_ns, out.st_atime_ns, out.st_size) == (when, when + 1, 4)
    out = await ops.setattr(attr.st_ino, times, _setattr_fields(mode=True), None, CTX)
    assert out.st_mode == 0o100644 and out.st_mtime_ns == when
    assert store.changes == before  # nothing in the store yet
    other = await ops.open(attr.st_ino, os.O_RDONLY, CTX)
    seen = await ops.getattr(attr.st_ino, CTX)
    assert (seen.st_mode, seen.st_mtime_ns, seen.st_size) == (0o100644, when, 4)
    assert seen.st_ctime_ns >= out.st_ctime_ns
    await ops.release(info.fh)
    await ops.release(other.fh)
    assert store.changes == before + 1
    rec = store.get("w.test", (b"f",))
    assert (rec.perm, rec.mtime_ns, rec.atime_ns, rec.size) == (0o644, when, when + 1, 4)
    assert store.read(rec.eid) == b"data"


async def test_a_write_after_utimes_moves_mtime_and_fsync_commits_all(tmp_path: Path) -> None:
    ops = make_ops(tmp_path)
    glob = (await lookup_path(ops, "global")).st_ino
    info, attr = await ops.create(glob, b"f", 0o644, os.O_WRONLY, CTX)
    await ops.write(info.fh, 0, b"data")
    when = 1_600_000_000 * 10**9
    times = SimpleNamespace(st_mtime_ns=when, st_atime_ns=when, st_uid=7, st_gid=8)
    await ops.setattr(attr.st_ino, times, _setattr_fields(mtime=True, atime=True), None, CTX)
    await ops.write(info.fh, 4, b"more")
    await ops.setattr(attr.st_ino, times, _setattr_fields(uid=True, gid=True), None, CTX)
    await ops.fsync(info.fh, False)
    rec = ops.stores["global"].get("w.test", (b"f",))
    assert rec.mtime_ns > when and rec.atime_ns == when  # a write moves mtime, not atime
    assert (rec.uid, rec.gid, rec.size) == (7, 8, 8)
    changes = ops.stores["global"].changes
    await ops.release(info.fh)
    assert ops.stores["global"].changes == changes  # fsync took it all


async def test_metadata_waiting_with_bytes_follows_the_entry(tmp_path: Path) -> None:
    """Metadata held with unsaved bytes: an epoch mtime is kept, a rename carries it to the
    new name, an unlink drops it with the bytes, and a node listed twice has its other path's
    attributes dropped from the kernel."""
    ops = make_ops(tmp_path)
    glob = (await lookup_path(ops, "global")).st_ino
    store = ops.stores["global"]
    epoch = SimpleNamespace(st_mtime_ns=0, st_atime_ns=0, st_mode=0o100600, st_size=2)
    info, attr = await ops.create(glob, b"f", 0o644, os.O_WRONLY, CTX)
    await ops.write(info.fh, 0, b"data")
    fields = _setattr_fields(size=True, mode=True, mtime=True, atime=True)
    out = await ops.setattr(attr.st_ino, epoch, fields, None, CTX)
    assert (out.st_mtime_ns, out.st_mode, out.st_size) == (0, 0o100600, 2)
    await ops.rename(glob, b"f", glob, b"g", 0, CTX)
    await ops.release(info.fh)
    rec = store.get("w.test", (b"g",))
    assert (rec.mtime_ns, rec.atime_ns, rec.perm, rec.size) == (0, 0, 0o600, 2)
    assert store.read(rec.eid) == b"da"

    info, attr = await ops.create(glob, b"gone", 0o644, os.O_WRONLY, CTX)
    await ops.write(info.fh, 0, b"data")
    await ops.setattr(attr.st_ino, epoch, _setattr_fields(mode=True), None, CTX)
    await ops.unlink(glob, b"gone", CTX)
    changes = store.changes
    await ops.release(info.fh)  # nowhere to go: no error, no change
    assert store.changes == changes and store.get("w.test", (b"gone",)) is None

    # A node listed twice (eu/shared and eu/fr/shared).
    shared = await lookup_path(ops, "eu/shared/global")
    other = await lookup_path(ops, "eu/fr/shared/global")
    info, attr = await ops.create(shared.st_ino, b"s", 0o644, os.O_WRONLY, CTX)
    await ops.write(info.fh, 0, b"x")
    ops.invalidator._attrs.clear()
    await ops.setattr(attr.st_ino, epoch, _setattr_fields(mode=True), None, CTX)
    twin = await ops.lookup(other.st_ino, b"s", CTX)
    assert twin.st_ino in ops.invalidator._attrs and twin.st_mode == 0o100600
    await ops.release(info.fh)


async def test_attributes_kept_for_the_next_request_follow_store_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """READDIRPLUS and GETATTR keep an entry's attributes for the requests that follow (a
    tar stats every file it listed); a change made through the store API, not through this
    mount, must still show at the next GETATTR and READDIR."""
    replies: list[tuple[bytes, int, int]] = []

    def reply(token: object, name: bytes, attr: pyfuse3.EntryAttributes, ino: int) -> bool:
        replies.append((name, attr.st_mode & 0o7777, attr.st_size))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    ops = make_ops(tmp_path)
    glob = (await lookup_path(ops, "global")).st_ino
    inos = {}
    for name in (b"a", b"b"):
        info, attr = await ops.create(glob, name, 0o644, os.O_WRONLY, CTX)
        await ops.write(info.fh, 0, b"12345")
        await ops.release(info.fh)
        inos[name] = attr.st_ino
    fh = await ops.opendir(glob, CTX)
    await ops.readdir(fh, 0, None)
    assert replies == [(b"a", 0o644, 5), (b"b", 0o644, 5)]
    assert (await ops.getattr(inos[b"a"], None)).st_mode & 0o7777 == 0o644

    store = ops.stores["global"]
    store.update("w.test", (b"a",), perm=0o600)
    store.write_value("w.test", (b"b",), store.get("w.test", (b"b",)).eid, b"123", None)
    assert (await ops.getattr(inos[b"a"], None)).st_mode & 0o7777 == 0o600
    assert (await ops.getattr(inos[b"b"], None)).st_size == 3
    replies.clear()
    await ops.readdir(fh, 0, None)  # the same handle, opened before the changes
    assert replies == [(b"a", 0o600, 5), (b"b", 0o644, 3)]
    await ops.releasedir(fh)
    await store.sync()


def test_a_record_refuses_a_field_it_does_not_have() -> None:
    rec = Record(FILE, 7, size=3)
    assert rec.but(size=4) == Record(FILE, 7, size=4)
    with pytest.raises(ValueError, match="sizee"):
        rec.but(sizee=4)


async def test_a_listing_opened_before_a_world_change_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory handle resolved in the old namespace still lists, but must not refill the
    node cache with entries under paths the new namespace may not have."""
    monkeypatch.setattr(pyfuse3, "readdir_reply", lambda token, name, attr, ino: True)
    ops = make_ops(tmp_path)
    glob = (await lookup_path(ops, "global")).st_ino
    info, _ = await ops.create(glob, b"a", 0o644, os.O_WRONLY, CTX)
    await ops.release(info.fh)
    fh = await ops.opendir(glob, CTX)
    ops.set_namespace(Namespace(ops.ns.snapshot, ops.status.names()))  # as make_ops built it
    await ops.readdir(fh, 0, None)
    assert not ops.local.nodes.cache
    fh2 = await ops.opendir(glob, CTX)
    await ops.readdir(fh2, 0, None)
    assert ops.local.nodes.cache  # a handle of the current namespace does
    for store in ops.stores.values():
        await store.sync()
