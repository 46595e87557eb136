"""Entry keys: how a path in a store is named, in memory, on the wire and on disk, and the
limits every path and entry is held to at the request that would cross them.

An *entry key* is ``location \\0 parent \\0 name``: the location's DNS name, the "/"-joined path
of the directory, and the entry's name; a store's root at a location is ``location \\0``. It is
what replication and the store RPC send, and what the in-memory layers and caches are keyed by:
it has no length limit of its own (a path is at most :data:`MAX_PATH` bytes).

LMDB refuses keys over 511 bytes, so the ``entries`` database stores :func:`db_key`: the entry
key itself while its *head* (``location \\0 parent \\0``) is at most :data:`INLINE_HEAD` bytes,
else :data:`HASHED` + a 32-byte BLAKE2b digest of the head, then the name. The choice depends on
the head alone, so a directory's children always share one prefix, in name order, and every key
stays within 1 + 32 + 255 bytes whatever the depth. The ``heads`` database maps each digest back
to its head (written with the first entry under it), for scans that need whole keys.
"""

from __future__ import annotations

import errno
import hashlib
import struct
from collections.abc import Mapping

from .record import StoreError

Parts = tuple[bytes, ...]  # a path below the store's root, one name per part

MAX_NAME = 255  # bytes of one name (NAME_MAX)
PATH_CHECK = 255  # a key whose path is shorter than this needs no path check (no long name)
MAX_PATH = 4095  # bytes of a path below the store's root ("/"-joined): PATH_MAX less its NUL
MAX_TARGET = 4095  # bytes of a symlink's target (the kernel's own limit)
MAX_LOCATION = 253  # bytes of a location: a DNS name
INLINE_HEAD = 256  # a head longer than this is stored hashed: 256 + 255 < 511
HASHED = b"\x01"  # no location (a DNS name) starts with it
_DIGEST = 32
HASHED_HEAD = 1 + _DIGEST

# Extended attributes, per entry (as ext4 and XFS cap theirs): an entry with its xattrs, its
# path and its metadata always fits one replication message whatever a user sets.
MAX_XATTR_NAMES = 128
MAX_XATTR_BYTES = 64 << 10  # names and values together (one value: the kernel's 64 KiB)
# What an entry may weigh besides its value, as replication packs it: path, xattrs, target,
# metadata, and the version's context (about 40 bytes per peer that ever wrote the key).
ENTRY_OVERHEAD = 256 << 10
MAX_FRAME = 4 << 20  # the transport's sealed frames (cluster/transport.py)
MAX_GLOBAL_VALUE = MAX_FRAME - ENTRY_OVERHEAD  # the largest --max-global-value

_LOC_HEADS: dict[str, bytes] = {}  # loc -> its encoding and separator: a key per change
_U64 = struct.Struct(">Q")


def _loc_head(loc: str) -> bytes:
    head = _LOC_HEADS.get(loc)
    if head is None:
        if len(_LOC_HEADS) >= 4096:  # locations come from DNS and peers: keep it bounded
            _LOC_HEADS.clear()
        head = _LOC_HEADS[loc] = loc.encode() + b"\0"
    return head


def entry_key(loc: str, parts: Parts) -> bytes:
    head = _LOC_HEADS.get(loc) or _loc_head(loc)  # several per request: no call when known
    if not parts:
        return head
    return head + b"/".join(parts[:-1]) + b"\0" + parts[-1]


def children_prefix(loc: str, parts: Parts) -> bytes:
    """The head of the children of the directory ``parts``: their keys less their names."""
    return _loc_head(loc) + b"/".join(parts) + b"\0"


def split_key(key: bytes) -> tuple[str, Parts]:
    loc, _, rest = key.partition(b"\0")
    if not rest:
        return loc.decode(), ()
    parent, _, name = rest.partition(b"\0")
    parts = tuple(parent.split(b"/")) if parent else ()
    return loc.decode(), (*parts, name)


def eid_key(eid: int) -> bytes:
    return _U64.pack(eid)


def db_head(head: bytes) -> bytes:
    """How LMDB names the head ``loc \\0 parent \\0``: itself, or hashed when long."""
    if len(head) <= INLINE_HEAD:
        return head
    return HASHED + hashlib.blake2b(head, digest_size=_DIGEST).digest()


