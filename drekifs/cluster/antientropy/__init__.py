"""Anti-entropy for the replicated ``global`` store.

A :class:`HashTree` over (entry key -> version digest), updated in O(1) per write, and
:class:`AntiEntropy`, which periodically compares trees with one random peer over a
:class:`~drekifs.cluster.net.Network` and repairs both sides, exchanging bytes in proportion to
the difference. The store plugs in as an :class:`EntrySource` (a dict-backed one for tests and
simulations is ``tests/harness/memsource.py``).
"""

from drekifs.cluster.antientropy.config import AntiEntropyConfig
from drekifs.cluster.antientropy.hashtree import HashTree, TreeShape
from drekifs.cluster.antientropy.source import EntrySource, version_digest
from drekifs.cluster.antientropy.sync import AntiEntropy, SyncResult
from drekifs.cluster.antientropy.wire import Malformed

__all__ = [
    "AntiEntropy",
    "AntiEntropyConfig",
    "EntrySource",
    "HashTree",
    "Malformed",
    "SyncResult",
    "TreeShape",
    "version_digest",
]
