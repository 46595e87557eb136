"""The serving side of the transport: accepting connections, authenticating them, and serving
their requests concurrently, within :class:`~drekifs.cluster.limits.Limits`.

A connection gets a handshake timeout to send its hello and its proof of key (a small sealed
frame, see frames.py), and is only then allowed frames of ``max_frame`` bytes; it is closed
after the idle timeout with nothing in flight. Its requests run as tasks in the connection's
nursery; past the per-connection or per-peer limit of requests in flight, the connection is not
read until one finishes (backpressure on the client, nothing refused). Anything wrong on a
connection — junk, a bad frame, a replay — is counted and ends that connection only. Which
connections are kept, in the handshake and after it, is admission.py's decision: a handshake
is evicted for a newer one rather than a new connection refused.
"""

from __future__ import annotations

import errno
import logging
import socket
from dataclasses import dataclass, field
from typing import Any

import trio

from . import frames
from .admission import EVICTED, OVER_HOST, OVER_PEER, OVER_TOTAL, Admission, Ticket
from .endpoint import BROKEN, Endpoint, next_frame, read_exact
from .frames import FrameDecoder, Malformed, Session
from .keyring import OVERHEAD
from .net import CallHandler, PeerAddr, RemoteError, addr_text
from .outbox import STALLED, Outbox

log = logging.getLogger(__name__)

ACCEPT_PAUSE = 0.1  # after accept() fails for want of descriptors or memory
ACCEPT_BATCH = 64  # connections accepted at one wake-up, at most, before others run
# accept() errors about one connection only, which went away before we took it (the list
# trio's SocketListener ignores, and Linux's accept(2) advises to retry on).
_ACCEPT_TRANSIENT = {
    getattr(errno, name)
    for name in [
        "EPERM",
        "ECONNABORTED",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
        "ENOSR",
        "ESOCKTNOSUPPORT",
        "EPROTONOSUPPORT",
        "ETIMEDOUT",
        "ECONNRESET",
    ]
    if hasattr(errno, name)
}
MAX_ERROR_MESSAGE = 1000  # characters of an error message sent back
_OVER = {
    OVER_TOTAL: "max_conns authenticated connections reached",
    OVER_HOST: "max_conns_per_host authenticated connections from its address reached",
    OVER_PEER: "max_conns_per_peer connections of this peer reached",
}


@dataclass(eq=False)
class _Peer:
    """What one authenticated peer (address and declared port) has running on this server."""

    conns: int = 0
    running: int = 0  # requests being served, all its connections together
    finished: trio.Event = field(default_factory=trio.Event)  # set (and replaced) as one ends


@dataclass(eq=False)
class _Connection:
    """An accepted connection, authenticated."""

    stream: trio.SocketStream
    outbox: Outbox
    session: Session
    peer: PeerAddr  # the client's IP and the listening port it declared
    running_of_peer: _Peer
    last_frame: float  # trio time of the last request
    send_seq: int = 0
    recv_seq: int = 1  # the proof was 0
    running: int = 0  # requests being served


