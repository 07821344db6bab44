"""Generate a runnable Mosquitto 2.x configuration directory from the sealmq user file.

``write_config(out_dir, users)`` writes::

    out_dir/mosquitto.conf   from broker/mosquitto/mosquitto.conf (loopback, limits, queues)
    out_dir/acl              one section per user, by role (regenerate when users change)
    out_dir/passwd           name:$7$... (the sealmq user file without the role column), 0600
    out_dir/openssl.cnf      OpenSSL settings mosquitto.conf cannot express (no TLS session tickets)
    out_dir/data/            persistence
    out_dir/tls/             with TLS: copies of the CA, the CRL, the broker's chain and key (0600)

Run it with ``OPENSSL_CONF=out_dir/openssl.cnf mosquitto -c out_dir/mosquitto.conf``
(``run_command``; ``mosquitto_env`` for a launcher). Generated as root, the files and ``data/``
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
from broker.tls import DEFAULT_TLS_PORT, TlsFiles
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
    plain: bool = True  # the plain-TCP listener on host:port (passwords)
    tls: TlsFiles | None = None  # a TLS listener on host:tls_port, client certificates required
    tls_port: int = DEFAULT_TLS_PORT
    # a second TLS listener taking passwords (monitors, clients without a certificate); None: none
    tls_password_port: int | None = None


TLS_DIR = "tls"
OPENSSL_CNF = "openssl.cnf"  # read by mosquitto's OpenSSL when OPENSSL_CONF names it (mosquitto_env)
_TLS_COPIES = {"cafile": "ca.crt", "certfile": "broker-chain.pem", "keyfile": "broker-key.pem",
               "crlfile": "crl.pem"}

_COMMON = """protocol mqtt
max_connections {max_connections}
# The client id is the user name, whatever the client sends: nobody can take over another user's
# session (mosquitto would otherwise disconnect the holder of the id, e.g. the backend), and each
# user holds at most one connection and one persistent session. mosquitto cannot check a per-user
# prefix, so backend workers need one account each (docs/broker.md).
use_username_as_clientid true
"""

_TLS = """cafile {dir}/tls/ca.crt
certfile {dir}/tls/broker-chain.pem
keyfile {dir}/tls/broker-key.pem
# the minimum: TLS 1.2 and 1.3 are accepted, older versions refused
tls_version tlsv1.2
"""


def listeners(out_dir: Path, opts: MosquittoOptions) -> str:
    """The listener sections (with per_listener_settings false, users and ACL are shared)."""
    common = _COMMON.format(max_connections=opts.max_connections)
    out: list[str] = []
    if opts.plain:
        out.append(f"# Plain TCP, passwords: loopback unless deliberately told otherwise.\n"
                   f"listener {opts.port} {opts.host}\n{common}")
    if opts.tls is not None:
        tls = _TLS.format(dir=out_dir)
        crl = f"crlfile {out_dir}/tls/crl.pem\n" if opts.tls.crlfile is not None else ""
        out.append(
            f"# mqtts: a client certificate from the operator's CA is the login; its CN (= the device\n"
            f"# id or backend name) is the user name the ACL applies to. Revoked certificates are refused\n"
            f"# (crlfile, read at start: regenerate and restart after a revocation).\n"
            f"listener {opts.tls_port} {opts.host}\n{common}{tls}{crl}"
            f"require_certificate true\nuse_identity_as_username true\n")
        if opts.tls_password_port is not None:
            out.append(f"# mqtts with passwords (monitors): server certificate only.\n"
                       f"listener {opts.tls_password_port} {opts.host}\n{common}{tls}")
    if not out:
        raise ConfigError(Reason.CONFIG_INVALID, "no listener: enable the plain or the TLS listener")
    return "\n".join(out)


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
        "LISTENERS": listeners(out_dir, opts),
    }
    files = {"mosquitto.conf": _template("mosquitto.conf"), "acl": _template("acl"),
             OPENSSL_CNF: _template(OPENSSL_CNF)}
    for name, text in files.items():
        for key, value in values.items():
            text = text.replace("{{" + key + "}}", value)
        files[name] = text
    files["passwd"] = "".join(f"{u.name}:{u.pw_hash}\n" for u in sorted(users.values(), key=lambda u: u.name))
    return files


def mosquitto_env(conf_dir: str | Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment to start mosquitto on a generated ``conf_dir`` with: ``base`` (default: this
    process's environment) with OPENSSL_CONF naming the directory's ``openssl.cnf``. mosquitto.conf
    has no TLS session ticket setting; OpenSSL reads this file when mosquitto initialises it."""
    env = dict(os.environ if base is None else base)
    env["OPENSSL_CONF"] = str(Path(conf_dir).resolve() / OPENSSL_CNF)
    return env


def run_command(conf: str | Path) -> str:
    """The shell command that starts mosquitto on the generated ``conf`` (its mosquitto.conf)."""
    path = Path(conf).resolve()
    return f"OPENSSL_CONF={path.parent / OPENSSL_CNF} mosquitto -c {path}"


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
    copies: list[Path] = []
    if opts.tls is not None:
        # copies mosquitto (once unprivileged) can read; the PKI's own directories stay private
        opts.tls.check()
        (out / TLS_DIR).mkdir(mode=0o700, exist_ok=True)
        for attr, name in _TLS_COPIES.items():
            src = getattr(opts.tls, attr)
            if src is not None:
                atomic_write(out / TLS_DIR / name, Path(src).read_bytes(), mode=0o600)
                copies.append(out / TLS_DIR / name)
        copies.append(out / TLS_DIR)
    if owner is not None:
        for path in (out, out / "data", *(out / name for name in files), *(out / "data").iterdir(), *copies):
            os.chown(path, *owner)
    return out / "mosquitto.conf"
