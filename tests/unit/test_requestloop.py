"""pyfuse3's request loop as drekifs runs it: the reader seat, the poller, the hand-off, and
the pyfuse3 it goes into.

Real pipes and trio; the mounted side (a request waiting on a stopped peer does not hold up
the others) is in mounted/test_cluster.py. The seat's tests run on a mock clock that stands
still, so its patrol (which would hide a missing hand-off) fires only where a test moves the
clock.
"""

from __future__ import annotations

import logging
import os
import time
import tomllib
import types
from collections.abc import Generator, Iterator
from pathlib import Path

import pyfuse3
import pytest
import trio
import trio.testing
from packaging.requirements import Requirement

from drekifs.fs import requestloop
from drekifs.fs.requestloop import PATROL_S, YIELD_EVERY_NS, Poller, ReaderSeat, RequestLoop

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


async def test_the_seat_stays_with_its_worker_until_handed_on(
    mock_clock: trio.testing.MockClock,
) -> None:
    seat = ReaderSeat()
    order: list[str] = []

    async def standby() -> None:
        async with seat:
            order.append("standby")

    async with seat:
        pass  # the first worker sits down without waiting
    async with trio.open_nursery() as nursery:
        async with seat:  # back for the next request, seat empty: no switch
            nursery.start_soon(standby)
            await trio.testing.wait_all_tasks_blocked()
            assert seat.parked == 1
        # Left as after reading a request: the standby stays parked...
        await trio.testing.wait_all_tasks_blocked()
        assert order == [] and seat.parked == 1
        async with seat:  # ...and the worker takes the seat again at once.
            order.append("worker")
        seat.handoff()  # the worker's request waits: the standby reads the next ones
        await trio.testing.wait_all_tasks_blocked()
    assert order == ["worker", "standby"]
    assert not seat.taken and seat.parked == 0


async def test_a_worker_leaving_on_an_error_hands_the_seat_on(
    mock_clock: trio.testing.MockClock,
) -> None:
    seat = ReaderSeat()
    got: list[str] = []

    async def standby() -> None:
        async with seat:
            got.append("standby")

    async with trio.open_nursery() as nursery:
        with pytest.raises(trio.ClosedResourceError):
            async with seat:
                nursery.start_soon(standby)
                await trio.testing.wait_all_tasks_blocked()
                raise trio.ClosedResourceError  # as pyfuse3's wait on a closed fd
        await trio.testing.wait_all_tasks_blocked()
        assert got == ["standby"]


async def test_more_idle_workers_than_pyfuse3_keeps_hands_the_seat_on(
    mock_clock: trio.testing.MockClock,
) -> None:
    # pyfuse3 ends a worker's loop when more than min_tasks are idle: the one leaving the
    # seat will not be back.
    seat = ReaderSeat(min_tasks=1)
    got: list[int] = []

    async def standby(i: int) -> None:
        async with seat:
            got.append(i)

    async with trio.open_nursery() as nursery:
        async with seat:
            nursery.start_soon(standby, 1)
            nursery.start_soon(standby, 2)
            await trio.testing.wait_all_tasks_blocked()
            assert seat.parked == 2
        await trio.testing.wait_all_tasks_blocked()
        assert len(got) == 1 and seat.parked == 1  # one took over at once, the clock stood still
        seat.handoff()
    assert sorted(got) == [1, 2]


async def test_a_seat_left_empty_is_taken_within_the_patrol_period(
    mock_clock: trio.testing.MockClock,
) -> None:
    # A worker ends its loop on its own (the session ended): nobody hands the seat on.
    seat = ReaderSeat()
    taken: list[str] = []

    async def standby() -> None:
        async with seat:
            taken.append("standby")

    async with trio.open_nursery() as nursery:
        async with seat:
            nursery.start_soon(standby)
            await trio.testing.wait_all_tasks_blocked()
        await trio.testing.wait_all_tasks_blocked()
        assert taken == [] and seat.parked == 1  # the clock stands still: no patrol yet
        mock_clock.jump(PATROL_S)
    assert taken == ["standby"]


async def test_the_poller_finds_a_request_already_there(pipe: tuple[int, int]) -> None:
    r, w = pipe
    poller = Poller(poll_us=100)
    os.write(w, b"x")
    with trio.fail_after(1):
        await poller.wait_readable(r)
        await poller.wait_readable(r)  # still readable: nothing was read


