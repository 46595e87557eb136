"""Anti-entropy: the hash tree (O(1) updates, builds, removal) and the sync protocol between
in-memory stores on the simulated network (convergence, both directions, paging, bytes, junk,
determinism). All protocol tests run on trio's MockClock."""

from __future__ import annotations

import collections
import errno
import functools
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import example, given, settings
from hypothesis import strategies as st

from drekifs.cluster.antientropy import (
    AntiEntropy,
    AntiEntropyConfig,
    HashTree,
    Malformed,
    SyncResult,
    TreeShape,
    hashtree,
    version_digest,
)
from drekifs.cluster.antientropy.sync import LISTING_SLICE, MERGE_SLICE
from drekifs.cluster.net import PeerUnreachable, RemoteError

from ..harness.memsource import MemorySource
from ..harness.simnet import SimWorld

SMALL = TreeShape(fanout_bits=2, depth=3)  # 64 buckets: several keys share one
SKETCH = HashTree(SMALL).sketch().to_bytes()  # an empty tree's
CONFIG = AntiEntropyConfig(interval=10.0)
# Tiny messages: every listing, export and push is paged.
PAGED = AntiEntropyConfig(reply_bytes=300, request_bytes=300, max_items=5, export_batch=2)


def addr(i: int) -> tuple[str, int]:
    return (f"10.0.0.{i + 1}", 7946)


