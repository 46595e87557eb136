"""Changes not yet on disk: what every read consults before LMDB, and what one commit writes.

A store holds two layers: ``pending`` takes every change as it is made, and ``inflight`` is the
group the writer is committing (writer.py); a read looks in pending, then in flight, then in
LMDB. Pure data: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..record import Record


@dataclass
class Layer:
    """Changes not yet on disk. ``None`` means: delete from disk."""

    entries: dict[bytes, Record | None] = field(default_factory=dict)
    values: dict[int, bytes | None] = field(default_factory=dict)
    eids: dict[int, bytes | None] = field(default_factory=dict)
    children: dict[bytes, set[bytes]] = field(default_factory=dict)
    next_eid: int | None = None
    last_write_ns: int | None = None
    value_bytes: int | None = None
    held: int = 0  # bytes of the values in ``values`` (GROUP_BYTES)

    def __bool__(self) -> bool:
        return bool(self.entries or self.values or self.eids)

    def __len__(self) -> int:
        return len(self.entries) + len(self.values)


def merge_layers(older: Layer, newer: Layer) -> Layer:
    """One layer holding both, ``newer`` winning where both change the same thing."""
    out = Layer(
        {**older.entries, **newer.entries},
        {**older.values, **newer.values},
        {**older.eids, **newer.eids},
        {},
        newer.next_eid or older.next_eid,
        newer.last_write_ns or older.last_write_ns,
        newer.value_bytes if newer.value_bytes is not None else older.value_bytes,
    )
    out.held = older.held + newer.held
    for layer in (older, newer):
        for prefix, names in layer.children.items():
            out.children.setdefault(prefix, set()).update(names)
    return out
