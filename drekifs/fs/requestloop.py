"""How pyfuse3's workers wait for the next request: a short poll before sleeping, and one
worker at a time unless a request has to wait.

``pyfuse3.main()`` runs worker tasks that take turns waiting on ``/dev/fuse``: a ``trio.Lock``
says whose turn it is, ``trio.lowlevel.wait_readable`` sleeps until a request comes. On a VM,
where most nodes run, both cost more than most of our handlers (measured on the 2-vCPU test VM):

- A request that finds the daemon asleep waits until the hypervisor wakes its vCPU: a pipe
  round trip between two processes takes 64-94 us there, 18-29 us when the server polls.
  ``cp -a`` and ``tar`` make their requests one after the other, so they pay it on each one.
- ``trio.Lock`` passes through the scheduler on every acquire (~11 us), and pyfuse3's two idle
  workers hand the lock to each other on every request: another pass.

pyfuse3 looks both up on its module global ``trio`` (the hook ``pyfuse3.asyncio`` uses), so
:func:`install` puts there a module that is trio but for two names, both a :class:`RequestLoop`'s:

- ``Lock``: a :class:`ReaderSeat`. The worker that read a request takes the seat back when it
  comes for the next one; the others stay parked. When a request has to wait (an RPC to another
  peer, an fsync), :meth:`RequestLoop.run`, which the request wrapper awaits, gives the seat to a
  parked worker at once, so one slow request never holds up the others.
- ``lowlevel.wait_readable``: :meth:`Poller.wait_readable` polls the fd for up to ``poll_us``
  before sleeping in trio, while polling pays, and yields to the other tasks at least every
  ``YIELD_EVERY_NS``.

Measured with ``cp -a`` of 5,000 small files into the global store: 0.55-0.6x the wall time and
0.6-0.65x the daemon's CPU of pyfuse3's own loop (bench/README.md).

That global is a seam, not an API: :data:`SUPPORTED_PYFUSE3` lists the releases whose worker
loop was read (sdists from PyPI; ``internal.pxi`` and ``__init__.pyx``, or ``pyfuse3.pyx`` in
3.3.0): in each, ``_wait_fuse_readable`` holds ``worker_data.read_lock``, made by
``trio.Lock()`` once per session, while it awaits ``trio.lowlevel.wait_readable(session_fd)``,
and ``_session_loop`` ends a worker when more than ``min_tasks`` are idle; ``trio`` is the
module's global, looked up at each use. 3.3.0 and 3.4.0 make the lock in ``init()``, 3.4.1 on
at the first wait; both come after :func:`install`, which the daemon calls before ``init()``.
On any other version :func:`install` returns None with a warning, and pyfuse3's own loop serves.
docs/decisions.md ("A hook pyfuse3 would need") says what pyfuse3 would need to offer instead.

The global is process-wide, and so is pyfuse3's session (one per process, in its module
globals): a process has at most one loop installed. :func:`install` refuses a second one, and
:meth:`RequestLoop.uninstall` gives pyfuse3 its own loop back for the next session.
"""

from __future__ import annotations

import logging
import select
import time
import types
from collections.abc import Coroutine, Generator
from typing import Any

import pyfuse3
import trio

log = logging.getLogger(__name__)

# Exactly the pyfuse3 releases whose worker loop was read (every release from 3.3.0 to 3.5.0;
# 3.4.1 was yanked, its loop is 3.4.2's): pyproject.toml's pin admits these only.
SUPPORTED_PYFUSE3 = ("3.3.0", "3.4.0", "3.4.1", "3.4.2", "3.5.0")
POLL_US = 100  # --poll-us's default: how long to poll /dev/fuse before sleeping
MIN_TASKS = 1  # pyfuse3.main()'s default: a worker leaves when more than this many are idle
PATROL_S = 0.1  # a parked worker checks this often that the seat was not left empty
YIELD_EVERY_NS = 2_000_000  # polling never keeps the other trio tasks waiting longer
# Poll only while it pays: while at least this share of recent waits (an average over about
# HIT_WINDOW of them) ended within the poll time. On a busy host a spinning vCPU takes time
# from the client's: there the requests come later and polling stops by itself.
HIT_RATE_TO_POLL = 0.5
HIT_WINDOW = 16

