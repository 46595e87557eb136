"""Which accepted TCP connections a server keeps: pure bookkeeping, no sockets, no clocks.

A connection lives in one of two pools, each with its own budget (limits.py):

- **handshakes**, from accept until the client has proved it holds a key: counted per source
  address and in total. A new connection is never refused here: when a budget is full, the
  *oldest* handshake is evicted instead (of the same address when that address is over its
  share, else of all). A real client proves its key within a round trip of its accept, so it
  is the youngest; connections that never prove anything are the oldest and go first. Whoever
  holds connections open without a handshake cannot hold the door shut; at worst they make
  the server churn, and a real handshake is lost only if a whole budget of connections arrives
  during its round trip.
- **authenticated**, once the proof opened: counted per peer (the source address and the
  listening port the client's hello declared, bound into the session so it cannot be changed)
  and per address, and in total. Handshakes never count here, so no number of them can refuse
  a peer that authenticates; and peers that share an address (NAT, several nodes on a host)
  each have their own per-peer count. The per-address and total counts bound what a hostile
  peer *with* a key can hold; over them the new connection is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .limits import Limits
from .net import PeerAddr

HANDSHAKE = "handshake"
AUTHENTICATED = "authenticated"
GONE = "gone"

# Why an authenticated connection was refused (counter tcp.refused.<why>).
OVER_TOTAL = "total"
OVER_HOST = "host"
OVER_PEER = "peer"
EVICTED = "evicted"  # while its proof was being checked


@dataclass(eq=False)
class Ticket:
    """One accepted connection's place. ``handle`` is the server's (what it cancels to close
    the connection when it is evicted); admission never looks at it."""

    host: str
    handle: Any = None
    state: str = HANDSHAKE
    peer: PeerAddr | None = None


class Admission:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        # Dicts keep insertion order: the first key is the oldest handshake.
        self._handshakes: dict[Ticket, None] = {}
        self._handshakes_of: dict[str, dict[Ticket, None]] = {}
        self._authenticated = 0
        self._of_host: dict[str, int] = {}
        self._of_peer: dict[PeerAddr, int] = {}

    def handshakes(self) -> int:
        return len(self._handshakes)

    def authenticated(self) -> int:
        return self._authenticated

    def arrive(self, host: str) -> tuple[Ticket, Ticket | None]:
        """A connection accepted from ``host``: its ticket, in the handshakes, and the
        handshake evicted to make room for it (to be closed), if any."""
        evicted = None
        of_host = self._handshakes_of.get(host)
        if of_host is not None and len(of_host) >= self.limits.max_handshakes_per_host:
            evicted = next(iter(of_host))
        elif len(self._handshakes) >= self.limits.max_handshakes:
            evicted = next(iter(self._handshakes))
        if evicted is not None:
            self.leave(evicted)
        ticket = Ticket(host)
        self._handshakes[ticket] = None
        self._handshakes_of.setdefault(host, {})[ticket] = None
        return ticket, evicted

    def evict_oldest(self) -> Ticket | None:
        """Evict the oldest handshake (to free a descriptor when accept() runs out)."""
        if not self._handshakes:
            return None
        oldest = next(iter(self._handshakes))
        self.leave(oldest)
        return oldest

    def authenticate(self, ticket: Ticket, peer: PeerAddr) -> str | None:
        """The connection's client proved its key and declared itself ``peer``: None if it
        is admitted to the authenticated pool, else why not (OVER_*, or EVICTED meanwhile);
        then the ticket is gone and the connection is to be closed."""
        if ticket.state != HANDSHAKE:
            return EVICTED
        self._leave_handshakes(ticket)
        limits = self.limits
        why = None
        if self._authenticated >= limits.max_conns:
            why = OVER_TOTAL
        elif self._of_host.get(peer[0], 0) >= limits.max_conns_per_host:
            why = OVER_HOST
        elif self._of_peer.get(peer, 0) >= limits.max_conns_per_peer:
            why = OVER_PEER
        if why is not None:
            ticket.state = GONE
            return why
        ticket.state, ticket.peer = AUTHENTICATED, peer
        self._authenticated += 1
        self._of_host[peer[0]] = self._of_host.get(peer[0], 0) + 1
        self._of_peer[peer] = self._of_peer.get(peer, 0) + 1
        return None

    def leave(self, ticket: Ticket) -> None:
        """The connection is closed (or to be): its room is free. Idempotent."""
        if ticket.state == HANDSHAKE:
            self._leave_handshakes(ticket)
        elif ticket.state == AUTHENTICATED:
            assert ticket.peer is not None
            self._authenticated -= 1
            _decrement(self._of_host, ticket.peer[0])
            _decrement(self._of_peer, ticket.peer)
        ticket.state = GONE

    def _leave_handshakes(self, ticket: Ticket) -> None:
        del self._handshakes[ticket]
        of_host = self._handshakes_of[ticket.host]
        del of_host[ticket]
        if not of_host:
            del self._handshakes_of[ticket.host]
        ticket.state = GONE


def _decrement(counts: dict[Any, int], key: Any) -> None:
    n = counts[key] - 1
    if n:
        counts[key] = n
    else:
        del counts[key]
