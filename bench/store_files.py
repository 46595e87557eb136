#!/usr/bin/env python3
"""Benchmark: small files in the stores — ``tar c`` and ``cp -a`` of 5,000 keys, daemon RSS.

The speed targets of the stores issue, side by side in one run and printed as ratios:

1. ``tar c`` of 5,000 small files (50 directories of 100 files, 100-2,000 random bytes) with the
   kernel's caches cold (a fresh mount, then ``echo 3 > /proc/sys/vm/drop_caches``), piped
   through ``wc -c`` so that every byte is really read: drekifs (the tree in its global store and
   in its node's local store) against bench/floorfs.py serving the same files from a dict (the
   floor of any pyfuse3 filesystem), pyfuse3's own example ``examples/tmpfs.py`` (fetched from
   the pyfuse3 sdist on PyPI) and kernel tmpfs.
2. ``cp -a`` of the same tree from tmpfs into drekifs, into bench/floorfs.py ``--writable`` (the
   floor of a copy into a pyfuse3 filesystem answering as drekifs must), into the pyfuse3
   example and into kernel tmpfs.
3. The daemon's memory (VmRSS, VmHWM) with 100,000 keys in its global store, written through the
   mount, walked with ``find`` and read with ``tar c``; again after a remount.

    python bench/store_files.py [--rounds N] [--keys N] [--samples] [--check]

Run as root (mount, tmpfs, drop_caches). bench/README.md explains the output. Everything it
mounts, starts or creates is removed at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import random
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import find_world as fw
from find_world import BenchError, Counts

HERE = Path(__file__).resolve().parent
FLOORFS = HERE / "floorfs.py"

TREE = "tree"  # the copied directory: SOURCE/tree, MOUNT/global/tree, ...
DIRS = 50
FILES_PER_DIR = 100
MIN_SIZE, MAX_SIZE = 100, 2000
SEED = 3

NODE = "eu/fr/ovh/sbg1/node1"  # the demo world's first node: its local store is served here
RSS_DIRS = 100
DEFAULT_KEYS = 100_000

TARGET_FLOOR = 1.2  # drekifs's cold tar within 1.2x of the floor
TARGET_EXAMPLE = 1.5  # drekifs >= 1.5x faster than pyfuse3's tmpfs example (tar and cp -a)
TARGET_RSS_MIB = 150.0

MOUNT_TIMEOUT = fw.MOUNT_TIMEOUT
UNMOUNT_TIMEOUT = fw.UNMOUNT_TIMEOUT
TAR_TIMEOUT = 300.0
CP_TIMEOUT = 600.0
WRITE_TIMEOUT = 3600.0  # 100,000 keys through the mount
WALK_TIMEOUT = 1800.0  # find and tar over 100,000 keys
DOWNLOAD_TIMEOUT = 300.0
ON_DISK_TIMEOUT = 120.0
FORGET_PAUSE = 0.5  # after drop_caches: the kernel's FORGETs reach the daemons first

COLD = "cold"
WARM = "warm"
COLD_DISK = "cold, store file cold"  # drekifs: fresh mount, LMDB file not in page cache

TMPFS, FLOOR, EXAMPLE = "tmpfs", "floor", "example"
CP_FLOOR = "floor (writable)"  # floorfs --writable: the floor of a cp -a
# The same two with drekifs's request loop (floorfs --drekifs-loop): what the handlers cost
# beside the loop's gain. Not a target: the issue's floor is pyfuse3's own loop.
FLOOR_LOOP, CP_FLOOR_LOOP = "floor, drekifs loop", "floor (writable), drekifs loop"
DREKI_GLOBAL, DREKI_LOCAL = "drekifs global", "drekifs local"


# -- the tree ---------------------------------------------------------------------------------


def write_tree(root: Path, dirs: int, per_dir: int, seed: int) -> int:
    """``dirs`` directories of ``per_dir`` files of MIN_SIZE..MAX_SIZE random bytes under
    ``root`` (created); plain open/write/close, as a script would. Returns the bytes written."""
    rng = random.Random(seed)
    total = 0
    root.mkdir(parents=True, exist_ok=True)
    for d in range(dirs):
        directory = root / f"d{d:03d}"
        directory.mkdir()
        for f in range(per_dir):
            data = rng.randbytes(rng.randint(MIN_SIZE, MAX_SIZE))
            fd = os.open(directory / f"k{f:04d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            total += len(data)
    return total


# -- processes ----------------------------------------------------------------------------------


def timed(cmd: list[str], timeout: float) -> tuple[float, str]:
    """Run ``cmd`` in its own session; seconds it took and its stdout. A timeout, a failure or
    an interruption (Ctrl-C, SIGTERM) kills the whole process group first."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd="/",
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as e:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=UNMOUNT_TIMEOUT)
        if isinstance(e, subprocess.TimeoutExpired):
            raise BenchError(f"{' '.join(cmd)}: not done after {timeout:.0f} s") from None
        raise
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        text = err.decode(errors="replace").strip()[-2000:]
        raise BenchError(f"{' '.join(cmd)} failed ({proc.returncode}): {text}")
    return elapsed, out.decode(errors="replace")


