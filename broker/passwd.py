"""The broker's user file: one line per MQTT user with its role and a salted password hash.

Line format (``#`` starts a comment)::

    <name>:<role>:$7$<iterations>$<base64 salt>$<base64 PBKDF2-HMAC-SHA512>

The hash is exactly Mosquitto 2.x's ``sha512-pbkdf2`` format (``mosquitto_passwd``), so the
Mosquitto password file is this file with the role column removed (see
:mod:`broker.mosquitto_config`). The role tells the ACL who a user is:

- ``device``: the name is a device id; confined to ``sealmq/v1/<name>/...``;
- ``backend``: publishes ``sealmq/v1/+/<channel>/down``, subscribes ``sealmq/v1/+/+/up``;
- ``monitor``: subscribes ``sealmq/#``, publishes nothing.

PBKDF2 rather than argon2: it is what Mosquitto verifies, and 10,000 iterations cost about
13 ms (measured on the build machine), which the embedded broker runs in a worker thread so
the event loop never stalls on it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from runtime.files import atomic_write
from sealmq.errors import ConfigError, Reason
from sealmq.topics import valid_device_id

DEFAULT_ITERATIONS = 10_000
MIN_ITERATIONS = 1_000  # refuse files weaker than this (mosquitto_passwd's own default is 101)
SALT_LEN = 12  # what mosquitto_passwd uses
HASH_PREFIX = "$7$"
# Service-user names share the device-id alphabet so every name is a safe topic level and file name.


class AccountRole(StrEnum):
    """Kinds of broker account (what the ACL grants), not to be confused with the protocol
    roles of :class:`sealmq.identity.Role`: the monitor is a broker user, never an EDHOC peer."""

    DEVICE = "device"
    BACKEND = "backend"
    MONITOR = "monitor"


@dataclass(frozen=True)
class User:
    name: str
    role: AccountRole
    pw_hash: str  # "$7$iterations$salt$hash"


def hash_password(password: str, *, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None) -> str:
    """Return a Mosquitto-compatible ``$7$`` PBKDF2-HMAC-SHA512 hash of ``password``."""
    if iterations < MIN_ITERATIONS:
        raise ConfigError(Reason.CONFIG_INVALID, f"iterations must be >= {MIN_ITERATIONS}")
    salt = salt if salt is not None else secrets.token_bytes(SALT_LEN)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8", "surrogatepass"), salt, iterations)
    return f"{HASH_PREFIX}{iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _parse_hash(pw_hash: str) -> tuple[int, bytes, bytes]:
    parts = pw_hash.split("$")
    # "$7$it$salt$hash".split("$") == ["", "7", "it", "salt", "hash"]
    # isascii: str.isdigit() also accepts "²" (which int() refuses) and other scripts' digits
    if len(parts) != 5 or parts[0] != "" or parts[1] != "7" or not (parts[2].isascii() and parts[2].isdigit()):
        raise ConfigError(Reason.CONFIG_INVALID, "password hash is not in $7$ (sha512-pbkdf2) format")
    try:
        salt = base64.b64decode(parts[3], validate=True)
        digest = base64.b64decode(parts[4], validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(Reason.CONFIG_INVALID, "password hash has bad base64") from None
    iterations = int(parts[2])
    if len(digest) != 64 or not salt or iterations < 1 or iterations > 10_000_000:
        raise ConfigError(Reason.CONFIG_INVALID, "password hash has a wrong length or iteration count")
    return iterations, salt, digest


def verify_password(password: str, pw_hash: str) -> bool:
    """Constant-time check of ``password`` against a ``$7$`` hash; False on any malformed hash."""
    try:
        iterations, salt, digest = _parse_hash(pw_hash)
    except ConfigError:
        return False
    candidate = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8", "surrogatepass"), salt, iterations)
    return hmac.compare_digest(candidate, digest)


def valid_user_name(name: str) -> bool:
    return valid_device_id(name)


def parse_users(text: str) -> dict[str, User]:
    """Parse the user file; raise ConfigError(CONFIG_INVALID) naming the bad line."""
    users: dict[str, User] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":", 2)
        if len(parts) != 3:
            raise ConfigError(Reason.CONFIG_INVALID, f"line {lineno}: expected name:role:hash")
        name, role_text, pw_hash = parts
        if not valid_user_name(name):
            raise ConfigError(Reason.CONFIG_INVALID, f"line {lineno}: bad user name")
        try:
            role = AccountRole(role_text)
        except ValueError:
            raise ConfigError(Reason.CONFIG_INVALID, f"line {lineno}: unknown role {role_text!r}") from None
        iterations, _, _ = _parse_hash(pw_hash)
        if iterations < MIN_ITERATIONS:
            raise ConfigError(Reason.CONFIG_INVALID, f"line {lineno}: fewer than {MIN_ITERATIONS} iterations")
        if name in users:
            raise ConfigError(Reason.CONFIG_INVALID, f"line {lineno}: duplicate user {name!r}")
        users[name] = User(name, role, pw_hash)
    return users


def format_users(users: dict[str, User]) -> str:
    lines = ["# sealmq broker users: name:role:$7$iterations$salt$pbkdf2-sha512 (see docs/broker.md)"]
    lines += [f"{u.name}:{u.role.value}:{u.pw_hash}" for u in sorted(users.values(), key=lambda u: u.name)]
    return "\n".join(lines) + "\n"


def load_users(path: str | Path) -> dict[str, User]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(Reason.NOT_FOUND, f"user file {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        why = type(exc).__name__
        raise ConfigError(Reason.CONFIG_INVALID, f"cannot read user file {path}: {why}") from None
    return parse_users(text)


def _write_private(path: Path, text: str) -> None:
    """The file holds password hashes: 0600, durable, atomic."""
    atomic_write(path, text.encode("utf-8"), mode=0o600)


def add_user(
    path: str | Path,
    name: str,
    password: str,
    role: AccountRole | str = AccountRole.DEVICE,
    *,
    iterations: int = DEFAULT_ITERATIONS,
) -> User:
    """Add or replace ``name`` in the user file at ``path`` (created 0600 if missing)."""
    if not valid_user_name(name):
        raise ConfigError(Reason.CONFIG_INVALID, "user name must match [a-z0-9][a-z0-9._-]{0,62}")
    if not password:
        raise ConfigError(Reason.CONFIG_INVALID, "empty password")
    p = Path(path)
    users = load_users(p) if p.exists() else {}
    user = User(name, AccountRole(role), hash_password(password, iterations=iterations))
    users[name] = user
    _write_private(p, format_users(users))
    return user


def remove_user(path: str | Path, name: str) -> None:
    p = Path(path)
    users = load_users(p)
    if users.pop(name, None) is None:
        raise ConfigError(Reason.NOT_FOUND, f"no user {name!r}")
    _write_private(p, format_users(users))


def generate_password() -> str:
    """A random password (about 190 bits) for a new user, printed once by the CLI."""
    return secrets.token_urlsafe(24)
