"""The Plumtree wire format, and the checks that turn a peer's input into trusted values.

Datagrams share the transport's single datagram handler with SWIM, so every Plumtree datagram
is a msgpack map tagged by its ``"pt"`` key (SWIM's use ``"t"``)::

    {"pt": "ihave", "i": [[id, hops], ...]}   these ids are here; hops from their source
    {"pt": "graft", "i": [id, ...]}            make me eager again; push me these ids (may be [])
    {"pt": "prune"}                            make me lazy (you sent me a duplicate)

The push (eager gossip, or the answer to a GRAFT) is a call of ``plumtree.gossip`` over the
reliable stream, as payloads may weigh up to ~1 MiB; it is answered None (one-way)::

    {"pt": "gossip", "i": id, "h": hops, "p": payload}

``hops`` is always the sender's distance from the message's source (0 at the source). Ids are
opaque bytes of 1 to 200 bytes. Unknown extra keys are ignored (a later version may add some).
Peers are authenticated, but a bug or another version may still send anything: every decoder
checks types and ranges and raises :class:`Malformed`, which the protocol counts and ignores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

TAG = "pt"
IHAVE, GRAFT, PRUNE, GOSSIP = "ihave", "graft", "prune", "gossip"
GOSSIP_METHOD = "plumtree.gossip"

MAX_ID = 200
MAX_HOPS = 65_535
MAX_IDS = 256  # ids in one IHAVE or GRAFT datagram


class Malformed(ValueError):
    """A message from a peer that does not follow the wire format."""


@dataclass(frozen=True, slots=True)
class IHave:
    entries: list[tuple[bytes, int]]  # (id, the announcer's hops)


@dataclass(frozen=True, slots=True)
class Graft:
    mids: list[bytes]


@dataclass(frozen=True, slots=True)
class Prune:
    pass


@dataclass(frozen=True, slots=True)
class Gossip:
    mid: bytes
    hops: int  # the sender's
    payload: Any


Datagram = IHave | Graft | Prune


def is_plumtree(msg: Any) -> bool:
    """Whether a datagram is Plumtree's to handle (well formed or not)."""
    return isinstance(msg, dict) and TAG in msg


def check_mid(mid: Any) -> bytes:
    if not isinstance(mid, bytes) or not 0 < len(mid) <= MAX_ID:
        raise Malformed("id: not 1 to 200 bytes")
    return mid


def _hops(value: Any) -> int:
    # bool is an int to Python, not to the protocol.
    if type(value) is not int or not 0 <= value <= MAX_HOPS:
        raise Malformed("hops: not an integer in range")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list) or len(value) > MAX_IDS:
        raise Malformed(f"{what}: not a list of at most {MAX_IDS}")
    return value


def decode_datagram(msg: Any) -> Datagram:
    """A datagram for which :func:`is_plumtree` holds, checked."""
    kind = msg.get(TAG) if isinstance(msg, dict) else None
    if kind == IHAVE:
        entries: list[tuple[bytes, int]] = []
        for entry in _list(msg.get("i"), "ihave"):
            if not isinstance(entry, list) or len(entry) != 2:
                raise Malformed("ihave: an entry is not [id, hops]")
            entries.append((check_mid(entry[0]), _hops(entry[1])))
        return IHave(entries)
    if kind == GRAFT:
        return Graft([check_mid(mid) for mid in _list(msg.get("i"), "graft")])
    if kind == PRUNE:
        return Prune()
    raise Malformed(f"unknown kind {kind!r}"[:80])


def decode_gossip(args: Any) -> Gossip:
    """The arguments of a ``plumtree.gossip`` call, checked (the payload is the store's)."""
    if not isinstance(args, dict) or args.get(TAG) != GOSSIP or "p" not in args:
        raise Malformed("gossip: not a gossip map")
    return Gossip(check_mid(args.get("i")), _hops(args.get("h")), args["p"])


def encode_gossip(mid: bytes, hops: int, payload: Any) -> dict[str, Any]:
    return {TAG: GOSSIP, "i": mid, "h": min(hops, MAX_HOPS), "p": payload}


def encode_prune() -> dict[str, Any]:
    return {TAG: PRUNE}


# A map of two keys, the tag and kind, and a list header of up to 65,535 items.
_HEADER = len(msgpack.packb({TAG: IHAVE, "i": []})) + 2


def packed_bin_size(n: int) -> int:
    """What msgpack makes of ``n`` bytes (a bin): its header and the bytes."""
    return n + (2 if n < 1 << 8 else 3 if n < 1 << 16 else 5)


def packed_uint_size(v: int) -> int:
    """What msgpack makes of the int ``v``, 0 <= v < 2**32 (hops are capped at MAX_HOPS)."""
    if not 0 <= v < 1 << 32:
        raise ValueError(f"{v} is outside 0..2**32-1")
    return 1 if v < 1 << 7 else 2 if v < 1 << 8 else 3 if v < 1 << 16 else 5


def ihave_entry_size(mid: bytes, hops: int) -> int:
    """The packed size of one IHAVE entry ``[mid, hops]`` (hops capped at MAX_HOPS), computed
    rather than packed: the IHAVE loop sizes every entry once per lazy neighbour."""
    return 1 + packed_bin_size(len(mid)) + packed_uint_size(hops)


def chunk_ihave(
    entries: list[tuple[bytes, int]], budget: int, max_ids: int
) -> list[dict[str, Any]]:
    """IHAVE datagrams announcing ``entries``, each within ``budget`` packed bytes."""
    capped = [(mid, min(hops, MAX_HOPS)) for mid, hops in entries]
    sizes = [ihave_entry_size(mid, hops) for mid, hops in capped]
    return [
        {TAG: IHAVE, "i": [[mid, hops] for mid, hops in chunk]}
        for chunk in _chunks(capped, sizes, budget, max_ids)
    ]


def chunk_graft(mids: list[bytes], budget: int, max_ids: int) -> list[dict[str, Any]]:
    """GRAFT datagrams asking for ``mids`` (one empty GRAFT if there are none)."""
    if not mids:
        return [{TAG: GRAFT, "i": []}]
    sizes = [packed_bin_size(len(mid)) for mid in mids]
    return [{TAG: GRAFT, "i": chunk} for chunk in _chunks(mids, sizes, budget, max_ids)]


def _chunks(items: list[Any], sizes: list[int], budget: int, max_ids: int) -> list[list[Any]]:
    chunks: list[list[Any]] = []
    chunk: list[Any] = []
    used = _HEADER
    for item, size in zip(items, sizes, strict=True):
        if chunk and (used + size > budget or len(chunk) >= max_ids):
            chunks.append(chunk)
            chunk, used = [], _HEADER
        chunk.append(item)
        used += size
    if chunk:
        chunks.append(chunk)
    return chunks