def simulate(fn: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``fn`` under a MockClock (for hypothesis tests, which cannot be async)."""
    return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


def peers(
    world: SimWorld,
    n: int,
    shape: TreeShape = SMALL,
    config: AntiEntropyConfig = CONFIG,
) -> list[AntiEntropy]:
    out = []
    for i in range(n):
        source = MemorySource(HashTree(shape))
        ae = AntiEntropy(
            f"p{i}",
            world.network(addr(i)),
            source.tree,
            source,
            config=config,
            rng=world.rng(str(i)),
        )
        out.append(ae)
    names = {f"p{i}": addr(i) for i in range(n)}
    for ae in out:
        ae.set_peers(names)
    return out


def store(ae: AntiEntropy) -> MemorySource:
    assert isinstance(ae.source, MemorySource)
    return ae.source


def fresh_root(source: MemorySource) -> bytes:
    """The root of a tree built from scratch over the store's current digests."""
    tree = HashTree(source.tree.shape)
    tree.start_build()
    tree.build((k, version_digest(e[0], e[1])) for k, e in source.entries.items())
    tree.finish_build()
    return tree.root()


def assert_converged(*aes: AntiEntropy) -> None:
    first = store(aes[0])
    for ae in aes[1:]:
        assert store(ae).entries == first.entries
        assert ae.tree.root() == aes[0].tree.root()
    assert aes[0].tree.root() == fresh_root(first)


def lww(*sources: MemorySource) -> dict[bytes, tuple]:
    """What every store must hold after convergence: the larger (hlc, peer) per key."""
    out: dict[bytes, tuple] = {}
    for source in sources:
        for k, e in source.entries.items():
            if k not in out or e[:2] > out[k][:2]:
                out[k] = e
    return out


# -- The hash tree ------------------------------------------------------------------------------

ops = st.lists(
    st.tuples(
        st.sampled_from(["set", "remove"]),
        st.binary(min_size=0, max_size=6),
        st.binary(min_size=16, max_size=16),
    ),
    max_size=60,
)


@given(ops)
@settings(max_examples=60, deadline=None)
def test_incremental_tree_equals_a_fresh_build(operations: list) -> None:
    tree = HashTree(SMALL)
    state: dict[bytes, bytes] = {}
    for op, key, digest in operations:
        if op == "set":
            tree.set(key, digest)
            state[key] = digest
        else:
            tree.remove(key)
            state.pop(key, None)
    fresh = HashTree(SMALL)
    for key, digest in sorted(state.items(), reverse=True):  # another order
        fresh.set(key, digest)
    assert tree.root() == fresh.root()
    assert tree.sketch().to_bytes() == fresh.sketch().to_bytes()
    assert len(tree) == len(state)
    assert dict(tree.items()) == state
    for level in range(SMALL.depth + 1):
        for i in range(SMALL.width(level)):
            assert tree.node(level, i) == fresh.node(level, i)
    if not state:
        assert tree.root() == bytes(16)


# Keys that are prefixes and substrings of each other, of their length bytes and of digests:
# the packed records of one bucket must never mistake one for another.
tricky_keys = st.sampled_from(
    [b"", b"a", b"aa", b"aaa", b"\x00", b"\x00\x01a", b"\x00\x02aa", b"a\x00\x01", b"d" * 3]
) | st.binary(max_size=4)


@given(
    st.lists(
        st.tuples(st.booleans(), tricky_keys, st.sampled_from([b"a" * 16, b"d" * 16, bytes(16)])),
        max_size=40,
    )
)
@settings(max_examples=80, deadline=None)
def test_packed_buckets_behave_as_a_dict(operations: list) -> None:
    """Two buckets only (most keys share one): set, remove, get, items and short ids agree
    with a dict, and the node hashes with a tree built from the dict."""
    shape = TreeShape(fanout_bits=1, depth=1)
    tree = HashTree(shape)
    state: dict[bytes, bytes] = {}
    for is_set, key, digest in operations:
        if is_set:
            tree.set(key, digest)
            state[key] = digest
        else:
            tree.remove(key)
            state.pop(key, None)
        assert tree.get(key) == state.get(key)
    assert dict(tree.items()) == state and len(tree) == len(state)
    for key in {k for _, k, _ in operations}:
        assert tree.get(key) == state.get(key)
    for bucket in range(shape.leaves):
        for window in range(hashtree.WINDOWS):
            pairs = tree.short_ids(bucket, window)
            assert len(pairs) == len(tree.bucket_items(bucket))
            for item, key in pairs:
                full = hashtree.item_hash(key, state[key])
                assert item == full[window * 4 : window * 4 + 4]
                assert tree.item_id(key) == full[: hashtree.ITEM_ID_BYTES]
    fresh = HashTree(shape)
    for key, digest in state.items():
        fresh.set(key, digest)
    assert [tree.node(1, i) for i in range(2)] == [fresh.node(1, i) for i in range(2)]
    with pytest.raises(ValueError):
        tree.set(b"k", b"short digest")


def _element(n: int) -> int:
    """A sketch element as items make them: a bucket and 4 bytes of a hash."""
    item = int.from_bytes(hashtree.key_hash(b"%d" % n), "big")
    return hashtree.element(n % 65536, item)


@given(
    st.sets(st.integers(), max_size=30),
    st.sets(st.integers(), max_size=4),
    st.sets(st.integers(), max_size=4),
)
@settings(max_examples=200, deadline=None)
def test_a_sketch_difference_peels_exactly_or_not_at_all(
    common: set[int], only_ours: set[int], only_theirs: set[int]
) -> None:
    """Peeling their sketch minus ours gives exactly the elements each side alone holds, or
    None (too many to list), or, rarely from 3 elements on (a mix of elements in a cell
    passed for a single one), a list naming an element that neither side alone holds: the
    exchange refuses that list, as it names no item (the next test)."""
    only_ours, only_theirs = only_ours - common, only_theirs - common - only_ours
    ours, theirs = hashtree.Sketch(6), hashtree.Sketch(6)
    for sketch, elements in ((ours, common | only_ours), (theirs, common | only_theirs)):
        for n in elements:
            sketch.toggle(_element(n), 1)
    peeled = hashtree.peel(ours, theirs.to_bytes())
    if peeled is not None:
        expected = ({_element(n) for n in only_theirs}, {_element(n) for n in only_ours})
        got = (set(peeled[0]), set(peeled[1]))
        if got[0] <= expected[0] and got[1] <= expected[1]:
            assert got == expected  # true elements only: then all of them
        else:
            assert len(only_ours | only_theirs) >= 3
    if len(only_ours | only_theirs) <= 1:
        assert peeled is not None  # one element always peels
    assert hashtree.peel(ours, ours.to_bytes()) == ([], [])


async def test_a_list_naming_no_item_of_ours_is_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A list whose element names no item here (a mix of items peeled as one, which the
    peer's check could not see): its entries are merged, nothing is pushed, and the exchange
    starts over without the sketch."""
    async with SimWorld(seed=15) as world:
        source, a = lone_peer(world, TWO_LEVELS)
        starts: list[Any] = []

        async def start(_src: Any, args: Any) -> Any:
            starts.append(args["sketch"])
            if len(starts) == 1:  # an element of bucket 0 that is not ours
                return {"entries": [[b"theirs", [1, "b", b"x"]]], "want": bytes(5)}
            return {"hashes": None}

        world.network(addr(1)).register("ae2.start", start)
        result = await a.sync(addr(1))
        assert starts[0] is not None and starts[1] is None
        assert a.counters["sketch_refused"] == 1 and a.counters["sketch_listed"] == 0
        assert result.pulled == 1 and result.pushed == 0 and result.in_sync
        assert source.entries[b"theirs"] == (1, "b", b"x")


@given(
    st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 400), st.integers(2, 9)), max_size=3)
)
@settings(max_examples=40, deadline=None)
def test_small_differences_converge_through_the_sketch(writes: list) -> None:
    """Up to 3 keys of 301 differ (or are new: keys over 300): one sync converges, by the
    sketch's list when it peels (one or two round trips), by the descent when it does not."""

    async def main() -> None:
        async with SimWorld(seed=14) as world:
            a, b = peers(world, 2, shape=TreeShape())
            for k in range(301):
                for ae in (a, b):
                    store(ae).put(b"k%d" % k, 1, "x", b"v")
            for side, k, hlc in writes:
                store(a if side == "a" else b).put(b"k%d" % k, hlc, side, b"w%d" % hlc)
            expected = lww(store(a), store(b))
            result = await a.sync(addr(1))
            assert_converged(a, b)
            assert store(a).entries == expected
            if a.counters["sketch_listed"]:
                assert result.round_trips <= 2
            if len(writes) == 1 and writes[0][1] > 300:
                assert a.counters["sketch_listed"] == 1  # one new item: it always peels

    simulate(main)


def test_a_write_touches_one_path_only() -> None:
    """O(1) per write: a set or remove changes depth + 1 node hashes, whatever the size."""
    tree = HashTree()  # default shape: 65,536 buckets
    for i in range(20_000):
        tree.set(b"loc\0/k%d" % i, version_digest(i, "a"))

    def snapshot() -> list[list[int]]:
        return [list(level) for level in tree._levels]

    for op in ("update", "insert", "remove"):
        before = snapshot()
        if op == "update":
            tree.set(b"loc\0/k7", version_digest(99, "b"))
        elif op == "insert":
            tree.set(b"loc\0/new", version_digest(1, "b"))
        else:
            tree.remove(b"loc\0/k8")
        after = snapshot()
        changed = sum(
            a != b
            for la, lb in zip(before, after, strict=True)
            for a, b in zip(la, lb, strict=True)
        )
        assert changed == tree.shape.depth + 1, op
    # A no-op write changes nothing.
    before = snapshot()
    tree.set(b"loc\0/k9", version_digest(9, "a"))
    tree.remove(b"absent")
    assert snapshot() == before


def test_build_in_chunks_with_writes_meanwhile() -> None:
    pairs = [(b"k%d" % i, version_digest(i, "a")) for i in range(500)]
    tree = HashTree(SMALL, ready=False)
    tree.start_build()
    tree.build(pairs[:200])
    assert not tree.ready
    tree.set(b"k300", version_digest(1000, "b"))  # written after the snapshot was read
    tree.remove(b"k400")  # deleted and collected after the snapshot was read
    tree.set(b"k100", version_digest(1001, "b"))  # over a pair already built
    tree.build(pairs[200:])
    tree.finish_build()
    assert tree.ready
    assert tree.get(b"k300") == version_digest(1000, "b")
    assert tree.get(b"k100") == version_digest(1001, "b")
    assert tree.get(b"k400") is None
    expected = dict(pairs)
    expected[b"k300"] = version_digest(1000, "b")
    expected[b"k100"] = version_digest(1001, "b")
    del expected[b"k400"]
    fresh = HashTree(SMALL)
    for k, d in expected.items():
        fresh.set(k, d)
    assert tree.root() == fresh.root()
    with pytest.raises(RuntimeError):
        tree.build(pairs)


def test_marked_keys_are_settled_at_the_next_read() -> None:
    """A store may only mark a changed key: the tree asks its digest when next read, once for
    a burst of changes to one key, and a mark made during a build wins over the build's pair."""
    store: dict[bytes, bytes] = {}
    asked: list[bytes] = []

    def digest_of(key: bytes) -> bytes | None:
        asked.append(key)
        return store.get(key)

    tree = HashTree(SMALL, ready=False, digest_of=digest_of)
    tree.start_build()
    tree.build([(b"a", version_digest(1, "x")), (b"gone", version_digest(1, "x"))])
    for hlc in (2, 3, 4):  # created, written, chmod-ed
        store[b"b"] = version_digest(hlc, "x")
        tree.mark(b"b")
    store[b"a"] = version_digest(5, "x")
    tree.mark(b"a")
    tree.mark(b"gone")  # deleted, its tombstone collected: no digest
    tree.build([(b"a", version_digest(1, "x")), (b"b", version_digest(1, "x"))])  # older
    tree.finish_build()
    assert asked == []  # nothing settled before a read
    assert tree.root() == _tree_of(store).root()
    assert sorted(asked) == [b"a", b"b", b"gone"]  # once each
    assert dict(tree.items()) == store
    # Past SETTLE_AFTER marks, they are settled without a read.
    for i in range(hashtree.SETTLE_AFTER):
        store[b"k%d" % i] = version_digest(i, "y")
        tree.mark(b"k%d" % i)
    assert not tree._marked
    with pytest.raises(RuntimeError):
        HashTree(SMALL).mark(b"a")  # made without digest_of
    # A digest that cannot be read (the store failing): the keys not settled stay marked.
    broken = {b"x"}

    def flaky(key: bytes) -> bytes | None:
        if key in broken:
            raise OSError("store unreadable")
        return store.get(key)

    tree.digest_of = flaky
    store[b"w"], store[b"x"], store[b"y"] = (version_digest(9, "z"),) * 3
    for key in (b"w", b"x", b"y"):
        tree.mark(key)
    with pytest.raises(OSError):
        tree.settle()
    assert list(tree._marked) == [b"x", b"y"]
    broken.clear()
    assert dict(tree.items()) == store


def _tree_of(pairs: dict[bytes, bytes]) -> HashTree:
    tree = HashTree(SMALL)
    for key, digest in pairs.items():
        tree.set(key, digest)
    return tree


async def test_build_async_yields_between_chunks() -> None:
    tree = HashTree(SMALL)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await tree.build_async(((b"k%d" % i, b"d" * 16) for i in range(1000)), chunk=100)
        nursery.cancel_scope.cancel()
    assert tree.ready and len(tree) == 1000
    assert ticks >= 5


# -- Sync between two and several stores -------------------------------------------------------

divergence = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "both"]),
        st.integers(0, 40),  # key: a small range, so both sides often touch the same key
        st.integers(1, 30),  # hlc
        st.one_of(st.none(), st.binary(max_size=40)),  # None: a tombstone
    ),
    max_size=80,
)


