"""What ``sealmq inspect`` prints for one MQTT message: only what the broker can see anyway.

Pure and total: :func:`describe` never raises, whatever the topic and payload. It shows the
topic, device id, channel and direction, the record header (kind name, kid hex, epoch, piv) or
which EDHOC message a handshake payload looks like, the payload length and a hex preview of the
ciphertext. Anything that is neither is printed as ``undecodable``.

Record layout (sealmq/record.py): deterministic CBOR ``[kind: uint, kid: bstr, epoch: uint,
piv: uint, ciphertext: bstr]``. EDHOC messages (RFC 9528) are CBOR sequences; on MQTT a message
may be prefixed with a connection identifier (as CoAP does, RFC 9528 Appendix A.2), so the
guesses below accept an optional leading identifier or ``true``.
"""

from __future__ import annotations

from typing import Any

from sealmq import cbor
from sealmq.errors import SealmqError
from sealmq.topics import Channel, Direction, RecordKind, parse

PREVIEW_BYTES = 16


def _hex_preview(data: bytes, n: int) -> str:
    return data[:n].hex() + ("..." if len(data) > n else "")


def _conn_id(item: Any) -> bool:
    return (isinstance(item, int) and not isinstance(item, bool)) or isinstance(item, bytes)


def describe_record(payload: bytes, preview: int = PREVIEW_BYTES) -> str | None:
    try:
        item = cbor.loads(payload)
        fields = cbor.as_list(item, "record", length=5)
        kind = cbor.as_uint(fields[0], "kind")
        kid = cbor.as_bytes(fields[1], "kid")
        epoch = cbor.as_uint(fields[2], "epoch")
        piv = cbor.as_uint(fields[3], "piv")
        ciphertext = cbor.as_bytes(fields[4], "ciphertext")
    except SealmqError:
        return None
    try:
        kind_name = RecordKind(kind).name
    except ValueError:
        kind_name = f"unknown({kind})"
    return (
        f"record kind={kind_name} kid={kid.hex()} epoch={epoch} piv={piv} "
        f"ct_len={len(ciphertext)} ct={_hex_preview(ciphertext, preview)}"
    )


def describe_edhoc(payload: bytes, direction: Direction | None) -> str | None:
    try:
        items = cbor.loads_seq(payload, max_items=8)
    except SealmqError:
        return None
    if items and items[0] is True:  # CoAP-style "message_1 follows" marker
        items = items[1:]
    if (
        len(items) >= 4
        and isinstance(items[0], int) and not isinstance(items[0], bool) and 0 <= items[0] <= 3
        and isinstance(items[1], (int, list))
        and isinstance(items[2], bytes)
        and _conn_id(items[3])
    ):
        suites = items[1] if isinstance(items[1], list) else [items[1]]
        return f"edhoc message_1 method={items[0]} suites={suites} g_x_len={len(items[2])}"
    if (
        len(items) == 2
        and isinstance(items[0], int) and not isinstance(items[0], bool)
        and (isinstance(items[1], (str, list)) or items[1] is True)
    ):
        return f"edhoc error err_code={items[0]}"
    body = items[-1] if items else None
    if isinstance(body, bytes) and (len(items) == 1 or (len(items) == 2 and _conn_id(items[0]))):
        prefix = ""
        if len(items) == 2:
            cid = items[0]
            prefix = f" conn_id={cid.hex() if isinstance(cid, bytes) else cid}"
        if direction is Direction.UP:
            name = "message_3"
        elif direction is Direction.DOWN:
            name = "message_2 or message_4"
        else:
            name = "message_2/3/4"
        return f"edhoc {name}{prefix} body_len={len(body)}"
    return None


def describe(topic: str, payload: bytes, *, preview: int = PREVIEW_BYTES) -> str:
    """One line describing a message as the broker sees it. Never raises."""
    try:
        payload = bytes(payload)
        safe_topic = topic.encode("utf-8", "replace").decode("utf-8").replace("\n", "\\n")
        device = channel_name = direction_name = "?"
        channel: Channel | None = None
        direction: Direction | None = None
        try:
            parsed = parse(topic)
        except SealmqError:
            pass
        else:
            channel, direction = parsed.channel, parsed.direction
            device, channel_name, direction_name = parsed.device_id, channel.value, direction.value
        if channel is Channel.HANDSHAKE:
            detail = describe_edhoc(payload, direction) or describe_record(payload, preview)
        else:
            detail = describe_record(payload, preview) or (
                describe_edhoc(payload, direction) if channel is None else None
            )
        if detail is None:
            detail = f"undecodable preview={_hex_preview(payload, preview)}"
        return (
            f"{safe_topic} device={device} channel={channel_name} dir={direction_name} "
            f"len={len(payload)} {detail}"
        )
    except Exception as exc:  # the inspector must never crash on what it is shown
        return f"<unprintable message: {type(exc).__name__}>"
