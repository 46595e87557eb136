"""Lifeguard's local health multiplier: how much this peer distrusts its own timeliness.

A peer that is itself slow (CPU starved, lossy link, GC pause) sees its probes fail and then
accuses healthy members. Lifeguard has it notice: a probe that fails although the helpers asked to
nack did not (missed nacks), or a failed probe when no helper could be asked, or having to refute
an accusation against itself raise a score; every successful probe lowers it. The probe interval
and the probe timeout are multiplied by ``score + 1``, so an unhealthy peer probes less often and
waits longer before it suspects anyone (memberlist's awareness.go).
"""

from __future__ import annotations


class Awareness:
    """A score in ``[0, max_multiplier - 1]``; 0 is healthy."""

    def __init__(self, max_multiplier: int) -> None:
        if max_multiplier < 1:
            raise ValueError("max_multiplier must be at least 1")
        self._max = max_multiplier
        self.score = 0

    def apply(self, delta: int) -> None:
        """Raise (delta > 0) or lower the score, clamped to its range."""
        self.score = min(max(self.score + delta, 0), self._max - 1)

    def scale(self, seconds: float) -> float:
        """A timeout or interval stretched by the current health."""
        return seconds * (self.score + 1)
