"""The shapes of anti-entropy messages, checked field by field.

Whatever a peer sends is checked here before any of it is used: a message that does not have
the expected shape raises :class:`Malformed` (the responder answers EINVAL, the initiator drops
the exchange), so no handler or exchange ever trips over a bad type or a huge count.

Two protocols. The second (``ae2.*``, since issue 17) lists a small difference from a sketch
of the items, or descends two tree levels per round trip with 4-byte windows of the hashes,
and ends with the peer's entries in the reply to our listing; the first (``ae.*``) is kept,
served and used as a fallback, for peers that do not know the second (they answer ENOSYS).
``ae.merge`` serves both.

Second protocol (``w``: which 4-byte window of every 16-byte hash and item hash, 0..3; a bitmap
is bytes, bit ``i`` = byte ``i // 8``, bit ``7 - i % 8``, unused bits zero; an element is a
bucket (2 bytes for 65,536 buckets) and the first 4 bytes of an item hash, see
hashtree.Sketch):

- ``ae2.start`` {shape, root: hash, w, sketch: 9 cells} -> {hashes: None} when the roots
  agree; {entries: [[key, entry]] we lack, want: elements of ours the peer lacks} when the
  sketches' difference lists the items; else {hashes: the peer's level-1 short hashes}.
- ``ae2.down``  {w, level: L, nodes: [index at L], hashes: our short hashes of their children}
  -> {bits: which of those children differ (bitmap, fanout bits per node), hashes: the peer's
  short hashes of the children of each differing child, in order (None when those children
  are leaf buckets)}.
- ``ae2.leaves`` {w, buckets: [bucket], counts: [n per bucket], ids: our short item ids,
  sorted within a bucket, concatenated, after: short id | None, upto: short id | None} ->
  {entries: [[key, entry]] the peer's pairs whose id we did not list (within a bucket in id
  order; the first bucket only past ``after``, the last only up to ``upto``: a bucket larger
  than a request goes in id ranges), lack: bitmap over our ids of what is done (the peer has no
  such pair), next: None | [i, id | None]}: with ``next``, ``buckets[:i]`` are done and bucket
  ``i`` up to ``id``.

First protocol (all dicts with short str keys):

- ``ae.root``   {shape: [fanout_bits, depth], root: hash} ->
  {root: hash, children: concatenated child hashes | None when the roots agree}
- ``ae.nodes``  {level: L, nodes: [index]} -> {hashes: concatenated child hashes, in order}
- ``ae.leaves`` {buckets: [bucket], after: id | None} ->
  {ids: concatenated item ids, counts: [n per bucket], next: [i, id] | None}: the item ids
  (8 bytes naming a (key, digest) pair, see hashtree.ITEM_ID_BYTES) of the buckets in order,
  sorted within a bucket, ``after`` skipping the first bucket's ids up to it; ``next`` says
  where to continue (``buckets[i:]``, after ``id``) when the reply filled up.
- ``ae.export`` {buckets: [bucket], ids: concatenated item ids, one per bucket} ->
  {entries: [[key, entry]], done: n}: the first ``n`` items were handled (an id no longer
  there gives no entry); ask again for the rest.
- ``ae.merge``  {entries: [[key, entry]]} -> {changed: n}
"""

from __future__ import annotations

from typing import Any

import msgpack

from drekifs.cluster.antientropy.config import AntiEntropyConfig
from drekifs.cluster.antientropy.hashtree import (
    HASH_BYTES,
    ITEM_ID_BYTES,
    SHORT_BYTES,
    WINDOWS,
)


class Malformed(ValueError):
    """A message (request or reply) that does not have the expected shape."""


def packed_size(msg: Any) -> int:
    """What ``msg`` weighs on the wire, before sealing."""
    return len(msgpack.packb(msg))


def field(msg: Any, name: str) -> Any:
    if not isinstance(msg, dict) or name not in msg:
        raise Malformed(f"no field {name!r}")
    return msg[name]


def integer(value: Any, low: int, high: int, what: str) -> int:
    """An int within [low, high)."""
    if type(value) is not int or not low <= value < high:
        raise Malformed(f"{what} out of range")
    return value


def int_list(value: Any, high: int, config: AntiEntropyConfig, what: str) -> list[int]:
    if not isinstance(value, list) or len(value) > config.max_items:
        raise Malformed(f"{what}: not a list, or too long")
    return [integer(v, 0, high, what) for v in value]


def key(value: Any, config: AntiEntropyConfig) -> bytes:
    if not isinstance(value, bytes) or len(value) > config.max_key_bytes:
        raise Malformed("bad key")
    return value


def tree_hash(value: Any) -> bytes:
    if not isinstance(value, bytes) or len(value) != HASH_BYTES:
        raise Malformed("bad hash")
    return value


def ids(value: Any, count: int) -> bytes:
    """``count`` item ids concatenated."""
    if not isinstance(value, bytes) or len(value) != count * ITEM_ID_BYTES:
        raise Malformed("bad item id list")
    return value


def hashes(value: Any, count: int) -> bytes:
    """``count`` hashes concatenated."""
    if not isinstance(value, bytes) or len(value) != count * HASH_BYTES:
        raise Malformed("bad hash list")
    return value


def entries(value: Any, config: AntiEntropyConfig) -> list[tuple[bytes, Any]]:
    """[[key, entry]]: the entries themselves are the store's to check (in its merge)."""
    if not isinstance(value, list) or len(value) > config.max_items:
        raise Malformed("entries: not a list, or too long")
    out = []
    for pair in value:
        if not isinstance(pair, list) or len(pair) != 2:
            raise Malformed("entries: not [key, entry] pairs")
        out.append((key(pair[0], config), pair[1]))
    return out


def window(value: Any) -> int:
    return integer(value, 0, WINDOWS, "window")


def short_hashes(value: Any, count: int) -> bytes:
    """``count`` short (4-byte) hashes or ids concatenated."""
    if not isinstance(value, bytes) or len(value) != count * SHORT_BYTES:
        raise Malformed("bad short hash list")
    return value


def bitmap(positions: list[int], size: int) -> bytes:
    """A bitmap of ``size`` bits with ``positions`` set."""
    out = bytearray((size + 7) // 8)
    for i in positions:
        out[i >> 3] |= 0x80 >> (i & 7)
    return bytes(out)


def set_bits(value: Any, size: int) -> list[int]:
    """The positions set in a bitmap of ``size`` bits (unused bits must be zero)."""
    if not isinstance(value, bytes) or len(value) != (size + 7) // 8:
        raise Malformed("bad bitmap")
    out = []
    for at, byte in enumerate(value):
        if byte:  # most bytes of a bitmap over a small difference are zero
            out.extend(at * 8 + k for k in range(8) if byte & (0x80 >> k))
    if out and out[-1] >= size:
        raise Malformed("bad bitmap")
    return out


def sketch(value: Any, size: int) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise Malformed("bad sketch")
    return value


def elements(value: Any, width: int, config: AntiEntropyConfig) -> list[int]:
    """Sketch elements concatenated, ``width`` bytes each."""
    if not isinstance(value, bytes) or len(value) % width or len(value) // width > config.max_items:
        raise Malformed("bad element list")
    return [int.from_bytes(value[i : i + width], "big") for i in range(0, len(value), width)]
