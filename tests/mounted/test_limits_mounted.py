"""Limits through the kernel: any path the kernel lets through is stored, replicated and read
back after a remount, or refused with ENAMETOOLONG at the request; xattrs hit their caps with
ENOSPC at setxattr; the store commits on afterwards."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import pytest

from drekifs.stores.keys import MAX_PATH, MAX_XATTR_BYTES, MAX_XATTR_NAMES

from ..conftest import wait_for
from .test_cluster import cluster  # noqa: F401  (a fixture)

pytestmark = pytest.mark.mounted

LOCAL = "eu/fr/ovh/sbg1/node1/local"  # the demo world's first node, where mount_world() mounts


def name(i: int, width: int = 255) -> bytes:
    return bytes([97 + i % 26]) * width


def dig(root: Path, depth: int) -> tuple[int, list[bytes]]:
    """mkdir 255-byte names one inside the other (by directory fd, as `cd` would) until
    ENAMETOOLONG; returns the fd of the deepest directory and the names."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    names: list[bytes] = []
    for i in range(depth):
        try:
            os.mkdir(name(i), dir_fd=fd)
        except OSError as e:
            assert e.errno == errno.ENAMETOOLONG, e
            break
        names.append(name(i))
        new = os.open(name(i), os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = new
    return fd, names


def walk_down(root: Path, names: list[bytes]) -> int:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for n in names:
        new = os.open(n, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = new
    return fd


def write_at(fd: int, fname: bytes, data: bytes) -> None:
    f = os.open(fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=fd)
    try:
        os.write(f, data)
        os.fsync(f)  # EIO here if the store could not commit
    finally:
        os.close(f)


@pytest.mark.parametrize("store", ["global", LOCAL])
def test_paths_up_to_path_max_survive_a_remount(mount_world, store: str) -> None:
    m = mount_world()
    root = m.path / store
    fd, names = dig(root, 20)
    try:
        assert len(names) == (MAX_PATH + 1) // 256  # 16 names of 255: 4,095 bytes exactly
        with pytest.raises(OSError) as info:
            os.open(b"f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        assert info.value.errno == errno.ENAMETOOLONG
        with pytest.raises(OSError) as info:
            os.symlink(b"t", b"l", dir_fd=fd)
        assert info.value.errno == errno.ENAMETOOLONG
    finally:
        os.close(fd)
    # One level up there is room for a file name of 255 bytes: its key is far over LMDB's 511.
    up = walk_down(root, names[:-1])
    try:
        write_at(up, b"z" * 255, b"deep\n")
        # The first level's name is the longest the kernel takes.
        with pytest.raises(OSError) as info:
            os.mkdir(b"n" * 256, dir_fd=up)
        assert info.value.errno == errno.ENAMETOOLONG
    finally:
        os.close(up)
    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        write_at(top, b"after", b"still commits\n")
    finally:
        os.close(top)
    m.umount()
    m.remount()
    up = walk_down(root, names[:-1])
    try:
        assert sorted(os.listdir(up)) == sorted([names[-1].decode(), "z" * 255])
        f = os.open(b"z" * 255, os.O_RDONLY, dir_fd=up)
        assert os.read(f, 100) == b"deep\n"
        os.close(f)
    finally:
        os.close(up)
    assert (root / "after").read_text() == "still commits\n"
    # A rename that would carry the deep tree past the limit is refused; nothing moves.
    (root / "x").mkdir()
    with pytest.raises(OSError) as info:
        os.rename(root / name(0).decode(), root / "x" / ("y" * 255))
    assert info.value.errno == errno.ENAMETOOLONG
    assert (root / name(0).decode()).is_dir() and os.listdir(root / "x") == []
    assert "Traceback" not in m.log() and "cannot commit" not in m.log()


def test_xattr_caps_are_enospc_at_setxattr(mount_world) -> None:
    m = mount_world()
    f = m.path / "global" / "f"
    f.write_text("x")
    for i in range(MAX_XATTR_NAMES):
        os.setxattr(f, f"user.a{i}", b"")
    with pytest.raises(OSError) as info:
        os.setxattr(f, "user.one-more", b"")
    assert info.value.errno == errno.ENOSPC
    g = m.path / "global" / "g"
    g.write_text("x")
    os.setxattr(g, "user.big", b"v" * (MAX_XATTR_BYTES - 100))
    with pytest.raises(OSError) as info:
        os.setxattr(g, "user.b2", b"v" * 200)
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as info:  # the kernel's own cap on one value
        os.setxattr(g, "user.huge", b"v" * (64 << 10 | 1))
    assert info.value.errno == errno.E2BIG
    m.umount()
    m.remount()
    assert len(os.listxattr(f)) == MAX_XATTR_NAMES
    assert len(os.getxattr(g, "user.big")) == MAX_XATTR_BYTES - 100


def counter(mnt: Path, name: str) -> int:
    for line in (mnt / ".dreki" / "cluster").read_text().splitlines():
        k, _, v = line.partition(" ")
        if k == name:
            return int(v)
    return 0


def test_long_paths_and_full_xattrs_replicate_by_broadcast(cluster) -> None:  # noqa: F811
    mounts, _, _, _ = cluster
    a, b = mounts["a"].path, mounts["b"].path
    before = counter(b, "plumtree.delivered")
    fd, names = dig(a / "global", 20)
    os.close(fd)
    up = walk_down(a / "global", names[:-1])
    try:
        write_at(up, b"z" * 255, b"deep\n")
    finally:
        os.close(up)
    full = a / "global" / "full"
    full.write_text("x")
    for i in range(MAX_XATTR_NAMES):
        os.setxattr(full, f"user.{i:03d}", b"v" * (MAX_XATTR_BYTES // MAX_XATTR_NAMES - 8))

    def arrived() -> bool:
        with contextlib.suppress(OSError):
            fd = walk_down(b / "global", names[:-1])
            try:
                f = os.open(b"z" * 255, os.O_RDONLY, dir_fd=fd)
                ok = os.read(f, 100) == b"deep\n"
                os.close(f)
                return ok and len(os.listxattr(b / "global" / "full")) == MAX_XATTR_NAMES
            finally:
                os.close(fd)
        return False

    wait_for(arrived, timeout=10, what="the deep file and the full xattrs on b")
    # By the broadcast: one delivery per directory level and the file, at least.
    assert counter(b, "plumtree.delivered") - before >= len(names)
    for m in mounts.values():
        assert counter(m.path, "replication.refused") == 0
        assert counter(m.path, "plumtree.gossip_errors") == 0
        assert "Traceback" not in m.log()
