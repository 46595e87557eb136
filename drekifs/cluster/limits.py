"""How much a peer's transport gives to others: timeouts and counts that bound what a slow,
silent, broken or hostile remote can hold.

Every limit is per transport. A remote *host* is an IP address: the per-host limits are what one
machine (however many ports it uses) may take, so one misbehaving machine never starves the rest
of the fleet.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    # -- time ------------------------------------------------------------------------------
    connect_timeout: float = 5.0
    """An outgoing connection must be open, and the server's hello in, within this."""
    handshake_timeout: float = 5.0
    """An accepted connection must send its hello and its proof of key within this."""
    idle_timeout: float = 120.0
    """An accepted connection that completes no frame for this long, with no request of its
    own in flight, is closed. Outgoing connections close themselves after half of it, so a
    client never sends a request on a connection the server is about to drop for idleness."""
    send_timeout: float = 30.0
    """A reply that cannot be written for this long (the client reads nothing) ends the
    connection."""
    handler_timeout: float = 60.0
    """A handler still running after this is cancelled and answered ETIMEDOUT."""

    # -- counts ----------------------------------------------------------------------------
    max_conns: int = 1024
    """Accepted connections, all hosts together."""
    max_conns_per_host: int = 16
    """Accepted connections from one IP address, in the handshake or serving. Pooling makes
    one per remote peer the normal case; more is a restart storm or an attack."""
    max_inflight_per_conn: int = 64
    """Requests of one connection being served at once; beyond it the connection is not read
    (backpressure on the client's socket), never refused."""
    max_inflight_per_host: int = 256
    """Requests of one IP address being served at once, all its connections together."""

    # -- datagram replay -------------------------------------------------------------------
    replay_window: float = 30.0
    """A datagram whose sender's wall clock differs from ours by more than this, either way,
    is dropped as stale: peers' clocks must agree to within it (NTP does far better)."""
    replay_cache: int = 100_000
    """Datagram ids remembered at most (about 100 bytes each). Only authenticated datagrams
    are remembered, so only legitimate peers fill it; when full, new datagrams are dropped
    (fail closed) until old ids expire."""
