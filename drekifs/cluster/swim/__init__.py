"""SWIM membership and failure detection with the Lifeguard refinements.

Protocol code only: it talks through a :class:`~drekifs.cluster.net.Network` and reads trio's
clock, so it runs on the real transport and in the simulation (``tests/harness/simnet.py``) alike.
One idea per module: :mod:`.config` (knobs), :mod:`.state` (member records), :mod:`.awareness`
(local health), :mod:`.suspicion` (the shrinking suspicion timeout), :mod:`.broadcasts` (the
piggyback queue), :mod:`.messages` (wire format) and :mod:`.membership` (the protocol). The
simulated cluster for tests and benchmarks is ``tests/harness/swim_cluster.py``.
"""

from drekifs.cluster.swim.config import SwimConfig
from drekifs.cluster.swim.membership import PUSH_PULL, Membership
from drekifs.cluster.swim.state import MemberInfo, State

__all__ = ["PUSH_PULL", "MemberInfo", "Membership", "State", "SwimConfig"]