@given(divergence, st.sampled_from([CONFIG, PAGED]), st.booleans())
@settings(max_examples=40, deadline=None)
def test_two_diverged_stores_converge_in_one_sync(writes: list, config: Any, collect: bool) -> None:
    async def main() -> None:
        async with SimWorld(seed=1) as world:
            a, b = peers(world, 2, config=config)
            for side, k, hlc, value in writes:
                key = b"loc\0/%d" % k
                for ae, name in ((a, "a"), (b, "b")):
                    if side in (name, "both"):
                        store(ae).put(key, hlc, name, value)
            if collect:  # some tombstones collected on one side only
                for k in list(store(a).entries)[::3]:
                    if store(a).entries[k][2] is None:
                        store(a).collect(k)
            expected = lww(store(a), store(b))
            only_a = {k for k in store(a).entries if store(b).entries.get(k) != store(a).entries[k]}
            only_b = {k for k in store(b).entries if store(a).entries.get(k) != store(b).entries[k]}
            a_won = {k for k in only_a if expected[k] == store(a).entries[k]}
            result = await a.sync(addr(1))
            assert_converged(a, b)
            assert store(a).entries == expected
            assert result.in_sync == (not only_a and not only_b)
            # Both directions were repaired.
            assert result.changed_there == len(a_won)
            assert result.changed_here == len(only_b - a_won)
            again = await a.sync(addr(1))
            assert again.in_sync and again.round_trips == 1

    simulate(main)


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 60), st.integers(1, 9)), max_size=60))
@settings(max_examples=20, deadline=None)
def test_several_stores_converge(writes: list) -> None:
    """A round: every peer syncs with peer 0 (which then holds everything), twice."""

    async def main() -> None:
        async with SimWorld(seed=2) as world:
            aes = peers(world, 4)
            for i, k, hlc in writes:
                store(aes[i]).put(b"k%d" % k, hlc, f"p{i}", b"v%d" % hlc)
            expected = lww(*map(store, aes))
            for _ in range(2):
                for ae in aes[1:]:
                    await ae.sync(addr(0))
            assert_converged(*aes)
            assert store(aes[0]).entries == expected

    simulate(main)


