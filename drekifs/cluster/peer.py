"""This peer in the cluster: its transport, its membership, its stores served to the others.

:class:`Peer` puts the pieces together for the daemon: a sealed :class:`Transport` on the port
of this node's ``_node._dreki`` SRV record, SWIM :class:`Membership` seeded with the nodes of the
DNS world, the :class:`StoreService` answering other peers about this node's local stores, and a
:class:`StoreClient` per (node, store) for the filesystem to reach theirs. The key ring file is
read again when it changes, so keys rotate without a restart.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import os
import random
import resource
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from ..stores.base import Store
from ..stores.record import TOMBSTONE_GRACE
from ..stores.replica import Replica
from ..supervise import Health, supervise
from ..urn import is_valid_store_name
from ..world.model import World
from .keyring import KeyRing, KeyRingError
from .limits import Limits
from .net import PeerAddr, RemoteError
from .rejoin import came_back, exchange_with_returning
from .replication import Replication
from .storerpc import StoreClient, StoreService
from .swim import Membership, SwimConfig
from .transport import Transport

log = logging.getLogger(__name__)

# Descriptors kept for what is not an accepted connection: LMDB, FUSE, logs, the control
# socket... (outgoing connections, one per peer at most, are added to it).
RESERVED_DESCRIPTORS = 256

KEYRING_POLL = 2.0  # seconds between looks at the key ring file
DOWN_STATES = frozenset({"dead", "left"})


def resolve_host(host: str) -> str | None:
    """An SRV target to an IPv4/IPv6 address: literal addresses as they are, names by the
    system resolver (blocking: call from a thread)."""
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host))
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return None
    for family in (socket.AF_INET, socket.AF_INET6):
        for info in infos:
            if info[0] == family:
                return str(info[4][0])
    return None


def _bind_host(target: str) -> str:
    """Where to listen: the address DNS gives this node (others are told it, and send there),
    when it is one of this host's; else every address, with a warning."""
    ip = resolve_host(target)
    if ip is not None:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            try:
                s.bind((ip, 0))
                return ip
            except OSError:
                pass
    log.warning("%s (%s) is not an address of this host: listening on all of them", target, ip)
    return "0.0.0.0"


