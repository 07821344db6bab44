"""Encryption at rest for session state kept outside the worker (Redis/Valkey): AES-256-GCM under a worker key file.

Session snapshots hold ``PRK_out`` and the OSCORE keys of live sessions. In a shared state store they are
only ever stored sealed: ``version (1) || nonce (12) || AES-GCM(key, nonce, plaintext, aad)``, with the
store's key name as the additional data, so a blob copied to another device's key (or another kind of
record) fails to open instead of lending its keys. The state store itself therefore learns nothing
it could use; it can still withhold, delete or roll back blobs (see docs/scaling.md, threat model).

The key is 32 random bytes in a file only its owner may read (0600), shared by the workers of one
deployment (like their database password). :func:`load_or_create_key` refuses a key file that the
group or others can read. Nonces are random (96 bits): fine far beyond any realistic number of
session writes under one key (NIST SP 800-38D's 2**32 bound).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealmq.errors import ConfigError, DecryptError, Reason

KEY_SIZE = 32
NONCE_SIZE = 12
VERSION = 1
_AAD_PREFIX = b"sealmq-state/v1|"


def load_or_create_key(path: Path) -> bytes:
    """The state key in ``path``; made (0600, never overwritten) if the file does not exist.

    Workers started together race to make it: the key is written to a file of this process's own and
    linked into place only once complete (``link`` fails if the name exists), so no worker ever reads
    a half-written key, and every worker ends up with the one that was linked first.
    """
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(KEY_SIZE))
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):  # another worker's key is there first: use it
                os.link(tmp, path)
        finally:
            tmp.unlink()
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(Reason.CONFIG_INVALID, f"state key file {path} must be readable by its owner only (0600)")
    key = path.read_bytes()
    if len(key) != KEY_SIZE:
        raise ConfigError(Reason.CONFIG_INVALID, f"state key file {path} must hold exactly {KEY_SIZE} bytes")
    return key


class StateSealer:
    """Seals and opens state blobs bound to the name they are stored under."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ConfigError(Reason.CONFIG_INVALID, f"state key must be {KEY_SIZE} bytes")
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "StateSealer(<key>)"  # never the key

    def seal(self, name: str, plaintext: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_SIZE)
        return bytes([VERSION]) + nonce + self._aead.encrypt(nonce, plaintext, _AAD_PREFIX + name.encode())

    def open(self, name: str, blob: bytes) -> bytes:
        """The plaintext of a blob stored under ``name``; :class:`DecryptError` if it is not one of ours."""
        if len(blob) < 1 + NONCE_SIZE + 16 or blob[0] != VERSION:
            raise DecryptError
        try:
            return self._aead.decrypt(blob[1:1 + NONCE_SIZE], blob[1 + NONCE_SIZE:], _AAD_PREFIX + name.encode())
        except InvalidTag:
            raise DecryptError from None
