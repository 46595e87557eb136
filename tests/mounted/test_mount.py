"""The world mounted through the kernel: tree, attributes, URNs, read-only rules, lifecycle."""

from __future__ import annotations

import errno
import os
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

from drekifs.app.mounts import drekifs_mounts, is_stale

from ..conftest import DREKIFS, drekifs, force_unmount, is_mounted, wait_for
from ..worlds import BROKEN_VALID_PATHS, broken_world, small_world

pytestmark = pytest.mark.mounted


def tree(root: Path) -> set[str]:
    """Paths of the world directories (store and status directories left out)."""
    out = set()
    for dirpath, dirnames, _ in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        dirnames[:] = [d for d in dirnames if d not in ("global", "local", ".dreki")]
        if rel != ".":
            out.add(rel)
    return out


# A valid access ACL equal to mode 755, as `cp -a` / setfacl send it.
ACL = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", tag, perm, 0xFFFFFFFF) for tag, perm in ((1, 7), (4, 5), (0x20, 5))
)


def xattr_urn(path: Path) -> str:
    return os.getxattr(path, "user.dreki.urn").decode()


def test_demo_world_mounted(mount_world) -> None:
    m = mount_world()  # no options: the bundled demo world, first node
    assert sorted(os.listdir(m.path)) == [".dreki", "eu", "global"]
    node3 = m.path / "eu/fr/scw/dc2/node3"
    assert sorted(os.listdir(node3)) == ["global", "local"]
    assert os.listdir(node3 / "local") == []
    assert xattr_urn(node3) == "inf.random.sh:eu:fr:scw:dc2:node3"
    assert xattr_urn(node3 / "local") == "inf.random.sh:eu:fr:scw:dc2:node3::local"
    assert xattr_urn(m.path) == "inf.random.sh"
    assert xattr_urn(m.path / ".dreki" / "pid") == "inf.random.sh::.dreki::pid"
    assert os.getxattr(node3 / "global", "user.dreki.store") == b"global"
    assert os.listxattr(node3 / "local") == []  # computed attributes are read by name only
    assert m.pid != os.getpid() and Path(f"/proc/{m.pid}").exists()
    world_text = (m.path / ".dreki" / "world").read_text()
    assert "node3" in world_text and "localhost:7103" in world_text
    assert (m.path / ".dreki" / "world-errors").read_text() == ""
    assert "mounted world inf.random.sh" in m.log()
    assert "node1.sbg1.ovh.fr.eu.inf.random.sh" in m.log()


def test_nlink_modes_and_sizes(mount_world, zone_file) -> None:
    m = mount_world("--zone", zone_file(small_world()))
    st = os.stat(m.path)
    # root: eu + global + .dreki, plus . and ..
    assert st.st_nlink == 5 and st.st_mode & 0o777 == 0o555 and st.st_ino == 1
    assert os.stat(m.path / "eu").st_nlink == 2 + 4  # fr, de, shared, global
    assert os.stat(m.path / "eu/fr/web1").st_nlink == 4  # global, local
    assert os.stat(m.path / "eu/fr/web1/local").st_nlink == 2
    for name in ("pid", "world", "world-errors", "world.json", "requests"):
        p = m.path / ".dreki" / name
        assert os.stat(p).st_size == len(p.read_bytes()), name
    assert os.statvfs(m.path).f_namemax == 255


def test_broken_world_serves_exactly_the_valid_part(mount_world, zone_file) -> None:
    m = mount_world("--zone", zone_file(broken_world()))
    assert tree(m.path) == BROKEN_VALID_PATHS
    errors = (m.path / ".dreki" / "world-errors").read_text()
    for kind in ("cycle", "dangling", "reserved-name", "dot-name", "sibling-clash"):
        assert f"{kind}: " in errors
    clash = m.path / "us" / "web1.a.us.b.test"
    assert xattr_urn(clash) == "b.test:us:web1.a.us.b.test"
    assert drekifs("urn", clash).stdout == "b.test:us:web1.a.us.b.test\n"
    assert xattr_urn(m.path / "eu/fr/shared") == "b.test:eu:fr:shared"
    assert "world error: cycle" in m.log()


def test_node_listed_twice_appears_under_both_paths(mount_world, zone_file) -> None:
    m = mount_world("--zone", zone_file(small_world()))
    a, b = m.path / "eu/shared", m.path / "eu/fr/shared"
    assert sorted(os.listdir(a)) == sorted(os.listdir(b)) == ["global", "local"]
    assert xattr_urn(a) == "w.test:eu:shared"
    assert xattr_urn(b) == "w.test:eu:fr:shared"
    assert os.stat(a).st_ino != os.stat(b).st_ino


