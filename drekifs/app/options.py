"""The values of ``drekifs mount`` options, parsed the same from the command line and from the
configuration file: sizes, durations, poll times, store names, DNS servers, log levels.

Each parser takes the text as typed and returns the value, or raises
:class:`argparse.ArgumentTypeError` whose message argparse prints as it is (``parse_server``
raises :class:`ValueError`: ``--dns`` is checked after parsing, with the world's domain).
"""

from __future__ import annotations

import argparse

from ..urn import is_valid_store_name

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """12, 64k, 1M, 1MiB, 2G: bytes."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in _UNITS else ""
    number = t[: len(t) - len(unit)]
    if not number.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (like 1048576, 64k, 1MiB)")
    return int(number) * _UNITS[unit]


_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``12h``, ``7d``: seconds."""
    t = text.strip().lower()
    unit = t[-1:] if t[-1:] in _SECONDS else "s"
    number = t[:-1] if t[-1:] in _SECONDS else t
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (e.g. 7d, 12h, 90s)"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration is not negative")
    return value * _SECONDS[unit]


MAX_POLL_US = 10_000


def poll_us(text: str) -> int:
    """Microseconds of polling, 0 to 10,000 (a longer poll only burns CPU)."""
    t = text.strip().lower().removesuffix("us")
    if not t.isdigit() or int(t) > MAX_POLL_US:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a poll time (microseconds, 0 to {MAX_POLL_US:,})"
        )
    return int(t)


def positive_number(text: str) -> float:
    """A number above 0: ``4``, ``2.5``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number above 0")
    return value


MAX_INDIRECT_CHECKS = 16


def indirect_checks(text: str) -> int:
    """Helpers asked to ping a member that missed its ping: 0 to 16."""
    t = text.strip()
    if not t.isdigit() or int(t) > MAX_INDIRECT_CHECKS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a count of indirect checks (0 to {MAX_INDIRECT_CHECKS})"
        )
    return int(t)


def store_name(text: str) -> str:
    """A local store of this node beside ``local``: a store name, not a built-in one."""
    if not is_valid_store_name(text) or text in ("global", "local"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a store name ([a-z0-9][a-z0-9_-]*, not global or local)"
        )
    return text


def parse_server(text: str) -> tuple[str, int]:
    """A DNS server: HOST, HOST:PORT, [V6]:PORT or a bare IPv6 address (port 53 by default).
    Raises ValueError with the reason."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":") or "53"
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, "53"
    if not host:
        raise ValueError(f"DNS server {text!r} has no host")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"DNS server {text!r}: bad port {port!r}")
    return host, int(port)
