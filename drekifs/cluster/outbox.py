"""Writing frames to a connection without a task switch, in order, with backpressure.

:meth:`Outbox.write` is synchronous: it hands the bytes to the kernel at once when the socket
buffer has room (the common case: a request or a reply goes out with no await, so no caller's
cancellation can ever cut a frame in half), and otherwise queues them for the connection's
writer task (:meth:`Outbox.run`), which waits until the socket is writable. A writer that cannot
make progress for ``stall_timeout`` gives up, and the connection with it: a peer that reads
nothing holds no more than the queue.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import trio

RESET = "reset"
STALLED = "send-timeout"
CLOSED = "closed"


class Outbox:
    """``on_failure(why)`` is called once, synchronously, when a write fails or the writer
    stalls (not on close()): the owner ends the connection there and then."""

    def __init__(
        self,
        sock: trio.socket.SocketType,
        on_failure: Callable[[str], None],
        high_water: int = 1 << 20,
    ) -> None:
        # os.write on the descriptor is send(2) without flags, and never blocks (trio made the
        # socket non-blocking). The connection's owner calls close() before closing the
        # socket, so a reused descriptor number is never written to.
        self._fd = sock.fileno()
        self.high_water = high_water
        self._on_failure = on_failure
        self.failed: str | None = None
        self._queue = bytearray()
        self._queued = trio.Event()  # set while the queue has bytes for the writer
        self._drained = trio.Event()  # set when the queue empties; replaced when it fills

    @property
    def backlog(self) -> int:
        """Bytes queued, not yet taken by the kernel."""
        return len(self._queue)

    def write(self, data: bytes) -> None:
        """Send ``data`` after everything written before; never blocks, never raises (a
        failure goes to ``on_failure``)."""
        if self.failed is not None:
            return
        if self._queue:
            self._queue += data
            return
        try:
            n = os.write(self._fd, data)
        except BlockingIOError:
            n = 0
        except OSError:  # EPIPE, ECONNRESET, EBADF once closed
            self._fail(RESET)
            return
        if n < len(data):
            self._queue += memoryview(data)[n:]
            self._drained = trio.Event()
            self._queued.set()

    async def wait_room(self) -> None:
        """Until the queue is under the high-water mark (or the outbox has failed)."""
        while len(self._queue) > self.high_water and self.failed is None:
            await self._drained.wait()

    def close(self) -> None:
        """No more writes (before the socket is closed)."""
        self._fail(CLOSED)

    async def run(self, stall_timeout: float) -> None:
        """The writer task: flush what write() queues, until the outbox fails or closes."""
        while self.failed is None:
            await self._queued.wait()
            while self._queue and self.failed is None:
                with trio.move_on_after(stall_timeout) as scope:
                    await trio.lowlevel.wait_writable(self._fd)
                if scope.cancelled_caught:
                    self._fail(STALLED)
                    break
                try:
                    n = os.write(self._fd, self._queue)
                except BlockingIOError:
                    continue
                except OSError:
                    self._fail(RESET)
                    break
                del self._queue[:n]
            if not self._queue:
                self._queued = trio.Event()
                self._drained.set()

    def _fail(self, why: str) -> None:
        if self.failed is None:
            self.failed = why
            self._fd = -1
            self._queue.clear()
            self._queued.set()  # wake the writer, so run() returns
            self._drained.set()  # and whoever waits for room
            if why != CLOSED:
                self._on_failure(why)
