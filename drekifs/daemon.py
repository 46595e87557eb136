"""The daemon's life: load the world, mount, serve, follow the world, unmount.

``drekifs mount`` forks (before any trio or FUSE state exists) and returns only when the child
has proved the mount serves requests, by reading ``.dreki/pid`` through the kernel. The child
then runs until unmounted: by ``drekifs umount`` / ``umount`` (the session ends and it exits) or
by SIGTERM, SIGINT or SIGHUP (it unmounts itself). ``drekifs umount`` waits for it to exit.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import control, datadir
from .fs.inodes import StoreSlots
from .fs.namespace import MAX_PATHS
from .fs.requestloop import POLL_US
from .stores.lmdb import LmdbStore
from .stores.record import TOMBSTONE_GRACE
from .stores.version import HybridClock
from .world.model import SOURCE, TOO_LARGE, World
from .world.resolve import SourceError
from .world.snapshot import Snapshot
from .world.watch import SourceConfig

log = logging.getLogger("drekifs")

FS_TYPE = "fuse.drekifs"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class MountError(Exception):
    """Mounting cannot go on; the message says why, for the user."""


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
    poll_us: int = POLL_US  # fs/requestloop.py: how long to poll /dev/fuse before sleeping


# -- mount table ---------------------------------------------------------------------------------


def _unescape_mountinfo(text: str) -> str:
    return (
        text.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )


def drekifs_mounts() -> dict[str, str]:
    """Mount point -> source (the world's domain) of every drekifs mount of this machine."""
    out: dict[str, str] = {}
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == FS_TYPE:
                    out[_unescape_mountinfo(parts[1])] = _unescape_mountinfo(parts[0])
    except OSError:
        pass
    return out


def is_stale(mountpoint: Path) -> bool:
    """A mount whose daemon is gone. stat() alone can be answered from the kernel's cache;
    listing the directory always asks the daemon."""
    try:
        os.stat(mountpoint)
        if str(mountpoint) in drekifs_mounts():
            os.listdir(mountpoint)
    except OSError as e:
        # ENOTCONN once the device is closed; ECONNABORTED on some kernels after an abort.
        return e.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def lazy_unmount(mountpoint: Path) -> None:
    """Detach a mount whose daemon is gone ("Transport endpoint is not connected")."""
    for cmd in (["fusermount3", "-u", "-z", str(mountpoint)], ["umount", "-l", str(mountpoint)]):
        try:
            if subprocess.run(cmd, capture_output=True).returncode == 0:
                return
        except FileNotFoundError:
            continue


def daemon_pid(mountpoint: Path) -> int:
    return int((mountpoint / ".dreki" / "pid").read_text().strip())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie nobody reaps (no init in a container) has exited all the same
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def unmount(mountpoint: Path, timeout: float = 60.0) -> str:
    """Unmount cleanly and wait for the daemon to exit. Returns what was done."""
    mountpoint = Path(os.path.abspath(mountpoint))
    if is_stale(mountpoint):
        lazy_unmount(mountpoint)
        return f"{mountpoint}: the daemon was gone; stale mount removed"
    if str(mountpoint) not in drekifs_mounts():
        raise MountError(f"{mountpoint} is not a drekifs mount")
    try:
        pid = daemon_pid(mountpoint)
    except (OSError, ValueError) as e:
        raise MountError(f"{mountpoint}: cannot read the daemon's pid: {e}") from None
    result = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True)
    if result.returncode != 0:
        if "busy" in result.stderr.lower():
            raise MountError(f"{mountpoint} is busy: a process still uses it (see fuser -m)")
        result = subprocess.run(["umount", str(mountpoint)], capture_output=True, text=True)
        if result.returncode != 0:
            raise MountError(f"cannot unmount {mountpoint}: {result.stderr.strip()}")
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            raise MountError(
                f"{mountpoint} unmounted, but daemon {pid} still runs after {timeout}s"
            )
        time.sleep(0.02)
    report = read_exit_report(pid)
    if report:
        raise MountError(
            f"{mountpoint} unmounted, but daemon {pid} could not save everything:\n{report}"
        )
    return f"{mountpoint} unmounted; daemon {pid} exited"


# -- the daemon ----------------------------------------------------------------------------------


def runtime_dirs() -> list[Path]:
    """Where this uid's daemons put what cannot go in a data directory (a control socket whose
    path would be too long, an exit report when the disk is full): ``$TMPDIR/drekifs-UID``,
    then ``/tmp/drekifs-UID`` (without TMPDIR the same one)."""
    name = f"drekifs-{os.getuid()}"
    return list(
        dict.fromkeys([Path(os.environ.get("TMPDIR") or "/tmp") / name, Path("/tmp") / name])
    )


