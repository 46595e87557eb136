"""LMDB's read map, dropped from this process's RSS: where the map lies, and madvise on it.

Reads go through a read-only shared map of the data file, so every page ever read stays counted
in the daemon's RSS although it is page cache, not the daemon's memory. ``MADV_DONTNEED`` on
that map only unmaps: the pages stay cached by the kernel, and the next read maps them again (a
minor fault). Nothing can be lost: the map is never written. py-lmdb does not expose the map,
and Python's ``mmap`` can advise only maps it made: hence libc's madvise through ctypes, on the
ranges ``/proc/self/maps`` shows.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable

_libc = ctypes.CDLL(None, use_errno=True)
MADV_DONTNEED = 4

Ranges = list[tuple[int, int]]  # [start, end) addresses


def ranges(data_file: str) -> Ranges | None:
    """The ranges this process maps ``data_file`` at; None when /proc/self/maps is unreadable."""
    try:
        with open("/proc/self/maps") as maps:
            lines = [ln.split()[0] for ln in maps if ln.rstrip().endswith(" " + data_file)]
    except OSError:
        return None
    return [(int(a, 16), int(b, 16)) for a, b in (r.split("-") for r in lines)]


def unmap(ranges: Iterable[tuple[int, int]]) -> tuple[int, bool]:
    """MADV_DONTNEED on each range: the bytes unmapped, and whether every call succeeded (a
    failure means the map moved: look for its ranges again)."""
    total = 0
    ok = True
    for start, end in ranges:
        if _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED) == 0:
            total += end - start
        else:
            ok = False
    return total, ok
