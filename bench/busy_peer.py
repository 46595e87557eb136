"""Benchmark: is a busy peer ever suspected? Five real peers on 127.0.0.1, one of them (a)
serving a ``tar`` and a ``cp -a`` through its mount and an anti-entropy exchange, all at once.

Set-up, through the product only:

1. a alone: ``cp -a`` of FILES files into its ``local`` store; unmounted (it leaves).
2. b alone: ``cp -a`` of KEYS small files into ``global`` (nobody to send them to).
3. c, d, e start: each pulls the KEYS files from b by anti-entropy (timed: the real cost of an
   anti-entropy exchange of KEYS keys between two daemons).
4. The load: a mounts again, with an empty ``global``, and at once ``tar c`` of its local
   store and ``cp -a`` of another FILES files into ``global`` start through its mount, while a
   pulls the KEYS files by anti-entropy and its cp -a replicates to the four others.

Watched during the load, until a has every key, tar and cp are done, and 10 s more: each of
b..e's ``.dreki/members.json`` every 0.1 s (any state of a other than alive is a false
suspicion: a never stops), and the time a takes to answer a read of its ``.dreki/requests``
(never cached by the kernel) every 0.05 s: a tiny request queued behind the load, as an ack is.
Printed at the end: the SWIM counters of every peer (a's ``refutations`` count the times a
heard it was suspected), the daemons' CPU, the durations.

    python bench/busy_peer.py [--files 20000] [--keys 100000] [--check]

``--check``: exit 1 if a was ever seen other than alive, or refuted a suspicion.
Run as root (mounts). Takes about 3 minutes at the defaults on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from find_world import cpu_seconds
from loopback import free_port, keep_logs, zone
from replication_latency import members_states, wait_until
from simclock import quantile

HERE = Path(__file__).resolve().parent
DREKIFS = [sys.executable, "-m", "drekifs"]
WORLD = "w.test"
NODES = ["a", "b", "c", "d", "e"]
SWIM_COUNTERS = [
    "probes", "acks", "late_acks", "probe_failures", "ping_reqs", "indirect_acks",
    "suspicions", "confirmations", "refutations", "suspicion_timeouts", "deaths",
]  # fmt: skip


def make_tree(root: Path, files: int, rng: random.Random, low: int, high: int) -> None:
    """``files`` files of ``low``..``high`` random bytes, 100 per directory."""
    for i in range(files):
        d = root / f"d{i // 100:04d}"
        if i % 100 == 0:
            d.mkdir(parents=True)
        (d / f"f{i % 100:03d}").write_bytes(rng.randbytes(rng.randint(low, high)))


def entries(mount: Path, store: str = "global") -> int:
    for line in (mount / ".dreki" / "stores").read_text().splitlines():
        name, *fields = line.split()
        if name == store:
            return int(dict(f.split("=", 1) for f in fields)["entries"])
    return 0


def member_states(mount: Path) -> dict[str, str]:
    """Node (first label) -> state, as this peer's ``.dreki/members.json`` says."""
    rows = json.loads((mount / ".dreki" / "members.json").read_text())
    return {r["node"].split(".")[0]: r["state"] for r in rows}


def counters(mount: Path) -> dict[str, int]:
    out = {}
    for line in (mount / ".dreki" / "cluster").read_text().splitlines():
        k, _, v = line.partition(" ")
        if v.strip().lstrip("-").isdigit():
            out[k] = int(v)
    return out


