"""The stores of this process, in LMDB: one environment per store.

:class:`LmdbStore` is the Store interface (stores/base.py) and the Replica interface
(stores/replica.py) over one LMDB environment. Its pieces, each a module:

- ``schema.py``: the named databases on disk, opening an environment, upgrading an old schema;
- ``layer.py``: changes not yet on disk, which every read consults before LMDB (pure data);
- ``core.py``: :class:`~.core.LmdbCore`, the state and what every side stands on: reads of one
  entry through the layers and caches, and the primitives every change is made of;
- ``writer.py``: :class:`~.writer.GroupCommit`, the group-commit writer: changes on disk in one
  transaction per group, off the event loop; sync, close, and what a stop could not commit;
- ``replica.py``: :class:`~.replica.ReplicaSide`, what replication asks (versions, digests,
  export, merge, forgetting);
- ``store.py``: :class:`~.store.LmdbStore`, the filesystem operations, and the one ``__init__``;
- ``readmap.py``: LMDB's read map out of the daemon's RSS (madvise through ctypes).

Mixins, not composition. The writer and the replica side are classes LmdbStore inherits from
(``LmdbStore(ReplicaSide, GroupCommit)``, both on ``LmdbCore``), not objects it holds, because
all three work on one state: every change (a filesystem call's or a merge's) goes to the same
pending layer and caches that the writer swaps out at each commit and every read consults. Held
as separate objects, either each request would pay an attribute hop per access to that state
(``self.writer.pending``, several per request on the hot paths: get, children, create,
write_value), or each object would keep aliases to it that every commit must rebind. As
mixins, a method is found through the class's MRO once (CPython caches the lookup per type),
so the split costs nothing per call (bench/handlers.py --instructions: 149,047 to 149,205 per
file of a cold tar after it, 148,642 to 149,467 before; a cp -a 555,011 after, 555,977 before),
and the instance keeps one dict of under 30 attributes (core._Slots says why).
The cost: the sides share private attributes, so each declares the ones it uses at the top of
its class, and :meth:`LmdbStore.__init__` sets them all in one place.
"""

from .store import LmdbStore, StoreStats

__all__ = ["LmdbStore", "StoreStats"]