def db_key(key: bytes) -> bytes:
    """The ``entries`` database's key for an entry key (at most 511 bytes)."""
    if len(key) <= INLINE_HEAD:
        return key  # the head is shorter still: most keys pay one comparison
    cut = key.rfind(b"\0") + 1
    if cut <= INLINE_HEAD:
        return key
    return db_head(key[:cut]) + key[cut:]


def is_hashed(dbkey: bytes) -> bool:
    return dbkey[:1] == HASHED


def key_head(key: bytes) -> bytes:
    """An entry key's head, ``loc \\0 parent \\0``: what ``heads`` keeps for a hashed db key."""
    return key[: key.rfind(b"\0") + 1]


def whole_key(head: bytes, dbkey: bytes) -> bytes:
    """The entry key a hashed ``entries`` key stands for, given the head its digest names."""
    return head + dbkey[HASHED_HEAD:]


def path_bytes(parts: Parts) -> int:
    """Length of ``parts`` "/"-joined, without joining."""
    return sum(map(len, parts)) + len(parts) - 1 if parts else 0


def label(store: str, loc: str, parts: Parts) -> str:
    """A path for messages: ``store@loc:/a/b``, names decoded leniently, a long path cut."""
    text = "/".join(p.decode("utf-8", "replace") for p in parts)
    if len(text) > 200:
        text = text[:90] + f"...({len(text)} characters)..." + text[-90:]
    return f"{store}@{loc}:/{text}"


def check_name(name: bytes, what: str = "a name") -> None:
    """A name the kernel could have sent: 1 to 255 bytes, no "/" and no NUL."""
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise StoreError(errno.EINVAL, f"{what} {name[:64]!r} is not a file name")
    if len(name) > MAX_NAME:
        raise StoreError(errno.ENAMETOOLONG, f"{what} of {len(name)} bytes: at most {MAX_NAME}")


def check_path(store: str, loc: str, parts: Parts) -> None:
    """ENAMETOOLONG for a path longer than MAX_PATH below the store root (or a long name)."""
    check_name(parts[-1])
    n = path_bytes(parts)
    if n > MAX_PATH:
        raise StoreError(
            errno.ENAMETOOLONG,
            f"{label(store, loc, parts)}: a path of {n} bytes below the store's root; "
            f"at most {MAX_PATH}",
        )


def check_target(target: bytes) -> None:
    if len(target) > MAX_TARGET:
        raise StoreError(
            errno.ENAMETOOLONG, f"a symlink target of {len(target)} bytes: at most {MAX_TARGET}"
        )


def check_xattrs(xattrs: Mapping[bytes, bytes]) -> None:
    """ENOSPC when an entry's xattrs exceed the caps (as ext4 says when they fill its block)."""
    if len(xattrs) > MAX_XATTR_NAMES:
        raise StoreError(
            errno.ENOSPC, f"{len(xattrs)} xattrs on one entry: at most {MAX_XATTR_NAMES}"
        )
    total = sum(len(k) + len(v) for k, v in xattrs.items())
    if total > MAX_XATTR_BYTES:
        raise StoreError(
            errno.ENOSPC,
            f"xattrs of {total} bytes on one entry (names and values): at most {MAX_XATTR_BYTES}",
        )


def check_entry_key(key: object) -> tuple[str, Parts]:
    """A key from a peer, checked as a path this store could have made: (loc, parts).
    ValueError says what is wrong."""
    if not isinstance(key, bytes):
        raise ValueError("an entry key is bytes")
    if key.count(b"\0") not in (1, 2):
        raise ValueError("not an entry key")
    raw_loc = key.partition(b"\0")[0]
    if not raw_loc or len(raw_loc) > MAX_LOCATION or raw_loc[:1] == HASHED:
        raise ValueError("an entry key's location is not a DNS name")
    try:
        loc, parts = split_key(key)
    except UnicodeDecodeError:
        raise ValueError("an entry key's location is not a DNS name") from None
    try:
        for p in parts:
            check_name(p)
    except StoreError as e:
        raise ValueError(f"entry key: {e}") from None
    # A conflict copy (conflicts.py) renames an entry to a name of up to MAX_NAME bytes beside
    # it: a key from a peer may be that much longer than any path a request may create.
    if path_bytes(parts) > MAX_PATH + MAX_NAME:
        raise ValueError(f"entry key: a path of {path_bytes(parts)} bytes")
    return loc, parts
