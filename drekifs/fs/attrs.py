"""What a SETATTR asks to change, as the store's field names (local and remote stores alike)."""

from __future__ import annotations

import stat
from typing import Any

import pyfuse3

from ..stores.record import DIR


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


def record_attrs(
    ino: int,
    rec: Any,
    timeout: float,
    *,
    size: int | None = None,
    mtime_ns: int | None = None,
    ctime_ns: int | None = None,
) -> Any:
    """A store entry's attributes (local or remote); ``size`` and the times override the
    record's (a file being written here)."""
    attr = pyfuse3.EntryAttributes()  # st_blksize 4096 and st_nlink 1 already (its __cinit__)
    attr.st_ino = ino
    attr.st_mode = rec.mode
    attr.st_uid = rec.uid
    attr.st_gid = rec.gid
    attr.entry_timeout = attr.attr_timeout = timeout
    mtime = rec.mtime_ns if mtime_ns is None else mtime_ns
    if rec.kind == DIR:
        attr.st_nlink = 2 + rec.subdirs
        size = 0
    else:
        size = rec.size if size is None else size
    attr.st_size = size
    attr.st_blocks = (size + 511) // 512
    attr.st_mtime_ns = mtime
    attr.st_atime_ns = rec.atime_ns or mtime
    attr.st_ctime_ns = ctime_ns or rec.ctime_ns or mtime
    return attr