def tar_command(parent: Path, name: str = TREE) -> list[str]:
    """``tar c`` of ``parent/name`` into a pipe (GNU tar skips reading the files when it writes
    to /dev/null itself); prints the size of the archive."""
    script = 'set -o pipefail; tar cf - -C "$1" "$2" | wc -c'
    return ["bash", "-c", script, "tar", str(parent), name]


def cp_command(source: Path, dest: Path) -> list[str]:
    return ["cp", "-a", str(source / TREE), str(dest) + "/"]


def wait_mounted(path: Path, alive: Callable[[], bool], timeout: float) -> None:
    """Until ``path`` is a mount point that answers ``stat`` (bounded), while ``alive()``."""
    deadline = time.monotonic() + timeout
    while not fw.is_mounted(path):
        if not alive():
            raise BenchError(f"the server of {path} exited before mounting")
        if time.monotonic() > deadline:
            raise BenchError(f"{path} not mounted after {timeout:.0f} s")
        time.sleep(0.02)
    fw.run(["stat", str(path)], timeout)


def status_fields(pid: int) -> dict[str, int]:
    """The kB fields of ``/proc/PID/status`` (VmRSS, VmHWM, RssAnon, RssFile, ...)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0])
    return out


# -- the filesystems ----------------------------------------------------------------------------


class Server:
    """A filesystem mounted at ``self.mountpoint`` for a while."""

    name = ""

    def __init__(self, work: Path, name: str) -> None:
        self.work = work
        self.mountpoint = work / "mnt" / name
        self.mountpoint.mkdir(parents=True, exist_ok=True)

    @property
    def pid(self) -> int | None:
        """The process serving the FUSE requests; None when not a FUSE filesystem."""
        return None

    def counts(self) -> Counts | None:
        """Cumulative FUSE requests per operation; None when not counted."""
        return None

    def unmount(self) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        """Unmount whatever is left, stop what was started; best effort, never raises."""
        fw.force_unmount(self.mountpoint)


class KernelTmpfs(Server):
    """Kernel tmpfs: what the work costs with no FUSE at all."""

    def mount(self) -> None:
        opts = "size=1g,mode=0755"
        fw.run(["mount", "-t", "tmpfs", "-o", opts, "drekifs-bench", str(self.mountpoint)], 30)

    def unmount(self) -> None:
        if fw.run(["umount", str(self.mountpoint)], UNMOUNT_TIMEOUT, check=False).returncode:
            fw.force_unmount(self.mountpoint)


class Process(Server):
    """A FUSE server this benchmark runs as a child process, with its log in the work dir."""

    def __init__(self, work: Path, name: str) -> None:
        super().__init__(work, name)
        self.log = work / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _start(self, cmd: list[str]) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd="/",
                start_new_session=True,  # Ctrl-C is ours to handle: we stop it
            )
        return self.proc

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def unmount(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            fw.run(["fusermount3", "-u", str(self.mountpoint)], UNMOUNT_TIMEOUT, check=False)
            try:
                proc.wait(timeout=UNMOUNT_TIMEOUT)
            except subprocess.TimeoutExpired:
                fw.stop_process(proc.pid)
                proc.wait(timeout=UNMOUNT_TIMEOUT)
        finally:
            if proc.stdout:
                proc.stdout.close()
            fw.force_unmount(self.mountpoint)

    def cleanup(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                fw.stop_process(proc.pid)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=UNMOUNT_TIMEOUT)
            if proc.stdout:
                proc.stdout.close()
        fw.force_unmount(self.mountpoint)


class Floor(Process):
    """bench/floorfs.py serving a copy of the source directory; counters dumped on SIGUSR1."""

    def __init__(
        self, work: Path, source: Path, *, writable: bool = False, drekifs_loop: bool = False
    ) -> None:
        name = "floor-writable" if writable else FLOOR
        super().__init__(work, f"{name}-loop" if drekifs_loop else name)
        self.source = source
        self.writable = writable
        self.drekifs_loop = drekifs_loop
        self.counts_file = work / f"{self.mountpoint.name}-counts.json"
        self.seq = 0

    def mount(self) -> None:
        self.counts_file.unlink(missing_ok=True)
        self.seq = 0
        cmd = [sys.executable, str(FLOORFS), str(self.source), str(self.mountpoint)]
        cmd += ["--counts", str(self.counts_file)] + (["--writable"] if self.writable else [])
        cmd += ["--drekifs-loop"] if self.drekifs_loop else []
        proc = self._start(cmd)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], MOUNT_TIMEOUT)
        line = proc.stdout.readline() if ready else b""
        if not line.startswith(b"ready"):
            raise BenchError(
                f"floorfs did not serve within {MOUNT_TIMEOUT:.0f} s: {self.log_tail()}"
            )

    def counts(self) -> Counts:
        """The counters once they stop moving (RELEASEs arrive after the reader has exited)."""
        last = self._dump()
        deadline = time.monotonic() + fw.COUNTS_TIMEOUT
        while time.monotonic() < deadline:
            time.sleep(0.02)
            now = self._dump()
            if now == last:
                return now
            last = now
        raise BenchError(f"floorfs counters still moving after {fw.COUNTS_TIMEOUT:.0f} s")

    def _dump(self) -> Counts:
        assert self.proc is not None
        self.seq += 1
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + fw.COUNTS_TIMEOUT
        while time.monotonic() < deadline:
            try:
                data = json.loads(self.counts_file.read_text())
                if data["seq"] >= self.seq:
                    return data["counts"]
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.002)
        raise BenchError(f"floorfs wrote no counters within {fw.COUNTS_TIMEOUT:.0f} s")


class Example(Process):
    """pyfuse3's examples/tmpfs.py, run as its docstring says: ``tmpfs.py MOUNTPOINT``."""

    def __init__(self, work: Path, script: Path) -> None:
        super().__init__(work, EXAMPLE)
        self.script = script

    def mount(self) -> None:
        proc = self._start([sys.executable, str(self.script), str(self.mountpoint)])
        try:
            wait_mounted(self.mountpoint, lambda: proc.poll() is None, MOUNT_TIMEOUT)
        except BenchError as e:
            raise BenchError(f"{e}: {self.log_tail()}") from None


