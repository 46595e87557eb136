"""The transport's wire format: hellos, frames, sealed payloads and datagrams. Pure functions of
bytes, no sockets, no clocks.

**TCP.** On connect both ends speak first, in clear::

    client hello:  MAGIC (4) | challenge (16) | client's listening port (2, big-endian)
    server hello:  MAGIC (4) | challenge (16)

Then each side sends frames, ``length (4, big-endian) | sealed body``, the length counting the
sealed body only. A body is ``KeyRing.seal(msgpack(payload), aad)`` where the associated data is
the world name, a direction tag, and both hellos::

    aad = world | 0x00 | b"drekifs tcp request v1" | client hello | server hello    (requests)
    aad = world | 0x00 | b"drekifs tcp reply v1"   | client hello | server hello    (replies)

so a frame opens only in the world, the connection and the direction it was sealed for: a
recorded connection replayed to a server meets a new challenge and opens nothing; a reply sent
back to its server is not a request. The payloads carry a sequence number, 0, 1, 2... per
direction, which the receiver checks, so frames cannot be dropped, repeated or reordered within a
connection either::

    proof:    [0]                                  the client's first frame, at most AUTH_FRAME_MAX
    request:  [seq, request id, method, args]
    reply:    [seq, request id, true, result]  |  [seq, request id, false, [code, message]]

The client sends its proof as soon as it has the server's hello, and its requests right after,
without waiting for an answer. The proof is small so that a server buffers no more than that for
a client that has not shown it holds a key: only then may frames be as large as ``max_frame``.

**UDP.** A datagram is ``KeyRing.seal(msgpack([sent_ms, id, msg]), world | 0x00 | b"drekifs udp
v1")``, at most ``net.MAX_DATAGRAM`` bytes: ``sent_ms`` the sender's wall clock in milliseconds,
``id`` 64 random bits; the receiver's :class:`~drekifs.cluster.replay.ReplayGuard` judges them.

Decoding raises only :class:`Malformed`, whose ``reason`` names the counter the transport bumps.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from .keyring import OVERHEAD, VERSION, KeyRing, Unsealable, key_id

MAGIC = b"DRK\x01"
CHALLENGE_BYTES = 16
CLIENT_HELLO_BYTES = len(MAGIC) + CHALLENGE_BYTES + 2
SERVER_HELLO_BYTES = len(MAGIC) + CHALLENGE_BYTES
LENGTH = struct.Struct(">I")
KEY_ID = slice(1, 5)  # where a sealed message names its key: version (1) | key id (4) | ...

AUTH_FRAME_MAX = 128  # a proof sealed weighs OVERHEAD + 2 bytes
REQUEST_TAG = b"drekifs tcp request v1"
REPLY_TAG = b"drekifs tcp reply v1"
DATAGRAM_TAG = b"drekifs udp v1"

# Room taken in a payload by everything but the packed method/args/result: an array header and
# up to three 9-byte ints or a bool. Used to refuse an oversized message before sealing it.
PAYLOAD_SLACK = 1 + 3 * 9 + 1

# Reasons (the transport counts "<tcp|udp>.dropped.<reason>").
JUNK = "junk"  # not our format: bad magic, too short, unknown version
OVERSIZED = "oversized"
TRUNCATED = "truncated"  # the stream ended in the middle of a hello or a frame
FOREIGN_KEY = "foreign-key"  # sealed with a key that is not in our ring
BAD_AUTH = "bad-auth"  # does not open: tampered, another world, another connection/direction
NOT_MSGPACK = "not-msgpack"
SHAPE = "shape"  # msgpack, but not a request/reply/datagram
REPLAY = "replay"  # out of sequence within a connection


class Malformed(Exception):
    """Input that is dropped; ``reason`` says why (one of the reason constants)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- keys -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    """A key ring and the ids it opens, swapped as one value when the ring is reloaded."""

    ring: KeyRing
    ids: frozenset[bytes]

    @classmethod
    def of(cls, ring: KeyRing) -> Keys:
        return cls(ring, frozenset(key_id(k) for k in ring.keys))

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        return self.ring.seal(plaintext, aad)

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        """The plaintext, or Malformed: JUNK, FOREIGN_KEY or BAD_AUTH."""
        if len(sealed) < OVERHEAD or sealed[0] != VERSION:
            raise Malformed(JUNK)
        if sealed[KEY_ID] not in self.ids:
            raise Malformed(FOREIGN_KEY)
        try:
            return self.ring.open(sealed, aad)
        except Unsealable:
            raise Malformed(BAD_AUTH) from None


# -- hellos and sessions ----------------------------------------------------------------------


def client_hello(port: int) -> bytes:
    return MAGIC + os.urandom(CHALLENGE_BYTES) + port.to_bytes(2, "big")


def server_hello() -> bytes:
    return MAGIC + os.urandom(CHALLENGE_BYTES)


def hello_port(hello: bytes) -> int:
    """The listening port a client hello declares, or Malformed(JUNK)."""
    if len(hello) != CLIENT_HELLO_BYTES or not hello.startswith(MAGIC):
        raise Malformed(JUNK)
    return int.from_bytes(hello[-2:], "big")


def check_server_hello(hello: bytes) -> None:
    if len(hello) != SERVER_HELLO_BYTES or not hello.startswith(MAGIC):
        raise Malformed(JUNK)


