#!/usr/bin/env python3
"""floorfs: the smallest proper pyfuse3 filesystem, serving a fixed tree from a dict.

It is the floor any pyfuse3 filesystem can reach on a walk or a read of a read-only tree: lookup,
getattr, opendir, readdir (through ``readdir_reply``, so pyfuse3's READDIRPLUS hands the
attributes to the kernel), releasedir, open (``keep_cache``), read, release, statfs, and long
entry/attr timeouts (3600 s, drekifs's default). Everything else is pyfuse3's default answer
(mostly ENOSYS, which the kernel remembers for xattrs and flush: a close then costs no FLUSH).

Every FUSE request is counted per operation, the ones pyfuse3 answers by default included. The
counts go to ``--counts FILE`` as JSON ``{"seq": N, "counts": {op: n}}`` (written atomically) on
SIGUSR1 and on exit, so reading them costs no FUSE request.

    python bench/floorfs.py TREE MOUNTPOINT [--counts FILE] [--timeout S] [--writable]

``--writable`` serves the tree read-write instead, as the floor of a ``cp -a`` into a pyfuse3
filesystem held to drekifs's rules: no writeback cache, xattrs implemented (``getxattr`` answers
ENODATA, so the kernel keeps asking for ``security.capability`` before each write; a
``system.*`` xattr is refused with EOPNOTSUPP, as drekifs refuses ``cp -a``'s ACL), and the same
``default_permissions``. It adds lookup of new names, create, mkdir, write, setattr and the
xattr calls, each a dict update: no filesystem answering the same requests can do less.

TREE is either a JSON file ``{"dirs": ["a", "a/b", ...], "files": ["a/f", ...]}`` (paths relative
to the root, "/"-separated; parents are created as needed; the files are empty), or a directory:
its directories and regular files, with their bytes, permissions, owners and times, are copied
into memory at start (other kinds of files are skipped). The process prints ``ready PID`` on
stdout once the mount answers requests, and serves until unmounted (``fusermount3 -u``) or sent
SIGTERM/SIGINT (it then unmounts itself).
"""

from __future__ import annotations

import argparse
import errno
import functools
import inspect
import json
import os
import signal
import stat
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import trio
from pyfuse3 import FUSEError

ROOT_INODE = pyfuse3.ROOT_INODE
DIR_MODE = stat.S_IFDIR | 0o555
FILE_MODE = stat.S_IFREG | 0o444
STARTED_NS = time.time_ns()  # every inode's atime, mtime and ctime


@dataclass(slots=True)
class Node:
    """One inode of the tree: a directory (with ordered children) or a file (with its bytes).

    ``source`` is the stat of the copied file or directory (None for a JSON tree: then the
    process's uid and gid and its start time are used).
    """

    ino: int
    mode: int
    children: dict[bytes, int] = field(default_factory=dict)
    order: list[tuple[bytes, int]] = field(default_factory=list)
    data: bytes = b""
    source: os.stat_result | None = None


