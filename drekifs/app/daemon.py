"""The daemon's wiring: the world watcher, the stores, the peer, the namespace and the FUSE
operations, put together and run in one trio nursery until unmounted.

``mount`` makes the mount point and the data directory, then serves attached or in the
background (app/service.py), returning once the mount serves requests: proved by reading
``.dreki/pid`` through the kernel. The daemon then runs until unmounted: by ``drekifs umount`` /
``umount`` (the session ends and it exits) or by SIGTERM, SIGINT or SIGHUP (it unmounts itself).
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from .. import __version__, datadir, logs
from ..cluster.keyring import KeyRingError
from ..cluster.peer import Peer
from ..cluster.swim.config import SwimConfig
from ..fs import requestloop
from ..fs.inodes import StoreSlots
from ..fs.namespace import MAX_PATHS, Namespace
from ..fs.operations import Operations
from ..fs.remotestores import RemoteStores
from ..fs.status import StatusFiles, counters_text, pid_text, stores_text
from ..stores.lmdb import LmdbStore
from ..stores.record import TOMBSTONE_GRACE
from ..stores.version import HybridClock
from ..world.model import SOURCE, TOO_LARGE, World
from ..world.render import render_errors, render_json, render_tree
from ..world.resolve import SourceError
from ..world.snapshot import Snapshot
from ..world.watch import SourceConfig, WorldWatcher
from . import control, service
from .mounts import prepare_mountpoint
from .service import MountError, Ready
from .stalls import StallWatch

log = logging.getLogger("drekifs")


@dataclass
class MountConfig:
    mountpoint: Path
    source: SourceConfig
    data_dir: Path
    node: str | None = None
    fuse_options: list[str] = field(default_factory=list)
    foreground: bool = False
    cache_timeout: float = 3600.0
    log_level: str = "INFO"
    log_file: Path | None = None
    stores: list[str] = field(default_factory=list)  # local stores beyond "local"
    max_global_value: int = 1 << 20
    max_local_value: int = 64 << 20
    keyring: Path | None = None  # without one, this peer runs alone
    tombstone_grace: float = TOMBSTONE_GRACE
    poll_us: int = requestloop.POLL_US  # how long to poll /dev/fuse before sleeping
    swim: SwimConfig = field(default_factory=SwimConfig)  # the failure detector's settings


# -- the daemon ----------------------------------------------------------------------------------


class Daemon:
    def __init__(self, config: MountConfig) -> None:
        self.config = config
        self.started_ns = time.time_ns()
        self.stalls = StallWatch()  # the loop held up: counted, and logged with its stack
        self.ops = None
        self.node = None
        self.stores: dict[str, LmdbStore] = {}
        self.watcher = None
        self.external_unmount = False
        self.unsaved: list[str] = []  # what could not be saved at exit: the exit report
        try:
            self.control_path = control.control_socket_path(config.data_dir)
        except datadir.DataDirError as e:
            raise MountError(f"control socket: {e}") from None
        self.peer = None  # cluster.peer.Peer, with a key ring
        self.peer_error = False
        self._stores_seen: dict[str, tuple[str, ...]] = {}  # other nodes' stores, as announced

    async def run(self, ready: Ready) -> None:
        config = self.config
        self.watcher = watcher = WorldWatcher(config.source, config.data_dir, self._world_changed)
        try:
            snap = await watcher.load()
        except SourceError as e:
            raise MountError(f"cannot load the world: {e}") from None
        self.node = self._pick_node(snap.world)
        self.stores = stores = self._open_stores(snap.world)
        self.peer = self._make_peer(snap.world)
        status = self._status_files()
        ns = Namespace(snap, status.names(), self._node_stores, self.started_ns)
        slots = StoreSlots(config.data_dir / "stores" / "slots.json")
        remote = None
        if self.peer is not None and self.node is not None:
            remote = RemoteStores(self.node, self.peer.client_of, config.max_local_value)
            self.peer.on_remote_change = remote.changed
        # Before init: pyfuse3 3.3.0 and 3.4.0 make their worker lock there.
        loop = requestloop.install(config.poll_us)
        self.ops = ops = Operations(
            ns,
            status,
            config.data_dir,
            config.cache_timeout,
            stores,
            self.node,
            slots,
            remote,
            request_loop=loop,
        )

        options = set(pyfuse3.default_options)
        options |= {f"fsname={snap.world.domain}", "subtype=drekifs"}
        if os.getuid() == 0:
            options.add("allow_other")  # others may read, as permission bits say
        options |= set(config.fuse_options)
        try:
            pyfuse3.init(ops, str(config.mountpoint), options)
        except RuntimeError as e:
            raise MountError(f"cannot mount {config.mountpoint}: {e}") from None
        log.info(
            "mounted world %s at %s as node %s (pid %d)",
            snap.world.domain,
            config.mountpoint,
            self.node,
            os.getpid(),
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve, nursery)
                nursery.start_soon(watcher.run)
                nursery.start_soon(ops.invalidator.run)
                nursery.start_soon(logs.summarize)  # counts of repeated failures' log lines
                nursery.start_soon(self.stalls.run)
                nursery.start_soon(self._on_signals, nursery)
                nursery.start_soon(self._log_level_signals)
                nursery.start_soon(self._announce_ready, ready)
                for store in stores.values():
                    nursery.start_soon(store.run_writer)
                    nursery.start_soon(store.run_trimmer)
                nursery.start_soon(control.serve, self.control_path, control.StoreAPI(self).handle)
                if self.peer is not None:
                    nursery.start_soon(self._run_peer)
        finally:
            pyfuse3.close(unmount=not self.external_unmount)
            log.info("unmounted %s", config.mountpoint)
            with trio.CancelScope(shield=True):
                # Whatever the kernel handed us is on disk before the daemon exits, or kept
                # where the next start takes it up, and said (exit_report).
                try:
                    await ops.commit_open_files()
                except Exception:
                    log.exception("committing the open files at exit failed")
                for name, store in stores.items():
                    await self._close_store(name, store)

    async def _close_store(self, name: str, store: LmdbStore) -> None:
        waiting = store.changes - store.committed
        try:
            where = await store.close()
        except Exception as e:
            self.unsaved.append(
                f"store {name}: {waiting} changes could not be saved, nor kept anywhere: {e}"
            )
            log.error("%s", self.unsaved[-1])
            return
        if where is not None:
            self.unsaved.append(
                f"store {name}: {waiting} changes could not be saved; kept in {where}, "
                "taken up at the next mount"
            )

    def _open_stores(self, world: World) -> dict[str, LmdbStore]:
        config = self.config
        node = world.nodes.get(self.node or "")
        peer = node.peer_id if node else "unknown"
        base = config.data_dir / "stores"
        clock = HybridClock()
        common = {"peer": peer, "clock": clock, "uid": os.getuid(), "gid": os.getgid()}
        stores = {
            "global": LmdbStore(
                "global",
                base / "global",
                replicated=True,
                max_value=config.max_global_value,
                **common,
            )
        }
        for name in ("local", *config.stores):
            stores[name] = LmdbStore(
                name, base / name, replicated=False, max_value=config.max_local_value, **common
            )
        return stores

    def _node_stores(self, node: str) -> tuple[str, ...]:
        """The stores under a node's directory: this node's own; another node's as its
        membership metadata says (global and local until it is heard of)."""
        if node == self.node:
            return ("global", "local", *self.config.stores)
        theirs = self._stores_seen.get(node, ())
        return ("global", *sorted(set(theirs) | {"local"}))

    def _make_peer(self, world: World) -> Peer | None:
        config = self.config
        if config.keyring is None:
            log.warning("no key ring (--keyring): this peer runs alone; other nodes are not served")
            return None
        if self.node is None or world.nodes[self.node].address is None:
            raise MountError(f"node {self.node} has no _node._dreki SRV record: it cannot listen")
        local = self.stores["local"]
        try:
            return Peer(
                world,
                self.node,
                config.keyring,
                self.stores,
                incarnation=local.meta_int("incarnation"),
                save_incarnation=lambda n: local.set_meta_int("incarnation", n),
                on_members_changed=self._members_changed,
                tombstone_grace=config.tombstone_grace,
                swim=config.swim,
                version=__version__,
            )
        except KeyRingError as e:
            raise MountError(str(e)) from None

    def _members_changed(self, node: str, stores: tuple[str, ...] | None) -> None:
        """A member changed: when its stores did, its directory must show them. (Called for
        every change of state, from the membership's handlers: only compare, cheaply.)"""
        if self.ops is None or self.peer is None or node == self.node:
            return
        if stores is None:
            return
        shown = tuple(sorted(set(stores) - {"local"}))  # local is always shown
        if self._stores_seen.get(node, ()) != shown:
            self._stores_seen[node] = shown
            if node in self.watcher.world.nodes:
                self._rebuild_namespace(())

    def _pick_node(self, world: World) -> str | None:
        if self.config.node is None:
            first = world.first_node()
            return first.name if first else None
        node = world.node_by_label(self.config.node)
        if node is None:
            names = ", ".join(sorted(world.nodes)[:10]) or "none"
            raise MountError(
                f"node {self.config.node!r} is not in world {world.domain} (nodes: {names})"
            )
        return node.name

    def _status_files(self) -> StatusFiles:
        files = StatusFiles()
        memo: dict[str, tuple[Snapshot, bytes]] = {}

        def per_world(name: str, render: Callable[[World], str]) -> Callable[[], bytes]:
            # Rendered once per world, not once per getattr.
            def content() -> bytes:
                snap = self.watcher.snapshot
                hit = memo.get(name)
                if hit is None or hit[0] is not snap:  # held, so never a reused id
                    hit = (snap, render(snap.world).encode())
                    memo[name] = hit
                return hit[1]

            return content

        def errors() -> str:
            text = render_errors(self.watcher.world)
            if self.watcher.source_error:
                text += f"{SOURCE}: {self.watcher.source_error} (serving the last good world)\n"
            if self.ops is not None and self.ops.ns.truncated:
                text += f"{TOO_LARGE}: more than {MAX_PATHS} paths; the rest is not served\n"
            return text

        files.add("pid", pid_text)
        files.add("control", lambda: f"{self.control_path}\n")
        files.add("world", per_world("world", render_tree))
        files.add("world.json", per_world("world.json", render_json))
        files.add("world-errors", errors, volatile=True)
        files.add("requests", lambda: counters_text(self.ops.counts), volatile=True)
        files.add("loop", self.stalls.text, volatile=True)
        files.add("stores", lambda: stores_text(self.stores.values()), volatile=True)
        alone = "this peer runs alone (no key ring)\n"
        peer = self.peer
        files.add("members", lambda: peer.members_text() if peer else alone, volatile=True)
        files.add("members.json", lambda: peer.members_json() if peer else "[]\n", volatile=True)
        files.add("cluster", lambda: peer.counters_text() if peer else alone, volatile=True)
        files.add("replication", lambda: peer.replication_text() if peer else alone, volatile=True)
        return files

    def _world_changed(self, old: Snapshot | None, new: Snapshot) -> None:
        if self.ops is None:
            return  # the first world, before the mount

        self._rebuild_namespace(("world", "world.json"), new)
        if self.peer is not None:
            self.peer.update_world(new.world)
        if self.node and self.node not in new.world.nodes:
            log.error("this node, %s, is no longer in the world", self.node)

    def _rebuild_namespace(self, changed: tuple[str, ...], snap: Snapshot | None = None) -> None:
        snap = snap or self.watcher.snapshot
        ns = Namespace(snap, self.ops.status.names(), self._node_stores, self.started_ns)
        self.ops.set_namespace(ns, changed_status=changed)

    async def _serve(self, nursery) -> None:
        await pyfuse3.main(min_tasks=requestloop.MIN_TASKS)
        # main() returns when the kernel ends the session: somebody unmounted us.
        self.external_unmount = True
        await self._leave()
        nursery.cancel_scope.cancel()

    async def _run_peer(self) -> None:
        """The cluster side; should it fail, the mount goes on serving what is local."""
        try:
            await self.peer.run()
        except Exception:
            log.exception("the cluster side of this peer failed; serving local stores only")
            self.peer_error = True

    async def _leave(self) -> None:
        """Send what other nodes' files still buffer, and tell the other peers this one
        leaves (both bounded), before everything stops."""
        if self.peer is not None:
            if self.ops is not None and self.ops.remote is not None:
                await self.ops.remote.commit_all()
            await self.peer.leave()

    async def _on_signals(self, nursery) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("%s: unmounting", signal.Signals(signum).name)
                await self._leave()
                nursery.cancel_scope.cancel()
                return

    async def _log_level_signals(self) -> None:
        """SIGUSR1: log everything (DEBUG) from now on; SIGUSR2: back to the configured level."""
        with trio.open_signal_receiver(signal.SIGUSR1, signal.SIGUSR2) as signals:
            async for signum in signals:
                level = "DEBUG" if signum == signal.SIGUSR1 else self.config.log_level.upper()
                logging.getLogger().setLevel(level)
                log.warning("log level now %s (%s)", level, signal.Signals(signum).name)

    async def _announce_ready(self, ready: Ready) -> None:
        pid_file = self.config.mountpoint / ".dreki" / "pid"

        def check() -> str:
            return pid_file.read_text().strip()

        # Through the kernel and back: the mount answers requests.
        with trio.fail_after(30):
            seen = await trio.to_thread.run_sync(check)
        if seen != str(os.getpid()):
            raise MountError(f"{pid_file} says {seen!r}, expected {os.getpid()}")
        ready()


# -- starting it ---------------------------------------------------------------------------------


def raise_descriptor_limit() -> None:
    """Raise the soft limit of open descriptors to the hard one: the transport holds up to
    ``max_handshakes + max_conns`` (5,120) accepted connections, over the usual soft limit of
    1,024 (cluster/limits.py; cluster/peer.py fits them to what is left)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, hard, e)


def run_daemon(config: MountConfig, ready: Ready) -> int:
    """Serve until unmounted; 0, or 1 when changes could not be saved at exit (then said in
    the log and in an exit report that ``drekifs umount`` prints)."""
    raise_descriptor_limit()
    daemon = Daemon(config)
    trio.run(daemon.run, ready)
    if not daemon.unsaved:
        return 0
    report = "\n".join(daemon.unsaved)
    log.error("exiting with changes not saved:\n%s", report)
    service.write_exit_report(report)
    return 1


def mount(config: MountConfig) -> int:
    """``drekifs mount``: returns the exit status for the calling process."""
    config.mountpoint = Path(os.path.abspath(config.mountpoint))
    try:
        prepare_mountpoint(config.mountpoint)
        datadir.make(config.data_dir)
    except MountError as e:
        print(f"drekifs: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"drekifs: data directory {config.data_dir}: {e}", file=sys.stderr)
        return 1

    def serve(ready: Ready) -> int:
        return run_daemon(config, ready)

    if config.foreground:
        return service.run_attached(
            config.data_dir, config.log_level, config.log_file, config.mountpoint, serve
        )
    log_file = config.log_file or config.data_dir / "drekifs.log"
    return service.run_in_background(config.data_dir, config.log_level, log_file, serve)
