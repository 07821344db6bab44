#!/usr/bin/env python3
"""Container health checks for the sealmq image (``HEALTHCHECK`` and compose ``healthcheck``).

    sealmq-healthcheck [broker] [--host H] [--port P] [--tls-ca CA]
                                                         an MQTT broker answers a CONNECT with a CONNACK
                                                         (with --tls-ca: over TLS, the broker's
                                                         certificate checked against CA)
    sealmq-healthcheck backend --data DIR                the backend is connected to its broker

Exit 0 when healthy, 1 when not (Docker's convention), with one line saying why.

Why a CONNACK and not just a TCP connect: the kernel completes TCP handshakes from the listen
backlog even when the broker's event loop is stuck, so only an MQTT answer shows it is serving.
The CONNECT carries no credentials (user name ``healthcheck``, no password): the broker refuses
it (code 4 or 5), which is still a proof of life, and no secret is needed inside the check.

Why the audit log for the backend: it records ``connected`` / ``disconnected`` events as they
happen, so its last such event after the last ``started`` is the backend's link state without
opening another MQTT session. Only the log's tail is read, whatever its size.
Standard library only: the check must work even if the sealmq package is broken.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import sys
from pathlib import Path

CONNACK = 0x20
_TAIL_BYTES = 256 * 1024
_LINK_EVENTS = {"started", "connected", "disconnected", "stopped"}


def connect_packet(client_id: str = "", username: str = "healthcheck") -> bytes:
    """An MQTT 3.1.1 CONNECT: clean session, keep-alive 5 s, a user name and no password."""
    def field(text: str) -> bytes:
        raw = text.encode("utf-8")
        return len(raw).to_bytes(2, "big") + raw

    flags = 0x80 | 0x02  # user name, clean session
    body = field("MQTT") + bytes([4, flags]) + (5).to_bytes(2, "big") + field(client_id) + field(username)
    return bytes([0x10, len(body)]) + body


def check_broker(host: str, port: int, timeout: float = 3.0, tls_ca: Path | None = None) -> tuple[bool, str]:
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            sock = raw
            if tls_ca is not None:
                sock = ssl.create_default_context(cafile=str(tls_ca)).wrap_socket(raw, server_hostname=host)
            sock.settimeout(timeout)
            sock.sendall(connect_packet())
            reply = b""
            while len(reply) < 4:
                chunk = sock.recv(4 - len(reply))
                if not chunk:
                    break
                reply += chunk
    except OSError as exc:
        return False, f"broker {host}:{port}: {exc.__class__.__name__}: {exc}"
    if len(reply) == 4 and reply[0] == CONNACK and reply[1] == 2:
        return True, f"broker {host}:{port} answered CONNACK code {reply[3]}"
    return False, f"broker {host}:{port}: no CONNACK (got {reply.hex() or 'nothing'})"


def last_link_event(audit_log: Path) -> str | None:
    """The last of started/connected/disconnected/stopped in the audit log, or None."""
    try:
        with audit_log.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - _TAIL_BYTES))
            tail = f.read()
    except OSError:
        return None
    last = None
    for line in tail.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:  # the first line of a tail may be cut; a line may be half-written
            continue
        if isinstance(entry, dict) and entry.get("event") in _LINK_EVENTS:
            last = entry["event"]
    return last


def check_backend(data_dir: Path) -> tuple[bool, str]:
    audit_log = data_dir / "audit" / "server_log.jsonl"
    event = last_link_event(audit_log)
    if event == "connected":
        return True, "backend connected to its broker"
    return False, f"backend not connected (last link event in {audit_log}: {event or 'none'})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sealmq-healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", choices=["broker", "backend"], default="broker")
    parser.add_argument("--host", default=os.environ.get("SEALMQ_MQTT_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("SEALMQ_MQTT_PORT", "1883")))
    parser.add_argument("--tls-ca", type=Path, default=None, help="connect with TLS, verifying the broker")
    parser.add_argument("--data", type=Path, default=Path("/data"), help="backend data directory")
    args = parser.parse_args(argv)
    if args.what == "backend":
        healthy, why = check_backend(args.data)
    else:
        healthy, why = check_broker(args.host, args.port, tls_ca=args.tls_ca)
    print(why)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