class Drekifs(Server):
    """``drekifs mount --node node1 --data-dir DIR`` of the bundled demo world."""

    def __init__(self, work: Path, name: str = "drekifs") -> None:
        super().__init__(work, name)
        self.data_dir: Path | None = None
        self._pid: int | None = None

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def global_dir(self) -> Path:
        return self.mountpoint / "global"

    @property
    def local_dir(self) -> Path:
        return self.mountpoint / NODE / "local"

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "drekifs", *args]

    def mount(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        cmd = ["mount", "--node", NODE, "--data-dir", str(data_dir), str(self.mountpoint)]
        try:
            fw.run(self.command(*cmd), MOUNT_TIMEOUT)
        except BenchError as e:
            raise BenchError(f"{e}: {self.log_tail()}") from None
        self._pid = int((self.mountpoint / ".dreki" / "pid").read_text())

    def log_tail(self) -> str:
        if self.data_dir is None:
            return ""
        try:
            return (self.data_dir / "drekifs.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def counts(self) -> Counts:
        text = (self.mountpoint / ".dreki" / "requests").read_text()
        return {op: int(n) for op, n in (line.split() for line in text.splitlines())}

    def wait_on_disk(self) -> float | None:
        """Seconds until ``.dreki/stores`` shows no change waiting for the disk (bounded);
        None when the file does not say (no ``unsynced=`` field)."""
        start = time.perf_counter()
        deadline = time.monotonic() + ON_DISK_TIMEOUT
        while True:
            text = (self.mountpoint / ".dreki" / "stores").read_text()
            if "unsynced=" not in text:
                return None
            if all(" unsynced=0 " in line for line in text.splitlines() if line):
                return time.perf_counter() - start
            if time.monotonic() > deadline:
                raise BenchError(f"drekifs: changes not on disk after {ON_DISK_TIMEOUT:.0f} s")
            time.sleep(0.01)

    def warm_store_files(self) -> None:
        """Read the LMDB files, so that they are in the page cache as a running daemon's are."""
        assert self.data_dir is not None
        for path in sorted((self.data_dir / "stores").rglob("*.mdb")):
            with open(path, "rb") as f:
                while f.read(1 << 20):
                    pass

    def unmount(self) -> None:
        pid, self._pid = self._pid, None
        fw.run(
            self.command("umount", "--timeout", str(UNMOUNT_TIMEOUT), str(self.mountpoint)),
            UNMOUNT_TIMEOUT + 10,
        )
        if pid is not None and fw._alive(pid):
            raise BenchError(f"drekifs daemon {pid} still runs after drekifs umount")

    def cleanup(self) -> None:
        if fw.is_mounted(self.mountpoint):
            fw.run(
                self.command("umount", "--timeout", str(UNMOUNT_TIMEOUT), str(self.mountpoint)),
                UNMOUNT_TIMEOUT + 10,
                check=False,
            )
        fw.force_unmount(self.mountpoint)
        if self._pid is not None:
            fw.stop_process(self._pid)
            self._pid = None


# -- the pyfuse3 example ------------------------------------------------------------------------


def fetch_example(work: Path) -> tuple[Path, str]:
    """examples/tmpfs.py of the installed pyfuse3 version, from its sdist on PyPI."""
    version = importlib.metadata.version("pyfuse3")
    into = work / "sdist"
    into.mkdir()
    fw.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"pyfuse3=={version}",
            "-d",
            str(into),
        ],
        DOWNLOAD_TIMEOUT,
    )
    archives = sorted(into.glob("pyfuse3-*.tar.gz"))
    if not archives:
        raise BenchError(f"pip download left no pyfuse3 sdist in {into}")
    with tarfile.open(archives[0]) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("examples/tmpfs.py")), None)
        f = tar.extractfile(member) if member is not None else None
        if f is None:
            raise BenchError(f"{archives[0].name} holds no examples/tmpfs.py")
        script = work / "tmpfs.py"
        script.write_bytes(f.read())
    return script, f"{archives[0].name}: examples/tmpfs.py"


