"""The cluster key ring: every frame and datagram sealed with XChaCha20-Poly1305.

A key ring is a text file (mode 0600, or 0400: any bit for group or others and it is refused, as
ssh refuses such a private key) of base64 keys, one a line, the *primary* first: the
primary seals, every key opens, so keys rotate without downtime — install a new key everywhere,
make it primary everywhere, then remove the old one (docs/operations.md).

A sealed message is ``version (1) | key id (4) | nonce (24) | ciphertext + tag (16)``; the key id
(the first 4 bytes of BLAKE2b of the key) picks the key to open it with, and the world's name is
bound in as associated data, so a message of another world never opens. Nonces are random: 192
bits never repeat, whatever a busy key seals.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from nacl._sodium import ffi, lib

KEY_BYTES = 32
NONCE_BYTES = 24
TAG_BYTES = 16
VERSION = 1
HEADER_BYTES = 1 + 4 + NONCE_BYTES
OVERHEAD = HEADER_BYTES + TAG_BYTES


class KeyRingError(Exception):
    """The key ring file is missing, unreadable, open to others or malformed; says where."""


_EXCL = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _create_private(tmp: Path) -> int:
    """A new file, 0600, never an existing one nor through a symbolic link: a file made there
    beforehand (0666, say) must not become the ring. A leftover regular file (an interrupted
    save) is removed; a symbolic link or anything else is refused, as nothing of ours."""
    try:
        return os.open(tmp, _EXCL, 0o600)
    except FileExistsError:
        pass
    st = os.lstat(tmp)
    if stat.S_ISLNK(st.st_mode):
        raise KeyRingError(
            f"{tmp} is a symbolic link (to {os.readlink(tmp)}): not following it; remove it,"
            " and find out who made it"
        )
    if not stat.S_ISREG(st.st_mode):
        raise KeyRingError(f"{tmp} exists and is not a regular file: remove it")
    os.unlink(tmp)
    try:
        return os.open(tmp, _EXCL, 0o600)
    except FileExistsError:  # made again between the unlink and the open: someone races us
        raise KeyRingError(f"{tmp} keeps being created by someone else: refused") from None


def _fsync_dir(directory: Path) -> None:
    """The rename on disk too: a crash leaves the old ring or the new one."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Unsealable(Exception):
    """A message that does not open: junk, truncated, tampered, or another key or world."""


def key_id(key: bytes) -> bytes:
    return hashlib.blake2b(key, digest_size=4).digest()


# libsodium straight through cffi: pynacl's bindings check every argument on every call, which
# costs more than the cipher itself on a 100-byte frame (a call seals and opens two each).
_ULL = "unsigned long long *"


def _encrypt(plaintext: bytes, aad: bytes, nonce: bytes, key: bytes) -> bytes:
    out = ffi.new("unsigned char[]", len(plaintext) + TAG_BYTES)
    out_len = ffi.new(_ULL)
    lib.crypto_aead_xchacha20poly1305_ietf_encrypt(
        out, out_len, plaintext, len(plaintext), aad, len(aad), ffi.NULL, nonce, key
    )
    return ffi.buffer(out, out_len[0])[:]


def _decrypt(sealed: bytes, aad: bytes, nonce: bytes, key: bytes) -> bytes | None:
    if len(sealed) < TAG_BYTES:
        return None
    out = ffi.new("unsigned char[]", max(1, len(sealed) - TAG_BYTES))
    out_len = ffi.new(_ULL)
    rc = lib.crypto_aead_xchacha20poly1305_ietf_decrypt(
        out, out_len, ffi.NULL, sealed, len(sealed), aad, len(aad), nonce, key
    )
    if rc != 0:
        return None
    return ffi.buffer(out, out_len[0])[:]


