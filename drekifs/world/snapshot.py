"""The last good world on disk, with the time each directory of the tree last changed.

Schema of ``<data-dir>/world.json`` (version 1)::

    {"version": 1,
     "world": <World.to_json()>,
     "resolved_at": <unix seconds of the last successful resolution>,
     "changed_ns": {"<path of a directory, '' for the root>": <ns since the epoch>, ...},
     "created_ns": {"<path>": <ns since the epoch when that path first appeared>, ...}}

``changed_ns`` gives directory mtimes that survive remounts: a directory's time moves only when
its entries change, so rsync, tar and backup tools see no change where there was none.
``created_ns`` dates what hangs below a location but is not part of the world (its stores).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .model import World

log = logging.getLogger(__name__)

VERSION = 1
FILENAME = "world.json"


@dataclass
class Snapshot:
    world: World
    resolved_at: float
    changed_ns: dict[str, int] = field(default_factory=dict)
    created_ns: dict[str, int] = field(default_factory=dict)

    def mtime_ns(self, segments: tuple[str, ...]) -> int:
        return self.changed_ns.get("/".join(segments), int(self.resolved_at * 1e9))

    def created(self, segments: tuple[str, ...]) -> int:
        path = "/".join(segments)
        return self.created_ns.get(path) or self.mtime_ns(segments)


def _entries(world: World) -> dict[str, tuple[str, ...]]:
    """Each directory's path and the names in it that come from the world."""
    return {
        "/".join(loc.segments): tuple(d for d, _ in world.children(loc.name))
        for loc in world.locations(limit=1_000_000)
    }


def advance(old: Snapshot | None, world: World, now: float) -> Snapshot:
    """The snapshot after resolving ``world`` at ``now``; unchanged directories keep their time."""
    now_ns = int(now * 1e9)
    new_entries = _entries(world)
    old_entries = _entries(old.world) if old else {}
    changed: dict[str, int] = {}
    created: dict[str, int] = {}
    for path, names in new_entries.items():
        if old is not None and old_entries.get(path) == names and path in old.changed_ns:
            changed[path] = old.changed_ns[path]
        else:
            changed[path] = now_ns
        created[path] = old.created_ns.get(path, now_ns) if old and path in old_entries else now_ns
    return Snapshot(world, now, changed, created)


def load(data_dir: str | os.PathLike) -> Snapshot | None:
    path = Path(data_dir) / FILENAME
    try:
        data = json.loads(path.read_text())
        if data.get("version") != VERSION:
            log.warning("%s: unknown version %r, ignored", path, data.get("version"))
            return None
        return Snapshot(
            World.from_json(data["world"]),
            float(data["resolved_at"]),
            {str(k): int(v) for k, v in data["changed_ns"].items()},
            {str(k): int(v) for k, v in data.get("created_ns", {}).items()},
        )
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, IndexError) as e:
        log.warning("%s is unreadable (%s); ignored", path, e)
        return None


def save(data_dir: str | os.PathLike, snap: Snapshot) -> None:
    """Write atomically: a crash leaves the old or the new file, never half of one."""
    directory = Path(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    data = {
        "version": VERSION,
        "world": snap.world.to_json(),
        "resolved_at": snap.resolved_at,
        "changed_ns": snap.changed_ns,
        "created_ns": snap.created_ns,
    }
    tmp = directory / (FILENAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / FILENAME)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
