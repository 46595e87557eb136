"""What each part of the mount answers: the contract between Operations and the trees.

The mount's inodes fall into three trees, each answered by one object (operations.py picks it
by the inode's kind, see ``Operations.tree_of``):

- the world's directories and the status files (worlddirs.py), read-only;
- the stores held in this process, through ``stores.base.Store`` (localstores.py);
- the stores reached by calls, through ``stores.remote.RemoteStore`` (remotestores.py).

A new kind of store implements one of the two store interfaces and is served by the tree of
that interface: nothing here or in operations.py changes. Every tree answers every request of
:class:`Tree` for its own inodes; a request about two inodes (rename) reaches a tree only when
both are its own. Handles are the tree's own objects; operations.py numbers them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import pyfuse3

from ..urn import URN
from .inodes import StoreSlots
from .invalidate import Invalidator
from .namespace import Namespace

Attrs = pyfuse3.EntryAttributes
RENAME_NOREPLACE = 1  # renameat2 flags (linux/fs.h)
RENAME_EXCHANGE = 2


@dataclass(slots=True)
class MountState:
    """What every tree of one mount shares: the namespace served now (replaced, never
    changed, when the world changes), the kernel's invalidation queue, store slots."""

    ns: Namespace
    invalidator: Invalidator
    slots: StoreSlots
    cache_timeout: float
    uid: int
    gid: int


class Tree(Protocol):
    # -- names and attributes --------------------------------------------------------------
    async def lookup(self, parent: int, name: bytes) -> Attrs: ...

    async def getattr(self, ino: int) -> Attrs: ...

    async def setattr(self, ino: int, attr: Any, fields: Any) -> Attrs: ...

    async def readlink(self, ino: int) -> bytes: ...

    # -- creating and removing (names checked by the caller) -------------------------------
    async def make(
        self, parent: int, name: bytes, kind: int, mode: int, ctx: Any, target: bytes = b""
    ) -> Attrs:
        """mkdir, mknod (regular files only) and symlink."""

    async def create(
        self, parent: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[object, pyfuse3.FileInfo, Attrs]:
        """A new file, opened: its handle, the FileInfo (``fh`` set by the caller), attrs."""

    async def remove(self, parent: int, name: bytes, is_dir: bool) -> None: ...

    async def rename(
        self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes, flags: int
    ) -> None:
        """Both parents are this tree's."""

    # -- directories -----------------------------------------------------------------------
    async def opendir(self, ino: int) -> object: ...

    async def readdir(self, handle: Any, start_id: int, token: Any) -> None: ...

    async def fsyncdir(self, handle: Any) -> None: ...

    # -- files -----------------------------------------------------------------------------
    async def open(self, ino: int, flags: int) -> tuple[object, pyfuse3.FileInfo]: ...

    async def read(self, handle: Any, off: int, size: int) -> bytes: ...

    async def write(self, handle: Any, off: int, buf: bytes) -> int: ...

    async def flush(self, handle: Any) -> None:
        """close(2) of one descriptor: what it must report (others' files)."""

    async def fsync(self, handle: Any) -> None: ...

    async def release(self, handle: Any) -> None: ...

    # -- extended attributes (``user.*``; the system ones refused by the caller) -----------
    async def getxattr(self, ino: int, name: bytes) -> bytes: ...

    async def listxattr(self, ino: int) -> list[bytes]: ...

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None: ...

    async def removexattr(self, ino: int, name: bytes) -> None: ...

    # -- for log lines ---------------------------------------------------------------------
    def urn(self, ino: int) -> URN:
        """The URN an inode is at now (raises when it has none)."""

    def handle_urn(self, handle: Any) -> str: ...
