"""The real transport on 127.0.0.1: calls, datagrams, keys, junk, replays and limits."""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import logging
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from drekifs.cluster import frames
from drekifs.cluster.endpoint import next_frame
from drekifs.cluster.frames import FrameDecoder, Keys, Malformed, Session
from drekifs.cluster.keyring import KeyRing, key_id
from drekifs.cluster.limits import Limits
from drekifs.cluster.net import MAX_DATAGRAM, PeerAddr, PeerUnreachable, RemoteError
from drekifs.cluster.replay import ReplayGuard
from drekifs.cluster.transport import DATAGRAM_OVERHEAD, Transport

WORLD = "inf.random.sh"
LOCAL = "127.0.0.1"
FAST = Limits(
    connect_timeout=2.0,
    handshake_timeout=1.0,
    idle_timeout=10.0,
    send_timeout=2.0,
    handler_timeout=5.0,
)


async def start(
    nursery: trio.Nursery,
    ring: KeyRing,
    *,
    world: str = WORLD,
    port: int = 0,
    limits: Limits = FAST,
    **kw: Any,
) -> Transport:
    t = Transport(world, ring, (LOCAL, port), limits=limits, **kw)
    await nursery.start(t.serve)
    return t


async def eventually(predicate: Callable[[], Any], what: str, timeout: float = 5.0) -> None:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.005)
        return
    raise AssertionError(f"timed out waiting for {what}")


def serve_echo(t: Transport) -> list[tuple[PeerAddr, Any]]:
    """Register "echo" on ``t``; the list of (peer, args) it was called with."""
    seen: list[tuple[PeerAddr, Any]] = []

    async def echo(peer: PeerAddr, args: Any) -> Any:
        seen.append((peer, args))
        return args

    t.register("echo", echo)
    return seen


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return s.getsockname()[1]


def drops(t: Transport, proto: str) -> int:
    return sum(n for k, n in t.counters.items() if k.startswith(f"{proto}.dropped."))


@contextlib.asynccontextmanager
async def raw_client(t: Transport, ring: KeyRing):
    """A client written from the wire format alone: connected, hello and proof of key sent;
    yields (socket, session)."""
    with trio.socket.socket() as s:
        await s.connect(t.addr)
        ch = frames.client_hello(4242)
        await s.send(ch)
        sh = await s.recv(frames.SERVER_HELLO_BYTES)
        session = Session.of(WORLD.encode(), ch, sh)
        await s.send(frames.frame(Keys.of(ring).seal(frames.PROOF, session.request_aad)))
        yield s, session


# -- calls ------------------------------------------------------------------------------------


async def test_call_round_trip_from_the_callers_listening_address(nursery) -> None:
    ring = KeyRing.generate()
    a, b = await start(nursery, ring), await start(nursery, ring)
    assert a.addr[1] != 0 and a.addr != b.addr
    seen = serve_echo(b)
    args = {"s": "x", "k": [b"a", b"b"], 1: None, "n": -5}
    assert await a.call(b.addr, "echo", args, timeout=2) == args
    assert seen == [(a.addr, args)]  # the caller as peers know it, not its ephemeral port
    assert json.dumps(a.stats()) and json.dumps(b.stats())
    assert b.stats()["connections"] == {"in": 1, "out": 0}


async def test_concurrent_calls_are_multiplexed_on_one_connection(nursery) -> None:
    ring = KeyRing.generate()
    a, b = await start(nursery, ring), await start(nursery, ring)

    async def slow(peer: PeerAddr, n: int) -> int:
        await trio.sleep(random.uniform(0, 0.1))  # replies come back out of order
        return n * n

    b.register("slow", slow)
    results: dict[int, int] = {}

    async def one(n: int) -> None:
        results[n] = await a.call(b.addr, "slow", n, timeout=5)

    started = trio.current_time()
    async with trio.open_nursery() as calls:
        for n in range(200):
            calls.start_soon(one, n)
    assert results == {n: n * n for n in range(200)}
    assert trio.current_time() - started < 2  # concurrent, not one after the other
    assert b.counters["tcp.accepted"] == 1 and a.counters["tcp.connected"] == 1


async def test_error_replies_and_a_failing_handler_leave_the_connection_serving(
    nursery, caplog
) -> None:
    ring = KeyRing.generate()
    a, b = await start(nursery, ring), await start(nursery, ring)
    serve_echo(b)

    async def missing(peer: PeerAddr, args: Any) -> Any:
        raise RemoteError(errno.ENOENT, "no such key")

    async def broken(peer: PeerAddr, args: Any) -> Any:
        return 1 / 0

    async def unpackable(peer: PeerAddr, args: Any) -> Any:
        return object()

    b.register("missing", missing)
    b.register("broken", broken)
    b.register("unpackable", unpackable)
    with pytest.raises(RemoteError, match="no such key") as e:
        await a.call(b.addr, "missing", None, timeout=2)
    assert e.value.code == errno.ENOENT
    with caplog.at_level(logging.ERROR, logger="drekifs.cluster.transport"):
        for method in ("broken", "unpackable"):
            with pytest.raises(RemoteError) as e:
                await a.call(b.addr, method, None, timeout=2)
            assert e.value.code == errno.EIO
    assert "broken from" in caplog.text and "ZeroDivisionError" in caplog.text
    with pytest.raises(RemoteError) as e:
        await a.call(b.addr, "nope", None, timeout=2)
    assert e.value.code == errno.ENOSYS
    assert await a.call(b.addr, "echo", "still here", timeout=2) == "still here"
    assert b.counters["tcp.accepted"] == 1  # all on the first connection
    assert b.counters["rpc.eio"] == 2 and b.counters["rpc.unknown-method"] == 1