async def test_periodic_sync_converges_a_cluster(autojump_clock: trio.testing.MockClock) -> None:
    async with SimWorld(seed=3) as world:
        aes = peers(world, 5)
        for i, ae in enumerate(aes):
            for k in range(30):
                store(ae).put(b"k%d-%d" % (i, k), k + 1, f"p{i}", b"x" * k)
        for i, ae in enumerate(aes):
            world.start_soon(addr(i), ae.run)
        await trio.sleep(CONFIG.interval * 8)
        assert_converged(*aes)
        assert len(store(aes[0]).entries) == 150
        stats = aes[0].stats()
        assert stats["keys"] == 150 and stats["ready"]
        assert stats["counters"]["syncs"] >= 5
        some = next(iter(stats["peers"].values()))
        assert {"at", "result", "bytes_sent", "bytes_received", "round_trips"} <= some.keys()


async def test_bytes_grow_with_the_difference(autojump_clock: trio.testing.MockClock) -> None:
    async with SimWorld(seed=4) as world:
        a, b = peers(world, 2, shape=TreeShape())
        value = b"v" * 500
        for k in range(20_000):
            key = b"loc.example\0/dir/file-%06d" % k
            store(a).put(key, 1, "a", value)
            store(b).put(key, 1, "a", value)
        in_sync = await a.sync(addr(1))
        assert in_sync.in_sync and in_sync.bytes_sent + in_sync.bytes_received < 200
        for k in range(0, 20_000, 2000):  # 10 keys differ, 5 newer on each side
            key = b"loc.example\0/dir/file-%06d" % k
            store(a if k % 4000 else b).put(key, 2, "b", value)
        result = await a.sync(addr(1))
        assert_converged(a, b)
        total = result.bytes_sent + result.bytes_received
        # 10 entries pulled, the 5 that won here pushed; 4-byte hashes of 10 paths (64 bytes a
        # node), 10 small buckets (4 bytes a pair). The first protocol's 16-byte hashes, one
        # level a round trip, took 7 round trips and ~16 KB.
        assert result.pulled == 10 and result.pushed == 5
        assert total < 15 * 600 + 2500
        # 20 differing items are too many for the sketch: start, down x2, leaves, merge.
        assert result.round_trips == 5 and a.counters["sketch_listed"] == 0
        assert result.changed_here == 5 and result.changed_there == 5
        # One key new here: the sketch lists it, the push follows (2 round trips, ~170 bytes
        # beside the entry); one key new there: its entry comes with the start's reply.
        for writer, pushed, trips in ((a, 1, 2), (b, 0, 1)):
            store(writer).put(b"loc.example\0/dir/new-%d" % trips, 1, "a", value)
            result = await a.sync(addr(1))
            assert_converged(a, b)
            assert result.round_trips == trips and result.pushed == pushed
            assert result.pulled + result.pushed == 1
            assert result.bytes_sent + result.bytes_received < 550 + 200
        assert a.counters["sketch_listed"] == 2


