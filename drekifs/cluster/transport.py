"""The real :class:`~drekifs.cluster.net.Network`: sealed msgpack frames over TCP for calls,
sealed datagrams over UDP, both on one port. The wire format is in frames.py, the calling side
in rpcclient.py, the serving side in rpcserver.py; this module binds the sockets, runs it all,
and handles datagrams.

Whatever arrives that is not well-formed, authentic and fresh is dropped and counted in
``counters`` (``tcp.dropped.<reason>``, ``udp.dropped.<reason>``, reasons in frames.py and
replay.py), and a connection that sent it is closed; nothing a remote sends raises out of a loop
or holds resources past a timeout (limits.py). Every task runs in :meth:`Transport.serve`'s
nursery: cancelling it closes every socket and fails every call in flight with PeerUnreachable.

Counters (``stats()["counters"]``)::

    call.ok  call.remote-error  call.timeout  call.unreachable        calls made
    rpc.served  rpc.remote-error  rpc.eio  rpc.timeout                calls served
    rpc.unknown-method  rpc.reply-too-large
    tcp.connected  tcp.connect-failed  tcp.late-replies               outgoing connections
    tcp.accepted  tcp.accept-error                                     incoming ones
    tcp.refused.{handshake-evicted,total,host,peer}                   (admission.py)
    tcp.closed.idle  tcp.closed.reset  tcp.backpressure
    tcp.dropped.{junk,truncated,oversized,foreign-key,bad-auth,not-msgpack,shape,replay,
                 handshake-timeout,send-timeout}
    udp.sent  udp.send-failed  udp.received  udp.unhandled  udp.handler-error  udp.receive-error
    udp.dropped.{junk,oversized,foreign-key,bad-auth,not-msgpack,shape,stale,replay,
                 replay-cache-full,misdirected}
    udp.{hello,welcome,retry}.sent  udp.queued  udp.queue-dropped  udp.queue-expired
    udp.receiver-restarted                        datagrams' receivers (receivers.py)
    keyring.reloaded
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import trio

from ..stores.keys import MAX_FRAME
from . import frames
from .endpoint import Endpoint
from .frames import Keys, Malformed
from .keyring import OVERHEAD, KeyRing
from .limits import Limits
from .net import MAX_DATAGRAM, CallHandler, DatagramHandler, PeerAddr, PeerUnreachable, addr_text
from .receivers import Receivers
from .replay import ReplayGuard
from .rpcclient import Caller
from .rpcserver import Server

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn; see limits.max_handshakes
BIND_ATTEMPTS = 20  # with port 0: ports tried to find one free for both TCP and UDP
UDP_RECEIVE_BYTES = 1 << 16  # more than any datagram, so an oversized one shows as such
# What sealing adds to a datagram's message: kind and receiver, the key ring's, the stamp.
DATAGRAM_OVERHEAD = frames.DATAGRAM_HEAD + OVERHEAD + frames.STAMP.size


def _new_id() -> int:
    return int.from_bytes(os.urandom(8), "big")


def _new_instance() -> bytes:
    while True:  # never the "not known" value
        instance = os.urandom(frames.INSTANCE_BYTES)
        if instance != frames.NO_INSTANCE:
            return instance


class Transport:
    """One peer's network endpoint: TCP and UDP on ``bind``, an IP address (v4 or v6) and a
    port; port 0 picks one, and ``addr`` holds it once :meth:`serve` has started.

    ``max_frame`` bounds a sealed TCP frame either way: a larger request is refused when sent
    (ValueError), a larger reply answered EMSGSIZE, and a larger frame received drops the
    connection. ``wall_clock`` stamps and judges datagrams (replaceable to test clock skew).

    ``instance`` is drawn anew for each transport, so for each life of a peer: datagrams are
    sealed for their receiver's instance (frames.py), and one captured for another peer, or for
    this one before it restarted, does not reach the handler.
    """

    def __init__(
        self,
        world: str,
        keyring: KeyRing,
        bind: PeerAddr,
        *,
        max_frame: int = MAX_FRAME,
        limits: Limits | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.world = world
        self.addr: PeerAddr = bind
        self.max_frame = max_frame
        self.limits = limits or Limits()
        self.counters: Counter[str] = Counter()
        self._ep = Endpoint(
            world.encode(), Keys.of(keyring), self.limits, max_frame, bind, self.counters
        )
        self._caller = Caller(self._ep)
        self._server = Server(self._ep)
        self._udp_aad = frames.datagram_aad(self._ep.world)
        self._wall = wall_clock
        self._replay = ReplayGuard(
            self.limits.replay_window, self.limits.replay_cache, wall_clock=wall_clock
        )
        self.instance = _new_instance()
        self._receivers = Receivers(self.counters)
        self._on_datagram: DatagramHandler | None = None
        self._state = "new"  # -> "serving" -> "closed"
        self._nursery: trio.Nursery | None = None
        self._stopped = trio.Event()
        self._udp: socket.socket | None = None

    # -- the Network interface ----------------------------------------------------------------

    def register(self, method: str, handler: CallHandler, *, inline: bool = False) -> None:
        """Serve ``method``. ``inline``: the handler never waits (no I/O, no lock), so it runs
        in the connection's reader task, saving a task per call; a slow one would hold up the
        other calls of its connection."""
        self._server.handlers[method] = handler
        if inline:
            self._server.inline.add(method)
        else:
            self._server.inline.discard(method)

    def on_datagram(self, handler: DatagramHandler) -> None:
        self._on_datagram = handler

    async def call(self, to: PeerAddr, method: str, args: Any, *, timeout: float) -> Any:
        if not timeout >= 0:  # NaN too: a deadline nothing would ever reach
            raise ValueError(f"{method}: timeout must be a number >= 0, not {timeout!r}")
        packed_method, packed_args = frames.pack(method), frames.pack(args)
        size = frames.PAYLOAD_SLACK + len(packed_method) + len(packed_args) + OVERHEAD
        if size > self.max_frame:
            raise ValueError(f"{method}: a request of {size} bytes, over {self.max_frame}")
        self._check_serving()
        return await self._caller.call(to, method, packed_method, packed_args, timeout)

    def send_datagram(self, to: PeerAddr, msg: Any) -> None:
        body = frames.pack(msg)
        if len(body) + DATAGRAM_OVERHEAD > MAX_DATAGRAM:
            raise ValueError(
                f"a datagram of {len(body) + DATAGRAM_OVERHEAD} bytes sealed, over {MAX_DATAGRAM}"
            )
        if self._udp is None and self._state == "new":
            raise RuntimeError("the transport is not serving yet: start serve() first")
        self._send_body(to, body)

    def _send_body(self, to: PeerAddr, body: bytes) -> None:
        instance = self._receivers.instance(to)
        if instance is None:  # its instance first: the message waits for the WELCOME
            self._hello(to, body)
        else:
            self._send_data(to, instance, body)

    def _send_data(self, to: PeerAddr, instance: bytes, body: bytes) -> None:
        ident = _new_id()
        if self._seal_and_send(frames.DATA, instance, to, ident, body):
            self._receivers.sent(ident, to, instance, body)
            self.counters["udp.sent"] += 1

    def _hello(self, to: PeerAddr, body: bytes | None) -> None:
        ident = _new_id()
        if self._receivers.wait(to, body, ident):
            self._control(frames.HELLO, frames.NO_INSTANCE, to, ident, self.instance)

    def _control(self, kind: int, instance: bytes, to: PeerAddr, ident: int, body: bytes) -> None:
        if self._seal_and_send(kind, instance, to, ident, body):
            self.counters[_CONTROL_SENT[kind]] += 1

    def _seal_and_send(
        self, kind: int, instance: bytes, to: PeerAddr, ident: int, body: bytes
    ) -> bool:
        if self._udp is None:  # closed: as lost as any other datagram
            self.counters["udp.send-failed"] += 1
            return False
        plaintext = frames.pack_datagram(int(self._wall() * 1000), ident, body)
        head = frames.datagram_head(kind, instance)
        try:
            self._udp.sendto(head + self._ep.keys.seal(plaintext, self._udp_aad + head), to)
        except OSError:  # best effort: a full buffer, no route...
            self.counters["udp.send-failed"] += 1
            return False
        return True

    # -- running ------------------------------------------------------------------------------

    def set_keyring(self, keyring: KeyRing) -> None:
        """Seal with this ring's primary and open with all its keys from now on, on open
        connections too: one step of a key rotation (keyring.py), without downtime."""
        self._ep.keys = Keys.of(keyring)
        self.counters["keyring.reloaded"] += 1

    async def serve(self, *, task_status: trio.TaskStatus[PeerAddr] = trio.TASK_STATUS_IGNORED):
        """Bind, report ``addr`` to ``task_status``, and serve until cancelled (or
        :meth:`aclose`); then every connection is closed. Runs once per transport."""
        if self._state != "new":
            raise RuntimeError("a transport serves once")
        tcp, udp = self._bind()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = self._caller.nursery = nursery
                self._state = "serving"
                self._udp = udp
                nursery.start_soon(self._server.accept_loop, tcp, nursery)
                nursery.start_soon(self._caller.expire_calls)
                nursery.start_soon(self._receive_datagrams, trio.socket.from_stdlib_socket(udp))
                log.info("transport of %s serving on %s port %d", self.world, *self.addr)
                task_status.started(self.addr)
        finally:
            self._state = "closed"
            self._nursery = self._caller.nursery = None
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
            "keys": self._ep.keys.ring.ids(),
            "connections": {"in": self._server.connections(), "out": self._caller.connections()},
            "calls_pending": self._caller.pending(),
            "instance": self.instance.hex(),
            "datagram_ids_remembered": len(self._replay),
            "datagram_receivers": {
                "known": self._receivers.known(),
                "waiting": self._receivers.waiting(),
            },
            "counters": dict(sorted(self.counters.items())),
        }

    def _check_serving(self) -> None:
        """RuntimeError before serve() (a bug), PeerUnreachable after it."""
        if self._state == "new":
            raise RuntimeError("the transport is not serving yet: start serve() first")
        if self._state == "closed":
            raise PeerUnreachable("the transport is closed")

    def _bind(self) -> tuple[socket.socket, socket.socket]:
        host, port = self.addr
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for _ in range(BIND_ATTEMPTS if port == 0 else 1):
            tcp = socket.socket(family, socket.SOCK_STREAM)
            udp = socket.socket(family, socket.SOCK_DGRAM)
            try:
                # TCP only: a restarted peer takes its port back despite connections in
                # TIME_WAIT (on UDP, SO_REUSEADDR would let two sockets share the port).
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((host, port))
                tcp.listen(LISTEN_BACKLOG)
                real = tcp.getsockname()[1]
                udp.bind((host, real))
            except OSError as e:
                tcp.close()
                udp.close()
                if port == 0 and e.errno == errno.EADDRINUSE:
                    continue  # that UDP port is taken: another one
                raise
            self.addr = self._ep.addr = (host, real)
            return tcp, udp
        raise OSError(errno.EADDRINUSE, f"no port free for both TCP and UDP on {host}")

    # -- datagrams ----------------------------------------------------------------------------

    async def _receive_datagrams(self, sock: trio.socket.SocketType) -> None:
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
            kind, head, sealed = frames.split_datagram(data)
            plaintext = self._ep.keys.open(sealed, self._udp_aad + head)
            sent_ms, ident = frames.unpack_stamp(plaintext)
            # Only now, authenticated: so forged datagrams never fill the replay memory. Every
            # kind is checked, so each datagram captured provokes one answer at most.
            stale = self._replay.check(sent_ms, ident)
            if stale is not None:
                raise Malformed(stale)
            body = plaintext[frames.STAMP.size :]
            if kind != frames.DATA:
                self._control_received(kind, head[1:], source, sent_ms, ident, body)
                return
            if head[1:] != self.instance:
                # Sealed for another peer, or for an earlier life of this one: never decoded.
                # The RETRY lets a sender that knew our previous instance learn the new one.
                self._control(
                    frames.RETRY, frames.NO_INSTANCE, source, _new_id(), frames.pack_retry(ident)
                )
                self._misdirected(source)
                return
            msg = frames.unpack_message(body)
        except Malformed as e:
            self._ep.drop("udp", e.reason, source)
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
            log.exception("the datagram handler failed on a datagram from %s", addr_text(source))

    def _control_received(
        self, kind: int, to: bytes, source: PeerAddr, sent_ms: int, ident: int, body: bytes
    ) -> None:
        """A HELLO, WELCOME or RETRY, authentic and fresh; Malformed when not well formed or
        not for this instance."""
        if kind == frames.WELCOME:
            if to != self.instance:
                self._misdirected(source)
                return
            echo, instance = frames.unpack_welcome(body)
            welcomed = self._receivers.welcomed(echo, instance, sent_ms)
            if welcomed is not None:
                addr, queued = welcomed
                for message in queued:
                    self._send_data(addr, instance, message)
            return
        if to != frames.NO_INSTANCE:
            raise Malformed(frames.SHAPE)
        if kind == frames.HELLO:
            instance = frames.unpack_instance(body)
            welcome = frames.pack_welcome(ident, self.instance)
            self._control(frames.WELCOME, instance, source, _new_id(), welcome)
            for message in self._receivers.heard(source, instance, sent_ms):
                self._send_data(source, instance, message)
        else:  # RETRY
            retried = self._receivers.retried(frames.unpack_retry(body))
            if retried is not None:
                self._send_body(*retried)  # after a HELLO, unless its instance is known anew

    def _misdirected(self, source: PeerAddr) -> None:
        """Counted, but not logged as a warning: every sender of a peer that restarts sends
        one or two such datagrams before it learns the new instance."""
        self.counters[f"udp.dropped.{frames.MISDIRECTED}"] += 1
        log.debug("udp from %s dropped: %s", addr_text(source), frames.MISDIRECTED)


_CONTROL_SENT = {
    frames.HELLO: "udp.hello.sent",
    frames.WELCOME: "udp.welcome.sent",
    frames.RETRY: "udp.retry.sent",
}
