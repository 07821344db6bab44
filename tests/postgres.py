"""Test helper that runs a real PostgreSQL server as a child process (Debian's ``postgresql`` package).

:class:`PostgresProcess` makes a throwaway cluster with ``initdb`` in a temporary directory (password
authentication, SCRAM), runs ``postgres`` on a free 127.0.0.1 port with its unix socket in that
directory, and stops it with a fast shutdown. PostgreSQL refuses to run as root: when the tests run as
root, the cluster belongs to the ``postgres`` system user that the Debian package creates and the
server runs as that user. ``new_database()`` gives each test a fresh database and its URL.

Tests are skipped when PostgreSQL or psycopg is not installed (``bash scripts/setup --test`` installs both).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.brokers import free_port

HOST = "127.0.0.1"


def _bindir() -> Path | None:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "postgres").exists() and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    found = shutil.which("postgres")
    return Path(found).parent if found and shutil.which("initdb") else None


BINDIR = _bindir()
try:
    import psycopg  # noqa: F401

    HAVE_PSYCOPG = True
except ImportError:  # pragma: no cover - the test extra installs it
    HAVE_PSYCOPG = False

needs_postgres = pytest.mark.skipif(BINDIR is None or not HAVE_PSYCOPG,
                                    reason="PostgreSQL (Debian postgresql) or psycopg not installed")


class PostgresProcess:
    """A PostgreSQL cluster in a temporary directory, served on 127.0.0.1 only."""

    def __init__(self) -> None:
        assert BINDIR is not None
        self.user = "sealmq_test"
        self.password = secrets.token_urlsafe(18)
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sealmq-pg-"))
        self._run_as: dict[str, Any] = {}
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")  # made by the Debian package
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
            self._run_as = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
        pwfile = self.dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._run_as:
            os.chown(pwfile, self._run_as["user"], self._run_as["group"])
        pwfile.chmod(0o600)
        self.data = self.dir / "data"
        subprocess.run(
            [str(BINDIR / "initdb"), "-D", str(self.data), "-U", self.user, "--auth=scram-sha-256",
             f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync"],
            check=True, capture_output=True, cwd=self.dir, **self._run_as,
        )
        pwfile.unlink()
        self.log = self.dir / "postgres.log"
        # fsync off: a test cluster, thrown away afterwards (durability is PostgreSQL's, not under test)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [str(BINDIR / "postgres"), "-D", str(self.data), "-h", HOST, "-p", str(self.port),
                 "-k", str(self.dir), "-c", "fsync=off", "-c", "max_connections=50"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.dir, **self._run_as,
            )
        self._wait_ready()
        self._databases = 0

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}:{self.password}@{HOST}:{self.port}/{database}"

    def _wait_ready(self, timeout: float = 30.0) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log.read_text(errors='replace')[-2000:]}")
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        self._databases += 1
        name = f"t{self._databases}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresProcess]:
    server = PostgresProcess()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresProcess]:
    """One PostgreSQL server for the test session; use ``postgres.new_database()`` per test."""
    if BINDIR is None or not HAVE_PSYCOPG:
        pytest.skip("PostgreSQL (Debian postgresql) or psycopg not installed")
    with postgres_server() as server:
        yield server
