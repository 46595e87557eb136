"""Fixtures for every layer: the drekifs command, mounts through the kernel, a real nsd server;
and the layers themselves: a test is ``mounted`` exactly when it lives in tests/mounted/."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

DREKIFS = str(Path(sys.executable).parent / "drekifs")
MOUNTED = Path(__file__).resolve().parent / "mounted"


@pytest.hookimpl(tryfirst=True)  # before -m deselects by these markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The folder is the layer: ``-m mounted`` selects tests/mounted/ and nothing else, and a test
    marked ``mounted`` or ``dns`` elsewhere is refused (unit/ and sim/ must run without them)."""
    for item in items:
        if MOUNTED in item.path.resolve().parents:
            item.add_marker(pytest.mark.mounted)
        elif item.get_closest_marker("mounted") or item.get_closest_marker("dns"):
            raise pytest.UsageError(
                f"{item.nodeid} goes through the kernel: move it to tests/mounted/"
            )


def drekifs(*args: str | os.PathLike, check: bool = True, timeout: float = 60, **kw):
    """Run the drekifs command; returns the CompletedProcess (text)."""
    result = subprocess.run(
        [DREKIFS, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"drekifs {' '.join(map(str, args))} exited {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result


def is_mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def force_unmount(path: Path) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def exited(pid: int) -> bool:
    """The process is gone, or a zombie: what init here may never reap has exited all the
    same (its files, locks and mount are released)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; bounded in time."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Shell:
    """One ``sh`` kept running: a command sent reaches the kernel within a pipe's latency,
    not a fork's and an exec's."""

    def __init__(self, **popen: object) -> None:
        self.proc = subprocess.Popen(
            ["sh"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            **popen,
        )

    def run(self, command: str) -> tuple[bool, str]:
        """Whether ``command`` succeeded, and what it printed."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"if {command}; then echo =ok; else echo =failed; fi\n")
        self.proc.stdin.flush()
        out = []
        while (line := self.proc.stdout.readline()) not in ("=ok\n", "=failed\n", ""):
            out.append(line)
        return line == "=ok\n", "".join(out).strip()

    def echo_x(self, path: Path, failures: list[str]) -> None:
        """``echo x > path``: a failure is noted in ``failures``, a success must have written."""
        ok, out = self.run(f"echo x > {path}")
        if not ok:
            failures.append(f"{path.name}: {out}")
        else:
            assert path.read_text() == "x\n", path

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@dataclass
class Mount:
    path: Path
    data_dir: Path
    args: tuple

    @property
    def pid(self) -> int:
        return int((self.path / ".dreki" / "pid").read_text())

    def log(self) -> str:
        p = self.data_dir / "drekifs.log"
        return p.read_text() if p.exists() else ""

    def umount(self) -> None:
        drekifs("umount", self.path)

    def remount(self) -> None:
        drekifs("mount", "--data-dir", self.data_dir, *self.args, self.path)


@pytest.fixture
def mount_world(tmp_path: Path):
    """mount_world(*args) mounts with those options; everything is unmounted afterwards."""
    mounts: list[Mount] = []

    def mount(*args: str | os.PathLike, name: str = "mnt", data: str | None = None) -> Mount:
        path = tmp_path / name
        data_dir = tmp_path / (data or f"{name}-data")
        m = Mount(path, data_dir, tuple(map(str, args)))
        mounts.append(m)
        m.remount()
        return m

    yield mount
    for m in mounts:
        if is_mounted(m.path):
            result = drekifs("umount", m.path, check=False)
            if result.returncode != 0:
                force_unmount(m.path)
                print(result.stderr, file=sys.stderr)
    for m in mounts:
        assert not is_mounted(m.path), f"{m.path} still mounted"
        if "Traceback" in m.log():
            pytest.fail(f"daemon log of {m.path} has a traceback:\n{m.log()}")


@pytest.fixture
def zone_file(tmp_path: Path):
    """zone_file(zone) writes a tests.worlds.Zone to a file and returns its path."""

    def write(zone, name: str = "world.zone", serial: int = 1) -> Path:
        path = tmp_path / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(zone.text(serial))
        os.replace(tmp, path)
        return path

    return write


def free_port() -> int:
    """A loopback port free for UDP and TCP both (a peer binds the two): a port only free for
    UDP may be another connection's TCP ephemeral port, and the daemon then fails to bind."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no loopback port free for both UDP and TCP in 100 tries")


class Nsd:
    """A real NSD authoritative server on a loopback port, serving one zone."""

    def __init__(self, directory: Path, zone) -> None:
        self.dir = directory
        self.zone = zone
        self.serial = 1
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.zone_path = directory / "zone"
        self.conf = directory / "nsd.conf"

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def write_zone(self) -> None:
        tmp = self.zone_path.with_suffix(".tmp")
        tmp.write_text(self.zone.text(self.serial))
        os.replace(tmp, self.zone_path)

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.write_zone()
        d = self.dir
        self.conf.write_text(
            f"""server:
    ip-address: 127.0.0.1@{self.port}
    zonesdir: "{d}"
    pidfile: "{d}/nsd.pid"
    database: ""
    username: ""
    chroot: ""
    xfrdfile: "{d}/xfrd.state"
    zonelistfile: "{d}/zone.list"
    xfrdir: "{d}"
    logfile: "{d}/nsd.log"
    server-count: 1
    verbosity: 1
remote-control:
    control-enable: no
zone:
    name: {self.zone.origin}
    zonefile: "{self.zone_path}"
"""
        )
        nsd = shutil.which("nsd") or "/usr/sbin/nsd"
        self.proc = subprocess.Popen([nsd, "-d", "-c", str(self.conf)])
        wait_for(self.answers, timeout=10, what="nsd to answer")

    def answers(self) -> bool:
        import dns.message
        import dns.query

        q = dns.message.make_query(f"{self.zone.origin}.", "SOA")
        try:
            r = dns.query.udp(q, "127.0.0.1", port=self.port, timeout=0.5)
        except Exception:
            return False
        return any(str(rr[0].serial) == str(self.serial) for rr in r.answer if rr.rdtype == 6)

    def reload(self, zone=None) -> None:
        """Serve a changed zone (new serial), and wait until nsd answers with it."""
        if zone is not None:
            self.zone = zone
        self.serial += 1
        self.write_zone()
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGHUP)
        wait_for(self.answers, timeout=10, what="nsd to serve the new zone")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def nsd(tmp_path: Path) -> Iterator:
    """nsd(zone) starts a real nsd serving ``zone``; stopped after the test."""
    servers: list[Nsd] = []

    def start(zone) -> Nsd:
        server = Nsd(tmp_path / f"nsd{len(servers)}", zone)
        servers.append(server)
        server.start()
        return server

    yield start
    for s in servers:
        with contextlib.suppress(Exception):
            s.stop()
