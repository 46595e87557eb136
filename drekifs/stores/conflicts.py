"""What a replica does with a version of a global entry that another peer wrote.

Pure decisions on records (no store, no I/O), so every peer decides alike whatever order the
versions reach it in:

- a version the local one already covers (saw, or is) changes nothing;
- a version that covers the local one replaces it;
- two concurrent versions (neither writer saw the other): every peer keeps the same *winner* —
  a directory over anything else (its children stay reachable), a write over a delete (nothing
  is silently dropped), then the larger ``(hlc, peer)`` — and keeps the *loser*, when it holds
  something (a file or symlink), as a sibling ``NAME.dreki-conflict-<peer>-<UTC time>``, an
  entry of its own that carries the loser's version: every peer that makes it makes the same one,
  and deleting it (a newer version) resolves the conflict for good.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

from .record import DIR, FILE, SYMLINK, TOMBSTONE, Record
from .version import LOGICAL_BITS, Version

CONFLICT_MARK = b".dreki-conflict-"


class Action(enum.Enum):
    IGNORE = "ignore"  # the local version covers it, or wins over it with nothing to keep
    REPLACE = "replace"  # it replaces the local one
    KEEP_LOCAL = "keep-local"  # concurrent, the local one wins; keep the remote as a copy
    REPLACE_KEEP = "replace-keep"  # concurrent, the remote wins; keep the local as a copy


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action

    @property
    def replaces(self) -> bool:
        return self.action in (Action.REPLACE, Action.REPLACE_KEEP)

    @property
    def copies_local(self) -> bool:
        return self.action is Action.REPLACE_KEEP

    @property
    def copies_remote(self) -> bool:
        return self.action is Action.KEEP_LOCAL


def _rank(rec: Record) -> tuple[int, int, int, str]:
    """The order concurrent versions are settled by; larger wins."""
    v = rec.version
    assert v is not None
    return (rec.kind == DIR, rec.kind != TOMBSTONE, v.hlc, v.peer)


def worth_keeping(rec: Record) -> bool:
    return rec.kind in (FILE, SYMLINK)


def decide(local: Record | None, remote: Record) -> Decision:
    """What to do with ``remote`` (a replicated record, with a version) given ``local``."""
    if remote.version is None:
        raise ValueError("a replicated record has a version")
    if local is None or local.version is None:
        return Decision(Action.REPLACE)
    lv, rv = local.version, remote.version
    if lv.covers(rv):
        return Decision(Action.IGNORE)
    if rv.covers(lv):
        return Decision(Action.REPLACE)
    if _rank(remote) > _rank(local):
        return Decision(Action.REPLACE_KEEP if worth_keeping(local) else Action.REPLACE)
    return Decision(Action.KEEP_LOCAL if worth_keeping(remote) else Action.IGNORE)


def conflict_name(name: bytes, loser: Version) -> bytes:
    """``NAME.dreki-conflict-<peer>-<UTC time of the losing write>``: the same on every peer."""
    ms = loser.hlc >> LOGICAL_BITS
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"
    peer = loser.peer.encode("utf-8", "replace").replace(b"/", b"_")[:60]
    suffix = CONFLICT_MARK + peer + b"-" + stamp.encode()
    return name[: 255 - len(suffix)] + suffix
