"""The SWIM wire format, and the checks that turn a peer's bytes into trusted values.

Datagrams are msgpack maps with short keys (they must fit in one UDP datagram with their
piggybacked updates)::

    {"t": "ping",   "s": seq, "n": target name,                      "u": [update, ...]}
    {"t": "ack",    "s": seq,                                         "u": [...]}
    {"t": "nack",   "s": seq}
    {"t": "preq",   "s": seq, "n": target name, "a": [ip, port], "w": nack wait ms, "u": [...]}
    {"t": "gossip",                                                   "u": [...]}

An update is one piece of membership news::

    {"k": "a", "n": name, "i": incarnation, "a": [ip, port], "m": meta}    alive
    {"k": "s", "n": name, "i": incarnation, "f": accuser}                  suspect
    {"k": "d", "n": name, "i": incarnation, "f": accuser}                  dead (left if f == n)

A push-pull call (``swim.pushpull``) carries ``{"n": sender, "j": join?, "m": [entry, ...]}`` and is
answered ``{"n": responder, "m": [entry, ...]}``, an entry being ``[name, ip, port, incarnation,
state, meta]`` with state one of "a", "s", "d", "l".

Peers are authenticated, but a bug or another version may still send anything: every decoder
checks types and ranges and raises :class:`Malformed`, which the protocol counts and ignores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from drekifs.cluster.net import PeerAddr

PING, ACK, NACK, PING_REQ, GOSSIP = "ping", "ack", "nack", "preq", "gossip"
_KINDS = frozenset({PING, ACK, NACK, PING_REQ, GOSSIP})

MAX_NAME = 253  # a DNS name
MAX_INCARNATION = (1 << 63) - 1
MAX_SEQ = (1 << 63) - 1
MAX_NACK_WAIT_MS = 60_000


class Malformed(ValueError):
    """A message from a peer that does not follow the wire format."""


@dataclass(frozen=True, slots=True)
class Alive:
    """``name`` is alive in its life ``incarnation``, at ``addr``, with ``meta``."""

    name: str
    incarnation: int
    addr: PeerAddr
    meta: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Suspect:
    """``accuser`` suspects ``name`` (in its life ``incarnation``) has failed."""

    name: str
    incarnation: int
    accuser: str


@dataclass(frozen=True, slots=True)
class Dead:
    """``accuser`` declared ``name`` dead; a member that says so of itself has left."""

    name: str
    incarnation: int
    accuser: str

    @property
    def left(self) -> bool:
        return self.accuser == self.name


Update = Alive | Suspect | Dead


@dataclass(frozen=True, slots=True)
class Datagram:
    """A decoded datagram; fields a kind does not use are None."""

    kind: str
    seq: int | None
    target: str | None
    target_addr: PeerAddr | None
    nack_wait: float | None  # seconds; 0 when the requester wants no nack
    updates: list[Update]


# -- Checks ----------------------------------------------------------------------------------


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME:
        raise Malformed(f"{what}: not a name")
    return value


def _int(value: Any, what: str, high: int) -> int:
    # bool is an int to Python, not to the protocol.
    if type(value) is not int or not 0 <= value <= high:
        raise Malformed(f"{what}: not an integer in range")
    return value


def _addr(value: Any, what: str = "address") -> PeerAddr:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise Malformed(f"{what}: not [ip, port]")
    host, port = value
    if not isinstance(host, str) or not 0 < len(host) <= 64:
        raise Malformed(f"{what}: bad host")
    return host, _int(port, what, 65535)


def _meta(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise Malformed("meta: not a map of str keys")
    return value


def _map(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Malformed(f"{what}: not a map")
    return value


# -- Updates ---------------------------------------------------------------------------------


def encode_update(update: Update) -> dict[str, Any]:
    """The wire form of one update."""
    if isinstance(update, Alive):
        return {
            "k": "a",
            "n": update.name,
            "i": update.incarnation,
            "a": list(update.addr),
            "m": update.meta,
        }
    kind = "s" if isinstance(update, Suspect) else "d"
    return {"k": kind, "n": update.name, "i": update.incarnation, "f": update.accuser}


def decode_update(raw: Any) -> Update:
    """One update from the wire; raises Malformed."""
    raw = _map(raw, "update")
    kind = raw.get("k")
    name = _str(raw.get("n"), "update name")
    incarnation = _int(raw.get("i"), "incarnation", MAX_INCARNATION)
    if kind == "a":
        return Alive(name, incarnation, _addr(raw.get("a")), _meta(raw.get("m", {})))
    if kind == "s":
        return Suspect(name, incarnation, _str(raw.get("f"), "accuser"))
    if kind == "d":
        return Dead(name, incarnation, _str(raw.get("f"), "accuser"))
    raise Malformed("update: unknown kind")


def decode_updates(raw: Any) -> list[Update]:
    """The piggybacked updates of a datagram (absent means none); raises Malformed."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise Malformed("updates: not a list")
    return [decode_update(item) for item in raw]