class TaskSteps(trio.abc.Instrument):
    """Counts task steps: two calls made in the same step had no checkpoint between them."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1


async def test_a_large_page_is_merged_in_slices(autojump_clock: trio.testing.MockClock) -> None:
    """A page of thousands of tiny entries held a daemon's loop for seconds, its SWIM acks
    with it: merged MERGE_SLICE at a time, with a checkpoint in between, both when pulling
    and when a peer pushes; the buckets of a big difference are listed in slices too."""
    async with SimWorld(seed=7) as world:
        a, b = peers(world, 2, shape=TreeShape())
        for k in range(3000):
            store(b if k % 3 else a).put(b"k%05d" % k, 1, "x", b"v")
        steps = TaskSteps()
        slices: list[tuple[int, int]] = []  # (entries merged in one call, task step)

        def watch(source: MemorySource) -> None:
            merge = source.merge

            def sliced(entries: list) -> int:
                slices.append((len(entries), steps.steps))
                return merge(entries)

            source.merge = sliced  # type: ignore[method-assign]

        watch(store(a))
        watch(store(b))
        listings: collections.Counter[int] = collections.Counter()  # task step -> buckets
        for tree in (a.tree, b.tree):
            short_ids = tree.short_ids

            def counted(bucket: int, window: int, short_ids: Any = short_ids) -> Any:
                listings[steps.steps] += 1
                return short_ids(bucket, window)

            tree.short_ids = counted  # type: ignore[method-assign]
        trio.lowlevel.add_instrument(steps)
        try:
            result = await a.sync(addr(1))
        finally:
            trio.lowlevel.remove_instrument(steps)
        assert result.pulled == 2000 and result.pushed == 1000
        assert_converged(a, b)
        assert MERGE_SLICE <= 1024  # ~35 ms of merging at 34 us an entry
        assert max(n for n, _ in slices) <= MERGE_SLICE and len(slices) >= 3000 // MERGE_SLICE
        assert len({step for _, step in slices}) == len(slices)  # a checkpoint between any two
        assert listings.total() > 2 * LISTING_SLICE
        assert max(listings.values()) <= LISTING_SLICE


class CountedListings(AntiEntropy):
    """Counts the listing requests it serves at once; each takes 50 ms (simulated CPU)."""

    active = most = 0

    async def _on_listing(self, args: Any) -> dict[str, Any]:
        self.active += 1
        self.most = max(self.most, self.active)
        try:
            await trio.sleep(0.05)
            return await super()._on_listing(args)
        finally:
            self.active -= 1


async def test_one_request_served_at_a_time(autojump_clock: trio.testing.MockClock) -> None:
    """Peers that all exchange with one member at once (it came back) are served in turn, so
    the member's loop never runs several big listings side by side."""
    async with SimWorld(seed=8) as world:
        source = MemorySource(HashTree(TreeShape()))
        member = CountedListings("p0", world.network(addr(0)), source.tree, source, config=CONFIG)
        others = []
        for i in (1, 2, 3):
            theirs = MemorySource(HashTree(TreeShape()))
            net = world.network(addr(i))
            others.append(AntiEntropy(f"p{i}", net, theirs.tree, theirs, config=CONFIG))
        for k in range(2000):
            for ae in others:
                store(ae).put(b"k%05d" % k, 1, "x", b"v")
        async with trio.open_nursery() as nursery:
            for ae in others:
                nursery.start_soon(functools.partial(ae.sync, addr(0), push=False))
        assert member.most == 1
        assert member.counters["served"] >= 3 * 2  # each exchange listed at least once


