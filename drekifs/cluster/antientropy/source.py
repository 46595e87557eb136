"""What anti-entropy needs from the store: digests of versions, and entries to and from peers."""

from __future__ import annotations

from typing import Any, Protocol

from drekifs.stores import version as _version
from drekifs.stores.version import Version


class EntrySource(Protocol):
    """The replicated store, as anti-entropy sees it. Entries are opaque, msgpack-able values
    (version, metadata and value); only the store reads them."""

    def digest(self, key: bytes) -> bytes | None:
        """The digest of ``key``'s current version (tombstones included), None if absent."""

    def export(self, keys: list[bytes]) -> list[tuple[bytes, Any]]:
        """(key, entry) for those of ``keys`` present (a key may have gone meanwhile)."""

    def merge(self, entries: list[tuple[bytes, Any]]) -> int:
        """Apply entries from a peer: the store picks winners and keeps conflicts, as for a
        broadcast. Returns how many keys changed. Raises ValueError (or TypeError) when an entry
        is malformed; it must then have applied nothing it could not check."""


def version_digest(hlc: int, peer: str) -> bytes:
    """The digest of the version (``hlc``, ``peer``): the pair names one write everywhere."""
    return _version.version_digest(Version(hlc, peer))
