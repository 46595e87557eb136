"""Open files through the kernel: unlinked or replaced while open."""

from __future__ import annotations

import os
import stat

import pytest

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
