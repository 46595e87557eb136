"""The cluster key ring: sealing, opening, rotation, files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drekifs.cluster.keyring import OVERHEAD, KeyRing, KeyRingError, Unsealable

WORLD = b"inf.random.sh"


def test_seal_open_and_what_does_not_open() -> None:
    ring = KeyRing.generate()
    msg = ring.seal(b"ping", WORLD)
    assert len(msg) == 4 + OVERHEAD
    assert ring.open(msg, WORLD) == b"ping"
    assert ring.seal(b"ping", WORLD) != msg  # random nonces
    for bad, why in [
        (msg, b"other.world"),  # another world
        (msg[:-1], WORLD),  # truncated
        (msg[:10], WORLD),
        (bytes([msg[0] ^ 1]) + msg[1:], WORLD),  # version
        (msg[:-1] + bytes([msg[-1] ^ 1]), WORLD),  # tampered
    ]:
        with pytest.raises(Unsealable):
            ring.open(bad, why)
    with pytest.raises(Unsealable):
        KeyRing.generate().open(msg, WORLD)  # another key


def test_rotation_without_downtime(tmp_path: Path) -> None:
    old = KeyRing.generate()
    step1 = old.with_new_key()  # installed everywhere: old still seals, new opens
    new_id = step1.ids()[1]
    assert step1.open(old.seal(b"a", WORLD), WORLD) == b"a"
    step2 = step1.with_primary(new_id)  # the new key seals; the old still opens
    assert step1.open(step2.seal(b"b", WORLD), WORLD) == b"b"
    assert step2.open(old.seal(b"c", WORLD), WORLD) == b"c"
    with pytest.raises(KeyRingError, match="is the primary"):
        step2.without(new_id)
    step3 = step2.without(old.ids()[0])
    with pytest.raises(Unsealable):
        step3.open(old.seal(b"d", WORLD), WORLD)
    path = tmp_path / "ring"
    step2.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert KeyRing.load(path) == step2


def test_bad_files(tmp_path: Path) -> None:
    p = tmp_path / "ring"
    for text, expected in [
        ("", "holds no key"),
        ("not base64!\n", ":1: not base64"),
        ("# c\nAAAA\n", ":2: a key is 32 bytes, this one 3"),
    ]:
        p.write_text(text)
        os.chmod(p, 0o600)  # a ring open to others is refused before it is read
        with pytest.raises(KeyRingError, match=expected):
            KeyRing.load(p)
    with pytest.raises(KeyRingError, match="No such file"):
        KeyRing.load(tmp_path / "missing")


@given(st.binary(max_size=200))
def test_junk_never_opens(junk: bytes) -> None:
    with pytest.raises(Unsealable):
        RING.open(junk, WORLD)


RING = KeyRing.generate()