def test_urn_and_path_commands(mount_world) -> None:
    m = mount_world()
    cpu = m.path / "eu/fr/scw/dc2/node3/local/facts/cpu"  # does not exist (yet): still a URN
    urn = "inf.random.sh:eu:fr:scw:dc2:node3::local::facts/cpu"
    assert drekifs("urn", cpu).stdout == urn + "\n"
    # Finds the mount of that world (another test's mount of the same world may come first).
    mounts = [p for p, w in drekifs_mounts().items() if w == "inf.random.sh"]
    printed = drekifs("path", urn).stdout
    assert printed in {f"{p}/eu/fr/scw/dc2/node3/local/facts/cpu\n" for p in mounts}
    assert str(m.path) in mounts
    assert drekifs("path", urn, "--mount", "/dreki").stdout == (
        "/dreki/eu/fr/scw/dc2/node3/local/facts/cpu\n"
    )
    odd = m.path / "global" / "a%b\tc"
    assert drekifs("urn", odd).stdout == "inf.random.sh::global::a%25b%09c\n"
    r = drekifs("urn", m.path / "eu/nowhere/x", check=False)
    assert r.returncode == 1 and "no region, node or store" in r.stderr
    r = drekifs("urn", "/tmp", check=False)
    assert r.returncode == 1 and "not inside a drekifs mount" in r.stderr
    r = drekifs("path", "inf.random.sh:EU", check=False)
    assert r.returncode == 1 and "segment 1 'EU'" in r.stderr


def test_inodes_and_mtimes_stable_across_remounts(mount_world, zone_file) -> None:
    m = mount_world("--zone", zone_file(small_world()))

    def listing() -> dict[str, tuple[int, int]]:
        out = {}
        for dirpath, dirnames, filenames in os.walk(m.path):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                if "/.dreki" in p:
                    continue
                st = os.lstat(p)
                out[os.path.relpath(p, m.path)] = (st.st_ino, st.st_mtime_ns)
        return out

    before = listing()
    assert len({ino for ino, _ in before.values()}) == len(before)  # no two alike
    m.umount()
    time.sleep(0.05)
    m.remount()
    assert listing() == before


def test_world_directories_are_read_only(mount_world) -> None:
    m = mount_world()
    eu = m.path / "eu"
    cases = [
        (lambda: os.mkdir(eu / "new"), errno.EPERM),
        (lambda: os.rmdir(eu / "fr"), errno.EPERM),
        (lambda: os.rename(eu / "fr", eu / "fr2"), errno.EPERM),
        (lambda: os.open(eu / "f", os.O_CREAT | os.O_WRONLY), errno.EPERM),
        (lambda: os.symlink("x", eu / "l"), errno.EPERM),
        (lambda: os.chmod(eu, 0o777), errno.EPERM),
        (lambda: os.utime(eu), errno.EPERM),
        (lambda: os.setxattr(eu, "user.x", b"1"), errno.EPERM),
        (lambda: os.setxattr(eu, "user.dreki.urn", b"1"), errno.EPERM),
        (lambda: os.setxattr(eu, "system.posix_acl_access", ACL), errno.EOPNOTSUPP),
        (lambda: os.open(m.path / ".dreki" / "pid", os.O_WRONLY), errno.EPERM),
        (lambda: os.unlink(m.path / ".dreki" / "pid"), errno.EPERM),
        # another node's local store is not served here (remote stores come with peers)
        (lambda: os.mkdir(m.path / "eu/fr/scw/dc2/node3/local/d"), errno.EROFS),
        (lambda: os.link(m.path / ".dreki" / "pid", m.path / "global" / "h"), errno.EPERM),
        (lambda: os.stat(eu / ("x" * 256)), errno.ENAMETOOLONG),
        (lambda: os.stat(eu / "nope"), errno.ENOENT),
        (lambda: os.getxattr(eu, "user.nothing"), errno.ENODATA),
        (lambda: os.readlink(eu), errno.EINVAL),
    ]
    for i, (action, expected) in enumerate(cases):
        with pytest.raises(OSError) as info:
            action()
        assert info.value.errno == expected, (i, info.value)
    assert os.listdir(eu)  # still serving
    with pytest.raises(FileNotFoundError):
        os.stat(os.fsencode(m.path / "global") + b"/\xff\xfe-not-utf8")
    log = m.log()
    assert "mkdir inf.random.sh:eu:new: Operation not permitted" in log