class FloorFS(pyfuse3.Operations):
    """A read-only tree held in a dict, with every attribute computed once."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        dirs: list[str],
        files: list[str],
        timeout: float = 3600.0,
        source: Path | None = None,
    ) -> None:
        super().__init__()
        self.timeout = timeout
        self.counts: Counter[str] = Counter()
        self.nodes: dict[int, Node] = {ROOT_INODE: Node(ROOT_INODE, DIR_MODE)}
        self._by_path: dict[str, int] = {"": ROOT_INODE}
        for path in sorted(dirs):
            self._add(path, DIR_MODE)
        for path in sorted(files):
            self._add(path, FILE_MODE)
        if source is not None:
            self._copy(source)
        self.attrs = {ino: self._make_attrs(n, timeout) for ino, n in self.nodes.items()}

    def _add(
        self, path: str, mode: int, data: bytes = b"", source: os.stat_result | None = None
    ) -> int:
        path = path.strip("/")
        if path in self._by_path:
            return self._by_path[path]
        parent_path, _, name = path.rpartition("/")
        parent = self.nodes[self._add(parent_path, DIR_MODE)]
        ino = len(self.nodes) + ROOT_INODE
        self.nodes[ino] = Node(ino, mode, data=data, source=source)
        self._by_path[path] = ino
        parent.children[os.fsencode(name)] = ino
        parent.order.append((os.fsencode(name), ino))
        return ino

    def _copy(self, root: Path) -> None:
        """Directories and regular files below ``root``, parents first, in name order."""
        root_node = self.nodes[ROOT_INODE]
        root_node.source = root.stat()
        root_node.mode = root_node.source.st_mode
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            base = Path(dirpath).relative_to(root)
            for name in dirnames:
                st = (Path(dirpath) / name).lstat()
                if stat.S_ISDIR(st.st_mode):
                    self._add(str(base / name), st.st_mode, source=st)
            for name in sorted(filenames):
                path = Path(dirpath) / name
                st = path.lstat()
                if stat.S_ISREG(st.st_mode):
                    self._add(str(base / name), st.st_mode, path.read_bytes(), st)

    def _make_attrs(self, node: Node, timeout: float) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.ino
        attr.st_mode = node.mode
        subdirs = sum(1 for _, i in node.order if stat.S_ISDIR(self.nodes[i].mode))
        attr.st_nlink = 2 + subdirs if stat.S_ISDIR(node.mode) else 1
        attr.st_size = len(node.data)
        attr.st_blksize = 4096
        attr.st_blocks = (len(node.data) + 511) // 512
        st = node.source
        if st is None:
            attr.st_uid = os.getuid()
            attr.st_gid = os.getgid()
            attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = STARTED_NS
        else:
            attr.st_uid, attr.st_gid = st.st_uid, st.st_gid
            attr.st_atime_ns, attr.st_mtime_ns = st.st_atime_ns, st.st_mtime_ns
            attr.st_ctime_ns = st.st_ctime_ns
        attr.entry_timeout = attr.attr_timeout = timeout
        return attr

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        node = self.nodes.get(parent_inode)
        ino = node.children.get(name) if node is not None else None
        if ino is None:
            raise FUSEError(errno.ENOENT)
        return self.attrs[ino]

    async def getattr(self, inode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        try:
            return self.attrs[inode]
        except KeyError:
            raise FUSEError(errno.ENOENT) from None

    async def opendir(self, inode: int, ctx: Any) -> int:
        node = self.nodes.get(inode)
        if node is None:
            raise FUSEError(errno.ENOENT)
        if not stat.S_ISDIR(node.mode):
            raise FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        order = self.nodes[fh].order
        attrs = self.attrs
        for i in range(start_id, len(order)):
            name, ino = order[i]
            if not pyfuse3.readdir_reply(token, name, attrs[ino], i + 1):
                break

    async def releasedir(self, fh: int) -> None:
        pass

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        node = self.nodes.get(inode)
        if node is None:
            raise FUSEError(errno.ENOENT)
        if stat.S_ISDIR(node.mode):
            raise FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)  # the handle is the inode

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self.nodes[fh].data[off : off + size]

    async def release(self, fh: int) -> None:
        pass

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        # find (gnulib fts) asks fstatfs for most directories it reads and caches only a
        # success: answering ENOSYS would cost a STATFS per directory, which drekifs never pays.
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = 4096
        out.f_namemax = 255
        out.f_files = len(self.nodes)
        out.f_blocks = sum(len(n.data) for n in self.nodes.values()) // 4096 + 1
        return out


class WritableFloorFS(FloorFS):
    """The same tree, read-write: what ``cp -a`` needs, each request a dict update."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handles: dict[int, Node] = {}
        self.next_fh = 1

    def _resized(self, node: Node) -> None:
        attr = self.attrs[node.ino]
        attr.st_size = len(node.data)
        attr.st_blocks = (len(node.data) + 511) // 512

    @staticmethod
    def _bytes_of(node: Node) -> bytearray:
        if not isinstance(node.data, bytearray):
            node.data = bytearray(node.data)  # type: ignore[assignment]
        return node.data  # type: ignore[return-value]

    def _new(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        parent = self.nodes.get(parent_inode)
        if parent is None or not stat.S_ISDIR(parent.mode):
            raise FUSEError(errno.ENOTDIR)
        if name in parent.children:
            raise FUSEError(errno.EEXIST)
        ino = len(self.nodes) + ROOT_INODE
        node = self.nodes[ino] = Node(ino, mode)
        parent.children[name] = ino
        parent.order.append((name, ino))
        attr = self.attrs[ino] = self._make_attrs(node, self.timeout)
        attr.st_uid, attr.st_gid = ctx.uid, ctx.gid
        now = time.time_ns()
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = now
        parent_attr = self.attrs[parent_inode]
        parent_attr.st_mtime_ns = parent_attr.st_ctime_ns = now
        if stat.S_ISDIR(mode):
            parent_attr.st_nlink += 1
        return attr

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        return self._new(parent_inode, name, stat.S_IFDIR | stat.S_IMODE(mode), ctx)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        attr = self._new(parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode), ctx)
        fh, self.next_fh = self.next_fh, self.next_fh + 1
        self.handles[fh] = self.nodes[attr.st_ino]
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), attr

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        node = self.nodes.get(inode)
        if node is None:
            raise FUSEError(errno.ENOENT)
        fh, self.next_fh = self.next_fh, self.next_fh + 1
        self.handles[fh] = node
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return bytes(self.handles[fh].data[off : off + size])

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        node = self.handles[fh]
        data = self._bytes_of(node)
        if off > len(data):
            data.extend(bytes(off - len(data)))
        data[off : off + len(buf)] = buf
        self._resized(node)
        attr = self.attrs[node.ino]
        attr.st_mtime_ns = attr.st_ctime_ns = time.time_ns()
        return len(buf)

    async def setattr(
        self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        node, out = self.nodes[inode], self.attrs[inode]
        if fields.update_size:
            data = self._bytes_of(node)
            del data[attr.st_size :]
            data.extend(bytes(attr.st_size - len(data)))
            self._resized(node)
        if fields.update_mode:
            out.st_mode = stat.S_IFMT(out.st_mode) | stat.S_IMODE(attr.st_mode)
            node.mode = out.st_mode
        if fields.update_uid:
            out.st_uid = attr.st_uid
        if fields.update_gid:
            out.st_gid = attr.st_gid
        if fields.update_mtime:
            out.st_mtime_ns = attr.st_mtime_ns
        if fields.update_atime:
            out.st_atime_ns = attr.st_atime_ns
        out.st_ctime_ns = time.time_ns()
        return out

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        raise FUSEError(errno.ENODATA)

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        raise FUSEError(errno.EOPNOTSUPP)  # no user.* either: cp -a sets none here

    async def release(self, fh: int) -> None:
        self.handles.pop(fh, None)


# Every request the kernel can send, implemented above or answered by pyfuse3's defaults.
REQUESTS = tuple(
    name
    for name, fn in inspect.getmembers(pyfuse3.Operations, inspect.iscoroutinefunction)
    if not name.startswith("_")
)


def _counted(op: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(fn)
    async def handler(self: FloorFS, *args: Any) -> Any:
        self.counts[op] += 1
        return await fn(self, *args)

    return handler


for _op in REQUESTS:
    setattr(FloorFS, _op, _counted(_op, getattr(FloorFS, _op)))
    if _op in vars(WritableFloorFS):
        setattr(WritableFloorFS, _op, _counted(_op, getattr(WritableFloorFS, _op)))


class CountsFile:
    """The counters as JSON in a file, replaced atomically; ``seq`` grows with every dump."""

    def __init__(self, path: Path | None, counts: Counter[str]) -> None:
        self.path = path
        self.counts = counts
        self.seq = 0

    def dump(self) -> None:
        if self.path is None:
            return
        self.seq += 1
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"seq": self.seq, "counts": dict(sorted(self.counts.items()))}))
        os.replace(tmp, self.path)


