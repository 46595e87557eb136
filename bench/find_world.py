#!/usr/bin/env python3
"""Benchmark: ``find`` over a generated world, on drekifs, on the floor and on tmpfs.

A world of 1,000 nodes in 100 regions is written as a DNS zone file and mounted with drekifs.
The same directory tree is built on kernel tmpfs and served by bench/floorfs.py, the minimal
pyfuse3 filesystem: the floor any pyfuse3 filesystem can reach. ``find MOUNT > /dev/null`` is
timed on each, cold and warm, and the FUSE requests of every walk are counted. bench/README.md
explains how to read the output.

    python bench/find_world.py [--rounds N] [--warm N] [--no-drop-caches] [--samples] [--check]

Run as root (mount, tmpfs, drop_caches). Everything it mounts or creates is removed at the end,
whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLOORFS = HERE / "floorfs.py"

DOMAIN = "bench.drekifs.test"
TOP_REGIONS = 10  # each holds SUB_REGIONS sub-regions and NODES_PER_REGION nodes
SUB_REGIONS = 9  # each holds NODES_PER_REGION nodes: 10 + 10 * 9 = 100 regions
NODES_PER_REGION = 10  # 100 regions * 10 = 1000 nodes
# What the daemon serves in .dreki/ (app wiring, _status_files): the walk must find exactly these.
STATUS_FILES = (
    *("cluster", "control", "loop", "members", "members.json", "pid", "replication", "requests"),
    *("stores", "world", "world-errors", "world.json"),
)

TARGET_RATIO = 1.3  # drekifs within 1.3x of the floor
PER_ENTRY_LIMIT = 0.01  # "no LOOKUP/GETATTR per entry": fewer than one per 100 entries

MOUNT_TIMEOUT = 60.0
UNMOUNT_TIMEOUT = 30.0
WALK_TIMEOUT = 120.0
COUNTS_TIMEOUT = 10.0

COLD_MOUNT = "cold (mount)"
COLD_DROP = "cold (drop)"
WARM = "warm"

OP_ORDER = (
    "lookup",
    "getattr",
    "opendir",
    "readdir",
    "releasedir",
    "forget",
    "getxattr",
    "listxattr",
    "statfs",
    "access",
    "open",
    "read",
    "flush",
    "release",
)


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


# -- the world ------------------------------------------------------------------------------------


@dataclass
class World:
    """The generated world: its zone file text and the tree every filesystem serves."""

    zone: str
    regions: list[str]
    nodes: list[str]
    dirs: list[str]  # relative paths, the root excluded
    files: list[str]

    @property
    def n_dirs(self) -> int:
        return len(self.dirs) + 1  # with the root

    @property
    def n_entries(self) -> int:
        return len(self.dirs) + len(self.files)  # every name a walk meets


def generate_world() -> World:
    """10 top-level regions, each with 9 sub-regions and 10 nodes; 10 nodes per sub-region."""
    lines = [
        f"$ORIGIN {DOMAIN}.",
        "$TTL 300",
        f"@ IN SOA ns.{DOMAIN}. hostmaster.{DOMAIN}. 1 3600 600 86400 60",
        f"@ IN NS ns.{DOMAIN}.",
        "ns IN A 127.0.0.1",
        '_dreki IN TXT "find_world benchmark"',
    ]
    regions: list[str] = []
    nodes: list[str] = []

    def member(region_dns: str, label: str) -> str:
        """Add ``label`` under region ``region_dns`` (relative, "" for the root)."""
        dns = f"{label}.{region_dns}" if region_dns else label
        owner = f"_dreki.{region_dns}" if region_dns else "_dreki"
        lines.append(f"{owner} IN SRV 0 0 1337 {dns}.{DOMAIN}.")
        return dns

    def add_nodes(region_dns: str, region_path: str) -> None:
        for _ in range(NODES_PER_REGION):
            label = f"node{len(nodes):04d}"
            dns = member(region_dns, label)
            lines.append(f"_node._dreki.{dns} IN SRV 0 0 {20000 + len(nodes)} localhost.")
            lines.append(f'_name._dreki.{dns} IN TXT "bench node {len(nodes)}"')
            nodes.append(f"{region_path}/{label}")

    for t in range(TOP_REGIONS):
        top = member("", f"r{t}")
        lines.append(f'_dreki.{top} IN TXT "Region {t}"')
        regions.append(f"r{t}")
        for s in range(SUB_REGIONS):
            sub = member(top, f"s{s}")
            lines.append(f'_dreki.{sub} IN TXT "Region {t}.{s}"')
            regions.append(f"r{t}/s{s}")
            add_nodes(sub, f"r{t}/s{s}")
        add_nodes(top, f"r{t}")

    dirs = ["global", ".dreki"]
    for r in regions:
        dirs += [r, f"{r}/global"]
    for n in nodes:
        dirs += [n, f"{n}/global", f"{n}/local"]
    files = [f".dreki/{name}" for name in STATUS_FILES]
    return World("\n".join(lines) + "\n", regions, nodes, dirs, files)


# -- processes and mounts --------------------------------------------------------------------------


def run(cmd: list[str], timeout: float, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` with a bounded wait; on ``check``, a failure is a :class:`BenchError`."""
    try:
        result = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd="/", stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(cmd)}: no answer after {timeout:.0f} s") from None
    if check and result.returncode != 0:
        out = (result.stderr or result.stdout).strip()
        raise BenchError(f"{' '.join(cmd)} failed ({result.returncode}): {out}")
    return result


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    prefix = str(path).rstrip("/") + "/"
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            point = parts[1].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
            if point == str(path) or point.startswith(prefix):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def is_mounted(path: Path) -> bool:
    return str(path) in mounts_under(path)


