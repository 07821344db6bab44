"""Who may connect and what they may do: the embedded broker's authentication and ACL decisions.

One :class:`BrokerPolicy` per broker, shared by the CONNECT gate (in :mod:`broker.framing`) and
the amqtt plugins (in :mod:`broker.plugins`). Password checks (PBKDF2, about 13 ms) run in a
worker thread, at most ``max_parallel_checks`` at a time, so neither a flood of bad CONNECTs nor
a reconnect storm stalls the event loop that relays everyone's messages. A successful check is
remembered as an HMAC of the password under a per-process random key, so amqtt's own plugin
call for the same CONNECT costs microseconds instead of a second PBKDF2 run.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from pathlib import Path

from broker import acl
from broker.framing import (
    CONNACK_ACCEPTED,
    CONNACK_BAD_CREDENTIALS,
    CONNACK_BAD_PROTOCOL,
    CONNACK_ID_REJECTED,
    CONNACK_NOT_AUTHORIZED,
    ConnectInfo,
)
from broker.passwd import AccountRole, User, load_users, verify_password

CLIENT_ID_SEPARATOR = ":"  # not in the device-id alphabet, so "<user>:<suffix>" never names another user


def client_id_allowed(username: str, client_id: str) -> bool:
    """A client id must be empty (broker-assigned), the user name, or ``<user>:<suffix>``.

    amqtt drops or takes over the session of whatever client id a CONNECT names; binding ids to
    users stops device A from kicking the backend (or device B) off by reusing its client id.
    """
    return client_id in ("", username) or client_id.startswith(username + CLIENT_ID_SEPARATOR)


class BrokerPolicy:
    def __init__(self, users: dict[str, User], *, max_parallel_checks: int = 2) -> None:
        self._users = dict(users)
        self._cache_key = secrets.token_bytes(32)
        self._verified: dict[str, bytes] = {}
        self._checks = asyncio.Semaphore(max_parallel_checks)
        self._cert_tokens: dict[str, str] = {}

    @classmethod
    def from_file(cls, path: str | Path) -> BrokerPolicy:
        return cls(load_users(path))

    def role(self, name: str | None) -> AccountRole | None:
        user = self._users.get(name) if name is not None else None
        return user.role if user else None

    def _tag(self, name: str, password: str) -> bytes:
        msg = name.encode() + b"\x00" + password.encode("utf-8", "surrogateescape")
        return hmac.new(self._cache_key, msg, hashlib.sha256).digest()

    async def check_password(self, name: str | None, password: str | None) -> AccountRole | None:
        """The user's role if ``password`` is right, else None. Never raises on bad input."""
        if name is None or password is None:
            return None
        user = self._users.get(name)
        if user is None:
            return None
        tag = self._tag(name, password)
        cached = self._verified.get(name)
        if cached is not None and hmac.compare_digest(cached, tag):
            return user.role
        async with self._checks:
            ok = await asyncio.to_thread(verify_password, password, user.pw_hash)
        if not ok:
            return None
        self._verified[name] = tag
        return user.role

    async def gate(self, info: ConnectInfo) -> int:
        """Judge a CONNECT before amqtt sees it; returns a CONNACK return code (0 = accept)."""
        if info.proto_name != "MQTT" or info.proto_level != 4:
            return CONNACK_BAD_PROTOCOL
        role = await self.check_password(info.username, info.password)
        if role is None or info.username is None:
            return CONNACK_BAD_CREDENTIALS
        if not client_id_allowed(info.username, info.client_id):
            return CONNACK_ID_REJECTED
        if info.will_topic is not None and (
            info.will_retain or not acl.may_publish(role, info.username, info.will_topic)
        ):
            return CONNACK_NOT_AUTHORIZED
        return CONNACK_ACCEPTED

    async def gate_certificate(self, info: ConnectInfo, role: AccountRole, name: str) -> int:
        """Judge a CONNECT on a connection whose verified TLS client certificate names ``role:name``.

        The certificate replaces the password: the account must exist with the certificate's role
        (a device certificate never logs in as the backend or a monitor), and a user name in the
        CONNECT, if any, must be that account's.
        """
        if info.proto_name != "MQTT" or info.proto_level != 4:
            return CONNACK_BAD_PROTOCOL
        if self.role(name) is not role or info.username not in (None, "", name):
            return CONNACK_NOT_AUTHORIZED
        if not client_id_allowed(name, info.client_id):
            return CONNACK_ID_REJECTED
        if info.will_topic is not None and (info.will_retain or not acl.may_publish(role, name, info.will_topic)):
            return CONNACK_NOT_AUTHORIZED
        return CONNACK_ACCEPTED

    def certificate_token(self, name: str) -> str:
        """A per-process secret amqtt's auth plugin accepts for ``name`` (certificate logins only).

        It never leaves the broker: the CONNECT gate puts it in the CONNECT it hands amqtt after
        the certificate was checked; the gate itself never accepts it from a client.
        """
        return self._cert_tokens.setdefault(name, secrets.token_urlsafe(32))

    async def check_plugin(self, name: str | None, password: str | None) -> bool:
        """amqtt's auth plugin: a password, or the token of a certificate login."""
        token = self._cert_tokens.get(name) if name is not None else None
        if token is not None and password is not None and hmac.compare_digest(token.encode(), password.encode(
                "utf-8", "surrogateescape")):
            return True
        return await self.check_password(name, password) is not None

    def may_publish(self, name: str | None, topic: str) -> bool:
        role = self.role(name)
        return role is not None and name is not None and acl.may_publish(role, name, topic)

    def may_subscribe(self, name: str | None, flt: str) -> bool:
        role = self.role(name)
        return role is not None and name is not None and acl.may_subscribe(role, name, flt)

    def may_receive(self, name: str | None, topic: str) -> bool:
        role = self.role(name)
        return role is not None and name is not None and acl.may_receive(role, name, topic)
