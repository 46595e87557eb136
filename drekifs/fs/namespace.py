"""The world's directories as inodes: an immutable snapshot rebuilt when the world changes.

Every directory of the tree (root, regions, nodes), the store directories in it and the status
directory ``.dreki`` get an inode number derived from their URN, so the same path has the same
inode across remounts, and on every peer, with nothing stored. World inodes live in
``[2**62, 2**63)``; the stores issue allocates entry inodes below ``2**62`` (persisted), and the
root is 1 as FUSE wants.

Readdir cursors are the children's inode numbers: each directory's children are kept sorted by
inode, and a listing resumed after cursor ``c`` continues with the first child whose inode is
greater than ``c``. Names added or removed between two READDIRs never make a listing skip or
repeat a survivor.
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import logging
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from ..urn import STATUS_STORE, URN
from ..world.model import World
from ..world.snapshot import Snapshot
from .inodes import alias_of

log = logging.getLogger(__name__)

ROOT_INODE = 1
WORLD_INODE_BASE = 1 << 62
MAX_PATHS = 200_000  # a DAG can have many more paths than names; serve this many at most


class Kind(enum.Enum):
    ROOT = "root"
    REGION = "region"
    NODE = "node"
    STORE = "store"
    STATUS_DIR = "status-dir"
    STATUS_FILE = "status-file"

    @property
    def is_dir(self) -> bool:
        return self is not Kind.STATUS_FILE


WORLD_DIR_MODE = stat.S_IFDIR | 0o555
STORE_DIR_MODE = stat.S_IFDIR | 0o755
STATUS_FILE_MODE = stat.S_IFREG | 0o444


def world_inode(urn_text: str, salt: int = 0) -> int:
    data = urn_text.encode("utf-8", "surrogateescape")
    if salt:
        data += b"\0" + str(salt).encode()
    h = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
    return WORLD_INODE_BASE | (h & (WORLD_INODE_BASE - 1))


@dataclass(slots=True, eq=False)
class Entry:
    ino: int
    urn: URN
    kind: Kind
    mode: int
    mtime_ns: int
    parent: int
    name: bytes
    location: str  # DNS name of the region or node this directory belongs to
    urn_bytes: bytes = b""
    children: dict[bytes, int] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)  # children's inodes, sorted
    nlink: int = 1
    status: str | None = None  # the status file's name
    alias: int = 0  # store roots: which path of their location (inodes.py)

    def after(self, cursor: int) -> int:
        """Index in ``order`` of the first child whose inode is greater than ``cursor``."""
        return bisect.bisect_right(self.order, cursor)


class Namespace:
    """Inodes of the world tree at one moment. Never mutated once built."""

    def __init__(
        self,
        snapshot: Snapshot,
        status_files: tuple[str, ...] = (),
        node_stores: Callable[[str], tuple[str, ...]] | None = None,
        started_ns: int = 0,
    ) -> None:
        """``node_stores(node)`` names the stores of a node (default: global and local)."""
        self.snapshot = snapshot
        self.world: World = snapshot.world
        self.entries: dict[int, Entry] = {}
        self.truncated = False
        # (location, alias) -> path, and (location, store) -> its roots, one per path.
        self.alias_paths: dict[tuple[str, int], tuple[str, ...]] = {}
        self.store_roots: dict[tuple[str, str], list[Entry]] = {}
        aliases_taken: dict[str, set[int]] = {}
        world = self.world
        last_change = max(snapshot.changed_ns.values(), default=snapshot.mtime_ns(()))

        root = self._add(
            URN(world.domain),
            Kind.ROOT,
            WORLD_DIR_MODE,
            snapshot.mtime_ns(()),
            0,
            b"",
            world.domain,
            ino=ROOT_INODE,
        )
        by_path: dict[tuple[str, ...], Entry] = {(): root}
        for count, loc in enumerate(world.locations(limit=MAX_PATHS + 1)):
            if count == MAX_PATHS:
                self.truncated = True
                log.error("the world has more than %d paths; the rest is not served", MAX_PATHS)
                break
            if loc.segments:
                parent = by_path[loc.segments[:-1]]
                entry = self._add(
                    URN(world.domain, loc.segments),
                    Kind.NODE if loc.is_node else Kind.REGION,
                    WORLD_DIR_MODE,
                    snapshot.mtime_ns(loc.segments),
                    parent.ino,
                    loc.segments[-1].encode(),
                    loc.name,
                )
                by_path[loc.segments] = entry
            else:
                entry = root
            stores = (
                (node_stores(loc.name) if node_stores else ("global", "local"))
                if loc.is_node
                else ("global",)
            )
            taken = aliases_taken.setdefault(loc.name, set())
            alias = alias_of(loc.segments, taken)
            taken.add(alias)
            self.alias_paths[(loc.name, alias)] = loc.segments
            for store in stores:
                # Dated from when the location appeared: a region gaining a member does not
                # touch its stores.
                root_entry = self._add(
                    entry.urn.with_store(store),
                    Kind.STORE,
                    STORE_DIR_MODE,
                    snapshot.created(loc.segments),
                    entry.ino,
                    store.encode(),
                    loc.name,
                )
                root_entry.alias = alias
                self.store_roots.setdefault((loc.name, store), []).append(root_entry)
        # Whether any store shows under two paths (a node listed by two regions): only then
        # must a change made through the mount be invalidated on another path.
        self.listed_twice = any(len(roots) > 1 for roots in self.store_roots.values())
        status = self._add(
            URN(world.domain, (), STATUS_STORE),
            Kind.STATUS_DIR,
            WORLD_DIR_MODE,
            started_ns,
            ROOT_INODE,
            STATUS_STORE.encode(),
            world.domain,
        )
        for name in status_files:
            e = self._add(
                URN(world.domain, (), STATUS_STORE, (name.encode(),)),
                Kind.STATUS_FILE,
                STATUS_FILE_MODE,
                last_change,
                status.ino,
                name.encode(),
                world.domain,
            )
            e.status = name
        for e in self.entries.values():
            if e.kind.is_dir:
                e.order.sort()
                e.nlink = 2 + sum(1 for i in e.order if self.entries[i].kind.is_dir)

    def _add(
        self,
        urn: URN,
        kind: Kind,
        mode: int,
        mtime_ns: int,
        parent: int,
        name: bytes,
        location: str,
        ino: int | None = None,
    ) -> Entry:
        text = str(urn)
        if ino is None:
            ino = world_inode(text)
            salt = 0
            while ino in self.entries or ino == ROOT_INODE:
                # Two URNs hashed alike (never seen; 62 bits): the later one moves on.
                salt += 1
                log.warning("inode collision for %s, salt %d", text, salt)
                ino = world_inode(text, salt)
        entry = Entry(ino, urn, kind, mode, mtime_ns, parent, name, location, text.encode())
        self.entries[ino] = entry
        if parent:
            p = self.entries[parent]
            p.children[name] = ino
            p.order.append(ino)
        return entry

    def get(self, ino: int) -> Entry | None:
        return self.entries.get(ino)

    def child(self, parent: int, name: bytes) -> Entry | None:
        p = self.entries.get(parent)
        if p is None:
            return None
        ino = p.children.get(name)
        return self.entries[ino] if ino is not None else None

    def status_entry(self, name: str) -> Entry | None:
        d = self.child(ROOT_INODE, STATUS_STORE.encode())
        return self.child(d.ino, name.encode()) if d else None


@dataclass
class Changes:
    """What the kernel must forget when the namespace goes from ``old`` to ``new``."""

    inodes: list[int] = field(default_factory=list)
    entries: list[tuple[int, bytes, int]] = field(default_factory=list)  # parent, name, ino


def diff(old: Namespace, new: Namespace, changed_status: tuple[str, ...] = ()) -> Changes:
    changes = Changes()
    for ino, o in old.entries.items():
        n = new.entries.get(ino)
        if n is None:
            # Gone: tell its parent's dentry cache, unless the parent is gone too (the kernel
            # drops the whole subtree with the topmost entry).
            if o.parent in new.entries:
                changes.entries.append((o.parent, o.name, ino))
            continue
        if o.kind.is_dir and (o.children != n.children or o.mtime_ns != n.mtime_ns):
            changes.inodes.append(ino)
    for name in changed_status:
        e = new.status_entry(name)
        if e is not None:
            changes.inodes.append(e.ino)
    return changes
