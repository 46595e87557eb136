"""Several peers on one machine, each mounted: members, remote local stores, failures, keys.

Three nodes on localhost, on the ports their zone gives; each daemon is a real process with a
real mount, talking to the others over the sealed transport.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from drekifs.app import control

from ..conftest import Shell, drekifs, free_port, wait_for
from ..worlds import Zone

pytestmark = pytest.mark.mounted

NODES = ("a", "b", "c")


def localhost_nodes(nodes: tuple[str, ...]) -> tuple[Zone, dict[str, int]]:
    """A zone of ``nodes`` in one region, all on localhost, on free ports; and the ports."""
    ports = {n: free_port() for n in nodes}
    zone = Zone().region("@", ["dc"]).region("dc", list(nodes))
    for n in nodes:
        zone.node(n, port=ports[n], host="localhost.")
    return zone, ports


def three_nodes() -> tuple[Zone, dict[str, int]]:
    return localhost_nodes(NODES)


def members(mnt: Path) -> dict[str, str]:
    rows = json.loads((mnt / ".dreki" / "members.json").read_text())
    return {r["node"].split(".")[0]: r["state"] for r in rows}


@pytest.fixture
def cluster(tmp_path, zone_file, mount_world):
    zone, ports = three_nodes()
    path = zone_file(zone)
    ring = tmp_path / "ring"
    drekifs("keygen", ring)
    extra = {"b": ("--store", "extra")}  # b has one more store: its metadata tells the others
    mounts = {
        n: mount_world(
            "--zone", path, "--node", n, "--keyring", ring, *extra.get(n, ()), name=f"m{n}"
        )
        for n in NODES
    }
    for n in NODES:
        wait_for(
            lambda n=n: set(members(mounts[n].path).values()) == {"alive"},
            timeout=15,
            what=f"{n} sees everyone alive",
        )
    return mounts, ports, ring, path


def test_remote_store_read_write_and_failure(cluster, tmp_path: Path) -> None:
    mounts, _, _, _ = cluster
    a, b = mounts["a"].path, mounts["b"].path
    b_local_from_a = a / "dc" / "b" / "local"
    b_local_on_b = b / "dc" / "b" / "local"

    # B's stores, as its membership metadata announces them, under its directory everywhere.
    wait_for(lambda: "extra" in os.listdir(a / "dc" / "b"), timeout=5, what="b's extra store")
    assert sorted(os.listdir(a / "dc" / "b")) == ["extra", "global", "local"]
    (a / "dc" / "b" / "extra" / "e").write_text("in extra\n")
    wait_for(lambda: (b / "dc" / "b" / "extra" / "e").exists(), what="extra written")

    # A writes into B's store; B sees it in its own store, and A reads it back.
    (b_local_from_a / "dir").mkdir()
    (b_local_from_a / "dir" / "hello").write_text("from a\n")
    with open(b_local_from_a / "dir" / "synced", "w") as f:
        f.write("durable\n")
        f.flush()
        os.fsync(f.fileno())
    assert (b_local_on_b / "dir" / "synced").read_text() == "durable\n"
    hello = b_local_on_b / "dir" / "hello"
    wait_for(lambda: hello.exists() and hello.read_text() == "from a\n", what="release at b")
    assert sorted(os.listdir(b_local_from_a / "dir")) == ["hello", "synced"]
    (b_local_on_b / "dir" / "from-b").write_text("b wrote\n")
    # close() on B does not wait for its release, which commits the bytes: poll for them.
    from_b = b_local_from_a / "dir" / "from-b"
    wait_for(lambda: from_b.exists() and from_b.read_text() == "b wrote\n", timeout=3, what="1 s")

    # A change on B reaches A's kernel cache at once (store.changed), not after 1 s.
    seen_by_a = b_local_from_a / "dir" / "from-b"
    assert seen_by_a.stat().st_size == len("b wrote\n")
    (b_local_on_b / "dir" / "from-b").write_text("b wrote a longer line\n")
    wait_for(
        lambda: seen_by_a.read_text() == "b wrote a longer line\n",
        timeout=0.6,
        interval=0.02,
        what="A told of B's change",
    )

    # The same errnos as locally.
    with pytest.raises(FileNotFoundError):
        (b_local_from_a / "nope").read_text()
    with pytest.raises(OSError) as info:
        (b_local_from_a / "dir").rmdir()
    assert info.value.errno == errno.ENOTEMPTY
    os.rename(b_local_from_a / "dir" / "hello", b_local_from_a / "dir" / "moved")
    assert (b_local_on_b / "dir" / "moved").read_text() == "from a\n"
    with pytest.raises(OSError) as info:
        os.rename(b_local_from_a / "dir" / "moved", a / "dc" / "a" / "local" / "moved")
    assert info.value.errno == errno.EXDEV
    os.unlink(b_local_from_a / "dir" / "moved")
    assert not (b_local_on_b / "dir" / "moved").exists()
    # Renamed while open, then written: the bytes follow the entry (the owner finds it by id).
    with open(b_local_from_a / "dir" / "tomove", "w") as f:
        f.write("before")
        f.flush()
        os.rename(b_local_from_a / "dir" / "tomove", b_local_from_a / "dir" / "moved2")
        f.write(" after")
    moved2 = b_local_on_b / "dir" / "moved2"
    wait_for(lambda: moved2.exists() and moved2.read_text() == "before after", what="by id")
    os.chmod(b_local_from_a / "dir" / "moved2", 0o600)
    wait_for(lambda: moved2.stat().st_mode & 0o777 == 0o600, timeout=3, what="chmod by id")

    # cp -a from A into B's store: the times and mode it sets before close travel with the
    # bytes; B has them as the source does once the copy's closes are answered.
    src = tmp_path / "tree"
    src.mkdir()
    for i, perm in enumerate((0o640, 0o755, 0o600)):
        (src / f"f{i}").write_bytes(os.urandom(300 + i))
        os.chmod(src / f"f{i}", perm)
        os.utime(src / f"f{i}", ns=(1_500_000_000_000_000_000 + i, 1_600_000_000_000_000_000 + i))
    subprocess.run(["cp", "-a", str(src), str(b_local_from_a)], check=True, timeout=30)
    for i in range(3):
        want, copy = os.stat(src / f"f{i}"), b_local_on_b / "tree" / f"f{i}"
        wait_for(lambda c=copy, n=want.st_size: c.exists() and c.stat().st_size == n, what="cp")
        got = copy.stat()
        assert (got.st_mode, got.st_mtime_ns) == (want.st_mode, want.st_mtime_ns)
        assert copy.read_bytes() == (src / f"f{i}").read_bytes()

    # A large value goes in parts (store.stage) and comes back in parts.
    big = os.urandom(3 << 20)
    with open(b_local_from_a / "big", "wb") as f:
        f.write(big)
        os.fsync(f.fileno())
    assert (b_local_on_b / "big").read_bytes() == big
    assert (b_local_from_a / "big").read_bytes() == big
    assert os.stat(b_local_from_a / "big").st_size == len(big)
    urn = os.getxattr(b_local_from_a / "dir" / "synced", "user.dreki.urn").decode()
    assert urn == "w.test:dc:b::local::dir/synced"

    # B stopped, then killed: a request of A's waiting on B (until its call times out) does
    # not hold up A's other requests (fs/requestloop.py hands the reading on to another worker).
    b_pid = mounts["b"].pid  # read from B's mount: not while B is stopped
    dir_fd = os.open(b_local_from_a / "dir", os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dir_fd)  # a directory's fsync asks the owner: answered while it is up
    os.kill(b_pid, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit((b_local_from_a / "dir" / "synced-not-cached").read_text)
            mine = a / "global" / "while-b-is-stopped"
            done_meanwhile = 0  # local round trips finished while the remote read waited
            for i in range(20):
                t0 = time.monotonic()
                mine.write_text(f"{i}\n")
                assert mine.read_text() == f"{i}\n" and mine.name in os.listdir(mine.parent)
                assert time.monotonic() - t0 < 0.5, f"a local request took {time.monotonic() - t0}"
                if waiting.done():
                    break
                done_meanwhile += 1
            assert done_meanwhile >= 3
            with pytest.raises(OSError) as info:
                waiting.result(timeout=10)
        assert info.value.errno == errno.EHOSTDOWN
        assert time.monotonic() - stopped < 2.5
    finally:
        # kill -9 of B: A's members stop showing it alive within 10 s, reads fail within 2 s.
        os.kill(b_pid, signal.SIGKILL)
    killed = time.monotonic()
    t0 = time.monotonic()
    with pytest.raises(OSError) as info:
        (b_local_from_a / "dir" / "synced-not-cached-2").read_text()
    assert time.monotonic() - t0 < 2.5
    assert info.value.errno == errno.EHOSTDOWN
    with pytest.raises(OSError) as info:
        os.fsync(dir_fd)  # nobody to put it on disk: said, not pretended
    assert info.value.errno == errno.EHOSTDOWN
    os.close(dir_fd)
    wait_for(lambda: members(a)["b"] in ("suspect", "dead"), timeout=10, what="a suspects b")
    wait_for(lambda: members(a)["b"] == "dead", timeout=12, what="a marks b dead")
    assert time.monotonic() - killed < 12
    t0 = time.monotonic()
    with pytest.raises(OSError) as info:
        os.listdir(b_local_from_a / "dir")
    assert time.monotonic() - t0 < 2.0
    assert info.value.errno in (errno.EHOSTDOWN, errno.ENOENT)
    assert members(mounts["c"].path)["b"] in ("suspect", "dead")
    mounts["b"].remount()  # cleans the stale mount, comes back with a higher incarnation
    wait_for(lambda: members(a)["b"] == "alive", timeout=15, what="b back")
    assert (b_local_from_a / "dir" / "synced").read_text() == "durable\n"
    status = drekifs("status", a).stdout
    assert "alive" in status and "(this peer)" in status


def test_foreign_keyring_and_junk(cluster, tmp_path, mount_world) -> None:
    mounts, ports, _, zone_path = cluster
    a = mounts["a"].path
    # A graceful leave: "left", not "dead".
    mounts["c"].umount()
    wait_for(lambda: members(a)["c"] == "left", timeout=5, what="c left")
    # A peer of the same world with another key ring: never alive, never served.
    other = tmp_path / "other-ring"
    drekifs("keygen", other)
    c2 = mount_world("--zone", zone_path, "--node", "c", "--keyring", other, name="mc2")
    time.sleep(4)
    assert members(a)["c"] != "alive"
    assert members(c2.path)["a"] != "alive"
    with pytest.raises(OSError) as info:
        os.listdir(c2.path / "dc" / "a" / "local")
    assert info.value.errno == errno.EHOSTDOWN

    # Junk at A's ports: it keeps serving, and says what it dropped.
    rng = os.urandom
    for _ in range(8):
        with (
            socket.create_connection(("127.0.0.1", ports["a"]), timeout=2) as s,
            contextlib.suppress(OSError),  # it may hang up on us: that is the point
        ):
            s.sendall(rng(128 << 10))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        for i in range(1000):
            u.sendto(rng(1 + i % 1500), ("127.0.0.1", ports["a"]))
            if i % 50 == 49:
                time.sleep(0.005)  # within what a socket buffer holds: the peer sees them all
    (a / "dc" / "b" / "local" / "after-junk").write_text("still here\n")
    assert (a / "dc" / "b" / "local" / "after-junk").read_text() == "still here\n"
    assert members(a)["b"] == "alive"
    counters = dict(
        line.split() for line in (a / ".dreki" / "cluster").read_text().splitlines() if line
    )
    udp = sum(int(v) for k, v in counters.items() if k.startswith("udp.dropped"))
    tcp = sum(int(v) for k, v in counters.items() if k.startswith(("tcp.dropped", "tcp.refused")))
    assert udp >= 950 and tcp >= 1, counters


def test_global_store_replicates(cluster) -> None:
    mounts, _, _, _ = cluster
    a, b, c = (mounts[n].path for n in NODES)
    # A write on one peer is readable on the others within a second; deletes too.
    (a / "global" / "motd").write_text("hello from a\n")
    t0 = time.monotonic()
    for other in (b, c):
        wait_for(
            lambda other=other: (
                (other / "global" / "motd").exists()
                and (other / "global" / "motd").read_text() == "hello from a\n"
            ),
            timeout=3,
            what="replicated",
        )
    assert time.monotonic() - t0 < 1.5
    (b / "dc" / "global" / "d").mkdir()
    (b / "dc" / "global" / "d" / "x").write_text("in a region\n")
    wait_for(lambda: (a / "dc" / "global" / "d" / "x").exists(), timeout=3, what="region key")
    os.unlink(a / "global" / "motd")
    for other in (b, c):
        wait_for(lambda other=other: not (other / "global" / "motd").exists(), timeout=3)
    # A peer unmounted while others write catches up after its remount.
    mounts["c"].umount()
    for i in range(20):
        (a / "global" / f"while-away-{i}").write_text(f"{i}\n")
    mounts["c"].remount()
    wait_for(
        lambda: all((c / "global" / f"while-away-{i}").exists() for i in range(20)),
        timeout=30,
        what="c caught up",
    )
    assert (c / "global" / "while-away-7").read_text() == "7\n"


def test_concurrent_writes_converge_with_a_conflict_copy(cluster) -> None:
    mounts, _, _, zone_path = cluster
    a, b = mounts["a"].path, mounts["b"].path
    (a / "global" / "shared").write_text("base\n")
    wait_for(lambda: (b / "global" / "shared").exists(), timeout=3, what="base replicated")
    # B goes away and writes alone (no key ring: it cannot hear A), while A writes too.
    mb = mounts["b"]
    mb.umount()
    drekifs("mount", "--data-dir", mb.data_dir, "--zone", zone_path, "--node", "b", mb.path)
    (b / "global" / "shared").write_text("written by b alone\n")
    (a / "global" / "shared").write_text("written by a\n")
    drekifs("umount", mb.path)
    mb.remount()  # with the key ring again: it catches up, both ways
    expected = None
    for m in (a, b, mounts["c"].path):  # every peer, the third one too
        wait_for(
            lambda m=m: len([n for n in os.listdir(m / "global") if n.startswith("shared")]) == 2,
            timeout=45,
            what="winner and conflict copy",
        )
        names = sorted(n for n in os.listdir(m / "global") if n.startswith("shared"))
        texts = [(m / "global" / n).read_text() for n in names]
        assert names[0] == "shared" and ".dreki-conflict-" in names[1]
        assert sorted(texts) == ["written by a\n", "written by b alone\n"]
        expected = expected or (names, texts)
        assert (names, texts) == expected  # the same winner and the same copy on both


@pytest.fixture
def two_peers(tmp_path, zone_file, mount_world):
    """Peers a and b replicating ``global``, each mounted."""
    zone, _ = localhost_nodes(("a", "b"))
    path = zone_file(zone)
    ring = tmp_path / "ring"
    drekifs("keygen", ring)
    mounts = {
        n: mount_world("--zone", path, "--node", n, "--keyring", ring, name=f"m{n}")
        for n in ("a", "b")
    }
    for n in ("a", "b"):
        wait_for(
            lambda n=n: set(members(mounts[n].path).values()) == {"alive"},
            timeout=15,
            what=f"{n} sees everyone alive",
        )
    return mounts


def store_has(mount, urn: str) -> bytes | None:
    """A key's value in a peer's store, asked over its control socket: not through its
    kernel, so the kernel's cached entries stay as they are."""
    sock = (mount.path / ".dreki" / "control").read_text().strip()
    try:
        return control.call(sock, {"op": "get", "urn": urn}, timeout=5)["value"]
    except control.ControlError as e:
        if e.errno == errno.ENOENT:
            return None
        raise


