#!/usr/bin/env python3
"""Benchmark: what drekifs's own FUSE handlers cost per file, without FUSE.

Calls ``Operations`` directly, in the order a cold ``tar c`` makes its requests (per directory
OPENDIR, READDIR, RELEASEDIR; per file GETATTR, OPEN, READ, RELEASE), over 5,000 files of
100-2,000 bytes in 50 directories of the global store of the bundled demo world. Before each
round the store's read caches and the node cache are dropped, as a fresh mount has them. No
handler here ever waits, so each coroutine is driven to its end by hand: no trio scheduler, no
pyfuse3, no kernel; what is left is the handlers' Python. ``bench/store_files.py`` measures
the whole request through the kernel; this one says which handler the time goes to.

    python bench/handlers.py [--rounds 7] [--cp] [--instructions]

Prints, per file, the best round's microseconds for each request kind and their sum.

``--instructions``: instead of times, the machine instructions per file, counted by valgrind
(cachegrind): the same run with one round and with two, the difference divided by the files.
Steady to about 0.1% from run to run where the times above move by 20% on this VM, so two
versions of the code compare reliably; it counts work, not cache misses (a request inside a
daemon costs more than its instructions say).

``--cp``: the requests of a ``cp -a`` of the same files into an empty global store instead (per
file LOOKUP of the new name, CREATE, GETXATTR ``security.capability``, WRITE, SETATTR of the
times, SETXATTR of the ACL, SETATTR of the mode, GETATTR of the directory, RELEASE; a MKDIR
per directory), with the store's replication watching it as in a daemon (hash tree, broadcast
queue; nothing is sent), a fresh store each round.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

# The repository root: drekifs from this checkout and the simulations in tests/harness/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyfuse3
import trio

from drekifs.app.cli import demo_zone
from drekifs.cluster.replication import Replication
from drekifs.fs.namespace import ROOT_INODE, Namespace
from drekifs.fs.operations import Operations
from drekifs.fs.requestloop import RequestLoop
from drekifs.fs.status import StatusFiles
from drekifs.stores.lmdb import LmdbStore
from drekifs.world import snapshot
from drekifs.world.sources import world_from_zone
from tests.harness.simnet import SimWorld, addr_of

DIRS, FILES_PER_DIR = 50, 100
MIN_SIZE, MAX_SIZE = 100, 2000
SEED = 3
MAP = 1 << 30  # the store's map: valgrind (--instructions) cannot reserve the daemon's 1 TiB
KINDS = ("opendir", "readdir", "getattr", "open", "read", "release")
CP_KINDS = (
    "mkdir",
    "lookup",
    "create",
    "getxattr",
    "write",
    "setattr times",
    "setxattr",
    "setattr mode",
    "getattr dir",
    "release",
)


class Ctx:
    uid, gid, pid, umask = 0, 0, 0, 0o022


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """A handler that never waits, to its end (it must not yield)."""
    try:
        coro.send(None)
    except StopIteration as e:
        return e.value
    coro.close()
    raise RuntimeError("a handler yielded: this benchmark only drives ones that never wait")


def mount(data: Path) -> tuple[Operations, LmdbStore, int]:
    """Operations over an empty global store, and the inode of ``global/``."""
    snap = snapshot.advance(None, world_from_zone(demo_zone()), time.time())
    store = LmdbStore(
        "global", data / "global", peer="bench", replicated=True, max_value=1 << 20, map_size=MAP
    )
    # The request wrapper as in a daemon, through its request loop's run (not installed in
    # pyfuse3, which this benchmark never enters: run costs the same either way).
    ops = Operations(
        Namespace(snap, ()), StatusFiles(), stores={"global": store}, request_loop=RequestLoop()
    )
    return ops, store, run(ops.lookup(ROOT_INODE, b"global", Ctx)).st_ino


def build(data: Path) -> tuple[Operations, LmdbStore, list[int]]:
    ops, store, root = mount(data)
    rng = random.Random(SEED)
    dirs = []
    for d in range(DIRS):
        dino = run(ops.mkdir(root, b"d%d" % d, 0o755, Ctx)).st_ino
        dirs.append(dino)
        for f in range(FILES_PER_DIR):
            info, _ = run(ops.create(dino, b"f%d" % f, 0o644, os.O_WRONLY, Ctx))
            run(ops.write(info.fh, 0, rng.randbytes(rng.randint(MIN_SIZE, MAX_SIZE))))
            run(ops.release(info.fh))
    return ops, store, dirs


def one_round(ops: Operations, store: LmdbStore, dirs: list[int]) -> dict[str, float]:
    listed: list[int] = []
    pyfuse3.readdir_reply = lambda token, name, attr, ino: listed.append(ino) or True
    store._records.clear()  # as a fresh mount: nothing read yet
    store._where.clear()
    ops.local.nodes.clear()
    spent = dict.fromkeys(KINDS, 0.0)
    clock = time.perf_counter
    for dino in dirs:
        listed.clear()
        t0 = clock()
        fh = run(ops.opendir(dino, Ctx))
        t1 = clock()
        run(ops.readdir(fh, 0, None))
        t2 = clock()
        run(ops.releasedir(fh))
        spent["opendir"] += t1 - t0
        spent["readdir"] += t2 - t1
        for ino in listed:
            t0 = clock()
            run(ops.getattr(ino, Ctx))
            t1 = clock()
            info = run(ops.open(ino, os.O_RDONLY, Ctx))
            t2 = clock()
            run(ops.read(info.fh, 0, 128 << 10))
            t3 = clock()
            run(ops.release(info.fh))
            t4 = clock()
            spent["getattr"] += t1 - t0
            spent["open"] += t2 - t1
            spent["read"] += t3 - t2
            spent["release"] += t4 - t3
    return spent


class Fields:
    """A SETATTR's fields: only those named are set."""

    def __init__(self, *names: str) -> None:
        for name in ("size", "mode", "uid", "gid", "mtime", "atime", "ctime"):
            setattr(self, f"update_{name}", name in names)


