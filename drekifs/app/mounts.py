"""This machine's drekifs mounts, as the kernel's mount table shows them: finding them, telling a
stale one (its daemon gone) from a live one, and unmounting.

``drekifs umount`` unmounts and waits for the daemon to exit, then prints the exit report it may
have left (app/service.py). A daemon unmounted by ``umount`` or ``fusermount3 -u`` alike sees its
FUSE session end and exits.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import time
from pathlib import Path

from .service import MountError, read_exit_report

log = logging.getLogger("drekifs")

FS_TYPE = "fuse.drekifs"


def _unescape_mountinfo(text: str) -> str:
    return (
        text.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )


def drekifs_mounts() -> dict[str, str]:
    """Mount point -> source (the world's domain) of every drekifs mount of this machine."""
    out: dict[str, str] = {}
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == FS_TYPE:
                    out[_unescape_mountinfo(parts[1])] = _unescape_mountinfo(parts[0])
    except OSError:
        pass
    return out


def is_stale(mountpoint: Path) -> bool:
    """A mount whose daemon is gone. stat() alone can be answered from the kernel's cache;
    listing the directory always asks the daemon."""
    try:
        os.stat(mountpoint)
        if str(mountpoint) in drekifs_mounts():
            os.listdir(mountpoint)
    except OSError as e:
        # ENOTCONN once the device is closed; ECONNABORTED on some kernels after an abort.
        return e.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def lazy_unmount(mountpoint: Path) -> None:
    """Detach a mount whose daemon is gone ("Transport endpoint is not connected")."""
    for cmd in (["fusermount3", "-u", "-z", str(mountpoint)], ["umount", "-l", str(mountpoint)]):
        try:
            if subprocess.run(cmd, capture_output=True).returncode == 0:
                return
        except FileNotFoundError:
            continue


def daemon_pid(mountpoint: Path) -> int:
    return int((mountpoint / ".dreki" / "pid").read_text().strip())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie nobody reaps (no init in a container) has exited all the same
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def prepare_mountpoint(mountpoint: Path) -> None:
    """Make ``mountpoint`` ready to mount on: a stale mount there removed, the directory made;
    MountError when a live drekifs mount is there already or it cannot be a directory."""
    if is_stale(mountpoint):
        log.warning("%s: stale mount of a dead daemon; removing it", mountpoint)
        lazy_unmount(mountpoint)
    if str(mountpoint) in drekifs_mounts():
        try:
            pid = daemon_pid(mountpoint)
        except (OSError, ValueError):
            pid = "?"
        raise MountError(f"{mountpoint} is already a drekifs mount (daemon {pid})")
    try:
        mountpoint.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MountError(f"cannot create mount point {mountpoint}: {e}") from None
    if not mountpoint.is_dir():
        raise MountError(f"mount point {mountpoint} is not a directory")


def unmount(mountpoint: Path, timeout: float = 60.0) -> str:
    """Unmount cleanly and wait for the daemon to exit. Returns what was done."""
    mountpoint = Path(os.path.abspath(mountpoint))
    if is_stale(mountpoint):
        lazy_unmount(mountpoint)
        return f"{mountpoint}: the daemon was gone; stale mount removed"
    if str(mountpoint) not in drekifs_mounts():
        raise MountError(f"{mountpoint} is not a drekifs mount")
    try:
        pid = daemon_pid(mountpoint)
    except (OSError, ValueError) as e:
        raise MountError(f"{mountpoint}: cannot read the daemon's pid: {e}") from None
    result = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True)
    if result.returncode != 0:
        if "busy" in result.stderr.lower():
            raise MountError(f"{mountpoint} is busy: a process still uses it (see fuser -m)")
        result = subprocess.run(["umount", str(mountpoint)], capture_output=True, text=True)
        if result.returncode != 0:
            raise MountError(f"cannot unmount {mountpoint}: {result.stderr.strip()}")
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            raise MountError(
                f"{mountpoint} unmounted, but daemon {pid} still runs after {timeout}s"
            )
        time.sleep(0.02)
    report = read_exit_report(pid)
    if report:
        raise MountError(
            f"{mountpoint} unmounted, but daemon {pid} could not save everything:\n{report}"
        )
    return f"{mountpoint} unmounted; daemon {pid} exited"