_SENT = object()  # Resumed's first value was handed on


class ReaderSeat:
    """Which worker waits on the FUSE fd: an async context manager in place of ``trio.Lock``.

    Unlike the lock, a worker leaving the seat does not wake the next one: it will most likely
    be back for the next request before that one could run. A parked worker gets the seat by
    :meth:`handoff`, when the worker in the seat leaves pyfuse3's loop (an exception, or more
    idle workers than pyfuse3 keeps), or by finding it empty, which a parked worker checks every
    ``PATROL_S`` (a worker that left the loop on its own: the session ended). So an idle daemon
    wakes 1/PATROL_S times a second per parked worker (one, usually).
    """

    def __init__(self, min_tasks: int = MIN_TASKS) -> None:
        self.taken = False
        self.min_tasks = min_tasks
        self._parked = trio.lowlevel.ParkingLot()

    async def __aenter__(self) -> None:
        if not self.taken:
            self.taken = True
            if not self._parked:
                # Nobody parked: pyfuse3 starts a worker after each read that finds no idle
                # one, so let the one it started last park before reading (else one per read
                # until this worker next sleeps). Shielded: the seat is ours now.
                await trio.lowlevel.cancel_shielded_checkpoint()
            return
        while True:
            with trio.move_on_after(PATROL_S):
                await self._parked.park()
                return  # handed the seat: taken stays True
            if not self.taken:
                self.taken = True
                return

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.taken = False
        # pyfuse3's worker ends its loop on an exception, and when more than min_tasks
        # workers are idle (those parked here): the seat must not wait for it then.
        if exc_type is not None or len(self._parked) > self.min_tasks:
            self.handoff()

    def handoff(self) -> None:
        """The worker that left the seat is busy for a while: a parked one takes it."""
        if not self.taken and self._parked:
            self.taken = True
            self._parked.unpark(count=1)

    @property
    def parked(self) -> int:
        return len(self._parked)


class Poller:
    """``wait_readable`` that polls for up to ``poll_us`` before sleeping in trio.

    It polls only while :attr:`hit_rate`, the recent share of waits that a poll would have
    served (measured on the polls, and on the sleeps when it does not poll), is at least
    ``HIT_RATE_TO_POLL``. A poll that finds a request returns without a checkpoint: a worker
    whose scope was cancelled (the daemon stopping) may read requests for up to
    ``YIELD_EVERY_NS`` more, and answers those its handlers answer without waiting.
    """

    def __init__(self, poll_us: int) -> None:
        self.poll_ns = poll_us * 1000
        self._polls: dict[int, select.poll] = {}
        self._slept = time.perf_counter_ns()  # when the caller last let other tasks run
        self.hit_rate = 1.0

    async def wait_readable(self, fd: Any) -> None:
        now = time.perf_counter_ns()
        polls = self.poll_ns and self.hit_rate >= HIT_RATE_TO_POLL
        if polls and now - self._slept < YIELD_EVERY_NS:
            poll = self._polls.get(fd)
            if poll is None:
                poll = self._polls[fd] = select.poll()
                poll.register(fd, select.POLLIN)
            # Never past the yield budget: a long poll would keep the other tasks waiting
            # (among them the replies a waiting request needs).
            deadline = min(now + self.poll_ns, self._slept + YIELD_EVERY_NS)
            while not poll.poll(0):
                if time.perf_counter_ns() >= deadline:
                    break
            else:
                self.hit_rate += (1.0 - self.hit_rate) / HIT_WINDOW
                return  # readable (or in error: pyfuse3's read says which)
        await trio.lowlevel.wait_readable(fd)
        self._slept = time.perf_counter_ns()
        hit = self._slept - now <= self.poll_ns  # a poll would have served it
        self.hit_rate += (hit - self.hit_rate) / HIT_WINDOW


