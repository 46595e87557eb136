"""Inode numbers of store entries: stable across remounts, distinct on every path.

An entry of a store gets ``alias << 52 | slot << 40 | eid``:

- ``eid`` (40 bits): the entry's id in its store, persisted by the store, never reused;
- ``slot`` (12 bits): the store's number on this peer, kept in ``<data-dir>/stores/slots.json``
  (global is 1 and local 2 everywhere);
- ``alias`` (10 bits): which path of the location this is. A node listed by two regions shows
  its stores under both paths; the kernel must not see one directory under two parents, so each
  path gets its own numbers, derived from the path.

All of it stays below 2**62, under the world's own inode numbers (namespace.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple

EID_BITS = 40
SLOT_BITS = 12
ALIAS_BITS = 10
EID_MASK = (1 << EID_BITS) - 1
SLOT_MASK = (1 << SLOT_BITS) - 1
ALIAS_MASK = (1 << ALIAS_BITS) - 1
FIXED_SLOTS = {"global": 1, "local": 2}


class StoreInode(NamedTuple):  # a tuple: cheap to make (every miss of the node cache)
    alias: int
    slot: int
    eid: int


def pack(alias: int, slot: int, eid: int) -> int:
    return (alias << (EID_BITS + SLOT_BITS)) | (slot << EID_BITS) | eid


def unpack(ino: int) -> StoreInode:
    return StoreInode(
        (ino >> (EID_BITS + SLOT_BITS)) & ALIAS_MASK, (ino >> EID_BITS) & SLOT_MASK, ino & EID_MASK
    )


def store_slot(ino: int) -> int:
    """The store slot of a store entry's inode; 0 for the world's own inodes."""
    return (ino >> EID_BITS) & SLOT_MASK if 1 < ino < (1 << 62) else 0


def is_store_inode(ino: int) -> bool:
    return store_slot(ino) != 0


def alias_of(segments: tuple[str, ...], taken: set[int]) -> int:
    """A 10-bit number for a location's path, not among ``taken`` (never 0)."""
    data = "/".join(segments).encode()
    salt = 0
    while True:
        digest = hashlib.blake2b(data + b"\0" + str(salt).encode(), digest_size=4).digest()
        alias = int.from_bytes(digest, "little") % ALIAS_MASK + 1
        if alias not in taken:
            return alias
        salt += 1


class StoreSlots:
    """Store name <-> slot, persisted (when ``path`` is given) so inode numbers survive remounts."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.slots: dict[str, int] = dict(FIXED_SLOTS)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.slots.update(json.loads(path.read_text()))

    def slot(self, name: str) -> int:
        if name not in self.slots:
            slot = max(self.slots.values()) + 1
            if slot > SLOT_MASK:
                raise ValueError(f"too many stores ({SLOT_MASK}) for inode numbers")
            self.slots[name] = slot
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(self.slots, sort_keys=True))
                os.replace(tmp, self.path)
        return self.slots[name]
