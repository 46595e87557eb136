"""The real :class:`~drekifs.cluster.net.Network`: sealed msgpack frames over TCP for calls,
sealed datagrams over UDP, both on one port (wire format: frames.py).

Calls to a peer are multiplexed over one pooled connection per peer address, opened on demand
and reopened after a failure; a connection's reader task hands each reply to its waiting caller,
so a call spawns no task. The server side serves the requests of a connection concurrently, up to
:class:`~drekifs.cluster.limits.Limits`.

Whatever arrives that is not well-formed, authentic and fresh is dropped and counted in
``counters`` (``tcp.dropped.<reason>``, ``udp.dropped.<reason>``), and a connection that sent it
is closed; nothing a remote sends raises out of a loop or holds resources past a timeout. Every
task runs in :meth:`Transport.serve`'s nursery: cancelling it closes every socket and fails
every call in flight with PeerUnreachable.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from . import frames
from .frames import FrameDecoder, Keys, Malformed, Session
from .keyring import OVERHEAD, KeyRing
from .limits import Limits
from .net import (
    MAX_DATAGRAM,
    CallHandler,
    DatagramHandler,
    PeerAddr,
    PeerUnreachable,
    RemoteError,
)
from .outbox import STALLED, Outbox
from .replay import ReplayGuard

log = logging.getLogger(__name__)

RECEIVE_BYTES = 1 << 16
UDP_RECEIVE_BYTES = 1 << 16  # larger than any legitimate datagram, so oversized ones show as such
MAX_ERROR_MESSAGE = 1000  # characters of an error message sent back
LISTEN_BACKLOG = 128
BIND_ATTEMPTS = 20  # port 0: tries to find a port free for both TCP and UDP
# accept() failures that mean "out of resources for now": wait, then accept again.
ACCEPT_PAUSE = 0.1


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class _Slot:
    """A call waiting for its reply."""

    __slots__ = ("event", "ok", "value")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.ok = False
        self.value: Any = None  # the result | (code, message) | None when the connection ended


@dataclass(eq=False)
class _Outgoing:
    """The pooled connection to one peer: opened by its own task, which then reads replies."""

    to: PeerAddr
    ready: trio.Event = field(default_factory=trio.Event)  # set once open, or failed
    ended: str | None = None  # why the connection failed or ended; set once
    established: bool = False
    outbox: Outbox | None = None
    session: Session | None = None
    send_seq: int = 0
    recv_seq: int = 0
    next_rid: int = 0
    pending: dict[int, _Slot] = field(default_factory=dict)
    last_used: float = 0.0
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)


@dataclass(eq=False)
class _Host:
    """What one remote IP address holds of this server."""

    conns: int = 0
    running: int = 0  # requests being served, all its connections together
    finished: trio.Event = field(default_factory=trio.Event)  # set (and replaced) as one ends


@dataclass(eq=False)
class _Incoming:
    """An accepted connection, once its hello is in."""

    stream: trio.SocketStream
    outbox: Outbox
    session: Session
    peer: PeerAddr  # the client's IP and the listening port it declared
    host: _Host
    send_seq: int = 0
    recv_seq: int = 0
    running: int = 0  # requests being served
    last_frame: float = 0.0  # trio time of the last request frame


class Transport:
    """One peer's network endpoint: TCP and UDP on ``bind`` (port 0 picks one; ``addr`` holds
    it once :meth:`serve` has started).

    ``bind`` is an IP address and port (v4 or v6). ``max_frame`` bounds a sealed TCP frame
    either way: a larger request or reply is refused when sent (ValueError / an EMSGSIZE error
    reply) and drops the connection when received. ``wall_clock`` stamps and judges datagrams
    (replaceable to test clock skew).
    """

    def __init__(
        self,
        world: str,
        keyring: KeyRing,
        bind: PeerAddr,
        *,
        max_frame: int = 4 << 20,
        limits: Limits | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.world = world
        self.addr: PeerAddr = bind
        self.max_frame = max_frame
        self.limits = limits or Limits()
        self.counters: Counter[str] = Counter()
        self._world = world.encode()
        self._keys = Keys.of(keyring)
        self._udp_aad = frames.datagram_aad(self._world)
        self._wall = wall_clock
        self._replay = ReplayGuard(
            self.limits.replay_window, self.limits.replay_cache, wall_clock=wall_clock
        )
        self._handlers: dict[str, CallHandler] = {}
        self._on_datagram: DatagramHandler | None = None
        self._state = "new"  # -> "serving" -> "closed"
        self._nursery: trio.Nursery | None = None
        self._stopped = trio.Event()
        self._udp: socket.socket | None = None
        self._out: dict[PeerAddr, _Outgoing] = {}
        self._hosts: dict[str, _Host] = {}
        self._conns_in = 0

    # -- the Network interface ----------------------------------------------------------------

    def register(self, method: str, handler: CallHandler) -> None:
        self._handlers[method] = handler

    def on_datagram(self, handler: DatagramHandler) -> None:
        self._on_datagram = handler

    def set_keyring(self, keyring: KeyRing) -> None:
        """Seal with this ring's primary and open with its keys from now on, on every
        connection too: a key rotation step, without downtime."""
        self._keys = Keys.of(keyring)
        self.counters["keyring.reloaded"] += 1

    def send_datagram(self, to: PeerAddr, msg: Any) -> None:
        plaintext = frames.pack_datagram(
            int(self._wall() * 1000), int.from_bytes(os.urandom(8), "big"), frames.pack(msg)
        )
        if len(plaintext) + OVERHEAD > MAX_DATAGRAM:
            raise ValueError(
                f"a datagram of {len(plaintext) + OVERHEAD} bytes sealed, over {MAX_DATAGRAM}"
            )
        if self._udp is None:
            self._not_serving()
            self.counters["udp.send-failed"] += 1
            return
        try:
            self._udp.sendto(self._keys.seal(plaintext, self._udp_aad), to)
        except OSError:  # best effort: a full buffer, no route, a bad address
            self.counters["udp.send-failed"] += 1
        else:
            self.counters["udp.sent"] += 1

    async def call(self, to: PeerAddr, method: str, args: Any, *, timeout: float) -> Any:
        packed_method, packed_args = frames.pack(method), frames.pack(args)
        size = frames.PAYLOAD_SLACK + len(packed_method) + len(packed_args) + OVERHEAD
        if size > self.max_frame:
            raise ValueError(f"{method}: a request of {size} bytes, over {self.max_frame}")
        self._not_serving()
        slot = _Slot()
        with trio.move_on_after(timeout):
            conn = await self._connection(to)
            assert conn.outbox is not None and conn.session is not None
            # From here to the write, no checkpoint: the connection stays alive, and frames
            # leave in the order of their sequence numbers.
            rid = conn.next_rid
            conn.next_rid += 1
            conn.pending[rid] = slot
            conn.last_used = trio.current_time()
            plaintext = frames.pack_request(conn.send_seq, rid, packed_method, packed_args)
            conn.send_seq += 1
            conn.outbox.write(frames.frame(self._keys.seal(plaintext, conn.session.request_aad)))
            try:
                await slot.event.wait()
            finally:
                conn.pending.pop(rid, None)
            if conn.outbox.backlog > conn.outbox.high_water:
                await conn.outbox.wait_room()  # a peer slow to read: callers wait, not memory
        if not slot.event.is_set():  # timed out (a reply that came anyway was taken below)
            self.counters["call.timeout"] += 1
            raise PeerUnreachable(f"{to}: no reply to {method} within {timeout} s")
        if slot.ok:
            self.counters["call.ok"] += 1
            return slot.value
        if slot.value is None:
            self.counters["call.unreachable"] += 1
            raise PeerUnreachable(f"{to}: connection lost ({conn.ended}) during {method}")
        self.counters["call.remote-error"] += 1
        raise RemoteError(*slot.value)

    # -- running ------------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[PeerAddr] = trio.TASK_STATUS_IGNORED):
        """Bind, report ``addr`` to ``task_status``, and serve until cancelled (or
        :meth:`aclose`); then every connection is closed. Runs once per transport."""
        if self._state != "new":
            raise RuntimeError("a transport serves once")
        tcp, udp = self._bind()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._state = "serving"
                self._udp = udp
                listener = trio.SocketListener(trio.socket.from_stdlib_socket(tcp))
                nursery.start_soon(self._accept_loop, listener, nursery)
                nursery.start_soon(self._udp_loop, trio.socket.from_stdlib_socket(udp))
                log.info("transport of %s serving on %s:%d", self.world, *self.addr)
                task_status.started(self.addr)
        finally:
            self._state = "closed"
            self._nursery = None
            self._udp = None
            tcp.close()
            udp.close()
            self._stopped.set()

    async def aclose(self) -> None:
        """Stop serving (as if :meth:`serve` were cancelled) and wait until it has."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
            await self._stopped.wait()

    def stats(self) -> dict[str, Any]:
        """For a ``.dreki`` status file: JSON-able."""
        return {
            "world": self.world,
            "addr": f"{self.addr[0]}:{self.addr[1]}",
            "state": self._state,
            "keys": self._keys.ring.ids(),
            "connections": {"in": self._conns_in, "out": len(self._out)},
            "calls_pending": sum(len(c.pending) for c in self._out.values()),
            "datagram_ids_remembered": len(self._replay),
            "counters": dict(sorted(self.counters.items())),
        }

    def _not_serving(self) -> None:
        """Raise unless serving: RuntimeError before serve() (a bug), PeerUnreachable after."""
        if self._state == "new":
            raise RuntimeError("the transport is not serving yet: start serve() first")
        if self._state == "closed":
            raise PeerUnreachable("the transport is closed")

    def _bind(self) -> tuple[socket.socket, socket.socket]:
        host, port = self.addr
        family = _family(host)
        for _ in range(BIND_ATTEMPTS if port == 0 else 1):
            tcp = socket.socket(family, socket.SOCK_STREAM)
            udp = socket.socket(family, socket.SOCK_DGRAM)
            try:
                # TCP only: a restarted peer takes its port back despite TIME_WAIT connections
                # (on UDP, SO_REUSEADDR would let two sockets share the port).
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((host, port))
                tcp.listen(LISTEN_BACKLOG)
                real = tcp.getsockname()[1]
                udp.bind((host, real))
            except OSError as e:
                tcp.close()
                udp.close()
                if port == 0 and e.errno == errno.EADDRINUSE:
                    continue  # UDP has that port elsewhere: another one
                raise
            self.addr = (host, real)
            return tcp, udp
        raise OSError(errno.EADDRINUSE, f"no port free for both TCP and UDP on {host}")

    def _drop(self, proto: str, reason: str, peer: object) -> None:
        self.counters[f"{proto}.dropped.{reason}"] += 1
        log.debug("%s from %s dropped: %s", proto, peer, reason)

    # -- calls: the client side ---------------------------------------------------------------

    async def _connection(self, to: PeerAddr) -> _Outgoing:
        """The pooled connection to ``to``, opened if there is none (PeerUnreachable when it
        cannot be). Returned without a checkpoint after checking it is alive, so the caller
        can send its request before anything ends it."""
        conn = self._out.get(to)
        if conn is not None and conn.established and conn.ended is None:
            return conn  # the common case, without the checkpoint of an Event.wait()
        assert self._nursery is not None
        for _ in range(2):  # a pooled connection may end while we wait: one more try
            conn = self._out.get(to)
            if conn is None:
                conn = self._out[to] = _Outgoing(to)
                self._nursery.start_soon(self._run_outgoing, conn)
            await conn.ready.wait()
            if conn.ended is None:
                return conn
            if not conn.established:
                break
        raise PeerUnreachable(f"{to}: {conn.ended}")

    def _end(self, conn: _Outgoing, why: str) -> None:
        """Take the connection out of the pool, fail its calls, stop its task. Synchronous, so
        no new call can slip in between."""
        if conn.ended is not None:
            return
        conn.ended = why
        if self._out.get(conn.to) is conn:
            del self._out[conn.to]
        for slot in conn.pending.values():
            slot.event.set()  # value None: PeerUnreachable
        conn.pending.clear()
        if conn.outbox is not None:
            conn.outbox.close()
        conn.cancel_scope.cancel()
        conn.ready.set()

    async def _run_outgoing(self, conn: _Outgoing) -> None:
        decoder = FrameDecoder(self.max_frame)
        stream: trio.SocketStream | None = None
        try:
            with conn.cancel_scope:
                try:
                    with trio.fail_after(self.limits.connect_timeout):
                        stream = await self._open(conn.to)
                        hello = frames.client_hello(self.addr[1])
                        await stream.send_all(hello)
                        server_hello = await self._read_exact(
                            stream, decoder, frames.SERVER_HELLO_BYTES
                        )
                        frames.check_server_hello(server_hello)
                except (OSError, trio.TooSlowError, trio.BrokenResourceError, Malformed) as e:
                    self.counters["tcp.connect-failed"] += 1
                    self._end(conn, f"cannot connect: {_describe(e)}")
                    return
                conn.outbox = Outbox(stream.socket)
                conn.session = Session.of(self._world, hello, server_hello)
                conn.established = True
                conn.last_used = trio.current_time()
                self.counters["tcp.connected"] += 1
                conn.ready.set()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_requests, conn, conn.outbox)
                    await self._read_replies(conn, stream, decoder)
        finally:
            self._end(conn, "closed")
            if stream is not None:
                await trio.aclose_forcefully(stream)

    async def _write_requests(self, conn: _Outgoing, outbox: Outbox) -> None:
        why = await outbox.run(self.limits.send_timeout)
        if why != "closed":
            self.counters[f"tcp.closed.{why}"] += 1
        self._end(conn, why)

    async def _open(self, to: PeerAddr) -> trio.SocketStream:
        sock = trio.socket.socket(_family(to[0]), socket.SOCK_STREAM)
        try:
            local = self.addr[0]
            if local not in ("0.0.0.0", "::", ""):
                # From the address peers know us by, even on a machine with several.
                await sock.bind((local, 0))
            await sock.connect(to)
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)  # which sets TCP_NODELAY: no Nagle delay on requests

    async def _read_replies(
        self, conn: _Outgoing, stream: trio.SocketStream, decoder: FrameDecoder
    ) -> None:
        """Hand each reply to its caller until the connection ends (always through _end)."""
        assert conn.session is not None
        idle = self.limits.idle_timeout / 2
        while True:
            # The deadline is not pushed back at every frame (that costs more than the rest
            # of a reply's handling): when it passes, the time of the last call decides.
            with trio.CancelScope(deadline=conn.last_used + idle):
                while True:
                    try:
                        body = await self._next_frame(stream, decoder)
                        if body is None:
                            self._end(conn, "closed by peer")
                            return
                        plaintext = self._keys.open(body, conn.session.reply_aad)
                        seq, rid, ok, value = frames.unpack_reply(plaintext)
                        if seq != conn.recv_seq:
                            raise Malformed(frames.REPLAY)
                    except Malformed as e:
                        self._drop("tcp", e.reason, conn.to)
                        self._end(conn, e.reason)
                        return
                    except (OSError, trio.BrokenResourceError):
                        self.counters["tcp.closed.reset"] += 1
                        self._end(conn, "reset by peer")
                        return
                    conn.recv_seq += 1
                    slot = conn.pending.pop(rid, None)
                    if slot is None:
                        self.counters["tcp.late-replies"] += 1  # its caller gave up
                    else:
                        slot.ok, slot.value = ok, value
                        slot.event.set()
            if not conn.pending and trio.current_time() - conn.last_used >= idle:
                self.counters["tcp.closed.idle"] += 1
                self._end(conn, "idle")
                return

    # -- calls: the server side ---------------------------------------------------------------

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as e:  # out of file descriptors or memory: let some close
                self.counters["tcp.accept-error"] += 1
                log.warning("accept failed: %s", e)
                await trio.sleep(ACCEPT_PAUSE)
                continue
            try:
                host = stream.socket.getpeername()[0]
            except OSError:  # gone already
                await trio.aclose_forcefully(stream)
                continue
            h = self._hosts.get(host)
            if self._conns_in >= self.limits.max_conns:
                self.counters["tcp.refused.total"] += 1
            elif h is not None and h.conns >= self.limits.max_conns_per_host:
                self.counters["tcp.refused.limit"] += 1
            else:
                if h is None:
                    h = self._hosts[host] = _Host()
                h.conns += 1
                self._conns_in += 1
                self.counters["tcp.accepted"] += 1
                nursery.start_soon(self._serve_connection, stream, host, h)
                continue
            log.debug("connection from %s refused: over the limit", host)
            await trio.aclose_forcefully(stream)

    async def _serve_connection(self, stream: trio.SocketStream, host: str, h: _Host) -> None:
        try:
            await self._serve_frames(stream, host, h)
        finally:
            self._conns_in -= 1
            h.conns -= 1
            if h.conns == 0:
                del self._hosts[host]
            await trio.aclose_forcefully(stream)

    async def _serve_frames(self, stream: trio.SocketStream, host: str, h: _Host) -> None:
        decoder = FrameDecoder(self.max_frame)
        try:
            with trio.move_on_after(self.limits.handshake_timeout) as handshake:
                hello = frames.server_hello()
                await stream.send_all(hello)
                client_hello = await self._read_exact(stream, decoder, frames.CLIENT_HELLO_BYTES)
                peer = (host, frames.hello_port(client_hello))
                body = await self._next_frame(stream, decoder)
            if handshake.cancelled_caught:
                self._drop("tcp", "handshake-timeout", host)
                return
            if body is None:
                raise Malformed(frames.TRUNCATED)
        except Malformed as e:
            self._drop("tcp", e.reason, host)
            return
        except (OSError, trio.BrokenResourceError):
            self.counters["tcp.closed.reset"] += 1
            return
        outbox = Outbox(stream.socket)
        conn = _Incoming(stream, outbox, Session.of(self._world, client_hello, hello), peer, h)
        conn.last_frame = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_replies, outbox, nursery.cancel_scope)
                await self._serve_requests(conn, decoder, body, nursery)
        finally:
            outbox.close()

    async def _write_replies(self, outbox: Outbox, connection: trio.CancelScope) -> None:
        why = await outbox.run(self.limits.send_timeout)
        if why == STALLED:
            self._drop("tcp", why, "a client")
        elif why != "closed":
            self.counters[f"tcp.closed.{why}"] += 1
        connection.cancel()

    async def _serve_requests(
        self, conn: _Incoming, decoder: FrameDecoder, body: bytes, nursery: trio.Nursery
    ) -> None:
        """Serve the connection's requests in ``nursery`` until it ends; then cancel those
        still running (no reply could go out) and the writer. Raises nothing: inside a
        nursery's body an exception would come out wrapped in an ExceptionGroup."""
        try:
            await self._read_requests(conn, decoder, body, nursery)
        except Malformed as e:
            self._drop("tcp", e.reason, conn.peer)
        except (OSError, trio.BrokenResourceError):
            self.counters["tcp.closed.reset"] += 1
        finally:
            nursery.cancel_scope.cancel()

    async def _read_requests(
        self, conn: _Incoming, decoder: FrameDecoder, body: bytes | None, nursery: trio.Nursery
    ) -> None:
        """Start serving each request frame, ``body`` the first; return at the end of the
        stream or after an idle timeout; raise Malformed on a frame to drop."""
        idle = self.limits.idle_timeout
        per_conn, per_host = self.limits.max_inflight_per_conn, self.limits.max_inflight_per_host
        h = conn.host
        while True:
            # As for replies: the deadline moves only when it passes, after the last frame.
            with trio.CancelScope(deadline=conn.last_frame + idle):
                while True:
                    if body is None:
                        body = await self._next_frame(conn.stream, decoder)
                        if body is None:
                            return
                    plaintext = self._keys.open(body, conn.session.request_aad)
                    seq, rid, method, args = frames.unpack_request(plaintext)
                    if seq != conn.recv_seq:
                        raise Malformed(frames.REPLAY)
                    conn.recv_seq += 1
                    conn.last_frame = trio.current_time()
                    body = None
                    # Backpressure: past the limits, stop reading; the client's writes wait.
                    while conn.running >= per_conn or h.running >= per_host:
                        self.counters["tcp.backpressure"] += 1
                        await h.finished.wait()
                    conn.running += 1
                    h.running += 1
                    nursery.start_soon(self._serve_request, conn, rid, method, args)
            if conn.running == 0 and trio.current_time() - conn.last_frame >= idle:
                self.counters["tcp.closed.idle"] += 1
                return

    async def _serve_request(self, conn: _Incoming, rid: int, method: str, args: Any) -> None:
        try:
            ok, value = await self._answer(conn.peer, method, args)
            await conn.outbox.wait_room()
            plaintext = frames.pack_reply(conn.send_seq, rid, ok, value)
            conn.send_seq += 1
            conn.outbox.write(frames.frame(self._keys.seal(plaintext, conn.session.reply_aad)))
        finally:
            conn.running -= 1
            h = conn.host
            h.running -= 1
            h.finished.set()
            h.finished = trio.Event()

    async def _answer(self, peer: PeerAddr, method: str, args: Any) -> tuple[bool, bytes]:
        """The reply to a request: (True, packed result) or (False, packed [code, message])."""
        handler = self._handlers.get(method)
        if handler is None:
            self.counters["rpc.unknown-method"] += 1
            return False, _error(errno.ENOSYS, f"no method {method[:100]!r}")
        try:
            with trio.fail_after(self.limits.handler_timeout):
                result = await handler(peer, args)
            packed = frames.pack(result)
        except RemoteError as e:
            self.counters["rpc.remote-error"] += 1
            code = e.code if type(e.code) is int else errno.EIO
            return False, _error(code, str(e))
        except trio.TooSlowError:
            self.counters["rpc.timeout"] += 1
            log.warning(
                "%s from %s: no answer within %s s", method, peer, self.limits.handler_timeout
            )
            return False, _error(errno.ETIMEDOUT, f"{method}: timed out")
        except Exception as e:
            self.counters["rpc.eio"] += 1
            log.exception("%s from %s failed", method, peer)
            return False, _error(errno.EIO, f"{method}: internal error ({type(e).__name__})")
        if frames.PAYLOAD_SLACK + len(packed) + OVERHEAD > self.max_frame:
            self.counters["rpc.reply-too-large"] += 1
            log.warning("%s from %s: a reply of %d bytes is too large", method, peer, len(packed))
            return False, _error(errno.EMSGSIZE, f"{method}: reply too large")
        self.counters["rpc.served"] += 1
        return True, packed

    # -- streams ------------------------------------------------------------------------------

    async def _next_frame(self, stream: trio.SocketStream, decoder: FrameDecoder) -> bytes | None:
        """The next frame's body; None at the end of the stream between frames; Malformed
        (OVERSIZED, TRUNCATED) otherwise."""
        while True:
            body = decoder.next()
            if body is not None:
                return body
            if decoder.oversized:
                raise Malformed(frames.OVERSIZED)
            data = await stream.receive_some(RECEIVE_BYTES)
            if not data:
                if decoder.buffered():
                    raise Malformed(frames.TRUNCATED)
                return None
            decoder.feed(data)

    async def _read_exact(self, stream: trio.SocketStream, decoder: FrameDecoder, n: int) -> bytes:
        while True:
            out = decoder.take(n)
            if out is not None:
                return out
            data = await stream.receive_some(RECEIVE_BYTES)
            if not data:
                raise Malformed(frames.TRUNCATED)
            decoder.feed(data)

    # -- datagrams ----------------------------------------------------------------------------

    async def _udp_loop(self, sock: trio.socket.SocketType) -> None:
        while True:
            try:
                data, source = await sock.recvfrom(UDP_RECEIVE_BYTES)
            except OSError:  # e.g. ECONNREFUSED: an ICMP error about an earlier sendto
                self.counters["udp.receive-error"] += 1
                continue
            self._datagram(data, (source[0], source[1]))

    def _datagram(self, data: bytes, source: PeerAddr) -> None:
        try:
            if len(data) > MAX_DATAGRAM:
                raise Malformed(frames.OVERSIZED)
            plaintext = self._keys.open(data, self._udp_aad)
            sent_ms, ident, msg = frames.unpack_datagram(plaintext)
            stale = self._replay.check(sent_ms, ident)
            if stale is not None:
                raise Malformed(stale)
        except Malformed as e:
            self._drop("udp", e.reason, source)
            return
        self.counters["udp.received"] += 1
        handler = self._on_datagram
        if handler is None:
            self.counters["udp.unhandled"] += 1
            return
        try:
            handler(source, msg)
        except Exception:
            self.counters["udp.handler-error"] += 1
            log.exception("datagram handler failed on a datagram from %s", source)


def _error(code: int, message: str) -> bytes:
    return frames.pack([code, message[:MAX_ERROR_MESSAGE]])


def _describe(e: BaseException) -> str:
    if isinstance(e, Malformed):
        return f"not a drekifs transport ({e.reason})"
    if isinstance(e, trio.TooSlowError):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return repr(e)
