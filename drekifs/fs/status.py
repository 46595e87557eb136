"""The files of ``/dreki/.dreki/``: the daemon's state, as text and JSON.

Each file is a name, a function that renders its content now, and whether it changes on its own
(volatile: never cached by the kernel) or only when the daemon says so (stable: cached, and
invalidated when its source changes).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class StatusFile:
    name: str
    render: Callable[[], bytes]
    volatile: bool = False


class StatusFiles:
    def __init__(self) -> None:
        self.files: dict[str, StatusFile] = {}

    def add(self, name: str, render: Callable[[], bytes | str], volatile: bool = False) -> None:
        def as_bytes() -> bytes:
            out = render()
            return out.encode() if isinstance(out, str) else out

        self.files[name] = StatusFile(name, as_bytes, volatile)

    def names(self) -> tuple[str, ...]:
        return tuple(self.files)

    def get(self, name: str) -> StatusFile | None:
        return self.files.get(name)


def counters_text(counts: dict[str, int]) -> str:
    return "".join(f"{k} {v}\n" for k, v in sorted(counts.items()))


def stores_text(stores) -> str:
    """One line per store: name, entries (tombstones included), bytes in live values, changes
    since start (each one a new version), changes not yet on disk, last write."""
    lines = []
    for store in stores:
        st = store.stats()
        when = (
            datetime.datetime.fromtimestamp(st.last_write_ns / 1e9, datetime.UTC).isoformat()
            if st.last_write_ns
            else "never"
        )
        lines.append(
            f"{st.name} entries={st.entries} bytes={st.bytes} changes={store.changes}"
            f" unsynced={store.changes - store.committed} last_write={when}\n"
        )
    return "".join(lines)


def pid_text() -> str:
    return f"{os.getpid()}\n"
