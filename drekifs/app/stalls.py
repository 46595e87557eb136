"""Noticing when the daemon's trio loop stops running tasks, and where it was meanwhile.

Everything of a daemon shares one trio loop: FUSE requests, the LMDB writer's hand-offs, SWIM's
acks, Plumtree, anti-entropy. Work that holds the loop for long (a page of entries merged in one
go, a long Python loop) delays every ack, and a peer that acks late enough is suspected and
declared dead. :class:`StallWatch` makes such work visible: a trio task beats every ``period``;
a thread checks the beat and, when it is over ``threshold`` late, takes the stack of the loop's
thread (``sys._current_frames``) and logs it, once a minute at most, at WARNING. The counts go
to ``.dreki/loop``.

Costs: a task wake-up and a thread wake-up every 50 ms (a few µs each), nothing per request.
A stall is also what a machine short of CPU looks like (the loop's thread not scheduled): the
stack then shows wherever the loop happened to be.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback

import trio

log = logging.getLogger(__name__)

PERIOD = 0.05  # seconds between two beats of the loop
THRESHOLD = 0.25  # a beat this late is a stall: half of SWIM's probe timeout
LOG_EVERY = 60.0  # seconds between two log lines of stalls (the rest are counted)
STACK_LINES = 16  # innermost frames logged


class StallWatch:
    def __init__(self, threshold: float = THRESHOLD, period: float = PERIOD) -> None:
        self.threshold = threshold
        self.period = period
        self.stalls = 0  # stalls seen
        self.longest = 0.0  # seconds, the longest stall seen
        self.stalled = 0.0  # seconds, all stalls together
        self._beat = time.monotonic()
        self._loop_thread = 0
        self._stop = threading.Event()
        self._logged_at = -LOG_EVERY
        self._unlogged = 0

    def text(self) -> str:
        """For ``.dreki/loop``."""
        return (
            f"stalls {self.stalls}\nlongest_stall_ms {self.longest * 1e3:.0f}\n"
            f"stalled_ms {self.stalled * 1e3:.0f}\nthreshold_ms {self.threshold * 1e3:.0f}\n"
        )

    async def run(self) -> None:
        """Beat until cancelled, with the watching thread beside."""
        self._loop_thread = threading.get_ident()
        self._beat = time.monotonic()
        watcher = threading.Thread(target=self._watch, name="drekifs-stall-watch", daemon=True)
        watcher.start()
        try:
            while True:
                await trio.sleep(self.period)
                self._beat = time.monotonic()
        finally:
            self._stop.set()

    def _watch(self) -> None:
        in_stall, seen_at = False, 0.0
        while not self._stop.wait(self.period):
            beat = self._beat
            late = time.monotonic() - beat - self.period
            if late <= self.threshold:
                if in_stall:
                    self._ended(time.monotonic() - seen_at + self.threshold)
                in_stall = False
                continue
            if in_stall:
                continue
            in_stall, seen_at = True, time.monotonic()
            self.stalls += 1
            self._report(late)
        if in_stall:
            self._ended(time.monotonic() - seen_at + self.threshold)

    def _ended(self, seconds: float) -> None:
        self.longest = max(self.longest, seconds)
        self.stalled += seconds

    def _report(self, late: float) -> None:
        now = time.monotonic()
        if now - self._logged_at < LOG_EVERY:
            self._unlogged += 1
            return
        frame = sys._current_frames().get(self._loop_thread)
        innermost = traceback.extract_stack(frame)[-STACK_LINES:] if frame else []
        where = "".join(traceback.format_list(innermost)) or "(no stack)\n"
        more = f" ({self._unlogged} more since the last line)" if self._unlogged else ""
        self._logged_at, self._unlogged = now, 0
        log.warning(
            "the daemon's loop has not run for %.0f ms%s; it was in:\n%s", late * 1e3, more, where
        )
