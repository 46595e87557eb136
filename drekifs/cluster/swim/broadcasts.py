"""The piggyback queue: membership news waiting to ride on outgoing datagrams.

Every update (alive, suspect, dead) about a member is sent a limited number of times by each
peer that learned it — ``retransmit_mult * ceil(log10(n + 1))``, enough for an epidemic to reach
all ``n`` peers with high probability — on pings, acks and gossip datagrams. The least sent updates
go first (news spreads before repeats), the newest first among equals; an update about a member
replaces any older one about the same member still queued, so the queue never holds more than
one entry per member (memberlist's TransmitLimitedQueue).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

# Stop scanning for a smaller update that still fits after this many misses: updates are of
# similar sizes, and a datagram is worth sending without squeezing in the last bytes.
_MAX_MISSES = 16


@dataclass(slots=True)
class _Entry:
    update: dict[str, Any]
    size: int
    transmits: int


class BroadcastQueue:
    """Updates keyed by the member they are about, each with the times it has been sent."""

    def __init__(self) -> None:
        # levels[t] holds the entries sent t times, in insertion order (oldest first).
        self._levels: list[dict[str, _Entry]] = [{}]
        self._where: dict[str, int] = {}  # member name -> its entry's level

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def push(self, name: str, update: dict[str, Any]) -> None:
        """Queue ``update`` about member ``name``, replacing what was queued about it."""
        self.discard(name)
        self._levels[0][name] = _Entry(update, len(msgpack.packb(update)), 0)
        self._where[name] = 0

    def discard(self, name: str) -> None:
        """Forget what is queued about ``name``."""
        level = self._where.pop(name, None)
        if level is not None:
            del self._levels[level][name]

    def transmits(self, name: str) -> int | None:
        """Times the update about ``name`` was sent; None when none is queued."""
        level = self._where.get(name)
        return None if level is None else level

    def take(self, budget: int, limit: int) -> list[dict[str, Any]]:
        """Updates whose packed sizes add up to at most ``budget`` bytes, counted as sent once
        more; those sent ``limit`` times leave the queue."""
        chosen: list[tuple[int, str]] = []
        misses = 0
        for level, entries in enumerate(self._levels):
            if level >= limit:
                # The cluster shrank since these were queued: they have been sent enough.
                for name in list(entries):
                    self.discard(name)
                continue
            for name in reversed(entries):
                entry = entries[name]
                if entry.size <= budget:
                    chosen.append((level, name))
                    budget -= entry.size
                else:
                    misses += 1
                if budget < 8 or misses >= _MAX_MISSES:
                    break
            if budget < 8 or misses >= _MAX_MISSES:
                break
        updates = []
        for level, name in chosen:
            entry = self._levels[level].pop(name)
            updates.append(entry.update)
            entry.transmits += 1
            if entry.transmits >= limit:
                del self._where[name]
                continue
            if entry.transmits == len(self._levels):
                self._levels.append({})
            self._levels[entry.transmits][name] = entry
            self._where[name] = entry.transmits
        return updates
