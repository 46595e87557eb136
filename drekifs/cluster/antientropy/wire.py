"""The shapes of anti-entropy messages, checked field by field.

Whatever a peer sends is checked here before any of it is used: a message that does not have
the expected shape raises :class:`Malformed` (the responder answers EINVAL, the initiator drops
the exchange), so no handler or exchange ever trips over a bad type or a huge count.

Requests and replies (all dicts with short str keys):

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
from drekifs.cluster.antientropy.hashtree import HASH_BYTES, ITEM_ID_BYTES


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
