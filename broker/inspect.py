"""``sealmq inspect``: watch ``sealmq/#`` as the broker sees it (topics, headers, sizes, ciphertext).

Connects as a read-only monitor user, subscribes to ``sealmq/#`` and prints one line per message
via :func:`broker.inspect_format.describe`. Useful to show what an operator of the broker can
and cannot learn: there is no plaintext to show.
"""

from __future__ import annotations

import queue
import ssl
import sys
from pathlib import Path
from typing import TextIO

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from broker.inspect_format import describe
from sealmq.errors import ConfigError, Reason, TransportError

INSPECT_FILTER = "sealmq/#"


def run_inspect(
    host: str,
    port: int,
    username: str | None = None,
    password: str | None = None,
    *,
    count: int | None = None,
    timeout: float | None = None,
    out: TextIO = sys.stdout,
    tls_ca: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> int:
    """Print messages until ``count`` were seen, ``timeout`` seconds pass quietly, or Ctrl-C."""
    msgs: queue.Queue[tuple[str, bytes] | Exception] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    if username is not None:
        client.username_pw_set(username, password)
    if tls_ca is not None:  # mqtts: the broker checked against the CA; a password or a certificate logs in
        try:
            context = ssl.create_default_context(cafile=str(tls_ca))
            if tls_cert is not None:
                context.load_cert_chain(str(tls_cert), str(tls_key) if tls_key else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(Reason.CONFIG_INVALID, f"cannot load the TLS files: {exc}") from None
        client.tls_set_context(context)

    def on_connect(c: mqtt.Client, u: object, flags: object, rc: ReasonCode, props: object) -> None:
        if rc.is_failure:
            refused = f"the broker at {host}:{port} refused user {username!r}: {rc}"
            msgs.put(TransportError(Reason.NOT_AUTHORIZED, refused))
        else:
            c.subscribe(INSPECT_FILTER, qos=1)

    def on_subscribe(c: mqtt.Client, u: object, mid: int, rcs: list[ReasonCode], props: object) -> None:
        if any(rc.is_failure for rc in rcs):
            msgs.put(TransportError(Reason.NOT_AUTHORIZED, f"subscription to {INSPECT_FILTER} refused"))
        else:
            print(f"# subscribed to {INSPECT_FILTER} on {host}:{port}", file=out, flush=True)

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = lambda c, u, m: msgs.put((m.topic, bytes(m.payload)))
    try:
        client.connect(host, port, keepalive=30)
    except ssl.SSLError as exc:
        raise TransportError(Reason.TRANSPORT_FAILED, f"TLS with {host}:{port} failed: {exc.reason}") from None
    except OSError as exc:
        raise TransportError(Reason.TRANSPORT_FAILED, f"cannot reach {host}:{port}: {exc.strerror}") from None
    client.loop_start()
    seen = 0
    try:
        while count is None or seen < count:
            try:
                item = msgs.get(timeout=timeout)
            except queue.Empty:
                break
            if isinstance(item, Exception):
                raise item
            print(describe(*item), file=out, flush=True)
            seen += 1
    except KeyboardInterrupt:
        pass
    finally:
        client.disconnect()
        client.loop_stop()
    return 0