def force_unmount(path: Path) -> None:
    """Detach ``path`` however it can be done; never raises."""
    for cmd in (["fusermount3", "-u", "-z", str(path)], ["umount", "-l", str(path)]):
        if not is_mounted(path):
            return
        try:
            subprocess.run(cmd, capture_output=True, timeout=UNMOUNT_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired):
            continue


def stop_process(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, the process ``pid`` this benchmark started."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def drop_caches() -> bool:
    """Have the kernel forget clean pages, dentries and inodes; False if not allowed."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    time.sleep(0.2)  # let the FORGETs of evicted FUSE inodes reach the daemons first
    return True


Counts = dict[str, int]


def difference(after: Counts, before: Counts) -> Counts:
    """``after - before`` per operation, the unchanged ones left out."""
    diff = {op: after.get(op, 0) - before.get(op, 0) for op in set(after) | set(before)}
    return {op: n for op, n in diff.items() if n}


def cpu_seconds(pid: int | None) -> float | None:
    """CPU time used so far by process ``pid``, user and system, all its threads included —
    those that have exited too, unlike a sum over /proc/PID/task (None: not known). Clock
    ticks: 10 ms resolution, a percent of a walk or a tar."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    except (OSError, ValueError, IndexError):
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


# -- the three filesystems -------------------------------------------------------------------------


class Target:
    """A filesystem serving the world's tree at ``self.mountpoint``."""

    name = ""
    fuse = False

    def __init__(self, work: Path, world: World) -> None:
        self.work = work
        self.world = world
        self.mountpoint = work / "mnt" / self.name
        self.mountpoint.mkdir(parents=True, exist_ok=True)

    def mount(self) -> None:
        raise NotImplementedError

    def unmount(self) -> None:
        raise NotImplementedError

    def counts(self) -> Counts | None:
        """Cumulative FUSE requests per operation; None when not a FUSE filesystem."""
        return None

    def server_pid(self) -> int | None:
        """The process serving the FUSE requests; None when not a FUSE filesystem."""
        return None

    def cleanup(self) -> None:
        """Unmount whatever is left, stop what was started; best effort, never raises."""
        force_unmount(self.mountpoint)


class Tmpfs(Target):
    """Kernel tmpfs holding the same directories and (empty) files."""

    name = "tmpfs"

    def mount(self) -> None:
        run(
            [
                "mount",
                "-t",
                "tmpfs",
                "-o",
                "size=64m,mode=0555",
                "drekifs-bench",
                str(self.mountpoint),
            ],
            MOUNT_TIMEOUT,
        )
        root = self.mountpoint
        for d in self.world.dirs:
            (root / d).mkdir(parents=True, exist_ok=True)
        for f in self.world.files:
            (root / f).touch(mode=0o444)
        for d in self.world.dirs:  # the modes drekifs gives: world dirs 0555, stores 0755
            store = d.rsplit("/", 1)[-1] in ("global", "local")
            (root / d).chmod(0o755 if store else 0o555)

    def unmount(self) -> None:
        if run(["umount", str(self.mountpoint)], UNMOUNT_TIMEOUT, check=False).returncode != 0:
            force_unmount(self.mountpoint)


class Floor(Target):
    """bench/floorfs.py in its own process; counters dumped to a file on SIGUSR1."""

    name = "floor"
    fuse = True

    def __init__(self, work: Path, world: World) -> None:
        super().__init__(work, world)
        self.tree = work / "tree.json"
        self.tree.write_text(json.dumps({"dirs": world.dirs, "files": world.files}))
        self.counts_file = work / "floor-counts.json"
        self.log = work / "floor.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.seq = 0

    def mount(self) -> None:
        self.counts_file.unlink(missing_ok=True)
        self.seq = 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(FLOORFS),
                    str(self.tree),
                    str(self.mountpoint),
                    "--counts",
                    str(self.counts_file),
                ],
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd="/",
            )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], MOUNT_TIMEOUT)
        line = self.proc.stdout.readline() if ready else b""
        if not line.startswith(b"ready"):
            tail = self.log.read_text(errors="replace")[-2000:]
            raise BenchError(f"floorfs did not serve within {MOUNT_TIMEOUT:.0f} s: {tail}")

    def counts(self) -> Counts:
        """The counters once they stop moving: the kernel sends the last RELEASEDIRs of a walk
        after find has exited, and a signal does not queue behind them as a request would."""
        last = self._dump()
        deadline = time.monotonic() + COUNTS_TIMEOUT
        while time.monotonic() < deadline:
            time.sleep(0.02)
            now = self._dump()
            if now == last:
                return now
            last = now
        raise BenchError(f"floorfs counters still moving after {COUNTS_TIMEOUT:.0f} s")

    def _dump(self) -> Counts:
        assert self.proc is not None
        self.seq += 1
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + COUNTS_TIMEOUT
        while time.monotonic() < deadline:
            try:
                data = json.loads(self.counts_file.read_text())
                if data["seq"] >= self.seq:
                    return data["counts"]
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.002)
        raise BenchError(f"floorfs wrote no counters within {COUNTS_TIMEOUT:.0f} s")

    def server_pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def unmount(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        run(["fusermount3", "-u", str(self.mountpoint)], UNMOUNT_TIMEOUT, check=False)
        try:
            proc.wait(timeout=UNMOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            stop_process(proc.pid)
            proc.wait(timeout=UNMOUNT_TIMEOUT)
        finally:
            if proc.stdout:
                proc.stdout.close()
            force_unmount(self.mountpoint)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc.pid)  # it unmounts itself on SIGTERM
            self.proc.wait(timeout=UNMOUNT_TIMEOUT)
        self.proc = None
        force_unmount(self.mountpoint)


class Drekifs(Target):
    """``drekifs mount --zone``; counters read from MOUNT/.dreki/requests."""

    name = "drekifs"
    fuse = True

    def __init__(self, work: Path, world: World) -> None:
        super().__init__(work, world)
        self.zone = work / "world.zone"
        self.zone.write_text(world.zone)
        self.data_dir = work / "drekifs-data"
        self.pid: int | None = None

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "drekifs", *args]

    def check_world(self) -> str:
        """``drekifs world --check`` on the generated zone: its one-line verdict."""
        out = run(self.command("world", "--check", "--zone", str(self.zone)), MOUNT_TIMEOUT)
        return out.stdout.strip()

    def mount(self) -> None:
        run(
            self.command(
                "mount",
                "--zone",
                str(self.zone),
                "--data-dir",
                str(self.data_dir),
                str(self.mountpoint),
            ),
            MOUNT_TIMEOUT,
        )
        self.pid = int((self.mountpoint / ".dreki" / "pid").read_text())

    def counts(self) -> Counts:
        text = (self.mountpoint / ".dreki" / "requests").read_text()
        return {op: int(n) for op, n in (line.split() for line in text.splitlines())}

    def server_pid(self) -> int | None:
        return self.pid

    def unmount(self) -> None:
        pid, self.pid = self.pid, None
        run(
            self.command("umount", "--timeout", str(UNMOUNT_TIMEOUT), str(self.mountpoint)),
            UNMOUNT_TIMEOUT + 10,
        )
        if pid is not None and _alive(pid):
            raise BenchError(f"drekifs daemon {pid} still runs after drekifs umount")

    def cleanup(self) -> None:
        if is_mounted(self.mountpoint):
            run(
                self.command("umount", "--timeout", str(UNMOUNT_TIMEOUT), str(self.mountpoint)),
                UNMOUNT_TIMEOUT + 10,
                check=False,
            )
        force_unmount(self.mountpoint)
        if self.pid is not None:
            stop_process(self.pid)
            self.pid = None


