"""Replay protection for datagrams: a time window and the ids seen within it, bounded.

Each datagram carries its sender's wall clock (ms) and a random 64-bit id. A datagram is
accepted when its time is within ``window`` seconds of ours (either way: the sender's clock may
be ahead or behind) and its id was not seen before. An id has to be remembered for as long as its
datagram could still pass the time check: the datagram's time is at most ``window`` ahead of ours
when it arrives, and stays acceptable for ``window`` after that time, so an id is kept for
``2 * window`` after arrival (measured on the monotonic clock, which no clock step moves).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

STALE = "stale"
REPLAY = "replay"
FULL = "replay-cache-full"


class ReplayGuard:
    def __init__(
        self,
        window: float,
        capacity: int,
        *,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.capacity = capacity
        self._wall = wall_clock
        self._mono = monotonic
        self._seen: set[int] = set()
        self._expiry: deque[tuple[float, int]] = deque()  # arrival order = expiry order

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, sent_ms: int, ident: int) -> str | None:
        """None, and the id remembered, when the datagram is fresh; otherwise why not (STALE,
        REPLAY, or FULL when too many ids are remembered to take one more)."""
        if abs(self._wall() * 1000.0 - sent_ms) > self.window * 1000.0:
            return STALE
        now = self._mono()
        expiry, seen = self._expiry, self._seen
        while expiry and expiry[0][0] <= now:
            seen.discard(expiry.popleft()[1])
        if ident in seen:
            return REPLAY
        if len(seen) >= self.capacity:
            return FULL
        seen.add(ident)
        expiry.append((now + 2 * self.window, ident))
        return None
