"""Generate a runnable Mosquitto 2.x configuration directory from the sealmq user file.

``write_config(out_dir, users)`` writes::

    out_dir/mosquitto.conf   from broker/mosquitto/mosquitto.conf (loopback, limits, queues)
    out_dir/acl              one section per user, by role (regenerate when users change)
    out_dir/passwd           name:$7$... (the sealmq user file without the role column), 0600
    out_dir/data/            persistence

Run it with ``mosquitto -c out_dir/mosquitto.conf``. Generated as root, the files and ``data/``
are handed to ``run_as`` (default ``mosquitto``), the user mosquitto drops to when started as
root; generated as anyone else they stay the generating user's (who then runs mosquitto).
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from broker.passwd import AccountRole, User
from runtime.files import atomic_write
from sealmq.errors import ConfigError, Reason
from sealmq.topics import ROOT, Channel, valid_device_id

DEFAULT_MAX_MESSAGE_SIZE = 256 * 1024
# Enough for a burst of thousands of messages to a slow backend; bounded by bytes, not by count.
DEFAULT_MAX_QUEUED_MESSAGES = 1_000_000
DEFAULT_MAX_QUEUED_BYTES = 1024 * 1024 * 1024
# Fixed header (5) + topic length (2) + our longest topic (sealmq/v1/<64-char id>/media/down) + packet id.
PACKET_OVERHEAD = 128
DEFAULT_RUN_AS = "mosquitto"  # the Debian package's (and the eclipse-mosquitto image's) system user


@dataclass(frozen=True)
class MosquittoOptions:
    host: str = "127.0.0.1"
    port: int = 1883
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_connections: int = 1000
    max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES
    persistence: bool = True
    session_expiry: str = "7d"  # persistent_client_expiration
    run_as: str = DEFAULT_RUN_AS


def _template(name: str) -> str:
    return resources.files("broker").joinpath("mosquitto", name).read_text(encoding="utf-8")


def acl_sections(users: dict[str, User]) -> str:
    out: list[str] = []
    for user in sorted(users.values(), key=lambda u: u.name):
        if user.role is AccountRole.DEVICE:
            if not valid_device_id(user.name):
                continue  # no rights: acl.may_publish refuses such a name on the embedded broker too
            out.append(f"# device: its own .../up out, its own .../down in\nuser {user.name}")
            out.append(f"topic read {ROOT}/{user.name}/+/down")
            out += [f"topic write {ROOT}/{user.name}/{ch.value}/up" for ch in Channel]
            out.append("")
        elif user.role is AccountRole.BACKEND:
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
        "MAX_PACKET_SIZE": str(opts.max_message_size + PACKET_OVERHEAD),
        "SESSION_EXPIRY": opts.session_expiry,
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


def current_user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def _owner_ids(run_as: str, out: Path) -> tuple[int, int] | None:
    """(uid, gid) to hand the files to when generating as root; None when not root."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(run_as)
    except KeyError:
        raise ConfigError(Reason.CONFIG_INVALID, f"user {run_as!r} does not exist (mosquitto would refuse "
                          "to start as root); create it or pass --run-as") from None
    if entry.pw_uid != 0:
        groups = {entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if run_as in g.gr_mem}
        for parent in out.parents:  # mosquitto, once unprivileged, must reach the directory
            if not parent.exists():
                continue  # created below by mkdir, world-searchable under the usual umask
            st = parent.stat()
            if not (st.st_mode & stat.S_IXOTH or (st.st_uid == entry.pw_uid and st.st_mode & stat.S_IXUSR)
                    or (st.st_gid in groups and st.st_mode & stat.S_IXGRP)):
                raise ConfigError(Reason.CONFIG_INVALID, f"{run_as!r} cannot enter {parent}: generate the "
                                  "config elsewhere or pass --run-as")
    return entry.pw_uid, entry.pw_gid


def write_config(out_dir: str | Path, users: dict[str, User], opts: MosquittoOptions | None = None) -> Path:
    """Write the config directory; returns the path of mosquitto.conf."""
    opts = opts or MosquittoOptions()
    out = Path(out_dir).resolve()
    files = render(out, users, opts)
    owner = _owner_ids(opts.run_as, out)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    (out / "data").mkdir(mode=0o700, exist_ok=True)
    for name, text in files.items():
        atomic_write(out / name, text.encode("utf-8"), mode=0o600)
    if owner is not None:
        for path in (out, out / "data", *(out / name for name in files), *(out / "data").iterdir()):
            os.chown(path, *owner)
    return out / "mosquitto.conf"
