"""The daemon as a process: started attached or forked into the background, said ready only once
its mount serves, logging, and the report it leaves when it could not save everything.

What the daemon does while it runs is a ``Serve`` given by the caller (app/daemon.py): it calls
``ready()`` once the mount answers requests, and returns the exit status. In the background,
``drekifs mount`` forks (before any trio or FUSE state exists) and returns only when the child
has said ``ready`` on a pipe, or why it could not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from .. import datadir

log = logging.getLogger("drekifs")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

Ready = Callable[[], None]
Serve = Callable[[Ready], int]  # serve(ready): serve until unmounted; the exit status


class MountError(Exception):
    """Mounting cannot go on; the message says why, for the user."""


def setup_logging(level: str, log_file: Path | None) -> None:
    handler: logging.Handler
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# -- the data directory --------------------------------------------------------------------------


def claim_data_dir(data_dir: Path) -> int:
    """Before any store or log file is opened: this process's files private from now on, and the
    data directory locked for its life. Returns the lock's descriptor (kept open until exit)."""
    os.umask(datadir.UMASK)
    try:
        return datadir.lock(data_dir)
    except datadir.DataDirError as e:
        raise MountError(str(e)) from None


def tighten_data_dir(data_dir: Path) -> None:
    """Modes made looser while the daemon was down (or by an older version): tightened, logged."""
    changed = datadir.tighten(data_dir)
    if changed:
        shown = ", ".join(changed[:10]) + (f" and {len(changed) - 10} more" if changed[10:] else "")
        log.warning(
            "data directory %s: tightened to 0700/0600 what others could open: %s",
            data_dir,
            shown,
        )


# -- what cannot go in the data directory: runtime directories, exit reports -----------------------


def runtime_dirs() -> list[Path]:
    """Where this uid's daemons put what cannot go in a data directory (a control socket whose
    path would be too long, an exit report when the disk is full): ``$TMPDIR/drekifs-UID``,
    then ``/tmp/drekifs-UID`` (without TMPDIR the same one)."""
    name = f"drekifs-{os.getuid()}"
    return list(
        dict.fromkeys([Path(os.environ.get("TMPDIR") or "/tmp") / name, Path("/tmp") / name])
    )


def exit_report_paths(pid: int) -> list[Path]:
    """Where a daemon that could not save everything says so, for ``drekifs umount``."""
    return [d / f"exit-{pid}" for d in runtime_dirs()]


def write_exit_report(report: str) -> None:
    """This process's exit report, in the first runtime directory that takes it (logged when
    none does)."""
    for path in exit_report_paths(os.getpid()):
        try:
            datadir.private_dir(path.parent)
            path.write_text(report + "\n")
            break
        except (OSError, datadir.DataDirError) as e:
            log.error("cannot write the exit report %s: %s", path, e)


def read_exit_report(pid: int) -> str | None:
    """The exit report of daemon ``pid``, removed once read; None when it left none."""
    for path in exit_report_paths(pid):
        with contextlib.suppress(OSError):
            text = path.read_text()
            path.unlink()
            return text.strip()
    return None


# -- starting it -----------------------------------------------------------------------------------


def notify_ready(mountpoint: Path) -> None:
    """Attached: the mount serves; said in the log, and to systemd (Type=notify) if it asks."""
    log.info("serving %s", mountpoint)
    sock = os.environ.get("NOTIFY_SOCKET")
    if sock:
        addr = "\0" + sock[1:] if sock.startswith("@") else sock
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.send(b"READY=1\nSTATUS=serving\n")


def run_attached(
    data_dir: Path, log_level: str, log_file: Path | None, mountpoint: Path, serve: Serve
) -> int:
    """``drekifs mount --foreground``: serve in this process, logging to ``log_file`` (None:
    stderr); the exit status."""
    try:
        claim_data_dir(data_dir)
    except MountError as e:
        print(f"drekifs: {e}", file=sys.stderr)
        return 1
    setup_logging(log_level, log_file)
    try:
        tighten_data_dir(data_dir)
        return serve(lambda: notify_ready(mountpoint))
    except MountError as e:
        log.error("%s", e)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def run_in_background(data_dir: Path, log_level: str, log_file: Path, serve: Serve) -> int:
    """Fork; the parent waits for the child's word on a pipe and returns only once served."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_fd)
        status = 1
        try:
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1):
                os.dup2(devnull, fd)
            try:  # the daemon that serves holds the lock, and a refused one writes no log line
                claim_data_dir(data_dir)
            except MountError as e:
                os.write(write_fd, f"error {e}\n".encode())
                os._exit(1)
            setup_logging(log_level, log_file)
            tighten_data_dir(data_dir)

            def ready() -> None:
                try:
                    os.write(write_fd, b"ready\n")
                except OSError as e:  # the mount command went away (killed): serve all the same
                    log.warning("the mount command did not hear it is served: %s", e)
                os.dup2(devnull, 2)  # from now on, only the log file

            status = serve(ready)
        except MountError as e:
            log.error("%s", e)
            os.write(write_fd, f"error {e}\n".encode())
        except BaseException as e:  # everything reaches the waiting parent
            log.exception("daemon failed")
            with contextlib.suppress(OSError):
                os.write(write_fd, f"error {type(e).__name__}: {e}\n".encode())
        finally:
            os._exit(status)
    os.close(write_fd)
    message = b""
    with os.fdopen(read_fd, "rb") as r:
        message = r.readline()
    if message.startswith(b"ready"):
        return 0
    if message.startswith(b"error "):
        print(f"drekifs: {message[6:].decode().strip()}", file=sys.stderr)
    else:
        print(f"drekifs: the daemon exited before serving; see {log_file}", file=sys.stderr)
    os.waitpid(pid, 0)
    return 1
