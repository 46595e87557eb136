"""Plumtree epidemic broadcast: eager push along a spanning tree, lazy IHAVE, GRAFT and PRUNE.

Protocol code only: it talks through a :class:`~drekifs.cluster.net.Network` and reads trio's
clock, so it runs on the real transport and in the simulation (``tests/harness/simnet.py``) alike.
One idea per module: :mod:`.config` (knobs), :mod:`.store` (what the message cache provides),
:mod:`.messages` (wire format), :mod:`.view` (which members are neighbours), :mod:`.peers`
(eager and lazy neighbours), :mod:`.seen` (ids delivered recently), :mod:`.missing` (ids
announced but not received, and their graft timers) and :mod:`.broadcast` (the protocol). The
simulated cluster for tests and benchmarks is ``tests/harness/plumtree_cluster.py``.
"""

from drekifs.cluster.plumtree.broadcast import Broadcast
from drekifs.cluster.plumtree.config import PlumtreeConfig
from drekifs.cluster.plumtree.messages import GOSSIP_METHOD
from drekifs.cluster.plumtree.store import MessageStore

__all__ = ["GOSSIP_METHOD", "Broadcast", "MessageStore", "PlumtreeConfig"]