class Peer:
    def __init__(
        self,
        world: World,
        node: str,
        keyring_path: Path,
        stores: dict[str, Store],
        *,
        save_incarnation: Callable[[int], None],
        incarnation: int,
        on_members_changed: Callable[[str, tuple[str, ...] | None], None] = lambda n, s: None,
        version: str = "",
        tombstone_grace: float = TOMBSTONE_GRACE,
        swim: SwimConfig | None = None,
    ) -> None:
        self.world = world
        self.node = node
        self.keyring_path = keyring_path
        self.keyring = KeyRing.load(keyring_path)
        self._keyring_stamp = _stamp(keyring_path)
        node_rec = world.nodes[node]
        if node_rec.address is None:
            raise KeyRingError(f"node {node} has no _node._dreki SRV address")
        self.port = node_rec.address.port
        self.transport = Transport(
            world.domain,
            self.keyring,
            (_bind_host(node_rec.address.host), self.port),
            limits=_limits_for(len(world.nodes)),
        )
        local_stores = {n: s for n, s in stores.items() if n != "global"}
        self.service = StoreService(node, local_stores, self._addr_of_subscriber)
        self.service.register(self.transport)
        self.transport.register("store.changed", self._changed_there)
        # Set by the daemon: (owner node, store, changed keys) -> invalidate what is cached.
        self.on_remote_change: Callable[[str, str, list], None] = lambda o, s, k: None
        meta = {"stores": sorted(local_stores), "version": version}
        # One datagram handler slot on the transport: Plumtree's datagrams, then SWIM's.
        self._mux = DatagramMux(self.transport)
        self.replication: Replication | None = None
        # Replicated when the global store is a Replica (stores/replica.py: a runtime check of
        # its members, so a new kind of store needs no registration here).
        if "global" in stores and isinstance(stores["global"], Replica):
            self.replication = Replication(
                node, self._mux, stores["global"], tombstone_grace=tombstone_grace
            )
            self._mux.first = self.replication.broadcast.handle_datagram
        self.membership = Membership(
            node,
            self._mux,
            swim or SwimConfig(),
            incarnation=incarnation,
            meta=meta,
            save_incarnation=save_incarnation,
        )
        self.membership.watchers.append(
            lambda info: on_members_changed(info.name, _stores_in(info.meta))
        )
        self._members_moved = trio.Event()
        self._rng = random.Random()
        self._states: dict[str, str] = {}
        self.membership.watchers.append(self._log_state)
        self.membership.watchers.append(lambda info: self._members_moved.set())
        self._addrs: dict[str, PeerAddr] = {}
        self._world_moved = trio.Event()
        self._clients: dict[tuple[str, str], StoreClient] = {}
        self.health = {n: Health(n) for n in ("keyring", "world", "notifier", "replication")}

    # -- the world -------------------------------------------------------------------------

    async def set_world(self, world: World) -> None:
        """Seeds and addresses from the DNS world (again after each change)."""
        self.world = world
        addrs: dict[str, PeerAddr] = {}
        for name, node in world.nodes.items():
            if node.address is None:
                continue
            ip = await trio.to_thread.run_sync(resolve_host, node.address.host)
            if ip is None:
                log.warning("node %s: cannot resolve %s", name, node.address.host)
                continue
            addrs[name] = (ip, node.address.port)
        self._addrs = addrs
        self.membership.set_seeds({n: a for n, a in addrs.items() if n != self.node})
        if self.replication is not None:
            self.replication.note_members((), world.nodes)

    def _log_state(self, info: Any) -> None:
        """One line per change of a member's state: what an operator looks for first."""
        before = self._states.get(info.name, "unknown")
        if before != info.state:
            self._states[info.name] = info.state
            level = logging.WARNING if info.state in ("suspect", "dead") else logging.INFO
            log.log(level, "member %s: %s -> %s (incarnation %d)", info.name, before,
                    info.state, info.incarnation)  # fmt: skip

    def alive(self) -> dict[str, PeerAddr]:
        return {
            m.name: m.addr
            for m in self.membership.members()
            if m.state == "alive" and m.addr is not None
        }

    async def _follow_members(self) -> None:
        """Replication's peers follow membership (at most every 0.5 s: members change in
        bursts); the first time others are alive, catch up with one of them."""
        assert self.replication is not None
        caught_up = False
        before: set[str] = set()
        while True:
            await self._members_moved.wait()
            self._members_moved = trio.Event()
            alive = self.alive()
            self.replication.set_members(alive)
            # Every member heard of may hold a replica: tombstones wait for it (replication.py).
            heard = (m.name for m in self.membership.members() if m.state != "unknown")
            self.replication.note_members(heard)
            if not caught_up and len(alive) > 1:
                caught_up = await self.replication.catch_up(alive)
            elif caught_up and (back := came_back(self.node, before, alive)):
                # Members back from a partition (or a restart) wrote meanwhile: repair now,
                # not at the next periodic exchange. In this loop, one round at a time: a
                # flapping member must not pile exchanges up.
                await exchange_with_returning(back, alive, self.replication.exchange, self._rng)
            before = set(alive)
            await trio.sleep(0.5)

    def update_world(self, world: World) -> None:
        """The DNS world changed (called from the world watcher): seeds follow, soon."""
        self.world = world
        self._world_moved.set()

    async def _follow_world(self) -> None:
        while True:
            await self._world_moved.wait()
            self._world_moved = trio.Event()
            await self.set_world(self.world)

    # -- serving ---------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.transport.serve)
            await self.set_world(self.world)
            await nursery.start(self.membership.run)
            # The parts around the transport and the membership are restarted with backoff
            # when they fail (supervise.py): one bad message or bug never takes the peer down.
            for health, part in self._supervised():
                nursery.start_soon(supervise, health, part)
            if self.replication is not None:
                nursery.start_soon(self._follow_members)
            log.info(
                "peer %s listening on port %d (key %s)",
                self.node,
                self.port,
                self.keyring.ids()[0],
            )
            task_status.started()

    def _supervised(self) -> list[tuple[Health, Callable[[], Any]]]:
        parts: list[tuple[Health, Callable[[], Any]]] = [
            (self.health["keyring"], self._follow_keyring),
            (self.health["world"], self._follow_world),
            (self.health["notifier"], lambda: self.service.run_notifier(self.transport)),
        ]
        if self.replication is not None:
            parts.append((self.health["replication"], self.replication.run))
        return parts

    async def leave(self) -> None:
        with trio.move_on_after(2.5):
            await self.membership.leave()

    async def _follow_keyring(self) -> None:
        while True:
            await trio.sleep(KEYRING_POLL)
            stamp = _stamp(self.keyring_path)
            if stamp == self._keyring_stamp:
                continue
            self._keyring_stamp = stamp
            try:
                ring = KeyRing.load(self.keyring_path)
            except KeyRingError as e:
                log.error("key ring not reloaded, keeping the old one: %s", e)
                continue
            self.keyring = ring
            self.transport.set_keyring(ring)
            log.info("key ring reloaded: keys %s (primary first)", " ".join(ring.ids()))

    # -- other nodes' stores ---------------------------------------------------------------

    def address_of(self, node: str) -> PeerAddr | None:
        """Where to reach a node, or None when membership knows it is down."""
        if self.membership.state_of(node) in DOWN_STATES:
            return None
        return self._addrs.get(node)

    def client_of(self, node: str, store: str) -> StoreClient | None:
        key = (node, store)
        client = self._clients.get(key)
        if client is None:
            client = StoreClient(
                self.transport, node, store, lambda: self.address_of(node), me=self.node
            )
            self._clients[key] = client
        return client

    def _addr_of_subscriber(self, node: str) -> PeerAddr | None:
        return self.address_of(node) if node in self.world.nodes else None

    async def _changed_there(self, src: PeerAddr, args: Any) -> None:
        """Another node's store changed (store.changed from its owner)."""
        if not isinstance(args, dict):
            raise RemoteError(errno.EINVAL, "arguments must be a map")
        owner, store, keys = args.get("o"), args.get("s"), args.get("keys")
        if not isinstance(owner, str) or not isinstance(store, str) or not isinstance(keys, list):
            raise RemoteError(errno.EINVAL, "store.changed needs o, s and keys")
        good = [
            tuple(k)
            for k in keys
            if isinstance(k, list) and k and all(isinstance(p, bytes) for p in k)
        ]
        self.on_remote_change(owner, store, good)

    # -- status ----------------------------------------------------------------------------

    def member_rows(self) -> list[dict[str, Any]]:
        """One row per node of the world (then any member DNS does not list)."""
        known = {m.name: m for m in self.membership.members()}
        rows = []
        for name in sorted(set(self.world.nodes) | set(known)):
            m = known.get(name)
            addr = self._addrs.get(name)
            rows.append(
                {
                    "node": name,
                    "state": m.state if m else "unknown",
                    "address": f"{addr[0]}:{addr[1]}" if addr else "-",
                    "incarnation": m.incarnation if m else 0,
                    "since": m.since if m else 0.0,
                    "self": name == self.node,
                }
            )
        return rows

    def members_text(self) -> str:
        lines = []
        for r in self.member_rows():
            since = (
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r["since"])) if r["since"] else "-"
            )
            lines.append(f"{r['node']} {r['state']} {r['address']} {r['incarnation']} {since}")
        return "\n".join(lines) + "\n"

    def replication_text(self) -> str:
        if self.replication is None:
            return "no global store\n"
        return json.dumps(self.replication.stats(), indent=1, default=str) + "\n"

    def members_json(self) -> str:
        return json.dumps(self.member_rows(), indent=1) + "\n"

    def counters_text(self) -> str:
        counters = dict(self.transport.counters)
        counters.update((f"swim.{k}", v) for k, v in self.membership.counters.items())
        if self.replication is not None:
            r = self.replication
            counters.update((f"plumtree.{k}", v) for k, v in r.broadcast.counters.items())
            counters.update((f"antientropy.{k}", v) for k, v in r.antientropy.counters.items())
            counters["replication.merged"] = r.replica.merged
            counters["replication.refused"] = r.replica.refused
        text = "".join(f"{k} {v}\n" for k, v in sorted(counters.items()))
        return text + "".join(h.lines() for h in self.health.values())