class Resumed:
    """Awaits a coroutine that already yielded ``first``: the rest of ``await coro``."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self.coro = coro
        self.first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        return self  # type: ignore[return-value]

    def __iter__(self) -> Resumed:
        return self

    def __next__(self) -> Any:
        return self.send(None)

    def send(self, value: Any) -> Any:
        first = self.first
        if first is not _SENT:
            self.first = _SENT
            return first
        return self.coro.send(value)

    def throw(self, *exc: Any) -> Any:
        return self.coro.throw(*exc)

    def close(self) -> None:
        self.coro.close()


class _Trio(types.ModuleType):
    """The ``trio`` a :class:`RequestLoop` puts into pyfuse3 (its type tells install it is one)."""


def _trio_with(**names: Any) -> _Trio:
    """A module that is ``trio`` but for ``names`` (``lowlevel`` likewise for its own)."""
    lowlevel = types.ModuleType("trio.lowlevel")
    lowlevel.__dict__.update(vars(trio.lowlevel))
    lowlevel.__dict__.update(names.pop("lowlevel", {}))
    shim = _Trio("trio")
    shim.__dict__.update(vars(trio))
    shim.__dict__.update(names, lowlevel=lowlevel)
    return shim


class RequestLoop:
    """A reader seat and a poller, and the ``trio`` that hands them to pyfuse3's workers.

    :func:`install` makes one and puts it into pyfuse3; one made directly is not installed (its
    :meth:`run` then hands the seat to nobody: tests, and ``bench/handlers.py``, which measures
    the request wrapper as a daemon runs it).
    """

    def __init__(self, poll_us: int = POLL_US, min_tasks: int = MIN_TASKS) -> None:
        self.seat = ReaderSeat(min_tasks)
        self.poller = Poller(poll_us)
        # pyfuse3 calls Lock() once per session: every session of this loop sits on its seat.
        self.trio = _trio_with(
            Lock=lambda: self.seat, lowlevel={"wait_readable": self.poller.wait_readable}
        )

    @property
    def installed(self) -> bool:
        return pyfuse3.trio is self.trio  # type: ignore[attr-defined]

    def uninstall(self) -> None:
        """pyfuse3's own loop from the next ``pyfuse3.init()`` on (a session already started
        keeps the seat it took: call this between sessions). Nothing if not installed."""
        if self.installed:
            pyfuse3.trio = trio  # type: ignore[attr-defined]

    async def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """``await coro``, handing the seat on if the coroutine waits instead of returning at
        once (the request wrapper's await: a handler that waits lets another worker read)."""
        try:
            signal = coro.send(None)
        except StopIteration as done:
            return done.value
        self.seat.handoff()
        return await Resumed(coro, signal)


def install(poll_us: int = POLL_US) -> RequestLoop | None:
    """Put a new :class:`RequestLoop` into pyfuse3, before ``pyfuse3.init()``, and return it.

    None, logged as a warning, when this pyfuse3 is not a release its loop was read in
    (:data:`SUPPORTED_PYFUSE3`) or its ``trio`` is another's (``pyfuse3.asyncio``): pyfuse3's
    own loop then serves. RuntimeError if a loop is installed already (one per process).
    """
    version = getattr(pyfuse3, "__version__", "?")
    if version not in SUPPORTED_PYFUSE3:
        log.warning(
            "pyfuse3 %s: not a release drekifs's request loop was checked against (%s); "
            "pyfuse3's own loop serves requests (1.7-1.8x the wall time of a cp -a)",
            version,
            ", ".join(SUPPORTED_PYFUSE3),
        )
        return None
    current = getattr(pyfuse3, "trio", None)
    if isinstance(current, _Trio):
        raise RuntimeError("a request loop is installed in pyfuse3 already: one per process")
    if current is not trio:
        log.warning(
            "pyfuse3 %s: its trio is %r (pyfuse3.asyncio?), not trio: pyfuse3's own loop "
            "serves requests",
            version,
            current,
        )
        return None
    loop = RequestLoop(poll_us)
    pyfuse3.trio = loop.trio  # type: ignore[attr-defined]
    return loop
