"""A store's LMDB environment on disk: its named databases, and opening it (creating it, or
bringing an older schema up to this one).

On disk (``<data-dir>/stores/<name>/``, one environment per store), named databases::

    entries  loc \\0 parent \\0 name  ->  Record.pack()     the entry ``parent/name`` at ``loc``
             loc \\0                  ->  Record.pack()     the store's root directory at ``loc``
             \\x01 digest name        ->  Record.pack()     the same, when ``loc \\0 parent \\0``
                                                         is over 256 bytes (keys.py)
    heads    \\x01 digest             ->  loc \\0 parent \\0  what each digest stands for
    values   eid (8 bytes, big end)  ->  the file's bytes
    eids     eid                     ->  entry key          (entry ids are inode numbers' base)
    meta     b"schema" -> 2, b"next_eid" -> u64, b"last_write_ns" -> u64,
             b"value_bytes" -> u64 (bytes in all live values),
             b"x.<name>" -> u64 (numbers of other parts: b"x.incarnation", membership's)

``loc`` is the location's DNS name (for local stores, the node's), ``parent`` the "/"-joined path
of the directory (empty at the root). A directory's children are the keys under one prefix,
already in name order.
"""

from __future__ import annotations

import errno
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import lmdb

from ..keys import INLINE_HEAD, db_head, db_key, key_head
from ..record import FILE, Record, StoreError

log = logging.getLogger(__name__)

SCHEMA = 2  # 2: long heads hashed (keys.py); a schema 1 store is rewritten at open
U64 = struct.Struct(">Q")  # every number in ``meta``

# py-lmdb's handle of a named database (lmdb._Database: not exported under a public name).
Db = Any


class Databases(NamedTuple):
    entries: Db
    values: Db
    eids: Db
    meta: Db
    heads: Db


@dataclass(frozen=True)
class Counters:
    """The numbers ``meta`` keeps for the store itself, as the last commit left them."""

    next_eid: int
    last_write_ns: int
    value_bytes: int


def open_store(
    name: str, path: Path, map_size: int
) -> tuple[lmdb.Environment, Databases, Counters]:
    """The environment at ``path`` (made if missing) at schema :data:`SCHEMA`, its databases and
    its counters. A schema 1 store is upgraded in the opening transaction; any other schema is
    refused (EPROTO): a newer drekifs wrote it."""
    path.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(
        str(path),
        map_size=map_size,
        max_dbs=8,
        sync=True,
        metasync=True,
        readahead=True,
        mode=0o600,  # data.mdb and lock.mdb: the daemon's alone (py-lmdb's default is 0755)
    )
    dbs = Databases(
        env.open_db(b"entries"),
        env.open_db(b"values"),
        env.open_db(b"eids"),
        env.open_db(b"meta"),
        env.open_db(b"heads"),
    )
    with env.begin(write=True, db=dbs.meta) as txn:
        schema = txn.get(b"schema")
        if schema is None:
            txn.put(b"schema", U64.pack(SCHEMA))
        elif U64.unpack(schema)[0] == 1:
            _upgrade_from_1(name, txn, dbs)
            txn.put(b"schema", U64.pack(SCHEMA))
        elif U64.unpack(schema)[0] != SCHEMA:
            raise StoreError(errno.EPROTO, f"store {name} at {path} has schema {schema!r}")
        raw = txn.get(b"next_eid")
        next_eid = U64.unpack(raw)[0] if raw else 1
        raw = txn.get(b"last_write_ns")
        last_write_ns = U64.unpack(raw)[0] if raw else 0
        raw = txn.get(b"value_bytes")
    value_bytes = U64.unpack(raw)[0] if raw else _count_value_bytes(env, dbs)
    return env, dbs, Counters(next_eid, last_write_ns, value_bytes)


def _upgrade_from_1(name: str, txn: lmdb.Transaction, dbs: Databases) -> None:
    """Schema 1 kept every key whole: those with a head over INLINE_HEAD bytes move to
    their hashed form (keys.py). One pass at the first open, in the opening transaction."""
    moved = [
        (key, raw)
        for key, raw in txn.cursor(db=dbs.entries)
        if len(key) > INLINE_HEAD and db_key(key) != key
    ]
    for key, raw in moved:
        txn.delete(key, db=dbs.entries)
        txn.put(db_key(key), raw, db=dbs.entries)
        head = key_head(key)
        txn.put(db_head(head), head, db=dbs.heads)
    if moved:
        log.info("store %s: %d keys with long paths moved to schema 2", name, len(moved))


def _count_value_bytes(env: lmdb.Environment, dbs: Databases) -> int:
    """Bytes in all live values, for a store whose ``meta`` does not say (written before it
    kept the count)."""
    with env.begin(db=dbs.entries) as txn:
        return sum(
            rec.size
            for rec in (Record.unpack(raw) for raw in txn.cursor().iternext(keys=False))
            if rec.kind == FILE
        )