async def test_a_handler_over_its_time_is_cancelled_and_answered_etimedout(nursery) -> None:
    ring = KeyRing.generate()
    a = await start(nursery, ring)
    b = await start(nursery, ring, limits=Limits(handler_timeout=0.2))

    async def hang(peer: PeerAddr, args: Any) -> Any:
        await trio.sleep_forever()

    b.register("hang", hang)
    with pytest.raises(RemoteError) as e:
        await a.call(b.addr, "hang", None, timeout=2)
    assert e.value.code == errno.ETIMEDOUT


async def test_a_call_times_out_quickly_and_the_connection_goes_on(nursery) -> None:
    ring = KeyRing.generate()
    a, b = await start(nursery, ring), await start(nursery, ring)
    serve_echo(b)

    async def hang(peer: PeerAddr, args: Any) -> Any:
        await trio.sleep_forever()

    b.register("hang", hang)
    started = trio.current_time()
    with pytest.raises(PeerUnreachable, match=r"within 0\.2 s"):
        await a.call(b.addr, "hang", None, timeout=0.2)
    assert trio.current_time() - started < 0.5
    assert await a.call(b.addr, "echo", 1, timeout=2) == 1
    assert b.counters["tcp.accepted"] == 1


async def test_a_timeout_must_be_a_number_of_seconds(nursery) -> None:
    ring = KeyRing.generate()
    a, b = await start(nursery, ring), await start(nursery, ring)
    serve_echo(b)
    for bad in (float("nan"), -1.0):
        with pytest.raises(ValueError, match="timeout"):
            await a.call(b.addr, "echo", 1, timeout=bad)
    assert await a.call(b.addr, "echo", 1, timeout=2) == 1


async def test_a_reader_cancelled_under_load_loses_no_frame() -> None:
    """The readers' idle deadlines can pass while frames pour in: whatever frame the reader
    is at when its scope is cancelled stays for the next read."""
    a, b = socket.socketpair()
    with a, b:
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(b))
        a.sendall(b"".join(frames.frame(b"%d" % i) for i in range(100)))
        decoder = FrameDecoder(1 << 20)
        got: list[int] = []
        for _ in range(20):  # bounded: each scope gives at most YIELD_EVERY frames
            with trio.CancelScope(deadline=trio.current_time()):  # already passed
                while len(got) < 100:
                    body = await next_frame(stream, decoder)
                    assert body is not None
                    got.append(int(body))
            if len(got) == 100:
                break
        assert got == list(range(100))


async def test_a_write_that_fails_fails_its_call_and_the_next_call_reconnects(nursery) -> None:
    ring = KeyRing.generate()
    a, b = await start(nursery, ring), await start(nursery, ring)
    serve_echo(b)
    assert await a.call(b.addr, "echo", 1, timeout=2) == 1
    outbox = a._caller._pool[b.addr].outbox
    assert outbox is not None
    # Shut the pooled connection for writing under the transport: the next request's write
    # fails at once (EPIPE), before its caller could park.
    with socket.fromfd(outbox._fd, socket.AF_INET, socket.SOCK_STREAM) as dup:
        dup.shutdown(socket.SHUT_WR)
    with pytest.raises(PeerUnreachable, match="connection lost"):
        await a.call(b.addr, "echo", 2, timeout=2)
    assert a.stats()["calls_pending"] == 0
    assert a.counters["tcp.closed.reset"] == 1 and a.counters["call.unreachable"] == 1
    assert await a.call(b.addr, "echo", 3, timeout=2) == 3


async def test_each_call_keeps_its_own_deadline_and_a_cancelled_one_leaves_nothing(
    nursery,
) -> None:
    ring = KeyRing.generate()
    a, b = await start(nursery, ring), await start(nursery, ring)

    async def hang(peer: PeerAddr, args: Any) -> Any:
        await trio.sleep_forever()

    b.register("hang", hang)

    long_ended: list[float] = []
    long_started = trio.current_time()

    async def long_call() -> None:
        with pytest.raises(PeerUnreachable, match=r"within 1\.5 s"):
            await a.call(b.addr, "hang", None, timeout=1.5)
        long_ended.append(trio.current_time() - long_started)

    nursery.start_soon(long_call)
    await trio.sleep(0.05)
    # A shorter timeout after a longer one: expired on time, not at the longer deadline.
    started = trio.current_time()
    with pytest.raises(PeerUnreachable, match=r"within 0\.2 s"):
        await a.call(b.addr, "hang", None, timeout=0.2)
    assert trio.current_time() - started < 0.5
    # Cancelled from outside: its slot is gone at once, the other call still waits.
    with trio.move_on_after(0.1):
        await a.call(b.addr, "hang", None, timeout=5)
    assert a.stats()["calls_pending"] == 1
    # And the longer one expires at its own deadline, not before, not much after.
    with trio.fail_after(3):
        while not long_ended:
            await trio.sleep(0.05)
    assert 1.5 <= long_ended[0] < 2.0
    assert a.stats()["calls_pending"] == 0