@pytest.mark.parametrize("poll_us", [0, 100])
async def test_the_poller_sleeps_when_nothing_comes(pipe: tuple[int, int], poll_us: int) -> None:
    r, w = pipe
    poller = Poller(poll_us=poll_us)

    async def later() -> None:
        await trio.sleep(0.05)
        os.write(w, b"x")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(later)
        t0 = time.monotonic()
        with trio.fail_after(5):
            await poller.wait_readable(r)  # slept in trio: later() ran meanwhile
        assert time.monotonic() - t0 >= 0.04


async def test_polling_lets_the_other_tasks_run(pipe: tuple[int, int]) -> None:
    # A worker that always finds a request waiting still yields every YIELD_EVERY_NS.
    r, w = pipe
    os.write(w, b"x")
    poller = Poller(poll_us=100)
    turns = 0

    async def other() -> None:
        nonlocal turns
        while True:
            await trio.lowlevel.checkpoint()
            turns += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        await trio.lowlevel.checkpoint()
        turns = 0
        t0 = time.perf_counter_ns()
        while time.perf_counter_ns() - t0 < 20 * YIELD_EVERY_NS:
            await poller.wait_readable(r)
        seen = turns
        nursery.cancel_scope.cancel()
    # About one turn per YIELD_EVERY_NS (20); without the rule none. Low, for a VM that stalls.
    assert seen >= 3


async def test_the_poller_stops_polling_while_polls_do_not_pay(pipe: tuple[int, int]) -> None:
    r, w = pipe
    poller = Poller(poll_us=100)

    async def later() -> None:
        await trio.sleep(0.002)  # well past the poll time: a poll would not have served it
        os.write(w, b"x")

    for _ in range(2 * requestloop.HIT_WINDOW):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(later)
            await poller.wait_readable(r)
        os.read(r, 1)
    assert poller.hit_rate < requestloop.HIT_RATE_TO_POLL  # it sleeps at once now

    # Requests that come at once (measured on its sleeps) bring the polling back.
    os.write(w, b"x")
    for _ in range(2 * requestloop.HIT_WINDOW):
        await poller.wait_readable(r)
    assert poller.hit_rate >= requestloop.HIT_RATE_TO_POLL


async def _sync_value() -> int:
    return 7


async def _sync_error() -> int:
    raise pyfuse3.FUSEError(5)


async def _waits_then_fails() -> int:
    await trio.lowlevel.checkpoint()
    raise pyfuse3.FUSEError(5)


async def test_run_answers_a_request_that_does_not_wait() -> None:
    loop = RequestLoop()
    assert await loop.run(_sync_value()) == 7
    with pytest.raises(pyfuse3.FUSEError):
        await loop.run(_sync_error())
    with pytest.raises(pyfuse3.FUSEError):  # an error after the first wait
        await loop.run(_waits_then_fails())


async def test_run_hands_the_seat_on_when_a_request_waits(
    mock_clock: trio.testing.MockClock,
) -> None:
    loop = RequestLoop()
    seat = loop.seat
    got: list[str] = []
    release = trio.Event()

    async def slow_request() -> str:
        await release.wait()  # an RPC to another peer, an fsync
        return "done"

    async def standby() -> None:
        async with seat:
            got.append("standby reads")

    async with trio.open_nursery() as nursery:
        async with seat:
            nursery.start_soon(standby)
            await trio.testing.wait_all_tasks_blocked()

        async def worker() -> None:
            got.append(await loop.run(slow_request()))

        nursery.start_soon(worker)
        await trio.testing.wait_all_tasks_blocked()
        assert got == ["standby reads"]  # while the slow request still waits
        release.set()
    assert got == ["standby reads", "done"]

    # Cancelled while waiting: the cancellation reaches the request's own await.
    with trio.CancelScope() as scope:
        scope.cancel()
        await loop.run(trio.sleep_forever())
    assert scope.cancelled_caught


