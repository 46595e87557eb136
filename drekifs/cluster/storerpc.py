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
    store.put      {s, k, e, v | stage, size, f}         -> rec | None   (one new version)
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
from ..stores.record import FILE, Record, StoreError
from .net import Network, PeerAddr, PeerUnreachable, RemoteError

log = logging.getLogger(__name__)

PAGE = 1000  # entries per listing page
CHUNK = 1 << 20  # bytes per stage call: well under the transport's frame limit
STAGE_TTL = 60.0
SUBSCRIPTION = 30.0
NOTIFY_EVERY = 0.05
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
            net.register(f"store.{name}", self._wrap(getattr(self, f"_{name}")))

    def _store_changed(self, store: str, loc: str, parts: Key, origin: object) -> None:
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
            store = self.stores.get(args.get("s"))  # type: ignore[arg-type]
            if store is None or store.name == "global":
                raise RemoteError(errno.ENOENT, f"no local store {args.get('s')!r} here")
            caller = args.get("from")
            if isinstance(caller, str) and caller != self.node and len(self._subscribers) < 10_000:
                self._subscribers[(caller, store.name)] = trio.current_time() + SUBSCRIPTION
            try:
                return await fn(store, src, args)
            except StoreError as e:
                raise RemoteError(e.errno, str(e)) from None
            except (KeyError, TypeError, ValueError) as e:
                raise RemoteError(errno.EINVAL, f"bad arguments: {e}") from None

        return handler

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
        where = store.locate(eid)
        if where is None or where[0] != self.node:
            raise RemoteError(errno.ENOENT, f"{store.name}: no entry {eid}")
        rec = store.get(self.node, where[1])
        if rec is None or rec.eid != eid:
            raise RemoteError(errno.ENOENT, f"{store.name}: no entry {eid}")
        return [list(where[1]), rec.pack()]

    async def _list(self, store: Store, src: PeerAddr, a: dict) -> list:
        parts = _key(a["k"])
        if not self._get(store, parts).is_dir:
            raise RemoteError(errno.ENOTDIR, "not a directory")
        after = a.get("after") or b""
        n = min(_int(a.get("n", PAGE), "n"), PAGE) or PAGE
        kids = store.children(self.node, parts)
        names = sorted(name for name in kids if name > after)
        page = names[:n]
        return [[[name, kids[name].pack()] for name in page], len(names) > n]

    async def _open(self, store: Store, src: PeerAddr, a: dict) -> list:
        k, rec = await self._locate(store, src, a)
        size = min(_int(a["n"], "n"), CHUNK)
        return [k, rec, store.read(_int(a["e"], "e"), 0, size)]

    async def _read(self, store: Store, src: PeerAddr, a: dict) -> bytes:
        size = min(_int(a["n"], "n"), CHUNK)
        return store.read(_int(a["e"], "e"), _int(a["o"], "o"), size)

    async def _create(self, store: Store, src: PeerAddr, a: dict) -> bytes:
        rec = store.create(
            self.node,
            _key(a["k"]),
            _int(a["kind"], "kind"),
            _int(a["perm"], "perm") & 0o7777,
            _int(a["uid"], "uid"),
            _int(a["gid"], "gid"),
            bytes(a.get("target") or b""),
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
        rec = store.write_value(self.node, _key(a["k"]), _int(a["e"], "e"), value, ORIGIN, **fields)
        return rec.pack() if rec is not None else None

    async def _update(self, store: Store, src: PeerAddr, a: dict) -> bytes:
        return store.update(self.node, _key(a["k"]), ORIGIN, **_fields(a["f"])).pack()

    async def _remove(self, store: Store, src: PeerAddr, a: dict) -> None:
        store.remove(self.node, _key(a["k"]), is_dir=bool(a["dir"]), origin=ORIGIN)

    async def _rename(self, store: Store, src: PeerAddr, a: dict) -> None:
        store.rename(
            self.node, _key(a["src"]), _key(a["dst"]), noreplace=bool(a["noreplace"]), origin=ORIGIN
        )

    async def _setxattr(self, store: Store, src: PeerAddr, a: dict) -> bytes:
        name, value = a["name"], a["value"]
        if not isinstance(name, bytes) or not isinstance(value, bytes):
            raise RemoteError(errno.EINVAL, "name and value must be bytes")
        return store.set_xattr(self.node, _key(a["k"]), name, value, origin=ORIGIN).pack()

    async def _rmxattr(self, store: Store, src: PeerAddr, a: dict) -> bytes:
        if not isinstance(a["name"], bytes):
            raise RemoteError(errno.EINVAL, "name must be bytes")
        return store.remove_xattr(self.node, _key(a["k"]), a["name"], origin=ORIGIN).pack()

    async def _sync(self, store: Store, src: PeerAddr, a: dict) -> None:
        await store.sync()


async def _notify(net: Network, addr: PeerAddr, args: dict) -> None:
    with contextlib.suppress(PeerUnreachable, RemoteError):  # best effort: caches expire
        await net.call(addr, "store.changed", args, timeout=1.0)


def _fields(f: Any) -> dict[str, int]:
    if not isinstance(f, dict) or not set(f) <= SETTABLE:
        raise RemoteError(errno.EINVAL, f"settable fields are {sorted(SETTABLE)}")
    return {k: _int(v, k) for k, v in f.items()}


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

    async def _call(self, method: str, args: dict) -> Any:
        addr = self.address()
        if addr is None:
            raise StoreError(errno.EHOSTDOWN, f"{self.node} is down")
        args["s"] = self.name
        if self.me is not None:
            args["from"] = self.me
        try:
            return await self.net.call(addr, f"store.{method}", args, timeout=self.timeout)
        except RemoteError as e:
            raise StoreError(e.code or errno.EIO, f"{self.node}: {e}") from None
        except PeerUnreachable as e:
            raise StoreError(errno.EHOSTDOWN, f"{self.node} does not answer ({e})") from None

    async def stat(self, parts: Key) -> Record:
        return Record.unpack(await self._call("stat", {"k": list(parts)}))

    async def lookup(self, parts: Key, small: int) -> tuple[Record, bytes | None]:
        """stat, and the value with it when it is at most ``small`` bytes."""
        rec, data = await self._call("lookup", {"k": list(parts), "n": small})
        return Record.unpack(rec), data

    async def locate(self, eid: int) -> tuple[Key, Record]:
        k, rec = await self._call("locate", {"e": eid})
        return tuple(k), Record.unpack(rec)

    async def children(self, parts: Key) -> list[tuple[bytes, Record]]:
        out: list[tuple[bytes, Record]] = []
        after = b""
        for _ in range(1 << 20):  # bounded: a page is PAGE entries
            items, more = await self._call("list", {"k": list(parts), "after": after, "n": PAGE})
            out.extend((name, Record.unpack(rec)) for name, rec in items)
            if not more or not items:
                break
            after = items[-1][0]
        return out

    async def open(self, eid: int, size: int) -> tuple[Key, Record, bytes]:
        """Where the entry is, its record, and its first ``size`` bytes: one round trip."""
        k, rec, data = await self._call("open", {"e": eid, "n": size})
        return tuple(k), Record.unpack(rec), data

    async def read(self, eid: int, offset: int, size: int) -> bytes:
        chunks = []
        while size > 0:
            data = await self._call("read", {"e": eid, "o": offset, "n": min(size, CHUNK)})
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
        return Record.unpack(await self._call("create", args))

    async def put(self, parts: Key, eid: int, value: bytes, **fields: int) -> Record | None:
        args: dict[str, Any] = {"k": list(parts), "e": eid, "f": fields}
        if len(value) <= CHUNK:
            args["v"] = value
        else:
            self._next_stage += 1
            sid = self._next_stage
            for off in range(0, len(value), CHUNK):
                await self._call("stage", {"id": sid, "o": off, "data": value[off : off + CHUNK]})
            args["stage"] = sid
        raw = await self._call("put", args)
        return Record.unpack(raw) if raw is not None else None

    async def update(self, parts: Key, **fields: int) -> Record:
        return Record.unpack(await self._call("update", {"k": list(parts), "f": fields}))

    async def remove(self, parts: Key, *, is_dir: bool) -> None:
        await self._call("remove", {"k": list(parts), "dir": is_dir})

    async def rename(self, src: Key, dst: Key, *, noreplace: bool) -> None:
        await self._call("rename", {"src": list(src), "dst": list(dst), "noreplace": noreplace})

    async def set_xattr(self, parts: Key, name: bytes, value: bytes) -> Record:
        args = {"k": list(parts), "name": name, "value": value}
        return Record.unpack(await self._call("setxattr", args))

    async def remove_xattr(self, parts: Key, name: bytes) -> Record:
        return Record.unpack(await self._call("rmxattr", {"k": list(parts), "name": name}))

    async def sync(self) -> None:
        await self._call("sync", {})