def test_echo_into_a_name_another_peer_just_changed(two_peers) -> None:
    """The kernel may still hold a negative entry for a name B just made, or a positive one
    for a name B just removed, when A writes it: the write succeeds all the same."""
    a, b = two_peers["a"], two_peers["b"]
    ga, gb = a.path / "global", b.path / "global"
    failures: list[str] = []

    def until_a_has(urn: str, present: bool) -> None:
        what = f"A's store to {'have' if present else 'lose'} {urn}"
        wait_for(lambda: (store_has(a, urn) is not None) == present, 5, interval=0, what=what)

    sh = Shell()
    deadline = time.monotonic() + 120
    try:
        for i in range(100):
            assert time.monotonic() < deadline, f"only {i} rounds in 120 s"
            # A caches a negative entry; B makes the name; A's store has it; A writes at once
            # (before the kernel is told, most of the time).
            made, urn = ga / f"made{i}", f"w.test::global::made{i}"
            assert not made.exists()
            (gb / made.name).write_text("from b\n")
            until_a_has(urn, True)
            sh.echo_x(made, failures)
            # A caches a positive entry; B removes the name; A's store lost it; A writes.
            gone, urn = ga / f"gone{i}", f"w.test::global::gone{i}"
            (gb / gone.name).write_text("from b\n")
            until_a_has(urn, True)
            assert gone.stat().st_size == 7
            (gb / gone.name).unlink()
            until_a_has(urn, False)
            sh.echo_x(gone, failures)
    finally:
        sh.close()
    assert not failures, f"{len(failures)} of 200 failed: {failures[:5]}"
    # What A wrote is what both peers end with.
    for name in ("made99", "gone99"):
        wait_for(lambda n=name: store_has(b, f"w.test::global::{n}") == b"x\n", what=name)