# -- measuring ------------------------------------------------------------------------------------


def walk(mountpoint: Path) -> float:
    """Seconds taken by ``find MOUNTPOINT > /dev/null``."""
    start = time.perf_counter()
    try:
        result = subprocess.run(
            ["find", str(mountpoint)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            timeout=WALK_TIMEOUT,
            cwd="/",
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"find {mountpoint}: not done after {WALK_TIMEOUT:.0f} s") from None
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise BenchError(f"find {mountpoint} failed: {result.stderr.decode().strip()}")
    return elapsed


def listing(mountpoint: Path) -> set[str]:
    """Every path below ``mountpoint`` as "TYPE relative/path", as find sees it."""
    out = run(["find", str(mountpoint), "-mindepth", "1", "-printf", r"%y %P\n"], WALK_TIMEOUT)
    return set(out.stdout.splitlines())


def check_tree(target: Target, world: World) -> None:
    """The target serves exactly the world's tree (checked once, after the timed walks)."""
    expected = {f"d {d}" for d in world.dirs} | {f"f {f}" for f in world.files}
    seen = listing(target.mountpoint)
    if seen != expected:
        missing = sorted(expected - seen)[:5]
        extra = sorted(seen - expected)[:5]
        raise BenchError(
            f"{target.name} does not serve the expected tree: missing {missing}, unexpected {extra}"
        )


@dataclass
class Samples:
    """What was measured on one target: walk times (s) and FUSE requests per walk, by kind."""

    times: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)  # the FUSE daemon's CPU time (s)
    requests: dict[str, list[Counts]] = field(default_factory=dict)
    overhead: list[Counts] = field(default_factory=list)  # reading the counters, per reading

    def median_time(self, kind: str) -> float | None:
        values = self.times.get(kind)
        return statistics.median(values) if values else None

    def median_cpu(self, kind: str) -> float | None:
        values = self.cpu.get(kind)
        return statistics.median(values) if values else None

    def median_requests(self, kind: str) -> Counts:
        walks = self.requests.get(kind, [])
        ops = {op for c in walks for op in c}
        return {op: round(statistics.median(c.get(op, 0) for c in walks)) for op in ops}


