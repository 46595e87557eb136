"""Changes a store could not commit before the daemon stopped, kept in a file and taken up at
the next open: what a request acknowledged is never dropped at exit.

A store that cannot commit at close (its disk full or read-only, the commit failing for any
reason) writes what it holds in memory to ``unsaved-<ns>.msgpack`` in its own directory, or,
when that cannot be written either, to :data:`FALLBACK_DIRS` under a name made of the store
directory's digest. The file is one msgpack map::

    {"store": name, "path": store directory, "written_ns": int, "changes": int,
     "entries": [[entry key, Record.pack() or nil], ...],
     "values": [[eid, bytes or nil], ...], "eids": [[eid, entry key or nil], ...],
     "next_eid": int or nil, "value_bytes": int or nil}

(nil: delete from disk.) The next open of that store applies every such file in the order
written, as changes not yet on disk, and removes the files once they are committed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from ..datadir import DataDirError, private_dir

log = logging.getLogger(__name__)

PREFIX = "unsaved-"
SUFFIX = ".msgpack"
FALLBACK_DIRS = (Path("/run/drekifs-unsaved"), Path("/var/tmp/drekifs-unsaved"))


@dataclass
class Unsaved:
    """What one file held."""

    path: Path
    changes: int
    entries: list[tuple[bytes, bytes | None]]
    values: list[tuple[int, bytes | None]]
    eids: list[tuple[int, bytes | None]]
    next_eid: int | None
    value_bytes: int | None


def _tag(store_dir: Path) -> str:
    return hashlib.blake2b(str(store_dir.resolve()).encode(), digest_size=12).hexdigest()


def _write_private(path: Path, data: bytes) -> None:
    """Created new (never through a link an attacker placed), 0600, on disk before return."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def dump(name: str, store_dir: Path, fields: dict[str, Any]) -> Path:
    """Write the changes; returns where. OSError when no place would take them."""
    fields = {"store": name, "path": str(store_dir), "written_ns": time.time_ns(), **fields}
    data = msgpack.packb(fields, use_bin_type=True)
    ns = fields["written_ns"]
    places = [store_dir / f"{PREFIX}{ns}{SUFFIX}"]
    places += [d / f"{_tag(store_dir)}-{ns}{SUFFIX}" for d in FALLBACK_DIRS]
    error: OSError | None = None
    for place in places:
        if place.parent != store_dir:
            try:
                private_dir(place.parent)
            except DataDirError as e:
                log.warning("cannot keep unsaved changes of store %s there: %s", name, e)
                continue
        try:
            _write_private(place, data)
            return place
        except OSError as e:
            error = e
            log.warning("cannot keep unsaved changes of store %s in %s: %s", name, place, e)
    raise error or OSError("no place to keep unsaved changes")


def find(store_dir: Path) -> list[Path]:
    """The files kept for this store, oldest first."""
    found = list(store_dir.glob(f"{PREFIX}*{SUFFIX}"))
    tag = _tag(store_dir)
    for d in FALLBACK_DIRS:
        if d.is_dir():
            found += [p for p in d.glob(f"{tag}-*{SUFFIX}") if os.lstat(p).st_uid == os.getuid()]

    def written(p: Path) -> int:
        digits = p.name.removesuffix(SUFFIX).rpartition("-")[2]
        return int(digits) if digits.isdigit() else 0

    return sorted(found, key=written)


def load(path: Path) -> Unsaved:
    """One file, checked; ValueError says what is wrong with it."""
    try:
        d = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)
        return Unsaved(
            path,
            int(d["changes"]),
            [(bytes(k), v) for k, v in d["entries"]],
            [(int(e), v) for e, v in d["values"]],
            [(int(e), k) for e, k in d["eids"]],
            d.get("next_eid"),
            d.get("value_bytes"),
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a file of unsaved changes ({e})") from None