def test_an_open_file_another_peer_removes_keeps_working(two_peers) -> None:
    """B deletes, or renames away, a global file A has open: A's handles keep its bytes, and
    its inode says st_nlink 0 once A's kernel is told."""
    a, b = two_peers["a"], two_peers["b"]
    ga, gb = a.path / "global", b.path / "global"
    for how in ("unlink", "rename"):
        (gb / how).write_text(f"from b, to {how}\n")
        wait_for(lambda h=how: store_has(a, f"w.test::global::{h}"), what="replicated")
        fd = os.open(ga / how, os.O_RDONLY)
        try:
            assert os.fstat(fd).st_nlink == 1
            if how == "unlink":
                (gb / how).unlink()
            else:
                os.rename(gb / how, gb / "elsewhere")
            wait_for(lambda fd=fd: os.fstat(fd).st_nlink == 0, timeout=5, what="st_nlink 0")
            assert os.fstat(fd).st_size == len(f"from b, to {how}\n")
            assert os.pread(fd, 100, 0) == f"from b, to {how}\n".encode()
        finally:
            os.close(fd)
        assert not (ga / how).exists()
    wait_for(lambda: (ga / "elsewhere").exists(), what="the renamed file")
    assert (ga / "elsewhere").read_text() == "from b, to rename\n"


