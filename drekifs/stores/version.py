"""Versions of global entries: a hybrid logical clock, the writer, and what the write had seen.

A version is ``(hlc, peer, context)``. ``context`` is the version vector the writer had for the
key when it wrote (peer -> highest HLC seen from that peer), so two versions are *concurrent*
when neither one's context covers the other's ``(peer, hlc)``. Every peer orders versions the
same way: larger HLC, then larger peer id.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import NamedTuple

LOGICAL_BITS = 16


class HybridClock:
    """Physical milliseconds in the high bits, a logical counter in the low 16.

    Monotonic even when the wall clock steps back, and never behind any timestamp observed from
    another peer.
    """

    def __init__(self, wall_ns: Callable[[], int] = time.time_ns) -> None:
        self.wall_ns = wall_ns
        self.last = 0

    def now(self) -> int:
        physical = (self.wall_ns() // 1_000_000) << LOGICAL_BITS
        self.last = max(self.last + 1, physical)
        return self.last

    def observe(self, remote: int) -> None:
        self.last = max(self.last, remote)


class Version(NamedTuple):
    """Immutable; a named tuple because every global record unpacked carries one (a listing
    unpacks one per entry), and a frozen dataclass costs an ``object.__setattr__`` per field."""

    hlc: int
    peer: str
    context: tuple[tuple[str, int], ...] = ()  # sorted (peer, hlc): what the writer had seen

    def same_write(self, other: Version) -> bool:
        """The same write (HLC and writer), whatever context either carries: a message id
        names only these two."""
        return self.hlc == other.hlc and self.peer == other.peer

    def covers(self, other: Version) -> bool:
        """True when this version was written with ``other`` seen (or is it)."""
        if self.same_write(other):
            return True
        return dict(self.context).get(other.peer, 0) >= other.hlc

    def concurrent(self, other: Version) -> bool:
        return not self.covers(other) and not other.covers(self)

    def beats(self, other: Version) -> bool:
        """The order every peer agrees on: larger HLC, then larger peer id."""
        return (self.hlc, self.peer) > (other.hlc, other.peer)

    def successor(self, hlc: int, peer: str) -> Version:
        """The version of a write over this one."""
        seen = dict(self.context)
        seen[self.peer] = max(seen.get(self.peer, 0), self.hlc)
        return Version(hlc, peer, tuple(sorted(seen.items())))

    def to_wire(self) -> list:
        return [self.hlc, self.peer, [list(c) for c in self.context]]

    @classmethod
    def from_wire(cls, data: list) -> Version:
        hlc, peer, context = data[0], data[1], data[2]
        if type(hlc) is not int or type(peer) is not str:
            hlc, peer = int(hlc), str(peer)
        return _new_version(cls, (hlc, peer, tuple([(str(p), int(h)) for p, h in context])))


_new_version = tuple.__new__  # a Version from its 3 fields, without __new__'s frame


def first_version(hlc: int, peer: str) -> Version:
    return Version(hlc, peer, ())


def version_digest(v: Version) -> bytes:
    """16 bytes naming a version (what anti-entropy compares)."""
    return hashlib.blake2b(
        v.hlc.to_bytes(8, "big") + v.peer.encode("utf-8", "surrogateescape"), digest_size=16
    ).digest()
