"""Who may use the console: the operator's password, checked against a salted hash; sessions.

``sealmq bootstrap`` writes the password (random, 0600) for the operator and, for the backend, only
its salted PBKDF2-SHA512 hash (``console.auth``, the same ``$7$`` format as the broker's user file,
:mod:`broker.passwd`). A browser logs in once and gets a random session token in an HttpOnly,
SameSite=Strict cookie; scripts (curl, Prometheus) send the password as a bearer token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from pathlib import Path

from broker.passwd import hash_password, verify_password
from sealmq.errors import ConfigError, Reason

ITERATIONS = 200_000  # the password is random (24 bytes), but the hash file may leak: make guessing cost
COOKIE = "sealmq_console"
SESSION_SECONDS = 12 * 3600


def make_hash(password: str) -> str:
    return hash_password(password, iterations=ITERATIONS)


def load_hash(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(Reason.CONFIG_INVALID, f"cannot read the console password hash {path}: {exc.strerror}"
                          " (create it with `sealmq bootstrap`)") from None
    if not text.startswith("$7$"):
        raise ConfigError(Reason.CONFIG_INVALID, f"{path} does not hold a $7$ password hash")
    return text


class ConsoleAuth:
    def __init__(self, pw_hash: str, *, clock: object = time.time) -> None:
        self._hash = pw_hash
        self._sessions: dict[str, float] = {}  # sha256(token) -> expiry
        self._verified: set[bytes] = set()  # sha256 of bearer passwords already checked (PBKDF2 is slow)
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