class Watch(threading.Thread):
    """Polls b..e's view of a, and a's answer time to a tiny request, until stopped."""

    def __init__(self, mounts: dict[str, Path], stop: threading.Event) -> None:
        super().__init__(name="watch", daemon=True)
        self.mounts = mounts
        self.stop = stop
        self.not_alive: list[tuple[float, str, str]] = []  # (time, observer, state)
        self.stat_ms: list[float] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            t0 = time.monotonic()
            next_view = t0
            while not self.stop.is_set():
                s = time.perf_counter()
                (self.mounts["a"] / ".dreki" / "requests").read_bytes()  # never cached
                self.stat_ms.append((time.perf_counter() - s) * 1e3)
                now = time.monotonic()
                if now >= next_view:
                    next_view = now + 0.1
                    for name in NODES[1:]:
                        state = member_states(self.mounts[name]).get("a")
                        if state != "alive":
                            self.not_alive.append((now - t0, name, str(state)))
                time.sleep(0.05)
        except BaseException as e:  # reported by the main thread
            self.error = e


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20000, help="files of the tar and the cp")
    parser.add_argument("--keys", type=int, default=100000, help="keys of the anti-entropy")
    parser.add_argument("--keep-logs", metavar="DIR", help="copy the daemons' logs here")
    parser.add_argument("--check", action="store_true", help="exit 1 if a was ever suspected")
    parser.add_argument("--spy", metavar="FILE", help="py-spy's raw stacks of a, during the load")
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # finally blocks run on SIGTERM
    work = Path(tempfile.mkdtemp(prefix="drekifs-bench-busy-"))
    src = Path(tempfile.mkdtemp(prefix="drekifs-bench-busy-src-", dir="/dev/shm"))
    ports = {n: free_port() for n in NODES}
    (work / "world.zone").write_text(zone(WORLD, ports))
    path = [str(HERE.parent), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    mounts = {n: work / f"m{n}" for n in NODES}
    mounted: set[str] = set()
    stop = threading.Event()
    rng = random.Random(7)

    def mount(n: str) -> None:
        subprocess.run(
            [*DREKIFS, "mount", "--zone", str(work / "world.zone"), "--node", n,
             "--keyring", str(work / "ring"), "--data-dir", str(work / f"d{n}"), str(mounts[n])],
            check=True, env=env, timeout=60,
        )  # fmt: skip
        mounted.add(n)

    def umount(n: str) -> None:
        subprocess.run([*DREKIFS, "umount", str(mounts[n])], env=env, timeout=120, check=True)
        mounted.discard(n)

    def cp(tree: Path, into: Path) -> float:
        t = time.perf_counter()
        subprocess.run(["cp", "-a", str(tree), str(into)], check=True, timeout=1200)
        return time.perf_counter() - t

    try:
        subprocess.run([*DREKIFS, "keygen", str(work / "ring")], check=True, env=env, timeout=30)
        make_tree(src / "local", args.files, rng, 100, 2000)
        make_tree(src / "more", args.files, rng, 100, 2000)
        make_tree(src / "keys", args.keys, rng, 8, 32)

        mount("a")
        local_a = mounts["a"] / "dc" / "a" / "local"
        t_local = cp(src / "local", local_a)
        umount("a")
        mount("b")
        t_keys = cp(src / "keys", mounts["b"] / "global")
        want = entries(mounts["b"])
        print(
            f"set-up: cp -a of {args.files} files into a's local {t_local:.1f} s; "
            f"of {args.keys} keys into b's global {t_keys:.1f} s ({want} entries)"
        )
        t0 = time.perf_counter()
        for n in ("c", "d", "e"):
            mount(n)
        for n in ("c", "d", "e"):
            wait_until(f"{want} entries at {n}", lambda n=n: entries(mounts[n]) >= want, 600, 0.5)
        print(f"c, d, e pulled {want} entries by anti-entropy in {time.perf_counter() - t0:.1f} s")

        pids = {}
        cpu0 = {}
        for n in ("b", "c", "d", "e"):
            pids[n] = int((mounts[n] / ".dreki" / "pid").read_text())
            cpu0[n] = cpu_seconds(pids[n])
        base = {n: counters(mounts[n]) for n in ("b", "c", "d", "e")}

        # The load.
        t_load = time.perf_counter()
        mount("a")
        pids["a"] = int((mounts["a"] / ".dreki" / "pid").read_text())
        cpu0["a"] = cpu_seconds(pids["a"])
        wait_until("a alive at b", lambda: member_states(mounts["b"]).get("a") == "alive", 30, 0.05)
        watch = Watch(mounts, stop)
        watch.start()
        spy = None
        if args.spy:  # where a's time goes during the load (py-spy: pip install py-spy)
            spy = subprocess.Popen(
                ["py-spy", "record", "-p", str(pids["a"]), "-r", "200", "--threads",
                 "--format", "raw", "-o", args.spy, "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        tar = subprocess.Popen(
            f"tar cf - -C {local_a} . | wc -c", shell=True, stdout=subprocess.PIPE, text=True
        )
        cp_a = subprocess.Popen(["cp", "-a", str(src / "more"), str(mounts["a"] / "global")])
        t_tar = t_cp = None
        total = want + args.files + 1
        t_ae = None
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            now = time.perf_counter() - t_load
            if t_tar is None and tar.poll() is not None:
                t_tar = now
            if t_cp is None and cp_a.poll() is not None:
                t_cp = now
            if t_ae is None and entries(mounts["a"]) >= total:
                t_ae = now
            if None not in (t_tar, t_cp, t_ae):
                break
            time.sleep(0.2)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        time.sleep(10)  # suspicions started at the end have time to show
        stop.set()
        watch.join(10)
        if watch.error is not None:
            raise SystemExit(f"watch failed: {watch.error!r}")
        cpu = {n: (cpu_seconds(p) or 0) - (cpu0[n] or 0) for n, p in pids.items()}
        after = {n: counters(mounts[n]) for n in NODES}
        print(
            f"\nload at a: tar c of {args.files} files {t_tar or float('nan'):.1f} s, "
            f"cp -a of {args.files} files into global {t_cp or float('nan'):.1f} s, "
            f"{total} global entries at a after {t_ae or float('nan'):.1f} s "
            f"(anti-entropy of {want} keys and the cp's own)"
        )
        print(
            "daemon CPU during the load: "
            + ", ".join(f"{n} {c:.1f} s" for n, c in cpu.items())
            + f" (wall {time.perf_counter() - t_load:.1f} s)"
        )
        s = sorted(watch.stat_ms)
        print(
            f"a's answer to a read of .dreki/requests, ms: p50 {quantile(s, 0.5):.1f}, "
            f"p99 {quantile(s, 0.99):.1f}, max {s[-1]:.1f} ({len(s)} samples)"
        )
        print("\nSWIM counters during the load (a: since its start)")
        print(f"{'peer':5}" + "".join(f"{c[:13]:>14}" for c in SWIM_COUNTERS))
        for n in NODES:
            b0 = base.get(n, {})
            row = (after[n].get(f"swim.{c}", 0) - b0.get(f"swim.{c}", 0) for c in SWIM_COUNTERS)
            print(f"{n:5}" + "".join(f"{v:14d}" for v in row))
        seen = sorted({(o, st) for _, o, st in watch.not_alive})
        where = ", ".join(f"{o} {st}" for o, st in seen) or "never"
        first = f"; first at {watch.not_alive[0][0]:.1f} s" if seen else ""
        print(f"\na seen other than alive: {len(watch.not_alive)} samples ({where}{first})")
        print("stalls of each daemon's loop over 250 ms (.dreki/loop), whole run:")
        for n in NODES:
            try:
                lines = (mounts[n] / ".dreki" / "loop").read_text().splitlines()
            except FileNotFoundError:  # a daemon from before .dreki/loop
                print(f"  {n}: not counted")
                continue
            loop = dict(line.split() for line in lines)
            print(f"  {n}: {loop['stalls']} stalls, longest {loop['longest_stall_ms']} ms")
        refuted = after["a"].get("swim.refutations", 0)
        print(f"a refuted {refuted} suspicions of itself")
        ok = not watch.not_alive and refuted == 0
        print(f"[{'met' if ok else 'missed'}] the busy peer is never suspected")
        return 0 if ok or not args.check else 1
    except SystemExit:
        for n in mounted:
            print(f"members at {n}: {members_states(mounts[n])}", file=sys.stderr)
        raise
    finally:
        stop.set()
        for n in list(mounted):
            subprocess.run([*DREKIFS, "umount", str(mounts[n])], env=env, capture_output=True,
                           timeout=120)  # fmt: skip
        keep_logs(work, NODES, args.keep_logs)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
