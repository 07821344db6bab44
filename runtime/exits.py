"""The exit codes of every ``sealmq`` command, and the one mapping from an error to its code.

A script (or systemd, or Compose) can tell a refused password from a broker that is down:

==== =====================================================================================
code meaning
==== =====================================================================================
0    done
1    ran, but did not finish what was asked (transfers unfinished, no session with the
     backend within ``--session-timeout``, a command not answered within ``--wait``)
2    usage or configuration error (bad option, missing file, unknown device, bad PKI, a broker
     without what was asked of it: MQTT 5 or shared subscriptions for ``--share-group``)
3    the broker could not be reached within ``--connect-timeout``
4    the broker refused the credentials (wrong user name or password, not authorised)
130  interrupted (Ctrl-C); the long-running commands stop cleanly on a signal and exit 0
==== =====================================================================================
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from sealmq.errors import Reason, SealmqError

OK = 0
INCOMPLETE = 1
USAGE = 2
UNREACHABLE = 3
NOT_AUTHORIZED = 4
INTERRUPTED = 130


def code_for(err: SealmqError) -> int:
    """The exit code of a command that failed with ``err``."""
    if err.reason is Reason.NOT_AUTHORIZED:
        return NOT_AUTHORIZED
    if err.reason is Reason.TRANSPORT_FAILED:
        return UNREACHABLE
    return USAGE


def stop_on_signals(stop: threading.Event) -> dict[int, Any]:
    """SIGINT and SIGTERM set ``stop`` from now on, so that a long-running command ends at its next
    check of the event, with its usual cleanup, rather than by a KeyboardInterrupt wherever the main
    thread happens to be. A process started with SIGINT ignored (a background job of a
    non-interactive shell) stops on it too. Main thread only; elsewhere nothing changes. Returns
    the previous handlers, for :func:`restore_signals`."""
    handlers: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, lambda *_: stop.set())
    return handlers


def restore_signals(handlers: dict[int, Any]) -> None:
    """Put back the handlers :func:`stop_on_signals` replaced."""
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