async def test_a_peer_not_listening_is_unreachable_at_once(nursery) -> None:
    a = await start(nursery, KeyRing.generate())
    started = trio.current_time()
    with pytest.raises(PeerUnreachable, match="cannot connect"):
        await a.call((LOCAL, free_port()), "echo", 1, timeout=5)
    assert trio.current_time() - started < 1
    assert a.counters["tcp.connect-failed"] == 1
    with pytest.raises(PeerUnreachable):  # and again: a new attempt, not a cached failure
        await a.call((LOCAL, free_port()), "echo", 1, timeout=5)
    assert a.counters["tcp.connect-failed"] == 2


async def test_the_connection_is_reopened_after_the_peer_restarts(nursery) -> None:
    ring = KeyRing.generate()
    a, b = await start(nursery, ring), await start(nursery, ring)
    serve_echo(b)
    assert await a.call(b.addr, "echo", 1, timeout=2) == 1

    async def hang(peer: PeerAddr, args: Any) -> Any:
        await trio.sleep_forever()

    b.register("hang", hang)
    failed: list[BaseException] = []

    async def pending_call() -> None:
        try:
            await a.call(b.addr, "hang", None, timeout=5)
        except PeerUnreachable as e:
            failed.append(e)

    nursery.start_soon(pending_call)
    await eventually(lambda: b.counters["tcp.accepted"] == 1 and a.stats()["calls_pending"], "")
    await b.aclose()  # a crash, as far as the caller can tell
    await eventually(lambda: failed, "the pending call to fail")
    assert "connection lost" in str(failed[0])
    with pytest.raises(PeerUnreachable):
        await a.call(b.addr, "echo", 2, timeout=2)
    b2 = await start(nursery, ring, port=b.addr[1])
    serve_echo(b2)
    assert await a.call(b2.addr, "echo", 3, timeout=2) == 3
    assert a.counters["tcp.connected"] == 2


async def test_oversized_requests_and_replies_are_refused(nursery) -> None:
    ring = KeyRing.generate()
    a = await start(nursery, ring, max_frame=10_000)
    b = await start(nursery, ring, max_frame=10_000)
    serve_echo(b)

    async def big(peer: PeerAddr, n: int) -> bytes:
        return b"x" * n

    b.register("big", big)
    with pytest.raises(ValueError, match="over 10000"):
        await a.call(b.addr, "echo", b"x" * 10_000, timeout=2)
    assert await a.call(b.addr, "echo", b"x" * 9_900, timeout=2) == b"x" * 9_900
    with pytest.raises(RemoteError) as e:
        await a.call(b.addr, "big", 10_000, timeout=2)
    assert e.value.code == errno.EMSGSIZE
    # A frame announced larger than the limit ends the connection and is counted; before
    # the proof of key, the limit is tiny.
    with trio.socket.socket() as s:
        await s.connect(b.addr)
        await s.send(frames.client_hello(1) + frames.LENGTH.pack(frames.AUTH_FRAME_MAX + 1))
        await eventually(lambda: b.counters["tcp.dropped.oversized"] == 1, "the drop")
    async with raw_client(b, ring) as (s, _):
        await s.send(frames.LENGTH.pack(10_001) + b"\1" * 100)
        await eventually(lambda: b.counters["tcp.dropped.oversized"] == 2, "the drop")
    assert await a.call(b.addr, "echo", 1, timeout=2) == 1


async def test_an_idle_pooled_connection_is_closed_and_reopened(nursery) -> None:
    ring = KeyRing.generate()
    idle = Limits(idle_timeout=0.4)
    a, b = await start(nursery, ring, limits=idle), await start(nursery, ring, limits=idle)
    serve_echo(b)
    assert await a.call(b.addr, "echo", 1, timeout=2) == 1
    await eventually(lambda: a.counters["tcp.closed.idle"] == 1, "the client to close it")
    await eventually(lambda: b.stats()["connections"]["in"] == 0, "the server to see it")
    assert await a.call(b.addr, "echo", 2, timeout=2) == 2
    assert b.counters["tcp.accepted"] == 2


# -- datagrams ----------------------------------------------------------------------------------


async def test_datagrams_both_ways_and_the_size_limit(nursery) -> None:
    ring = KeyRing.generate()
    a, b = await start(nursery, ring), await start(nursery, ring)
    got_a: list[tuple[PeerAddr, Any]] = []
    got_b: list[tuple[PeerAddr, Any]] = []
    a.on_datagram(lambda src, msg: got_a.append((src, msg)))
    b.on_datagram(lambda src, msg: got_b.append((src, msg)))
    a.send_datagram(b.addr, {"ping": 1})
    b.send_datagram(a.addr, {"ack": 1})
    await eventually(lambda: got_a and got_b, "both datagrams")
    assert got_b == [(a.addr, {"ping": 1})] and got_a == [(b.addr, {"ack": 1})]
    # The largest message that fits is sent; one byte more is the caller's bug.
    fit = next(n for n in range(MAX_DATAGRAM, 0, -1) if _sealed_size(b"x" * n) <= MAX_DATAGRAM)
    a.send_datagram(b.addr, b"x" * fit)
    with pytest.raises(ValueError, match="over 1400"):
        a.send_datagram(b.addr, b"x" * (fit + 1))
    await eventually(lambda: len(got_b) == 2, "the largest datagram")
    assert got_b[1][1] == b"x" * fit
    assert a.counters["udp.sent"] == 2 and b.counters["udp.received"] == 2


