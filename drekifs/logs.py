"""Log lines for failures that repeat: the first one at once, the repeats counted.

A failure that comes back with every request (a down owner polled 20 times a second, a
program retrying an EACCES in a loop) would otherwise write a line per request: 197 lines in
12 s, and the one line that matters scrolls away. A :class:`LogLimiter` keys each line by the
kind of failure and what it is about (an errno and a URN or a peer): the first line of a key
is logged at once and opens an interval; the repeats within it are only counted, and one line
at the end of the interval says how many there were, with the last one's text. Another
occurrence after that is logged at once again, as a first one.

The summaries are written by :func:`summarize`, run by the daemon (once a second it writes
those whose interval has ended), and at the latest by the next occurrence of the same key.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import trio

INTERVAL = 10.0  # seconds: at most one line, plus one summary, per key and interval
MAX_KEYS = 1000  # keys remembered; beyond, the oldest intervals are summarized early
SUMMARY_EVERY = 1.0  # seconds between two passes of summarize()

_limiters: weakref.WeakSet[LogLimiter] = weakref.WeakSet()


@dataclass(slots=True)
class _Interval:
    until: float  # when the interval opened by the line logged ends
    started: float  # when that line was logged
    last: float = 0.0  # when the last repeat came
    repeats: int = 0  # occurrences since, not logged
    level: int = logging.INFO  # the highest level among them
    msg: str = ""  # the last one's, unformatted
    args: tuple = ()


class LogLimiter:
    """One line per key and interval, plus a count of the repeats. Not thread-safe: one per
    event loop (the daemon's trio thread)."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self.max_keys = max_keys
        self._intervals: dict[Hashable, _Interval] = {}
        self._repeating = 0  # intervals with repeats to summarize: flush() is free without
        _limiters.add(self)

    def log(self, level: int, key: Hashable, msg: str, *args: Any, exc_info: bool = False) -> bool:
        """``logger.log(level, msg, *args)``, unless a line of ``key`` was logged less than an
        interval ago: then it is counted for the summary. True when it was logged now."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self.clock()
        known = self._intervals.get(key)
        if known is not None:
            if now < known.until:
                if not known.repeats:
                    self._repeating += 1
                known.repeats += 1
                known.last = now
                known.level = max(known.level, level)
                known.msg, known.args = msg, args
                return False
            self._end(key, known)
        elif len(self._intervals) >= self.max_keys:
            self.flush(now)
            if len(self._intervals) >= self.max_keys:  # all still open: summarize them now
                for k, i in list(self._intervals.items()):
                    self._end(k, i)
        self._intervals[key] = _Interval(now + self.interval, now)
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def flush(self, now: float | None = None) -> None:
        """Write the summaries of the intervals that have ended (all of them when ``now`` is
        ``math.inf``: at exit) and forget their keys."""
        if now is None:
            now = self.clock()
        ended = [(k, i) for k, i in self._intervals.items() if i.until <= now]
        for key, known in ended:
            self._end(key, known)

    def _end(self, key: Hashable, known: _Interval) -> None:
        del self._intervals[key]
        if known.repeats:
            self._repeating -= 1
            # The last repeat's own text, then the count: the line names what failed.
            self.logger.log(
                known.level,
                f"{known.msg} (and %d more like it in %.1f s)",
                *known.args,
                known.repeats,
                known.last - known.started,
            )


async def summarize(every: float = SUMMARY_EVERY) -> None:
    """Write the summaries of ended intervals, once every ``every`` seconds (run by the
    daemon; cancel to stop: then every pending summary is written)."""
    try:
        while True:
            await trio.sleep(every)
            for limiter in list(_limiters):
                if limiter._repeating:
                    limiter.flush()
    finally:
        for limiter in list(_limiters):
            limiter.flush(math.inf)