async def test_push_limit_leaves_a_big_difference_to_the_peer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A returning member that lacks much is catching up by itself: pushed only up to the
    limit; the few writes it missed still go."""
    async with SimWorld(seed=9) as world:
        a, b = peers(world, 2, shape=TreeShape())
        for k in range(3000):
            store(a).put(b"k%05d" % k, 1, "x", b"v")
        result = await a.sync(addr(1), push_limit=1000)
        assert result.pushed == 0 and a.counters["push_left_to_peer"] == 1
        await b.sync(addr(0))  # its own catch-up
        store(a).put(b"late", 2, "x", b"w")
        result = await a.sync(addr(1), push_limit=1000)
        assert result.pushed == 1
        assert_converged(a, b)


async def test_paging_moves_everything(autojump_clock: trio.testing.MockClock) -> None:
    async with SimWorld(seed=5) as world:
        a, b = peers(world, 2, config=PAGED)
        for k in range(200):
            store(a if k % 2 else b).put(b"key-%03d" % k, k + 1, "x", bytes(k))
        result = await a.sync(addr(1))
        assert_converged(a, b)
        assert result.pulled == 100 and result.pushed == 100
        assert result.round_trips > 50  # small pages
        # One entry bigger than a whole page still travels (alone).
        store(b).put(b"huge", 5, "y", bytes(5000))
        await a.sync(addr(1))
        assert store(a).entries[b"huge"][2] == bytes(5000)


async def test_removal_of_collected_tombstones(autojump_clock: trio.testing.MockClock) -> None:
    async with SimWorld(seed=6) as world:
        a, b = peers(world, 2)
        for ae in (a, b):
            store(ae).put(b"gone", 3, "a", None)
            store(ae).put(b"kept", 3, "a", b"v")
        for ae in (a, b):
            store(ae).collect(b"gone")
        assert a.tree.get(b"gone") is None and len(a.tree) == 1
        assert (await a.sync(addr(1))).in_sync
        # Collected on one side only: the other one's tombstone comes back (the store decides
        # what to do with it; anti-entropy only makes both sides agree).
        store(a).put(b"gone2", 4, "a", None)
        store(b).put(b"gone2", 4, "a", None)
        store(a).collect(b"gone2")
        result = await a.sync(addr(1))
        assert result.pulled == 1 and result.pushed == 0
        assert_converged(a, b)


async def test_full_sync_for_a_newcomer_and_pull_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with SimWorld(seed=7) as world:
        a, b = peers(world, 2)
        for k in range(300):
            store(b).put(b"k%d" % k, 1, "b", b"v")
        store(a).put(b"stale", 1, "a", b"old")
        result = await a.full_sync(addr(1), push=False)
        assert not result.in_sync and result.exchanges == CONFIG.full_sync_rounds
        assert len(store(a).entries) == 301 and b"stale" not in store(b).entries
        completed: list[SyncResult] = []
        a.on_sync = completed.append  # what replication counts as contact with a peer
        result = await a.full_sync(addr(1))
        assert result.in_sync
        # Once per exchange of the full sync, each a completed one, the last one in sync:
        assert len(completed) == result.exchanges and completed[-1].in_sync
        assert_converged(a, b)


# -- Junk, failures, determinism ----------------------------------------------------------------


async def test_malformed_requests_are_refused(autojump_clock: trio.testing.MockClock) -> None:
    async with SimWorld(seed=8) as world:
        (a,) = peers(world, 1)
        store(a).put(b"k", 1, "a", b"v")
        raw = world.network(addr(9))
        junk = [
            ("ae.root", None),
            ("ae.root", {"shape": [4, 4], "root": bytes(16)}),  # another shape
            ("ae.root", {"shape": [2, 3], "root": b"short"}),
            ("ae.nodes", {"level": 3, "nodes": [0]}),  # leaves have no children
            ("ae.nodes", {"level": 1, "nodes": [4]}),  # no such node
            ("ae.nodes", {"level": True, "nodes": [0]}),
            ("ae.nodes", {"level": 0, "nodes": list(range(100_000))}),
            ("ae.leaves", {"buckets": [64], "after": None}),
            ("ae.leaves", {"buckets": [0], "after": 7}),
            ("ae.leaves", {"buckets": "all"}),
            ("ae.export", {"buckets": [0], "ids": b"short"}),  # not one 8-byte id per bucket
            ("ae.export", {"buckets": [0, 0]}),  # no ids
            # A well-formed entry the store would take, under a key over max_key_bytes:
            ("ae.merge", {"entries": [[b"x" * 10_000, [1, "z", b"v"]]]}),
            ("ae.merge", {"entries": [[b"k"]]}),
            ("ae.merge", {"entries": [[b"k", [1, 2, 3]]]}),  # the store refuses it
            ("ae.merge", {"entries": [[b"k", "junk"]]}),
            ("ae.merge", [1, 2]),
            # The second protocol:
            ("ae2.start", {"shape": [4, 4], "root": bytes(16), "w": 0, "sketch": SKETCH}),
            ("ae2.start", {"shape": [2, 3], "root": bytes(16), "w": 4, "sketch": SKETCH}),
            ("ae2.start", {"shape": [2, 3], "root": bytes(16), "w": 0, "sketch": bytes(15)}),
            ("ae2.down", {"w": 0, "level": 0, "nodes": [0], "hashes": bytes(16)}),  # start's
            ("ae2.down", {"w": 0, "level": 3, "nodes": [0], "hashes": bytes(16)}),  # leaves
            ("ae2.down", {"w": 0, "level": 1, "nodes": [4], "hashes": bytes(16)}),
            ("ae2.down", {"w": 0, "level": 2, "nodes": [0, 1], "hashes": bytes(16)}),
            ("ae2.down", {"w": 0, "level": 2, "nodes": list(range(16)), "hashes": bytes(1024)}),
            ("ae2.leaves", {"w": 0, "buckets": [64], "counts": [0], "ids": b""}),
            ("ae2.leaves", {"w": 0, "buckets": [0], "counts": [1, 1], "ids": bytes(8)}),
            ("ae2.leaves", {"w": 0, "buckets": [0], "counts": [2], "ids": bytes(4)}),
            (  # ids out of order
                "ae2.leaves",
                {"w": 0, "buckets": [0], "counts": [2], "ids": b"zzzzaaaa", "after": None},
            ),
            (
                "ae2.leaves",
                {"w": 0, "buckets": [0], "counts": [0], "ids": b"", "after": b"x", "upto": None},
            ),
            (  # more ids than a request may carry
                "ae2.leaves",
                {"w": 0, "buckets": [0], "counts": [70_000], "ids": bytes(280_000)},
            ),
        ]
        for method, args in junk:
            with pytest.raises(RemoteError) as info:
                await raw.call(addr(0), method, args, timeout=5)
            assert info.value.code == errno.EINVAL, (method, args)
        assert a.counters["bad_requests"] == len(junk)
        assert store(a).entries == {b"k": (1, "a", b"v")}
        # Still serving.
        reply = await raw.call(addr(0), "ae.root", {"shape": [2, 3], "root": bytes(16)}, timeout=5)
        assert reply["root"] == a.tree.root()


async def test_a_tree_being_built_answers_eagain(autojump_clock: trio.testing.MockClock) -> None:
    async with SimWorld(seed=9) as world:
        a, b = peers(world, 2)
        b.tree.start_build()
        with pytest.raises(RemoteError) as info:
            await a.sync(addr(1))
        assert info.value.code == errno.EAGAIN
        with pytest.raises(RuntimeError):
            await b.sync(addr(0))


def junk_peer(world: SimWorld, replies: dict[str, Any]) -> None:
    """A peer at addr(1) that answers the given methods with the given (bad) replies."""
    net = world.network(addr(1))
    for method, reply in replies.items():

        async def handler(_src: Any, _args: Any, reply: Any = reply) -> Any:
            return reply

        net.register(method, handler)


SHALLOW = TreeShape(fanout_bits=2, depth=1)  # the root's children are the leaf buckets


def lone_peer(world: SimWorld, shape: TreeShape = SHALLOW) -> tuple[MemorySource, AntiEntropy]:
    """A peer at addr(0) holding one pair."""
    source = MemorySource(HashTree(shape))
    source.put(b"mine", 1, "a", b"v")
    return source, AntiEntropy("a", world.network(addr(0)), source.tree, source, config=CONFIG)


ROOT = {"root": b"\x01" * 16, "children": b"\x01" * 64}  # every bucket differs
LISTING = {"ids": b"12345678", "counts": [1, 0, 0, 0], "next": None}
BAD_REPLIES = [
    {"ae.root": "nonsense"},
    {"ae.root": {"root": bytes(16), "children": b"short"}},
    {"ae.root": ROOT, "ae.leaves": {"ids": b"12345678"}},
    {"ae.root": ROOT, "ae.leaves": {"ids": b"1234567", "counts": [1, 0, 0, 0], "next": None}},
    {"ae.root": ROOT, "ae.leaves": {"ids": b"12345678", "counts": [1], "next": None}},
    {"ae.root": ROOT, "ae.leaves": {"ids": b"12345678", "counts": [1, 0, 0, 0, 0], "next": None}},
    {  # a continuation that makes no progress
        "ae.root": ROOT,
        "ae.leaves": {"ids": b"", "counts": [0], "next": [0, b"12345678"]},
    },
    {  # a continuation from another bucket than its last id's
        "ae.root": ROOT,
        "ae.leaves": {"ids": b"12345678", "counts": [1, 0], "next": [0, b"12345678"]},
    },
    {  # an entry nobody asked for
        "ae.root": ROOT,
        "ae.leaves": LISTING,
        "ae.export": {"entries": [[b"k", [1, "x", b""]], [b"k2", [1, "x", b""]]], "done": 1},
    },
    {  # the store refuses the entry
        "ae.root": ROOT,
        "ae.leaves": LISTING,
        "ae.export": {"entries": [[b"k", [-1, "x", b""]]], "done": 1},
    },
    {  # no progress
        "ae.root": ROOT,
        "ae.leaves": LISTING,
        "ae.export": {"entries": [], "done": 0},
    },
    {  # the merge reply
        "ae.root": ROOT,
        "ae.leaves": LISTING,
        "ae.export": {"entries": [], "done": 1},
        "ae.merge": {"changed": 5},
    },
]


TWO_LEVELS = TreeShape(fanout_bits=2, depth=2)  # for the second protocol: start, down, leaves
# Stand-ins the test fills in for the peer holding only b"mine": ONE, a start reply in which
# only mine's level-1 node differs; MINE, a down reply in which only its bucket differs; WANT,
# the sketch element of our pair (a fast-path reply asking for it).
LISTED = {"entries": [], "lack": b"", "next": None}
BAD_REPLIES_V2 = [
    {"ae2.start": "nonsense"},
    {"ae2.start": {"hashes": b"short"}},
    {"ae2.start": {"entries": "x", "want": b""}},
    {"ae2.start": {"entries": [], "want": b"12"}},  # not whole elements (5 bytes here)
    {"ae2.start": {"entries": [], "want": bytes(5 * 37)}},  # more than a peel lists
    {"ae2.start": {"entries": [[b"mine", [-1, "x", b""]]], "want": b""}},  # refused
    {"ae2.start": {"entries": [], "want": "WANT"}, "ae.merge": {"changed": 5}},
    {"ae2.start": "ONE", "ae2.down": {"bits": b"\x00\x00", "hashes": None}},  # too long
    {"ae2.start": "ONE", "ae2.down": {"bits": b"\x08", "hashes": None}},  # a bit past 4
    {"ae2.start": "ONE", "ae2.down": {"bits": b"\xf0", "hashes": bytes(16)}},  # below leaves
    {"ae2.start": "ONE", "ae2.down": "MINE", "ae2.leaves": {**LISTED, "lack": b"\x00\x00"}},
    {  # entries nobody asked for (only our pair's bucket is asked)
        "ae2.start": "ONE",
        "ae2.down": "MINE",
        "ae2.leaves": {
            "entries": [[b"k%d" % i, [1, "x", b""]] for i in range(8)],
            "lack": b"\x00",
            "next": None,
        },
    },
    {  # a continuation that makes no progress
        "ae2.start": "ONE",
        "ae2.down": "MINE",
        "ae2.leaves": {"entries": [[b"mine", [2, "x", b""]]], "lack": b"", "next": [0, None]},
    },
    {  # a continuation with no entries
        "ae2.start": "ONE",
        "ae2.down": "MINE",
        "ae2.leaves": {"entries": [], "lack": b"", "next": [1, None]},
    },
    {  # the store refuses the entry
        "ae2.start": "ONE",
        "ae2.down": "MINE",
        "ae2.leaves": {"entries": [[b"mine", [-1, "x", b""]]], "lack": b"\x00", "next": None},
    },
    {
        "ae2.start": "ONE",
        "ae2.down": "MINE",
        "ae2.leaves": {**LISTED, "lack": b"\x80"},  # the peer lacks our pair: a push
        "ae.merge": {"changed": 5},
    },
]


def stand_ins(tree: HashTree, window: int) -> dict[str, Any]:
    """ONE, MINE and WANT (see BAD_REPLIES_V2) for a tree holding b"mine" only."""
    leaf = tree.bucket(b"mine")
    fanout = tree.shape.fanout
    hashes = bytearray(tree.short_children(0, 0, window))
    at = leaf // fanout * hashtree.SHORT_BYTES
    hashes[at : at + hashtree.SHORT_BYTES] = b"\x01\x01\x01\x01"  # this node differs
    item = int.from_bytes(hashtree.item_hash(b"mine", tree.get(b"mine") or b""), "big")
    return {
        "ONE": {"hashes": bytes(hashes)},
        "MINE": {"bits": bytes([0x80 >> leaf % fanout]), "hashes": None},
        "WANT": hashtree.element(leaf, item).to_bytes(tree.sketch().element_bytes, "big"),
    }


async def test_a_peer_of_the_first_protocol_still_converges(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An older peer answers ae2.* with ENOSYS: the exchange falls back to the first protocol
    (which this peer still serves, too)."""
    async with SimWorld(seed=12) as world:
        a, b = peers(world, 2)
        for method in ("ae2.start", "ae2.down", "ae2.leaves"):

            async def unknown(_src: Any, _args: Any, method: str = method) -> Any:
                raise RemoteError(errno.ENOSYS, f"no method {method}")

            b.net.register(method, unknown)
        for k in range(60):
            store(a if k % 3 else b).put(b"k%d" % k, k + 1, "x", b"v%d" % k)
        result = await a.sync(addr(1))
        assert_converged(a, b)
        assert a.counters["first_protocol"] == 1
        assert result.round_trips == 1 + 6  # refused start; root, nodes x2, leaves, export, merge
        assert (await b.sync(addr(0))).in_sync  # an old initiator (b) meets a new responder


