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