def test_umount_waits_for_the_daemon(mount_world) -> None:
    m = mount_world()
    pid = m.pid
    m.umount()
    assert not is_mounted(m.path)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    r = drekifs("umount", m.path, check=False)
    assert r.returncode == 1 and "not a drekifs mount" in r.stderr


def test_mount_twice_is_refused(mount_world) -> None:
    m = mount_world()
    r = drekifs("mount", "--data-dir", m.data_dir, m.path, check=False)
    assert r.returncode == 1 and "already a drekifs mount" in r.stderr


def test_mount_errors_are_reported(tmp_path: Path, zone_file) -> None:
    r = drekifs(
        "mount",
        "--zone",
        tmp_path / "none.zone",
        "--data-dir",
        tmp_path / "d",
        tmp_path / "m",
        check=False,
    )
    assert r.returncode == 1 and "does not exist" in r.stderr
    r = drekifs(
        "mount",
        "--zone",
        zone_file(small_world()),
        "--node",
        "nosuch",
        "--data-dir",
        tmp_path / "d",
        tmp_path / "m",
        check=False,
    )
    assert r.returncode == 1 and "node 'nosuch' is not in world w.test" in r.stderr
    assert not is_mounted(tmp_path / "m")


def test_killed_daemon_leaves_a_stale_mount_that_mount_and_umount_clean(mount_world) -> None:
    m = mount_world()
    os.kill(m.pid, signal.SIGKILL)
    with pytest.raises(OSError) as info:
        wait_for(lambda: os.listdir(m.path) and False, timeout=5, what="ENOTCONN")
    assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    m.remount()  # cleans the stale mount, mounts again
    assert os.listdir(m.path)
    os.kill(m.pid, signal.SIGKILL)
    wait_for(lambda: is_stale(m.path), timeout=5, what="daemon gone")
    assert "stale mount removed" in drekifs("umount", "-v", m.path).stdout
    assert not is_mounted(m.path)


def test_foreground_ctrl_c_unmounts(tmp_path: Path) -> None:
    mnt = tmp_path / "fg"
    log = tmp_path / "stderr"
    with open(log, "w") as err:  # a file, not a pipe nobody reads while the daemon logs
        proc = subprocess.Popen(
            [DREKIFS, "mount", "--foreground", "--data-dir", str(tmp_path / "d"), str(mnt)],
            stderr=err,
        )
    try:
        wait_for(lambda: "serving" in log.read_text(), timeout=20, what="mount")
        assert int((mnt / ".dreki" / "pid").read_text()) == proc.pid
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, log.read_text()
        assert not is_mounted(mnt)
        assert "unmounted" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        force_unmount(mnt)


def test_sigterm_unmounts(mount_world) -> None:
    m = mount_world()
    os.kill(m.pid, signal.SIGTERM)
    wait_for(lambda: not is_mounted(m.path), timeout=10, what="unmount")


def test_fuse_requests_counted(mount_world) -> None:
    m = mount_world()
    before = (m.path / ".dreki" / "requests").read_text()
    os.listdir(m.path / "eu")
    after = dict(line.split() for line in (m.path / ".dreki" / "requests").read_text().splitlines())
    assert int(after["readdir"]) >= 1 and "readdir" in after
    assert before != ""


def test_log_level_changes_at_run_time(mount_world) -> None:
    m = mount_world()
    os.kill(m.pid, signal.SIGUSR1)
    wait_for(lambda: "log level now DEBUG" in m.log(), what="DEBUG")
    assert not (m.path / "global" / "absent-while-debug").exists()
    wait_for(lambda: "absent-while-debug: No such file" in m.log(), what="a DEBUG line")
    os.kill(m.pid, signal.SIGUSR2)
    wait_for(lambda: "log level now INFO" in m.log(), what="back to INFO")
    assert not (m.path / "global" / "absent-while-info").exists()
    with pytest.raises(PermissionError):
        (m.path / "eu" / "made-while-info").mkdir()  # EPERM: logged at INFO, after the lookup
    wait_for(lambda: "made-while-info" in m.log(), what="an INFO line")
    assert "absent-while-info" not in m.log()
    assert (m.path / ".dreki" / "pid").read_text().strip() == str(m.pid)  # still serving
