"""How much a peer's transport gives to others: timeouts and counts that bound what a slow,
silent, broken or hostile remote can hold.

Every limit is per transport. A remote *host* is an IP address; a *peer* is an address and the
listening port the client declared in its hello, proven by its key. Connections that have not
proved a key (handshakes) and those that have (authenticated) have separate budgets: no number
of the first can refuse one of the second, and peers sharing an address (NAT, several nodes on a
host) are counted apart. See cluster/admission.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

MIN_HANDSHAKES = 64  # what fitting to few descriptors leaves, at least


@dataclass(frozen=True)
class Limits:
    # -- time ------------------------------------------------------------------------------
    connect_timeout: float = 5.0
    """An outgoing connection must be open, and the server's hello in, within this."""
    handshake_timeout: float = 30.0
    """An accepted connection must send its hello and its proof of key within this. Not what
    protects real peers from connections that never authenticate (eviction does, see
    max_handshakes); it only takes back what a dead client left. Shorter is worse under a
    flood: each timeout is a connection the flood opens again, and a new connection waits
    behind those re-opened in the accept queue (bench/admission.py, 2,540 held: p99 of a new
    connection's first call 3.5 ms at 30 s, 201-474 ms at 5 s, 695 ms at 1 s)."""
    idle_timeout: float = 120.0
    """An accepted connection that completes no frame for this long, with no request of its
    own in flight, is closed. Outgoing connections close themselves after half of it, so a
    client never sends a request on a connection the server is about to drop for idleness."""
    send_timeout: float = 30.0
    """A reply that cannot be written for this long (the client reads nothing) ends the
    connection."""
    handler_timeout: float = 60.0
    """A handler still running after this is cancelled and answered ETIMEDOUT."""

    # -- counts: handshakes (cluster/admission.py) ----------------------------------------
    max_handshakes: int = 4096
    """Accepted connections that have not proved a key yet, all addresses together. Full, a
    new connection evicts the oldest handshake rather than being refused, so connections that
    never authenticate cannot keep a peer out; they only make the server churn once there are
    more of them than this. Costs one descriptor and ~7.5 KiB of the daemon's memory each
    (measured: 2,540 held, docs/decisions.md "Admission (issue 17)"). Sized to hold a few
    thousand without churn, since held ones cost nothing but that: past the budget each
    eviction is a connection the flood opens again, and a newcomer waits in the accept queue
    behind all of them (bench/admission.py, 2,540 against a budget of 256: p50 0.9 s, none
    lost; refusing the newcomer instead, 97 of 100 lost)."""
    max_handshakes_per_host: int = 256
    """Handshakes from one IP address; over it the address's own oldest handshake is evicted,
    so one address cannot churn the handshakes of the others. Normal is a few (a restart of
    every node behind an address: one each)."""

    # -- counts: authenticated connections ---------------------------------------------------
    max_conns: int = 1024
    """Authenticated connections, all peers together. Handshakes do not count here."""
    max_conns_per_peer: int = 8
    """Authenticated connections of one peer: its address and the listening port its hello
    declared (bound into the session). Pooling makes one the normal case; a few more come
    from a restart before the old ones time out."""
    max_conns_per_host: int = 256
    """Authenticated connections from one IP address, all its peers together: bounds what a
    hostile peer with a key gets by declaring many ports, while 256 nodes behind one NAT or
    on one host (each holding one connection) still fit."""
    max_inflight_per_conn: int = 64
    """Requests of one connection being served at once; beyond it the connection is not read
    (backpressure on the client's socket), never refused."""
    max_inflight_per_peer: int = 256
    """Requests of one peer (as max_conns_per_peer counts them) being served at once, all its
    connections together. Per peer, not per address: nodes sharing an address do not hold
    each other's requests back."""

    # -- datagram replay -------------------------------------------------------------------
    replay_window: float = 30.0
    """A datagram whose sender's wall clock differs from ours by more than this, either way,
    is dropped as stale: peers' clocks must agree to within it (NTP does far better)."""
    replay_cache: int = 100_000
    """Datagram ids remembered at most (about 100 bytes each). Only authenticated datagrams
    are remembered, so only legitimate peers fill it; when full, new datagrams are dropped
    (fail closed) until old ids expire."""

    def fitted(self, descriptors: int) -> Limits:
        """These limits, with the connection budgets shrunk (handshakes first: they are worth
        the least) so that ``max_handshakes + max_conns`` accepted connections fit in
        ``descriptors``: past the descriptor limit accept() fails for every client alike."""
        if self.max_handshakes + self.max_conns <= descriptors:
            return self
        handshakes = max(MIN_HANDSHAKES, descriptors - self.max_conns)
        handshakes = min(handshakes, self.max_handshakes)
        conns = max(1, min(self.max_conns, descriptors - handshakes))
        return replace(
            self,
            max_handshakes=handshakes,
            max_handshakes_per_host=min(self.max_handshakes_per_host, handshakes),
            max_conns=conns,
            max_conns_per_host=min(self.max_conns_per_host, conns),
        )
