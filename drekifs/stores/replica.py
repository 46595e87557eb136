"""The replica interface: what replication (cluster/replication.py) may ask of a store it keeps
in step with the other peers' replicas of it.

Replication works on *entry keys* (bytes, ``location \\0 parent \\0 name``: keys.py) and on
*versions* (version.py): every write to a replicated store gives its entry a new version, and a
delete leaves a *tombstone*, a record with a version and no content, so that the delete travels
like a write. Replication broadcasts what a replica wrote, repairs what a replica missed (an
anti-entropy exchange compares digests of versions in a hash tree), and merges what it receives;
the store decides each merge by conflicts.py's rules, the same on every peer, so replicas that
merged the same versions hold the same entries.

``LmdbStore`` (stores/lmdb) implements it; a store that keeps no versions (a local store) may
too, and then holds nothing to replicate and forgets nothing. The peer (cluster/peer.py) tells
whether the global store is a replica by this Protocol (``isinstance``: it is runtime-checkable,
which checks that every member is there, not their signatures). Errors are StoreError
(record.py). A change is applied at once and is on disk with the store's next commit, as every
change is (``Store.sync`` waits for it); each one is told to the watchers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from .base import Watcher
from .record import Record
from .version import Version


@runtime_checkable
class Replica(Protocol):
    max_value: int  # bytes of the largest value the store takes: replication refuses larger
    # Told of every change, as a Store's are: a merged entry with the origin merge was given,
    # a forgotten one with "replication" (the origin replication knows as its own).
    watchers: list[Watcher]
    conflicts: int  # concurrent versions settled since the start (a conflict copy kept)

    # -- what this replica holds -----------------------------------------------------------
    def digest(self, key: bytes) -> bytes | None:
        """16 bytes naming the entry's version (tombstones too): what anti-entropy compares;
        None when the entry has no version here (absent, or never replicated)."""

    def has_version(self, key: bytes, version: Version) -> bool:
        """Whether this replica holds ``version`` of the entry, or a version written with it
        seen (``Version.covers``): a broadcast of it is news no more."""

    def export(self, key: bytes) -> tuple[Record, bytes | None] | None:
        """The entry as replication sends it: its record with its version (a tombstone's too)
        and, for a file, its bytes; None when the entry has no version here."""

    def iter_digests(self) -> Iterator[tuple[bytes, bytes]]:
        """(entry key, digest) of every entry with a version, tombstones included: the hash
        tree is built from it at start; later changes reach the tree through the watchers."""

    # -- what other peers wrote ------------------------------------------------------------
    def merge(
        self, key: bytes, rec: Record, value: bytes | None, origin: object = "replication"
    ) -> bool:
        """Apply a version another peer wrote (``rec``, and ``value`` for a file); True if
        anything changed here. conflicts.py decides: a version this one covers changes
        nothing; of two concurrent ones the same wins on every peer, and a loser worth keeping
        stays beside it as a conflict copy (``conflicts`` counts them). Entry ids and
        subdirectory counts are this replica's own: the remote ones are ignored. An entry may
        arrive before its parent directory: it is kept, and shows once the parent does.
        StoreError: EINVAL for a record without a version or a key no store could have made
        (keys.check_entry_key), ENOSPC when the disk cannot take it, ENAMETOOLONG or ENOSPC
        for a target or xattrs over the limits (keys.py)."""

    # -- forgetting ------------------------------------------------------------------------
    def collect_tombstones(self, cutoff_ms: int, limit: int = 10_000) -> int:
        """Forget the tombstones of deletes older than ``cutoff_ms`` (wall clock, ms since the
        epoch): their keys leave the store and, through the watchers, the hash tree. At most
        ``limit`` per call, and how many went: the caller comes back while it gets ``limit``.
        The caller decides the cutoff: only once every peer has the delete may it go."""

    def forget_stale(self, cutoff_ms: int) -> int:
        """Drop every entry (tombstones too) whose version is older than ``cutoff_ms`` and was
        written by another peer; how many went. For a replica away longer than the tombstone
        grace period, whose old entries may have been deleted elsewhere with the tombstones
        since collected: what still exists comes back from the peers, and this replica's own
        writes stay (never lose them)."""

    # -- kept beside the entries, by replication -------------------------------------------
    def meta_int(self, name: str) -> int:
        """A number kept beside the entries under ``name``; 0 when never set."""

    def meta_bytes(self, name: str) -> bytes | None:
        """Bytes kept beside the entries under ``name``; None when never set."""

    def set_meta_bytes(self, name: str, value: bytes) -> None:
        """Keep ``value`` under ``name``, on disk before returning."""