def test_resumed_passes_throw_and_close_to_the_coroutine() -> None:
    cleaned: list[str] = []

    @types.coroutine
    def waits() -> Generator[str, object, str]:
        try:
            got = yield "first"
            return f"got {got}"
        finally:
            cleaned.append("finally")

    coro = RequestLoop().run(waits())  # type: ignore[arg-type]
    assert coro.send(None) == "first"  # handed up, as to trio
    with pytest.raises(StopIteration) as done:
        coro.send("value")
    assert done.value.value == "got value" and cleaned == ["finally"]

    coro = RequestLoop().run(waits())  # type: ignore[arg-type]
    coro.send(None)
    with pytest.raises(KeyError):
        coro.throw(KeyError("thrown"))
    assert cleaned == ["finally", "finally"]

    coro = RequestLoop().run(waits())  # type: ignore[arg-type]
    coro.send(None)
    coro.close()
    assert cleaned == ["finally", "finally", "finally"]


def test_install_puts_the_seat_and_the_poller_into_pyfuse3() -> None:
    assert pyfuse3.trio is trio
    loop = requestloop.install(poll_us=50)
    try:
        assert loop is not None and loop.installed
        shim = pyfuse3.trio
        assert shim is loop.trio is not trio
        assert shim.Lock() is shim.Lock() is loop.seat  # pyfuse3 makes one
        assert shim.lowlevel.wait_readable.__self__ is loop.poller
        assert loop.poller.poll_ns == 50_000
        # The rest is trio's own.
        assert shim.open_nursery is trio.open_nursery
        assert shim.ClosedResourceError is trio.ClosedResourceError
        assert shim.lowlevel.current_task is trio.lowlevel.current_task
        assert shim.lowlevel.notify_closing is trio.lowlevel.notify_closing
        # pyfuse3.trio is one per process: a second loop is refused, the first stays.
        with pytest.raises(RuntimeError, match="already"):
            requestloop.install(poll_us=50)
        assert pyfuse3.trio is loop.trio
    finally:
        if loop is not None:
            loop.uninstall()
    assert pyfuse3.trio is trio and not loop.installed
    loop.uninstall()  # not installed: nothing
    assert pyfuse3.trio is trio
    again = requestloop.install(poll_us=50)  # undone cleanly: another may go in
    assert again is not None and again.installed
    again.uninstall()
    assert pyfuse3.trio is trio


@pytest.mark.parametrize("version", ["4.0.0", "3.5.1", "3.6.0", "3.2.3", "3.5"])
def test_install_leaves_a_pyfuse3_it_was_not_checked_against_alone(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, version: str
) -> None:
    # 3.5.1 too: a later release of a supported series may rework the worker loop.
    monkeypatch.setattr(pyfuse3, "__version__", version)
    with caplog.at_level(logging.WARNING, logger=requestloop.__name__):
        assert requestloop.install(poll_us=50) is None
    assert pyfuse3.trio is trio
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert f"pyfuse3 {version}: not a release" in record.getMessage()
    assert "3.5.0" in record.getMessage()  # says which ones it was checked against


def test_install_leaves_another_trio_alone(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    other = types.ModuleType("pyfuse3.asyncio")  # as pyfuse3.asyncio.enable() puts there
    monkeypatch.setattr(pyfuse3, "trio", other)
    with caplog.at_level(logging.WARNING, logger=requestloop.__name__):
        assert requestloop.install(poll_us=50) is None
    assert pyfuse3.trio is other
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


def test_the_installed_pyfuse3_is_one_the_loop_supports() -> None:
    # Fails on an upgrade of pyfuse3 before its worker loop (internal.pxi) was read: the daemon
    # would run on pyfuse3's own loop, 1.7-1.8x slower for a cp -a.
    assert pyfuse3.__version__ in requestloop.SUPPORTED_PYFUSE3, (
        f"pyfuse3 {pyfuse3.__version__}: read its worker loop (see fs/requestloop.py), then "
        "add it to SUPPORTED_PYFUSE3 and to pyproject.toml's pin"
    )


def test_the_pin_admits_exactly_the_supported_releases() -> None:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    [pin] = [Requirement(d) for d in deps if Requirement(d).name == "pyfuse3"]
    for version in requestloop.SUPPORTED_PYFUSE3:
        assert pin.specifier.contains(version, prereleases=False), version
    # Around them: the release before the first, and whatever follows the last.
    for version in ("3.2.3", "3.5.0.post1", "3.5.1", "3.6.0", "4.0.0"):
        assert not pin.specifier.contains(version, prereleases=True), version


# A pyfuse3 filesystem of one directory, in its own process (a FUSE server that stopped
# answering would hang whoever stats it): mounts with the loop installed, counts the calls of
# the loop's Lock and wait_readable, stats the mount, prints the counts.