@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 80), st.integers(1, 9)), max_size=120),
    st.sampled_from([PAGED, AntiEntropyConfig(reply_bytes=120, request_bytes=40, max_items=3)]),
)
# Four keys on one side peel to a list longer than max_items: the responder descends instead.
@example(
    [(True, k, 1) for k in range(4)],
    AntiEntropyConfig(reply_bytes=120, request_bytes=40, max_items=3),
)
@settings(max_examples=30, deadline=None)
def test_big_buckets_are_listed_in_id_ranges(writes: list, config: Any) -> None:
    """Four buckets of up to ~20 pairs, requests of 3-5 ids and replies of a few entries:
    listings go in id ranges and entries in continuations, and one sync still converges."""
    shape = TreeShape(fanout_bits=1, depth=2)

    async def main() -> None:
        async with SimWorld(seed=13) as world:
            a, b = peers(world, 2, shape=shape, config=config)
            for on_a, k, hlc in writes:
                store(a if on_a else b).put(b"key%d" % k, hlc, "a" if on_a else "b", b"v" * hlc)
            expected = lww(store(a), store(b))
            await a.sync(addr(1))
            assert_converged(a, b)
            assert store(a).entries == expected
            assert (await a.sync(addr(1))).in_sync

    simulate(main)


@pytest.mark.parametrize("replies", BAD_REPLIES + BAD_REPLIES_V2)
async def test_malformed_replies_end_the_exchange(
    autojump_clock: trio.testing.MockClock, replies: dict
) -> None:
    """Replies of both protocols (a peer that does not serve ae2.start gets the first)."""
    second = "ae2.start" in replies
    async with SimWorld(seed=10) as world:
        source, a = lone_peer(world, TWO_LEVELS if second else SHALLOW)
        window = (a.counters["syncs"] + 1) % hashtree.WINDOWS  # the first exchange's
        fill = stand_ins(source.tree, window)
        replies = {m: fill.get(r, r) if isinstance(r, str) else r for m, r in replies.items()}
        if isinstance(replies.get("ae2.start"), dict) and "want" in replies["ae2.start"]:
            want = replies["ae2.start"]["want"]
            replies["ae2.start"] = {**replies["ae2.start"], "want": fill.get(want, want)}
        junk_peer(world, replies)
        with pytest.raises(Malformed):
            await a.sync(addr(1))
        assert source.entries == {b"mine": (1, "a", b"v")}
        assert a.counters["first_protocol"] == int(not second)
        # The loop counts it and goes on.
        a.set_peers({"b": addr(1)})
        with trio.move_on_after(CONFIG.interval * 3.5):
            await a.run()
        assert a.counters["bad_replies"] >= 2
        assert a.stats()["peers"]["b"]["result"].startswith("bad reply")


