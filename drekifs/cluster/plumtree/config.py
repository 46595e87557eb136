"""The knobs of Plumtree broadcast, with defaults for a LAN or a region of up to a few thousand
peers.

Timing in a nutshell: a message is pushed at once along the tree (eager peers) and announced to
the other neighbours (lazy peers) in IHAVE batches sent every ``ihave_batch_interval``. A peer
that hears an IHAVE for a message it lacks waits ``ihave_delay`` for the eager copy before it
GRAFTs the announcer (which then pushes the message and becomes a tree link); without the message
``graft_timeout`` later it grafts the next announcer, up to ``max_graft_attempts`` times. So a
peer cut from the tree gets a message about ``ihave_batch_interval / 2 + ihave_delay + 2 RTT``
after its neighbours, and the tree is repaired for the next one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from drekifs.cluster.net import MAX_DATAGRAM, SEAL_OVERHEAD


@dataclass(frozen=True, slots=True)
class PlumtreeConfig:
    """Timing, view size and memory bounds of :class:`~.broadcast.Broadcast`. Times in seconds."""

    # -- Lazy push and repair -----------------------------------------------------------------
    ihave_batch_interval: float = 0.025
    """IHAVEs to lazy peers are batched: sent this long after the first one was queued."""
    ihave_delay: float = 0.1
    """After an IHAVE for a missing message, wait this long for the eager copy before GRAFTing
    the announcer (the paper's first timer). Longer: fewer needless grafts (a graft that races
    the eager copy costs a duplicate; under loss, every peer below a lost push grafts on its own
    unless the repaired copy reaches it first); shorter: faster repair. At 10% loss, 300 peers:
    0.1 s gives 100% in ~0.6 s with 0.49 duplicates per delivery, 0.15 s ~0.8 s and 0.35."""
    graft_timeout: float = 0.25
    """After a GRAFT, wait this long for the message before grafting the next announcer (the
    paper's second timer): a round trip plus the push of a payload (a 1 MiB push on a slow link
    may take longer: then the next announcer is asked too, at the cost of a duplicate)."""
    max_graft_attempts: int = 8
    """Grafts for one missing message (announcers tried in turn); then anti-entropy's job."""
    max_announcers: int = 8
    """Announcers remembered per missing message."""

    # -- Tree optimization (the paper's section 3.8) ------------------------------------------
    optimize: bool = True
    """Swap a tree link for a lazy one that delivers much sooner (counted in hops)."""
    optimization_threshold: int = 3
    """Swap when the lazy path is shorter than the eager one by more than this many hops."""

    # -- Neighbours (see :mod:`.view`) --------------------------------------------------------
    view_log_mult: float = 1.0
    """Target neighbours per peer = ceil(view_log_mult * ln(n)) + view_extra, for n members."""
    view_extra: int = 3
    max_view: int = 32
    """Never more neighbours than this (the view is a union of hashed rings, 2 per ring)."""

    # -- Memory bounds ------------------------------------------------------------------------
    seen_ttl: float = 120.0
    """Ids of delivered messages are remembered this long (duplicate detection, tree
    optimization); the store answers for older ones."""
    max_seen: int = 200_000
    max_missing: int = 20_000
    """Messages announced but not received, tracked at once; more announcements are dropped."""
    max_ihave_queue: int = 20_000
    """Announcements waiting for the next IHAVE batch; the oldest are dropped beyond this."""

    # -- Transport ----------------------------------------------------------------------------
    call_timeout: float = 15.0
    """A push (eager gossip or graft reply, up to ~1 MiB) that gets no reply in this time failed."""
    max_sends: int = 1024
    """Pushes in flight at once; more are dropped (counted) and left to lazy repair."""
    max_ids_per_datagram: int = 64
    """Ids per IHAVE or GRAFT datagram (fewer when long ids fill the datagram first)."""
    datagram_budget: int = MAX_DATAGRAM - SEAL_OVERHEAD - 36
    """Packed msgpack bytes a datagram may weigh (36 bytes of margin, as SWIM)."""

    def __post_init__(self) -> None:
        times = (self.ihave_batch_interval, self.ihave_delay, self.graft_timeout)
        if min(times) <= 0 or self.seen_ttl <= 0 or self.call_timeout <= 0:
            raise ValueError("intervals and timeouts must be positive")
        counts = (self.max_graft_attempts, self.max_announcers, self.max_seen, self.max_missing)
        if min(counts) < 1 or self.max_ihave_queue < 1 or self.max_sends < 1:
            raise ValueError("counts must be at least 1")
        if self.optimization_threshold < 0 or self.view_extra < 0 or self.view_log_mult < 0:
            raise ValueError("threshold and view sizes must not be negative")
        if self.max_view < 2:
            raise ValueError("max_view must be at least 2")
        if not 1 <= self.max_ids_per_datagram <= 256:
            raise ValueError("max_ids_per_datagram must be in 1..256")
        if self.datagram_budget < 400:
            raise ValueError("datagram_budget leaves no room for a 200-byte id")

    def view_size(self, n: int) -> int:
        """Target neighbours of a peer among ``n`` live members (itself included)."""
        target = math.ceil(self.view_log_mult * math.log(max(n, 1))) + self.view_extra
        return max(2, min(self.max_view, target))

    def rings(self, n: int) -> int:
        """Hashed rings the view is made of, for ``n`` live members (2 neighbours per ring)."""
        return max(1, math.ceil(self.view_size(n) / 2))