class Attr:
    st_mode = 0o100644
    st_uid = st_gid = 0
    st_atime_ns = st_mtime_ns = 1_600_000_000 * 10**9


TIMES, MODE = Fields("mtime", "atime"), Fields("mode")
ACL = b"\2\0\0\0\1\0\6\0\377\377\377\377\4\0\4\0\377\377\377\377 \0\4\0\377\377\377\377"


def quiet(coro: Coroutine[Any, Any, Any]) -> None:
    """A request whose errno is the expected answer (a new name's LOOKUP, the ACL)."""
    with contextlib.suppress(pyfuse3.FUSEError):
        run(coro)


def cp_round(data: Path) -> dict[str, float]:
    ops, store, root = mount(data)
    world = SimWorld()
    Replication("bench", world.network(addr_of(0)), store)  # watches the store, as in a daemon
    rng = random.Random(SEED)
    spent = dict.fromkeys(CP_KINDS, 0.0)
    clock = time.perf_counter
    try:
        for d in range(DIRS):
            t0 = clock()
            dino = run(ops.mkdir(root, b"d%d" % d, 0o755, Ctx)).st_ino
            spent["mkdir"] += clock() - t0
            for f in range(FILES_PER_DIR):
                name = b"f%d" % f
                value = rng.randbytes(rng.randint(MIN_SIZE, MAX_SIZE))
                t = [clock()]
                quiet(ops.lookup(dino, name, Ctx))
                t.append(clock())
                info, attr = run(ops.create(dino, name, 0o100600, os.O_WRONLY, Ctx))
                t.append(clock())
                quiet(ops.getxattr(attr.st_ino, b"security.capability", Ctx))
                t.append(clock())
                run(ops.write(info.fh, 0, value))
                t.append(clock())
                run(ops.setattr(attr.st_ino, Attr, TIMES, info.fh, Ctx))
                t.append(clock())
                quiet(ops.setxattr(attr.st_ino, b"system.posix_acl_access", ACL, Ctx))
                t.append(clock())
                run(ops.setattr(attr.st_ino, Attr, MODE, info.fh, Ctx))
                t.append(clock())
                run(ops.getattr(dino, Ctx))
                t.append(clock())
                run(ops.release(info.fh))
                t.append(clock())
                for kind, (a, b) in zip(CP_KINDS[1:], itertools.pairwise(t), strict=True):
                    spent[kind] += b - a
    finally:
        store.env.close()
    return spent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cp", action="store_true", help="the requests of a cp -a instead")
    parser.add_argument(
        "--instructions", action="store_true", help="instructions per file (valgrind), not time"
    )
    args = parser.parse_args(argv)
    if args.instructions:
        return main_instructions(["--cp"] if args.cp else [])
    if args.cp:
        return main_cp(args.rounds)
    original_reply = pyfuse3.readdir_reply
    with tempfile.TemporaryDirectory(prefix="drekifs-bench-handlers-") as tmp:
        ops, store, dirs = build(Path(tmp))
        try:
            trio.run(store.sync)  # on disk, as a remounted store is
            best = best_of(args.rounds, lambda: one_round(ops, store, dirs))
        finally:
            pyfuse3.readdir_reply = original_reply
            store.env.close()
    report("a cold tar", best, args.rounds)
    return 0


def best_of(rounds: int, one: Callable[[], dict[str, float]]) -> dict[str, float]:
    """Each request kind's least time over ``rounds`` rounds."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        for kind, seconds in one().items():
            best[kind] = min(best.get(kind, seconds), seconds)
    return best


def report(what: str, best: dict[str, float], rounds: int) -> None:
    files = DIRS * FILES_PER_DIR
    print(
        f"drekifs handlers of {what}, {files:,} files in {DIRS} directories, "
        f"us per file (best of {rounds} rounds):"
    )
    width = max(map(len, best)) + 1
    for kind, seconds in best.items():
        print(f"  {kind:<{width}} {seconds / files * 1e6:6.2f}")
    print(f"  {'total':<{width}} {sum(best.values()) / files * 1e6:6.2f}")


def instructions(rounds: int, extra: list[str]) -> int:
    """Instructions of this script run under cachegrind with ``rounds`` rounds."""
    with tempfile.NamedTemporaryFile(prefix="drekifs-bench-cg-") as out:
        proc = subprocess.run(
            [
                "valgrind",
                "--tool=cachegrind",
                "--cache-sim=no",
                f"--cachegrind-out-file={out.name}",
                sys.executable,
                __file__,
                "--rounds",
                str(rounds),
                *extra,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    found = re.search(r"I\s+refs:\s+([\d,]+)", proc.stderr)
    if found is None:
        raise SystemExit(f"no instruction count from valgrind:\n{proc.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main_instructions(extra: list[str]) -> int:
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind (apt install valgrind)")
    one, two = instructions(1, extra), instructions(2, extra)
    what = "a cp -a" if extra else "a cold tar"
    files = DIRS * FILES_PER_DIR
    print(f"drekifs handlers of {what}: {(two - one) / files:,.0f} instructions per file")
    return 0


def main_cp(rounds: int) -> int:
    def one() -> dict[str, float]:
        with tempfile.TemporaryDirectory(prefix="drekifs-bench-handlers-") as tmp:
            return cp_round(Path(tmp))

    report("a cp -a", best_of(rounds, one), rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
