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

**UDP.** A datagram names the transport it is for: every transport draws a random 8-byte
*instance* when it starts (a new one each life, so nothing sealed for an earlier life opens in
this one), and senders learn it with a HELLO before they send anything else::

    datagram = kind (1) | to (8) | KeyRing.seal(stamp | body, aad)
    aad      = world | 0x00 | b"drekifs udp v2" | kind | to
    stamp    = sent_ms (8, big-endian) | id (8)

    DATA     to = the receiver's instance   body = msgpack(msg)
    HELLO    to = 0 (not known yet)         body = the sender's instance (8)
    WELCOME  to = the HELLO's sender        body = the HELLO's id (8) | the receiver's instance (8)
    RETRY    to = 0                         body = the id (8) of a DATA that was not for us

``sent_ms`` is the sender's wall clock in milliseconds, ``id`` 64 random bits; the receiver's
:class:`~drekifs.cluster.replay.ReplayGuard` judges them. A DATA whose ``to`` is not this
transport's instance (sealed for another peer, or for this one before it restarted) is dropped
before its message is decoded, and answered with a RETRY that echoes its id, so that a sender
with an outdated instance learns the new one at once (cluster/receivers.py). At most
``net.MAX_DATAGRAM`` bytes in all. Version 1 (no ``kind``, no ``to``, first byte 0x01) is not
read any more: its datagrams are dropped as junk (docs/decisions.md, issue 17).

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
DATAGRAM_TAG = b"drekifs udp v2"

# Datagram kinds (the first byte): never 0x01, the key ring's version, which began version 1's.
DATA = 0x21
HELLO = 0x22
WELCOME = 0x23
RETRY = 0x24
DATAGRAM_KINDS = frozenset((DATA, HELLO, WELCOME, RETRY))
INSTANCE_BYTES = 8
NO_INSTANCE = bytes(INSTANCE_BYTES)
DATAGRAM_HEAD = 1 + INSTANCE_BYTES  # kind | to, in clear (and bound in as associated data)
STAMP = struct.Struct(">QQ")  # sent_ms, id
ECHO = struct.Struct(">Q")

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
MISDIRECTED = "misdirected"  # a datagram sealed for another transport, or an earlier life of ours


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
    """The associated data every datagram's starts with; its head (kind | to) follows."""
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


# -- datagrams -------------------------------------------------------------------------------


def datagram_head(kind: int, to: bytes) -> bytes:
    return bytes((kind,)) + to


def split_datagram(data: bytes) -> tuple[int, bytes, bytes]:
    """``(kind, head, sealed)``; Malformed(JUNK) when it cannot be one of ours."""
    if len(data) < DATAGRAM_HEAD + OVERHEAD or data[0] not in DATAGRAM_KINDS:
        raise Malformed(JUNK)
    return data[0], data[:DATAGRAM_HEAD], data[DATAGRAM_HEAD:]


def pack_datagram(sent_ms: int, ident: int, body: bytes) -> bytes:
    """The plaintext: the stamp, then ``body`` (a packed message, or a control body)."""
    return STAMP.pack(sent_ms, ident) + body


def unpack_stamp(plaintext: bytes) -> tuple[int, int]:
    """``(sent_ms, id)``; the body is ``plaintext[STAMP.size:]``."""
    if len(plaintext) < STAMP.size:
        raise Malformed(SHAPE)
    return STAMP.unpack_from(plaintext)


def unpack_message(body: bytes) -> Any:
    """A DATA's message."""
    return _unpack(body)


def unpack_instance(body: bytes) -> bytes:
    """A HELLO's body: its sender's instance."""
    if len(body) != INSTANCE_BYTES or body == NO_INSTANCE:
        raise Malformed(SHAPE)
    return body


def pack_welcome(echo: int, instance: bytes) -> bytes:
    return ECHO.pack(echo) + instance


def unpack_welcome(body: bytes) -> tuple[int, bytes]:
    """A WELCOME's body: ``(the HELLO's id, the instance of who answers)``."""
    if len(body) != ECHO.size + INSTANCE_BYTES:
        raise Malformed(SHAPE)
    return ECHO.unpack_from(body)[0], unpack_instance(body[ECHO.size :])


def pack_retry(echo: int) -> bytes:
    return ECHO.pack(echo)


def unpack_retry(body: bytes) -> int:
    """A RETRY's body: the id of the DATA that was not for its receiver."""
    if len(body) != ECHO.size:
        raise Malformed(SHAPE)
    return ECHO.unpack(body)[0]
