"""``sealmq backend run --workers N``: N backend processes in one MQTT 5 share group, supervised.

The supervisor starts N copies of the same ``sealmq backend run`` command line, each with
``--workers 1``, its own broker account (``--mqtt-username <name>-wK``, password in
``pki/backend/<name>/workers/<name>-wK.password``; Mosquitto allows one connection per login) and,
for workers 2..N, no console (``--http`` is one port). The share group comes from the same
``--share-group-file`` / ``--share-group`` every worker reads. It forwards SIGTERM and SIGINT to
every worker, restarts a worker that exits without being asked (after 1, 2, 4 ... at most 30 s; the
delay starts again at 1 s once a worker has run for a minute), stops them all on the way out
(SIGTERM, then SIGKILL after ``stop_timeout``) and stops everything when a worker exits with a
configuration error (exit code 2) or a refused login (4), which a restart cannot fix; the
supervisor then exits with that code. Each worker's output lines are prefixed with ``[wK]``.

A worker dies with its supervisor (Linux ``PR_SET_PDEATHSIG``): killing the supervisor, even with
SIGKILL, leaves no worker behind holding its account.

Without ``--workers`` (or with 1) ``backend run`` is exactly the single process it always was.
docs/scaling.md says what the broker does with a dead worker's messages (measured).
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pki import layout
from runtime import exits
from runtime.config import share_group
from sealmq.errors import ConfigError, Reason

log = logging.getLogger("sealmq.workers")

SHARE_GROUP_FILE = "share-group"  # in the backend's identity directory, 0600
WORKERS_DIR = "workers"  # <identity>/workers/<name>-wK.password
# exit codes a restart cannot fix: stop everything and exit with it
FATAL_EXITS = frozenset({exits.USAGE, exits.NOT_AUTHORIZED})


def account(backend_name: str, index: int) -> str:
    """Worker ``index``'s broker account (1-based): ``backend-w1`` for the backend ``backend``."""
    return f"{backend_name}-w{index}"


def share_group_file(pki: Path, backend_name: str) -> Path:
    return layout.backend_dir(pki, backend_name) / SHARE_GROUP_FILE


def password_file(pki: Path, backend_name: str, index: int) -> Path:
    return layout.backend_dir(pki, backend_name) / WORKERS_DIR / f"{account(backend_name, index)}.password"


def new_share_group() -> str:
    """A fresh share group name: 128 random bits (a device that knows it could join the group)."""
    return secrets.token_hex(16)


# -- the supervisor ---------------------------------------------------------------------------------

@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0  # consecutive short-lived runs: the restart delay doubles with each
    restart_at: float | None = None
    pump: threading.Thread | None = None


@dataclass
class Supervisor:
    """Keeps ``n`` processes of ``command(index)`` running until :meth:`stop`; see the module docstring."""

    n: int
    command: Callable[[int], Sequence[str]]
    env: dict[str, str] | None = None
    min_delay: float = 1.0
    max_delay: float = 30.0
    stable_after: float = 60.0  # a run this long resets the restart delay
    stop_timeout: float = 30.0  # SIGTERM, then SIGKILL after this (a worker commits its batch first)
    out: IO[str] = field(default_factory=lambda: sys.stdout)
    on_event: Callable[[str, int, int], None] | None = None  # ("started" | "exited", index, pid or code)

    def __post_init__(self) -> None:
        self._workers = [_Worker(i) for i in range(1, self.n + 1)]
        self._stop = threading.Event()
        self._out_lock = threading.Lock()
        self.fatal: int | None = None

    # -- control ---------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def pids(self) -> dict[int, int]:
        return {w.index: w.proc.pid for w in self._workers if w.proc is not None and w.proc.poll() is None}

    def run(self) -> int:
        """Supervise until :meth:`stop` or a fatal exit; returns the exit code for the command."""
        for w in self._workers:
            self._start(w)
        try:
            while not self._stop.wait(0.2):
                self._check()
        finally:
            self._stop_all()
        return self.fatal if self.fatal is not None else exits.OK

    # -- internals -------------------------------------------------------------------------------
    def _start(self, w: _Worker) -> None:
        argv = list(self.command(w.index))
        # preexec_fn runs one prepared system call (prctl) between fork and exec: no lock, no import
        arm = _die_with_parent(os.getpid())
        w.proc = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, preexec_fn=arm)  # noqa: PLW1509
        w.started = time.monotonic()
        w.restart_at = None
        w.pump = threading.Thread(target=self._pump, args=(w.index, w.proc.stdout), daemon=True,
                                  name=f"worker-{w.index}-output")
        w.pump.start()
        log.info("worker %d started (pid %d)", w.index, w.proc.pid)
        self._event("started", w.index, w.proc.pid)

    def _pump(self, index: int, stream: IO[bytes] | None) -> None:
        if stream is None:
            return
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._out_lock:
                print(f"[w{index}] {line}", file=self.out, flush=True)

    def _check(self) -> None:
        now = time.monotonic()
        for w in self._workers:
            if w.proc is None:
                if w.restart_at is not None and now >= w.restart_at and not self._stop.is_set():
                    self._start(w)
                continue
            code = w.proc.poll()
            if code is None:
                continue
            if w.pump is not None:
                w.pump.join(2)
            ran = now - w.started
            w.proc = None
            self._event("exited", w.index, code)
            if code in FATAL_EXITS:
                log.error("worker %d exited with code %d (configuration or login refused): stopping all",
                          w.index, code)
                self.fatal = code
                self._stop.set()
                return
            w.failures = 0 if ran >= self.stable_after else w.failures + 1
            delay = min(self.max_delay, self.min_delay * 2 ** max(0, w.failures - 1))
            w.restart_at = now + delay
            log.warning("worker %d exited (%s) after %.0f s; restarting in %.0f s", w.index, _describe(code), ran,
                        delay)

    def _stop_all(self) -> None:
        live = [w for w in self._workers if w.proc is not None and w.proc.poll() is None]
        for w in live:
            assert w.proc is not None
            w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for w in live:
            assert w.proc is not None
            try:
                w.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %d did not stop within %.0f s: killed", w.index, self.stop_timeout)
                w.proc.kill()
                w.proc.wait(5)
            if w.pump is not None:
                w.pump.join(2)
            self._event("exited", w.index, w.proc.returncode)
        log.info("all %d workers stopped", self.n)

    def _event(self, what: str, index: int, value: int) -> None:
        if self.on_event is not None:
            self.on_event(what, index, value)


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


