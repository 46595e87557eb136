"""The world as plain data: regions, nodes, the directory tree they make, and world errors.

A :class:`World` is what the resolver (:mod:`drekifs.world.resolve`) builds from DNS records.
It holds only valid edges: every world error has already been reported in ``errors`` and its
offending edge left out, so everything here can be served as is.

DNS names are kept lower case, absolute, without the trailing dot ("node3.dc2.inf.random.sh").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

RESERVED_NAMES = frozenset({"global", "local"})

# Kinds of world errors, as named in `drekifs world --check`, logs and .dreki/world-errors.
CYCLE = "cycle"
DANGLING = "dangling"
RESERVED = "reserved-name"
DOT_NAME = "dot-name"
BAD_NAME = "bad-name"
SIBLING_CLASH = "sibling-clash"
MALFORMED = "malformed"
CONTRADICTORY = "contradictory"
TOO_LARGE = "too-large"
SOURCE = "source"


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int
    priority: int = 0
    weight: int = 0

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    peer_id: str
    friendly: str | None = None
    # SRV targets, best first (lowest priority, then highest weight).
    addresses: tuple[Address, ...] = ()

    @property
    def address(self) -> Address | None:
        return self.addresses[0] if self.addresses else None


@dataclass(frozen=True, slots=True)
class Region:
    name: str
    friendly: str | None = None
    # (directory name, member DNS name), sorted by directory name. Only valid edges.
    children: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class WorldError:
    kind: str
    names: tuple[str, ...]
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


@dataclass(frozen=True, slots=True)
class Location:
    """One directory of the tree: a path of directory names from the root to a member."""

    segments: tuple[str, ...]
    name: str  # the DNS name of the region or node there (the world's name at the root)
    is_node: bool


@dataclass
class World:
    domain: str
    regions: dict[str, Region] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    errors: list[WorldError] = field(default_factory=list)
    # Smallest TTL among the records read: when to look again. None for sources without TTLs.
    ttl: int | None = None

    # -- queries ---------------------------------------------------------------------------

    @property
    def root(self) -> Region:
        return self.regions[self.domain]

    def is_node(self, name: str) -> bool:
        return name in self.nodes

    def children(self, name: str) -> tuple[tuple[str, str], ...]:
        region = self.regions.get(name)
        return region.children if region else ()

    def friendly(self, name: str) -> str | None:
        item = self.nodes.get(name) or self.regions.get(name)
        return item.friendly if item else None

    def locations(self, limit: int | None = None) -> Iterator[Location]:
        """Every directory of the tree, depth first, children in name order.

        A member listed by several regions is yielded once per path. ``limit`` bounds the walk:
        a DAG can have far more paths than names.
        """
        count = 0
        stack: list[Location] = [Location((), self.domain, False)]
        while stack:
            loc = stack.pop()
            yield loc
            count += 1
            if limit is not None and count >= limit:
                return
            for dirname, member in reversed(self.children(loc.name)):
                stack.append(Location((*loc.segments, dirname), member, member in self.nodes))

    def find(self, segments: tuple[str, ...]) -> Location | None:
        """The location at a path of directory names, or None."""
        name = self.domain
        for seg in segments:
            for dirname, member in self.children(name):
                if dirname == seg:
                    name = member
                    break
            else:
                return None
        return Location(segments, name, name in self.nodes)

    def paths_of(self, name: str, limit: int = 1000) -> list[tuple[str, ...]]:
        """Every path at which the member ``name`` appears."""
        return [loc.segments for loc in self.locations(limit=limit * 100) if loc.name == name][
            :limit
        ]

    def node_by_label(self, ident: str) -> Node | None:
        """A node from its DNS name, its name relative to the world, a path or a unique label."""
        ident = ident.strip().rstrip(".").lower()
        if ident in self.nodes:
            return self.nodes[ident]
        rel = f"{ident}.{self.domain}"
        if rel in self.nodes:
            return self.nodes[rel]
        if "/" in ident:
            loc = self.find(tuple(p for p in ident.split("/") if p))
            return self.nodes.get(loc.name) if loc else None
        matches = [n for n in self.nodes.values() if n.name.split(".", 1)[0] == ident]
        return matches[0] if len(matches) == 1 else None

    def first_node(self) -> Node | None:
        return self.nodes[min(self.nodes)] if self.nodes else None

    def same_shape(self, other: World) -> bool:
        """True when both describe the same tree, names and addresses (errors aside)."""
        return (
            self.domain == other.domain
            and self.regions == other.regions
            and self.nodes == other.nodes
        )

    # -- serialisation (the last good world on disk, `drekifs world --json`) ---------------

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "ttl": self.ttl,
            "regions": {
                r.name: {"friendly": r.friendly, "children": [list(c) for c in r.children]}
                for r in self.regions.values()
            },
            "nodes": {
                n.name: {
                    "peer_id": n.peer_id,
                    "friendly": n.friendly,
                    "addresses": [[a.host, a.port, a.priority, a.weight] for a in n.addresses],
                }
                for n in self.nodes.values()
            },
            "errors": [
                {"kind": e.kind, "names": list(e.names), "message": e.message} for e in self.errors
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> World:
        return cls(
            domain=data["domain"],
            ttl=data.get("ttl"),
            regions={
                name: Region(name, r.get("friendly"), tuple((c[0], c[1]) for c in r["children"]))
                for name, r in data["regions"].items()
            },
            nodes={
                name: Node(
                    name,
                    n["peer_id"],
                    n.get("friendly"),
                    tuple(Address(a[0], int(a[1]), int(a[2]), int(a[3])) for a in n["addresses"]),
                )
                for name, n in data["nodes"].items()
            },
            errors=[WorldError(e["kind"], tuple(e["names"]), e["message"]) for e in data["errors"]],
        )
