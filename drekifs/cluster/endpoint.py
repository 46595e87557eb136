"""What the calling and the serving side of a transport share: the world, the keys (swapped
as a whole on reload), the limits and the counters; and reading frames off a stream."""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field

import trio

from ..logs import LogLimiter
from . import frames
from .frames import FrameDecoder, Keys, Malformed
from .limits import Limits
from .net import PeerAddr, addr_text

log = logging.getLogger(__name__)

RECEIVE_BYTES = 1 << 16
YIELD_EVERY = 16  # frames next_frame returns without waiting before it lets others run
LOG_EVERY = 60.0  # seconds between log lines about one kind of refused traffic from one host
# What a broken connection raises from a read or a handshake write.
BROKEN = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


@dataclass(eq=False)
class Endpoint:
    world: bytes
    keys: Keys
    limits: Limits
    max_frame: int
    addr: PeerAddr  # where this transport listens (the real port once bound)
    counters: Counter[str]
    _logged: LogLimiter = field(default_factory=lambda: LogLimiter(log, LOG_EVERY))

    def drop(self, proto: str, reason: str, peer: object) -> None:
        """Count input dropped (``<proto>.dropped.<reason>``) and log it: one WARNING a minute
        per (protocol, reason, sender), then a count of the repeats (logs.LogLimiter), so that
        refused traffic shows in the log and a flood of junk does not flood it; each repeat at
        debug level."""
        self.counters[f"{proto}.dropped.{reason}"] += 1
        host = peer[0] if isinstance(peer, tuple) else str(peer)
        msg = "%s from %s dropped: %s (more of it counted in .dreki/cluster)"
        if not self._logged.log(logging.WARNING, (proto, reason, host), msg, proto, host, reason):
            log.debug("%s from %s dropped: %s", proto, addr_text(peer), reason)

    def drop_handshake(self, reason: str, host: str) -> None:
        """As :meth:`drop`, for a connection that has not proved a key: logged once a minute
        per reason rather than per sender, since addresses cost a flood nothing (160 of
        them made 160 lines a minute)."""
        self.counters[f"tcp.dropped.{reason}"] += 1
        msg = "tcp handshake from %s dropped: %s (more of it counted in .dreki/cluster)"
        key = ("tcp handshake", reason)
        if not self._logged.log(logging.WARNING, key, msg, host, reason):
            log.debug("tcp handshake from %s dropped: %s", host, reason)

    def warn(self, key: object, msg: str, *args: object) -> None:
        """A WARNING, once a minute per ``key`` (then a count of the repeats)."""
        self._logged.log(logging.WARNING, key, msg, *args)

    def refuse(self, why: str, who: str, text: str) -> None:
        """Count a connection refused or evicted (``tcp.refused.<why>``) and log it: one
        WARNING a minute per reason (naming the last one's source), then a count of the
        repeats, so that an operator sees lock-outs and a flood does not flood the log."""
        self.counters[f"tcp.refused.{why}"] += 1
        msg = "connection from %s refused: %s (more of it counted in .dreki/cluster)"
        if not self._logged.log(logging.WARNING, ("tcp.refused", why), msg, who, text):
            log.debug("connection from %s refused: %s", who, text)


async def next_frame(stream: trio.SocketStream, decoder: FrameDecoder) -> bytes | None:
    """The next frame's body; None when the stream ends between frames; Malformed (OVERSIZED,
    TRUNCATED) otherwise.

    Reads the descriptor itself rather than through ``stream.receive_some``, which yields to
    the scheduler after every successful read (a whole turn of the run loop per frame, a good
    part of a small call). This one waits only when there is nothing to read, and yields at
    least every ``YIELD_EVERY`` frames, so a peer that keeps the socket full cannot starve the
    other tasks (nor delay a cancellation for long)."""
    fd = stream.socket.fileno()
    while True:
        if decoder.unyielded >= YIELD_EVERY:
            # Before a frame is taken, never after: a cancellation delivered here (the
            # readers' idle deadlines pass under load) must leave the frame in the decoder.
            decoder.unyielded = 0
            await trio.lowlevel.checkpoint()
        body = decoder.next()
        if body is not None:
            decoder.unyielded += 1
            return body
        if decoder.oversized:
            raise Malformed(frames.OVERSIZED)
        if decoder.drained:
            # The last read emptied the socket: more is unlikely to be there yet, so wait
            # (epoll says at once if it is) rather than pay for a read that fails.
            decoder.unyielded = 0
            decoder.drained = False
            await trio.lowlevel.wait_readable(fd)
        try:
            data = os.read(fd, RECEIVE_BYTES)
        except BlockingIOError:
            decoder.drained = True
            continue
        decoder.drained = len(data) < RECEIVE_BYTES
        if not data:
            if decoder.buffered():
                raise Malformed(frames.TRUNCATED)
            return None
        decoder.feed(data)


async def read_exact(stream: trio.SocketStream, decoder: FrameDecoder, n: int) -> bytes:
    """The next ``n`` raw bytes (a hello); Malformed(TRUNCATED) if the stream ends first."""
    while True:
        out = decoder.take(n)
        if out is not None:
            return out
        data = await stream.receive_some(RECEIVE_BYTES)
        if not data:
            raise Malformed(frames.TRUNCATED)
        decoder.feed(data)