class DatagramMux:
    """The transport, with its single datagram handler shared: ``first`` (Plumtree) sees each
    datagram and says whether it was its own; the others go to the handler set here (SWIM)."""

    def __init__(self, net: Transport) -> None:
        self.net = net
        self.addr = net.addr
        self.first: Callable[[PeerAddr, Any], bool] = lambda src, msg: False
        self._rest: Callable[[PeerAddr, Any], None] = lambda src, msg: None
        net.on_datagram(self._datagram)

    def _datagram(self, src: PeerAddr, msg: Any) -> None:
        if not self.first(src, msg):
            self._rest(src, msg)

    def on_datagram(self, handler: Callable[[PeerAddr, Any], None]) -> None:
        self._rest = handler

    def send_datagram(self, to: PeerAddr, msg: Any) -> None:
        self.net.send_datagram(to, msg)

    async def call(self, to: PeerAddr, method: str, args: Any, *, timeout: float) -> Any:
        return await self.net.call(to, method, args, timeout=timeout)

    def register(self, method: str, handler: Any, *, inline: bool = False) -> None:
        self.net.register(method, handler, inline=inline)


def _stores_in(meta: Any) -> tuple[str, ...] | None:
    """The local stores a member announces, valid names only (None: it says nothing)."""
    names = meta.get("stores") if isinstance(meta, dict) else None
    if not isinstance(names, list):
        return None
    good = {n for n in names if isinstance(n, str) and is_valid_store_name(n) and n != "global"}
    return tuple(sorted(good))


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when the ring does, or when its mode does (a ring made readable by others
    is refused, and said so, at the next look)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_mode)


def _limits_for(nodes: int) -> Limits:
    """The default limits, fitted to the descriptors this process may open (the daemon raises
    its soft limit to the hard one at start, app/daemon.py)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return Limits()
    limits = Limits().fitted(soft - RESERVED_DESCRIPTORS - nodes)
    if limits != Limits():
        log.warning(
            "%d descriptors allowed (ulimit -n): only %d handshakes and %d connections "
            "accepted at once; raise the hard limit for the defaults (%d and %d)",
            soft,
            limits.max_handshakes,
            limits.max_conns,
            Limits().max_handshakes,
            Limits().max_conns,
        )
    return limits
