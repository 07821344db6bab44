"""The embedded broker's subscription index (broker.subscriptions) against amqtt's own matching.

amqtt tests every filter in the broker against every message; the index finds the matching ones
by topic level. These tests hold it to amqtt's ``Broker._matches`` for any filters and topics, keep
it in step with the dict through every way amqtt (or anyone) changes it, and route real messages
through the embedded broker and mosquitto to many subscribers.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from amqtt.broker import Broker
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.subscriptions import BroadcastQueue, SubscriptionMap
from tests import brokers
from tests.brokers import BrokerHandle

any_broker = brokers.any_broker

_AMQTT = SimpleNamespace(logger=logging.getLogger("test.amqtt-matches"))


def amqtt_matches(topic: str, flt: str) -> bool:
    """amqtt 0.12.1's own rule, the reference."""
    return bool(Broker._matches(_AMQTT, topic, flt))


# levels drawn from the cases that matter: equal and unequal names, empty levels, wildcards alone
# and inside a name (which amqtt never matches), and $ at the first level
LEVELS = st.sampled_from(["a", "b", "", "+", "#", "$x", "a+", "#b", "c#"])
FILTERS = st.lists(LEVELS, min_size=1, max_size=4).map("/".join)
# topics too may hold "+" or "#" (amqtt does not refuse them on PUBLISH)
TOPICS = st.lists(st.sampled_from(["a", "b", "", "$x", "+", "#", "a+", "c"]), min_size=1, max_size=5).map("/".join)


def expected(m: SubscriptionMap, topic: str) -> list[str]:
    return [f for f in dict.keys(m) if amqtt_matches(topic, f)]


OPS = st.lists(st.tuples(st.sampled_from(["set", "setdefault", "del", "pop"]), FILTERS), max_size=30)


@settings(max_examples=400, deadline=None)
@given(ops=OPS, topics=st.lists(TOPICS, min_size=1, max_size=8))
def test_index_finds_exactly_what_amqtt_matches_in_the_dicts_order(ops: list[tuple[str, str]],
                                                                    topics: list[str]) -> None:
    m = SubscriptionMap()
    for op, flt in ops:  # adds, removals and re-adds (a re-added filter goes to the end, as in a dict)
        if op == "set":
            m[flt] = [("session", 1)]
        elif op == "setdefault":
            m.setdefault(flt, []).append(("session", 1))
        elif op == "del" and flt in m:
            del m[flt]
        elif op == "pop":
            m.pop(flt, None)
        for topic in topics:
            assert m.matching(topic) == expected(m, topic), (topic, list(dict.keys(m)))


def test_amqtts_edge_rules_hold() -> None:
    m = SubscriptionMap()
    for f in ["#", "+", "+/+", "a/#", "a/+", "a", "$SYS/#", "a/#/b", "a+/b", "", "/"]:
        m[f] = []
    assert m.matching("a") == ["#", "+", "a/#", "a"]  # "a/#" matches its parent level
    assert m.matching("a/b") == ["#", "+/+", "a/#", "a/+"]
    assert m.matching("$SYS/x") == ["$SYS/#"]  # no filter starting with a wildcard matches a $ topic
    assert m.matching("") == ["#", "+", ""]
    assert m.matching("/") == ["#", "+/+", "/"]
    assert m.matching("+") == ["#", "+"]  # a "+" in a topic is the wildcard's node once, not twice
    for topic in ["a", "a/b", "$SYS/x", "", "/", "+", "a+/b", "a/c/b"]:
        assert m.matching(topic) == expected(m, topic)


def test_every_way_of_changing_the_map_keeps_the_index_in_step() -> None:
    m = SubscriptionMap()
    m["a/+"] = [("s1", 1)]
    m.update({"a/b": [], "#": []})
    m |= {"x/#": []}
    assert m.setdefault("a/b", ["unused"]) == []
    assert m.pop("#") == [] and m.pop("#", "gone") == "gone"
    assert m.popitem() == ("x/#", [])
    assert m.matching("a/b") == ["a/+", "a/b"] == expected(m, "a/b")
    del m["a/+"]
    m["a/+"] = []  # back at the end of the dict's order
    assert m.matching("a/b") == ["a/b", "a/+"]
    assert m._root.children["a"].children.keys() == {"+", "b"}
    del m["a/+"], m["a/b"]
    assert m._root.children == {}  # emptied branches are pruned
    m["a/#"], m["a/b/c"] = [], []
    del m["a/b/c"]  # pruning stops at a node that still holds a filter ending in "#"
    assert m.matching("a/x") == ["a/#"]
    m["a/b/c"] = []
    m.clear()
    assert m.matching("a/b/c") == [] and not m._root.children