# -- measuring ------------------------------------------------------------------------------------


@dataclass
class Series:
    """One measurement repeated: seconds, the FUSE server's CPU seconds, its requests."""

    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    requests: list[Counts] = field(default_factory=list)
    overhead: list[Counts] = field(default_factory=list)  # reading drekifs's counters
    extra: list[float] = field(default_factory=list)  # drekifs cp: seconds until on disk

    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    def median_cpu(self) -> float | None:
        return statistics.median(self.cpu) if self.cpu else None

    def median_requests(self) -> Counts:
        ops = {op for c in self.requests for op in c}
        return {op: round(statistics.median(c.get(op, 0) for c in self.requests)) for op in ops}


Results = dict[tuple[str, str], Series]  # (what, target) -> series; what: "tar cold", "cp", ...


def measure(server: Server, cmd: list[str], timeout: float, series: Series) -> str:
    """Run ``cmd`` once; record its time, and the FUSE server's requests and CPU time.

    Counters are read before, after, and once more right after: the second difference is
    exactly the cost of two readings (drekifs counts its own ``.dreki/requests``), subtracted.
    """
    pid = server.pid
    before = server.counts()
    cpu0 = fw.cpu_seconds(pid)
    elapsed, out = timed(cmd, timeout)
    series.times.append(elapsed)
    after = server.counts()
    cpu1 = fw.cpu_seconds(pid)
    again = server.counts()
    cpu2 = fw.cpu_seconds(pid)
    if before is not None and after is not None and again is not None:
        overhead = fw.difference(again, after)
        series.overhead.append(overhead)
        series.requests.append(fw.difference(fw.difference(after, before), overhead))
    if cpu0 is not None and cpu1 is not None and cpu2 is not None:
        series.cpu.append((cpu1 - cpu0) - (cpu2 - cpu1))
    return out


T = TypeVar("T")


def rotate(items: list[T], first: int) -> list[T]:
    """``items`` starting at ``first`` (modulo their number), the ones before it at the end."""
    first %= len(items)
    return items[first:] + items[:first]


@dataclass
class Bench:
    """Everything one run mounts and measures."""

    work: Path
    source: Path  # tmpfs holding SOURCE/tree
    example_script: Path
    rounds: int
    results: Results = field(default_factory=dict)
    tar_bytes: int | None = None

    def series(self, what: str, target: str) -> Series:
        return self.results.setdefault((what, target), Series())

    def check_tar(self, out: str, target: str) -> None:
        """Every tar of the tree is the same size: each filesystem served the same bytes."""
        size = int(out.strip())
        if self.tar_bytes is None:
            self.tar_bytes = size
        elif size != self.tar_bytes:
            raise BenchError(f"tar of {target}: {size} bytes, {self.tar_bytes} elsewhere")

    def one_round(self, r: int) -> None:
        """Fresh mounts; cp -a into each writable target; remount drekifs; then a cold and a
        warm tar of each target. The order of the targets turns from round to round."""
        work = self.work
        tmpfs = KernelTmpfs(work, TMPFS)
        example = Example(work, self.example_script)
        floor = Floor(work, self.source)
        floor_loop = Floor(work, self.source, drekifs_loop=True)
        empty = work / "empty"
        empty.mkdir(exist_ok=True)
        cp_floor = Floor(work, empty, writable=True)
        cp_floor_loop = Floor(work, empty, writable=True, drekifs_loop=True)
        dreki = Drekifs(work)
        data_dir = work / f"drekifs-data-{r}"
        mounted: list[Server] = []
        try:
            tmpfs.mount()
            mounted.append(tmpfs)
            example.mount()
            mounted.append(example)
            cp_floor.mount()
            mounted.append(cp_floor)
            cp_floor_loop.mount()
            mounted.append(cp_floor_loop)
            dreki.mount(data_dir)
            mounted.append(dreki)

            # cp -a into each writable target.
            cp_dest: dict[str, tuple[Server, Path]] = {
                TMPFS: (tmpfs, tmpfs.mountpoint),
                CP_FLOOR: (cp_floor, cp_floor.mountpoint),
                CP_FLOOR_LOOP: (cp_floor_loop, cp_floor_loop.mountpoint),
                EXAMPLE: (example, example.mountpoint),
                DREKI_GLOBAL: (dreki, dreki.global_dir),
                DREKI_LOCAL: (dreki, dreki.local_dir),
            }
            for name in rotate(list(cp_dest), r):
                server, dest = cp_dest[name]
                series = self.series("cp", name)
                measure(server, cp_command(self.source, dest), CP_TIMEOUT, series)
                if server is dreki:  # its writer is done before the next copy starts
                    on_disk = dreki.wait_on_disk()
                    if on_disk is not None:
                        series.extra.append(on_disk)

            # Cold: a fresh mount (drekifs remounted, the floor started), then drop_caches.
            dreki.unmount()
            mounted.remove(dreki)
            dreki.mount(data_dir)
            mounted.append(dreki)
            floor.mount()
            mounted.append(floor)
            floor_loop.mount()
            mounted.append(floor_loop)
            tar_at: dict[str, tuple[Server, Path]] = {
                TMPFS: (tmpfs, tmpfs.mountpoint),
                FLOOR: (floor, floor.mountpoint),
                FLOOR_LOOP: (floor_loop, floor_loop.mountpoint),
                EXAMPLE: (example, example.mountpoint),
                DREKI_GLOBAL: (dreki, dreki.global_dir),
                DREKI_LOCAL: (dreki, dreki.local_dir),
            }
            runs = [(name, COLD) for name in tar_at] + [(DREKI_GLOBAL, COLD_DISK)]
            for name, kind in rotate(runs, r):
                server, parent = tar_at[name]
                if kind == COLD_DISK:
                    # drop_caches spares the pages a process maps: only a new daemon, which has
                    # mapped none of its LMDB file yet, lets the drop take the file out.
                    dreki.unmount()
                    mounted.remove(dreki)
                    dreki.mount(data_dir)
                    mounted.append(dreki)
                if not fw.drop_caches():
                    raise BenchError("cannot write /proc/sys/vm/drop_caches (run as root)")
                if server is dreki and kind == COLD:
                    dreki.warm_store_files()
                time.sleep(FORGET_PAUSE)
                out = measure(server, tar_command(parent), TAR_TIMEOUT, self.series(kind, name))
                self.check_tar(out, name)
                if kind == COLD:  # warm: the same again at once
                    out = measure(server, tar_command(parent), TAR_TIMEOUT, self.series(WARM, name))
                    self.check_tar(out, name)
            if r == 0:  # every copy is the source, the writable floor's included
                copies = {name: parent for name, (_, parent) in tar_at.items()}
                copies[CP_FLOOR] = cp_floor.mountpoint
                copies[CP_FLOOR_LOOP] = cp_floor_loop.mountpoint
                for name, parent in copies.items():
                    compare_with_source(parent, self.source, name)
        finally:
            errors = []
            for s in reversed(mounted):
                try:
                    s.unmount()
                except BenchError as e:
                    errors.append(e)
            for s in (tmpfs, example, floor, floor_loop, cp_floor, cp_floor_loop, dreki):
                s.cleanup()
            shutil.rmtree(data_dir, ignore_errors=True)
        if errors:  # reached only when no other error is on its way
            raise errors[0]


