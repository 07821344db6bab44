"""``sealmq.toml``: a deployment's paths, so that commands after ``sealmq bootstrap`` need no path flags.

``sealmq bootstrap --dir DIR`` writes ``DIR/sealmq.toml``. With ``SEALMQ_CONFIG=DIR/sealmq.toml`` in
the environment, every command takes its paths from it: ``--pki``, the backend's ``--data``, the
devices' ``--state`` (``<devices>/<id>`` for ``device run`` and ``device send``), the broker's user
file and the monitor's password file for ``inspect``. A flag given on the command line always wins;
paths in the file are relative to the file's folder. Only paths live here (and one count, ``workers``):
secrets stay in their own 0600 files, next to their keys.

``sealmq bootstrap --workers N`` adds two keys (to an existing file too): ``share_group_file`` (the
0600 file holding the deployment's secret MQTT share group name, ``--share-group-file`` of
``backend run``) and ``workers`` (``--workers`` of ``backend run``). See docs/scaling.md.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from runtime.files import atomic_write
from sealmq.errors import ConfigError, Reason

ENV = "SEALMQ_CONFIG"
FILE_NAME = "sealmq.toml"
_KEYS = ("pki", "data", "devices", "users", "monitor_password_file", "share_group_file", "workers")
_INT_KEYS = ("workers",)

TEMPLATE = """\
# Written by `sealmq bootstrap`. Use it with: export {env}={path}
# Then commands take their paths from here; a flag on the command line wins. Paths are relative
# to this file's folder. No secrets here: passwords stay in their own 0600 files.
[deployment]
pki = "pki"                                       # --pki
data = "backend"                                  # --data of the backend commands
devices = "devices"                               # --state of simulate; <devices>/<id> for device run/send
users = "broker/users"                            # --passwd of broker run / mosquitto-config, --file of passwd
monitor_password_file = "broker/monitor.password" # inspect: --username monitor --password-file ...
"""

# appended by `sealmq bootstrap --workers N` (docs/scaling.md)
SCALE_LINES = {
    "share_group_file": 'share_group_file = "{path}"  # --share-group-file of backend run (a secret: 0600 file)\n',
    "workers": "workers = {n}  # --workers of backend run: N processes in that share group\n",
}


@dataclass(frozen=True)
class DeploymentPaths:
    source: Path
    pki: Path | None = None
    data: Path | None = None
    devices: Path | None = None
    users: Path | None = None
    monitor_password_file: Path | None = None
    share_group_file: Path | None = None
    workers: int | None = None


def load(path: Path) -> DeploymentPaths:
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(Reason.CONFIG_INVALID, f"cannot read {path} (from ${ENV}): {exc}") from None
    section = doc.get("deployment")
    if not isinstance(section, dict) or set(doc) - {"deployment"}:
        raise ConfigError(Reason.CONFIG_INVALID, f"{path}: expected one [deployment] table")
    unknown = set(section) - set(_KEYS)
    if unknown:
        raise ConfigError(Reason.CONFIG_INVALID, f"{path}: unknown keys {sorted(unknown)}")
    values: dict[str, Path | int] = {}
    for key, value in section.items():
        if key in _INT_KEYS:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(Reason.CONFIG_INVALID, f"{path}: {key} must be a whole number >= 1")
            values[key] = value
            continue
        if not isinstance(value, str) or not value:
            raise ConfigError(Reason.CONFIG_INVALID, f"{path}: {key} must be a non-empty string")
        values[key] = path.parent / value
    return DeploymentPaths(source=path, **values)  # type: ignore[arg-type]


def write(root: Path) -> Path | None:
    """Write ``root/sealmq.toml`` unless it exists (an operator may have edited it); returns it if written."""
    path = root / FILE_NAME
    if path.exists():
        return None
    atomic_write(path, TEMPLATE.format(env=ENV, path=path.resolve()).encode("utf-8"), mode=0o644)
    return path


def set_scale(root: Path, share_group_file: str, workers: int) -> list[str]:
    """Add the scale-out keys to ``root/sealmq.toml`` (appended when missing; ``workers`` updated when it
    differs); returns the keys written. The file keeps one ``[deployment]`` table, so appended lines
    land in it; everything else in the file is left as the operator wrote it."""
    path = root / FILE_NAME
    text = path.read_text(encoding="utf-8")
    current = load(path)
    written: list[str] = []
    if current.share_group_file is None:
        text = text.rstrip("\n") + "\n" + SCALE_LINES["share_group_file"].format(path=share_group_file)
        written.append("share_group_file")
    if current.workers is None:
        text = text.rstrip("\n") + "\n" + SCALE_LINES["workers"].format(n=workers)
        written.append("workers")
    elif current.workers != workers:
        text = re.sub(r"^workers\s*=\s*\d+", f"workers = {workers}", text, count=1, flags=re.MULTILINE)
        written.append("workers")
    if written:
        atomic_write(path, text.encode("utf-8"), mode=0o644)
        load(path)  # still one valid table
    return written


def _parsers(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> Iterator[
        tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield words, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*words, name))


def _default(parser: argparse.ArgumentParser, dest: str, value: object) -> None:
    for action in parser._actions:
        if action.dest == dest and action.option_strings:
            action.default = value
            action.required = False  # given by the file: the flag becomes optional
            if "%(default)s" not in (action.help or ""):
                action.help = f"{action.help or ''} (default from ${ENV}: %(default)s)".strip()


def apply(parser: argparse.ArgumentParser, paths: DeploymentPaths) -> None:
    """Make the file's paths the defaults of the matching options of every command."""
    for words, sub in _parsers(parser):
        dests = {a.dest for a in sub._actions if a.option_strings}
        if paths.pki is not None and "pki" in dests:
            _default(sub, "pki", paths.pki)
        if words[:1] == ("backend",) and paths.data is not None and "data" in dests:
            _default(sub, "data", paths.data)
        if words == ("backend", "run") and paths.share_group_file is not None:
            _default(sub, "share_group_file", paths.share_group_file)
        if words == ("backend", "run") and paths.workers is not None:
            _default(sub, "workers", paths.workers)
        if words == ("device", "simulate") and paths.devices is not None:
            _default(sub, "state", paths.devices)
        if words in (("broker", "run"), ("broker", "mosquitto-config")) and paths.users is not None:
            _default(sub, "passwd", paths.users)
        if words == ("broker", "passwd") and paths.users is not None:
            _default(sub, "file", paths.users)
        if words == ("inspect",) and paths.monitor_password_file is not None:
            _default(sub, "username", "monitor")
            _default(sub, "password_file", paths.monitor_password_file)


def complete(args: argparse.Namespace, paths: DeploymentPaths) -> None:
    """What a default cannot say: a device's own state folder under the devices root."""
    if (getattr(args, "command", None) == "device" and getattr(args, "device_command", None) in ("run", "send")
            and args.state is None and paths.devices is not None):
        args.state = paths.devices / args.id
