"""get/put/rm/ls by URN through the daemon, and the kernel's caches following such changes."""

from __future__ import annotations

import errno
import os

import pytest

from ..conftest import drekifs, wait_for
from ..worlds import small_world

pytestmark = pytest.mark.mounted


def test_changes_not_made_through_the_mount_invalidate_the_kernel_cache(mount_world) -> None:
    m = mount_world()
    f = m.path / "global" / "motd"
    f.write_text("one\n")
    with open(f) as fh:  # cached: keep_cache, and attributes for an hour
        assert fh.read() == "one\n"
    assert os.stat(f).st_size == 4
    drekifs("put", "--mount", m.path, "inf.random.sh::global::motd", "two, longer\n")
    assert f.read_text() == "two, longer\n"
    assert os.stat(f).st_size == 12
    assert drekifs("get", "--mount", m.path, "inf.random.sh::global::motd").stdout == (
        "two, longer\n"
    )
    # A name looked up while absent: the kernel keeps that answer, until the name appears.
    fresh = m.path / "global" / "fresh"
    assert not fresh.exists() and not fresh.exists()
    drekifs("put", "--mount", m.path, "inf.random.sh::global::fresh", "here now\n")
    assert fresh.read_text() == "here now\n"
    # A new key, parents and all; the listing shows it.
    drekifs("put", "--mount", m.path, "inf.random.sh:eu::global::a/b/c", input="deep")
    assert (m.path / "eu" / "global" / "a" / "b" / "c").read_text() == "deep"
    assert "a" in os.listdir(m.path / "eu" / "global")
    assert drekifs("ls", "--mount", m.path, "inf.random.sh:eu::global::a").stdout == "b/\n"
    # Removed elsewhere: gone here too, though it was cached.
    drekifs("rm", "--mount", m.path, "inf.random.sh::global::motd")
    with pytest.raises(FileNotFoundError):
        os.stat(f)
    assert "motd" not in os.listdir(m.path / "global")


def test_errors_name_the_urn(mount_world) -> None:
    m = mount_world()
    r = drekifs("get", "other.world::global::x", check=False)
    assert r.returncode == 1 and "no drekifs mount of world other.world" in r.stderr
    for args, expected in [
        (("get", "inf.random.sh::global::nope"), "does not exist"),
        (("get", "inf.random.sh:eu:fr:scw:dc2:node3::local::x"), "not served here"),
        (("get", "inf.random.sh:eu:nowhere::global::x"), "no such region or node"),
        (("put", "inf.random.sh::global"), "is a store, not a key"),
        (("ls", "Inf"), "world 'Inf' must be lower case"),
        (("get", "inf.random.sh:eu::local::x"), "a region has no store local"),
    ]:
        r = drekifs(args[0], "--mount", m.path, *args[1:], check=False)
        assert r.returncode == 1 and expected in r.stderr, (args, r.stderr)


def test_a_node_listed_twice_shows_the_same_stores(mount_world, zone_file) -> None:
    m = mount_world("--zone", zone_file(small_world()), "--node", "shared")
    a, b = m.path / "eu" / "shared", m.path / "eu" / "fr" / "shared"
    (a / "local" / "x").write_text("from one path")
    assert (b / "local" / "x").read_text() == "from one path"
    assert os.stat(b / "local" / "x").st_size == 13  # cached on the second path now
    with open(a / "local" / "x", "a") as f:
        f.write(", and more")
    # The other path's kernel cache follows within moments (invalidation is asynchronous).
    wait_for(lambda: os.stat(b / "local" / "x").st_size == 23, timeout=2, what="new size")
    assert (b / "local" / "x").read_text() == "from one path, and more"
    # Absent on one path, then made on the other: the first path's kernel forgets the absence.
    assert not (b / "local" / "new").exists()
    (a / "local" / "new").write_text("made on a")
    wait_for(lambda: (b / "local" / "new").exists(), timeout=2, what="the new name on b")
    # Distinct inodes per path: the kernel never sees one directory under two parents.
    os.mkdir(a / "global" / "d")
    assert os.stat(a / "global" / "d").st_ino != os.stat(b / "global" / "d").st_ino
    assert os.getxattr(b / "local" / "x", "user.dreki.urn") == b"w.test:eu:fr:shared::local::x"
    with pytest.raises(OSError) as info:
        os.rename(a / "local" / "x", b / "local" / "y")
    assert info.value.errno == errno.EXDEV
