"""Messages announced by IHAVE but not received yet: who announced them, and their timers.

One heap of deadlines serves every timer, so a peer missing a thousand messages runs one task,
not a thousand, and expired timers are handled in a deterministic order (deadline, then
announcement order). A deadline that was moved leaves its old heap entry behind; it is skipped
when it comes up.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from drekifs.cluster.net import PeerAddr


@dataclass(slots=True)
class Wanted:
    """A missing message: its announcers (address, their hops) in order, its timer."""

    deadline: float
    announcers: list[tuple[PeerAddr, int]] = field(default_factory=list)
    grafts: int = 0  # GRAFTs sent for it so far


class MissingIds:
    def __init__(self, limit: int, max_announcers: int) -> None:
        self._limit = limit
        self._max_announcers = max_announcers
        self._wanted: dict[bytes, Wanted] = {}
        self._heap: list[tuple[float, int, bytes]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._wanted)

    def __contains__(self, mid: bytes) -> bool:
        return mid in self._wanted

    def announce(self, mid: bytes, addr: PeerAddr, hops: int, deadline: float) -> bool:
        """``addr`` has ``mid``; a new missing id times out at ``deadline``. False when the
        table is full (the announcement is dropped)."""
        wanted = self._wanted.get(mid)
        if wanted is None:
            if len(self._wanted) >= self._limit:
                return False
            wanted = self._wanted[mid] = Wanted(deadline)
            self._push(mid, deadline)
        if len(wanted.announcers) < self._max_announcers and all(
            a != addr for a, _ in wanted.announcers
        ):
            wanted.announcers.append((addr, hops))
        return True

    def received(self, mid: bytes) -> None:
        self._wanted.pop(mid, None)

    def reschedule(self, mid: bytes, deadline: float) -> None:
        wanted = self._wanted.get(mid)
        if wanted is not None:
            wanted.deadline = deadline
            self._push(mid, deadline)

    def next_deadline(self) -> float:
        return self._heap[0][0] if self._heap else math.inf

    def due(self, now: float) -> list[tuple[bytes, Wanted]]:
        """The missing ids whose timer expired by ``now``, in deadline order (their entries
        stay until :meth:`received` or :meth:`reschedule`)."""
        out: list[tuple[bytes, Wanted]] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, _, mid = heapq.heappop(heap)
            wanted = self._wanted.get(mid)
            if wanted is not None and wanted.deadline == deadline:
                out.append((mid, wanted))
        return out

    def _push(self, mid: bytes, deadline: float) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (deadline, self._seq, mid))
