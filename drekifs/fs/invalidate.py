"""Telling the kernel to forget cached entries and attributes, off the request path.

pyfuse3's invalidate functions block until the kernel is done, and the kernel may wait for a
request this very thread would have to answer: called from a request handler they deadlock. So
requests are queued here, coalesced, and carried out by one task in a worker thread.
"""

from __future__ import annotations

import errno
import logging

import pyfuse3
import trio

from ..urn import escape_key_part

log = logging.getLogger(__name__)


class Invalidator:
    def __init__(self) -> None:
        self._inodes: set[int] = set()
        self._attrs: set[int] = set()  # attributes only: the page cache stays
        self._entries: dict[tuple[int, bytes], int] = {}
        self._wake = trio.Event()
        self._rounds_done = trio.Event()
        self.requested = 0  # rounds asked for
        self.finished = 0  # rounds carried out

    def inode(self, ino: int) -> None:
        self._inodes.add(ino)
        self._ask()

    def attributes(self, ino: int) -> None:
        self._attrs.add(ino)
        self._ask()

    def entry(self, parent: int, name: bytes, deleted: int = 0) -> None:
        self._entries[(parent, name)] = deleted
        self._ask()

    def _ask(self) -> None:
        if not self._wake.is_set():
            self.requested += 1
            self._wake.set()

    async def flush(self) -> None:
        """Return once everything asked for before the call has reached the kernel."""
        target = self.requested
        while self.finished < target:
            await self._rounds_done.wait()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            entries, self._entries = self._entries, {}
            inodes, self._inodes = self._inodes, set()
            attrs, self._attrs = self._attrs - inodes, set()
            round_ = self.requested
            await trio.to_thread.run_sync(self._apply, entries, inodes, attrs)
            self.finished = round_
            self._rounds_done.set()
            self._rounds_done = trio.Event()

    def _apply(
        self, entries: dict[tuple[int, bytes], int], inodes: set[int], attrs: set[int]
    ) -> None:
        for (parent, name), deleted in entries.items():
            self._call(pyfuse3.invalidate_entry, parent, name, deleted)
        for ino in inodes:
            self._call(pyfuse3.invalidate_inode, ino)
        for ino in attrs:
            self._call(pyfuse3.invalidate_inode, ino, True)

    def _call(self, fn, *args) -> None:
        try:
            fn(*args)
        except OSError as e:
            # ENOENT: the kernel had nothing cached. Anything else is worth a line.
            if e.errno != errno.ENOENT:
                log.warning("%s %s: %s", fn.__name__, _text(args), e)
        except Exception:  # never let a failed invalidation end the mount
            log.exception("%s %s failed", fn.__name__, _text(args))


def _text(args: tuple) -> str:
    """Inode numbers and names as a log line writes them (no b'...' reprs)."""
    return " ".join(escape_key_part(a) if isinstance(a, bytes) else str(a) for a in args)
