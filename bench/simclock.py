"""What the simulation benchmarks share: running a scenario on trio's MockClock, quantiles."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import trio
from trio.testing import MockClock


def simulate(main: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``main`` on a MockClock that jumps as soon as every task waits; (its result, wall
    seconds)."""
    wall = time.perf_counter()
    result = trio.run(main, clock=MockClock(autojump_threshold=0))
    return result, time.perf_counter() - wall


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nearest rank, at most the largest)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