def same_loop(results: dict[tuple[str, str], Series], kind: str, floor: str) -> None:
    """drekifs against the floor run with drekifs's request loop: its handlers alone."""
    base = results.get((kind, floor))
    if base is None:
        return
    parts = []
    for target in (DREKI_GLOBAL, DREKI_LOCAL):
        s = results.get((kind, target))
        if s is not None:
            parts.append(
                f"{target} {fmt_ratio(paired_of(s, base))} (CPU {fmt_ratio(paired_cpu(s, base))})"
            )
    print(f"against '{floor}', the same request loop, paired: " + ", ".join(parts))


def compare_with_source(parent: Path, source: Path, name: str) -> None:
    """``tar c`` of the copy, ``tar d`` against the source: same names, kinds, modes, owners,
    times and bytes (checked once, after the timed runs)."""
    script = 'set -o pipefail; tar cf - -C "$1" "$3" | tar df - -C "$2"'
    result = fw.run(
        ["bash", "-c", script, "tar", str(parent), str(source), TREE], TAR_TIMEOUT, check=False
    )
    if result.returncode != 0 or result.stdout.strip():
        text = (result.stdout + result.stderr).strip().splitlines()[:5]
        raise BenchError(f"{name}: the tree differs from the source: {text}")


# -- daemon memory ------------------------------------------------------------------------------


@dataclass
class MemoryStep:
    step: str
    seconds: float | None
    fields: dict[str, int]
    store_bytes: int | None = None  # the global store's LMDB file


def memory_phase(work: Path, keys: int) -> list[MemoryStep]:
    """``keys`` keys written through the mount into the global store, walked and read; then a
    remount, walked and read again; the daemon's memory after each step."""
    dreki = Drekifs(work, "drekifs-rss")
    data_dir = work / "drekifs-rss-data"
    root = dreki.global_dir / "rss"
    steps: list[MemoryStep] = []
    per_dir = -(-keys // RSS_DIRS)

    def note(step: str, seconds: float | None) -> None:
        assert dreki.pid is not None
        try:
            size: int | None = (data_dir / "stores" / "global" / "data.mdb").stat().st_size
        except OSError:
            size = None
        steps.append(MemoryStep(step, seconds, status_fields(dreki.pid), size))

    def walk_and_read(when: str) -> None:
        seconds, _ = timed(["find", str(root), "-type", "f", "-printf", "."], WALK_TIMEOUT)
        note(f"{when}: find over every key", seconds)
        seconds, out = timed(tar_command(dreki.global_dir, root.name), WALK_TIMEOUT)
        note(f"{when}: tar c of every key ({int(out) >> 20} MiB)", seconds)

    try:
        dreki.mount(data_dir)
        note("mounted, empty stores", None)
        writer = [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); import store_files as s; "
            "s.write_tree(s.Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), 7)",
            str(HERE),
            str(root),
            str(RSS_DIRS),
            str(per_dir),
        ]
        seconds, _ = timed(writer, WRITE_TIMEOUT)
        note(f"{RSS_DIRS * per_dir:,} keys written ({RSS_DIRS * per_dir / seconds:.0f}/s)", seconds)
        note("all of it on disk", dreki.wait_on_disk())
        walk_and_read("first mount")
        dreki.unmount()
        dreki.mount(data_dir)
        note("remounted", None)
        walk_and_read("remounted")
        dreki.unmount()
    finally:
        dreki.cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)
    return steps


