"""From DNS records to a :class:`~drekifs.world.model.World`, with every world error found.

The resolver is a generator, so the same logic runs over a zone file (answered at once) and over
real DNS servers (answered concurrently by a trio driver): it yields a batch of queries, one
breadth-first level of the graph at a time, and is sent back the answers. No I/O happens here.

Records read, for the world root ``W`` and every member ``M`` found (docs/design.md §2)::

    _dreki.M              SRV   members of region M (target = member DNS name, port ignored)
    _dreki.M              TXT   friendly name of region M
    _node._dreki.M        SRV   M is a node; its peer listens on target:port
    _name._dreki.M        TXT   friendly name of node M
    _node._name._dreki.M  TXT   peer id of node M (default: M)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass

from ..urn import is_valid_dirname
from .model import (
    BAD_NAME,
    CONTRADICTORY,
    CYCLE,
    DANGLING,
    DOT_NAME,
    MALFORMED,
    RESERVED,
    RESERVED_NAMES,
    SIBLING_CLASH,
    TOO_LARGE,
    Address,
    Node,
    Region,
    World,
    WorldError,
)

OK = "ok"
NXDOMAIN = "nxdomain"
NODATA = "nodata"

DEFAULT_MAX_NAMES = 100_000


class SourceError(Exception):
    """The source could not answer (timeout, SERVFAIL, unreadable zone file): not a world error.

    The caller keeps serving the last good world.
    """


@dataclass(frozen=True, slots=True)
class Query:
    name: str  # presentation form, absolute, no trailing dot
    rdtype: str  # "SRV" or "TXT"


@dataclass(frozen=True, slots=True)
class SrvRecord:
    priority: int
    weight: int
    port: int
    target: str  # presentation form, lower case, no trailing dot; "" for the root "."
    first_label: bytes  # raw leftmost label of the target, lower case


@dataclass(frozen=True, slots=True)
class Answer:
    status: str  # OK, NXDOMAIN or NODATA
    records: tuple = ()  # SrvRecord for SRV; bytes (the joined strings) for TXT
    ttl: int | None = None


Resolution = Generator[list[Query], dict[Query, Answer], World]


def _q(name: str) -> tuple[Query, ...]:
    return (
        Query(f"_node._dreki.{name}", "SRV"),
        Query(f"_dreki.{name}", "SRV"),
        Query(f"_dreki.{name}", "TXT"),
        Query(f"_name._dreki.{name}", "TXT"),
        Query(f"_node._name._dreki.{name}", "TXT"),
    )


def _label_problem(label: bytes, reserved: frozenset[str]) -> tuple[str, str] | None:
    if label.startswith(b"."):
        return DOT_NAME, "starts with '.'"
    text = label.decode("ascii", "replace")
    if text in reserved:
        return RESERVED, "is reserved for a store"
    if not label or any(c not in b"abcdefghijklmnopqrstuvwxyz0123456789_-" for c in label):
        return BAD_NAME, "has characters other than a-z, 0-9, '_' and '-'"
    return None


class _Builder:
    """Accumulates what the answers say, then checks the graph."""

    def __init__(self, domain: str, reserved: frozenset[str]) -> None:
        self.domain = domain
        self.reserved = reserved
        self.errors: list[WorldError] = []
        self.ttl: int | None = None
        self.nodes: dict[str, Node] = {}
        self.region_friendly: dict[str, str | None] = {}
        # region -> [(member, first label)] for edges that passed the name checks
        self.edges: dict[str, list[tuple[str, bytes]]] = {}
        self.dangling: set[str] = set()
        self.skipped_for_size = 0
        self.skipped: set[str] = set()  # reported otherwise, or past max_names: not served

    def error(self, kind: str, names: Iterable[str], message: str) -> None:
        self.errors.append(WorldError(kind, tuple(names), message))

    def see_ttl(self, answer: Answer) -> None:
        if answer.ttl is not None:
            self.ttl = answer.ttl if self.ttl is None else min(self.ttl, answer.ttl)

    def text(self, name: str, what: str, answer: Answer) -> str | None:
        """One TXT value; several different values are contradictory (the first sorted wins)."""
        if answer.status != OK or not answer.records:
            return None
        values = sorted(set(answer.records))
        if len(values) > 1:
            self.error(
                CONTRADICTORY,
                [name],
                f"{name} has {len(values)} different {what} TXT records; using the first",
            )
        raw = values[0]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.error(MALFORMED, [name], f"{what} TXT record of {name} is not UTF-8")
            return raw.decode("utf-8", "replace")

    def classify(self, name: str, answers: dict[Query, Answer]) -> list[tuple[str, bytes]]:
        """Record what ``name`` is; return the members it lists (to visit next)."""
        node_q, members_q, rtxt_q, ntxt_q, pid_q = _q(name)
        node_srv, member_srv, rtxt, ntxt, pid = (
            answers[node_q],
            answers[members_q],
            answers[rtxt_q],
            answers[ntxt_q],
            answers[pid_q],
        )
        for a in (node_srv, member_srv, rtxt, ntxt, pid):
            self.see_ttl(a)
        is_root = name == self.domain
        has_node = node_srv.status == OK and bool(node_srv.records) and not is_root
        if is_root and any(a.status == OK and a.records for a in (node_srv, ntxt, pid)):
            self.error(
                CONTRADICTORY,
                [name],
                f"the world root {name} has node records; the root is always a region,"
                " they are ignored",
            )
        has_region = (member_srv.status == OK and bool(member_srv.records)) or (
            rtxt.status == OK and bool(rtxt.records)
        )
        if has_node:
            if has_region:
                self.error(
                    CONTRADICTORY,
                    [name],
                    f"{name} is both a node (_node._dreki SRV) and a region (_dreki records);"
                    " served as a node, its members ignored",
                )
            self.nodes[name] = self._node(name, node_srv, ntxt, pid)
            return []
        if has_region or is_root:
            node_records = [
                what
                for what, a in (("_name._dreki TXT", ntxt), ("_node._name._dreki TXT", pid))
                if a.status == OK and a.records
            ]
            if not is_root and node_records:
                self.error(
                    CONTRADICTORY,
                    [name],
                    f"{name} is a region but has node records ({', '.join(node_records)}); ignored",
                )
            if is_root and not has_region:
                self.error(
                    DANGLING, [name], f"the world root {name} has no _dreki SRV or TXT records"
                )
            self.region_friendly[name] = self.text(name, "_dreki", rtxt)
            return self._members(name, member_srv)
        if ntxt.status == OK or pid.status == OK:
            self.error(
                MALFORMED,
                [name],
                f"{name} has _name._dreki records but no _node._dreki SRV; not served",
            )
            self.skipped.add(name)
            return []
        self.dangling.add(name)
        return []

    def _node(self, name: str, srv: Answer, ntxt: Answer, pid: Answer) -> Node:
        addresses = []
        for rec in srv.records:
            if not rec.target:
                self.error(MALFORMED, [name], f"_node._dreki SRV of {name} has target '.'")
            elif rec.port == 0:
                self.error(MALFORMED, [name], f"_node._dreki SRV of {name} has port 0")
            else:
                addresses.append(Address(rec.target, rec.port, rec.priority, rec.weight))
        addresses.sort(key=lambda a: (a.priority, -a.weight, a.host, a.port))
        peer_id = self.text(name, "_node._name._dreki", pid)
        if peer_id is not None and not peer_id.strip():
            self.error(MALFORMED, [name], f"peer id TXT of {name} is empty; using {name}")
            peer_id = None
        return Node(
            name,
            peer_id.strip() if peer_id else name,
            self.text(name, "_name._dreki", ntxt),
            tuple(addresses),
        )

    def _members(self, region: str, srv: Answer) -> list[tuple[str, bytes]]:
        members: list[tuple[str, bytes]] = []
        seen: set[str] = set()
        for rec in sorted(srv.records, key=lambda r: r.target):
            if not rec.target:
                self.error(MALFORMED, [region], f"_dreki SRV of {region} has target '.'")
                continue
            if rec.target in seen:
                continue  # listed twice (e.g. two ports): one edge
            seen.add(rec.target)
            problem = _label_problem(rec.first_label, self.reserved)
            if problem:
                kind, why = problem
                label = rec.first_label.decode("ascii", "backslashreplace")
                self.error(
                    kind,
                    [region, rec.target],
                    f"member {rec.target} of {region}: directory name '{label}' {why}; ignored",
                )
                continue
            members.append((rec.target, rec.first_label))
        self.edges[region] = members
        return members

    def build(self) -> World:
        # Dangling members: the edge goes, once per member, naming every region that lists it.
        listed_by: dict[str, list[str]] = defaultdict(list)
        for region, members in self.edges.items():
            for member, _ in members:
                listed_by[member].append(region)
        for member in sorted(self.dangling):
            if member == self.domain:
                continue
            regions = sorted(listed_by[member])
            self.error(
                DANGLING,
                [member, *regions],
                f"{member} (listed by {', '.join(regions)}) has no drekifs records; ignored",
            )
        edges = {
            r: [(m, lab) for m, lab in ms if m not in self.dangling and m not in self.skipped]
            for r, ms in self.edges.items()
        }
        self._break_cycles(edges)
        # Keep what is still reachable from the root.
        reachable = {self.domain}
        stack = [self.domain]
        while stack:
            for member, _ in edges.get(stack.pop(), ()):
                if member not in reachable:
                    reachable.add(member)
                    stack.append(member)
        regions: dict[str, Region] = {}
        for name in sorted(reachable):
            if name in self.nodes:
                continue
            regions[name] = Region(
                name, self.region_friendly.get(name), self._dirnames(name, edges.get(name, []))
            )
        nodes = {n: self.nodes[n] for n in sorted(reachable) if n in self.nodes}
        self._check_peer_ids(nodes)
        return World(self.domain, regions, nodes, self.errors, self.ttl)

    def _break_cycles(self, edges: dict[str, list[tuple[str, bytes]]]) -> None:
        """Depth-first from the root; an edge back to a region on the current path is a cycle."""
        on_path: dict[str, int] = {}
        done: set[str] = set()
        path: list[str] = []
        stack: list[tuple[str, int]] = [(self.domain, 0)]
        while stack:
            name, i = stack.pop()
            if i == 0:
                on_path[name] = len(path)
                path.append(name)
            members = edges.get(name, [])
            if i < len(members):
                stack.append((name, i + 1))
                member = members[i][0]
                if member in on_path:
                    cycle = [*path[on_path[member] :], member]
                    self.error(
                        CYCLE,
                        cycle,
                        "cycle " + " -> ".join(cycle) + f"; the edge {name} -> {member} ignored",
                    )
                    members[i] = ("", b"")  # mark; removed below
                elif member not in done and member in edges:
                    stack.append((member, 0))
            else:
                del on_path[name]
                path.pop()
                done.add(name)
        for name in edges:
            edges[name] = [e for e in edges[name] if e[0]]

    def _dirnames(
        self, region: str, members: list[tuple[str, bytes]]
    ) -> tuple[tuple[str, str], ...]:
        by_label: dict[str, list[str]] = defaultdict(list)
        for member, label in members:
            by_label[label.decode("ascii")].append(member)
        children = []
        for label, names in by_label.items():
            if len(names) == 1:
                children.append((label, names[0]))
                continue
            self.error(
                SIBLING_CLASH,
                [region, *names],
                f"members of {region} share the name {label!r}: {', '.join(names)};"
                " each served under its full DNS name",
            )
            for n in names:
                if is_valid_dirname(n):
                    children.append((n, n))
                else:
                    self.error(
                        BAD_NAME,
                        [region, n],
                        f"member {n} of {region} clashes and its full name is not a valid"
                        " directory name; ignored",
                    )
        return tuple(sorted(children))

    def _check_peer_ids(self, nodes: dict[str, Node]) -> None:
        owners: dict[str, list[str]] = defaultdict(list)
        for node in nodes.values():
            owners[node.peer_id].append(node.name)
        for peer_id, names in owners.items():
            if len(names) > 1:
                self.error(
                    CONTRADICTORY,
                    names,
                    f"nodes {', '.join(names)} share the peer id {peer_id!r}",
                )


def resolve(
    domain: str,
    reserved: frozenset[str] = RESERVED_NAMES,
    max_names: int = DEFAULT_MAX_NAMES,
) -> Resolution:
    """Resolve the world ``domain``: yields batches of queries, returns the World."""
    domain = domain.lower().rstrip(".")
    b = _Builder(domain, reserved)
    seen = {domain}
    level = [domain]
    while level:
        queries = [q for name in level for q in _q(name)]
        answers = yield queries
        following: list[str] = []
        for name in level:
            for member, _ in b.classify(name, answers):
                if member in seen:
                    continue
                if len(seen) >= max_names:
                    if not b.skipped_for_size:
                        b.error(
                            TOO_LARGE,
                            [member],
                            f"the world has more than {max_names} names;"
                            f" {member} and beyond ignored",
                        )
                    b.skipped_for_size += 1
                    b.skipped.add(member)
                    continue
                seen.add(member)
                following.append(member)
        level = following
    return b.build()


def resolve_sync(domain: str, answer: Callable[[Query], Answer], **kw) -> World:
    """Drive :func:`resolve` with a synchronous answering function (a zone file)."""
    gen = resolve(domain, **kw)
    try:
        queries = next(gen)
        while True:
            queries = gen.send({q: answer(q) for q in queries})
    except StopIteration as stop:
        return stop.value
