"""Anti-entropy bench: bytes and round trips of one sync between two diverged stores, and the
hash tree's cost at a million keys.

    python bench/antientropy.py [--keys 100000] [--diverge 10000] [--million 1000000] [--seed 1]
        [--no-memory] [--tree-only]

Stores are :class:`MemorySource` (dict, last writer wins), the network the in-memory
:class:`~tests.harness.simnet.SimWorld` on trio's MockClock (1-2 ms per leg); protocol bytes
are msgpack bytes of every request and reply, counted by :class:`AntiEntropy` itself. See
bench/README.md.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The repository root: drekifs from this checkout and the simulations in tests/harness/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgpack
import trio
import trio.testing

from drekifs.cluster.antientropy import (
    AntiEntropy,
    HashTree,
    SyncResult,
    TreeShape,
    version_digest,
)
from tests.harness.memsource import MemorySource
from tests.harness.simnet import SimWorld

A, B = ("10.0.0.1", 7946), ("10.0.0.2", 7946)


def key_of(i: int) -> bytes:
    return b"node%02d.eu.example.net\0/projects/p%03d/data/file-%07d.bin" % (i % 37, i % 997, i)


def entry_bytes(source: MemorySource, key: bytes) -> int:
    entry = source.entries.get(key)
    return 0 if entry is None else len(msgpack.packb([key, list(entry)]))


def diverge(
    a: MemorySource,
    b: MemorySource,
    n: int,
    base: int,
    rng: random.Random,
    value: Callable[[], bytes] | None = None,
) -> list[bytes]:
    """Make ``n`` keys differ: 30% newer on each side, 10% concurrent, 10% new on each side
    (as many as n allows), 5% deleted (a tombstone) on each side; a single key is new on A.
    Values from ``value`` (100-1000 random bytes by default). Returns the keys."""
    value = value or (lambda: rng.randbytes(rng.randrange(100, 1001)))
    picks = rng.sample(range(base), n)
    plan = (
        ["a"] * (3 * n // 10)
        + ["b"] * (3 * n // 10)
        + ["both"] * (n // 10)
        + ["del-a"] * (n // 20)
        + ["del-b"] * (n // 20)
    )
    plan += ["new-a", "new-b"] * ((n - len(plan)) // 2)
    plan += ["new-a"] * (n - len(plan))
    keys = []
    for i, (what, pick) in enumerate(zip(plan, picks, strict=True)):
        v = value()
        key = key_of(base + i) if what.startswith("new") else key_of(pick)
        keys.append(key)
        if what in ("a", "new-a", "both"):
            a.put(key, 2, "peer-a", v)
        if what in ("b", "new-b", "both"):
            b.put(key, 2, "peer-b", v)
        if what == "del-a":
            a.put(key, 3, "peer-a", None)
        if what == "del-b":
            b.put(key, 3, "peer-b", None)
    return keys


def two_stores(keys: int, rng: random.Random, value: Callable[[], bytes]) -> tuple:
    a, b = MemorySource(HashTree()), MemorySource(HashTree())
    for i in range(keys):
        key, v = key_of(i), value()
        a.put(key, 1, "seed", v)
        b.put(key, 1, "seed", v)  # the same objects: half the memory
    return a, b


def sync_once(a: MemorySource, b: MemorySource, seed: int) -> tuple[SyncResult, SyncResult, float]:
    """A syncs with B, then again (which must find them in sync); (results, wall seconds)."""
    out: list[Any] = []

    async def main() -> None:
        async with SimWorld(seed=seed, delay=(0.001, 0.002)) as world:
            ae_a = AntiEntropy("a", world.network(A), a.tree, a, rng=random.Random(seed))
            AntiEntropy("b", world.network(B), b.tree, b, rng=random.Random(seed + 1))
            started = time.perf_counter()
            out.append(await ae_a.sync(B))
            out.append(time.perf_counter() - started)
            out.append(await ae_a.sync(B))

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    first, wall, second = out
    return first, second, wall


def report(label: str, result: SyncResult, wall: float, differing: int, winners: int) -> None:
    total = result.bytes_sent + result.bytes_received
    print(f"\n{label}")
    print(
        f"  protocol bytes      {total:>12,}  (sent {result.bytes_sent:,}, "
        f"received {result.bytes_received:,})"
    )
    if differing:
        print(f"  differing entries   {differing:>12,}  bytes (both sides' versions)")
        print(f"  ratio               {total / differing:>12.2f}  protocol / differing entries")
        print(f"  ratio to winners    {total / winners:>12.2f}  protocol / winning entries only")
    print(
        f"  buckets {result.buckets:,}, pulled {result.pulled:,}, pushed {result.pushed:,}, "
        f"changed here {result.changed_here:,} / there {result.changed_there:,}"
    )
    print(
        f"  round trips {result.round_trips}, simulated {result.seconds * 1000:.1f} ms, "
        f"wall {wall:.2f} s"
    )


Row = tuple[str, int, int, float, int]  # case, protocol bytes, differing bytes, ratio, trips
TINY = (8, 33)  # tiny values: 8-32 bytes
LARGE = (100, 1001)  # the default: 100-1000 bytes, ~550 on average


def divergence_run(
    a: MemorySource,
    b: MemorySource,
    n: int,
    *,
    keys: int,
    base: int,
    values: tuple[int, int],
    seed: int,
    rng: random.Random,
) -> Row:
    """Make ``n`` keys differ (new ones from key number ``base`` on), sync, check, report."""
    low, high = values
    started = time.perf_counter()
    # One key: a value of the mean size, so that the ratio does not hang on one random draw.
    mean = (low + high) // 2
    size = (lambda: mean) if n == 1 else (lambda: rng.randrange(low, high))
    changed = diverge(a, b, n, base, rng, lambda: rng.randbytes(size())) if n else []
    differing = sum(entry_bytes(a, k) + entry_bytes(b, k) for k in changed)
    expected = {}
    for k in changed:
        ea, eb = a.entries.get(k), b.entries.get(k)
        expected[k] = max((e for e in (ea, eb) if e is not None), key=lambda e: e[:2])
    winners = sum(len(msgpack.packb([k, list(e)])) for k, e in expected.items())
    setup = time.perf_counter() - started
    first, second, wall = sync_once(a, b, seed)
    converged = a.tree.root() == b.tree.root() and all(
        a.entries.get(k) == b.entries.get(k) == e for k, e in expected.items()
    )
    size = f"{low}-{high - 1} B values"
    label = f"{n:,} differing keys of {keys:,}, {size} (setup {setup:.1f} s)"
    report(label, first, wall, differing, winners or 1)
    print(
        f"  converged: {converged}; second sync in sync: {second.in_sync} "
        f"({second.bytes_sent + second.bytes_received} bytes, {second.round_trips} round trip)"
    )
    assert converged and second.in_sync
    total = first.bytes_sent + first.bytes_received
    ratio = total / differing if differing else 0.0
    return (f"{n:,} of {keys:,}, {size}", total, differing, ratio, first.round_trips)


def single_updates(
    a: MemorySource, b: MemorySource, tries: int, *, keys: int, values: tuple[int, int], seed: int
) -> Row:
    """``tries`` times, one key of the ``keys`` written anew on one side (a value of the mean
    size), one sync: the median and worst ratio, and how often the sketch listed it (both
    sides' versions differ: two items, which the sketch does not always peel)."""
    rng = random.Random(seed)
    mean = (values[0] + values[1]) // 2
    runs = []  # (ratio, protocol bytes, differing bytes, round trips)
    for t in range(tries):
        key = key_of(rng.randrange(keys))
        (a if t % 2 else b).put(key, 10 + t, "writer", rng.randbytes(mean))
        differing = entry_bytes(a, key) + entry_bytes(b, key)
        first, second, _ = sync_once(a, b, seed + t)
        assert a.entries[key] == b.entries[key] and second.in_sync
        total = first.bytes_sent + first.bytes_received
        runs.append((total / differing, total, differing, first.round_trips))
    runs.sort()
    by_sketch = sum(trips <= 2 for *_, trips in runs)
    median, worst = runs[len(runs) // 2], runs[-1]
    size = f"{values[0]}-{values[1] - 1} B values"
    print(
        f"\n1 key updated on one side, {tries} times, of {keys:,}, {size}: ratio median "
        f"{median[0]:.2f}, worst {worst[0]:.2f}; listed by the sketch {by_sketch} of {tries} times"
    )
    label = (
        f"1 updated of {keys:,}, {size} (median of {tries}; worst {worst[0]:.2f}, "
        f"by the sketch {by_sketch} of {tries})"
    )
    return (label, median[1], median[2], median[0], median[3])


def hundred_thousand_runs(keys: int, large_diff: int, seed: int) -> list[Row]:
    """Divergences over ``keys`` keys: large values, then a store of tiny values only."""
    rng = random.Random(seed)
    rows = []
    for values, cases in ((LARGE, (0, 1, 10, large_diff)), (TINY, (1, 10))):
        started = time.perf_counter()
        a, b = two_stores(keys, rng, lambda v=values: rng.randbytes(rng.randrange(*v)))
        took = time.perf_counter() - started
        print(f"\ntwo stores of {keys:,} keys, {values[0]}-{values[1] - 1} B values: {took:.1f} s")
        base = keys
        for n in cases:
            common = dict(keys=keys, base=base, values=values, seed=seed, rng=rng)
            rows.append(divergence_run(a, b, n, **common))
            base += max(n, 1)
        rows.append(single_updates(a, b, 100, keys=keys, values=values, seed=seed))
        del a, b
    return rows


def tree_memory(keys: int, seed: int) -> None:
    print(f"\nHash tree at {keys:,} keys (default shape {TreeShape().fanout}-way, depth 4)")
    pairs = ((key_of(i), version_digest(1, "seed")) for i in range(keys))
    tree = HashTree()
    started = time.process_time()
    tree.start_build()
    tree.build(pairs)
    tree.finish_build()
    print(f"  build               {time.process_time() - started:>9.1f} s of CPU")
    rng = random.Random(seed)
    picks = [key_of(rng.randrange(keys)) for _ in range(100_000)]
    digests = [version_digest(rng.randrange(1 << 40), "x") for _ in range(100_000)]
    started = time.process_time()
    for k, d in zip(picks, digests, strict=True):
        tree.set(k, d)
    per_set = (time.process_time() - started) / len(picks)
    print(
        f"  set()               {per_set * 1e6:>9.2f} us of CPU per write (100,000 random updates)"
    )
    del tree
    gc.collect()
    # Memory: the same build again under tracemalloc (which slows it several times).
    tracemalloc.start()
    tree = HashTree()
    tree.start_build()
    tree.build((key_of(i), version_digest(1, "seed")) for i in range(keys))
    tree.finish_build()
    memory, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    key_bytes = sum(len(key_of(i)) for i in range(0, keys, 97)) / len(range(0, keys, 97))
    print(
        f"  memory              {memory / 2**20:>9.0f} MiB = {memory / keys:.0f} B/key "
        f"(key content {key_bytes:.0f} B; the rest digests, containers and node hashes)"
    )
    del tree
    gc.collect()


def million_runs(keys: int, seed: int) -> list[Row]:
    """Divergences over a million keys: base values of one size and shared (memory), so the
    protocol bytes are nearly all hashes, bucket listings and the differing entries."""
    rng = random.Random(seed)
    rows = []
    for values, cases in ((LARGE, (1, 10)), (TINY, (1, 10))):
        value = b"v" * ((values[0] + values[1]) // 2)
        started = time.perf_counter()
        a, b = two_stores(keys, rng, lambda v=value: v)
        took = time.perf_counter() - started
        print(f"\ntwo stores of {keys:,} keys of {len(value)} B: {took:.1f} s")
        base = keys
        for n in cases:
            common = dict(keys=keys, base=base, values=values, seed=seed, rng=rng)
            rows.append(divergence_run(a, b, n, **common))
            base += n
        rows.append(single_updates(a, b, 100, keys=keys, values=values, seed=seed))
        del a, b
        gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--diverge", type=int, default=10_000)
    parser.add_argument("--million", type=int, default=1_000_000, help="0 to skip")
    parser.add_argument("--no-memory", action="store_true", help="skip the tree's memory")
    parser.add_argument("--tree-only", action="store_true", help="only the tree's memory")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    started = time.perf_counter()
    if args.tree_only:
        tree_memory(args.million, args.seed)
        return
    rows = hundred_thousand_runs(args.keys, args.diverge, args.seed)
    if args.million:
        if not args.no_memory:
            tree_memory(args.million, args.seed)
        rows += million_runs(args.million, args.seed)
    print("\n| case | protocol bytes | differing bytes | ratio | round trips |")
    print("|---|---|---|---|---|")
    for case, total, differing, ratio, trips in rows:
        shown = f"{ratio:.2f}" if differing else "—"
        print(f"| {case} | {total:,} | {differing:,} | {shown} | {trips} |")
    print(f"\nbench wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
