"""The stall watch: a loop held up is counted, and logged with where it was."""

from __future__ import annotations

import logging
import time

import pytest
import trio

from drekifs.app.stalls import StallWatch


def hold_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # blocking on purpose: what a long synchronous step does


async def test_a_held_loop_is_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="drekifs.app.stalls")
    watch = StallWatch(threshold=0.1, period=0.02)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch.run)
        await trio.sleep(0.1)
        assert watch.stalls == 0  # beating freely
        hold_the_loop(0.4)
        with trio.fail_after(5):
            while watch.longest == 0:  # the stall ends once the loop beats again
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    assert watch.stalls == 1
    assert 0.25 < watch.longest < 2.0
    assert "hold_the_loop" in caplog.text  # the stack of the loop's thread, taken mid-stall
    assert "time.sleep" in caplog.text  # its innermost frames
    assert "stalls 1\n" in watch.text()
