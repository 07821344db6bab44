"""The versioned MQTT topic scheme and the record kinds (see docs/protocol.md, "Topics").

Every device has its own namespace ``sealmq/v1/<device-id>/``, so a broker ACL can confine a
device to it and the backend subscribes with one wildcard per channel::

    sealmq/v1/<device-id>/hs/up       EDHOC message_1, message_3, errors (device -> backend)
    sealmq/v1/<device-id>/hs/down     EDHOC message_2, message_4, errors (backend -> device)
    sealmq/v1/<device-id>/data/up     sealed telemetry, command replies, key-update control
    sealmq/v1/<device-id>/data/down   sealed commands, acknowledgements, key-update control
    sealmq/v1/<device-id>/media/up    sealed media manifests and chunks
    sealmq/v1/<device-id>/media/down  sealed media acknowledgements

For MQTT 5 shared subscriptions (several backend instances) the backend subscribes to
``$share/<group>/sealmq/v1/+/<channel>/up``; nothing in the scheme changes.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from enum import IntEnum, StrEnum

from sealmq.errors import DecodeError, Reason

PREFIX = "sealmq"
VERSION = "v1"
ROOT = f"{PREFIX}/{VERSION}"

# Device ids end up in topics, SAN URIs and file names: keep them boring.
DEVICE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class Channel(StrEnum):
    HANDSHAKE = "hs"
    DATA = "data"
    MEDIA = "media"


class Direction(StrEnum):
    UP = "up"  # device -> backend
    DOWN = "down"  # backend -> device


class RecordKind(IntEnum):
    """Visible in the record header and bound into the AEAD's external AAD."""

    TELEMETRY = 1  # device -> backend, data channel
    COMMAND = 2  # backend -> device, data channel
    REPLY = 3  # device -> backend, answer to a command
    KEY_UPDATE = 4  # both directions, data channel (session control)
    MEDIA_MANIFEST = 5  # device -> backend, media channel
    MEDIA_CHUNK = 6  # device -> backend, media channel
    MEDIA_ACK = 7  # backend -> device, media channel
    MEDIA_CONTROL = 8  # both directions, media channel (status request, finish, abort)
    ACK = 9  # backend -> device, data channel: message ids committed (the device's outbox drops them)
    # fleet management (issue 16), numbered apart so other additions do not collide
    ENROL_REQUEST = 16  # device -> backend, data channel: a CSR (zero-touch enrolment, renewal)
    ENROL_RESPONSE = 17  # backend -> device, data channel: the certificate chain or a refusal
    UPDATE_OFFER = 18  # backend -> device, media channel: a release-signed update manifest
    UPDATE_CHUNK = 19  # backend -> device, media channel: a piece of the update payload
    UPDATE_STATUS = 20  # device -> backend, media channel: next chunk wanted, installed, rejected


KIND_CHANNEL: dict[RecordKind, Channel] = {
    RecordKind.TELEMETRY: Channel.DATA,
    RecordKind.COMMAND: Channel.DATA,
    RecordKind.REPLY: Channel.DATA,
    RecordKind.KEY_UPDATE: Channel.DATA,
    RecordKind.MEDIA_MANIFEST: Channel.MEDIA,
    RecordKind.MEDIA_CHUNK: Channel.MEDIA,
    RecordKind.MEDIA_ACK: Channel.MEDIA,
    RecordKind.MEDIA_CONTROL: Channel.MEDIA,
    RecordKind.ACK: Channel.DATA,
    RecordKind.ENROL_REQUEST: Channel.DATA,
    RecordKind.ENROL_RESPONSE: Channel.DATA,
    RecordKind.UPDATE_OFFER: Channel.MEDIA,
    RecordKind.UPDATE_CHUNK: Channel.MEDIA,
    RecordKind.UPDATE_STATUS: Channel.MEDIA,
}


def valid_device_id(device_id: str) -> bool:
    return bool(DEVICE_ID_RE.match(device_id))


def check_device_id(device_id: str) -> str:
    if not isinstance(device_id, str) or not valid_device_id(device_id):
        raise DecodeError(Reason.WRONG_TYPE, "device id must match [a-z0-9][a-z0-9._-]{0,62}")
    return device_id


def topic(device_id: str, channel: Channel, direction: Direction) -> str:
    return f"{ROOT}/{check_device_id(device_id)}/{channel.value}/{direction.value}"


def kind_topic(device_id: str, kind: RecordKind, direction: Direction) -> str:
    return topic(device_id, KIND_CHANNEL[kind], direction)


def subscription(channel: Channel, direction: Direction) -> str:
    """Wildcard filter for all devices' ``channel``/``direction`` (what the backend subscribes to)."""
    return f"{ROOT}/+/{channel.value}/{direction.value}"


@dataclass(frozen=True)
class ParsedTopic:
    device_id: str
    channel: Channel
    direction: Direction


def parse(topic_name: str) -> ParsedTopic:
    """Parse a concrete topic; raise DecodeError(WRONG_TOPIC) for anything outside the scheme."""
    if not isinstance(topic_name, str):
        raise DecodeError(Reason.WRONG_TOPIC, "topic outside the sealmq/v1 scheme")
    return _parse(topic_name)


# Every record's topic is parsed on arrival; a device has a handful of topics, so the parse (a
# regex and two enum lookups) is cached. Refused topics raise and are never cached; the bound keeps
# a flood of distinct valid topics from growing memory.
@functools.lru_cache(maxsize=16384)
def _parse(topic_name: str) -> ParsedTopic:
    parts = topic_name.split("/")
    if len(parts) != 5 or parts[0] != PREFIX or parts[1] != VERSION:
        raise DecodeError(Reason.WRONG_TOPIC, "topic outside the sealmq/v1 scheme")
    device_id, channel, direction = parts[2], parts[3], parts[4]
    if not valid_device_id(device_id):
        raise DecodeError(Reason.WRONG_TOPIC, "bad device id in topic")
    try:
        return ParsedTopic(device_id, Channel(channel), Direction(direction))
    except ValueError:
        raise DecodeError(Reason.WRONG_TOPIC, "unknown channel or direction") from None
