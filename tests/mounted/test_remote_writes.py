"""Writes to another node's store: close() says whether the owner took the bytes.

Real peer daemons with a key ring (the ``cluster`` fixture of test_cluster.py): A writes under
B's ``local/``, B is killed with SIGKILL at the worst moments, restarted, and what B holds is
compared with what A's system calls acknowledged.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import threading

import pytest

from drekifs import logs

from ..conftest import Mount, wait_for
from .test_cluster import cluster, members  # noqa: F401 (cluster: the fixture)

pytestmark = pytest.mark.mounted

URN_OF_B = "w.test:dc:b::local"
# What a request to B says once B is killed: its address as host:port, no Python tuples.
NOT_ANSWERING = "b.w.test does not answer (127.0.0.1:"


def requests(m: Mount, op: str) -> int:
    for line in (m.path / ".dreki" / "requests").read_text().splitlines():
        name, _, count = line.partition(" ")
        if name == op:
            return int(count)
    return 0


def kill_and_restart(a: Mount, b: Mount) -> None:
    os.kill(b.pid, signal.SIGKILL)
    wait_for(lambda: members(a.path)["b"] != "alive", timeout=10, what="a sees b go")
    b.remount()  # cleans the dead daemon's mount
    wait_for(lambda: members(a.path)["b"] == "alive", timeout=15, what="b back")


def warnings_about(m: Mount, urn: str) -> list[str]:
    return [line for line in m.log().splitlines() if " WARNING " in line and urn in line]


def test_close_reports_what_the_owner_did_not_take(cluster) -> None:  # noqa: F811
    mounts, _, _, _ = cluster
    a, b = mounts["a"], mounts["b"]
    on_a, on_b = a.path / "dc" / "b" / "local", b.path / "dc" / "b" / "local"

    # The owner alive: close() returns once B has the bytes on disk, so a SIGKILL of B right
    # after it loses nothing (NFS's close-to-open: close commits to the server).
    with open(on_a / "kept", "wb") as f:
        f.write(b"taken by b\n")
    os.kill(b.pid, signal.SIGKILL)
    wait_for(lambda: members(a.path)["b"] != "alive", timeout=10, what="a sees b go")
    b.remount()
    assert (on_b / "kept").read_bytes() == b"taken by b\n"
    wait_for(lambda: members(a.path)["b"] == "alive", timeout=15, what="b back")

    # The owner killed between write() and close(): close() fails with EHOSTDOWN, and a
    # WARNING names the file's URN.
    target = on_a / "note"
    target.write_bytes(b"old\n")
    fd = os.open(target, os.O_WRONLY | os.O_TRUNC)
    dup = os.dup(fd)
    assert os.write(fd, b"new bytes\n") == 10
    os.kill(b.pid, signal.SIGKILL)
    with pytest.raises(OSError) as info:
        os.close(fd)
    assert info.value.errno == errno.EHOSTDOWN
    urn = f"{URN_OF_B}::note"
    assert any("not taken" in line for line in warnings_about(a, urn)), a.log()[-3000:]

    # Those bytes were reported lost, so they are gone for good: not sent later by the other
    # descriptor of the same open file, nor by its release, into a file the application
    # believes unchanged. A write after the failure asks the owner again: EHOSTDOWN too.
    with pytest.raises(OSError) as info:
        os.write(dup, b"more")
    assert info.value.errno == errno.EHOSTDOWN
    wait_for(lambda: members(a.path)["b"] != "alive", timeout=10, what="a sees b go")
    b.remount()
    wait_for(lambda: members(a.path)["b"] == "alive", timeout=15, what="b back")
    released = requests(a, "release")
    os.close(dup)  # nothing unsaved: 0
    wait_for(lambda: requests(a, "release") > released, what="the release of the open file")
    assert (on_b / "note").read_bytes() == b"old\n"
    assert target.read_bytes() == b"old\n"

    # echo x > f on a remote file: O_TRUNC, a FLUSH before the first write (the shell's dup2),
    # then the write: the file holds x.
    subprocess.run(["sh", "-c", f"echo x > {target}"], check=True, timeout=30)
    assert (on_b / "note").read_bytes() == b"x\n"

    # Unlinked through this mount while open: the bytes go nowhere, as locally: close() is 0.
    fd = os.open(on_a / "doomed", os.O_CREAT | os.O_WRONLY, 0o644)
    os.unlink(on_a / "doomed")
    os.write(fd, b"nowhere")
    os.close(fd)
    # Removed at the owner meanwhile (not through this mount): the owner did not take them.
    fd = os.open(on_a / "removed-at-b", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"not taken")
    (on_b / "removed-at-b").unlink()
    with pytest.raises(OSError) as info:
        os.close(fd)
    assert info.value.errno == errno.ESTALE
    assert warnings_about(a, f"{URN_OF_B}::removed-at-b")


def test_owner_killed_during_writes_loses_nothing_acknowledged(cluster) -> None:  # noqa: F811
    """Fault injection: B killed while A writes file after file into it. Every call either
    succeeds or fails with a clear errno; every file whose close() returned 0 is at B, whole,
    after B restarts."""
    mounts, _, _, _ = cluster
    a, b = mounts["a"], mounts["b"]
    on_a, on_b = a.path / "dc" / "b" / "local", b.path / "dc" / "b" / "local"
    (on_a / "run").mkdir()
    acknowledged: dict[str, bytes] = {}
    refused: list[tuple[str, int]] = []
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set() and i < 10_000:
            name, data = f"f{i}", os.urandom(1000 + 97 * (i % 50)) * 20
            i += 1
            try:
                fd = os.open(on_a / "run" / name, os.O_CREAT | os.O_WRONLY, 0o644)
            except OSError as e:
                refused.append(("open", e.errno))
                continue
            written = False
            try:
                for off in range(0, len(data), 16384):
                    os.write(fd, data[off : off + 16384])
                written = True
            except OSError as e:
                refused.append(("write", e.errno))
            finally:
                try:
                    os.close(fd)
                except OSError as e:
                    refused.append(("close", e.errno))
                else:
                    if written:  # every write() and the close() acknowledged
                        acknowledged[name] = data

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        wait_for(lambda: len(acknowledged) >= 5, timeout=30, what="writes before the kill")
        b_pid = b.pid
        os.kill(b_pid, signal.SIGKILL)
        wait_for(lambda: len(refused) >= 20, timeout=30, what="refusals after the kill")
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    clear = {errno.EHOSTDOWN, errno.EIO}
    assert {code for _, code in refused} <= clear, refused
    b.remount()
    wait_for(lambda: members(a.path)["b"] == "alive", timeout=15, what="b back")
    for name, data in acknowledged.items():
        assert (on_b / "run" / name).read_bytes() == data, name


def test_a_down_owner_is_logged_once_per_interval(cluster) -> None:  # noqa: F811
    """A down owner polled 20 times a second: one line, then a count, not a line a request;
    and no Python reprs of keys or addresses in what is logged."""
    mounts, _, _, _ = cluster
    a, b = mounts["a"], mounts["b"]
    polled = a.path / "dc" / "b" / "local" / "polled"
    polled.write_text("here\n")
    os.kill(b.pid, signal.SIGKILL)
    failures = 0
    for _ in range(60):
        try:
            os.stat(a.path / "dc" / "b" / "local" / "polled-not-cached")
        except OSError as e:
            assert e.errno in (errno.EHOSTDOWN, errno.ENOENT)
            failures += 1
    assert failures == 60
    lines = [line for line in a.log().splitlines() if "polled-not-cached" in line]
    assert 1 <= len(lines) <= 2, lines
    assert f"lookup {URN_OF_B}::polled-not-cached: {NOT_ANSWERING}" in lines[0], lines[0]
    # When the interval ends: one line with the count (the first failure was logged alone).
    summary = re.compile(r"polled-not-cached: .* \(and (\d+) more like it in [\d.]+ s\)$")

    def summarized() -> int:
        found = [summary.search(line) for line in a.log().splitlines()]
        return max((int(m.group(1)) for m in found if m), default=0)

    assert wait_for(summarized, timeout=logs.INTERVAL + 5, what="the summary") >= 59
    # Python reprs: tuples of bytes or addresses, b'...' literals.
    reprs = re.compile(r"\(b'|b'[^']*'|\('\d+\.\d+\.\d+\.\d+', \d+\)|@\('")
    bad = [line for line in a.log().splitlines() if reprs.search(line)]
    assert not bad, bad
