"""URNs: the one canonical name of everything in a drekifs world.

Grammar (docs/URNs.md has the long version)::

    urn      = world *( ":" segment ) [ "::" store [ "::" key ] ]
    world    = lower-case DNS name, no trailing dot         inf.random.sh
    segment  = a member's directory name, root to leaf      eu:fr:scw:dc2:node3
    store    = "global" | "local" | [a-z0-9][a-z0-9_-]*      or ".dreki" at the world root
    key      = "/"-separated parts, each %XX-escaped where its bytes are not printable
               UTF-8, and for "%" itself

Parsing splits on "::" at most twice, so a key may itself contain ":" and "::".

This module is plain data: no trio, no FUSE, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "STATUS_STORE",
    "URN",
    "URNError",
    "check_key_part",
    "escape_key_part",
    "is_valid_dirname",
    "is_valid_store_name",
    "is_valid_world",
    "unescape_key_part",
]

# The daemon's own status directory (/dreki/.dreki) is addressed like a store of the world
# root. Its name cannot collide with a real store: store names never start with ".".
STATUS_STORE = ".dreki"

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_WORLD_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
# A directory name is a member's leftmost DNS label or, for clashing siblings, its full name.
_DIRNAME_RE = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
_STORE_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")
_ESCAPE_RE = re.compile(rb"%([0-9A-Fa-f]{2})")

MAX_NAME_BYTES = 255
# No member is named like a store (the world forbids it), so a segment never is one.
RESERVED_SEGMENTS = frozenset({"global", "local"})


class URNError(ValueError):
    """A URN (or a part of one) is not valid.

    ``part`` names the offending part ("world", "segment 2", "store", "key part 1", ...),
    ``value`` is its text, and ``reason`` says what is wrong with it.
    """

    def __init__(self, urn: str, part: str, value: str, reason: str) -> None:
        self.urn = urn
        self.part = part
        self.value = value
        self.reason = reason
        super().__init__(f"bad URN {urn!r}: {part} {value!r} {reason}")


def is_valid_world(name: str) -> bool:
    return len(name) <= 253 and _WORLD_RE.fullmatch(name) is not None


def is_valid_dirname(name: str) -> bool:
    return len(name) <= MAX_NAME_BYTES and _DIRNAME_RE.fullmatch(name) is not None


def is_valid_store_name(name: str) -> bool:
    return len(name) <= 63 and _STORE_RE.fullmatch(name) is not None


def check_key_part(part: bytes) -> str | None:
    """Why ``part`` cannot be one "/"-separated part of a key, or None when it can."""
    if not part:
        return "is empty"
    if part in (b".", b".."):
        return "is a relative path component"
    if b"/" in part:
        return "contains '/'"
    if b"\0" in part:
        return "contains a NUL byte"
    if len(part) > MAX_NAME_BYTES:
        return f"is {len(part)} bytes long (at most {MAX_NAME_BYTES})"
    return None


def _is_literal(ch: str) -> bool:
    return ch != "%" and ch.isprintable()


def escape_key_part(part: bytes) -> str:
    """The text form of one key part: printable UTF-8 as is, every other byte and "%" as %XX."""
    try:
        text = part.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(_is_literal(ch) for ch in text):
        return text  # the common case, kept fast
    out: list[str] = []
    i = 0
    while i < len(part):
        # Decode one UTF-8 sequence at a time; bytes that are not valid UTF-8 are escaped alone.
        for width in (1, 2, 3, 4):
            chunk = part[i : i + width]
            try:
                ch = chunk.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if len(ch) == 1 and _is_literal(ch):
                out.append(ch)
            else:
                out.extend(f"%{b:02X}" for b in chunk)
            i += width
            break
        else:
            out.append(f"%{part[i]:02X}")
            i += 1
    return "".join(out)


def unescape_key_part(text: str) -> bytes:
    """Bytes of one escaped key part. A "%" not followed by two hex digits is an error."""
    raw = text.encode("utf-8", "surrogateescape")
    if b"%" not in raw:
        return raw
    for m in re.finditer(rb"%", raw):
        if not _ESCAPE_RE.match(raw, m.start()):
            raise ValueError(f"has '%' at offset {m.start()} not followed by two hex digits")
    return _ESCAPE_RE.sub(lambda m: bytes([int(m.group(1), 16)]), raw)


@dataclass(frozen=True, slots=True)
class URN:
    """A parsed URN. ``key`` holds raw bytes parts: file names need not be UTF-8."""

    world: str
    segments: tuple[str, ...] = ()
    store: str | None = None
    key: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        if self.key and self.store is None:
            raise ValueError("a URN with a key needs a store")

    # -- text form -------------------------------------------------------------------------

    def __str__(self) -> str:
        text = ":".join((self.world, *self.segments))
        if self.store is not None:
            text += "::" + self.store
            if self.key:
                text += "::" + "/".join(escape_key_part(p) for p in self.key)
        return text

    @classmethod
    def parse(cls, text: str) -> URN:
        """Parse the text form; a :class:`URNError` names the offending part and why."""
        if not isinstance(text, str):
            raise TypeError("URN text must be str")
        if not text:
            raise URNError(text, "URN", text, "is empty")
        head, *rest = text.split("::", 2)
        world, *segments = head.split(":")
        if not world:
            raise URNError(text, "world", world, "is empty")
        if world != world.lower():
            raise URNError(text, "world", world, f"must be lower case ({world.lower()!r})")
        if world.endswith("."):
            raise URNError(text, "world", world, "must not end with a dot")
        if not is_valid_world(world):
            raise URNError(text, "world", world, "is not a DNS name (labels of a-z, 0-9, _, -)")
        for i, seg in enumerate(segments, 1):
            if not seg:
                raise URNError(text, f"segment {i}", seg, "is empty (stray ':'?)")
            if seg.startswith("."):
                raise URNError(text, f"segment {i}", seg, "starts with '.'")
            if seg in RESERVED_SEGMENTS:
                raise URNError(
                    text, f"segment {i}", seg, "is a store name (write '::' before a store)"
                )
            if not is_valid_dirname(seg):
                raise URNError(
                    text, f"segment {i}", seg, "is not a member name (a-z, 0-9, _, -, dots)"
                )
        store: str | None = None
        key: tuple[bytes, ...] = ()
        if rest:
            store = rest[0]
            if store == STATUS_STORE:
                if segments:
                    raise URNError(text, "store", store, "exists only at the world root")
            elif not store:
                raise URNError(text, "store", store, "is empty")
            elif not is_valid_store_name(store):
                raise URNError(text, "store", store, "is not a store name ([a-z0-9][a-z0-9_-]*)")
        if len(rest) == 2:
            key_text = rest[1]
            if not key_text:
                raise URNError(text, "key", key_text, "is empty (drop the trailing '::')")
            parts: list[bytes] = []
            for i, part_text in enumerate(key_text.split("/"), 1):
                try:
                    part = unescape_key_part(part_text)
                except ValueError as e:
                    raise URNError(text, f"key part {i}", part_text, str(e)) from None
                why = check_key_part(part)
                if why:
                    raise URNError(text, f"key part {i}", part_text, why)
                parts.append(part)
            key = tuple(parts)
        return cls(world, tuple(segments), store, key)

    # -- paths -----------------------------------------------------------------------------

    def path_parts(self) -> list[bytes]:
        """Components of this URN's path below the mount point, as bytes."""
        parts = [s.encode() for s in self.segments]
        if self.store is not None:
            parts.append(self.store.encode())
            parts.extend(self.key)
        return parts

    def to_path(self, mountpoint: str | bytes) -> bytes:
        base = mountpoint.encode() if isinstance(mountpoint, str) else mountpoint
        return b"/".join([base.rstrip(b"/") or b"", *self.path_parts()]) or b"/"

    @classmethod
    def from_path_parts(
        cls, world: str, parts: list[bytes], stores: frozenset[str] | set[str]
    ) -> URN:
        """The URN of a path below the mount, given the names that are stores.

        World directories come first; the first component that names a store (or the status
        directory at the root) starts the store and key. The caller knows which names are stores
        (the world forbids members named like one), so the split is unambiguous.
        """
        label = "/" + "/".join(p.decode("utf-8", "replace") for p in parts)
        segments: list[str] = []
        for i, part in enumerate(parts):
            name = part.decode("utf-8", "surrogateescape")
            if name in stores or (name == STATUS_STORE and not segments):
                key = tuple(parts[i + 1 :])
                for j, kp in enumerate(key, 1):
                    why = check_key_part(kp)
                    if why:
                        raise URNError(label, f"key part {j}", escape_key_part(kp), why)
                return cls(world, tuple(segments), name, key)
            if not is_valid_dirname(name):
                raise URNError(label, f"segment {i + 1}", name, "is not a member name")
            segments.append(name)
        return cls(world, tuple(segments))

    # -- relations -------------------------------------------------------------------------

    def child(self, name: bytes) -> URN:
        """The URN one level below: a key part inside a store, else a segment."""
        if self.store is not None:
            return URN(self.world, self.segments, self.store, (*self.key, name))
        return URN(self.world, (*self.segments, name.decode()))

    def with_store(self, store: str) -> URN:
        return URN(self.world, self.segments, store)
