"""The data directory is the daemon's alone: one daemon at a time, nothing in it for others.

``DATA_DIR/daemon.lock`` holds an exclusive ``flock`` for the daemon's whole life, taken before
any store is opened; it names the daemon's pid, so a second daemon on the same directory says
whose it is and touches nothing. The kernel drops the lock when the daemon's process ends, however
it ends (kill -9 too). The directory is 0700 and everything in it 0600 whatever the umask: the
daemon runs under umask 077, and modes made looser while it was down are tightened at start.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from pathlib import Path

LOCK_NAME = "daemon.lock"
UMASK = 0o077  # the daemon's: files 0600, directories 0700, whatever it was started with


class DataDirError(Exception):
    """The data directory (or the control socket's) is not the daemon's alone; says why."""


def make(data_dir: Path) -> None:
    """Create the data directory 0700 (its parents as the umask says)."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)


def lock(data_dir: Path) -> int:
    """Take the data directory for this process; returns the lock's descriptor, to keep open
    (close-on-exec: no child of the daemon keeps the lock after it). Raises DataDirError naming
    the daemon that holds it."""
    path = data_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise DataDirError(f"data directory {data_dir}: cannot open {path}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        busy = e.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
        holder = _holder(fd) if busy else None
        os.close(fd)
        if not busy:
            raise DataDirError(
                f"data directory {data_dir}: cannot lock {path}: {e.strerror}"
            ) from None
        raise DataDirError(
            f"data directory {data_dir} is in use by drekifs daemon {holder or '(pid unknown)'}"
            f" ({path} is locked): unmount it first, or give this mount another --data-dir"
        ) from None
    # One write of a fixed width over the last holder's pid: a reader never sees half of one.
    record = f"{os.getpid():<10}\n".encode()
    os.pwrite(fd, record, 0)
    os.ftruncate(fd, len(record))
    return fd


def _holder(fd: int, wait: float = 1.0) -> int | None:
    """The pid the holder wrote; it writes it just after locking, so wait a moment for it."""
    deadline = time.monotonic() + wait
    while True:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text.isdigit():
            return int(text)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)


def tighten(data_dir: Path) -> list[str]:
    """Make the data directory 0700 and what is in it 0600 (directories 0700), without
    following symbolic links. Returns ``name (was MODE)`` for each one changed, the name
    relative to the data directory (``.`` for itself)."""
    if not data_dir.is_absolute() or not (data_dir / LOCK_NAME).is_file():
        # Only the data directory this daemon has locked: a wrong path would chmod someone's tree.
        raise ValueError(f"{data_dir} is not a locked data directory")
    changed = []

    def fix(path: str, want: int) -> None:
        st = os.lstat(path)
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077 or mode & ~want:  # no bit for others, none beyond what we want
            os.chmod(path, mode & want)
            changed.append(f"{os.path.relpath(path, data_dir)} (was {mode:o})")

    fix(str(data_dir), 0o700)
    for dirpath, dirnames, filenames in os.walk(data_dir):
        for name in dirnames:
            fix(os.path.join(dirpath, name), 0o700)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):  # chmod would follow it
                fix(path, 0o600)
    return changed


def private_dir(path: Path) -> Path:
    """A directory only this user controls, made 0700 when missing: a real directory (not a
    symbolic link), owned by this uid, not writable by group or others. Anything else is
    refused: whoever controls it could swap a socket path under the daemon."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise DataDirError(f"cannot create {path}: {e.strerror}") from None
    st = os.lstat(path)
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        why = "is a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        why = "is not a directory"
    elif st.st_uid != os.getuid():
        why = f"is owned by uid {st.st_uid}, not {os.getuid()}"
    elif mode & 0o022:
        why = f"is writable by others (mode {mode:o})"
    else:
        return path
    raise DataDirError(f"{path} {why}: refusing to use it; remove it, or make it yours and 0700")