def _sealed_size(msg: Any) -> int:
    """What a datagram of ``msg`` weighs on the wire."""
    return len(frames.pack(msg)) + DATAGRAM_OVERHEAD


async def test_a_datagram_handler_that_raises_is_counted(nursery) -> None:
    ring = KeyRing.generate()
    a, b = await start(nursery, ring), await start(nursery, ring)

    def broken(src: PeerAddr, msg: Any) -> None:
        raise RuntimeError("bug")

    b.on_datagram(broken)
    a.send_datagram(b.addr, 1)
    a.send_datagram(b.addr, 2)
    await eventually(lambda: b.counters["udp.handler-error"] == 2, "both to be handled")


class Wiretap:
    """A UDP relay in front of ``target`` that keeps a copy of what it passes on: a sender
    sends to ``addr``, the relay forwards to ``target`` and the answers back to that sender.
    What a peer on the path (or a capture) sees of the conversation."""

    def __init__(self, target: PeerAddr) -> None:
        self.target = target
        self.addr: PeerAddr = (LOCAL, 0)
        self.captured: list[bytes] = []  # what the sender sent, in order

    async def run(self, task_status: trio.TaskStatus[PeerAddr] = trio.TASK_STATUS_IGNORED):
        with trio.socket.socket(type=socket.SOCK_DGRAM) as s:
            await s.bind((LOCAL, 0))
            self.addr = s.getsockname()
            task_status.started(self.addr)
            sender: PeerAddr | None = None
            while True:
                data, source = await s.recvfrom(2048)
                if source == self.target:
                    if sender is not None:
                        await s.sendto(data, sender)
                else:
                    sender = source
                    self.captured.append(data)
                    await s.sendto(data, self.target)

    def data(self) -> list[bytes]:
        """The DATA datagrams captured (no HELLO)."""
        return [d for d in self.captured if d[0] == frames.DATA]


async def replay(datagram: bytes, to: PeerAddr, times: int = 1) -> None:
    with trio.socket.socket(type=socket.SOCK_DGRAM) as s:
        for _ in range(times):
            await s.sendto(datagram, to)


async def test_a_replayed_datagram_is_dropped(nursery) -> None:
    ring = KeyRing.generate()
    a, b = await start(nursery, ring), await start(nursery, ring)
    got: list[Any] = []
    b.on_datagram(lambda src, msg: got.append(msg))
    tap = Wiretap(b.addr)
    await nursery.start(tap.run)
    a.send_datagram(tap.addr, "once")
    await eventually(lambda: got == ["once"], "the datagram")
    await replay(tap.data()[0], b.addr, times=3)
    await eventually(lambda: b.counters["udp.dropped.replay"] == 3, "the replays")
    assert got == ["once"]


async def test_datagrams_outside_the_time_window_are_dropped_either_way(nursery) -> None:
    ring = KeyRing.generate()
    b = await start(nursery, ring)
    got: list[Any] = []
    b.on_datagram(lambda src, msg: got.append(msg))
    for skew in (-31.0, 31.0, -20.0, 20.0):
        t = await start(nursery, ring, wall_clock=lambda skew=skew: time.time() + skew)
        t.send_datagram(b.addr, skew)
    await eventually(lambda: len(got) + b.counters["udp.dropped.stale"] == 4, "all four")
    assert sorted(got) == [-20.0, 20.0] and b.counters["udp.dropped.stale"] == 2


def test_replay_guard_memory_is_bounded_and_expires() -> None:
    now = [1000.0]
    guard = ReplayGuard(30.0, 3, wall_clock=lambda: now[0], monotonic=lambda: now[0])
    ms = int(now[0] * 1000)
    assert [guard.check(ms, i) for i in range(4)] == [None, None, None, "replay-cache-full"]
    assert guard.check(ms, 1) == "replay"
    now[0] += 29.0
    assert guard.check(ms, 1) == "replay"  # still within the window
    now[0] += 32.0  # 2 windows after arrival: forgotten, and too old to pass anyway
    assert guard.check(ms, 1) == "stale" and len(guard) == 3
    assert guard.check(int(now[0] * 1000), 1) is None and len(guard) == 1


# -- keys -------------------------------------------------------------------------------------


async def _no_service(caller: Transport, server: Transport, served: list[Any]) -> None:
    got: list[Any] = []
    server.on_datagram(lambda src, msg: got.append(msg))
    started = trio.current_time()
    with pytest.raises(PeerUnreachable):
        await caller.call(server.addr, "echo", "let me in", timeout=3)
    assert trio.current_time() - started < 1  # the server hung up: no need to wait
    caller.send_datagram(server.addr, "let me in")
    await eventually(lambda: drops(server, "udp") == 1, "the datagram to be dropped")
    assert served == [] and got == []


async def test_a_peer_with_other_keys_is_refused(nursery) -> None:
    ring = KeyRing.generate()
    b = await start(nursery, ring)
    served = serve_echo(b)
    stranger = await start(nursery, KeyRing.generate())
    await _no_service(stranger, b, served)
    assert b.counters["tcp.dropped.foreign-key"] == 1
    assert b.counters["udp.dropped.foreign-key"] == 1


async def test_a_peer_of_another_world_is_refused(nursery) -> None:
    ring = KeyRing.generate()
    b = await start(nursery, ring)
    served = serve_echo(b)
    other = await start(nursery, ring, world="other.world")
    await _no_service(other, b, served)
    assert b.counters["tcp.dropped.bad-auth"] == 1
    assert b.counters["udp.dropped.bad-auth"] == 1


