"""The calling side of the transport: one pooled connection per peer address, opened on demand
and reopened after a failure, over which calls are multiplexed.

A connection is run by one task (in the transport's nursery) that opens it, then reads replies
and hands each to its waiting caller: a call spawns no task, and writes its request itself,
synchronously (outbox.py), so no caller's cancellation can cut a frame in half. Whatever ends a
connection — the peer closing it, a reset, a bad frame, idleness — goes through
:meth:`Caller._end`, which takes it out of the pool and fails its calls with PeerUnreachable at
once.

A waiting call is parked on its own (no Event, no cancel scope of its own: on a small call each
costs as much as sealing it). Its timeout is kept by :meth:`Caller.expire_calls`, one task that
sleeps until the earliest deadline of the calls pending; calls mostly share one timeout, so
that task wakes about once a timeout, not once a call.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import trio

from . import frames
from .endpoint import BROKEN, Endpoint, next_frame, read_exact
from .frames import FrameDecoder, Malformed, Session
from .net import PeerAddr, PeerUnreachable, RemoteError, addr_text
from .outbox import STALLED, Outbox


class _Slot:
    """A call waiting for its reply."""

    __slots__ = ("deadline", "ok", "task", "timed_out", "value")

    def __init__(self, task: trio.lowlevel.Task, deadline: float) -> None:
        self.task = task
        self.deadline = deadline
        self.ok = False
        self.value: Any = None  # the result | (code, message) | None when the connection ended
        self.timed_out = False


def _wake(slot: _Slot) -> None:
    """Resume the slot's caller (taken out of ``pending`` first, by whoever wakes it)."""
    trio.lowlevel.reschedule(slot.task)


@dataclass(eq=False)
class _Connection:
    to: PeerAddr
    ready: trio.Event = field(default_factory=trio.Event)  # set once open, or failed
    ended: str | None = None  # why it failed or ended; set once
    established: bool = False
    outbox: Outbox | None = None
    session: Session | None = None
    send_seq: int = 0
    recv_seq: int = 0
    next_rid: int = 0
    pending: dict[int, _Slot] = field(default_factory=dict)
    last_used: float = 0.0  # trio time of the last call
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    @property
    def usable(self) -> bool:
        return self.established and self.ended is None


