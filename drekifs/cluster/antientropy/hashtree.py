"""A fixed-shape hash tree over (entry key -> version digest), updated in O(1) per write.

Shape: ``depth`` levels below the root, each node with ``2 ** fanout_bits`` children; the
default (16-way, depth 4) has 65,536 leaf buckets. A key's bucket is the first
``fanout_bits * depth`` bits of BLAKE2b(key), so keys spread evenly whatever their paths, and a
node at level ``L`` covers the buckets whose number starts with its own ``fanout_bits * L`` bits.

Hashes: an *item* hash is BLAKE2b-128(BLAKE2b-128(key) || digest); a node's hash is the XOR of
the item hashes of every key below it (the root's: of every key). XOR makes a write an O(1)
update: ``set`` XORs (old item hash ^ new item hash) into its leaf and each of its ``depth``
ancestors, ``depth + 1`` integer XORs whatever the size of the store, and never recomputes a
path. XOR is safe here because a key occurs once per tree (no item can cancel a twin) and item
hashes are keyed by the whole key and digest; an empty subtree hashes to zero. Equal sets give
equal hashes whatever the order of writes, so two peers compare nodes directly.

Keys per bucket are kept in memory, packed: one ``bytes`` per non-empty bucket holding its
records back to back, ``[key length: 2 bytes][key][digest: 16 bytes]`` (no dict, no object per
key). Listing a differing bucket is then a walk of one short string, not a range scan of the
store (keys in a bucket are scattered all over the store's key order), and no store index has
to be kept in step. The cost is the key plus 18 bytes per key, and 33 bytes per non-empty bucket
(bench/antientropy.py measures it at 1M keys: docs/decisions.md, issue 17). A write copies its
bucket's string (a few keys: at 1M keys ~15 records, about a kilobyte).

Beside the node hashes, a *sketch* of the items (an invertible Bloom lookup table,
:class:`Sketch`): a few cells, each a count, an XOR of the (bucket, item id) of the items mapped
to it and an XOR of a check of each; a write updates 3 cells per item it adds or removes. The
difference of two peers' sketches lists the items that differ, when they are few (see
:func:`peel`): anti-entropy then skips the descent of the tree.

Building at start: :meth:`HashTree.start_build`, then :meth:`HashTree.build` over the store's
(key, digest) pairs in chunks (or :meth:`HashTree.build_async`, which yields to trio between
chunks), then :meth:`HashTree.finish_build`. Writes go through :meth:`HashTree.set` /
:meth:`HashTree.remove` all along; a key written during the build is remembered, and the build's
(older) pair for it is skipped. ``ready`` is False until the build finishes: readers of the
store are never blocked, only anti-entropy waits. All methods must be called from one thread
(the trio thread): the XOR updates are read-modify-write.

A store may also just :meth:`HashTree.mark` a key as changed: its digest is then asked of
``digest_of`` when the tree is next read (every reading method settles the marks first), or
once ``SETTLE_AFTER`` keys are marked. A file copied in (created, written, its mode set) then
costs the tree one update instead of one per change, off the request that made the change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import trio

HASH_BYTES = 16
DIGEST_BYTES = 16  # a version digest (stores/version.py)
SHORT_BYTES = 4
"""Node hashes and item ids in the second protocol are 4-byte windows of the full 16 bytes;
the initiator takes another window (of HASH_BYTES // SHORT_BYTES) each exchange, so two hashes
equal by chance in one window (odds 2**-32) are told apart in the next exchange."""
WINDOWS = HASH_BYTES // SHORT_BYTES
MAX_KEY_BYTES = 0xFFFF  # a record's key length takes two bytes
ITEM_ID_BYTES = 8
"""A (key, digest) pair is named by the first 8 bytes of its item hash in bucket listings: two
pairs of one bucket (a handful of keys) collide with odds of about 2**-60."""
_KEY_PERSON = b"dreki-ae-key"
_ITEM_PERSON = b"dreki-ae-item"
_EMPTY: Mapping[bytes, bytes] = {}
SETTLE_AFTER = 1024  # marked keys, at most, before they are settled anyway (~5 ms of updates)


@dataclass(frozen=True, slots=True)
class TreeShape:
    """``depth`` levels of ``2 ** fanout_bits`` children; both peers must use the same."""

    fanout_bits: int = 4
    depth: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.fanout_bits <= 8 or not 1 <= self.depth <= 8:
            raise ValueError("fanout_bits and depth must be within 1..8")
        if self.fanout_bits * self.depth > 24:
            raise ValueError("at most 2**24 leaf buckets")

    @property
    def fanout(self) -> int:
        return 1 << self.fanout_bits

    @property
    def leaves(self) -> int:
        return 1 << (self.fanout_bits * self.depth)

    def width(self, level: int) -> int:
        """How many nodes level ``level`` has (0: the root)."""
        return 1 << (self.fanout_bits * level)

    def to_wire(self) -> list[int]:
        return [self.fanout_bits, self.depth]


def key_hash(key: bytes) -> bytes:
    return hashlib.blake2b(key, digest_size=HASH_BYTES, person=_KEY_PERSON).digest()


def _item(khash: bytes, digest: bytes) -> int:
    h = hashlib.blake2b(khash, digest_size=HASH_BYTES, person=_ITEM_PERSON)
    h.update(digest)
    return int.from_bytes(h.digest(), "big")


def item_hash(key: bytes, digest: bytes) -> bytes:
    """The 16-byte item hash of a (key, digest) pair."""
    return _item(key_hash(key), digest).to_bytes(HASH_BYTES, "big")


def short(hashes: bytes, window: int) -> bytes:
    """The ``window``-th 4-byte slice of each 16-byte hash in ``hashes`` (concatenated)."""
    at = window * SHORT_BYTES
    return b"".join(
        hashes[i + at : i + at + SHORT_BYTES] for i in range(0, len(hashes), HASH_BYTES)
    )


def records(packed: bytes) -> Iterator[tuple[bytes, bytes]]:
    """The (key, digest) pairs of a bucket's packed records."""
    at, end = 0, len(packed)
    while at < end:
        klen = packed[at] << 8 | packed[at + 1]
        key_end = at + 2 + klen
        yield packed[at + 2 : key_end], packed[key_end : key_end + DIGEST_BYTES]
        at = key_end + DIGEST_BYTES


def _find(packed: bytes, key: bytes) -> int:
    """Where ``key``'s record starts in ``packed``, -1 if it has none."""
    if key not in packed:  # a C search first: a key new to the bucket costs no walk
        return -1
    at, end, size = 0, len(packed), len(key)
    while at < end:
        klen = packed[at] << 8 | packed[at + 1]
        if klen == size and packed.startswith(key, at + 2):
            return at
        at += 2 + klen + DIGEST_BYTES
    return -1


SKETCH_TABLES = 3  # cells an item is counted in, one per table
SKETCH_SPAN = 3  # cells per table
SKETCH_CELLS = SKETCH_TABLES * SKETCH_SPAN
MAX_PEELED = 4 * SKETCH_CELLS  # elements one peel lists, at most


def element(bucket: int, item: int) -> int:
    """An item in a sketch: its bucket and its item id's first 4 bytes (``item`` as an int)."""
    return bucket << 32 | item >> 96


def _cells(elem: int) -> tuple[int, int, int]:
    """The cell of each table ``elem`` is counted in (from its item id's bytes: random)."""
    return (
        (elem & 0xFF) % SKETCH_SPAN,
        SKETCH_SPAN + (elem >> 8 & 0xFF) % SKETCH_SPAN,
        2 * SKETCH_SPAN + (elem >> 16 & 0xFF) % SKETCH_SPAN,
    )


class Sketch:
    """An invertible Bloom lookup table of (bucket, item id) elements, updated in O(1): per
    cell a count (sent mod 256) and the XOR of its elements. An element is ``element_bytes``
    on the wire: the bucket's bytes (2 for 65,536 buckets) and 4 of the item id."""

    def __init__(self, element_bytes: int) -> None:
        self.element_bytes = element_bytes
        self.counts = [0] * SKETCH_CELLS
        self.elements = [0] * SKETCH_CELLS

    @property
    def size(self) -> int:
        """Bytes on the wire."""
        return SKETCH_CELLS * (1 + self.element_bytes)

    def toggle(self, elem: int, sign: int) -> None:
        """Add (``sign`` 1) or remove (-1) an element."""
        counts, elements = self.counts, self.elements
        for cell in _cells(elem):
            counts[cell] += sign
            elements[cell] ^= elem

    def to_bytes(self) -> bytes:
        width = self.element_bytes
        return b"".join(
            (c & 0xFF).to_bytes(1, "big") + e.to_bytes(width, "big")
            for c, e in zip(self.counts, self.elements, strict=True)
        )


def peel(ours: Sketch, theirs: bytes) -> tuple[list[int], list[int]] | None:
    """The elements only they hold and those only we hold, from their sketch (``ours.size``
    bytes) minus ours; None when the difference is too large to list (no cell left holds a
    single element, and not all are empty). A cell holds a single element when its count is
    1 or -1 and that element maps to it; a mix that passes for one ends in cells not all empty
    (or, with odds of 2**-32, in a list that the caller's check of the roots refuses)."""
    width = 1 + ours.element_bytes
    counts, elements = [], []
    for cell in range(SKETCH_CELLS):
        raw = theirs[cell * width : (cell + 1) * width]
        diff = (raw[0] - ours.counts[cell]) & 0xFF
        counts.append(diff - 256 if diff >= 128 else diff)
        elements.append(int.from_bytes(raw[1:], "big") ^ ours.elements[cell])
    only_theirs: list[int] = []
    only_ours: list[int] = []
    for _ in range(MAX_PEELED):  # each round takes one element out, or stops
        for cell in range(SKETCH_CELLS):
            elem = elements[cell]
            if counts[cell] in (1, -1) and cell in _cells(elem):
                break
        else:
            break
        sign = counts[cell]
        (only_theirs if sign == 1 else only_ours).append(elem)
        for c in _cells(elem):
            counts[c] -= sign
            elements[c] ^= elem
    if any(counts) or any(elements):
        return None
    return only_theirs, only_ours


class HashTree:
    """Node hashes of every level plus the packed (key, digest) records of every leaf bucket."""

    def __init__(
        self,
        shape: TreeShape | None = None,
        *,
        ready: bool = True,
        digest_of: Callable[[bytes], bytes | None] | None = None,
    ) -> None:
        self.shape = shape or TreeShape()
        self.digest_of = digest_of
        """A key's current digest (None: gone), for the keys :meth:`mark` names."""
        self.ready = ready
        """False while a build is under way: the tree is then incomplete."""
        self._bits = self.shape.fanout_bits
        self._depth = self.shape.depth
        self._total_bits = self._bits * self._depth
        # _levels[L][i]: the hash of node i at level L, as an int (XOR is cheap on ints).
        self._levels: list[list[int]] = [
            [0] * self.shape.width(level) for level in range(self._depth + 1)
        ]
        self._buckets: list[bytes | None] = [None] * self.shape.leaves
        self._sketch = Sketch((self._total_bits + 7) // 8 + SHORT_BYTES)
        self._count = 0
        self._touched: set[bytes] | None = None  # keys written during a build
        self._marked: dict[bytes, None] = {}  # changed keys not settled yet, in order

    # -- Reading (each settles the marked keys first) -----------------------------------------

    def __len__(self) -> int:
        self.settle()
        return self._count

    def bucket(self, key: bytes) -> int:
        """The leaf bucket of ``key``."""
        return self._bucket_of(key_hash(key))

    def _bucket_of(self, khash: bytes) -> int:
        return int.from_bytes(khash[:4], "big") >> (32 - self._total_bits)

    def get(self, key: bytes) -> bytes | None:
        self.settle()
        packed = self._buckets[self.bucket(key)]
        at = -1 if packed is None else _find(packed, key)
        if packed is None or at < 0:
            return None
        start = at + 2 + len(key)
        return packed[start : start + DIGEST_BYTES]

    def root(self) -> bytes:
        self.settle()
        return self._levels[0][0].to_bytes(HASH_BYTES, "big")

    def node(self, level: int, index: int) -> bytes:
        self.settle()
        return self._levels[level][index].to_bytes(HASH_BYTES, "big")

    def children(self, level: int, index: int) -> bytes:
        """The hashes of node (``level``, ``index``)'s children, concatenated (fanout * 16
        bytes); ``level`` < depth."""
        self.settle()
        fanout = self.shape.fanout
        below = self._levels[level + 1][index * fanout : (index + 1) * fanout]
        return b"".join(h.to_bytes(HASH_BYTES, "big") for h in below)

    def sketch(self) -> Sketch:
        """The items' sketch (live: not to be modified)."""
        self.settle()
        return self._sketch

    def key_of(self, elem: int) -> bytes | None:
        """The key of the item a sketch element names, None if none here (or gone)."""
        bucket, item = elem >> 32, (elem & 0xFFFFFFFF).to_bytes(SHORT_BYTES, "big")
        if bucket >= self.shape.leaves:
            return None
        for short_id, key in self.short_ids(bucket, 0):
            if short_id == item:
                return key
        return None

    def short_children(self, level: int, index: int, window: int) -> bytes:
        """:meth:`children`, each hash cut to its ``window``-th 4 bytes."""
        return short(self.children(level, index), window)

    def bucket_items(self, bucket: int) -> Mapping[bytes, bytes]:
        """The (key -> digest) pairs of a leaf bucket (a new dict)."""
        self.settle()
        packed = self._buckets[bucket]
        return _EMPTY if packed is None else dict(records(packed))

    def short_ids(self, bucket: int, window: int) -> list[tuple[bytes, bytes]]:
        """(short item id, key) of the pairs of a leaf bucket: the ``window``-th 4 bytes of
        each item hash."""
        self.settle()
        packed = self._buckets[bucket]
        if packed is None:
            return []
        at = window * SHORT_BYTES
        return [
            (item_hash(key, digest)[at : at + SHORT_BYTES], key) for key, digest in records(packed)
        ]

    def item_ids(self, bucket: int) -> dict[bytes, bytes]:
        """Item id (see ITEM_ID_BYTES) -> key, for the pairs of a leaf bucket."""
        out = {}
        for key, digest in self.bucket_items(bucket).items():
            out[_item(key_hash(key), digest).to_bytes(HASH_BYTES, "big")[:ITEM_ID_BYTES]] = key
        return out

    def item_id(self, key: bytes) -> bytes | None:
        """The item id of ``key``'s current pair, None if absent."""
        digest = self.get(key)
        if digest is None:
            return None
        return _item(key_hash(key), digest).to_bytes(HASH_BYTES, "big")[:ITEM_ID_BYTES]

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        self.settle()
        for packed in self._buckets:
            if packed:
                yield from records(packed)

    # -- Writing ------------------------------------------------------------------------------

    def set(self, key: bytes, digest: bytes) -> None:
        """``key``'s current version now has ``digest`` (a write, a delete's tombstone, a
        merge). O(depth + 1) integer XORs."""
        if self._touched is not None:
            self._touched.add(key)
        self._put(key, digest)

    def remove(self, key: bytes) -> None:
        """``key`` is gone altogether (its tombstone was collected)."""
        if self._touched is not None:
            self._touched.add(key)
        khash = key_hash(key)
        bucket = self._bucket_of(khash)
        packed = self._buckets[bucket]
        at = -1 if packed is None else _find(packed, key)
        if packed is None or at < 0:
            return
        start = at + 2 + len(key)
        old = packed[start : start + DIGEST_BYTES]
        rest = packed[:at] + packed[start + DIGEST_BYTES :]
        self._buckets[bucket] = rest or None  # empty buckets cost nothing
        self._count -= 1
        gone = _item(khash, old)
        self._sketch.toggle(element(bucket, gone), -1)
        self._xor(bucket, gone)

    def update(self, key: bytes, digest: bytes | None) -> None:
        """:meth:`set`, or :meth:`remove` when ``digest`` is None; nothing when unchanged."""
        if digest is None:
            self.remove(key)
        else:
            self.set(key, digest)

    def mark(self, key: bytes) -> None:
        """``key`` changed: its digest is asked of ``digest_of`` at the next read. A burst of
        changes to one key costs one update."""
        if self.digest_of is None:
            raise RuntimeError("mark() needs a tree made with digest_of")
        if self._touched is not None:
            self._touched.add(key)
        self._marked[key] = None
        if len(self._marked) >= SETTLE_AFTER:
            self.settle()

    def settle(self) -> None:
        """Apply the marked changes now."""
        if not self._marked:
            return
        marked, self._marked = self._marked, {}
        digest_of = self.digest_of
        assert digest_of is not None  # mark() checked
        done = 0
        try:
            for key in marked:
                self.update(key, digest_of(key))
                done += 1
        finally:
            if done < len(marked):  # digest_of failed: what is left stays marked
                self._marked = dict.fromkeys(list(marked)[done:]) | self._marked

    def _put(self, key: bytes, digest: bytes) -> None:
        if len(digest) != DIGEST_BYTES or len(key) > MAX_KEY_BYTES:
            raise ValueError("a digest is 16 bytes, a key at most 65,535")
        khash = key_hash(key)
        bucket = self._bucket_of(khash)
        packed = self._buckets[bucket] or b""
        at = _find(packed, key)
        new = delta = _item(khash, digest)
        if at < 0:
            self._count += 1
            self._buckets[bucket] = packed + len(key).to_bytes(2, "big") + key + digest
        else:
            start = at + 2 + len(key)
            old = packed[start : start + DIGEST_BYTES]
            if old == digest:
                return
            gone = _item(khash, old)
            delta ^= gone
            self._sketch.toggle(element(bucket, gone), -1)
            self._buckets[bucket] = packed[:start] + digest + packed[start + DIGEST_BYTES :]
        self._sketch.toggle(element(bucket, new), 1)
        self._xor(bucket, delta)

    def _xor(self, bucket: int, delta: int) -> None:
        shift = 0
        for level in range(self._depth, -1, -1):
            self._levels[level][bucket >> shift] ^= delta
            shift += self._bits

    # -- Building -----------------------------------------------------------------------------

    def start_build(self) -> None:
        """Begin a build: not ``ready`` until :meth:`finish_build`; writes meanwhile win over
        the build's pairs for the same keys."""
        self.ready = False
        self._touched = set()

    def build(self, items: Iterable[tuple[bytes, bytes]]) -> int:
        """Add a chunk of the store's (key, digest) pairs; returns how many were taken."""
        touched = self._touched
        if touched is None:
            raise RuntimeError("build() outside start_build() / finish_build()")
        taken = 0
        for key, digest in items:
            if key not in touched:
                self._put(key, digest)
                taken += 1
        return taken

    def finish_build(self) -> None:
        self._touched = None
        self.ready = True

    async def build_async(self, items: Iterable[tuple[bytes, bytes]], *, chunk: int = 4096) -> None:
        """The whole build, ``chunk`` pairs at a time with a trio checkpoint between chunks
        (about 10 ms of CPU each), so the peer keeps serving meanwhile."""
        self.start_build()
        batch: list[tuple[bytes, bytes]] = []
        for pair in items:
            batch.append(pair)
            if len(batch) >= chunk:
                self.build(batch)
                batch.clear()
                await trio.sleep(0)
        self.build(batch)
        self.finish_build()