def test_an_open_file_in_another_nodes_store_unlinked_from_here(two_peers) -> None:
    """Another node's store, over RPC: a file unlinked or renamed over through this mount
    while open here answers fstat (st_nlink 0) and reads from its handles. (Writes to it, and
    changes the owner or a third node makes, are not kept: docs/stores.md.)"""
    a, b = two_peers["a"], two_peers["b"]
    remote = a.path / "dc" / "b" / "local"
    for how in ("unlink", "rename over"):
        f = remote / "f"
        f.write_text("hello world")
        fd = os.open(f, os.O_RDONLY)
        try:
            if how == "unlink":
                os.unlink(f)
            else:
                (remote / "tmp").write_text("new")
                os.rename(remote / "tmp", f)
            st = os.fstat(fd)
            assert (st.st_nlink, st.st_size) == (0, 11), how
            assert os.pread(fd, 100, 0) == b"hello world"
            assert (b.path / "dc" / "b" / "local" / "f").exists() == (how != "unlink")
        finally:
            os.close(fd)
        if how != "unlink":
            assert f.read_text() == "new"
            f.unlink()


def test_echo_into_a_name_the_owner_just_changed(two_peers) -> None:
    """Another node's store, over RPC: the owner removes or makes a name A has just looked
    at (A trusts what it learned for up to a second, and hears of changes in batches), and A
    writes it at once: the write succeeds and lands at the owner."""
    a, b = two_peers["a"], two_peers["b"]
    from_a, on_b = a.path / "dc" / "b" / "local", b.path / "dc" / "b" / "local"
    sh = Shell()
    failures = []
    deadline = time.monotonic() + 90
    try:
        for i in range(20):
            assert time.monotonic() < deadline, f"only {i} rounds in 90 s: {failures[:3]}"
            for name, made in ((f"gone{i}", False), (f"made{i}", True)):
                if made:
                    assert not (from_a / name).exists()
                    (on_b / name).write_text("from b\n")
                else:
                    (on_b / name).write_text("from b\n")
                    wait_for(lambda n=name: (from_a / n).exists(), what=f"{name} seen by a")
                    os.unlink(on_b / name)
                ok, out = sh.run(f"echo x > {from_a / name}")
                if not ok:
                    failures.append(out)
                    continue
                p = on_b / name
                try:
                    wait_for(lambda p=p: p.exists() and p.read_text() == "x\n", timeout=1.5)
                except AssertionError:
                    failures.append(f"{name}: {p.read_text() if p.exists() else 'absent'}")
    finally:
        sh.close()
    assert not failures, f"{len(failures)} of 40 failed: {failures[:5]}"
