"""A full disk, for real: the data directory on a small tmpfs. Every refusal is ENOSPC at the
request that would need the room (write, create, setxattr), never EIO at a later close or
fsync; everything acknowledged is there after a remount; deleting frees room again."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
from pathlib import Path

import pytest

from ..conftest import drekifs, exited, is_mounted, wait_for

pytestmark = pytest.mark.mounted

CHUNK = 64 << 10


@pytest.fixture
def small_disk(tmp_path: Path):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", disk], check=True)
    yield disk
    subprocess.run(["umount", "-l", disk], check=False)


def fill(directory: Path, prefix: str, limit: int = 24) -> tuple[dict[str, bytes], int]:
    """Write files of 512 KiB until the disk refuses (or ``limit`` files); returns what each
    close acknowledged and the errno of the refusal (0: none)."""
    acked: dict[str, bytes] = {}
    for i in range(limit):
        name = f"{prefix}{i}"
        try:
            fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            return acked, e.errno
        written = b""
        refusal = 0
        try:
            for c in range(8):
                data = bytes([i % 251]) * (CHUNK - c)
                try:
                    n = os.write(fd, data)  # may be short: the kernel splits large writes
                except OSError as e:
                    refusal = e.errno
                    break
                written += data[:n]
                if n < len(data):
                    break
        finally:
            os.close(fd)  # raises if the bytes written were not taken: the test fails then
        acked[name] = written
        if refusal:
            return acked, refusal
    return acked, 0


def test_a_full_disk_is_enospc_at_the_request_and_loses_nothing(mount_world, small_disk) -> None:
    m = mount_world(data=str(small_disk / "data"))
    root = m.path / "global"
    acked, code = fill(root, "f")
    assert code == errno.ENOSPC, os.strerror(code) if code else "24 files of 512 KiB fit"
    assert len(acked) >= 4  # the disk did hold something
    with pytest.raises(OSError) as info:
        os.setxattr(root / "f0", "user.x", b"v" * 60_000)
    assert info.value.errno == errno.ENOSPC
    # fsync of what was acknowledged succeeds: it had its room.
    fd = os.open(root / "f0", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    # Deleting works on a full disk, and makes room.
    for name in list(acked)[: len(acked) // 2]:
        os.unlink(root / name)
        del acked[name]
    more, code = fill(root, "g", limit=2)
    assert code == 0 and len(more) == 2 and all(len(v) == 8 * CHUNK - 28 for v in more.values())
    acked.update(more)
    m.umount()
    assert not is_mounted(m.path)
    log = m.log()
    assert "cannot commit" not in log and "not saved" not in log
    m.remount()
    for name, data in acked.items():
        assert (root / name).read_bytes() == data, name


def test_changes_that_cannot_be_saved_at_exit_are_kept_and_said(mount_world, small_disk) -> None:
    from drekifs.stores import unsaved

    m = mount_world(data=str(small_disk / "data"))
    root = m.path / "global"
    (root / "before").write_text("on disk\n")
    held = bytes(range(256)) * 4096  # 1 MiB: room reserved at the first write
    fd = os.open(root / "held", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, held)
    # Another process fills the disk meanwhile: the store's commit cannot happen now.
    with open(small_disk / "filler", "wb") as filler, contextlib.suppress(OSError):
        for _ in range(64):
            filler.write(b"\0" * (1 << 20))
            filler.flush()
    os.close(fd)  # acknowledged: the bytes are the store's now
    result = drekifs("umount", m.path, check=False)
    assert result.returncode == 1, result.stderr
    assert "store global:" in result.stderr and "could not be saved; kept in" in result.stderr
    kept = Path(result.stderr.split("kept in ", 1)[1].split(",", 1)[0])
    assert kept.exists() and kept.stat().st_mode & 0o077 == 0
    assert not is_mounted(m.path)
    os.unlink(small_disk / "filler")
    m.remount()
    assert (root / "held").read_bytes() == held
    assert (root / "before").read_text() == "on disk\n"
    wait_for(lambda: not kept.exists(), timeout=5, what="the kept changes committed")
    assert "taken up from" in m.log()
    assert not unsaved.find(small_disk / "data" / "stores" / "global")


def test_kill_9_in_the_middle_of_group_commits_loses_nothing_fsynced(mount_world) -> None:
    """Bursts of 13 MiB of writes, fsynced three times in each and not at its end, the daemon
    killed right after (the burst's last 50 files not on disk yet, their group committing or
    gathering): every fsynced file is whole after the remount, the store opens and commits."""
    m = mount_world()
    root = m.path / "global"
    durable: dict[str, bytes] = {}
    waiting_at_kill = []
    for burst in range(4):
        for i in range(200):
            name, data = f"b{burst}-{i}", bytes([(burst * 7 + i) % 251]) * (64 << 10)
            fd = os.open(root / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data)
                if i in (49, 99, 149):
                    os.fsync(fd)
                    durable[name] = data
            finally:
                os.close(fd)
        stores = (m.path / ".dreki" / "stores").read_text()
        waiting_at_kill.append(int(stores.split("global ", 1)[1].split("unsynced=")[1].split()[0]))
        pid = m.pid
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda pid=pid: exited(pid), timeout=10, what="the daemon gone")
        m.remount()
        for name, data in durable.items():
            assert (root / name).read_bytes() == data, name
        fd = os.open(root / "after", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, b"x")
        os.fsync(fd)
        os.close(fd)
    # The kills did come with changes not yet on disk (else this tested a quiet store).
    assert any(waiting_at_kill), waiting_at_kill
