"""The data directory is the daemon's alone: one daemon per data directory, nothing in it
readable by others whatever the umask, a key ring kept like a private key, and a control socket
directory nobody else controls (issue 15, cases 5 and 6)."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from drekifs.app.control import control_socket_path
from drekifs.cluster.keyring import KeyRing, KeyRingError
from drekifs.datadir import DataDirError, private_dir, tighten

from .conftest import drekifs, force_unmount, free_port, is_mounted, wait_for
from .worlds import Zone

WORLD = "inf.random.sh"  # the bundled demo world


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """The daemons started inside run under this umask (as from a shell or fstab)."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """Permission bits of the directory and of everything under it (symlinks not followed)."""
    out = {".": stat.S_IMODE(os.lstat(root).st_mode)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = stat.S_IMODE(os.lstat(p).st_mode)
    return out


def unmount_if_mounted(path: Path) -> None:
    """For a mount that should have been refused: never left behind by a failing test."""
    if is_mounted(path):
        drekifs("umount", path, check=False)
        force_unmount(path)


def one_node_zone(zone_file) -> Path:
    zone = Zone().region("@", ["dc"]).region("dc", ["a"]).node("a", port=free_port())
    return zone_file(zone)


# -- one daemon per data directory ---------------------------------------------------------------


@pytest.mark.mounted
def test_a_second_daemon_on_the_same_data_dir_is_refused(mount_world, tmp_path: Path) -> None:
    m = mount_world()
    sock = Path((m.path / ".dreki" / "control").read_text().strip())
    assert sock.exists()
    second = tmp_path / "second"
    try:
        for mode in ((), ("--foreground",)):
            r = drekifs("mount", *mode, "--data-dir", m.data_dir, second, check=False)
            assert r.returncode == 1, r.stderr
            assert f"daemon {m.pid}" in r.stderr and str(m.data_dir) in r.stderr, r.stderr
            assert not is_mounted(second)
    finally:
        unmount_if_mounted(second)
    # The first is untouched: its socket is there and answers, its log has no word of the second.
    assert sock.exists()
    drekifs("put", "--mount", m.path, f"{WORLD}::global::still", "serving\n")
    assert (m.path / "global" / "still").read_text() == "serving\n"
    assert str(second) not in m.log() and m.log().count("mounted world") == 1
    # The lock goes with the daemon: the same data directory mounts again.
    m.umount()
    m.remount()
    assert (m.path / "global" / "still").read_text() == "serving\n"


# -- modes ---------------------------------------------------------------------------------------


@pytest.mark.mounted
def test_data_dir_and_its_files_are_private_whatever_the_umask(mount_world) -> None:
    with umask(0o022):
        m = mount_world()
    secret = m.path / "global" / "secret"
    secret.write_text("only root reads this\n")
    os.chmod(secret, 0o600)
    found = modes(m.data_dir)
    for name in (
        "stores/global/data.mdb",
        "stores/global/lock.mdb",
        "stores/local/data.mdb",
        "stores/local/lock.mdb",
        "drekifs.log",
        "daemon.lock",
    ):
        assert found.get(name) == 0o600, (name, found)
    assert found["."] == 0o700
    loose = {name: oct(mode) for name, mode in found.items() if mode & 0o077}
    assert not loose, loose

    # Modes made looser while it was down are tightened at the next start, and logged.
    m.umount()
    os.chmod(m.data_dir, 0o755)
    for name in found:
        p = m.data_dir / name
        if name != "." and p.exists() and not p.is_symlink():  # control.sock went at umount
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
    with umask(0o022):
        m.remount()
    again = modes(m.data_dir)
    loose = {name: oct(mode) for name, mode in again.items() if mode & 0o077}
    assert not loose, loose
    assert "tightened" in m.log() and str(m.data_dir) in m.log()


def test_tighten_touches_only_a_locked_data_dir(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    os.chmod(tmp_path / "f", 0o644)
    for wrong in (Path(""), Path("relative"), tmp_path):  # the last: no daemon.lock in it
        with pytest.raises(ValueError, match="not a locked data directory"):
            tighten(wrong)
    assert stat.S_IMODE(os.stat(tmp_path / "f").st_mode) == 0o644


# -- the key ring --------------------------------------------------------------------------------


def test_a_key_ring_readable_by_others_is_refused(tmp_path: Path) -> None:
    ring = tmp_path / "ring"
    drekifs("keygen", ring)
    assert stat.S_IMODE(os.stat(ring).st_mode) == 0o600
    for mode in (0o644, 0o640, 0o604):
        os.chmod(ring, mode)
        with pytest.raises(KeyRingError) as info:
            KeyRing.load(ring)
        message = str(info.value)
        assert str(ring) in message and oct(mode)[2:] in message, message
        assert f"chmod 600 {ring}" in message, message
        r = drekifs("keyring", ring, "list", check=False)
        assert r.returncode != 0 and f"chmod 600 {ring}" in r.stderr, r.stderr
    os.chmod(ring, 0o400)  # read-only for its owner is fine
    assert len(KeyRing.load(ring).keys) == 1


@pytest.mark.mounted
def test_mount_refuses_a_key_ring_readable_by_others(tmp_path: Path, zone_file) -> None:
    zone = one_node_zone(zone_file)
    ring = tmp_path / "ring"
    drekifs("keygen", ring)
    os.chmod(ring, 0o644)
    mnt = tmp_path / "m"
    r = drekifs(
        "mount", "--zone", zone, "--node", "a", "--keyring", ring,
        "--data-dir", tmp_path / "d", mnt, check=False,
    )  # fmt: skip
    try:
        assert r.returncode == 1 and f"chmod 600 {ring}" in r.stderr, r.stderr
        assert not is_mounted(mnt)
    finally:
        unmount_if_mounted(mnt)


@pytest.mark.mounted
def test_a_running_daemon_does_not_reload_a_key_ring_made_readable(
    mount_world, tmp_path: Path, zone_file
) -> None:
    zone = one_node_zone(zone_file)
    ring = tmp_path / "ring"
    drekifs("keygen", ring)
    m = mount_world("--zone", zone, "--node", "a", "--keyring", ring)
    os.chmod(ring, 0o644)
    wait_for(lambda: f"chmod 600 {ring}" in m.log(), timeout=10, what="the refusal logged")
    assert "key ring not reloaded" in m.log()
    assert os.listdir(m.path / "global") is not None  # still serving


def test_a_leftover_temp_file_never_leaves_the_ring_readable(tmp_path: Path) -> None:
    ring = tmp_path / "ring"
    drekifs("keygen", ring)
    tmp = tmp_path / "ring.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o666)
    os.fchmod(fd, 0o666)  # whatever the umask: made by someone who wanted to read the next ring
    os.close(fd)
    drekifs("keyring", ring, "add")
    assert stat.S_IMODE(os.stat(ring).st_mode) == 0o600
    assert len(KeyRing.load(ring).keys) == 2
    assert not tmp.exists()


def test_a_temp_file_symlink_is_not_followed(tmp_path: Path) -> None:
    ring = tmp_path / "ring"
    drekifs("keygen", ring)
    before = ring.read_bytes()
    precious = tmp_path / "precious"
    precious.write_text("not a key ring\n")
    os.chmod(precious, 0o644)
    tmp = tmp_path / "ring.tmp"
    for target in (precious, tmp_path / "would-be-created"):
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        r = drekifs("keyring", ring, "add", check=False)
        assert r.returncode != 0 and "symbolic link" in r.stderr and str(tmp) in r.stderr, r
        assert ring.read_bytes() == before
        assert stat.S_IMODE(os.stat(ring).st_mode) == 0o600
    assert precious.read_text() == "not a key ring\n"
    assert stat.S_IMODE(os.stat(precious).st_mode) == 0o644
    assert not (tmp_path / "would-be-created").exists()


# -- the control socket's directory --------------------------------------------------------------


def test_private_dir_is_made_0700_and_checked(tmp_path: Path) -> None:
    with umask(0o022):
        made = private_dir(tmp_path / "new")
    assert stat.S_IMODE(os.lstat(made).st_mode) == 0o700
    assert private_dir(made) == made  # ours, 0700: used again

    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    os.chmod(open_to_all, 0o1777)
    with pytest.raises(DataDirError, match=r"writable by others.*1777|1777.*writable by others"):
        private_dir(open_to_all)

    link = tmp_path / "link"
    link.symlink_to(made)
    with pytest.raises(DataDirError, match="symbolic link"):
        private_dir(link)

    plain = tmp_path / "plain"
    plain.write_text("")
    with pytest.raises(DataDirError, match="not a directory"):
        private_dir(plain)

    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(DataDirError, match="owned by uid 65534"):
        private_dir(theirs)


def test_control_socket_falls_back_to_a_checked_dir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path / "t"))
    (tmp_path / "t").mkdir()
    short = tmp_path / "d"
    assert control_socket_path(short) == short / "control.sock"
    long = tmp_path / ("d" * 100)
    path = control_socket_path(long)
    assert path.parent == tmp_path / "t" / f"drekifs-{os.getuid()}"
    assert stat.S_IMODE(os.lstat(path.parent).st_mode) == 0o700
    os.chmod(path.parent, 0o777)
    with pytest.raises(DataDirError, match=str(path.parent)):
        control_socket_path(long)


@pytest.mark.mounted
def test_mount_refuses_a_control_socket_dir_others_control(
    mount_world, tmp_path: Path, monkeypatch
) -> None:
    tmpdir = tmp_path / "t"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    fallback = tmpdir / f"drekifs-{os.getuid()}"
    fallback.mkdir()
    os.chmod(fallback, 0o777)
    data = "d" * 100  # too long a path for a socket: the fallback directory is used
    mnt = tmp_path / "m"
    r = drekifs("mount", "--data-dir", tmp_path / data, mnt, check=False)
    try:
        assert r.returncode == 1 and str(fallback) in r.stderr and "777" in r.stderr, r.stderr
        assert not is_mounted(mnt)
    finally:
        unmount_if_mounted(mnt)
    os.chmod(fallback, 0o700)
    m = mount_world(name="m", data=data)
    sock = Path((m.path / ".dreki" / "control").read_text().strip())
    assert sock.parent == fallback and sock.exists()
    assert drekifs("ls", "--mount", m.path, f"{WORLD}::global").returncode == 0
