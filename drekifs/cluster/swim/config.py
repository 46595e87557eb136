"""The knobs of SWIM membership, with defaults for a LAN of tens to a few thousand peers.

Timing in a nutshell (100 peers, defaults): every peer probes one member a second, so a crashed
member is first probed about 0.5 s after the crash on median; the probe gives up after one
interval (direct ping 0.5 s, then indirect pings until the interval ends) and suspects it. The
other probers confirm the suspicion at about one per second and, with 3 confirmations, the
suspicion times out at its minimum, 2 * log10(100) * 1 s = 4 s; the dead message then spreads
by gossip (200 ms rounds, 3 peers each) in well under a second: 6 s on median. A lone false
accuser (a live member that lost a few datagrams) waits the maximum (6x) and is refuted long
before. The minimum must outlast a slow peer's refutation: 1.5 let peers that answer 2 s late
die (docs/decisions.md, "Failure detection under slow peers"). memberlist's LAN profile
(suspicion_mult 4, 2 confirmations) needs about 10 s on median for the same crash.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from drekifs.cluster.net import MAX_DATAGRAM, SEAL_OVERHEAD


@dataclass(frozen=True, slots=True)
class SwimConfig:
    """Timing, fan-out and size limits of :class:`Membership`. Times in seconds."""

    # -- Failure detection --------------------------------------------------------------------
    probe_interval: float = 1.0
    """One probe per interval (scaled by the local health multiplier): ping, indirect pings."""
    probe_timeout: float = 0.5
    """Wait for a direct ack before asking helpers (scaled too). Far above a LAN round trip."""
    indirect_checks: int = 3
    """Helpers asked to ping a member that missed its direct ping (SWIM's k)."""
    awareness_max_multiplier: int = 8
    """Lifeguard: an unhealthy peer stretches its interval and probe timeout up to 8x, and waits
    up to 7 probe intervals longer before a suspicion ends (1: never)."""

    # -- Suspicion (Lifeguard) ----------------------------------------------------------------
    suspicion_mult: float = 2.0
    """Minimum suspicion timeout = suspicion_mult * max(1, log10(n)) * probe_interval (both
    timeouts lengthened by as much as the local health multiplier stretches the probe
    interval)."""
    suspicion_max_timeout_mult: float = 6.0
    """Maximum suspicion timeout (no confirmation yet) = this * the minimum."""
    suspicion_confirmations: int = 3
    """Independent confirmations that bring the timeout down to the minimum (0 when the cluster
    has fewer than this + 2 members: nobody could confirm; the timeout is then half the maximum)."""

    # -- Dissemination ------------------------------------------------------------------------
    retransmit_mult: int = 5
    """Each update is piggybacked retransmit_mult * ceil(log10(n + 1)) times by every peer: a
    peer misses it with a chance of about exp(-that). At 4 (memberlist's) one refutation in
    ~200,000 (peer, refutation) pairs missed a peer, which then declared a slow peer dead."""
    gossip_interval: float = 0.2
    """A gossip round, when there is news to send."""
    gossip_nodes: int = 3
    """Peers sent news each gossip round."""
    gossip_to_the_dead: float = 30.0
    """Members dead for less than this still get gossip: a short partition heals by itself."""

    # -- Full state exchange ------------------------------------------------------------------
    push_pull_interval: float = 30.0
    """Push-pull with one random live member; stretched for clusters above 32 peers
    (x1 + ceil(log2(n / 32)), as memberlist) so the load per peer stays flat."""
    push_pull_timeout: float = 5.0
    """A push-pull call that gets no reply in this time failed."""
    join_fanout: int = 3
    """Seeds pushed-pulled at start, at once; up to join_rounds batches until one answers."""
    join_rounds: int = 3
    reconnect_interval: float = 10.0
    """Push-pull with one dead or never-heard-from member this often, so partitions heal and
    nodes that started later are found."""

    # -- Identity -----------------------------------------------------------------------------
    dead_reclaim: float = 60.0
    """A member dead or gone for this long may come back at another address, whatever its
    incarnation. Before that, only a higher incarnation (a later life) may move it."""

    # -- Sizes --------------------------------------------------------------------------------
    datagram_budget: int = MAX_DATAGRAM - SEAL_OVERHEAD - 36
    """Packed msgpack bytes a datagram may weigh, piggybacked updates included; 36 bytes of
    margin under what the sealed datagram may weigh."""
    max_meta_bytes: int = 512
    """Packed size of a member's meta: it rides on alive messages and must leave room."""
    max_ping_reqs: int = 64
    """Indirect pings served at once; more are dropped (and counted)."""

    def __post_init__(self) -> None:
        if not 0 < self.probe_timeout < self.probe_interval:
            raise ValueError("need 0 < probe_timeout < probe_interval")
        if self.gossip_interval <= 0 or self.push_pull_interval <= 0:
            raise ValueError("intervals must be positive")
        if self.suspicion_mult <= 0 or self.suspicion_max_timeout_mult < 1:
            raise ValueError("need suspicion_mult > 0 and suspicion_max_timeout_mult >= 1")
        if min(self.indirect_checks, self.gossip_nodes, self.retransmit_mult) < 0:
            raise ValueError("counts must not be negative")
        if self.max_meta_bytes + 100 > self.datagram_budget:
            raise ValueError("max_meta_bytes leaves no room in a datagram")

    def suspicion_timeouts(self, n: int) -> tuple[float, float]:
        """(minimum, maximum) suspicion timeout in a cluster of ``n`` live members."""
        low = self.suspicion_mult * max(1.0, math.log10(max(n, 1))) * self.probe_interval
        return low, low * self.suspicion_max_timeout_mult

    def suspicion_k(self, n: int) -> int:
        """Confirmations to expect: none when fewer than k others could suspect too."""
        k = self.suspicion_confirmations
        return k if n - 2 >= k else 0

    def retransmit_limit(self, n: int) -> int:
        """Times one peer sends one update, in a cluster of ``n`` live members."""
        return self.retransmit_mult * math.ceil(math.log10(max(n, 1) + 1))

    def push_pull_period(self, n: int) -> float:
        """The push-pull interval for ``n`` live members."""
        if n <= 32:
            return self.push_pull_interval
        return self.push_pull_interval * (math.ceil(math.log2(n) - math.log2(32)) + 1)