async def _talk(a: Transport, b: Transport, inbox: dict[PeerAddr, list[Any]]) -> None:
    """Calls and datagrams both ways."""
    for x, y in ((a, b), (b, a)):
        assert await x.call(y.addr, "echo", "hi", timeout=2) == "hi"
        before = len(inbox[y.addr])
        x.send_datagram(y.addr, "hi")
        await eventually(lambda y=y, before=before: len(inbox[y.addr]) > before, "a datagram")


async def test_key_rotation_in_three_steps_keeps_peers_talking(nursery) -> None:
    old = KeyRing.generate()
    a, b = await start(nursery, old), await start(nursery, old)
    inbox: dict[PeerAddr, list[Any]] = {a.addr: [], b.addr: []}
    for t in (a, b):
        serve_echo(t)
        t.on_datagram(lambda src, msg, t=t: inbox[t.addr].append(msg))
    await _talk(a, b, inbox)
    # Each step is rolled out one peer at a time: the peers talk in between, too.
    new = old.with_new_key()
    new_id, old_id = new.ids()[1], old.ids()[0]
    steps = [new, new.with_primary(new_id), new.with_primary(new_id).without(old_id)]
    for ring in steps:
        a.set_keyring(ring)
        await _talk(a, b, inbox)
        b.set_keyring(ring)
        await _talk(a, b, inbox)
    assert b.counters["tcp.accepted"] == 1  # the connections lived through it all
    assert drops(a, "tcp") + drops(b, "tcp") + drops(a, "udp") + drops(b, "udp") == 0
    # A peer still on the old key alone is now a stranger.
    laggard = await start(nursery, old)
    await _no_service(laggard, b, [])
    assert b.counters["udp.dropped.foreign-key"] == 1


async def test_skipping_the_first_rotation_step_breaks_the_cluster(nursery) -> None:
    old = KeyRing.generate()
    early = old.with_new_key()
    early = early.with_primary(early.ids()[1])  # the new key primary before it is everywhere
    a, b = await start(nursery, old), await start(nursery, early)
    got: list[Any] = []
    a.on_datagram(lambda src, msg: got.append(msg))
    b.send_datagram(a.addr, "sealed with a key a does not have")
    await eventually(lambda: a.counters["udp.dropped.foreign-key"] == 1, "the drop")
    assert got == []  # dropped, never delivered


# -- hostile input ------------------------------------------------------------------------------


async def _tcp_junk(addr: PeerAddr, payload: bytes) -> None:
    try:
        with trio.socket.socket() as s:
            await s.connect(addr)
            view = memoryview(payload)
            while view:
                view = view[await s.send(view) :]
            # Hang up with FIN, having read what the server sent: closing with its hello
            # unread would send a reset, which may overtake our bytes (then it counts as a
            # reset, not as the drop the test expects).
            s.shutdown(socket.SHUT_WR)
            while await s.recv(1 << 16):
                pass
    except OSError:
        pass  # the server hung up on us, as it should


async def test_junk_does_not_disturb_legitimate_traffic(nursery) -> None:
    ring = KeyRing.generate()
    a, b = await start(nursery, ring), await start(nursery, ring)
    serve_echo(b)
    got: list[Any] = []
    b.on_datagram(lambda src, msg: got.append(msg))
    assert await a.call(b.addr, "echo", 0, timeout=2) == 0
    rnd = random.Random(7)
    kid = key_id(ring.primary)
    chunk = 128 << 10
    junk = [
        rnd.randbytes(chunk),  # not even a hello
        rnd.randbytes(chunk),
        frames.client_hello(1) + rnd.randbytes(chunk),  # a hello, then a random length
        frames.client_hello(1) + rnd.randbytes(chunk),
        # A plausible proof of random bytes, then of our version and key id.
        frames.client_hello(1) + frames.frame(rnd.randbytes(100)) + rnd.randbytes(chunk),
        frames.client_hello(1) + frames.frame(b"\1" + kid + rnd.randbytes(100)),
        frames.client_hello(1) + frames.frame(b"\1" + b"XXXX" + rnd.randbytes(100)),
        frames.client_hello(1) + frames.LENGTH.pack(100) + b"\1" * 10,  # then hangs up
    ]
    calls = 0

    async def legit_traffic() -> None:
        nonlocal calls
        while True:
            assert await a.call(b.addr, "echo", calls, timeout=2) == calls
            calls += 1
            await trio.sleep(0.001)

    async with trio.open_nursery() as attack:
        attack.start_soon(legit_traffic)
        for payload in junk:
            attack.start_soon(_tcp_junk, b.addr, payload)
        v2 = bytes([frames.DATA]) + b.instance
        with trio.socket.socket(type=socket.SOCK_DGRAM) as s:
            for i in range(1000):
                n = rnd.randrange(1, 1501)
                data = [
                    rnd.randbytes(n),
                    b"\1" + kid + rnd.randbytes(n),  # version 1's format: not read any more
                    v2 + b"\1" + kid + rnd.randbytes(n),
                    v2 + b"\1" + rnd.randbytes(n),
                ][i % 4]
                await s.sendto(data, b.addr)
                if i % 50 == 49:  # no faster than b reads, so none is lost in the buffer
                    await eventually(lambda i=i: drops(b, "udp") == i + 1, "udp drops")
        await eventually(lambda: drops(b, "tcp") == len(junk), f"tcp drops {b.counters}")
        attack.cancel_scope.cancel()
    assert calls > 10
    assert await a.call(b.addr, "echo", "after", timeout=2) == "after"
    a.send_datagram(b.addr, "after")
    await eventually(lambda: got == ["after"], "a legitimate datagram")
    c = b.counters
    assert c["udp.dropped.oversized"] > 0 and c["udp.dropped.junk"] > 0
    assert c["udp.dropped.bad-auth"] > 0 and c["udp.dropped.foreign-key"] > 0
    assert c["tcp.dropped.junk"] >= 2 and c["tcp.dropped.oversized"] >= 1
    assert c["tcp.dropped.bad-auth"] == 1 and c["tcp.dropped.foreign-key"] == 1
    assert c["tcp.dropped.truncated"] >= 1