def control_socket_path(data_dir: Path) -> Path:
    """``<data-dir>/control.sock``, or, when that is too long for a socket, ``<pid>.sock`` in
    the first runtime directory short enough: a directory this uid alone controls, checked
    (datadir.private_dir). Raises DataDirError."""
    path = data_dir / "control.sock"
    if len(os.fsencode(path)) < 100:
        return path
    dirs = runtime_dirs()
    short = next((d for d in dirs if len(os.fsencode(d)) <= 80), dirs[-1])  # /tmp's is short
    return datadir.private_dir(short) / f"{os.getpid()}.sock"


class Daemon:
    def __init__(self, config: MountConfig) -> None:
        self.config = config
        self.started_ns = time.time_ns()
        self.ops = None
        self.node = None
        self.stores: dict[str, LmdbStore] = {}
        self.watcher = None
        self.external_unmount = False
        self.unsaved: list[str] = []  # what could not be saved at exit: the exit report
        try:
            self.control_path = control_socket_path(config.data_dir)
        except datadir.DataDirError as e:
            raise MountError(f"control socket: {e}") from None
        self.peer = None  # cluster.peer.Peer, with a key ring
        self.peer_error = False
        self._stores_seen: dict[str, tuple[str, ...]] = {}  # other nodes' stores, as announced

    async def run(self, ready: Callable[[], None]) -> None:
        import pyfuse3
        import trio

        from . import logs
        from .fs import requestloop
        from .fs.namespace import Namespace
        from .fs.operations import Operations
        from .world.watch import WorldWatcher

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
            from .fs.remote import RemoteStores

            remote = RemoteStores(self.node, slots, self.peer.client_of, config.max_local_value)
            self.peer.on_remote_change = remote.changed
        self.ops = ops = Operations(
            ns,
            status,
            config.data_dir,
            config.cache_timeout,
            stores,
            self.node,
            slots,
            remote,
        )

        options = set(pyfuse3.default_options)
        options |= {f"fsname={snap.world.domain}", "subtype=drekifs"}
        if os.getuid() == 0:
            options.add("allow_other")  # others may read, as permission bits say
        options |= set(config.fuse_options)
        requestloop.install(config.poll_us)  # before init: pyfuse3 3.3 and 3.4 lock there
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

    def _make_peer(self, world: World):
        config = self.config
        if config.keyring is None:
            log.warning("no key ring (--keyring): this peer runs alone; other nodes are not served")
            return None
        if self.node is None or world.nodes[self.node].address is None:
            raise MountError(f"node {self.node} has no _node._dreki SRV record: it cannot listen")
        from . import __version__
        from .cluster.keyring import KeyRingError
        from .cluster.peer import Peer

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

    def _status_files(self):
        from .fs import status
        from .world.render import render_errors, render_json, render_tree

        files = status.StatusFiles()
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

        files.add("pid", status.pid_text)
        files.add("control", lambda: f"{self.control_path}\n")
        files.add("world", per_world("world", render_tree))
        files.add("world.json", per_world("world.json", render_json))
        files.add("world-errors", errors, volatile=True)
        files.add("requests", lambda: status.counters_text(self.ops.counts), volatile=True)
        files.add("stores", lambda: status.stores_text(self.stores.values()), volatile=True)
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
        from .fs.namespace import Namespace

        snap = snap or self.watcher.snapshot
        ns = Namespace(snap, self.ops.status.names(), self._node_stores, self.started_ns)
        self.ops.set_namespace(ns, changed_status=changed)

    async def _serve(self, nursery) -> None:
        import pyfuse3

        from .fs import requestloop

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
        import trio

        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("%s: unmounting", signal.Signals(signum).name)
                await self._leave()
                nursery.cancel_scope.cancel()
                return

    async def _log_level_signals(self) -> None:
        """SIGUSR1: log everything (DEBUG) from now on; SIGUSR2: back to the configured level."""
        import trio

        with trio.open_signal_receiver(signal.SIGUSR1, signal.SIGUSR2) as signals:
            async for signum in signals:
                level = "DEBUG" if signum == signal.SIGUSR1 else self.config.log_level.upper()
                logging.getLogger().setLevel(level)
                log.warning("log level now %s (%s)", level, signal.Signals(signum).name)

    async def _announce_ready(self, ready: Callable[[], None]) -> None:
        import trio

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


def setup_logging(level: str, log_file: Path | None) -> None:
    handler: logging.Handler
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def prepare_mountpoint(mountpoint: Path) -> None:
    if is_stale(mountpoint):
        log.warning("%s: stale mount of a dead daemon; removing it", mountpoint)
        lazy_unmount(mountpoint)
    if str(mountpoint) in drekifs_mounts():
        try:
            pid = daemon_pid(mountpoint)
        except (OSError, ValueError):
            pid = "?"
        raise MountError(f"{mountpoint} is already a drekifs mount (daemon {pid})")
    try:
        mountpoint.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MountError(f"cannot create mount point {mountpoint}: {e}") from None
    if not mountpoint.is_dir():
        raise MountError(f"mount point {mountpoint} is not a directory")