def test_items_is_a_snapshot_of_the_focused_topics_filters_once() -> None:
    m = SubscriptionMap()
    subs: list[Any] = [("s1", 1)]
    m["sealmq/v1/d1/data/down"] = subs
    m["sealmq/v1/+/data/up"] = [("backend", 1)]
    m.focus("sealmq/v1/d2/data/up")
    got = m.items()
    assert got == [("sealmq/v1/+/data/up", [("backend", 1)])]
    got[0][1].append("x")  # a copy: the broadcast's loop may await while a client subscribes
    assert m["sealmq/v1/+/data/up"] == [("backend", 1)]
    assert [k for k, _ in m.items()] == list(dict.keys(m))  # the focus is used once
    for key in m:  # iterating is over a snapshot: amqtt deletes inside its loops
        del m[key]
    assert m == {}


def test_the_queue_focuses_the_map_on_the_message_it_hands_out() -> None:
    async def main() -> list[str]:
        m = SubscriptionMap()
        m["t/1"], m["t/2"] = [], []
        q = BroadcastQueue(m)
        await q.put({"topic": "t/2", "data": b""})
        item = await q.get()
        focused = [item["topic"], *(k for k, _ in m.items())]
        await q.put({"data": b""})  # no topic (amqtt always sets one): no focus, every filter as before
        await q.get()
        return [*focused, *(k for k, _ in m.items())]

    assert asyncio.run(main()) == ["t/2", "t/2", "t/1", "t/2"]


def test_many_subscribers_each_get_exactly_what_their_filters_match(any_broker: BrokerHandle) -> None:
    # every device holds its three "down" filters, the backend two wildcard filters, the monitor
    # "sealmq/#": every message must reach exactly the clients whose filters match it, once
    b = any_broker
    up = "sealmq/v1/{}/{}/up"
    down = "sealmq/v1/{}/{}/down"
    backend, backend_got = b.connect(b.backend)
    for flt in ("sealmq/v1/+/data/up", "sealmq/v1/+/hs/up"):
        assert b.subscribe(backend, flt) == [1]
    monitor, monitor_got = b.connect(b.monitor)
    assert b.subscribe(monitor, "sealmq/#") == [1]
    devices = []
    for creds in b.devices:
        c, got = b.connect(creds)
        for ch in ("hs", "data", "media"):
            assert b.subscribe(c, down.format(creds.username, ch)) == [1]
        devices.append((creds.username, c, got))
    sent: list[str] = []
    for name, c, _ in devices:
        for ch in ("data", "hs", "media"):
            c.publish(up.format(name, ch), f"{name} {ch} up".encode(), qos=1).wait_for_publish(5)
            sent.append(up.format(name, ch))
        for ch in ("data", "media"):
            backend.publish(down.format(name, ch), f"{name} {ch} down".encode(), qos=1).wait_for_publish(5)
            sent.append(down.format(name, ch))

    def topics(got: brokers.Received, n: int) -> list[str]:
        out = []
        for _ in range(n):
            out.append(got.get(5).topic)
        assert got.drain(0.3) == []  # nothing more, nothing twice
        return sorted(out)

    want_backend = sorted(t for t in sent if t.endswith(("/data/up", "/hs/up")))
    assert topics(backend_got, len(want_backend)) == want_backend
    assert topics(monitor_got, len(sent)) == sorted(sent)
    for name, _, got in devices:
        want = sorted(t for t in sent if t.startswith(f"sealmq/v1/{name}/") and t.endswith("/down"))
        assert topics(got, len(want)) == want


def test_embedded_broker_uses_the_index(tmp_path: Path) -> None:
    with brokers.running_amqtt(tmp_path) as b:
        hardened = b.broker._broker
        assert isinstance(hardened._subscriptions, SubscriptionMap)
        assert isinstance(hardened._broadcast_queue, BroadcastQueue)
        assert hardened._broadcast_queue._subscriptions is hardened._subscriptions