class Recorder:
    """A TCP proxy to ``target`` that records what clients send; ``mangle`` may rewrite each
    chunk of a client's bytes on its way."""

    def __init__(self, target: PeerAddr, mangle: Callable[[bytes], bytes] = lambda b: b) -> None:
        self.target = target
        self.mangle = mangle
        self.sent = bytearray()
        self.addr: PeerAddr = (LOCAL, 0)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=LOCAL)
        self.addr = listeners[0].socket.getsockname()[:2]
        task_status.started()
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream(*self.target)

        async def pump(src: trio.SocketStream, dst: trio.SocketStream, record: bool) -> None:
            try:
                async for data in src:
                    if record:
                        self.sent += data
                        data = self.mangle(data)
                    await dst.send_all(data)
            except trio.BrokenResourceError:
                pass
            nursery.cancel_scope.cancel()

        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, server, True)
            nursery.start_soon(pump, server, client, False)


class RepeatFrame:
    """A client's bytes, with the frame numbered ``n`` (0: the proof) sent twice."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.hello = b""
        self.decoder = FrameDecoder(1 << 20)
        self.seen = 0

    def __call__(self, data: bytes) -> bytes:
        if len(self.hello) < frames.CLIENT_HELLO_BYTES:
            cut = frames.CLIENT_HELLO_BYTES - len(self.hello)
            self.hello += data[:cut]
            out, data = data[:cut], data[cut:]
        else:
            out = b""
        self.decoder.feed(data)
        while (body := self.decoder.next()) is not None:
            out += frames.frame(body) * (2 if self.seen == self.n else 1)
            self.seen += 1
        return out


async def test_a_recorded_connection_replayed_serves_nothing(nursery) -> None:
    ring = KeyRing.generate()
    a, b = await start(nursery, ring), await start(nursery, ring)
    served = serve_echo(b)
    proxy = Recorder(b.addr)
    await nursery.start(proxy.run)
    assert await a.call(proxy.addr, "echo", "rm -rf", timeout=2) == "rm -rf"
    assert await a.call(proxy.addr, "echo", "again", timeout=2) == "again"
    assert len(served) == 2 and len(proxy.sent) > frames.CLIENT_HELLO_BYTES
    await _tcp_junk(b.addr, bytes(proxy.sent))
    await eventually(lambda: b.counters["tcp.dropped.bad-auth"] == 1, "the replay's drop")
    assert len(served) == 2


async def test_a_frame_repeated_within_a_connection_is_a_replay(nursery) -> None:
    ring = KeyRing.generate()
    a, b = await start(nursery, ring), await start(nursery, ring)
    served = serve_echo(b)
    proxy = Recorder(b.addr, RepeatFrame(1))  # the first request, after the proof
    await nursery.start(proxy.run)
    # The first copy may be answered before the second is seen, or not: never twice.
    with contextlib.suppress(PeerUnreachable):
        assert await a.call(proxy.addr, "echo", "once", timeout=2) == "once"
    await eventually(lambda: b.counters["tcp.dropped.replay"] == 1, "the drop")
    assert len(served) <= 1


def test_frames_do_not_open_in_the_other_direction_or_connection() -> None:
    keys = Keys.of(KeyRing.generate())
    ch, sh = frames.client_hello(9), frames.server_hello()
    session = Session.of(WORLD.encode(), ch, sh)
    request = keys.seal(b"payload", session.request_aad)
    assert keys.open(request, session.request_aad) == b"payload"
    for aad in (
        session.reply_aad,  # reflected back
        Session.of(WORLD.encode(), ch, frames.server_hello()).request_aad,  # replayed
        Session.of(b"other.world", ch, sh).request_aad,
        frames.datagram_aad(WORLD.encode()),
    ):
        with pytest.raises(Malformed, match="bad-auth"):
            keys.open(request, aad)


async def test_silent_connections_cannot_keep_a_peer_out(nursery, caplog) -> None:
    ring = KeyRing.generate()
    tight = Limits(max_handshakes=5, max_handshakes_per_host=3, handshake_timeout=1.0)
    b = await start(nursery, ring, limits=tight)
    serve_echo(b)
    silent = []
    for i in range(10):  # 8 from the client's own address, 2 from another one
        s = trio.socket.socket()
        await s.bind(("127.0.0.1" if i < 8 else "127.0.0.3", 0))
        await s.connect(b.addr)
        silent.append(s)
    await eventually(lambda: b.counters["tcp.accepted"] == 10, "accepted")
    # Over the address's share its own oldest go, and the other address keeps its 2.
    evicted = "tcp.refused.handshake-evicted"
    assert b.counters[evicted] == 5
    a = await start(nursery, ring)  # on 127.0.0.1 too, arriving after them: gets in
    assert await a.call(b.addr, "echo", 1, timeout=2) == 1
    assert b.counters[evicted] == 6
    # Once all 5 handshakes are taken, a newcomer from a third address evicts the oldest.
    for _ in range(2):
        third = trio.socket.socket()
        await third.bind(("127.0.0.4", 0))
        await third.connect(b.addr)
        silent.append(third)
    await eventually(lambda: b.counters[evicted] == 7, "evicted for a third address")
    other_host = Transport(WORLD, ring, ("127.0.0.2", 0), limits=FAST)
    await nursery.start(other_host.serve)
    assert await other_host.call(b.addr, "echo", "me too", timeout=2) == "me too"
    # The silent ones left get nowhere: closed after the handshake timeout.
    await eventually(lambda: b.counters["tcp.dropped.handshake-timeout"] == 4, "timeouts", 3)
    assert b._server.admission.handshakes() == 0
    # Said where an operator looks: one WARNING per reason, however many addresses.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("refused: max_handshakes reached" in m for m in warnings) == 1
    assert sum("dropped: handshake-timeout" in m for m in warnings) == 1
    for s in silent:
        s.close()
    assert await a.call(b.addr, "echo", 2, timeout=2) == 2  # the pooled one still serves


async def test_peers_sharing_an_address_are_not_refused(nursery) -> None:
    """49 peers on 127.0.0.1 (50 daemons on one machine; the server once allowed 16 per
    address) all get served, with the default limits."""
    ring = KeyRing.generate()
    b = await start(nursery, ring, limits=Limits())
    serve_echo(b)
    peers = [await start(nursery, ring) for _ in range(49)]
    for i, p in enumerate(peers):
        assert await p.call(b.addr, "echo", i, timeout=2) == i
    assert b.stats()["connections"]["in"] == 49
    assert not any(k.startswith("tcp.refused") for k in b.counters)


async def test_requests_in_flight_are_bounded_by_not_reading(nursery) -> None:
    ring = KeyRing.generate()
    a = await start(nursery, ring)
    b = await start(nursery, ring, limits=Limits(max_inflight_per_conn=3))
    running = peak = 0

    async def slow(peer: PeerAddr, n: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await trio.sleep(0.02)
        running -= 1
        return n

    b.register("slow", slow)
    results = []

    async def one(n: int) -> None:
        results.append(await a.call(b.addr, "slow", n, timeout=5))

    async with trio.open_nursery() as calls:
        for n in range(20):
            calls.start_soon(one, n)
    assert sorted(results) == list(range(20)) and peak == 3
    assert b.counters["tcp.backpressure"] > 0


# A server in a process of its own, allowed few descriptors: argv[1] is its key (base64).
_FEW_DESCRIPTORS_SERVER = """
import base64, resource, sys, trio
from drekifs.cluster.keyring import KeyRing
from drekifs.cluster.limits import Limits
from drekifs.cluster.transport import Transport