async def serve(fs: FloorFS, mountpoint: Path, counts_file: CountsFile) -> None:
    """Serve until unmounted or signalled; dump the counters on SIGUSR1."""
    unmount = True

    async def main_loop(cancel: trio.CancelScope) -> None:
        nonlocal unmount
        await pyfuse3.main()
        unmount = False  # the kernel ended the session: somebody unmounted us
        cancel.cancel()

    async def announce_ready() -> None:
        with trio.fail_after(30):  # through the kernel and back: the mount answers
            await trio.to_thread.run_sync(os.stat, mountpoint)
        print(f"ready {os.getpid()}", flush=True)

    async def on_signals(cancel: trio.CancelScope) -> None:
        signals = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        with trio.open_signal_receiver(*signals) as received:
            async for signum in received:
                if signum == signal.SIGUSR1:
                    counts_file.dump()
                else:
                    cancel.cancel()
                    return

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(main_loop, nursery.cancel_scope)
            nursery.start_soon(on_signals, nursery.cancel_scope)
            nursery.start_soon(announce_ready)
    finally:
        pyfuse3.close(unmount=unmount)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "tree",
        type=Path,
        help='JSON {"dirs": [...], "files": [...]}, or a directory to serve a copy of',
    )
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument(
        "--counts",
        type=Path,
        metavar="FILE",
        help="write the request counters here on SIGUSR1 and on exit",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        metavar="S",
        help="entry and attribute timeout (default 3600, as drekifs)",
    )
    parser.add_argument(
        "--writable",
        action="store_true",
        help="serve the tree read-write (the floor of a cp -a into it)",
    )
    parser.add_argument(
        "--drekifs-loop",
        action="store_true",
        help="wait for requests as drekifs does (drekifs/fs/requestloop.py: a reader seat "
        "and a 100 us poll) instead of pyfuse3's own loop; needs drekifs importable",
    )
    args = parser.parse_args(argv)
    if args.drekifs_loop:
        from drekifs.fs import requestloop  # the same code and default as `drekifs mount`

        if requestloop.install(requestloop.POLL_US) is None:
            raise SystemExit("floorfs: this pyfuse3 does not take drekifs's request loop")

    kind = WritableFloorFS if args.writable else FloorFS
    if args.tree.is_dir():
        fs = kind([], [], args.timeout, source=args.tree)
    else:
        tree = json.loads(args.tree.read_text())
        fs = kind(tree.get("dirs", []), tree.get("files", []), args.timeout)
    mountpoint = args.mountpoint.resolve()
    counts_file = CountsFile(args.counts, fs.counts)

    options = set(pyfuse3.default_options) | {"fsname=floorfs", "subtype=floorfs"}
    if os.getuid() == 0:
        options.add("allow_other")  # as drekifs does when run as root
    pyfuse3.init(fs, str(mountpoint), options)
    try:
        trio.run(serve, fs, mountpoint, counts_file)
    finally:
        counts_file.dump()
        summary = " ".join(f"{k}={v}" for k, v in sorted(fs.counts.items()))
        print(f"floorfs: {len(fs.nodes)} inodes; requests: {summary}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
