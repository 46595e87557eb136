"""Lifeguard's suspicion timeout: long while one peer alone suspects, short once others agree.

A suspicion starts with the longest timeout; every *independent* confirmation (a suspect message
about the same member from another accuser) shrinks it along a logarithmic curve, so that ``k``
confirmations bring it down to the minimum (memberlist's suspicion.go)::

    timeout(c) = max(min, max - (max - min) * log(c + 1) / log(k + 1))

The first confirmations count most: one false accuser alone waits the full maximum, which gives a
healthy member time to refute, while a member that is really gone is confirmed by many probers
within a few probe intervals and declared dead close to the minimum. The object is plain
arithmetic on timestamps; the caller runs the timer.
"""

from __future__ import annotations

import math


class Suspicion:
    """The running timeout of one suspicion, started at ``start`` (trio's clock)."""

    def __init__(
        self, accuser: str, k: int, min_timeout: float, max_timeout: float, start: float
    ) -> None:
        if min_timeout > max_timeout:
            raise ValueError("min_timeout exceeds max_timeout")
        self.k = max(k, 0)
        self.min_timeout = min_timeout
        self.max_timeout = max_timeout
        self.start = start
        self.confirmations = 0
        # The first accuser is not a confirmation; remembering it stops it from counting twice.
        self._accusers = {accuser}
        self.deadline = start + self.timeout(0)

    def timeout(self, confirmations: int) -> float:
        """The whole timeout (from ``start``) after ``confirmations`` independent ones."""
        if self.k == 0:
            # Nobody else is expected to confirm (a tiny cluster): half the maximum. The
            # minimum alone is too short for a lossy link to carry the suspicion to the member
            # and its refutation back (three peers at 10% loss died falsely within seconds).
            return max(self.min_timeout, self.max_timeout / 2)
        fraction = math.log(confirmations + 1) / math.log(self.k + 1)
        raw = self.max_timeout - fraction * (self.max_timeout - self.min_timeout)
        return max(raw, self.min_timeout)

    def confirm(self, accuser: str) -> bool:
        """Count ``accuser``'s suspicion; True when it was new (then the deadline moved and the
        news is worth gossiping on), False for a repeat or once ``k`` have been counted."""
        if self.confirmations >= self.k or accuser in self._accusers:
            return False
        self._accusers.add(accuser)
        self.confirmations += 1
        self.deadline = self.start + self.timeout(self.confirmations)
        return True
