"""Run a component again when it fails, with backoff: one failed part never stops the daemon,
and never stays down for good.

:func:`supervise` runs ``start()`` in a loop: when it raises, the failure is logged and
counted in a :class:`Health` (which ``.dreki/`` shows), and the component is started again
after a delay that doubles from ``first`` to ``most`` seconds; a run that lasted ``most``
seconds or more counts as healthy, so the next failure waits ``first`` again. Cancellation
(the daemon stopping) ends it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

log = logging.getLogger(__name__)


@dataclass
class Health:
    """What ``.dreki/cluster`` says of a supervised component."""

    name: str
    running: bool = False
    restarts: int = 0
    last_error: str = ""
    next_start_in: float = 0.0

    def lines(self) -> str:
        state = "running" if self.running else f"restarting in {self.next_start_in:.0f}s"
        out = f"{self.name}.state {state}\n{self.name}.restarts {self.restarts}\n"
        if self.last_error:
            out += f"{self.name}.last_error {self.last_error}\n"
        return out


async def supervise(
    health: Health,
    start: Callable[[], Awaitable[object]],
    *,
    first: float = 1.0,
    most: float = 60.0,
) -> None:
    delay = first
    while True:
        started = trio.current_time()
        health.running = True
        try:
            await start()
            reason = "returned"  # a component runs until cancelled: returning is a failure
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
            log.exception("%s failed; starting it again in %.0f s", health.name, delay)
        health.running = False
        health.restarts += 1
        health.last_error = reason[:300]
        if trio.current_time() - started >= most:
            delay = first
        health.next_start_in = delay
        if reason == "returned":
            log.error("%s stopped; starting it again in %.0f s", health.name, delay)
        await trio.sleep(delay)
        delay = min(most, delay * 2)
