"""drekifs.logs.LogLimiter: one line per key and interval, then the count of the repeats."""

from __future__ import annotations

import errno
import logging
import math
import os

import pytest
import trio

from drekifs import logs

from .test_operations import CTX, errno_of, lookup_path, make_ops


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def lines():
    """A logger of its own and what it wrote, formatted."""
    logger = logging.getLogger("test_logs")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    got: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(f"{record.levelname} {record.getMessage()}")

    handler = Keep()
    logger.addHandler(handler)
    yield logger, got
    logger.removeHandler(handler)


def test_first_line_at_once_repeats_counted_and_summarized(lines) -> None:
    logger, got = lines
    clock = Clock()
    limiter = logs.LogLimiter(logger, interval=10.0, clock=clock)
    key = ("EHOSTDOWN", "w.test:dc:b::local")
    assert limiter.log(logging.INFO, key, "lookup %s: %s", "w.test:dc:b::local::x", "down")
    for i in range(196):  # 20 a second
        clock.now += 0.05
        urn = f"w.test:dc:b::local::{i}"
        assert not limiter.log(logging.INFO, key, "lookup %s: %s", urn, "down")
    assert got == ["INFO lookup w.test:dc:b::local::x: down"]

    limiter.flush()  # the interval is not over: nothing yet
    assert len(got) == 1
    clock.now = 110.0
    limiter.flush()
    assert got[1] == "INFO lookup w.test:dc:b::local::195: down (and 196 more like it in 9.8 s)"
    limiter.flush()  # said once
    assert len(got) == 2

    # After the interval: a first line again, at once.
    clock.now = 115.0
    assert limiter.log(logging.INFO, key, "lookup %s: %s", "w.test:dc:b::local::y", "down")
    assert got[2] == "INFO lookup w.test:dc:b::local::y: down"


def test_the_next_occurrence_writes_a_pending_summary_first(lines) -> None:
    logger, got = lines
    clock = Clock()
    limiter = logs.LogLimiter(logger, interval=10.0, clock=clock)
    limiter.log(logging.INFO, "k", "first")
    clock.now += 1
    limiter.log(logging.WARNING, "k", "second")  # the summary keeps the highest level
    clock.now += 1
    limiter.log(logging.INFO, "k", "third")
    clock.now += 20  # nobody flushed meanwhile
    assert limiter.log(logging.INFO, "k", "fourth")
    assert got == ["INFO first", "WARNING third (and 2 more like it in 2.0 s)", "INFO fourth"]


def test_keys_are_apart_and_levels_filtered(lines) -> None:
    logger, got = lines
    clock = Clock()
    limiter = logs.LogLimiter(logger, interval=10.0, clock=clock)
    limiter.log(logging.INFO, ("EACCES", "a"), "a")
    limiter.log(logging.INFO, ("EACCES", "b"), "b")
    limiter.log(logging.INFO, ("EACCES", "a"), "a again")
    logger.setLevel(logging.WARNING)
    assert not limiter.log(logging.INFO, ("EACCES", "c"), "c")  # not even counted
    logger.setLevel(logging.DEBUG)
    limiter.flush(math.inf)  # at exit: everything
    assert got == ["INFO a", "INFO b", "INFO a again (and 1 more like it in 0.0 s)"]


def test_memory_is_bounded(lines) -> None:
    logger, got = lines
    clock = Clock()
    limiter = logs.LogLimiter(logger, interval=10.0, clock=clock, max_keys=10)
    for i in range(25):
        limiter.log(logging.INFO, i, "line %d", i)
        limiter.log(logging.INFO, i, "line %d", i)
    assert len(limiter._intervals) <= 10
    limiter.flush(math.inf)
    # Every key logged once and summarized once: early when the table was full.
    assert sorted(got) == sorted(
        [f"INFO line {i}" for i in range(25)]
        + [f"INFO line {i} (and 1 more like it in 0.0 s)" for i in range(25)]
    )


def test_summarize_writes_ended_intervals(lines) -> None:
    logger, got = lines

    async def main() -> None:
        limiter = logs.LogLimiter(logger, interval=0.5, clock=trio.current_time)
        limiter.log(logging.INFO, "k", "down")
        limiter.log(logging.INFO, "k", "down")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(logs.summarize, 0.1)
            with trio.fail_after(5):
                while len(got) < 2:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert got == ["INFO down", "INFO down (and 1 more like it in 0.0 s)"]


async def test_request_failures_name_urns_and_repeats_are_counted(tmp_path, caplog) -> None:
    """Through Operations (no kernel): an open file's log lines name its URN (not
    ``global@('w.test', (b'x',))``), and a failure repeated by a program is one line."""
    ops = make_ops(tmp_path)
    root = await lookup_path(ops, "global")
    info, attr = await ops.create(root.st_ino, b"x", 0o644, os.O_WRONLY, CTX)
    assert ops.describe("write", (info.fh,)) == "w.test::global::x"
    assert ops.describe("getattr", (attr.st_ino,)) == "w.test::global::x"
    caplog.set_level(logging.INFO, logger="drekifs.fs.operations")
    for _ in range(20):
        assert await errno_of(ops.setxattr(attr.st_ino, b"user.dreki.urn", b"", CTX)) == (
            errno.EPERM
        )
    said = [r.getMessage() for r in caplog.records if "setxattr" in r.getMessage()]
    assert said == ["setxattr w.test::global::x: Operation not permitted"]
    ops.failures.flush(math.inf)
    said = [r.getMessage() for r in caplog.records if "setxattr" in r.getMessage()]
    assert said[1].startswith("setxattr w.test::global::x: Operation not permitted (and 19 more")
