"""A backend-style share-group member in its own process, for the failover tests (tests/test_scale_broker.py).

    python -m tests.share_worker HOST PORT USER PASSWORD_FILE GROUP SESSION_EXPIRY ACK_FIRST

It runs the real :class:`runtime.mqtt.MqttLink` (MQTT 5, ``$share/GROUP/sealmq/v1/+/+/up``, manual
acknowledgement, client id = user) and prints ``MSG <payload>`` for each message, flushed. The
first ACK_FIRST messages are acknowledged when handled (-1: all of them); after that the handler takes
each message's acknowledgement (``defer_ack``) and never runs it: those stay unacknowledged in flight
at the broker, as in a worker that dies before its batch commits. SIGKILL it to kill it mid-stream.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from runtime.mqtt import MQTT_5, MqttLink, MqttSettings


def main(argv: list[str]) -> None:
    host, port, user, pw_file, group, expiry, ack_first = argv
    handled = 0
    held = []  # the acknowledgements taken and never run
    out = threading.Lock()  # paho's thread and this one both print: one whole line at a time
    link: MqttLink

    def say(line: str) -> None:
        with out:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def on_message(topic: str, payload: bytes) -> None:
        nonlocal handled
        handled += 1
        if 0 <= int(ack_first) < handled:
            held.append(link.defer_ack())
        say(f"MSG {payload.decode()}")

    settings = MqttSettings(host=host, port=int(port), username=user, password=Path(pw_file).read_text().strip(),
                            client_id=user, protocol=MQTT_5, share_group=group, session_expiry=int(expiry))
    link = MqttLink(settings, on_message, ["sealmq/v1/+/+/up"], manual_ack=True)
    link.start(wait=10)
    if not link.subscribed.wait(10):
        raise SystemExit(f"no SUBACK: {link.error}")
    say("READY")
    threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1:])
