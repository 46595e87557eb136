"""Ids of the messages this peer delivered recently, with how they came: duplicate detection
and the tree optimization (how many hops away the source was, who sent the copy).

Entries expire after a fixed time, so insertion order is expiry order and a dict is the queue.
The store remains the authority on what is known (:meth:`MessageStore.has`); this cache only
tells a duplicate (a cycle in the tree, answered by a PRUNE) from a message the store got
another way or that a newer version superseded (no PRUNE: the link did nothing wrong).
"""

from __future__ import annotations

from dataclasses import dataclass

from drekifs.cluster.net import PeerAddr


@dataclass(slots=True)
class Seen:
    expires: float
    hops: int  # this peer's distance from the source
    parent: PeerAddr | None  # who pushed the copy that was delivered (None: local or unknown)


class SeenIds:
    """At most ``limit`` ids, each for ``ttl`` seconds."""

    def __init__(self, ttl: float, limit: int) -> None:
        self._ttl = ttl
        self._limit = limit
        self._ids: dict[bytes, Seen] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def get(self, mid: bytes, now: float) -> Seen | None:
        seen = self._ids.get(mid)
        if seen is not None and seen.expires <= now:
            self.expire(now)
            return None
        return seen

    def add(self, mid: bytes, hops: int, parent: PeerAddr | None, now: float) -> Seen:
        self.expire(now)
        while len(self._ids) >= self._limit:
            del self._ids[next(iter(self._ids))]
        seen = self._ids[mid] = Seen(now + self._ttl, hops, parent)
        return seen

    def expire(self, now: float) -> None:
        ids = self._ids
        # Bounded: each expired id is removed once.
        while ids:
            mid = next(iter(ids))
            if ids[mid].expires > now:
                break
            del ids[mid]