@dataclass(frozen=True)
class Session:
    """The associated data of one connection's frames, per direction."""

    request_aad: bytes
    reply_aad: bytes

    @classmethod
    def of(cls, world: bytes, client_hello: bytes, server_hello: bytes) -> Session:
        hellos = client_hello + server_hello
        return cls(world + b"\0" + REQUEST_TAG + hellos, world + b"\0" + REPLY_TAG + hellos)


def datagram_aad(world: bytes) -> bytes:
    return world + b"\0" + DATAGRAM_TAG


# -- frames -----------------------------------------------------------------------------------


def frame(body: bytes) -> bytes:
    return LENGTH.pack(len(body)) + body


class FrameDecoder:
    """Splits a byte stream into frame bodies. Never raises: a length over ``max_frame`` sets
    ``oversized`` and ends decoding (the connection is to be dropped)."""

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self.oversized = False
        self.unyielded = 0  # frames returned since the reader last waited (endpoint.py)
        self.drained = False  # the last read took all there was (endpoint.py)
        self._buf = bytearray()
        self._pos = 0  # start of the unconsumed bytes

    def feed(self, data: bytes) -> None:
        if self._pos:  # drop consumed bytes only when more arrive: usually none are left
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def buffered(self) -> int:
        """Bytes received and not yet returned."""
        return len(self._buf) - self._pos

    def take(self, n: int) -> bytes | None:
        """The next ``n`` raw bytes (a hello), or None until they have arrived."""
        if self.buffered() < n:
            return None
        out = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        return out

    def next(self) -> bytes | None:
        """The next complete frame's body, or None (more bytes needed, or ``oversized``)."""
        buf, pos = self._buf, self._pos
        if self.oversized or len(buf) - pos < LENGTH.size:
            return None
        (n,) = LENGTH.unpack_from(buf, pos)
        if n > self.max_frame:
            self.oversized = True
            return None
        end = pos + LENGTH.size + n
        if len(buf) < end:
            return None
        body = bytes(buf[pos + LENGTH.size : end])
        if end == len(buf):
            buf.clear()
            self._pos = 0
        else:
            self._pos = end
        return body


# -- payloads ---------------------------------------------------------------------------------

_ARRAY3 = b"\x93"
_ARRAY4 = b"\x94"
_TRUE = b"\xc3"
_FALSE = b"\xc2"
_packb = msgpack.packb


def pack(value: Any) -> bytes:
    """msgpack of a message value; TypeError or OverflowError (a caller's bug) when it is not
    msgpack-able."""
    return _packb(value)


def _unpack(plaintext: bytes) -> Any:
    try:
        # Peers are authenticated by now, so int map keys are fine (no hash flooding to fear).
        return msgpack.unpackb(plaintext, raw=False, strict_map_key=False)
    except Exception:  # msgpack raises ValueError, TypeError, UnicodeDecodeError, StackError...
        raise Malformed(NOT_MSGPACK) from None


def _is_int(v: Any) -> bool:
    return type(v) is int and v >= 0


# The packers splice already-packed parts, so a message is packed once, outside any lock, and
# only its sequence number is packed where the order of frames is decided.


PROOF = _packb([0])


def check_proof(plaintext: bytes) -> None:
    if _unpack(plaintext) != [0]:
        raise Malformed(SHAPE)


def pack_request(seq: int, rid: int, method: bytes, args: bytes) -> bytes:
    """``method`` and ``args`` already packed."""
    return _ARRAY4 + _packb(seq) + _packb(rid) + method + args


def unpack_request(plaintext: bytes) -> tuple[int, int, str, Any]:
    m = _unpack(plaintext)
    if (
        type(m) is not list
        or len(m) != 4
        or not _is_int(m[0])
        or not _is_int(m[1])
        or type(m[2]) is not str
    ):
        raise Malformed(SHAPE)
    return m[0], m[1], m[2], m[3]


def pack_reply(seq: int, rid: int, ok: bool, value: bytes) -> bytes:
    """``value`` already packed: the result, or ``[code, message]`` when not ``ok``."""
    return _ARRAY4 + _packb(seq) + _packb(rid) + (_TRUE if ok else _FALSE) + value


def unpack_reply(plaintext: bytes) -> tuple[int, int, bool, Any]:
    """``(seq, rid, True, result)`` or ``(seq, rid, False, (code, message))``."""
    m = _unpack(plaintext)
    if type(m) is not list or len(m) != 4 or not _is_int(m[0]) or not _is_int(m[1]):
        raise Malformed(SHAPE)
    if m[2] is True:
        return m[0], m[1], True, m[3]
    e = m[3]
    if m[2] is not False or type(e) is not list or len(e) != 2:
        raise Malformed(SHAPE)
    if type(e[0]) is not int or type(e[1]) is not str:
        raise Malformed(SHAPE)
    return m[0], m[1], False, (e[0], e[1])


def pack_datagram(sent_ms: int, ident: int, msg: bytes) -> bytes:
    """``msg`` already packed."""
    return _ARRAY3 + _packb(sent_ms) + _packb(ident) + msg


def unpack_datagram(plaintext: bytes) -> tuple[int, int, Any]:
    m = _unpack(plaintext)
    if type(m) is not list or len(m) != 3 or not _is_int(m[0]) or not _is_int(m[1]):
        raise Malformed(SHAPE)
    return m[0], m[1], m[2]
