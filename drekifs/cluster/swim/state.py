"""What one peer believes about one member: the states of SWIM and the member record."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from drekifs.cluster.net import PeerAddr


class State(enum.StrEnum):
    """A member's state, as this peer believes it.

    ``UNKNOWN`` is not a SWIM state: it marks a node named by the DNS world (a seed) that this peer
    has never heard from. It is not alive — nobody vouched for it — and it is neither probed nor
    gossiped to; only the join and reconnect push-pulls try to reach it.
    """

    UNKNOWN = "unknown"
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


LIVE_STATES = frozenset({State.ALIVE, State.SUSPECT})  # members that count in the cluster size
GONE_STATES = frozenset({State.DEAD, State.LEFT})


@dataclass(frozen=True, slots=True)
class MemberInfo:
    """A snapshot of one member, as :meth:`Membership.members` hands it out.

    ``since`` is the wall-clock time (seconds since the epoch) of the last change of ``state``;
    ``incarnation`` is 0 for a seed never heard from.
    """

    name: str
    state: str
    addr: PeerAddr
    incarnation: int
    since: float
    meta: dict[str, Any]


@dataclass(slots=True)
class Member:
    """The mutable record the protocol keeps for one member (this peer's own one included).

    ``changed_at`` is trio's clock at the last state change: the protocol's own timers (gossip to
    the recently dead, dead-node reclaim) read it; ``since`` is its wall-clock twin for humans.
    """

    name: str
    addr: PeerAddr
    incarnation: int
    state: State
    since: float
    meta: dict[str, Any] = field(default_factory=dict)
    changed_at: float = float("-inf")

    def info(self) -> MemberInfo:
        return MemberInfo(
            name=self.name,
            state=str(self.state),
            addr=self.addr,
            incarnation=self.incarnation,
            since=self.since,
            meta=dict(self.meta),
        )
