"""Test helper that runs a real Redis (Debian's ``redis-server``) as a child process.

:class:`RedisProcess` starts ``redis-server`` on a free 127.0.0.1 port with a random password, no
persistence and its working directory in a temporary folder, waits until it answers, and stops it.
Tests are skipped when redis-server or redis-py is not installed (``bash scripts/setup --test``).
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.brokers import free_port

HOST = "127.0.0.1"
REDIS_SERVER = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
)
try:
    import redis  # noqa: F401

    HAVE_REDIS_PY = True
except ImportError:  # pragma: no cover - the test extra installs it
    HAVE_REDIS_PY = False

needs_redis = pytest.mark.skipif(REDIS_SERVER is None or not HAVE_REDIS_PY,
                                 reason="redis-server (Debian redis-server) or redis-py not installed")


class RedisProcess:
    def __init__(self) -> None:
        assert REDIS_SERVER is not None
        self.password = secrets.token_urlsafe(18)
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sealmq-redis-"))
        conf = self.dir / "redis.conf"  # the password in a file, not on the command line
        conf.write_text(f"bind {HOST}\nport {self.port}\nrequirepass {self.password}\nsave \"\"\n"
                        f"appendonly no\ndir {self.dir}\nprotected-mode yes\n")
        conf.chmod(0o600)
        self.log = self.dir / "redis.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([REDIS_SERVER, str(conf)], stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready()

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@{HOST}:{self.port}/0"

    def _wait_ready(self, timeout: float = 20.0) -> None:
        import redis

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log.read_text(errors='replace')[-2000:]}")
            try:
                with redis.Redis.from_url(self.url, socket_connect_timeout=1) as r:
                    r.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def flush(self) -> None:
        import redis

        with redis.Redis.from_url(self.url) as r:
            r.flushall()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def redis_server() -> Iterator[RedisProcess]:
    server = RedisProcess()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_proc() -> Iterator[RedisProcess]:
    """One Redis for the test session; tests that use it start from an empty one (``flush()``)."""
    if REDIS_SERVER is None or not HAVE_REDIS_PY:
        pytest.skip("redis-server (Debian redis-server) or redis-py not installed")
    with redis_server() as server:
        yield server