class Caller:
    def __init__(self, ep: Endpoint) -> None:
        self.ep = ep
        self.nursery: trio.Nursery | None = None  # the transport's, while it serves
        self._pool: dict[PeerAddr, _Connection] = {}
        # The scope expire_calls sleeps in: its deadline is the earliest of the pending calls'.
        self._expiry = trio.CancelScope()

    def connections(self) -> int:
        return len(self._pool)

    def pending(self) -> int:
        return sum(len(c.pending) for c in self._pool.values())

    async def call(
        self, to: PeerAddr, method: str, packed_method: bytes, packed_args: bytes, timeout: float
    ) -> Any:
        """Transport.call, once the request is packed and known to fit."""
        counters = self.ep.counters
        deadline = trio.current_time() + timeout
        conn = self._pool.get(to)
        if (
            conn is None
            or not conn.usable
            or conn.outbox is None
            or conn.outbox.backlog > conn.outbox.high_water
        ):
            ready = None
            with trio.CancelScope(deadline=deadline):
                ready = await self._ready_connection(to)
            if ready is None:
                counters["call.timeout"] += 1
                raise PeerUnreachable(f"{addr_text(to)}: no reply to {method} within {timeout} s")
            conn = ready
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
        outbox, session = conn.outbox, conn.session
        assert outbox is not None and session is not None  # as in every usable one
        # From the check of the connection to the write, no checkpoint: the connection is alive
        # when the request is registered, and frames leave in the order of their numbers.
        rid = conn.next_rid
        conn.next_rid += 1
        conn.last_used = trio.current_time()
        plaintext = frames.pack_request(conn.send_seq, rid, packed_method, packed_args)
        conn.send_seq += 1
        outbox.write(frames.frame(self.ep.keys.seal(plaintext, session.request_aad)))
        if conn.ended is not None:
            # The write failed and ended the connection there and then: registered before,
            # this call would have been woken while still running.
            counters["call.unreachable"] += 1
            raise PeerUnreachable(
                f"{addr_text(to)}: connection lost ({conn.ended}) during {method}"
            )
        # Registered once the request is out, and parked right after: nothing can answer or
        # end it in between (no checkpoint), so every wake-up finds the caller parked.
        slot = conn.pending[rid] = _Slot(trio.lowlevel.current_task(), deadline)
        if deadline < self._expiry.deadline:
            self._expiry.deadline = deadline

        def abort(_: Any) -> trio.lowlevel.Abort:
            conn.pending.pop(rid, None)  # cancelled: a late reply is counted and dropped
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        if slot.timed_out:
            counters["call.timeout"] += 1
            raise PeerUnreachable(f"{addr_text(to)}: no reply to {method} within {timeout} s")
        if slot.ok:
            counters["call.ok"] += 1
            return slot.value
        if slot.value is None:
            counters["call.unreachable"] += 1
            raise PeerUnreachable(
                f"{addr_text(to)}: connection lost ({conn.ended}) during {method}"
            )
        counters["call.remote-error"] += 1
        raise RemoteError(*slot.value)

    async def _ready_connection(self, to: PeerAddr) -> _Connection:
        """A usable connection to ``to`` with room to write, waiting for either as needed.
        Returns without a checkpoint after checking."""
        while True:
            conn = await self._connection(to)
            outbox = conn.outbox
            assert outbox is not None
            if outbox.backlog <= outbox.high_water:
                return conn
            await outbox.wait_room()  # a peer slow to read: callers wait, not memory

    async def expire_calls(self) -> None:
        """Run by the transport: time out each pending call at its deadline (PeerUnreachable
        in the caller). Sleeps until the earliest deadline; ``call`` brings it forward."""
        while True:
            with self._expiry:
                await trio.sleep_forever()
            now = trio.current_time()
            earliest = math.inf
            for conn in list(self._pool.values()):
                for rid, slot in list(conn.pending.items()):
                    if slot.deadline <= now:
                        del conn.pending[rid]
                        slot.timed_out = True
                        _wake(slot)
                    elif slot.deadline < earliest:
                        earliest = slot.deadline
            self._expiry = trio.CancelScope(deadline=earliest)

    async def _connection(self, to: PeerAddr) -> _Connection:
        """The pooled connection to ``to``, opened if there is none (PeerUnreachable when it
        cannot be). Returns, without a checkpoint after checking, a usable connection."""
        conn = self._pool.get(to)
        if conn is not None and conn.usable:
            return conn  # the common case, without the checkpoint of an Event.wait()
        for _ in range(2):  # a pooled connection may end while we wait for it: one more try
            conn = self._pool.get(to)
            if conn is None:
                if self.nursery is None:
                    raise PeerUnreachable("the transport is closed")
                conn = self._pool[to] = _Connection(to)
                try:
                    self.nursery.start_soon(self._run, conn)
                except RuntimeError:  # the nursery is closing: the transport is stopping
                    del self._pool[to]
                    raise PeerUnreachable("the transport is closed") from None
            await conn.ready.wait()
            if conn.usable:
                return conn
            if not conn.established:
                break
        raise PeerUnreachable(f"{addr_text(to)}: {conn.ended}")

    def _end(self, conn: _Connection, why: str) -> None:
        """Take the connection out of the pool, fail its calls, stop its task. Synchronous, so
        no call can slip in between."""
        if conn.ended is not None:
            return
        conn.ended = why
        if self._pool.get(conn.to) is conn:
            del self._pool[conn.to]
        pending = list(conn.pending.values())
        conn.pending.clear()
        for slot in pending:
            _wake(slot)  # value None: PeerUnreachable
        if conn.outbox is not None:
            conn.outbox.close()
        conn.cancel_scope.cancel()
        conn.ready.set()

    def _write_failed(self, conn: _Connection, why: str) -> None:
        if why == STALLED:
            self.ep.drop("tcp", why, conn.to)
        else:
            self.ep.counters[f"tcp.closed.{why}"] += 1
        self._end(conn, why)

    async def _run(self, conn: _Connection) -> None:
        """Open the connection, then read its replies until it ends."""
        ep = self.ep
        decoder = FrameDecoder(ep.max_frame)
        stream: trio.SocketStream | None = None
        try:
            with conn.cancel_scope:
                try:
                    with trio.fail_after(ep.limits.connect_timeout):
                        stream = await _open(to=conn.to, local=ep.addr[0])
                        hello = frames.client_hello(ep.addr[1])
                        await stream.send_all(hello)
                        server_hello = await read_exact(stream, decoder, frames.SERVER_HELLO_BYTES)
                        frames.check_server_hello(server_hello)
                except (*BROKEN, trio.TooSlowError, Malformed) as e:
                    ep.counters["tcp.connect-failed"] += 1
                    self._end(conn, f"cannot connect: {_describe(e)}")
                    return
                conn.outbox = Outbox(stream.socket, lambda why: self._write_failed(conn, why))
                conn.session = session = Session.of(ep.world, hello, server_hello)
                conn.outbox.write(frames.frame(ep.keys.seal(frames.PROOF, session.request_aad)))
                conn.send_seq = 1
                if conn.ended is not None:  # that write failed
                    return
                conn.established = True
                conn.last_used = trio.current_time()
                ep.counters["tcp.connected"] += 1
                conn.ready.set()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(conn.outbox.run, ep.limits.send_timeout)
                    await self._read_replies(conn, stream, decoder)
                    nursery.cancel_scope.cancel()
        finally:
            self._end(conn, "closed")
            if stream is not None:
                await trio.aclose_forcefully(stream)

    async def _read_replies(
        self, conn: _Connection, stream: trio.SocketStream, decoder: FrameDecoder
    ) -> None:
        """Hand each reply to its caller; return (having called _end) when the connection
        ends: closed, reset, a bad frame, or idle for half the idle timeout without a call
        pending (before the server's idle timeout, so no request is sent on a connection the
        server is closing)."""
        assert conn.session is not None
        ep, aad = self.ep, conn.session.reply_aad
        idle = ep.limits.idle_timeout / 2
        checked = conn.last_used
        while True:
            # The deadline is not pushed back at every reply (that costs more than the rest of
            # a reply's handling): when it passes, the time of the last call decides.
            with trio.CancelScope(deadline=max(conn.last_used, checked) + idle):
                while True:
                    try:
                        body = await next_frame(stream, decoder)
                        if body is None:
                            self._end(conn, "closed by the peer")
                            return
                        seq, rid, ok, value = frames.unpack_reply(ep.keys.open(body, aad))
                        if seq != conn.recv_seq:
                            raise Malformed(frames.REPLAY)
                    except Malformed as e:
                        ep.drop("tcp", e.reason, conn.to)
                        self._end(conn, e.reason)
                        return
                    except BROKEN:
                        ep.counters["tcp.closed.reset"] += 1
                        self._end(conn, "reset")
                        return
                    conn.recv_seq += 1
                    slot = conn.pending.pop(rid, None)
                    if slot is None:
                        ep.counters["tcp.late-replies"] += 1  # its caller gave up
                    else:
                        slot.ok, slot.value = ok, value
                        _wake(slot)
            checked = trio.current_time()
            if not conn.pending and checked - conn.last_used >= idle:
                ep.counters["tcp.closed.idle"] += 1
                self._end(conn, "idle")
                return


async def _open(to: PeerAddr, local: str) -> trio.SocketStream:
    family = trio.socket.AF_INET6 if ":" in to[0] else trio.socket.AF_INET
    sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
    try:
        if local not in ("0.0.0.0", "::", ""):
            await sock.bind((local, 0))  # from the address peers know us by
        await sock.connect(to)
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)  # which sets TCP_NODELAY: no Nagle delay on requests


def _describe(e: BaseException) -> str:
    if isinstance(e, Malformed):
        if e.reason == frames.TRUNCATED:
            return "closed during the handshake (over the peer's connection limits?)"
        return f"not a drekifs transport ({e.reason})"
    if isinstance(e, trio.TooSlowError):
        return "timed out"
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno)  # trio's text repeats the address, as a tuple
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return repr(e)