async def test_unreachable_peers_are_counted(autojump_clock: trio.testing.MockClock) -> None:
    async with SimWorld(seed=11) as world:
        a, _, c = peers(world, 3)
        store(c).put(b"k", 1, "c", b"v")
        world.crash(addr(1))
        a.on_sync = lambda result: pytest.fail("an exchange that failed is no contact")
        with pytest.raises(PeerUnreachable):
            await a.sync(addr(1))
        a.on_sync = None
        world.start_soon(addr(0), a.run)
        await trio.sleep(CONFIG.interval * 12)
        assert a.counters["unreachable"] >= 1
        assert store(a).entries == store(c).entries


def test_deterministic_for_a_seed() -> None:
    def trace(seed: int) -> list:
        log: list = []

        async def main() -> None:
            async with SimWorld(seed=seed, delay=(0.001, 0.05)) as world:
                world.tap = lambda t, src, dst, kind, msg: log.append((t, src, dst, kind))
                aes = peers(world, 4)
                rng = random.Random(seed)
                for i, ae in enumerate(aes):
                    for _ in range(40):
                        store(ae).put(b"k%d" % rng.randrange(60), rng.randrange(9), f"p{i}", b"v")
                for i, ae in enumerate(aes):
                    world.start_soon(addr(i), ae.run)
                await trio.sleep(CONFIG.interval * 6)
                log.append([ae.stats() for ae in aes])

        simulate(main)
        return log

    assert trace(1) == trace(1)
    assert trace(1) != trace(2)
