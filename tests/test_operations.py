"""The Operations class called directly (no kernel): answers, errnos, and the EIO safety net."""

from __future__ import annotations

import errno
import logging

import pyfuse3
import pytest

from drekifs.fs.namespace import ROOT_INODE, WORLD_INODE_BASE, Kind, Namespace, diff, world_inode
from drekifs.fs.operations import Operations
from drekifs.fs.status import StatusFiles
from drekifs.world import snapshot

from .test_world import world_of
from .worlds import small_world


def make_ops(zone=None, now: float = 1000.0) -> Operations:
    snap = snapshot.advance(None, world_of(zone or small_world()), now)
    status = StatusFiles()
    status.add("hello", lambda: "hello\n")
    status.add("clock", lambda: "tick\n", volatile=True)
    return Operations(Namespace(snap, status.names()), status)


async def lookup_path(ops: Operations, path: str) -> pyfuse3.EntryAttributes:
    ino = ROOT_INODE
    attr = await ops.getattr(ino, None)
    for part in path.split("/"):
        attr = await ops.lookup(ino, part.encode(), None)
        ino = attr.st_ino
    return attr


async def test_lookup_getattr_and_xattrs() -> None:
    ops = make_ops()
    attr = await lookup_path(ops, "eu/fr/web1/local")
    assert attr.st_ino == world_inode("w.test:eu:fr:web1::local")
    assert attr.st_ino >= WORLD_INODE_BASE
    assert attr.st_mtime_ns == 1000 * 10**9
    assert await ops.getxattr(attr.st_ino, b"user.dreki.urn", None) == b"w.test:eu:fr:web1::local"
    assert await ops.getxattr(attr.st_ino, b"user.dreki.store", None) == b"local"
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.getxattr(attr.st_ino, b"security.capability", None)
    assert info.value.errno == errno.ENODATA
    node = await lookup_path(ops, "eu/fr/web1")
    assert node.st_nlink == 4 and node.entry_timeout == 3600


async def test_status_files_sizes_and_reads() -> None:
    ops = make_ops()
    attr = await lookup_path(ops, ".dreki/hello")
    assert attr.st_size == 6 and attr.attr_timeout > 0
    info = await ops.open(attr.st_ino, 0, None)
    assert info.keep_cache and not info.direct_io
    assert await ops.read(info.fh, 0, 100) == b"hello\n"
    assert await ops.read(info.fh, 3, 100) == b"lo\n"
    await ops.release(info.fh)
    clock = await lookup_path(ops, ".dreki/clock")
    assert clock.attr_timeout == 0
    info = await ops.open(clock.st_ino, 0, None)
    assert info.direct_io
    import os

    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.open(attr.st_ino, flags, None)
        assert e.value.errno == errno.EPERM


async def test_refusals() -> None:
    ops = make_ops()
    eu = (await lookup_path(ops, "eu")).st_ino
    glob = (await lookup_path(ops, "global")).st_ino
    cases = [
        (ops.mkdir(eu, b"x", 0o755, None), errno.EPERM),
        (ops.mkdir(glob, b"x", 0o755, None), errno.EROFS),
        (ops.unlink(eu, b"nope", None), errno.ENOENT),
        (ops.rmdir(eu, b"fr", None), errno.EPERM),
        (ops.rename(eu, b"fr", eu, b"x", 0, None), errno.EPERM),
        (ops.setxattr(eu, b"system.posix_acl_default", b"", None), errno.EOPNOTSUPP),
        (ops.removexattr(glob, b"user.x", None), errno.ENODATA),
        (ops.link(eu, glob, b"l", None), errno.EPERM),
        (ops.lookup(eu, b"x" * 256, None), errno.ENAMETOOLONG),
        (ops.getattr(12345, None), errno.ENOENT),
        (ops.opendir((await lookup_path(ops, ".dreki/hello")).st_ino, None), errno.ENOTDIR),
    ]
    for coro, expected in cases:
        with pytest.raises(pyfuse3.FUSEError) as info:
            await coro
        assert info.value.errno == expected


async def test_unexpected_exception_becomes_eio_with_the_urn(caplog) -> None:
    ops = make_ops()
    eu = (await lookup_path(ops, "eu")).st_ino

    def broken(*args):
        raise RuntimeError("boom")

    ops._attrs = broken  # a bug anywhere below a handler
    counts = dict(ops.counts)
    caplog.set_level(logging.ERROR)
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.lookup(eu, b"fr", None)
    assert info.value.errno == errno.EIO
    assert "lookup w.test:eu:fr failed unexpectedly" in caplog.text
    assert "RuntimeError: boom" in caplog.text
    with pytest.raises(pyfuse3.FUSEError):
        await ops.getattr(eu, None)
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
    # Every directory sorted by inode: cursors are inodes.
    for e in new.entries.values():
        if e.kind.is_dir:
            assert e.order == sorted(e.order)
            assert e.after(0) == 0 and e.after(1 << 63) == len(e.order)
    assert new.get(ROOT_INODE).kind is Kind.ROOT
