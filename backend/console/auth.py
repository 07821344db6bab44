"""Who may use the console: the operator's password, checked against a salted hash; sessions.

``sealmq bootstrap`` writes the password (random, 0600) for the operator and, for the backend, only
its salted scrypt hash (``console.auth``: ``scrypt$N$r$p$salt$hash``, base64). A browser logs in
once and gets a random session token in an HttpOnly, SameSite=Strict cookie; scripts (curl,
Prometheus) send the password as a bearer token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import threading
import time
from pathlib import Path

from sealmq.errors import ConfigError, Reason

# scrypt cost: about 50 ms and 16 MiB per check here. The password is random (24 bytes), but the hash
# file may leak: guessing must still cost.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_PREFIX = "scrypt$"
COOKIE = "sealmq_console"
# the broker user (role monitor, read-only) of the console's broker view: its own login, so that it never
# takes over the operator's `monitor` connection (Mosquitto allows one connection per user)
CONSOLE_MONITOR = "console-monitor"
SESSION_SECONDS = 12 * 3600


def make_hash(password: str, *, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    b64 = base64.b64encode
    return f"{_PREFIX}{SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, pw_hash: str) -> bool:
    """Constant-time check of ``password`` against :func:`make_hash`'s output; False if malformed."""
    parts = pw_hash.split("$")
    if len(parts) != 6 or parts[0] != "scrypt" or not all(p.isdigit() for p in parts[1:4]):
        return False
    n, r, p = (int(x) for x in parts[1:4])
    if not (2 <= n <= 2**20 and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
        return False
    try:
        salt = base64.b64decode(parts[4], validate=True)
        digest = base64.b64decode(parts[5], validate=True)
    except (binascii.Error, ValueError):
        return False
    if not salt or len(digest) != 32:
        return False
    return hmac.compare_digest(_scrypt(password, salt, n, r, p), digest)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8", "surrogatepass"), salt=salt, n=n, r=r, p=p,
                          maxmem=256 * 1024 * 1024, dklen=32)


def load_hash(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(Reason.CONFIG_INVALID, f"cannot read the console password hash {path}: {exc.strerror}"
                          " (create it with `sealmq bootstrap`)") from None
    if not text.startswith(_PREFIX):
        raise ConfigError(Reason.CONFIG_INVALID, f"{path} does not hold a scrypt password hash")
    return text


class ConsoleAuth:
    def __init__(self, pw_hash: str, *, clock: object = time.time) -> None:
        self._hash = pw_hash
        self._sessions: dict[str, float] = {}  # sha256(token) -> expiry
        self._verified: set[bytes] = set()  # sha256 of bearer passwords already checked (scrypt is slow on purpose)
        self._lock = threading.Lock()
        self._clock = clock

    def check_password(self, password: str) -> bool:
        if not password or len(password) > 256:
            return False
        digest = hashlib.sha256(password.encode("utf-8", "surrogatepass")).digest()
        with self._lock:
            known = any(hmac.compare_digest(digest, d) for d in self._verified)
        if known:
            return True
        if not verify_password(password, self._hash):
            return False
        with self._lock:
            self._verified.add(digest)
        return True

    def new_session(self) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            now = self._now()
            self._sessions = {k: v for k, v in self._sessions.items() if v > now}
            self._sessions[self._key(token)] = now + SESSION_SECONDS
        return token

    def check_session(self, token: str | None) -> bool:
        if not token or len(token) > 128:
            return False
        with self._lock:
            # looked up by its hash: a dict lookup on the token itself would leak timing on the token
            expiry = self._sessions.get(self._key(token))
            return expiry is not None and expiry > self._now()

    def end_session(self, token: str | None) -> None:
        if token:
            with self._lock:
                self._sessions.pop(self._key(token), None)

    def _now(self) -> float:
        return float(self._clock())  # type: ignore[operator]

    @staticmethod
    def _key(token: str) -> str:
        return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
