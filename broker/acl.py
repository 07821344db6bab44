"""The topic ACL of the sealmq brokers: who may publish, subscribe and receive what.

Pure functions, shared by the embedded broker's plugin and the Mosquitto ACL generator's tests.
A subscription filter is allowed only if *every* topic it can match is allowed: this is the
check amqtt's own ACL gets wrong (it lets a user allowed ``cmd/+`` subscribe ``cmd/#``).

Per role (``<id>`` is the device id = the MQTT user name, ``<ch>`` one of hs, data, media):

=========  ====================================  =======================================
role       publish (concrete topic)              subscribe / receive (filter)
=========  ====================================  =======================================
device     ``sealmq/v1/<id>/<ch>/up``            ``sealmq/v1/<id>/+/down`` and narrower
backend    ``sealmq/v1/<any>/<ch>/down``         ``sealmq/v1/+/+/up`` and narrower
monitor    nothing                               ``sealmq/#`` and narrower
=========  ====================================  =======================================
"""

from __future__ import annotations

from broker.passwd import AccountRole
from sealmq.topics import ROOT, Channel, valid_device_id

CHANNELS = tuple(c.value for c in Channel)


def valid_filter(flt: str) -> bool:
    """MQTT 3.1.1 section 4.7: '#' only last and alone in its level, '+' alone in its level."""
    if not flt or "\x00" in flt:
        return False
    levels = flt.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def topic_matches(topic: str, flt: str) -> bool:
    """Does concrete ``topic`` match filter ``flt`` (MQTT rules, '$' topics not matched by wildcards)?"""
    if topic.startswith("$") and flt[:1] in ("+", "#"):
        return False
    t_levels = topic.split("/")
    f_levels = flt.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return True  # '#' also matches the parent level itself ("a/#" matches "a")
        if i >= len(t_levels):
            return False
        if level not in ("+", t_levels[i]):
            return False
    return len(t_levels) == len(f_levels)


def filter_covered(requested: str, allowed: str) -> bool:
    """Is every topic matched by filter ``requested`` also matched by filter ``allowed``?"""
    r_levels = requested.split("/")
    a_levels = allowed.split("/")
    for i, a in enumerate(a_levels):
        if a == "#":
            return True
        if i >= len(r_levels):
            return False
        r = r_levels[i]
        if r == "#":
            return False  # requested spans any depth; only '#' in allowed covers that
        if a == "+":
            continue  # covers a literal or a '+' at this level
        if r != a:  # r is '+' (wider than a literal) or a different literal
            return False
    return len(r_levels) == len(a_levels)


def subscribe_filters(role: AccountRole, name: str) -> tuple[str, ...]:
    """The widest filters ``name`` may subscribe to (and receive on)."""
    if role is AccountRole.DEVICE:
        return (f"{ROOT}/{name}/+/down",) if valid_device_id(name) else ()
    if role is AccountRole.BACKEND:
        return (f"{ROOT}/+/+/up",)
    if role is AccountRole.MONITOR:
        return ("sealmq/#",)
    return ()


def may_publish(role: AccountRole, name: str, topic: str) -> bool:
    if not topic or "+" in topic or "#" in topic or "\x00" in topic:
        return False
    levels = topic.split("/")
    if len(levels) != 5 or f"{levels[0]}/{levels[1]}" != ROOT or levels[3] not in CHANNELS:
        return False
    device, direction = levels[2], levels[4]
    if role is AccountRole.DEVICE:
        return direction == "up" and device == name and valid_device_id(name)
    if role is AccountRole.BACKEND:
        return direction == "down" and valid_device_id(device)
    return False


def may_subscribe(role: AccountRole, name: str, flt: str) -> bool:
    if not valid_filter(flt):
        return False
    return any(filter_covered(flt, allowed) for allowed in subscribe_filters(role, name))


def may_receive(role: AccountRole, name: str, topic: str) -> bool:
    """Checked again at delivery: a session whose user changed must not keep old subscriptions."""
    return any(topic_matches(topic, allowed) for allowed in subscribe_filters(role, name))
