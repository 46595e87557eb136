"""A node's local stores, served to the other peers over RPC (the owner's side and the client).

Every entry is addressed by (store, key parts) or, for inode lookups, by (store, eid): the
owner's entry ids, so a remote entry has the same eid on every peer. Records travel as
``Record.pack()`` bytes, errors as ``RemoteError(errno, message)``, so a remote request fails
with the same errno as the same request made on the owner's own mount.

Methods (args are msgpack maps; ``s`` store name, ``k`` key parts, ``e`` eid)::

    store.stat     {s, k}                   -> rec            (ENOENT when absent)
    store.lookup   {s, k, n}                -> [rec, bytes | None]   (the value if <= n bytes)
    store.locate   {s, e}                   -> [k, rec]
    store.list     {s, k, after, n}         -> [[name, rec], ...], more    (one page)
    store.read     {s, e, o, n}             -> bytes
    store.open     {s, e, n}                -> [k, rec, first n bytes]   (stat and read at once)
    store.create   {s, k, kind, perm, uid, gid, target}  -> rec
    store.stage    {s, id, o, data}         -> None   (a part of a large value, kept 60 s)
    store.put      {s, k, e, v | stage, size, f, sync}   -> rec | None   (one new version;
                   with ``sync`` true, answered once it is on the owner's disk, as after sync)
    store.update   {s, k, f}                -> rec    (perm, uid, gid, mtime_ns, atime_ns...)
    store.remove   {s, k, dir}              -> None
    store.rename   {s, src, dst, noreplace} -> None
    store.setxattr {s, k, name, value}      -> rec
    store.rmxattr  {s, k, name}             -> rec
    store.sync     {s}                      -> None   (fsync: on the owner's disk)

Every call may carry ``from``, the caller's node name: the owner then counts it as subscribed to
changes of that store for ``SUBSCRIPTION`` seconds, and calls it back with

    store.changed  {o: owner node, s, keys: [k, ...]}  -> None

for every change made there meanwhile, by anyone (batched every ``NOTIFY_EVERY`` seconds), so
the subscriber's kernel drops what it cached at once rather than after its 1 s timeout.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from ..stores.base import Key, Store
from ..stores.keys import split_key
from ..stores.record import DIR, FILE, NO_XATTRS, SYMLINK, Record, StoreError
from .net import Network, PeerAddr, PeerUnreachable, RemoteError

log = logging.getLogger(__name__)

PAGE = 1000  # entries per listing page
CHUNK = 1 << 20  # bytes per stage call: well under the transport's frame limit
STAGE_TTL = 60.0
SUBSCRIPTION = 30.0
NOTIFY_EVERY = 0.05
MAX_SUBSCRIBERS = 10_000
SYNC_TIMEOUT = 15.0
NOTIFY_MAX_KEYS = 1000  # more changes than that in one batch: the subscriber drops everything
METHODS = [
    "open",
    "lookup",
    "stat",
    "locate",
    "list",
    "read",
    "create",
    "stage",
    "put",
    "update",
    "remove",
    "rename",
    "setxattr",
    "rmxattr",
    "sync",
]
# Answered from memory and LMDB without waiting on anything (not sync, not a staged upload).
INSTANT = frozenset({"open", "lookup", "stat", "locate", "list", "read"})
SETTABLE = frozenset({"perm", "uid", "gid", "mtime_ns", "atime_ns", "ctime_ns"})
ORIGIN = "remote"


def _key(v: Any) -> Key:
    if not isinstance(v, list | tuple) or not all(isinstance(p, bytes) for p in v):
        raise RemoteError(errno.EINVAL, "a key is a list of byte strings")
    for p in v:
        if not p or p in (b".", b"..") or b"/" in p or b"\0" in p or len(p) > 255:
            raise RemoteError(errno.EINVAL, f"bad key part {p[:64]!r}")
    return tuple(v)


def _int(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise RemoteError(errno.EINVAL, f"{what} must be a non-negative integer")
    return v


@dataclass
class _Stage:
    data: bytearray = field(default_factory=bytearray)
    expires: float = 0.0


class StoreService:
    """The owner's side: answers store.* calls about this node's local stores."""

    def __init__(
        self,
        node: str,
        stores: dict[str, Store],
        address_of: Callable[[str], PeerAddr | None] = lambda node: None,
    ) -> None:
        self.node = node
        self.stores = stores
        self.address_of = address_of  # a subscriber's node name -> where to call it back
        self._stages: dict[tuple[PeerAddr, int], _Stage] = {}
        self._subscribers: dict[tuple[str, str], float] = {}  # (node, store) -> until
        self._changed: dict[str, set[Key]] = {}  # store -> keys changed since the last batch
        self._wake = trio.Event()
        for store in stores.values():
            store.watchers.append(functools.partial(self._store_changed, store.name))

    def register(self, net: Network) -> None:
        for name in METHODS:
            handler = self._wrap(getattr(self, f"_{name}"))
            net.register(f"store.{name}", handler, inline=name in INSTANT)

    def _subscribe(self, caller: str, store: str) -> None:
        now = trio.current_time()
        if len(self._subscribers) >= MAX_SUBSCRIBERS:
            self._subscribers = {k: t for k, t in self._subscribers.items() if t > now}
        if len(self._subscribers) < MAX_SUBSCRIBERS:
            self._subscribers[(caller, store)] = now + SUBSCRIPTION

    def _store_changed(self, store: str, key: bytes, origin: object, carried: bool) -> None:
        if not self._subscribers:
            return  # nobody to tell: the usual case, decided before parsing the key
        loc, parts = split_key(key)
        if loc != self.node or not parts:
            return
        now = trio.current_time()
        if not any(s == store and until > now for (_, s), until in self._subscribers.items()):
            return
        self._changed.setdefault(store, set()).add(parts)
        self._wake.set()

    async def run_notifier(self, net: Network) -> None:
        """Call subscribers back with what changed, in batches (cancel to stop)."""
        async with trio.open_nursery() as nursery:
            while True:
                await self._wake.wait()
                await trio.sleep(NOTIFY_EVERY)
                self._wake = trio.Event()
                changed, self._changed = self._changed, {}
                now = trio.current_time()
                self._subscribers = {k: t for k, t in self._subscribers.items() if t > now}
                for (node, store), _ in self._subscribers.items():
                    keys = changed.get(store)
                    addr = self.address_of(node)
                    if not keys or addr is None:
                        continue
                    batch = [list(k) for k in keys] if len(keys) <= NOTIFY_MAX_KEYS else []
                    args = {"o": self.node, "s": store, "keys": batch}
                    nursery.start_soon(_notify, net, addr, args)

    def _wrap(self, fn: Callable) -> Callable:
        async def handler(src: PeerAddr, args: Any) -> Any:
            if not isinstance(args, dict):
                raise RemoteError(errno.EINVAL, "arguments must be a map")
            name = args.get("s")
            store = self.stores.get(name) if isinstance(name, str) else None
            if store is None or store.name == "global":
                raise RemoteError(errno.ENOENT, f"no local store {args.get('s')!r} here")
            caller = args.get("from")
            if isinstance(caller, str) and caller != self.node:
                self._subscribe(caller, store.name)
            try:
                return await fn(store, src, args)
            except StoreError as e:
                raise RemoteError(e.errno, str(e)) from None
            except (KeyError, TypeError, ValueError) as e:
                raise RemoteError(errno.EINVAL, f"bad arguments: {e}") from None

        return handler

    def _where(self, store: Store, a: dict) -> Key:
        """The entry a change is about: by its eid when given (it may have been renamed since
        the caller learned its path), else by its key."""
        if "e" not in a:
            return _key(a["k"])
        return self._path_of(store, _int(a["e"], "e"), errno.ESTALE)

    def _path_of(self, store: Store, eid: int, code: int) -> Key:
        """Where the entry ``eid`` of this node is now; RemoteError ``code`` if nowhere."""
        where = store.locate(eid)
        if where is None or where[0] != self.node:
            raise RemoteError(code, f"{store.name}: no entry {eid}")
        return where[1]

    def _get(self, store: Store, parts: Key) -> Record:
        rec = store.get(self.node, parts)
        if rec is None:
            raise RemoteError(errno.ENOENT, f"{store.name}: {b'/'.join(parts)!r} does not exist")
        return rec

    async def _stat(self, store: Store, src: PeerAddr, a: dict) -> bytes:
        return self._get(store, _key(a["k"])).pack()

    async def _lookup(self, store: Store, src: PeerAddr, a: dict) -> list:
        rec = self._get(store, _key(a["k"]))
        small = min(_int(a["n"], "n"), CHUNK)
        data = store.read(rec.eid) if rec.kind == FILE and rec.size <= small else None
        return [rec.pack(), data]

    async def _locate(self, store: Store, src: PeerAddr, a: dict) -> list:
        eid = _int(a["e"], "e")
        parts = self._path_of(store, eid, errno.ENOENT)
        rec = store.get(self.node, parts)
        if rec is None or rec.eid != eid:
            raise RemoteError(errno.ENOENT, f"{store.name}: no entry {eid}")
        return [list(parts), rec.pack()]

    async def _list(self, store: Store, src: PeerAddr, a: dict) -> list:
        parts = _key(a["k"])
        if not self._get(store, parts).is_dir:
            raise RemoteError(errno.ENOTDIR, "not a directory")
        after = a.get("after") or b""
        n = min(_int(a.get("n", PAGE), "n"), PAGE) or PAGE
        if not isinstance(after, bytes):
            raise RemoteError(errno.EINVAL, "after must be bytes")
        page, more = store.children_page(self.node, parts, after, n)
        return [[[name, rec.pack()] for name, rec in page], more]

    async def _open(self, store: Store, src: PeerAddr, a: dict) -> list:
        k, rec = await self._locate(store, src, a)
        size = min(_int(a["n"], "n"), CHUNK)
        return [k, rec, store.read(_int(a["e"], "e"), 0, size)]

    async def _read(self, store: Store, src: PeerAddr, a: dict) -> bytes:
        size = min(_int(a["n"], "n"), CHUNK)
        return store.read(_int(a["e"], "e"), _int(a["o"], "o"), size)

    async def _create(self, store: Store, src: PeerAddr, a: dict) -> bytes:
        kind, target = _int(a["kind"], "kind"), a.get("target") or b""
        if kind not in (FILE, DIR, SYMLINK):
            raise RemoteError(errno.EINVAL, f"kind {kind} is not a file, directory or symlink")
        if not isinstance(target, bytes) or len(target) > 4096:
            raise RemoteError(errno.EINVAL, "target must be at most 4096 bytes")
        rec = store.create(
            self.node,
            _key(a["k"]),
            kind,
            _int(a["perm"], "perm") & 0o7777,
            _id(a["uid"], "uid"),
            _id(a["gid"], "gid"),
            target,
            ORIGIN,
        )
        return rec.pack()

    def _expire(self) -> None:
        now = trio.current_time()
        for k in [k for k, s in self._stages.items() if s.expires < now]:
            del self._stages[k]

    async def _stage(self, store: Store, src: PeerAddr, a: dict) -> None:
        self._expire()
        sid, offset, data = _int(a["id"], "id"), _int(a["o"], "o"), a["data"]
        if not isinstance(data, bytes):
            raise RemoteError(errno.EINVAL, "data must be bytes")
        store.check_size(offset + len(data))
        stage = self._stages.setdefault((src[0], sid), _Stage())  # type: ignore[index]
        if offset != len(stage.data):
            raise RemoteError(
                errno.EINVAL, f"stage {sid}: part at {offset}, expected {len(stage.data)}"
            )
        stage.data += data
        stage.expires = trio.current_time() + STAGE_TTL

    async def _put(self, store: Store, src: PeerAddr, a: dict) -> bytes | None:
        if "stage" in a:
            stage = self._stages.pop((src[0], _int(a["stage"], "stage")), None)  # type: ignore[arg-type]
            if stage is None:
                raise RemoteError(errno.EINVAL, "unknown or expired stage")
            value = bytes(stage.data)
        else:
            value = a["v"]
            if not isinstance(value, bytes):
                raise RemoteError(errno.EINVAL, "v must be bytes")
        fields = _fields(a.get("f") or {})
        parts = self._where(store, a)
        rec = store.write_value(self.node, parts, _int(a["e"], "e"), value, ORIGIN, **fields)
        if a.get("sync"):
            await store.sync()  # a close() on the caller's side: on disk before it returns
        return rec.pack() if rec is not None else None

    async def _update(self, store: Store, src: PeerAddr, a: dict) -> bytes:
        return store.update(self.node, self._where(store, a), ORIGIN, **_fields(a["f"])).pack()

    async def _remove(self, store: Store, src: PeerAddr, a: dict) -> None:
        store.remove(self.node, _key(a["k"]), is_dir=bool(a["dir"]), origin=ORIGIN)

    async def _rename(self, store: Store, src: PeerAddr, a: dict) -> None:
        store.rename(
            self.node, _key(a["src"]), _key(a["dst"]), noreplace=bool(a["noreplace"]), origin=ORIGIN
        )

    async def _setxattr(self, store: Store, src: PeerAddr, a: dict) -> bytes:
        name, value = _xattr_name(a["name"]), a["value"]
        if not isinstance(value, bytes):
            raise RemoteError(errno.EINVAL, "value must be bytes")
        return store.set_xattr(self.node, self._where(store, a), name, value, origin=ORIGIN).pack()

    async def _rmxattr(self, store: Store, src: PeerAddr, a: dict) -> bytes:
        name = _xattr_name(a["name"])
        return store.remove_xattr(self.node, self._where(store, a), name, origin=ORIGIN).pack()

    async def _sync(self, store: Store, src: PeerAddr, a: dict) -> None:
        await store.sync()


async def _notify(net: Network, addr: PeerAddr, args: dict) -> None:
    with contextlib.suppress(PeerUnreachable, RemoteError):  # best effort: caches expire
        await net.call(addr, "store.changed", args, timeout=1.0)


def _fields(f: Any) -> dict[str, int]:
    if not isinstance(f, dict) or not set(f) <= SETTABLE:
        raise RemoteError(errno.EINVAL, f"settable fields are {sorted(SETTABLE)}")
    out = {k: _int(v, k) for k, v in f.items()}
    for k in ("uid", "gid"):
        if k in out:
            out[k] = _id(out[k], k)
    if "perm" in out:
        out["perm"] &= 0o7777
    for k in ("mtime_ns", "atime_ns", "ctime_ns"):
        if out.get(k, 0) >= 1 << 63:
            raise RemoteError(errno.EINVAL, f"{k} out of range")
    return out


def _id(v: Any, what: str) -> int:
    v = _int(v, what)
    if v >= 1 << 32:
        raise RemoteError(errno.EINVAL, f"{what} out of range")
    return v


def _xattr_name(name: Any) -> bytes:
    if not isinstance(name, bytes) or not name.startswith(b"user.") or len(name) > 255:
        raise RemoteError(errno.EINVAL, "an xattr name is user.* bytes, at most 255")
    if name.startswith(b"user.dreki."):
        raise RemoteError(errno.EPERM, "user.dreki.* are computed, not stored")
    return name


def _record(raw: Any) -> Record:
    """A record an owner sent, checked: a malformed one must never reach the kernel."""
    try:
        rec = Record.unpack(raw)
    except Exception:
        raise StoreError(errno.EIO, "the owner sent a malformed record") from None
    ints = (rec.kind, rec.eid, rec.perm, rec.uid, rec.gid, rec.mtime_ns, rec.ctime_ns, rec.size)
    if (
        rec.kind not in (FILE, DIR, SYMLINK)
        or not all(type(i) is int and 0 <= i < 1 << 63 for i in ints)
        or type(rec.atime_ns) is not int
        or type(rec.subdirs) is not int
        or not isinstance(rec.target, bytes)
        or not (rec.xattrs is NO_XATTRS or isinstance(rec.xattrs, dict))
        or not all(isinstance(k, bytes) and isinstance(v, bytes) for k, v in rec.xattrs.items())
    ):
        raise StoreError(errno.EIO, "the owner sent a malformed record")
    return rec


def _parts(v: Any) -> Key:
    try:
        return _key(v)
    except RemoteError:
        raise StoreError(errno.EIO, "the owner sent a malformed key") from None


def _bytes(v: Any) -> bytes:
    if not isinstance(v, bytes):
        raise StoreError(errno.EIO, "the owner sent a malformed value")
    return v


# -- the client ----------------------------------------------------------------------------------


class StoreClient:
    """One store of another node, as seen from here: every method is one or a few calls to the
    owner. Raises StoreError with the owner's errno, or EHOSTDOWN when the owner is down or does
    not answer within ``timeout`` (never hangs)."""

    def __init__(
        self,
        net: Network,
        node: str,
        store: str,
        address: Callable[[], PeerAddr | None],
        *,
        timeout: float = 1.5,
        me: str | None = None,
    ) -> None:
        self.net = net
        self.me = me  # this peer's node: the owner calls it back with changes
        self.node = node
        self.name = store
        self.address = address  # None: the owner is known dead or has no address
        self.timeout = timeout
        self._next_stage = int.from_bytes(os.urandom(4), "big")

    async def _call(self, method: str, args: dict, timeout: float | None = None) -> Any:
        addr = self.address()
        if addr is None:
            raise StoreError(errno.EHOSTDOWN, f"{self.node} is down")
        args["s"] = self.name
        if self.me is not None:
            args["from"] = self.me
        try:
            return await self.net.call(
                addr, f"store.{method}", args, timeout=timeout or self.timeout
            )
        except RemoteError as e:
            raise StoreError(e.code or errno.EIO, f"{self.node}: {e}") from None
        except PeerUnreachable as e:
            raise StoreError(errno.EHOSTDOWN, f"{self.node} does not answer ({e})") from None
        except RuntimeError as e:  # the transport is not serving (yet, or any more)
            raise StoreError(errno.EHOSTDOWN, f"{self.node}: {e}") from None

    async def stat(self, parts: Key) -> Record:
        return _record(await self._call("stat", {"k": list(parts)}))

    async def lookup(self, parts: Key, small: int) -> tuple[Record, bytes | None]:
        """stat, and the value with it when it is at most ``small`` bytes."""
        rec, data = await self._call("lookup", {"k": list(parts), "n": small})
        return _record(rec), None if data is None else _bytes(data)

    async def locate(self, eid: int) -> tuple[Key, Record]:
        k, rec = await self._call("locate", {"e": eid})
        return _parts(k), _record(rec)

    async def children(self, parts: Key) -> list[tuple[bytes, Record]]:
        out: list[tuple[bytes, Record]] = []
        after = b""
        for _ in range(1 << 20):  # bounded: a page is PAGE entries
            items, more = await self._call("list", {"k": list(parts), "after": after, "n": PAGE})
            out.extend((_bytes(name), _record(rec)) for name, rec in items)
            if not more or not items:
                break
            after = items[-1][0]
        return out

    async def open(self, eid: int, size: int) -> tuple[Key, Record, bytes]:
        """Where the entry is, its record, and its first ``size`` bytes: one round trip."""
        k, rec, data = await self._call("open", {"e": eid, "n": size})
        return _parts(k), _record(rec), _bytes(data)

    async def read(self, eid: int, offset: int, size: int) -> bytes:
        chunks = []
        while size > 0:
            data = _bytes(await self._call("read", {"e": eid, "o": offset, "n": min(size, CHUNK)}))
            chunks.append(data)
            if len(data) < min(size, CHUNK):
                break
            offset += len(data)
            size -= len(data)
        return b"".join(chunks)

    async def create(
        self, parts: Key, kind: int, perm: int, uid: int, gid: int, target: bytes = b""
    ) -> Record:
        args = {"k": list(parts), "kind": kind, "perm": perm, "uid": uid, "gid": gid}
        if target:
            args["target"] = target
        return _record(await self._call("create", args))

    async def put(
        self, parts: Key, eid: int, value: bytes, *, durable: bool = False, **fields: int
    ) -> Record | None:
        """One new version of the file ``eid``; ``durable``: on the owner's disk when this
        returns (one round trip for the bytes and the sync)."""
        args: dict[str, Any] = {"k": list(parts), "e": eid, "f": fields}
        if durable:
            args["sync"] = True
        if len(value) <= CHUNK:
            args["v"] = value
        else:
            self._next_stage += 1
            sid = self._next_stage
            for off in range(0, len(value), CHUNK):
                await self._call("stage", {"id": sid, "o": off, "data": value[off : off + CHUNK]})
            args["stage"] = sid
        # A sync waits for a disk: a slow answer is not a dead owner (as in sync()).
        raw = await self._call("put", args, SYNC_TIMEOUT if durable else None)
        return _record(raw) if raw is not None else None

    async def update(self, parts: Key, eid: int | None = None, **fields: int) -> Record:
        args: dict[str, Any] = {"k": list(parts), "f": fields}
        if eid is not None:
            args["e"] = eid  # the owner finds it by id: it may have moved since
        return _record(await self._call("update", args))

    async def remove(self, parts: Key, *, is_dir: bool) -> None:
        await self._call("remove", {"k": list(parts), "dir": is_dir})

    async def rename(self, src: Key, dst: Key, *, noreplace: bool) -> None:
        await self._call("rename", {"src": list(src), "dst": list(dst), "noreplace": noreplace})

    async def set_xattr(self, parts: Key, eid: int, name: bytes, value: bytes) -> Record:
        args = {"k": list(parts), "e": eid, "name": name, "value": value}
        return _record(await self._call("setxattr", args))

    async def remove_xattr(self, parts: Key, eid: int, name: bytes) -> Record:
        args = {"k": list(parts), "e": eid, "name": name}
        return _record(await self._call("rmxattr", args))

    async def sync(self) -> None:
        # An fsync on a busy disk takes its time: a slow answer is not a dead owner.
        await self._call("sync", {}, timeout=SYNC_TIMEOUT)
