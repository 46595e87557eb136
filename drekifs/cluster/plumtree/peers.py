"""A peer's neighbours, split into eager (links of the broadcast tree) and lazy ones.

Keyed by address, as that is what the network tells us a message came from; names are kept for
:meth:`PeerSets.names` (the ``.dreki/replication`` file) only. Dicts rather than sets, so
iteration follows insertion order and a simulation does not depend on string hashing.
"""

from __future__ import annotations

from drekifs.cluster.net import PeerAddr


class PeerSets:
    """Every neighbour is in exactly one of :attr:`eager` and :attr:`lazy`."""

    def __init__(self) -> None:
        self.eager: dict[PeerAddr, None] = {}
        self.lazy: dict[PeerAddr, None] = {}
        self._names: dict[PeerAddr, str] = {}

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, addr: PeerAddr) -> bool:
        return addr in self._names

    def name_of(self, addr: PeerAddr) -> str | None:
        return self._names.get(addr)

    def replace(self, neighbours: dict[str, PeerAddr]) -> tuple[int, int]:
        """Make ``neighbours`` the neighbour set: newcomers (or a member at a new address)
        start eager, as in Plumtree; the others keep their state. (added, removed)."""
        wanted = {(addr[0], addr[1]): name for name, addr in neighbours.items()}
        removed = [addr for addr in self._names if wanted.get(addr) != self._names[addr]]
        for addr in removed:
            del self._names[addr]
            self.eager.pop(addr, None)
            self.lazy.pop(addr, None)
        added = 0
        for addr, name in wanted.items():
            if addr not in self._names:
                self._names[addr] = name
                self.eager[addr] = None
                added += 1
        return added, len(removed)

    def make_eager(self, addr: PeerAddr) -> bool:
        """True if ``addr`` is a neighbour that was lazy."""
        if addr in self.lazy:
            del self.lazy[addr]
            self.eager[addr] = None
            return True
        return False

    def make_lazy(self, addr: PeerAddr) -> bool:
        """True if ``addr`` is a neighbour that was eager."""
        if addr in self.eager:
            del self.eager[addr]
            self.lazy[addr] = None
            return True
        return False

    def names(self, which: dict[PeerAddr, None]) -> list[str]:
        return sorted(self._names[addr] for addr in which)
