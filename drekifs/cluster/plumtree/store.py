"""What Plumtree needs from the message cache: the caller's store (in drekifs, the global store,
where a message id is a (key, version) pair and a newer version supersedes older ones)."""

from __future__ import annotations

from typing import Any, Protocol


class MessageStore(Protocol):
    """The message cache. Ids are opaque bytes (at most 200); payloads opaque msgpack values.

    Called from the protocol's handlers: each method must return promptly (no blocking I/O
    longer than a local disk read) and should not raise (an exception is counted as
    ``store_errors`` and the message is not forwarded).
    """

    def has(self, mid: bytes) -> bool:
        """Already delivered, or superseded (a newer version of its key is known): no GRAFT for
        it is needed."""
        ...

    def get(self, mid: bytes) -> Any | None:
        """The payload, to answer a GRAFT; None if unknown or superseded."""
        ...

    def deliver(self, mid: bytes, payload: Any) -> bool:
        """Apply a message from a peer; True if it was new (then it is forwarded), False if it
        was known or superseded."""
        ...