# -- Datagrams -------------------------------------------------------------------------------


def decode_datagram(raw: Any) -> Datagram:
    """A datagram from the wire, every field checked; raises Malformed."""
    raw = _map(raw, "datagram")
    kind = raw.get("t")
    if not isinstance(kind, str) or kind not in _KINDS:
        raise Malformed("datagram: unknown kind")
    seq = None if kind == GOSSIP else _int(raw.get("s"), "seq", MAX_SEQ)
    target = _str(raw.get("n"), "target") if kind in (PING, PING_REQ) else None
    target_addr = None
    nack_wait = None
    if kind == PING_REQ:
        target_addr = _addr(raw.get("a"), "target address")
        nack_wait = _int(raw.get("w", 0), "nack wait", MAX_NACK_WAIT_MS) / 1000
    updates = [] if kind == NACK else decode_updates(raw.get("u"))
    return Datagram(kind, seq, target, target_addr, nack_wait, updates)


# -- Push-pull state -------------------------------------------------------------------------

_STATE_CODES = {"alive": "a", "suspect": "s", "dead": "d", "left": "l"}


def encode_entry(name: str, addr: PeerAddr, incarnation: int, state: str, meta: dict) -> list:
    """One member of a push-pull state (state: alive, suspect, dead or left)."""
    return [name, addr[0], addr[1], incarnation, _STATE_CODES[state], meta]


def decode_state(raw: Any, sender: str) -> list[Update]:
    """A push-pull state as updates, in the words of ``sender``; raises Malformed.

    As memberlist does, a member the sender believes dead becomes a suspicion here, not a death:
    the sender may be the one cut off, and a suspicion gives the member the chance to refute.
    """
    if not isinstance(raw, list):
        raise Malformed("state: not a list")
    updates: list[Update] = []
    for entry in raw:
        if not isinstance(entry, list | tuple) or len(entry) != 6:
            raise Malformed("state entry: not a 6-list")
        name, host, port, incarnation, code, meta = entry
        name = _str(name, "member name")
        incarnation = _int(incarnation, "incarnation", MAX_INCARNATION)
        if code == "a":
            updates.append(Alive(name, incarnation, _addr([host, port]), _meta(meta)))
        elif code in ("s", "d"):
            updates.append(Suspect(name, incarnation, sender))
        elif code == "l":
            updates.append(Dead(name, incarnation, name))
        else:
            raise Malformed("state entry: unknown state")
    return updates


def decode_push_pull(raw: Any) -> tuple[str, bool, list[Update]]:
    """A push-pull request or reply: (sender, join?, its state as updates); raises Malformed."""
    raw = _map(raw, "push-pull")
    sender = _str(raw.get("n"), "sender")
    join = raw.get("j", False)
    if not isinstance(join, bool):
        raise Malformed("join: not a bool")
    return sender, join, decode_state(raw.get("m"), sender)
