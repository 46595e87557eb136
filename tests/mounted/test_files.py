"""Files in the stores, through the kernel, with the tools people use on them."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.mounted

LOCAL = "eu/fr/ovh/sbg1/node1/local"  # the demo world's first node: this peer


@pytest.fixture
def m(mount_world):
    return mount_world("--max-local-value", "256k")


def run(*cmd: str | os.PathLike, cwd: Path | None = None, env: dict | None = None) -> str:
    r = subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert r.returncode == 0, f"{cmd} exited {r.returncode}: {r.stdout}\n{r.stderr}"
    return r.stdout


def changes(m) -> dict[str, int]:
    out = {}
    for line in (m.path / ".dreki" / "stores").read_text().splitlines():
        name, *fields = line.split()
        out[name] = int(dict(f.split("=", 1) for f in fields)["changes"])
    return out


def make_tree(root: Path) -> None:
    (root / "d" / "e").mkdir(parents=True)
    (root / "a").write_text("alpha\n")
    (root / "d" / "b").write_bytes(os.urandom(3000))
    (root / "d" / "e" / "big").write_bytes(os.urandom(200_000))
    (root / "empty").write_bytes(b"")
    (root / "l").symlink_to("a")
    (root / "d" / "dangling").symlink_to("nowhere")
    os.chmod(root / "d" / "b", 0o600)
    os.utime(root / "a", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    os.setxattr(root / "a", "user.color", b"blue")


def test_shell_redirections_and_editors(m) -> None:
    g = m.path / "global"
    f = g / "motd"
    run("sh", "-c", f"echo hello > {f}")
    assert f.read_text() == "hello\n" and os.stat(f).st_size == 6
    before = changes(m)["global"]
    run("sh", "-c", f"echo again > {f}")  # O_TRUNC, FLUSH-less: one new version, never empty
    assert changes(m)["global"] == before + 1
    run("sh", "-c", f"echo more >> {f}")
    assert f.read_text() == "again\nmore\n"
    run("sed", "-i", "s/more/less/", f)  # temp file + rename over
    assert f.read_text() == "again\nless\n"
    os.truncate(f, 3)
    assert f.read_bytes() == b"aga"
    with open(f, "r+b") as fh:
        fh.seek(10)
        fh.write(b"Z")
    assert f.read_bytes() == b"aga" + b"\0" * 7 + b"Z"
    version = os.getxattr(f, "user.dreki.version").decode()
    hlc, peer = version.split()
    assert int(hlc) > 0 and peer == "node1.sbg1.ovh.fr.eu.inf.random.sh"
    assert os.getxattr(f, "user.dreki.urn") == b"inf.random.sh::global::motd"
    assert os.getxattr(f, "user.dreki.store") == b"global"
    # An open file that is unlinked still reads; a new file of that name is another one.
    with open(f, "rb") as fh:
        os.unlink(f)
        f.write_text("new")
        assert fh.read() == b"aga" + b"\0" * 7 + b"Z"
    assert f.read_text() == "new"


def test_cp_a_rsync_tar_round_trips(m, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    g = m.path / "global"
    run("cp", "-a", src, g / "cpa")
    run("diff", "-r", "--no-dereference", src, g / "cpa")
    assert os.stat(g / "cpa" / "a").st_mtime_ns == os.stat(src / "a").st_mtime_ns
    assert os.stat(g / "cpa" / "d" / "b").st_mode & 0o777 == 0o600
    assert os.readlink(g / "cpa" / "l") == "a"
    # rsync in, then a checksum dry run finds nothing to do.
    run("rsync", "-aX", f"{src}/", f"{g}/rs/")
    assert run("rsync", "-anc", "--delete", "-i", f"{src}/", f"{g}/rs/") == ""
    assert os.getxattr(g / "rs" / "a", "user.color") == b"blue"
    # rsync out, identical.
    out = tmp_path / "out"
    run("rsync", "-a", f"{g}/rs/", f"{out}/")
    run("diff", "-r", "--no-dereference", src, out)
    assert run("rsync", "-anc", "--delete", "-i", f"{g}/rs/", f"{out}/") == ""
    # tar c, then tar d finds no difference.
    tar = tmp_path / "t.tar"
    run("tar", "cf", tar, "rs", cwd=g)
    run("tar", "df", tar, cwd=g)
    extracted = tmp_path / "x"
    extracted.mkdir()
    run("tar", "xf", tar, cwd=extracted)
    run("diff", "-r", "--no-dereference", src, extracted / "rs")


@pytest.mark.skipif(shutil.which("restic") is None, reason="restic not installed")
def test_restic_second_backup_finds_no_change(m, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    target = m.path / LOCAL / "data"
    run("cp", "-a", src, target)
    env = {"RESTIC_PASSWORD": "test", "RESTIC_REPOSITORY": str(tmp_path / "repo")}
    run("restic", "init", env=env)
    run("restic", "backup", target, env=env)
    m.umount()
    m.remount()  # the same inodes, sizes and times after a remount
    second = run("restic", "backup", target, env=env)
    assert "0 new,     0 changed" in second, second


def test_everything_survives_a_remount(m, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    run("cp", "-a", src, m.path / "global" / "t")
    run("cp", "-a", src, m.path / LOCAL / "t")

    def listing() -> list[str]:
        return run(
            "find",
            m.path / "global" / "t",
            m.path / LOCAL / "t",
            "-printf",
            "%i %s %T@ %C@ %m %y %p %l\n",
        ).splitlines()

    def digest() -> str:
        h = hashlib.sha256()
        for p in sorted((m.path / "global" / "t").rglob("*")):
            if p.is_file() and not p.is_symlink():
                h.update(p.read_bytes())
        return h.hexdigest()

    before, content = listing(), digest()
    m.umount()
    m.remount()
    assert listing() == before
    assert digest() == content


def test_bad_input_gets_errnos_never_a_dead_mount(m) -> None:
    g = m.path / "global"
    local = m.path / LOCAL
    raw = os.fsencode(g)
    # Names: any bytes but "/" and NUL, up to 255 of them.
    odd = raw + b"/\xff\xfe-not-utf8"
    with open(odd, "wb") as f:
        f.write(b"ok")
    assert b"\xff\xfe-not-utf8" in os.listdir(raw)
    assert os.getxattr(odd, "user.dreki.urn") == b"inf.random.sh::global::%FF%FE-not-utf8"
    (g / ("n" * 255)).write_text("longest")
    cases = [
        (lambda: (g / ("n" * 256)).write_text("x"), errno.ENAMETOOLONG),
        (lambda: os.mkdir(g / ("d" * 256)), errno.ENAMETOOLONG),
        (lambda: (g / "big").write_bytes(b"x" * ((1 << 20) + 1)), errno.EFBIG),
        (lambda: (local / "big").write_bytes(b"x" * (256 * 1024 + 1)), errno.EFBIG),
        (lambda: os.truncate(g / ("n" * 255), 1 << 40), errno.EFBIG),
        (lambda: os.link(odd, g / "hard"), errno.EPERM),
        (lambda: os.mkfifo(g / "fifo"), errno.EPERM),
        (lambda: os.rename(odd, local / "moved"), errno.EXDEV),
        (lambda: os.rename(g / ("n" * 255), m.path / "eu" / "x"), errno.EPERM),
        (lambda: os.rmdir(g / ("n" * 255)), errno.ENOTDIR),
        (lambda: os.setxattr(odd, "user.dreki.version", b"1"), errno.EPERM),
        (lambda: os.setxattr(odd, "security.x", b"1"), errno.EOPNOTSUPP),
    ]
    for i, (action, expected) in enumerate(cases):
        with pytest.raises(OSError) as info:
            action()
        assert info.value.errno == expected, (i, info.value)
    fd = os.open(g / "sparse", os.O_CREAT | os.O_WRONLY)
    try:
        with pytest.raises(OSError) as info:
            os.pwrite(fd, b"x", 1 << 40)
        assert info.value.errno == errno.EFBIG
    finally:
        os.close(fd)
    assert os.stat(g / "sparse").st_size == 0
    (local / "fits").write_bytes(b"y" * (256 * 1024))  # exactly the limit
    assert os.stat(local / "fits").st_size == 256 * 1024
    assert "EFBIG" in m.log() or "File too large" in m.log()
    assert sorted(os.listdir(m.path)) == [".dreki", "eu", "global"]  # alive


WRITER = r"""
import os, sys
root = sys.argv[1]
for i in range(100_000):
    path = os.path.join(root, f"k{i % 50}", f"f{i}")
    try:
        if i < 50:
            os.mkdir(os.path.dirname(path))
            dfd = os.open(root, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        os.write(fd, f"value {i}\n".encode() * (i % 7 + 1))
        os.fsync(fd)
        os.close(fd)
    except OSError as e:
        print("stopped", e, flush=True)
        break
    print(i, flush=True)
"""


@pytest.mark.parametrize("store", ["global", LOCAL])
def test_kill_9_loses_no_fsynced_write(mount_world, store: str) -> None:
    import signal
    import time

    m = mount_world()
    root = m.path / store
    writer = subprocess.Popen(
        ["python3", "-c", WRITER, str(root)], stdout=subprocess.PIPE, text=True
    )
    time.sleep(1.5)
    os.kill(m.pid, signal.SIGKILL)
    out, _ = writer.communicate(timeout=30)
    acked = [int(line) for line in out.splitlines() if line.isdigit()]
    assert len(acked) > 50, out[-500:]
    m.remount()  # the stale mount is cleaned, the stores open
    for i in acked:
        path = root / f"k{i % 50}" / f"f{i}"
        assert path.read_text() == f"value {i}\n" * (i % 7 + 1), i
    assert "Traceback" not in m.log()


def test_a_listing_changed_while_read_skips_what_went(m) -> None:
    """A directory listed in several READDIRs: entries removed between them are not returned,
    and the ones still there come with their right names and inodes."""
    d = m.path / "global" / "many"
    d.mkdir()
    names = [f"file-{i:04d}" for i in range(3000)]
    for name in names:
        (d / name).write_bytes(b"x")
    inodes = {name: (d / name).stat().st_ino for name in names}
    seen: dict[str, int] = {}
    with os.scandir(d) as it:
        first = next(it)  # one getdents: hundreds of entries, not all 3,000
        seen[first.name] = first.inode()
        gone = names[-100:]  # listed last: entries are in inode (creation) order
        for name in gone:
            (d / name).unlink()
        for entry in it:
            seen[entry.name] = entry.inode()
    assert not set(seen) & set(gone)  # so the removals landed between two READDIRs
    assert all(inodes[name] == ino for name, ino in seen.items())
    assert set(seen) == set(names) - set(gone)