# -- the report ---------------------------------------------------------------------------------


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def ratio_of(a: Series | None, b: Series | None) -> float | None:
    if a is None or b is None:
        return None
    x, y = a.median(), b.median()
    return None if x is None or not y else x / y


def paired_of(a: Series | None, b: Series | None) -> float | None:
    """Median of a[i] / b[i]: the samples of one round, taken minutes apart at most."""
    if a is None or b is None:
        return None
    return fw.paired(a.times, b.times)


def paired_cpu(a: Series | None, b: Series | None) -> float | None:
    """Median of the per-round ratios of the FUSE servers' CPU times."""
    if a is None or b is None:
        return None
    return fw.paired(a.cpu, b.cpu)


def spread(s: Series | None) -> str:
    """Slowest sample over fastest: how noisy the machine was."""
    if s is None or not s.times or not min(s.times):
        return "-"
    return f"{max(s.times) / min(s.times):.1f}x"


def request_table(results: Results, rows: list[tuple[str, str]], per: int) -> str:
    medians = {key: results[key].median_requests() for key in rows if key in results}
    ops = fw.ordered_ops(medians.values())
    table = [["run", "fs", *ops, "per file", "total"]]
    for (what, target), m in medians.items():
        total = sum(m.values())
        table.append(
            [
                what,
                target,
                *(f"{m.get(op, 0) / per:.2f}" for op in ops),
                f"{total / per:.2f}",
                str(total),
            ]
        )
    return fw.table(table, left=2)


def overhead_note(series: list[Series]) -> str:
    """What reading drekifs's counters costs, as subtracted from its series."""
    costs = [o for s in series for o in s.overhead if o]
    if not costs:
        return ""
    cost = costs[-1]
    text = ", ".join(f"{op} {cost[op]}" for op in fw.ordered_ops([cost]))
    varied = sorted({str(o) for o in costs if o != cost})
    seen = "always the same" if not varied else "also seen: " + ", ".join(varied)
    return f"(reading drekifs's .dreki/requests costs {text}: measured and subtracted; {seen})"


def mib(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.1f}"