_PR_SET_PDEATHSIG = 1


def _libc_prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: a worker outlives a killed supervisor
        return None


_PRCTL = _libc_prctl()  # resolved here: between fork and exec the child only makes the system call


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """For ``preexec_fn``: the child gets SIGTERM when the supervisor dies (Linux), or exits at once if
    the supervisor is already gone."""
    prctl = _PRCTL
    if prctl is None:
        return None

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)
    return arm


# -- `sealmq backend run --workers N` -----------------------------------------------------------------

def register(parser: argparse.ArgumentParser) -> None:
    """Add ``--workers`` to ``sealmq backend run``; with N >= 2 its command runs the supervisor."""
    run = _subparser(parser, ("backend", "run"))
    run.add_argument("--workers", type=int, default=None, metavar="N",
                     help="run N backend processes in the share group of --share-group-file, each with its own "
                          "broker account <name>-wK (sealmq bootstrap --workers N makes them), restarted when they "
                          "die; Mosquitto 2 only (docs/scaling.md). Default: one process, as always")
    single = run.get_default("func")

    def run_workers(args: argparse.Namespace) -> int:
        if args.workers is None or args.workers == 1:
            return int(single(args) or 0)
        return supervise(args)

    run.set_defaults(func=run_workers)


def _subparser(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> argparse.ArgumentParser:
    for word in words:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[word]
    return parser


def _without(argv: Sequence[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def worker_argv(argv: Sequence[str], args: argparse.Namespace, index: int) -> list[str]:
    """The command line of worker ``index``: the supervisor's own, one process, its own account."""
    cmd = [sys.executable, "-m", "app.cli", *_without(argv, "--workers"), "--workers", "1",
           "--mqtt-username", account(args.name, index),
           "--mqtt-password-file", str(password_file(args.pki, args.name, index))]
    if index > 1:
        cmd.append("--http=")  # one console (and /metrics), on worker 1
        cmd.append("--secondary")  # worker 1 alone serves media, queued commands and update pushes
    return cmd


def supervise(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    n = args.workers
    if n < 1:
        raise ConfigError(Reason.CONFIG_INVALID, "--workers: at least 1")
    if share_group(args) is None:
        raise ConfigError(Reason.CONFIG_INVALID, f"{n} workers without a share group would each receive every "
                          "message: give --share-group-file (sealmq bootstrap --workers N writes one)")
    if args.mqtt_password_file is not None:
        raise ConfigError(Reason.CONFIG_INVALID, "--workers N gives each worker its own account and password file "
                          f"({password_file(args.pki, args.name, 1)} ...): drop --mqtt-password-file "
                          "(and SEALMQ_MQTT_PASSWORD_FILE)")
    missing = [str(p) for p in (password_file(args.pki, args.name, k) for k in range(1, n + 1)) if not p.exists()]
    if missing:
        raise ConfigError(Reason.CONFIG_INVALID, f"no password for worker account(s): {', '.join(missing)} "
                          f"(sealmq bootstrap --workers {n} makes them)")
    if getattr(args, "state", None) in (None, "memory"):
        log.warning("the workers keep their sessions in memory, each its own (no --state redis://...): a device "
                    "whose handshake messages reach two workers must retry (docs/scaling.md)")
    argv = getattr(args, "argv", None)
    if argv is None:
        raise ConfigError(Reason.CONFIG_INVALID, "--workers needs the command line (run it as `sealmq backend run`)")
    env = dict(os.environ)
    if env.pop("SEALMQ_MQTT_PASSWORD", None) is not None:
        log.warning("SEALMQ_MQTT_PASSWORD is not passed on: each worker logs in with its own password file")
    sup = Supervisor(n, lambda k: worker_argv(argv, args, k), env=env)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sup.stop())
    print(f"supervising {n} backend workers ({', '.join(account(args.name, k) for k in range(1, n + 1))}); "
          "Ctrl-C to stop", flush=True)
    return sup.run()
