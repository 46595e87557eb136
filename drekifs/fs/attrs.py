"""What a SETATTR asks to change, as the store's field names (local and remote stores alike)."""

from __future__ import annotations

import stat
from typing import Any


def metadata_changes(attr: Any, fields: Any) -> dict[str, int]:
    """The metadata fields of a SETATTR (size is the caller's: it changes the value)."""
    changes: dict[str, int] = {}
    if fields.update_mode:
        changes["perm"] = stat.S_IMODE(attr.st_mode)
    if fields.update_uid:
        changes["uid"] = attr.st_uid
    if fields.update_gid:
        changes["gid"] = attr.st_gid
    if fields.update_mtime:
        changes["mtime_ns"] = attr.st_mtime_ns
    if fields.update_atime:
        changes["atime_ns"] = attr.st_atime_ns
    if fields.update_ctime:
        changes["ctime_ns"] = attr.st_ctime_ns
    return changes
