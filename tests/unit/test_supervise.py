"""supervise: a failed component starts again, with backoff, and says so."""

from __future__ import annotations

import itertools

import trio
import trio.testing

from drekifs.supervise import Health, supervise


async def test_a_failing_part_is_started_again_with_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts: list[float] = []

    async def part() -> None:
        starts.append(trio.current_time())
        if len(starts) <= 4:
            raise ValueError(f"bad message {len(starts)}")
        await trio.sleep(100)  # healthy for longer than `most`
        raise ValueError("again")

    health = Health("replication")
    with trio.move_on_after(200):
        await supervise(health, part, first=1, most=8)
    gaps = [round(b - a) for a, b in itertools.pairwise(starts)]
    # 1, 2, 4, 8 after each quick failure; after a long healthy run, 1 again.
    assert gaps[:5] == [1, 2, 4, 8, 101]
    assert health.restarts >= 5 and "ValueError: again" in health.last_error
    assert "replication.restarts" in health.lines()


async def test_returning_counts_as_a_failure(autojump_clock: trio.testing.MockClock) -> None:
    calls = 0

    async def part() -> None:
        nonlocal calls
        calls += 1

    health = Health("notifier")
    with trio.move_on_after(3.5):
        await supervise(health, part, first=1, most=60)
    assert calls == 3 and health.last_error == "returned" and not health.running