class Server:
    def __init__(self, ep: Endpoint) -> None:
        self.ep = ep
        self.handlers: dict[str, CallHandler] = {}
        self.inline: set[str] = set()  # methods answered in the connection's reader task
        self.admission = Admission(ep.limits)
        self._peers: dict[PeerAddr, _Peer] = {}

    def connections(self) -> int:
        return self.admission.authenticated() + self.admission.handshakes()

    async def accept_loop(self, listening: socket.socket, nursery: trio.Nursery) -> None:
        """Accept connections off ``listening`` (a stdlib socket) as they come, up to
        ACCEPT_BATCH at each wake-up: under a flood of connections the accept queue is
        drained that much faster (a connection waits behind all those queued before it)."""
        counters = self.ep.counters
        listening.setblocking(False)
        fd = listening.fileno()
        while True:
            await trio.lowlevel.wait_readable(fd)
            for _ in range(ACCEPT_BATCH):
                try:
                    sock, source = listening.accept()
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno in _ACCEPT_TRANSIENT:  # the client gave up meanwhile
                        continue
                    # Out of descriptors or memory.
                    counters["tcp.accept-error"] += 1
                    self.ep.warn(("tcp accept", e.errno), "accept failed: %s", e)
                    # A handshake's descriptor is worth less than a new connection's.
                    evicted = self.admission.evict_oldest()
                    if evicted is None:
                        await trio.sleep(ACCEPT_PAUSE)  # let some connections close
                    else:
                        self._evicted(evicted)
                    break
                self._admit(sock, source[0], nursery)

    def _admit(self, sock: socket.socket, host: str, nursery: trio.Nursery) -> None:
        ticket, evicted = self.admission.arrive(host)
        ticket.handle = trio.CancelScope()  # cancelled, even before it starts, to evict
        if evicted is not None:
            self._evicted(evicted)
        self.ep.counters["tcp.accepted"] += 1
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        nursery.start_soon(self._connection, stream, ticket)

    def _evicted(self, ticket: Ticket) -> None:
        ticket.handle.cancel()
        self.ep.refuse("handshake-evicted", ticket.host, "max_handshakes reached")

    async def _connection(self, stream: trio.SocketStream, ticket: Ticket) -> None:
        try:
            with ticket.handle:
                await self._serve(stream, ticket)
        finally:
            self.admission.leave(ticket)
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.SocketStream, ticket: Ticket) -> None:
        ep, host = self.ep, ticket.host
        decoder = FrameDecoder(frames.AUTH_FRAME_MAX)  # until the client has proved its key
        try:
            with trio.move_on_after(ep.limits.handshake_timeout) as handshake:
                hello = frames.server_hello()
                await stream.send_all(hello)
                client_hello = await read_exact(stream, decoder, frames.CLIENT_HELLO_BYTES)
                peer = (host, frames.hello_port(client_hello))
                session = Session.of(ep.world, client_hello, hello)
                proof = await next_frame(stream, decoder)
            if handshake.cancelled_caught:
                ep.drop_handshake("handshake-timeout", host)
                return
            if proof is None:
                raise Malformed(frames.TRUNCATED)
            frames.check_proof(ep.keys.open(proof, session.request_aad))
        except Malformed as e:
            ep.drop_handshake(e.reason, host)
            return
        except BROKEN:
            ep.counters["tcp.closed.reset"] += 1
            return
        over = self.admission.authenticate(ticket, peer)
        if over == EVICTED:  # meanwhile: counted and logged as such
            return
        if over is not None:
            ep.refuse(over, addr_text(peer), _OVER[over])
            return
        decoder.max_frame = ep.max_frame
        p = self._peers.get(peer)
        if p is None:
            p = self._peers[peer] = _Peer()
        p.conns += 1
        try:
            with trio.CancelScope() as scope:
                outbox = Outbox(stream.socket, lambda why: self._write_failed(why, peer, scope))
                conn = _Connection(stream, outbox, session, peer, p, trio.current_time())
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(outbox.run, ep.limits.send_timeout)
                        await self._serve_requests(conn, decoder, nursery)
                finally:
                    outbox.close()
        finally:
            p.conns -= 1
            if p.conns == 0:
                del self._peers[peer]

    def _write_failed(self, why: str, peer: PeerAddr, connection: trio.CancelScope) -> None:
        if why == STALLED:
            self.ep.drop("tcp", why, peer)
        else:
            self.ep.counters[f"tcp.closed.{why}"] += 1
        connection.cancel()

    async def _serve_requests(
        self, conn: _Connection, decoder: FrameDecoder, nursery: trio.Nursery
    ) -> None:
        """Serve the connection's requests in ``nursery`` until it ends; then cancel those
        still running (no reply could go out) and the writer. Raises nothing: from a nursery's
        body an exception would come out wrapped in an ExceptionGroup."""
        try:
            await self._read_requests(conn, decoder, nursery)
        except Malformed as e:
            self.ep.drop("tcp", e.reason, conn.peer)
        except BROKEN:
            self.ep.counters["tcp.closed.reset"] += 1
        finally:
            nursery.cancel_scope.cancel()

    async def _read_requests(
        self, conn: _Connection, decoder: FrameDecoder, nursery: trio.Nursery
    ) -> None:
        """Start serving each request; return at the end of the stream or when idle; raise
        Malformed on a frame to drop."""
        ep, h, aad = self.ep, conn.running_of_peer, conn.session.request_aad
        idle = ep.limits.idle_timeout
        per_conn, per_peer = ep.limits.max_inflight_per_conn, ep.limits.max_inflight_per_peer
        checked = conn.last_frame
        while True:
            # The deadline is not pushed back at every frame (that costs more than the rest of
            # a request's reading): when it passes, the time of the last frame decides.
            with trio.CancelScope(deadline=max(conn.last_frame, checked) + idle):
                while True:
                    while conn.running >= per_conn or h.running >= per_peer:
                        ep.counters["tcp.backpressure"] += 1
                        await h.finished.wait()
                    body = await next_frame(conn.stream, decoder)
                    if body is None:
                        return
                    seq, rid, method, args = frames.unpack_request(ep.keys.open(body, aad))
                    if seq != conn.recv_seq:
                        raise Malformed(frames.REPLAY)
                    conn.recv_seq += 1
                    conn.last_frame = trio.current_time()
                    conn.running += 1
                    h.running += 1
                    if method in self.inline:
                        # Answers at once, without waiting on anything: no task of its own (a
                        # task costs a turn of the scheduler, which is most of a small call).
                        await self._serve_request(conn, rid, method, args, True)
                    else:
                        nursery.start_soon(self._serve_request, conn, rid, method, args, False)
            checked = trio.current_time()
            if conn.running == 0 and checked - conn.last_frame >= idle:
                ep.counters["tcp.closed.idle"] += 1
                return

    async def _serve_request(
        self, conn: _Connection, rid: int, method: str, args: Any, inline: bool
    ) -> None:
        try:
            ok, value = await self._answer(conn.peer, method, args, inline)
            await conn.outbox.wait_room()
            plaintext = frames.pack_reply(conn.send_seq, rid, ok, value)
            conn.send_seq += 1
            sealed = self.ep.keys.seal(plaintext, conn.session.reply_aad)
            conn.outbox.write(frames.frame(sealed))
        finally:
            conn.running -= 1
            h = conn.running_of_peer
            h.running -= 1
            h.finished.set()
            h.finished = trio.Event()

    async def _answer(
        self, peer: PeerAddr, method: str, args: Any, inline: bool
    ) -> tuple[bool, bytes]:
        """The reply to a request: (True, packed result) or (False, packed [code, message]).
        ``inline``: a handler that never waits, run without a deadline of its own."""
        counters = self.ep.counters
        handler = self.handlers.get(method)
        if handler is None:
            counters["rpc.unknown-method"] += 1
            return False, _error(errno.ENOSYS, f"no method {method[:100]!r}")
        timeout = self.ep.limits.handler_timeout
        try:
            if inline:
                result = await handler(peer, args)  # never waits: no deadline to keep
            else:
                # A plain scope, not fail_after (a generator-based context manager): this is
                # a tenth of a small call's cost on the serving side.
                with trio.CancelScope(relative_deadline=timeout) as scope:
                    result = await handler(peer, args)
                if scope.cancelled_caught:
                    counters["rpc.timeout"] += 1
                    log.warning(
                        "%s from %s: no answer within %s s", method, addr_text(peer), timeout
                    )
                    return False, _error(errno.ETIMEDOUT, f"{method}: timed out")
            packed = frames.pack(result)
        except RemoteError as e:
            counters["rpc.remote-error"] += 1
            return False, _error(e.code if type(e.code) is int else errno.EIO, str(e))
        except trio.TooSlowError:  # a deadline of the handler's own
            counters["rpc.timeout"] += 1
            return False, _error(errno.ETIMEDOUT, f"{method}: timed out")
        except Exception as e:
            counters["rpc.eio"] += 1
            log.exception("%s from %s failed", method, addr_text(peer))
            return False, _error(errno.EIO, f"{method}: internal error ({type(e).__name__})")
        if frames.PAYLOAD_SLACK + len(packed) + OVERHEAD > self.ep.max_frame:
            counters["rpc.reply-too-large"] += 1
            log.warning(
                "%s from %s: a reply of %d bytes is too large", method, addr_text(peer), len(packed)
            )
            return False, _error(errno.EMSGSIZE, f"{method}: reply too large")
        counters["rpc.served"] += 1
        return True, packed


def _error(code: int, message: str) -> bytes:
    return frames.pack([code, message[:MAX_ERROR_MESSAGE]])
