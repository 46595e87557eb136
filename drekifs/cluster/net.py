"""What the cluster protocols need from a network, and nothing more.

Membership (and later broadcast and repair) talk to peers through :class:`Network`; the real
implementation is :class:`drekifs.cluster.transport.Transport` (sealed TCP frames and UDP
datagrams), the simulated one ``SimNetwork`` in ``tests/harness/simnet.py`` (in memory, on
trio's MockClock, with seeded loss, delay and partitions). Protocol code never opens a socket
and never reads a clock other than trio's, so the same code runs in both.

Messages are plain msgpack-able values (dicts of str keys, ints, bytes, str, lists).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

PeerAddr = tuple[str, int]  # (IP address, port): where a peer's transport listens


def addr_text(addr: object) -> str:
    """A peer address as logs and messages write it: ``10.0.0.1:4000``, ``[::1]:4000``."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)


DatagramHandler = Callable[[PeerAddr, Any], None]
CallHandler = Callable[[PeerAddr, Any], Awaitable[Any]]

MAX_DATAGRAM = 1400  # bytes on the wire, sealed: what a probe may weigh
# What the transport adds to a datagram: kind and receiver (9), keyring.OVERHEAD (45) and the
# stamp (16): transport.DATAGRAM_OVERHEAD, which a test holds equal.
SEAL_OVERHEAD = 70


class PeerUnreachable(Exception):
    """A call got no answer: no connection, timeout, or the connection broke mid-call."""


class RemoteError(Exception):
    """The peer answered a call with an error: ``code`` (an errno or 0) and a message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Network(Protocol):
    """One peer's view of the network."""

    addr: PeerAddr  # this peer's own address

    def send_datagram(self, to: PeerAddr, msg: Any) -> None:
        """Best effort, never blocks, may be lost, reordered or delayed (the transport holds the
        first to a peer for a round trip, while it learns the peer's instance). A message that
        would not fit in MAX_DATAGRAM once sealed raises ValueError (a bug of the caller)."""

    def on_datagram(self, handler: DatagramHandler) -> None:
        """Every datagram that arrives (authenticated, decoded) goes to ``handler``, which must
        not block (spawn work if needed)."""

    async def call(self, to: PeerAddr, method: str, args: Any, *, timeout: float) -> Any:
        """A request over a reliable stream; the reply. Raises PeerUnreachable when nothing
        came back within ``timeout`` seconds, RemoteError when the peer answered an error."""

    def register(self, method: str, handler: CallHandler, *, inline: bool = False) -> None:
        """Serve calls of ``method``: the handler's return value is the reply; raising
        RemoteError sends that error; any other exception is answered as an EIO error.
        ``inline``: the handler never waits, so it may run without a task of its own (a
        network is free to ignore this)."""
