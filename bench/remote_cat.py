"""Benchmark: reading a 100-byte key of another node's local store, on loopback.

Two peers of one world on 127.0.0.1 (their zone gives the ports), each mounted. Node B holds a
100-byte key; through A's mount it is read:

- ``cat``: ``cat A/dc/b/local/key`` as a process, as a shell script would (includes starting
  cat, about a millisecond: printed for scale with ``cat`` of a local key);
- ``open/read``: open, read and close from Python, the request alone;

each read again and again (within 1 s A asks B nothing: B would have said it changed), and
``cat`` of a new key each time (nothing cached: one round trip to B, the lookup bringing the
value along), beside a bare Python TCP request/response of 100 bytes on loopback measured in the
same run; and both daemons' CPU time per ``cat`` of a new key (from /proc/PID/stat).
Target: remote ``cat`` p50 <= 2 ms. Run as root (mounts). Takes about a minute.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from find_world import cpu_seconds
from loopback import free_port, zone

HERE = Path(__file__).resolve().parent
DREKIFS = [sys.executable, "-m", "drekifs"]
TARGET_P50_MS = 2.0


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    s = sorted(samples)
    return (
        statistics.median(s) * 1e3,
        s[int(len(s) * 0.9)] * 1e3,
        s[min(len(s) - 1, int(len(s) * 0.99))] * 1e3,
    )


def bare_tcp(n: int) -> list[float]:
    """A 100-byte request and a 100-byte reply over one TCP connection, Nagle off."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            for _ in range(n):
                data = b""
                while len(data) < 100:
                    data += conn.recv(100 - len(data))
                conn.sendall(data)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    out = []
    with socket.create_connection(srv.getsockname()) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(n):
            t0 = time.perf_counter()
            c.sendall(b"x" * 100)
            got = b""
            while len(got) < 100:
                got += c.recv(100 - len(got))
            out.append(time.perf_counter() - t0)
    t.join(5)
    srv.close()
    return out


def timed_cat(path: Path, n: int) -> list[float]:
    """``cat`` started with posix_spawn (subprocess's own machinery costs milliseconds)."""
    cat = shutil.which("cat") or "/bin/cat"
    out = []
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        actions = [(os.POSIX_SPAWN_DUP2, devnull, 1)]
        for _ in range(n):
            t0 = time.perf_counter()
            pid = os.posix_spawn(cat, [cat, str(path)], {}, file_actions=actions)
            _, status = os.waitpid(pid, 0)
            out.append(time.perf_counter() - t0)
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit(f"cat {path} failed")
    finally:
        os.close(devnull)
    return out


def timed_read(path: Path, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        with open(path, "rb") as f:
            f.read()
        out.append(time.perf_counter() - t0)
    return out


def timed_cats(directory: Path, n: int) -> list[float]:
    """``cat`` of n different keys, each read once: nothing cached, every one asks the owner."""
    out: list[float] = []
    for i in range(n):
        out.extend(timed_cat(directory / f"k{i}", 1))
    return out


def spawn_only(n: int) -> list[float]:
    """Starting ``true`` the same way: what any command costs before it does anything."""
    true = shutil.which("true") or "/bin/true"
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        os.waitpid(os.posix_spawn(true, [true], {}), 0)
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=500)
    parser.add_argument("--check", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="drekifs-bench-remote-"))
    ports = {"a": free_port(), "b": free_port()}
    (work / "world.zone").write_text(zone("w.test", ports))
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    subprocess.run([*DREKIFS, "keygen", str(work / "ring")], check=True, env=env, timeout=30)
    mounts = {n: work / f"m{n}" for n in ports}
    try:
        for n, m in mounts.items():
            subprocess.run(
                [*DREKIFS, "mount", "--zone", str(work / "world.zone"), "--node", n,
                 "--keyring", str(work / "ring"), "--data-dir", str(work / f"d{n}"), str(m)],
                check=True, env=env, timeout=60,
            )  # fmt: skip
        remote = mounts["a"] / "dc" / "b" / "local" / "key"
        local = mounts["a"] / "dc" / "a" / "local" / "key"
        deadline = time.monotonic() + 20
        while True:  # bounded: until B answers through A, 20 s at most
            try:
                (mounts["b"] / "dc" / "b" / "local" / "key").write_bytes(os.urandom(100))
                if remote.read_bytes():
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("node b never became reachable from a")
            time.sleep(0.2)
        local.write_bytes(os.urandom(100))
        n = args.reads
        many = mounts["b"] / "dc" / "b" / "local" / "many"
        many.mkdir()
        for i in range(n):
            (many / f"k{i}").write_bytes(os.urandom(100))
        time.sleep(1.5)  # past every cache of a's
        pids = {name: int((m / ".dreki" / "pid").read_text()) for name, m in mounts.items()}
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        new_keys = timed_cats(mounts["a"] / "dc" / "b" / "local" / "many", n)
        daemon_cpu = {
            name: (cpu_seconds(pid) - cpu0[name]) / n  # type: ignore[operator]
            for name, pid in pids.items()
        }
        rows = [
            ("bare Python TCP request/response", bare_tcp(n)),
            ("open/read/close, remote key", timed_read(remote, n)),
            ("open/read/close, local key", timed_read(local, n)),
            ("cat, remote key", timed_cat(remote, n)),
            ("cat, a new remote key each time", new_keys),
            ("cat, local key", timed_cat(local, n)),
            ("starting true (no file at all)", spawn_only(n)),
        ]
    finally:
        for m in mounts.values():
            subprocess.run([*DREKIFS, "umount", str(m)], env=env, capture_output=True, timeout=60)
        shutil.rmtree(work, ignore_errors=True)

    print(f"reading a 100-byte key through node a's mount, {n} times each, ms")
    print(f"{'what':40} {'p50':>7} {'p90':>7} {'p99':>7}")
    results = {}
    for what, samples in rows:
        p50, p90, p99 = percentiles(samples)
        results[what] = p50
        print(f"{what:40} {p50:7.3f} {p90:7.3f} {p99:7.3f}")
    bare = results["bare Python TCP request/response"]
    print(f"(remote open/read over bare TCP: {results['open/read/close, remote key'] / bare:.1f}x)")
    print(
        "daemon CPU per cat of a new key: node a {:.0f} us, node b {:.0f} us".format(
            daemon_cpu["a"] * 1e6, daemon_cpu["b"] * 1e6
        )
    )
    met = True
    for what in ("cat, remote key", "cat, a new remote key each time"):
        p50 = results[what]
        ok = p50 <= TARGET_P50_MS
        met = met and ok
        print(f"[{'met' if ok else 'missed'}] {what}: p50 <= {TARGET_P50_MS} ms ({p50:.2f} ms)")
    return 1 if args.check and not met else 0


if __name__ == "__main__":
    sys.exit(main())
