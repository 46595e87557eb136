"""The daemon's control socket: get, put, rm and ls by URN, without going through a path.

``<data-dir>/control.sock`` (mode 0600; its path is in ``.dreki/control``) takes frames of a
4-byte big-endian length and a msgpack map, one request and one reply per frame::

    {"op": "get", "urn": U}                      -> {"value": bytes}
    {"op": "put", "urn": U, "value": bytes}      -> {}         (parents made as needed; synced)
    {"op": "rm",  "urn": U}                      -> {}         (a file, or an empty directory)
    {"op": "ls",  "urn": U}                      -> {"entries": [[name, kind, size], ...]}
    any failure                                  -> {"error": [errno, message]}

A change made here is not a change through the mount: the kernel's caches are invalidated for
it exactly as for a replicated change.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack

from .. import datadir
from ..stores.record import DIR, FILE, KIND_NAMES, StoreError
from ..urn import URN, URNError
from .service import runtime_dirs

log = logging.getLogger(__name__)

MAX_FRAME = 128 << 20
_LEN = struct.Struct(">I")
ORIGIN = "control"


class ControlError(Exception):
    def __init__(self, code: int, message: str) -> None:
        self.errno = code
        super().__init__(message)


def _pack(obj: dict) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return _LEN.pack(len(body)) + body


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


# -- the client (plain sockets: the CLI has no event loop) ----------------------------------------


def call(sock_path: str | os.PathLike, request: dict, timeout: float = 60.0) -> dict:
    """One request; raises ControlError with the daemon's errno and message."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(os.fspath(sock_path))
        except OSError as e:
            raise ControlError(
                e.errno or errno.ECONNREFUSED, f"{sock_path}: {e.strerror}"
            ) from None
        s.sendall(_pack(request))
        head = _recv_exactly(s, 4)
        (size,) = _LEN.unpack(head)
        reply = msgpack.unpackb(_recv_exactly(s, size), raw=False)
    if "error" in reply:
        code, message = reply["error"]
        raise ControlError(code, message)
    return reply


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = s.recv(min(n, 1 << 20))
        if not chunk:
            raise ControlError(errno.ECONNRESET, "the daemon closed the connection")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


# -- the server ------------------------------------------------------------------------------------


async def serve(path: Path, handle: Callable[[dict], Awaitable[dict]]) -> None:
    """Serve the socket until cancelled; one task per connection."""
    # Here, not at the top: drekifs get/put/rm/ls use this module's client, and trio would
    # cost each of them 65-85 ms of start-up (python -X importtime).
    import trio

    path.unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(os.fspath(path))
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    sock.listen(64)
    listener = trio.SocketListener(sock)

    async def connection(stream: trio.SocketStream) -> None:
        async with stream:
            buf = bytearray()
            while True:
                while len(buf) < 4:
                    data = await stream.receive_some(1 << 16)
                    if not data:
                        return
                    buf += data
                (size,) = _LEN.unpack(buf[:4])
                if size > MAX_FRAME:
                    await stream.send_all(_pack({"error": [errno.EMSGSIZE, "frame too large"]}))
                    return
                while len(buf) < 4 + size:
                    data = await stream.receive_some(1 << 20)
                    if not data:
                        return
                    buf += data
                body, buf = bytes(buf[4 : 4 + size]), buf[4 + size :]
                try:
                    request = msgpack.unpackb(body, raw=False)
                    if not isinstance(request, dict):
                        raise ControlError(errno.EINVAL, "a request is a map")
                    reply = await handle(request)
                except ControlError as e:
                    reply = {"error": [e.errno, str(e)]}
                except (StoreError, URNError, ValueError) as e:
                    reply = {"error": [getattr(e, "errno", errno.EINVAL), str(e)]}
                except Exception as e:  # the daemon outlives any request
                    log.exception("control request failed")
                    reply = {"error": [errno.EIO, f"{type(e).__name__}: {e}"]}
                await stream.send_all(_pack(reply))

    try:
        await trio.serve_listeners(connection, [listener])
    finally:
        path.unlink(missing_ok=True)


class StoreAPI:
    """Requests by URN, answered from the daemon's namespace and stores."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon

    def _target(self, text: Any):
        if not isinstance(text, str):
            raise ControlError(errno.EINVAL, "urn must be a string")
        urn = URN.parse(text)
        ns = self.daemon.ops.ns
        if urn.world != ns.world.domain:
            raise ControlError(errno.ENOENT, f"{urn}: this daemon serves {ns.world.domain}")
        if urn.store is None:
            raise ControlError(errno.EISDIR, f"{urn} is a region or node, not in a store")
        loc = ns.world.find(urn.segments)
        if loc is None:
            raise ControlError(errno.ENOENT, f"{urn}: no such region or node")
        if urn.store == "global" or loc.name == self.daemon.node:
            store = self.daemon.stores.get(urn.store)
        else:
            store = None
        if urn.store != "global" and not loc.is_node:
            raise ControlError(errno.ENOENT, f"{urn}: a region has no store {urn.store}")
        if store is None:
            raise ControlError(errno.EHOSTDOWN, f"{urn}: store {urn.store} is not served here")
        return urn, store, loc.name

    async def _settle(self, store) -> None:
        """On disk, and the mount's kernel cache told: the reply means done everywhere here."""
        await store.sync()
        await self.daemon.ops.invalidator.flush()

    async def handle(self, request: dict) -> dict:
        op = request.get("op")
        urn, store, loc = self._target(request.get("urn"))
        key = urn.key
        if op == "get":
            rec = store.get(loc, key)
            if rec is None:
                raise ControlError(errno.ENOENT, f"{urn} does not exist")
            if rec.kind != FILE:
                raise ControlError(errno.EISDIR, f"{urn} is not a file")
            return {"value": store.read(rec.eid)}
        if op == "ls":
            rec = store.get(loc, key)
            if rec is None:
                raise ControlError(errno.ENOENT, f"{urn} does not exist")
            if not rec.is_dir:
                raise ControlError(errno.ENOTDIR, f"{urn} is not a directory")
            children = store.children(loc, key)
            return {
                "entries": [
                    [name, KIND_NAMES[r.kind], r.size] for name, r in sorted(children.items())
                ]
            }
        if op == "put":
            value = request.get("value")
            if not isinstance(value, bytes):
                raise ControlError(errno.EINVAL, "value must be bytes")
            if not key:
                raise ControlError(errno.EISDIR, f"{urn} is a store, not a key")
            store.check_size(len(value))
            uid, gid = os.getuid(), os.getgid()
            for i in range(1, len(key)):
                parent = store.get(loc, key[:i])
                if parent is None:
                    store.create(loc, key[:i], DIR, 0o755, uid, gid, origin=ORIGIN)
            rec = store.get(loc, key)
            if rec is None:
                rec = store.create(loc, key, FILE, 0o644, uid, gid, origin=ORIGIN)
            elif rec.kind != FILE:
                raise ControlError(errno.EISDIR, f"{urn} is not a file")
            store.write_value(loc, key, rec.eid, value, ORIGIN)
            await self._settle(store)
            return {}
        if op == "rm":
            rec = store.get(loc, key)
            if rec is None or not key:
                raise ControlError(errno.ENOENT, f"{urn} does not exist")
            store.remove(loc, key, is_dir=rec.is_dir, origin=ORIGIN)
            await self._settle(store)
            return {}
        raise ControlError(errno.EINVAL, f"unknown op {op!r} (get, put, rm, ls)")
