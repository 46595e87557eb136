"""One entry of a store, as kept on disk (msgpack) and handed to the filesystem.

Record fields, with their msgpack map keys::

    k  kind        0 file, 1 directory, 2 symlink, 3 tombstone (a deleted global entry)
    e  eid         entry id, unique in its store on this peer and never reused (inode numbers)
    p  perm        permission bits (0o7777)
    u  uid, g gid
    m  mtime_ns    c  ctime_ns
    s  size        bytes in the value (files), length of the target (symlinks)
    x  xattrs      {name: value} for user.* attributes
    l  target      symlink target
    v  version     [hlc, peer, [[peer, hlc], ...]]  (global store only)
    a  atime_ns    when set apart from mtime (utimensat); reads never change it
    n  subdirs     number of subdirectories (directories), for their link count
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import msgpack

from .version import Version

TOMBSTONE_GRACE = 7 * 86400.0  # seconds a global delete is remembered at least (docs/design.md §4)
# The shortest grace taken: three anti-entropy intervals (20 s), so that every peer in contact
# has exchanged since a delete before its tombstone may go (docs/design.md, "A delete stays").
MIN_TOMBSTONE_GRACE = 60.0

FILE, DIR, SYMLINK, TOMBSTONE = 0, 1, 2, 3
KIND_NAMES = {FILE: "file", DIR: "dir", SYMLINK: "symlink", TOMBSTONE: "tombstone"}
_S_IFMT = {FILE: stat.S_IFREG, DIR: stat.S_IFDIR, SYMLINK: stat.S_IFLNK}
NO_XATTRS: Mapping[bytes, bytes] = MappingProxyType({})  # shared, so it must not change


class StoreError(Exception):
    """A store operation refused, with the errno a filesystem would give."""

    def __init__(self, code: int, message: str) -> None:
        self.errno = code
        super().__init__(f"{message}: {os.strerror(code)}")


class Record(NamedTuple):
    """An entry's metadata and version, immutable: the store's caches and layers share them.

    A named tuple rather than a frozen dataclass because a listing unpacks one per entry and
    every change makes one: a frozen dataclass's ``__init__`` costs 13 ``object.__setattr__``
    calls (2.2 us here), a tuple ~0.3 us.
    """

    kind: int
    eid: int
    perm: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    size: int = 0
    xattrs: Mapping[bytes, bytes] = NO_XATTRS
    target: bytes = b""
    version: Version | None = None
    atime_ns: int = 0
    subdirs: int = 0

    @property
    def mode(self) -> int:
        return _S_IFMT[self.kind] | self.perm

    @property
    def is_dir(self) -> bool:
        return self.kind == DIR

    @property
    def alive(self) -> bool:
        return self.kind != TOMBSTONE

    def but(self, **changes: Any) -> Record:
        """A copy with some fields changed (ValueError naming a field it does not have).
        namedtuple's ``_replace`` does the same in 2.5 us, this in 1.4: every change makes
        one, and so do the attributes of a file being written."""
        values = list(self)
        for name, value in changes.items():
            index = _FIELD_INDEX.get(name)
            if index is None:
                raise ValueError(f"Record has no field {name!r}")
            values[index] = value
        return _new_record(Record, values)

    def pack(self) -> bytes:
        d: dict = {
            "k": self.kind,
            "e": self.eid,
            "p": self.perm,
            "u": self.uid,
            "g": self.gid,
            "m": self.mtime_ns,
            "c": self.ctime_ns,
            "s": self.size,
        }
        if self.xattrs:
            d["x"] = self.xattrs
        if self.target:
            d["l"] = self.target
        if self.version is not None:
            d["v"] = self.version.to_wire()
        if self.atime_ns and self.atime_ns != self.mtime_ns:
            d["a"] = self.atime_ns
        if self.subdirs:
            d["n"] = self.subdirs
        return msgpack.packb(d, use_bin_type=True)

    @classmethod
    def unpack(cls, data: bytes) -> Record:
        """The record ``pack`` made; raises (KeyError, ValueError, TypeError...) on anything
        else. Field types are the caller's to check when the bytes come from elsewhere."""
        d = msgpack.unpackb(data, raw=False, strict_map_key=False)
        v = d.get("v")
        m = d["m"]
        return _new_record(
            cls,
            (
                d["k"],
                d["e"],
                d["p"],
                d["u"],
                d["g"],
                m,
                d["c"],
                d["s"],
                d.get("x") or NO_XATTRS,
                d.get("l", b""),
                Version.from_wire(v) if v else None,
                d.get("a", m),
                d.get("n", 0),
            ),
        )


_new_record = tuple.__new__  # a Record from its 13 fields, in order, without __new__'s frame
_FIELD_INDEX = {name: i for i, name in enumerate(Record._fields)}
