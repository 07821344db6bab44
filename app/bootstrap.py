"""Bootstrap a deployment directory: CA, backend and device identities, broker users.

Idempotent: what exists is kept, what is missing is created. Used by ``sealmq demo``,
``sealmq bootstrap`` (the Docker ``pki`` service) and the end-to-end tests. Each identity's
broker password is written next to its key as ``mqtt.password`` (0600): like the private key, it
belongs to its owner and is never printed. The broker's user file only holds salted hashes.

Layout under ``DIR``::

    pki/                     the PKI (docs/pki.md); devices/<id>/mqtt.password, backend/<name>/mqtt.password
    pki/broker/broker/       the broker's TLS key and server certificate (localhost, 127.0.0.1 + --broker-host)
    broker/users             broker user file (name:role:hash), 0600
    broker/monitor.password  password of the read-only "monitor" user (inspect, mosquitto_sub)
    broker/console-monitor.password  the console's own read-only monitor user (its broker view); its own
                             login because Mosquitto allows one connection per user (console: issue 13)
    backend/                 the backend's data (SQLite, audit log, media)
    backend/console.auth     salted hash of the operator console's password (the backend keeps only this)
    console.password         the operator console's password, 0600 (console: issue 13)
    sealmq.toml              these paths, for SEALMQ_CONFIG (app/config.py)
    devices/<id>/            each device's state (audit log, media outbox)

With ``workers=N`` (``sealmq bootstrap --workers N``, docs/scaling.md) also::

    pki/backend/<name>/share-group                    the deployment's MQTT share group name: 128 random
                                                      bits, 0600 (a device that knew it could join the group)
    pki/backend/<name>/workers/<name>-wK.password     broker accounts <name>-w1..<name>-wN, role backend
                                                      (Mosquitto: one connection per login)
    sealmq.toml                                       + share_group_file, workers
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from app import config
from app import workers as scale
from backend.console.auth import CONSOLE_MONITOR, make_hash  # console (issue 13)
from broker.passwd import DEFAULT_ITERATIONS, AccountRole, add_user, generate_password, load_users
from pki import layout, store
from runtime.files import atomic_write, private_dir
from sealmq.errors import ConfigError, Reason


@dataclass(frozen=True)
class Deployment:
    root: Path

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def users(self) -> Path:
        return self.root / "broker" / "users"

    @property
    def monitor_password_file(self) -> Path:
        return self.root / "broker" / "monitor.password"

    @property
    def backend_data(self) -> Path:
        return self.root / "backend"

    @property
    def console_password_file(self) -> Path:  # console (issue 13)
        return self.root / "console.password"

    @property
    def console_auth(self) -> Path:  # console (issue 13)
        return self.backend_data / "console.auth"

    def device_state(self, device_id: str) -> Path:
        return self.root / "devices" / device_id

    def password_file(self, role: str, name: str) -> Path:
        if role == "monitor":  # broker/<name>.password: "monitor", and the console's CONSOLE_MONITOR
            return self.monitor_password_file.with_name(f"{name}.password")
        d = layout.device_dir(self.pki, name) if role == "device" else layout.backend_dir(self.pki, name)
        return d / "mqtt.password"

    def password(self, role: str, name: str) -> str:
        return self.password_file(role, name).read_text(encoding="utf-8").strip()

    def devices(self) -> list[str]:
        return layout.enrolled_devices(self.pki)


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (text + "\n").encode("utf-8"), mode=0o600)


def _ensure_user(dep: Deployment, role: AccountRole, name: str, iterations: int, existing: set[str]) -> bool:
    pw_file = dep.password_file(role.value, name)
    if name in existing and pw_file.exists():
        return False
    password = generate_password()
    _write_secret(pw_file, password)
    add_user(dep.users, name, password, role, iterations=iterations)
    existing.add(name)
    return True


# Key types that sign the same suites: a backend needs one of each group its devices use.
_SAME_SUITES = {"rsa2048": "rsa", "rsa3072": "rsa"}


def backend_key_types_for(device_key_type: str) -> tuple[str, ...]:
    """The backend's key types by default: P-256 (suite 2, and the CCS suites), plus the device
    key type when it signs other suites (Ed25519: suite 0; RSA: -24), so the devices can run."""
    if _SAME_SUITES.get(device_key_type, device_key_type) == "p256":
        return ("p256",)
    return ("p256", device_key_type)


DEFAULT_BROKER_HOSTS = ("localhost", "127.0.0.1")


def bootstrap(
    root: Path,
    device_ids: list[str],
    *,
    key_type: str = "p256",
    iterations: int = DEFAULT_ITERATIONS,
    backend_name: str = "backend",
    backend_key_types: Sequence[str] | None = None,
    broker_hosts: list[str] | None = None,
    workers: int = 0,
) -> tuple[Deployment, list[str]]:
    """Create whatever is missing; returns the deployment and a list of what was created.

    ``backend_key_types``: the first is the backend's main certificate, each further one an extra
    certificate (``backend/<name>/extra/<type>``); default :func:`backend_key_types_for` the
    devices' ``key_type``. One per group of suites: rsa2048 and rsa3072 both sign suite -24.

    ``workers``: N > 0 makes the share group and the worker accounts ``<backend_name>-w1..wN`` (see
    the module docstring); accounts of an earlier, larger N are kept.
    """
    if workers < 0:
        raise ConfigError(Reason.CONFIG_INVALID, "workers: 0 or more")
    kinds = backend_key_types or backend_key_types_for(key_type)
    groups = [_SAME_SUITES.get(k, k) for k in kinds]
    if not kinds or len(set(groups)) != len(groups):
        raise ConfigError(Reason.CONFIG_INVALID, "backend key types: at least one, one per suite group")
    dep = Deployment(root)
    created: list[str] = []
    if not layout.anchor(dep.pki).exists():
        store.init_ca(dep.pki)
        created.append("CA")
    backend = layout.backend_dir(dep.pki, backend_name)
    if not (backend / layout.CERT).exists():
        store.enroll(dep.pki, "backend", backend_name, kinds[0], force=backend.exists())
        created.append(f"backend identity {backend_name}")
    for extra in kinds[1:]:
        if not (layout.extra_dir(backend, extra) / layout.CERT).exists():
            store.enroll(dep.pki, "backend", backend_name, extra, extra=True)
            created.append(f"backend identity {backend_name} ({extra})")
    for device_id in device_ids:
        if not (layout.device_dir(dep.pki, device_id) / "cert.pem").exists():
            store.enroll(dep.pki, "device", device_id, key_type=key_type)
            created.append(f"device identity {device_id}")
    if not (layout.broker_dir(dep.pki) / layout.CERT).exists():
        hosts = list(dict.fromkeys([*DEFAULT_BROKER_HOSTS, *(broker_hosts or [])]))
        store.enroll_broker(dep.pki, layout.DEFAULT_BROKER, hosts)
        created.append(f"broker TLS certificate for {', '.join(hosts)}")
    dep.users.parent.mkdir(parents=True, exist_ok=True)
    existing = set(load_users(dep.users)) if dep.users.exists() else set()
    if _ensure_user(dep, AccountRole.BACKEND, backend_name, iterations, existing):
        created.append(f"broker user {backend_name}")
    if _ensure_user(dep, AccountRole.MONITOR, "monitor", iterations, existing):
        created.append("broker user monitor")
    if _ensure_user(dep, AccountRole.MONITOR, CONSOLE_MONITOR, iterations, existing):  # console (issue 13)
        created.append(f"broker user {CONSOLE_MONITOR}")
    for device_id in device_ids:
        if _ensure_user(dep, AccountRole.DEVICE, device_id, iterations, existing):
            created.append(f"broker user {device_id}")
    private_dir(dep.backend_data)
    if _ensure_console_password(dep):  # console (issue 13)
        created.append("console password")
    if config.write(dep.root) is not None:
        created.append(config.FILE_NAME)
    if workers:
        created += _ensure_workers(dep, backend_name, workers, iterations, existing)
    return dep, created


def _ensure_workers(dep: Deployment, backend_name: str, n: int, iterations: int, existing: set[str]) -> list[str]:
    """The share group (kept once made: every worker must read the same) and N worker accounts."""
    created = []
    group_file = scale.share_group_file(dep.pki, backend_name)
    if not group_file.exists():
        _write_secret(group_file, scale.new_share_group())
        created.append("share group (128 random bits)")
    for k in range(1, n + 1):
        name = scale.account(backend_name, k)
        pw_file = scale.password_file(dep.pki, backend_name, k)
        if name in existing and pw_file.exists():
            continue
        password = generate_password()
        private_dir(pw_file.parent)
        _write_secret(pw_file, password)
        add_user(dep.users, name, password, AccountRole.BACKEND, iterations=iterations)
        existing.add(name)
        created.append(f"broker user {name}")
    written = config.set_scale(dep.root, group_file.relative_to(dep.root).as_posix(), n)
    if written:
        created.append(f"{config.FILE_NAME}: {', '.join(written)}")
    return created


def _ensure_console_password(dep: Deployment) -> bool:
    """The operator's console password (0600) and, for the backend, only its salted hash."""
    if dep.console_password_file.exists() and dep.console_auth.exists():
        return False
    password = generate_password()
    _write_secret(dep.console_password_file, password)
    _write_secret(dep.console_auth, make_hash(password))
    return True
