"""Open files through the kernel: unlinked or replaced while open, and names changed behind
the kernel's cached view of them."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from ..conftest import Shell
from ..worlds import small_world

pytestmark = pytest.mark.mounted

NODE = "eu/fr/ovh/sbg1/node1"  # the demo world's first node: this peer


@pytest.fixture
def m(mount_world):
    return mount_world("--store", "extra")


@pytest.mark.parametrize("store", ["global", f"{NODE}/local", f"{NODE}/extra"])
@pytest.mark.parametrize("how", ["unlink", "rename over"])
def test_an_open_file_whose_name_went_keeps_working_until_its_last_close(
    m, store: str, how: str
) -> None:
    d = m.path / store
    f = d / "f"
    f.write_bytes(b"hello world")
    os.chmod(f, 0o640)
    fd = os.open(f, os.O_RDWR)
    fd2 = os.open(f, os.O_RDONLY)
    try:
        if how == "unlink":
            os.unlink(f)
        else:
            (d / "tmp").write_bytes(b"new")
            os.rename(d / "tmp", f)
        st = os.fstat(fd)
        assert (st.st_nlink, st.st_size, st.st_mode) == (0, 11, stat.S_IFREG | 0o640)
        assert os.pread(fd, 100, 0) == b"hello world"
        # Its handles share what is written to it, and what is set on it...
        assert os.pwrite(fd, b"HELLO", 0) == 5
        assert os.pread(fd2, 100, 0) == b"HELLO world"
        os.ftruncate(fd, 8)
        os.fchmod(fd, 0o600)
        os.fsync(fd)
        st = os.fstat(fd2)
        assert (st.st_nlink, st.st_size, st.st_mode) == (0, 8, stat.S_IFREG | 0o600)
        assert os.pread(fd2, 100, 0) == b"HELLO wo"
        # ...and none of it reaches the name, which is another file's or nobody's.
        if how == "unlink":
            assert "f" not in os.listdir(d)
            f.write_bytes(b"new")
        st = os.stat(f)
        assert (st.st_nlink, st.st_size, stat.S_IMODE(st.st_mode)) == (1, 3, 0o644)
        assert f.read_bytes() == b"new"
    finally:
        os.close(fd)
        os.close(fd2)
    # Dropped at the last close: the name keeps the other file, through a remount too.
    assert f.read_bytes() == b"new"
    m.umount()
    m.remount()
    assert f.read_bytes() == b"new" and sorted(os.listdir(d)) == ["f"]


@pytest.fixture
def twice(mount_world, zone_file):
    """One store seen through two paths of the same node: a change through one path reaches
    the other path's kernel cache a moment later (invalidation is asynchronous), as a change
    another peer makes does."""
    m = mount_world("--zone", zone_file(small_world()), "--node", "shared")
    return m, m.path / "eu/shared/global", m.path / "eu/fr/shared/global"


def test_a_create_of_a_name_made_meanwhile_opens_it(twice) -> None:
    _, a, b = twice
    sh = Shell()
    failures: list[str] = []
    try:
        for i in range(100):
            # b's kernel holds a negative entry; the name is made through a; b writes at once.
            made = f"made{i}"
            assert not (b / made).exists()
            (a / made).write_text("from a\n")
            sh.echo_x(b / made, failures)
            # b's kernel holds a positive entry; the name is removed through a; b writes.
            gone = f"gone{i}"
            (a / gone).write_text("from a\n")
            assert (b / gone).stat().st_size == 7
            os.unlink(a / gone)
            sh.echo_x(b / gone, failures)
    finally:
        sh.close()
    assert not failures, f"{len(failures)} of 200 failed: {failures[:3]}"


def test_an_exclusive_create_of_a_name_made_meanwhile_is_eexist(twice) -> None:
    _, a, b = twice
    for i in range(50):
        assert not (b / f"n{i}").exists()
        (a / f"n{i}").write_text("from a\n")
        with pytest.raises(FileExistsError):
            os.open(b / f"n{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        assert (b / f"n{i}").read_text() == "from a\n"


def test_a_create_of_a_name_made_meanwhile_checks_permissions(twice) -> None:
    """The kernel checks no permission on a file it believes it created: a name made
    meanwhile must not open for a user who may create in the directory but not write it."""
    m, a, b = twice
    (a / "pub").mkdir()
    os.chmod(a / "pub", 0o1777)
    root = os.open(m.path, os.O_PATH | os.O_DIRECTORY)
    nobody = Shell(user=65534, group=65534, extra_groups=[], pass_fds=(root,))
    try:
        ok, out = nobody.run(f"echo mine > /proc/self/fd/{root}/eu/fr/shared/global/pub/own")
        assert ok, out
        for i in range(30):
            name = f"root{i}"
            assert not (b / "pub" / name).exists()
            (a / "pub" / name).write_text("root's\n")
            ok, out = nobody.run(f"echo x > /proc/self/fd/{root}/eu/fr/shared/global/pub/{name}")
            assert not ok and ("Permission denied" in out or "File exists" in out), out
            assert (a / "pub" / name).read_text() == "root's\n"
    finally:
        nobody.close()
        os.close(root)


def test_a_name_gone_elsewhere_is_looked_up_again(twice) -> None:
    """stat, chmod and open of a name whose entry went meanwhile: the kernel's cached entry
    is answered ESTALE, and the kernel looks the name up again (ENOENT, or the new file)."""
    _, a, b = twice
    for i in range(30):
        p = f"p{i}"
        (a / p).write_text("first\n")
        ino = (b / p).stat().st_ino
        os.unlink(a / p)
        (a / p).write_text("second\n")
        with open(b / p) as f:
            assert f.read() == "second\n"
        assert (b / p).stat().st_ino != ino
        os.unlink(a / p)
        with pytest.raises(OSError) as info:
            os.chmod(b / p, 0o600)
        assert info.value.errno == errno.ENOENT


def test_an_open_file_whose_name_went_keeps_the_xattr_caps(m) -> None:
    """Its xattrs live in this daemon's memory until the last close: capped as a store's."""
    from drekifs.stores.keys import MAX_XATTR_NAMES

    f = m.path / "global" / "f"
    f.write_bytes(b"x")
    fd = os.open(f, os.O_RDWR)
    try:
        os.unlink(f)
        for i in range(MAX_XATTR_NAMES):
            os.setxattr(fd, f"user.{i}", b"v")
        with pytest.raises(OSError) as info:
            os.setxattr(fd, "user.one-more", b"v")
        assert info.value.errno == errno.ENOSPC
        assert len(os.listxattr(fd)) == MAX_XATTR_NAMES
    finally:
        os.close(fd)
