"""Which members are a peer's neighbours: a union of hashed rings.

Plumtree needs each peer to have a few neighbours, not the whole membership: every message is
announced to every lazy neighbour, so the traffic per message grows with the view size. Like
HyParView's active view, the view here is a small random subset — about ln(n) + 3 peers — but
it is *computed*, not negotiated: ring ``r`` orders every live member by a hash of (r, name),
and a peer's neighbours are its successor and predecessor on each of ``config.rings(n)`` rings.

Why this shape:

- **Symmetric without messages**: B follows A on a ring exactly when A precedes B, so two peers
  with the same membership list agree on their link; Plumtree's PRUNE and GRAFT assume links go
  both ways. (While membership views differ, a link may be one-sided for a moment: the protocol
  copes, see :mod:`.broadcast`.)
- **Connected by construction**: a single ring already spans every live member, so no peer is
  ever isolated, whatever the hash — unlike independent random samples.
- **Low diameter**: a union of a few random rings is an expander with high probability, so the
  first flood reaches n peers in about log(n) / log(view size - 1) hops.
- **Stable under churn**: when a member dies, only its ring neighbours get a new neighbour each
  (the ring closes over the gap); the rest of the tree is untouched. The "refresh when members
  die" of HyParView comes for free from the membership.

The hash is the same on every peer (no seed): it only has to be unpredictable in its spread,
not secret.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable


@functools.lru_cache(maxsize=1 << 17)
def ring_key(ring: int, name: str) -> bytes:
    """``name``'s position on ring ``ring`` (a pure function: cached across recomputations)."""
    return hashlib.blake2b(f"{ring}\0{name}".encode(), digest_size=8).digest()


def choose_neighbours(me: str, members: Iterable[str], rings: int) -> list[str]:
    """``me``'s neighbours among ``members`` (live members; ``me`` may or may not be among them):
    its predecessor and successor on each of ``rings`` rings, without repeats. Everyone when
    there are at most ``2 * rings`` others."""
    everyone = frozenset(members) | {me}
    if len(everyone) - 1 <= 2 * rings:
        return sorted(everyone - {me})
    chosen: dict[str, None] = {}
    for ring in _rings(everyone, rings):
        before, after = ring[me]
        chosen[before] = chosen[after] = None
    return list(chosen)


@functools.lru_cache(maxsize=8)
def _rings(members: frozenset[str], rings: int) -> tuple[dict[str, tuple[str, str]], ...]:
    """For each ring, every member's (predecessor, successor). Cached: every peer of one
    process (a simulation) shares the result for the same membership, and one daemon asks
    again only when its membership changed."""
    out = []
    for ring in range(rings):
        order = sorted(members, key=lambda name: (ring_key(ring, name), name))
        n = len(order)
        out.append({name: (order[i - 1], order[(i + 1) % n]) for i, name in enumerate(order)})
    return tuple(out)