def timed_walk(target: Target, kind: str, samples: Samples, before: Counts | None) -> Counts | None:
    """Walk once; record its time, and its FUSE requests and daemon CPU time. Returns fresh
    counters, for the next walk's ``before``.

    The counters are read twice after the walk: the second reading costs exactly what the
    readings around the walk cost (the end of the one before, the start of the one after), so
    that cost, in requests and in CPU time, is measured each time and subtracted.
    """
    pid = target.server_pid()
    cpu0 = cpu_seconds(pid)
    samples.times.setdefault(kind, []).append(walk(target.mountpoint))
    if before is None:
        return None
    after = target.counts()
    cpu1 = cpu_seconds(pid)
    again = target.counts()
    cpu2 = cpu_seconds(pid)
    assert after is not None and again is not None
    overhead = difference(again, after)
    samples.overhead.append(overhead)
    samples.requests.setdefault(kind, []).append(difference(difference(after, before), overhead))
    if cpu0 is not None and cpu1 is not None and cpu2 is not None:
        samples.cpu.setdefault(kind, []).append((cpu1 - cpu0) - (cpu2 - cpu1))
    return again


def measure_round(
    targets: list[Target],
    world: World,
    results: dict[str, Samples],
    warm: int,
    drop: bool,
    first: int,
    check: bool,
) -> None:
    """One round: mount every target afresh, then walk them in turn, ``first`` going first —
    a cold walk each, ``warm`` warm walks each, a walk each after drop_caches — so that a busy
    moment of the machine hits all of them alike. On ``check``, compare every tree with the
    world's at the end."""
    order = targets[first:] + targets[:first]
    mounted: list[Target] = []
    try:
        for t in targets:
            t.mount()
            mounted.append(t)
        before = {t.name: t.counts() for t in targets}
        for t in order:
            before[t.name] = timed_walk(t, COLD_MOUNT, results[t.name], before[t.name])
        for _ in range(warm):
            for t in order:
                before[t.name] = timed_walk(t, WARM, results[t.name], before[t.name])
        if drop:
            for t in order:
                if not drop_caches():
                    raise BenchError("cannot write /proc/sys/vm/drop_caches; --no-drop-caches")
                timed_walk(t, COLD_DROP, results[t.name], t.counts())
        if check:
            for t in targets:
                check_tree(t, world)
    finally:
        errors = []
        for t in reversed(mounted):
            try:
                t.unmount()
            except BenchError as e:
                errors.append(e)
    if errors:  # reached only when no other error is on its way
        raise errors[0]