async def main():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    ring = KeyRing((base64.b64decode(sys.argv[1]),))
    t = Transport("inf.random.sh", ring, ("127.0.0.1", 0), limits=Limits(handshake_timeout=60))
    async def echo(peer, args):
        return args
    t.register("echo", echo)
    async with trio.open_nursery() as nursery:
        await nursery.start(t.serve)
        print(t.addr[1], flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)
        nursery.cancel_scope.cancel()

trio.run(main)
"""


async def test_out_of_descriptors_a_handshake_makes_room(nursery) -> None:
    """A server whose descriptors are all held by connections that never authenticate still
    takes a real peer: accept() failing for want of one closes the oldest handshake."""
    ring = KeyRing.generate()
    key = base64.b64encode(ring.primary).decode()
    server = await trio.lowlevel.open_process(
        [sys.executable, "-c", _FEW_DESCRIPTORS_SERVER, key],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    silent = []
    try:
        assert server.stdout is not None and server.stdin is not None
        port = int(await server.stdout.receive_some(100))
        for i in range(100):  # more than 64 descriptors' worth, held open
            s = trio.socket.socket()
            await s.bind((f"127.0.1.{1 + i % 50}", 0))
            await s.connect((LOCAL, port))
            silent.append(s)
        a = await start(nursery, ring)
        assert await a.call((LOCAL, port), "echo", "in", timeout=3) == "in"
    finally:
        for s in silent:
            s.close()
        with contextlib.suppress(trio.BrokenResourceError):
            await server.stdin.aclose()
        with trio.move_on_after(5):
            await server.wait()
        server.kill()


async def test_a_client_that_reads_no_replies_is_dropped(nursery) -> None:
    ring = KeyRing.generate()
    b = await start(nursery, ring, limits=Limits(send_timeout=0.3))

    async def big(peer: PeerAddr, args: Any) -> bytes:
        return b"x" * (1 << 20)

    b.register("big", big)
    keys = Keys.of(ring)
    async with raw_client(b, ring) as (s, session):
        for seq in range(1, 40):
            request = frames.pack_request(seq, seq, frames.pack("big"), frames.pack(None))
            await s.send(frames.frame(keys.seal(request, session.request_aad)))
        await eventually(lambda: b.counters["tcp.dropped.send-timeout"] == 1, "the drop")
        await eventually(lambda: b.stats()["connections"]["in"] == 0, "the close")


async def test_a_silent_client_after_its_requests_is_closed_when_idle(nursery) -> None:
    """A client written from the wire format alone, which then says nothing."""
    ring = KeyRing.generate()
    b = await start(nursery, ring, limits=Limits(idle_timeout=0.3))
    serve_echo(b)
    keys = Keys.of(ring)
    async with raw_client(b, ring) as (s, session):
        request = frames.pack_request(1, 7, frames.pack("echo"), frames.pack("raw"))
        await s.send(frames.frame(keys.seal(request, session.request_aad)))
        decoder = FrameDecoder(1 << 20)
        while (body := decoder.next()) is None:
            decoder.feed(await s.recv(4096))
        assert frames.unpack_reply(keys.open(body, session.reply_aad)) == (0, 7, True, "raw")
        with trio.fail_after(2):
            assert await s.recv(10) == b""  # closed by the server
    assert b.counters["tcp.closed.idle"] == 1


async def test_calls_fail_cleanly_when_the_transport_stops() -> None:
    ring = KeyRing.generate()
    a = Transport(WORLD, ring, (LOCAL, 0), limits=FAST)
    with pytest.raises(RuntimeError, match="not serving"):
        await a.call((LOCAL, 1), "echo", 1, timeout=1)
    with pytest.raises(RuntimeError, match="not serving"):
        a.send_datagram((LOCAL, 1), "too early")
    async with trio.open_nursery() as nursery:
        await nursery.start(a.serve)
        b = await start(nursery, ring)

        async def hang(peer: PeerAddr, args: Any) -> Any:
            await trio.sleep_forever()

        b.register("hang", hang)
        failed: list[BaseException] = []

        async def caller() -> None:
            with pytest.raises(PeerUnreachable) as e:
                await a.call(b.addr, "hang", None, timeout=5)
            failed.append(e.value)

        nursery.start_soon(caller)
        await eventually(lambda: b.counters["tcp.accepted"], "the call")
        await a.aclose()
        await eventually(lambda: failed, "the call to fail")
        nursery.cancel_scope.cancel()
    with pytest.raises(PeerUnreachable, match="closed"):
        await a.call(b.addr, "echo", 1, timeout=1)
    a.send_datagram(b.addr, "lost")  # as datagrams may be
    assert a.counters["udp.send-failed"] == 1
    assert a.stats()["state"] == "closed"


# -- decoders never raise -------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=20), st.integers(0, 2000))
def test_the_frame_decoder_never_raises(chunks: list[bytes], max_frame: int) -> None:
    decoder = FrameDecoder(max_frame)
    out = []
    for chunk in chunks:
        decoder.feed(chunk)
        while (body := decoder.next()) is not None:
            out.append(body)
    data = b"".join(chunks)
    consumed = b"".join(frames.frame(b) for b in out)
    assert data.startswith(consumed)
    assert all(len(b) <= max_frame for b in out)
    if not decoder.oversized:
        assert decoder.buffered() == len(data) - len(consumed)


KEYS = Keys.of(KeyRing((b"k" * 32,)))
DECODERS = (
    frames.unpack_request,
    frames.unpack_reply,
    frames.unpack_stamp,
    frames.unpack_message,
    frames.unpack_instance,
    frames.unpack_welcome,
    frames.unpack_retry,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.booleans())
def test_payload_decoders_raise_nothing_but_malformed(data: bytes, sealed: bool) -> None:
    if sealed:  # past the authentication: the msgpack and shape checks
        data = KEYS.seal(data, b"aad")
    for decode in DECODERS:
        with contextlib.suppress(Malformed):
            decode(KEYS.open(data, b"aad"))


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary() | st.text(),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
        ),
        max_leaves=10,
    )
)
def test_any_msgpack_value_is_malformed_or_a_well_shaped_message(value: Any) -> None:
    packed = frames.pack(value)
    for decode in DECODERS:
        try:
            decode(packed)
        except Malformed as e:
            assert e.reason == "shape"


def test_payloads_round_trip() -> None:
    m, a = frames.pack("store.read"), frames.pack({"s": "x", "o": 2**40})
    assert frames.unpack_request(frames.pack_request(3, 2**40, m, a)) == (
        3,
        2**40,
        "store.read",
        {"s": "x", "o": 2**40},
    )
    assert frames.unpack_reply(frames.pack_reply(0, 1, True, frames.pack(None))) == (
        0,
        1,
        True,
        None,
    )
    err = frames.pack([errno.ENOENT, "gone"])
    assert frames.unpack_reply(frames.pack_reply(5, 6, False, err)) == (
        5,
        6,
        False,
        (errno.ENOENT, "gone"),
    )
    plain = frames.pack_datagram(1, 2**64 - 1, frames.pack([1]))
    assert frames.unpack_stamp(plain) == (1, 2**64 - 1)
    assert frames.unpack_message(plain[frames.STAMP.size :]) == [1]
    instance = b"\x07" * frames.INSTANCE_BYTES
    assert frames.unpack_welcome(frames.pack_welcome(5, instance)) == (5, instance)
    assert frames.unpack_retry(frames.pack_retry(9)) == 9
    with pytest.raises(Malformed, match="shape"):
        frames.unpack_instance(frames.NO_INSTANCE)
    with pytest.raises(Malformed, match="not-msgpack"):
        frames.unpack_request(b"\xc1")
    with pytest.raises(Malformed, match="not-msgpack"):
        frames.unpack_request(frames.pack(1) + b"extra")