def claim_data_dir(data_dir: Path) -> int:
    """Before any store or log file is opened: this process's files private from now on, and the
    data directory locked for its life. Returns the lock's descriptor (kept open until exit)."""
    os.umask(datadir.UMASK)
    try:
        return datadir.lock(data_dir)
    except datadir.DataDirError as e:
        raise MountError(str(e)) from None


def tighten_data_dir(data_dir: Path) -> None:
    """Modes made looser while the daemon was down (or by an older version): tightened, logged."""
    changed = datadir.tighten(data_dir)
    if changed:
        shown = ", ".join(changed[:10]) + (f" and {len(changed) - 10} more" if changed[10:] else "")
        log.warning(
            "data directory %s: tightened to 0700/0600 what others could open: %s",
            data_dir,
            shown,
        )


def exit_report_paths(pid: int) -> list[Path]:
    """Where a daemon that could not save everything says so, for ``drekifs umount``."""
    return [d / f"exit-{pid}" for d in runtime_dirs()]


def read_exit_report(pid: int) -> str | None:
    for path in exit_report_paths(pid):
        with contextlib.suppress(OSError):
            text = path.read_text()
            path.unlink()
            return text.strip()
    return None


def run_daemon(config: MountConfig, ready: Callable[[], None]) -> int:
    """Serve until unmounted; 0, or 1 when changes could not be saved at exit (then said in
    the log and in an exit report that ``drekifs umount`` prints)."""
    import trio

    daemon = Daemon(config)
    trio.run(daemon.run, ready)
    if not daemon.unsaved:
        return 0
    report = "\n".join(daemon.unsaved)
    log.error("exiting with changes not saved:\n%s", report)
    for path in exit_report_paths(os.getpid()):
        try:
            datadir.private_dir(path.parent)
            path.write_text(report + "\n")
            break
        except (OSError, datadir.DataDirError) as e:
            log.error("cannot write the exit report %s: %s", path, e)
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
    if config.foreground:
        try:
            claim_data_dir(config.data_dir)
        except MountError as e:
            print(f"drekifs: {e}", file=sys.stderr)
            return 1
        setup_logging(config.log_level, config.log_file)
        try:
            tighten_data_dir(config.data_dir)
            return run_daemon(config, lambda: _notify_ready(config))
        except MountError as e:
            log.error("%s", e)
            return 1
        except KeyboardInterrupt:
            pass
        return 0
    return _mount_in_background(config)


def _notify_ready(config: MountConfig) -> None:
    log.info("serving %s", config.mountpoint)
    sock = os.environ.get("NOTIFY_SOCKET")
    if sock:  # systemd Type=notify
        import socket

        addr = "\0" + sock[1:] if sock.startswith("@") else sock
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.send(b"READY=1\nSTATUS=serving\n")


def _mount_in_background(config: MountConfig) -> int:
    """Fork; the parent waits for the child's word on a pipe and returns only once served."""
    log_file = config.log_file or config.data_dir / "drekifs.log"
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_fd)
        status = 1
        try:
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1):
                os.dup2(devnull, fd)
            try:  # the daemon that serves holds the lock, and a refused one writes no log line
                claim_data_dir(config.data_dir)
            except MountError as e:
                os.write(write_fd, f"error {e}\n".encode())
                os._exit(1)
            setup_logging(config.log_level, log_file)
            tighten_data_dir(config.data_dir)

            def ready() -> None:
                try:
                    os.write(write_fd, b"ready\n")
                except OSError as e:  # the mount command went away (killed): serve all the same
                    log.warning("the mount command did not hear it is served: %s", e)
                os.dup2(devnull, 2)  # from now on, only the log file

            status = run_daemon(config, ready)
        except MountError as e:
            log.error("%s", e)
            os.write(write_fd, f"error {e}\n".encode())
        except BaseException as e:  # everything reaches the waiting parent
            log.exception("daemon failed")
            with contextlib.suppress(OSError):
                os.write(write_fd, f"error {type(e).__name__}: {e}\n".encode())
        finally:
            os._exit(status)
    os.close(write_fd)
    message = b""
    with os.fdopen(read_fd, "rb") as r:
        message = r.readline()
    if message.startswith(b"ready"):
        return 0
    if message.startswith(b"error "):
        print(f"drekifs: {message[6:].decode().strip()}", file=sys.stderr)
    else:
        print(f"drekifs: the daemon exited before serving; see {log_file}", file=sys.stderr)
    os.waitpid(pid, 0)
    return 1