def report(
    results: Results, memory: list[MemoryStep] | None, rounds: int, keys: int
) -> list[tuple[bool, str]]:
    """Print the tables; the targets as (met, text)."""
    n_files = DIRS * FILES_PER_DIR
    verdicts: list[tuple[bool, str]] = []
    get = results.get

    print()
    print(
        f"`tar cf - tree | wc -c` of {n_files:,} files in {DIRS} directories, ms "
        f"(median of {rounds}); cold: fresh mount + drop_caches"
    )
    rows = [
        [
            "fs",
            "cold",
            "warm",
            "cold/floor",
            "paired",
            "example/cold",
            "paired",
            "server CPU cold",
            "CPU/floor",
            "us/request",
            "spread",
        ]
    ]
    tar_rows = [
        (TMPFS, COLD),
        (FLOOR, COLD),
        (FLOOR_LOOP, COLD),
        (EXAMPLE, COLD),
        (DREKI_GLOBAL, COLD),
        (DREKI_LOCAL, COLD),
        (DREKI_GLOBAL, COLD_DISK),
    ]
    floor_cold, example_cold = get((COLD, FLOOR)), get((COLD, EXAMPLE))
    for target, kind in tar_rows:
        s = get((kind, target))
        if s is None:
            continue
        warm = get((WARM, target)) if kind == COLD else None
        cpu = s.median_cpu()
        n_req = sum(s.median_requests().values())
        label = target if kind == COLD else f"{target} ({kind})"
        rows.append(
            [
                label,
                fw.ms(s.median()),
                fw.ms(warm.median()) if warm else "",
                fmt_ratio(ratio_of(s, floor_cold)),
                fmt_ratio(paired_of(s, floor_cold)),
                fmt_ratio(ratio_of(example_cold, s)),
                fmt_ratio(paired_of(example_cold, s)),
                fw.ms(cpu),
                fmt_ratio(paired_cpu(s, floor_cold)),
                f"{cpu * 1e6 / n_req:.0f}" if cpu is not None and n_req else "-",
                spread(s),
            ]
        )
    print(fw.table(rows))
    print(
        "(cold/floor: drekifs's time over the floor's; example/cold: how many times faster than "
        "pyfuse3's tmpfs example; paired: median of the per-round ratios; CPU/floor: the same "
        "for the FUSE server's CPU time (paired); spread: slowest cold sample over fastest. "
        "The drekifs rows "
        "read its LMDB files into the page cache after drop_caches, as a running daemon has "
        f"them; '{COLD_DISK}': remounted and dropped right before, the LMDB file read from "
        "disk)"
    )
    same_loop(results, COLD, FLOOR_LOOP)

    print()
    print(f"FUSE requests per file during one tar ({n_files:,} files, {DIRS + 1} directories)")
    req_rows = [
        (kind, target)
        for target in (FLOOR, DREKI_GLOBAL, DREKI_LOCAL)
        for kind in (COLD, WARM, COLD_DISK)
    ]
    print(request_table(results, req_rows, n_files))
    note = overhead_note([results[k] for k in req_rows if k in results and k[1] != FLOOR])
    if note:
        print(note)

    print()
    print(f"`cp -a tree DEST/` from tmpfs, ms (median of {rounds}; each into an empty filesystem)")
    rows = [
        [
            "into",
            "time",
            "this/floor",
            "example/this",
            "paired",
            "server CPU",
            "us/request",
            "on disk",
            "spread",
        ]
    ]
    cp_example, cp_floor = get(("cp", EXAMPLE)), get(("cp", CP_FLOOR))
    for target in (TMPFS, CP_FLOOR, CP_FLOOR_LOOP, EXAMPLE, DREKI_GLOBAL, DREKI_LOCAL):
        s = get(("cp", target))
        if s is None:
            continue
        cpu = s.median_cpu()
        n_req = sum(s.median_requests().values())
        rows.append(
            [
                target,
                fw.ms(s.median()),
                fmt_ratio(paired_of(s, cp_floor)),
                fmt_ratio(ratio_of(cp_example, s)),
                fmt_ratio(paired_of(cp_example, s)),
                fw.ms(cpu),
                f"{cpu * 1e6 / n_req:.0f}" if cpu is not None and n_req else "-",
                f"+{fw.ms(statistics.median(s.extra))}" if s.extra else "",
                spread(s),
            ]
        )
    print(fw.table(rows))
    print(
        "(this/floor: paired ratio of the time to the writable floor's, bench/floorfs.py "
        "--writable, which answers cp -a's requests as drekifs must (xattrs, no writeback cache) "
        "with a dict update each: example/floor is the most any such filesystem can reach; "
        "on disk: ms after cp returned until drekifs's .dreki/stores shows no change waiting "
        "for LMDB's fsync; not in the time)"
    )
    same_loop(results, "cp", CP_FLOOR_LOOP)
    print()
    print("FUSE requests per file during one cp -a")
    cp_rows = [("cp", CP_FLOOR), ("cp", DREKI_GLOBAL), ("cp", DREKI_LOCAL)]
    print(request_table(results, cp_rows, n_files))
    note = overhead_note([results[k] for k in (("cp", DREKI_GLOBAL),) if k in results])
    if note:
        print(note)

    if memory is not None:
        print()
        print(f"drekifs daemon memory with {keys:,} keys in its global store, MiB")
        rows = [["step", "s", "VmRSS", "VmHWM", "RssAnon", "RssFile", "store file"]]
        for m in memory:
            f = m.fields
            rows.append(
                [
                    m.step,
                    "" if m.seconds is None else f"{m.seconds:.1f}",
                    mib(f.get("VmRSS")),
                    mib(f.get("VmHWM")),
                    mib(f.get("RssAnon")),
                    mib(f.get("RssFile")),
                    "-" if m.store_bytes is None else mib(m.store_bytes // 1024),
                ]
            )
        print(fw.table(rows))
        print(
            "(RssFile is mostly LMDB's memory map: pages of the store file the daemon has "
            "read, shared with the page cache; RssAnon is the daemon's own heap; store file: "
            "the size of the global store's data.mdb)"
        )

    # The targets.
    for target in (DREKI_GLOBAL, DREKI_LOCAL):
        s = get((COLD, target))
        p = paired_of(s, floor_cold)
        verdicts.append(
            (
                p is not None and p <= TARGET_FLOOR,
                f"tar c, cold: {target} within {TARGET_FLOOR}x of the floor "
                f"(paired {fmt_ratio(p)}, medians {fmt_ratio(ratio_of(s, floor_cold))}; "
                f"server CPU {fmt_ratio(paired_cpu(s, floor_cold))})",
            )
        )
    for target in (DREKI_GLOBAL, DREKI_LOCAL):
        s = get((COLD, target))
        p = paired_of(example_cold, s)
        verdicts.append(
            (
                p is not None and p >= TARGET_EXAMPLE,
                f"tar c, cold: {target} >= {TARGET_EXAMPLE}x faster than pyfuse3's tmpfs "
                f"example (paired {fmt_ratio(p)}, medians {fmt_ratio(ratio_of(example_cold, s))})",
            )
        )
    for target in (DREKI_GLOBAL, DREKI_LOCAL):
        s = get(("cp", target))
        p = paired_of(cp_example, s)
        verdicts.append(
            (
                p is not None and p >= TARGET_EXAMPLE,
                f"cp -a: into {target} >= {TARGET_EXAMPLE}x faster than into pyfuse3's tmpfs "
                f"example (paired {fmt_ratio(p)}, medians {fmt_ratio(ratio_of(cp_example, s))})",
            )
        )
    if memory is not None:
        peak_rss = max(m.fields.get("VmRSS", 0) for m in memory)
        peak_hwm = max(m.fields.get("VmHWM", 0) for m in memory)
        peak_anon = max(m.fields.get("RssAnon", 0) for m in memory)
        peak_file = max(m.fields.get("RssFile", 0) for m in memory)
        verdicts.append(
            (
                max(peak_rss, peak_hwm) <= TARGET_RSS_MIB * 1024,
                f"daemon memory with {keys:,} global keys <= {TARGET_RSS_MIB:.0f} MiB "
                f"(largest VmRSS {mib(peak_rss)} MiB, VmHWM {mib(peak_hwm)} MiB; of which "
                f"RssAnon at most {mib(peak_anon)} MiB, RssFile {mib(peak_file)} MiB)",
            )
        )
    return verdicts


def print_samples(results: Results) -> None:
    print()
    print("Samples, ms")
    for (what, target), s in sorted(results.items()):
        print(f"  {what:22} {target:15} {' '.join(fw.ms(t) for t in s.times)}")


# -- main -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def source_tree(work: Path) -> Iterator[Path]:
    """A tmpfs holding the tree to copy and to serve, at ``work/src``."""
    src = work / "src"
    src.mkdir()
    fw.run(["mount", "-t", "tmpfs", "-o", "size=256m", "drekifs-bench-src", str(src)], 30)
    try:
        write_tree(src / TREE, DIRS, FILES_PER_DIR, SEED)
        yield src
    finally:
        if fw.run(["umount", str(src)], UNMOUNT_TIMEOUT, check=False).returncode:
            fw.force_unmount(src)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rounds", type=int, default=5, help="rounds of cp -a and tar on every target (default 5)"
    )
    parser.add_argument(
        "--keys",
        type=int,
        default=DEFAULT_KEYS,
        help=f"keys for the daemon memory test (default {DEFAULT_KEYS:,}; 0 skips it)",
    )
    parser.add_argument(
        "--example",
        type=Path,
        metavar="TMPFS_PY",
        help="pyfuse3's examples/tmpfs.py (default: fetched from the pyfuse3 sdist on PyPI)",
    )
    parser.add_argument("--samples", action="store_true", help="print every sample")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is not met")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("store_files: run as root (it mounts tmpfs and FUSE filesystems)", file=sys.stderr)
        return 2
    if args.rounds < 1 or args.keys < 0:
        parser.error("--rounds must be at least 1 and --keys at least 0")
    # SIGTERM unwinds like Ctrl-C, through every finally below.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    work = Path(tempfile.mkdtemp(prefix="drekifs-bench-files-"))
    try:
        if args.example is not None:
            script, origin = args.example.resolve(), str(args.example)
        else:
            script, origin = fetch_example(work)
        with source_tree(work) as src:
            n_files = DIRS * FILES_PER_DIR
            size = fw.run(["du", "-sh", str(src / TREE)], 60).stdout.split()[0]
            print(
                f"tree: {n_files:,} files of {MIN_SIZE}-{MAX_SIZE} random bytes in {DIRS} "
                f"directories, {size} on tmpfs"
            )
            print(f"pyfuse3 {importlib.metadata.version('pyfuse3')}; example: {origin}")
            print(f"drekifs {source_version()}")
            print(
                f"drekifs: demo world, --node {NODE}; global: MOUNT/global/{TREE}, "
                f"local: MOUNT/{NODE}/local/{TREE}; data dir on {fs_type(work)} ({work})"
            )
            print(
                "floor: bench/floorfs.py serving a copy of the source from a dict; "
                "same FUSE options as drekifs"
            )
            print(flush=True)
            bench = Bench(work, src, script, args.rounds)
            for r in range(args.rounds):
                bench.one_round(r)
                print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        memory = None
        if args.keys:
            print(f"  writing {args.keys:,} keys for the memory test", file=sys.stderr, flush=True)
            memory = memory_phase(work, args.keys)
        verdicts = report(bench.results, memory, args.rounds, args.keys)
        if args.samples:
            print_samples(bench.results)
        print()
        print("Targets")
        for met, text in verdicts:
            print(f"  [{'met' if met else 'missed'}] {text}")
        return 1 if args.check and not all(met for met, _ in verdicts) else 0
    except BenchError as e:
        print(f"store_files: {e}", file=sys.stderr)
        return 1
    finally:
        for point in fw.mounts_under(work):
            fw.force_unmount(Path(point))
        left = fw.mounts_under(work)
        if left:
            print(f"store_files: still mounted, {work} kept: {', '.join(left)}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def source_version() -> str:
    """The drekifs code measured: its git commit, and whether the tree had changes."""
    result = fw.run(
        ["git", "-C", str(HERE.parent), "describe", "--always", "--dirty"], 30, check=False
    )
    return result.stdout.strip() or "(not a git checkout)"


def fs_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (from /proc/self/mounts)."""
    best, kind = "", "?"
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            point = parts[1]
            if (str(path) + "/").startswith(point.rstrip("/") + "/") and len(point) > len(best):
                best, kind = point, parts[2]
    return kind


if __name__ == "__main__":
    sys.exit(main())