@dataclass(frozen=True)
class KeyRing:
    keys: tuple[bytes, ...]  # primary first

    def __post_init__(self) -> None:
        if not self.keys:
            raise KeyRingError("a key ring needs at least one key")
        for k in self.keys:
            if len(k) != KEY_BYTES:
                raise KeyRingError(f"a key is {KEY_BYTES} bytes, not {len(k)}")
        # Computed once: every seal and open needs them.
        object.__setattr__(self, "_by_id", {key_id(k): k for k in self.keys})
        object.__setattr__(self, "_head", bytes([VERSION]) + key_id(self.keys[0]))

    @property
    def primary(self) -> bytes:
        return self.keys[0]

    def ids(self) -> list[str]:
        return [key_id(k).hex() for k in self.keys]

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        header = self._head + nonce  # type: ignore[attr-defined]
        return header + _encrypt(plaintext, header + aad, nonce, self.keys[0])

    def open(self, message: bytes, aad: bytes) -> bytes:
        if len(message) < OVERHEAD or message[0] != VERSION:
            raise Unsealable("too short or unknown version")
        kid = message[1:5]
        key = self._by_id.get(kid)  # type: ignore[attr-defined]
        if key is None:
            raise Unsealable(f"no key with id {kid.hex()}")
        header = message[:HEADER_BYTES]
        plain = _decrypt(message[HEADER_BYTES:], header + aad, message[5:HEADER_BYTES], key)
        if plain is None:
            raise Unsealable("authentication failed")
        return plain

    # -- files -----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike) -> KeyRing:
        p = Path(path)
        try:
            with open(p, "rb") as f:  # the mode of what was opened (a symlink's target), as ssh
                mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
                if mode & 0o077:
                    raise KeyRingError(
                        f"key ring {p} is mode {mode:04o}, open to group or others: refused"
                        f" (anyone who reads it joins the cluster); run: chmod 600 {p}"
                    )
                text = f.read().decode("utf-8", errors="replace")
        except OSError as e:
            raise KeyRingError(f"key ring {p}: {e.strerror}") from None
        keys = []
        for n, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                key = base64.b64decode(line, validate=True)
            except ValueError:
                raise KeyRingError(f"{p}:{n}: not base64") from None
            if len(key) != KEY_BYTES:
                raise KeyRingError(f"{p}:{n}: a key is {KEY_BYTES} bytes, this one {len(key)}")
            keys.append(key)
        if not keys:
            raise KeyRingError(f"key ring {p} holds no key")
        return cls(tuple(keys))

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically, readable by its owner only."""
        p = Path(path)
        lines = ["# drekifs key ring: the first key seals, all keys open. Keep it secret."]
        for i, k in enumerate(self.keys):
            role = "primary" if i == 0 else "accepted"
            lines.append(f"{base64.b64encode(k).decode()}  # {key_id(k).hex()} {role}")
        tmp = p.with_name(p.name + ".tmp")
        try:
            fd = _create_private(tmp)
        except OSError as e:
            raise KeyRingError(f"cannot write {tmp}: {e.strerror}") from None
        try:
            with os.fdopen(fd, "w") as f:
                f.write("\n".join(lines) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise KeyRingError(f"cannot write {p}: {e.strerror}") from None
        _fsync_dir(p.parent)

    @classmethod
    def generate(cls) -> KeyRing:
        return cls((os.urandom(KEY_BYTES),))

    def with_new_key(self) -> KeyRing:
        """A new accepted key, not yet primary (step 1 of a rotation)."""
        return KeyRing((*self.keys, os.urandom(KEY_BYTES)))

    def with_primary(self, kid: str) -> KeyRing:
        """Make the key with this id primary (step 2)."""
        chosen = [k for k in self.keys if key_id(k).hex() == kid]
        if not chosen:
            raise KeyRingError(f"no key with id {kid} (ids: {', '.join(self.ids())})")
        return KeyRing((chosen[0], *(k for k in self.keys if k != chosen[0])))

    def without(self, kid: str) -> KeyRing:
        """Remove a key (step 3); never the primary."""
        if key_id(self.primary).hex() == kid:
            raise KeyRingError(f"key {kid} is the primary: make another one primary first")
        rest = tuple(k for k in self.keys if key_id(k).hex() != kid)
        if len(rest) == len(self.keys):
            raise KeyRingError(f"no key with id {kid} (ids: {', '.join(self.ids())})")
        return KeyRing(rest)