def find_startup(work: Path, repeat: int = 5) -> float:
    """Seconds ``find`` takes on an empty directory: its own start-up, in every walk's time."""
    empty = work / "empty"
    empty.mkdir(exist_ok=True)
    return statistics.median(walk(empty) for _ in range(repeat))


# -- the report -----------------------------------------------------------------------------------


def table(rows: list[list[str]], left: int = 1) -> str:
    """Rows of cells as aligned text: the first ``left`` columns left-aligned, the rest right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.ljust(widths[i]) if i < left else cell.rjust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def paired(a: list[float] | None, b: list[float] | None) -> float | None:
    """Median of ``a[i] / b[i]``: walks i of both targets were taken one right after the other,
    so what the machine was doing at that moment cancels out."""
    if not a or not b or len(a) != len(b) or not all(b):
        return None
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def ordered_ops(counts: Iterable[Counts]) -> list[str]:
    ops = {op for c in counts for op, n in c.items() if n}
    known = [op for op in OP_ORDER if op in ops]
    return known + sorted(ops - set(known))


def report(
    world: World,
    kinds: list[str],
    results: dict[str, Samples],
    startup: float,
    rounds: int,
    warm: int,
) -> bool:
    """Print the tables and the targets; True when every target is met."""
    tmpfs, floor, dreki = results["tmpfs"], results["floor"], results["drekifs"]

    print()
    print(
        "Time of `find MOUNT > /dev/null`, ms: median of "
        f"{rounds} cold and {rounds * warm} warm walks"
    )
    rows = [
        [
            "walk",
            "tmpfs",
            "floor",
            "drekifs",
            "drekifs/floor",
            "paired",
            "drekifs/tmpfs",
            "floor/tmpfs",
        ]
    ]
    for kind in kinds:
        t, f, d = (s.median_time(kind) for s in (tmpfs, floor, dreki))
        pair = paired(dreki.times.get(kind), floor.times.get(kind))
        rows.append([kind, ms(t), ms(f), ms(d), ratio(d, f), times(pair), ratio(d, t), ratio(f, t)])
    print(table(rows))
    print(
        f"(find's own start-up, on an empty directory: {ms(startup)} ms, in every time above;"
        " paired: the median of drekifs/floor over walks taken one right after the other)"
    )

    print()
    print(
        "CPU time of the FUSE daemon during one walk, ms (median; steadier than wall time on "
        "a busy machine)"
    )
    rows = [
        ["walk", "floor", "drekifs", "drekifs/floor", "paired", "floor us/req", "drekifs us/req"]
    ]
    for kind in kinds:
        f, d = floor.median_cpu(kind), dreki.median_cpu(kind)
        per_req = [
            "-" if c is None or not n else f"{c * 1e6 / n:.0f}"
            for c, n in (
                (f, sum(floor.median_requests(kind).values())),
                (d, sum(dreki.median_requests(kind).values())),
            )
        ]
        pair = paired(dreki.cpu.get(kind), floor.cpu.get(kind))
        rows.append([kind, ms(f), ms(d), ratio(d, f), times(pair), *per_req])
    print(table(rows))

    print()
    print(
        f"FUSE requests per directory during one walk ({world.n_dirs} directories, "
        f"{world.n_entries} entries; median over walks)"
    )
    medians = {
        (k, name): results[name].median_requests(k) for k in kinds for name in ("floor", "drekifs")
    }
    ops = ordered_ops([*medians.values(), dict.fromkeys(OP_ORDER[:5], 1)])
    rows = [["walk", "fs", *ops, "total", "per walk"]]
    for kind in kinds:
        for name in ("floor", "drekifs"):
            m = medians[kind, name]
            total = sum(m.values())
            rows.append(
                [
                    kind,
                    name,
                    *(f"{m.get(op, 0) / world.n_dirs:.3f}" for op in ops),
                    f"{total / world.n_dirs:.3f}",
                    str(total),
                ]
            )
    print(table(rows, left=2))
    if dreki.overhead:
        cost = dreki.overhead[-1]
        text = ", ".join(f"{op} {cost[op]}" for op in ordered_ops([cost]))
        varied = sorted({str(o) for o in dreki.overhead if o != cost})
        seen = "always the same" if not varied else "also seen: " + ", ".join(varied)
        print(
            f"(reading drekifs's .dreki/requests costs {text}: measured after every walk "
            f"and subtracted; {seen})"
        )

    print()
    print("Targets")
    all_met = True

    def verdict(met: bool, text: str) -> None:
        nonlocal all_met
        all_met &= met
        print(f"  [{'met' if met else 'NOT MET'}] {text}")

    for op in ("lookup", "getattr"):
        per_walk = [medians[k, "drekifs"].get(op, 0) for k in kinds]
        met = all(n < PER_ENTRY_LIMIT * world.n_entries for n in per_walk)
        detail = ", ".join(f"{n} {k}" for n, k in zip(per_walk, kinds, strict=True))
        verdict(
            met,
            f"no {op.upper()} per entry during the walk (drekifs: {detail}; "
            f"limit < {PER_ENTRY_LIMIT * world.n_entries:.0f} per walk)",
        )
    ratios = {k: paired(dreki.times.get(k), floor.times.get(k)) for k in kinds}
    detail = ", ".join(f"{times(r)} {k}" for k, r in ratios.items())
    verdict(
        all(r is not None and r <= TARGET_RATIO for r in ratios.values()),
        f"drekifs within {TARGET_RATIO}x of the floor, paired wall time ({detail})",
    )
    return all_met


def print_samples(kinds: list[str], results: dict[str, Samples]) -> None:
    print()
    print("Samples, ms")
    for name, s in results.items():
        for kind in kinds:
            values = " ".join(ms(t) for t in s.times.get(kind, []))
            print(f"  {name:8} {kind:13} {values}")


# -- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="fresh mounts per filesystem, one cold walk each (default 5)",
    )
    parser.add_argument(
        "--warm", type=int, default=5, help="warm walks after each cold one (default 5)"
    )
    parser.add_argument(
        "--no-drop-caches",
        action="store_true",
        help="skip the cold walk after echo 3 > /proc/sys/vm/drop_caches",
    )
    parser.add_argument("--samples", action="store_true", help="print every walk's time")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is not met")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("find_world: run as root (it mounts tmpfs and FUSE filesystems)", file=sys.stderr)
        return 2
    if args.rounds < 1 or args.warm < 1:
        parser.error("--rounds and --warm must be at least 1")
    # SIGTERM unwinds like Ctrl-C, through every finally below.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    world = generate_world()
    drop = not args.no_drop_caches
    kinds = [COLD_MOUNT, *([COLD_DROP] if drop else []), WARM]
    work = Path(tempfile.mkdtemp(prefix="drekifs-bench-"))
    targets: list[Target] = []
    try:
        targets = [Tmpfs(work, world), Floor(work, world), Drekifs(work, world)]
        dreki = targets[2]
        assert isinstance(dreki, Drekifs)
        print(
            f"world {DOMAIN}: {len(world.regions)} regions ({TOP_REGIONS} top-level, each "
            f"with {SUB_REGIONS} sub-regions), {len(world.nodes)} nodes "
            f"({NODES_PER_REGION} in every region)"
        )
        print(f"  drekifs world --check: {dreki.check_world()}")
        print(
            f"tree: {world.n_dirs} directories (root, regions, nodes, their global/local "
            f"stores, .dreki) and {len(world.files)} files (.dreki/*), on each filesystem"
        )
        print(
            f"cold (mount): the first walk after a fresh mount; "
            f"{'cold (drop): after echo 3 > drop_caches; ' if drop else ''}"
            f"warm: repeated at once"
        )
        print("(tmpfs keeps its whole tree in the dentry cache: it has no cold state)")
        print(f"work directory: {work}", flush=True)

        startup = find_startup(work)
        results = {t.name: Samples() for t in targets}
        for r in range(args.rounds):
            measure_round(
                targets, world, results, args.warm, drop, first=r % len(targets), check=r == 0
            )
            sys.stdout.flush()
            print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        met = report(world, kinds, results, startup, args.rounds, args.warm)
        if args.samples:
            print_samples(kinds, results)
        return 1 if args.check and not met else 0
    except BenchError as e:
        print(f"find_world: {e}", file=sys.stderr)
        return 1
    finally:
        for t in targets:
            t.cleanup()
        for point in mounts_under(work):
            force_unmount(Path(point))
        left = mounts_under(work)
        if left:
            print(f"find_world: still mounted, {work} kept: {', '.join(left)}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
