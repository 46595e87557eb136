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
                 replay-cache-full}
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
from .replay import ReplayGuard
from .rpcclient import Caller
from .rpcserver import Server

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn; see limits.max_handshakes
BIND_ATTEMPTS = 20  # with port 0: ports tried to find one free for both TCP and UDP
UDP_RECEIVE_BYTES = 1 << 16  # more than any datagram, so an oversized one shows as such


class Transport:
    """One peer's network endpoint: TCP and UDP on ``bind``, an IP address (v4 or v6) and a
    port; port 0 picks one, and ``addr`` holds it once :meth:`serve` has started.

    ``max_frame`` bounds a sealed TCP frame either way: a larger request is refused when sent
    (ValueError), a larger reply answered EMSGSIZE, and a larger frame received drops the
    connection. ``wall_clock`` stamps and judges datagrams (replaceable to test clock skew).
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
        plaintext = frames.pack_datagram(
            int(self._wall() * 1000), int.from_bytes(os.urandom(8), "big"), frames.pack(msg)
        )
        if len(plaintext) + OVERHEAD > MAX_DATAGRAM:
            raise ValueError(
                f"a datagram of {len(plaintext) + OVERHEAD} bytes sealed, over {MAX_DATAGRAM}"
            )
        if self._udp is None:
            if self._state == "new":
                raise RuntimeError("the transport is not serving yet: start serve() first")
            self.counters["udp.send-failed"] += 1  # closed: as lost as any other datagram
            return
        try:
            self._udp.sendto(self._ep.keys.seal(plaintext, self._udp_aad), to)
        except OSError:  # best effort: a full buffer, no route...
            self.counters["udp.send-failed"] += 1
        else:
            self.counters["udp.sent"] += 1

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
            "datagram_ids_remembered": len(self._replay),
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
            plaintext = self._ep.keys.open(data, self._udp_aad)
            sent_ms, ident, msg = frames.unpack_datagram(plaintext)
            # Only now, authenticated: so forged datagrams never fill the replay memory.
            stale = self._replay.check(sent_ms, ident)
            if stale is not None:
                raise Malformed(stale)
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
