"""The mount configuration file: one flat TOML table of the ``drekifs mount`` options.

Keys are named like the long options of ``drekifs mount`` (``data-dir`` or ``data_dir``); each
value is checked with the parser the command line uses. Relative paths are taken relative to the
file's directory. Errors are :class:`ConfigError`, whose message reads ``FILE:LINE: key 'x':
reason``. docs/configuration.md lists every key.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .options import (
    LOG_LEVELS,
    indirect_checks,
    parse_duration,
    parse_server,
    parse_size,
    poll_us,
    positive_number,
    store_name,
)

DEFAULT_PATH = Path("/etc/drekifs/drekifs.toml")
ENV_VAR = "DREKIFS_CONFIG"


class ConfigError(Exception):
    """A configuration file that cannot be used; the message names the file and line."""


def default_path() -> Path | None:
    """The configuration file used when --config is not given: $DREKIFS_CONFIG (empty: none),
    else /etc/drekifs/drekifs.toml; None when that file does not exist."""
    env = os.environ.get(ENV_VAR)
    if env == "":
        return None
    path = DEFAULT_PATH if env is None else Path(env)
    return path if path.is_file() else None


# -- value checks: each takes the TOML value (and the file's directory), returns the value the
# -- command line would give for the same option, or raises ValueError with the reason.


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _string(value: Any, base: Path) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_type_name(value)}")
    if not value:
        raise ValueError("must not be empty")
    return value


def _path(value: Any, base: Path) -> str:
    return os.path.join(base, os.path.expanduser(_string(value, base)))


def _strings(value: Any, base: Path) -> list[str]:
    """A string or a list of strings (a string alone is a list of one)."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("must not be an empty list")
    return [_string(v, base) for v in items]


def _bool(value: Any, base: Path) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_type_name(value)}")
    return value


def _arg(
    parse: Callable[[str], Any], kind: str, *, fractions: bool = False
) -> Callable[[Any, Path], Any]:
    """A value the command line parses with ``parse``: a string, or an integer (a float too
    with ``fractions``) as its text."""
    numbers = (int, float) if fractions else (int,)

    def check(value: Any, base: Path) -> Any:
        if isinstance(value, bool) or not isinstance(value, (*numbers, str)):
            raise ValueError(f"expected {kind}, got {_type_name(value)}")
        try:
            return parse(str(value))
        except argparse.ArgumentTypeError as e:
            raise ValueError(str(e)) from None

    return check


_size = _arg(parse_size, 'a size (like 1048576 or "1MiB")')
_duration = _arg(parse_duration, 'a duration (seconds, or like "7d")', fractions=True)
_poll_us = _arg(poll_us, "microseconds (an integer)")
_store = _arg(store_name, "a store name")
_positive = _arg(positive_number, "a number", fractions=True)
_indirect = _arg(indirect_checks, "a count (an integer)")


def _stores(value: Any, base: Path) -> list[str]:
    return [_store(v, base) for v in _strings(value, base)]


def _dns(value: Any, base: Path) -> list[str]:
    servers = _strings(value, base)
    for s in servers:
        parse_server(s)  # ValueError with the reason
    return servers


def _log_level(value: Any, base: Path) -> str:
    level = _string(value, base).upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
    return level


def _options(value: Any, base: Path) -> list[str]:
    return [o for opt in _strings(value, base) for o in opt.split(",") if o]


# TOML key -> (the argparse dest of the same mount option, check)
KEYS: dict[str, tuple[str, Callable[[Any, Path], Any]]] = {
    "world": ("world", lambda v, b: _string(v, b).lower().rstrip(".")),
    "zone": ("zone", lambda v, b: Path(_path(v, b))),
    "dns": ("dns", _dns),
    "min-refresh": ("min_refresh", _duration),
    "max-refresh": ("max_refresh", _duration),
    "node": ("node", _string),
    "data-dir": ("data_dir", lambda v, b: Path(_path(v, b))),
    "options": ("o", _options),
    "foreground": ("foreground", _bool),
    "cache-timeout": ("cache_timeout", _duration),
    "log-level": ("log_level", _log_level),
    "log-file": ("log_file", _path),
    "keyring": ("keyring", _path),
    "store": ("store", _stores),
    "max-global-value": ("max_global_value", _size),
    "max-local-value": ("max_local_value", _size),
    "tombstone-grace": ("tombstone_grace", _duration),
    "poll-us": ("poll_us", _poll_us),
    "probe-interval": ("probe_interval", _duration),
    "probe-timeout": ("probe_timeout", _duration),
    "indirect-checks": ("indirect_checks", _indirect),
    "suspicion-mult": ("suspicion_mult", _positive),
    "mountpoint": ("mountpoint", _path),
}


def _line_of(text: str, key: str) -> int | None:
    """The line (1-based) where ``key`` is set or opened as a table, if it can be found."""
    name = rf"(?:{re.escape(key)}|\"{re.escape(key)}\"|'{re.escape(key)}')"
    pattern = re.compile(rf"^\s*(?:{name}\s*=|\[+\s*{name}\s*\]+)")
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return number
    return None


def _error(path: Path, text: str, key: str, reason: str) -> ConfigError:
    line = _line_of(text, key)
    where = f"{path}:{line}" if line is not None else str(path)
    return ConfigError(f"{where}: key {key!r}: {reason}")


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The options of a configuration file, by argparse dest of ``drekifs mount``, each checked
    and converted to what the command line would give."""
    path = Path(path)
    try:
        text = path.read_bytes().decode()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"at line (\d+)", str(e))
        where = f"{path}:{m.group(1)}" if m else str(path)
        raise ConfigError(f"{where}: {e}") from None
    base = path.resolve().parent
    out: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for raw, value in table.items():
        key = raw.replace("_", "-")
        if key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(KEYS)}"
            raise _error(path, text, raw, f"unknown key; {hint}")
        if key in seen:
            raise _error(path, text, raw, f"set twice (also as {seen[key]!r})")
        seen[key] = raw
        dest, check = KEYS[key]
        if isinstance(value, dict):
            raise _error(path, text, raw, "expected a value, not a table")
        try:
            out[dest] = check(value, base)
        except ValueError as e:
            raise _error(path, text, raw, str(e)) from None
    if "zone" in out and "dns" in out:
        raise _error(path, text, seen["dns"], "give either zone or dns, not both")
    return out
