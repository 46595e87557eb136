"""Members that come back: which of them a caught-up peer exchanges with at once.

A member that comes back (from a partition, a restart) may have written meanwhile; waiting for
the periodic anti-entropy exchange would leave the two apart for up to its interval. After a
heal, though, every member of the other side comes back at the same instant: exchanging with
each is quadratic over the cluster (1,000 peers split in two queued 501,497 exchanges in the
simulation, 99.7% of them between peers already in sync), and exchanging with one random
member leaves the peer waiting for the periodic exchange whenever that one call is lost. So:
up to :data:`RETURN_EXCHANGES` of them, in random order, until one exchange brings news (entries
that changed something here; receiving versions this peer already superseded is not news).
Completing is not enough: the members that come back together are not all
from the other side (a peer of this side restarted meanwhile comes back too), and an exchange
with one of those completes while the other side's writes are still missing here (the
simulation showed convergence delayed to the next periodic exchange, 12 s more).

The daemon (:mod:`drekifs.cluster.peer`) and the simulation
(``tests/harness/replication_cluster.py``) both decide with this module.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Iterable, Mapping

from .antientropy import SyncResult
from .net import PeerAddr

RETURN_EXCHANGES = 6  # the simulation: 3 left a 12 s tail (seed 1, 5% loss); 4-8 converge at once
RETURN_PUSH_LIMIT = 1000
"""An exchange with a returning member pushes it what it lacks only up to this many entries: the
writes it missed around its return (a write made before this peer's view of the tree included it
reached nobody there). A member that lacks more is catching up with one peer by itself: pushed
by every peer at once, a member back with an empty store took the whole store four times into
one daemon, which missed its SWIM acks for seconds and was declared dead (bench/busy_peer.py;
docs/decisions.md, "A busy peer")."""
EXCHANGE_TIMEOUT = 30.0  # seconds one exchange with a returning member may take

Exchange = Callable[[str, PeerAddr], Awaitable[bool]]
"""One exchange with a member (name, address): True when it completed and :func:`brought_news`."""


def brought_news(result: SyncResult) -> bool:
    """Whether an exchange changed something here: what stops the tries (receiving versions
    this peer already superseded is not news)."""
    return result.changed_here > 0


def came_back(me: str, before: Iterable[str], alive: Mapping[str, PeerAddr]) -> list[str]:
    """The members alive now that were not in the last view (``me`` excluded), sorted."""
    return sorted(set(alive) - set(before) - {me})


async def exchange_with_returning(
    back: list[str],
    alive: Mapping[str, PeerAddr],
    exchange: Exchange,
    rng: random.Random,
    limit: int = RETURN_EXCHANGES,
) -> None:
    """Exchange with members of ``back`` (addresses from ``alive``), in random order, one at a
    time, until one brings news or ``limit`` were tried."""
    order = [name for name in back if name in alive]
    rng.shuffle(order)
    for name in order[:limit]:
        if await exchange(name, alive[name]):
            return
