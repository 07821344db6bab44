"""Generate a runnable Mosquitto 2.x configuration directory from the sealmq user file.

``write_config(out_dir, users)`` writes::

    out_dir/mosquitto.conf   from broker/mosquitto/mosquitto.conf (loopback, limits, queues)
    out_dir/acl              device patterns (%u) + one section per backend/monitor user
    out_dir/passwd           name:$7$... (the sealmq user file without the role column), 0600
    out_dir/data/            persistence

Run it with ``mosquitto -c out_dir/mosquitto.conf``.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from broker.passwd import AccountRole, User
from sealmq.errors import ConfigError, Reason
from sealmq.topics import ROOT, Channel

DEFAULT_MAX_MESSAGE_SIZE = 256 * 1024
# mosquitto drops a PUBLISH over message_size_limit but disconnects over max_packet_size (it reads
# the whole packet first): leave room so moderately oversized messages are dropped, not fatal.
MAX_PACKET_SLACK = 1024 * 1024
# Enough for a burst of thousands of messages to a slow backend; bounded by bytes, not by count.
DEFAULT_MAX_QUEUED_MESSAGES = 1_000_000
DEFAULT_MAX_QUEUED_BYTES = 1024 * 1024 * 1024


@dataclass(frozen=True)
class MosquittoOptions:
    host: str = "127.0.0.1"
    port: int = 1883
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_connections: int = 1000
    max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES
    persistence: bool = True
    run_as: str = field(default_factory=lambda: pwd.getpwuid(os.getuid()).pw_name)


def _template(name: str) -> str:
    return resources.files("broker").joinpath("mosquitto", name).read_text(encoding="utf-8")


def acl_sections(users: dict[str, User]) -> str:
    out: list[str] = []
    for user in sorted(users.values(), key=lambda u: u.name):
        if user.role is AccountRole.BACKEND:
            out.append(f"# backend: all devices' .../up in, .../down out\nuser {user.name}")
            out.append(f"topic read {ROOT}/+/+/up")
            out += [f"topic write {ROOT}/+/{ch.value}/down" for ch in Channel]
            out.append("")
        elif user.role is AccountRole.MONITOR:
            out.append(f"# monitor: read everything under sealmq/, write nothing\nuser {user.name}")
            out.append("topic read sealmq/#")
            out.append("")
    return "\n".join(out)


def render(out_dir: Path, users: dict[str, User], opts: MosquittoOptions) -> dict[str, str]:
    """The text of each file (pure; ``write_config`` writes them)."""
    for ch in ("\n", " ", "#"):
        if ch in str(out_dir) or ch in opts.host or ch in opts.run_as:
            raise ConfigError(Reason.CONFIG_INVALID, "paths and names must not hold spaces, '#' or newlines")
    if not users:
        raise ConfigError(Reason.CONFIG_INVALID, "no users: mosquitto would refuse everyone")
    values = {
        "DIR": str(out_dir),
        "HOST": opts.host,
        "PORT": str(opts.port),
        "MAX_CONNECTIONS": str(opts.max_connections),
        "MAX_MESSAGE_SIZE": str(opts.max_message_size),
        "MAX_PACKET_SIZE": str(opts.max_message_size + MAX_PACKET_SLACK),
        "MAX_QUEUED_MESSAGES": str(opts.max_queued_messages),
        "MAX_QUEUED_BYTES": str(opts.max_queued_bytes),
        "RUN_AS": opts.run_as,
        "PERSISTENCE": "true" if opts.persistence else "false",
        "USERS": acl_sections(users),
    }
    files = {"mosquitto.conf": _template("mosquitto.conf"), "acl": _template("acl")}
    for name, text in files.items():
        for key, value in values.items():
            text = text.replace("{{" + key + "}}", value)
        files[name] = text
    files["passwd"] = "".join(f"{u.name}:{u.pw_hash}\n" for u in sorted(users.values(), key=lambda u: u.name))
    return files


def write_config(out_dir: str | Path, users: dict[str, User], opts: MosquittoOptions | None = None) -> Path:
    """Write the config directory; returns the path of mosquitto.conf."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir(mode=0o700, exist_ok=True)
    for name, text in render(out, users, opts or MosquittoOptions()).items():
        path = out / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, text.encode("utf-8"))
        finally:
            os.close(fd)
        os.chmod(path, 0o600)
    return out / "mosquitto.conf"
