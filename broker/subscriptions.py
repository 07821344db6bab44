"""The embedded broker's subscriptions: amqtt's filter map, with an index of the filters.

amqtt 0.12.1 broadcasts a message by walking every topic filter any client holds
(``for k_filter, subscriptions in self._subscriptions.items()``) and testing each one with
``Broker._matches``: the cost of every message grows with the number of filters in the broker,
that is with the fleet (each device holds three filters of its own; the benchmark's sealed path
holds six where its plaintext path holds one). :class:`SubscriptionMap` replaces that dict. It is
the same filter -> [(session, qos)] map, plus a tree of the filters by topic level, and when
amqtt's broadcast asks for ``items()`` right after taking its message from the queue
(:class:`BroadcastQueue` tells the map the message's topic), it hands back only the filters that
match that topic, found in the tree, in the dict's own order. amqtt's loop then still tests each
one with ``_matches`` (they all pass) and does everything else as before.

Matching follows ``Broker._matches`` exactly, and a property test checks it against amqtt's
own function for any filters and topics (tests/test_broker_subscriptions.py):
``+`` matches one level, a trailing ``#`` the level above and any below, a topic starting with
``$`` matches no filter starting with a wildcard, and a filter with a wildcard anywhere else in
a level (``a+``, ``#`` not last) matches nothing. Filters without wildcards match by equality.

Every ``items()`` is a snapshot (lists copied): amqtt awaits inside its loop, and a SUBSCRIBE or a
disconnect meanwhile would otherwise raise "dictionary changed size during iteration" (the
message would miss the remaining subscribers) or shift a list under the loop (a subscriber
skipped).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from typing import Any


def _valid(levels: list[str]) -> bool:
    """Whether a filter can match at all under amqtt's rules (wildcards alone in their level,
    ``#`` last)."""
    for i, level in enumerate(levels):
        if ("+" in level and level != "+") or ("#" in level and level != "#"):
            return False
        if level == "#" and i != len(levels) - 1:
            return False
    return True


class _Node:
    __slots__ = ("children", "ends", "rest")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.ends: list[str] = []  # filters whose last level is this node
        self.rest: list[str] = []  # filters "<this node's path>/#"


class SubscriptionMap(dict):  # type: ignore[type-arg]  # amqtt's dict[str, list[tuple[Session, int]]]
    """amqtt's filter -> [(session, qos)] map with an index by topic level; see the module."""

    def __init__(self) -> None:
        super().__init__()
        self._root = _Node()
        self._order: dict[str, int] = {}  # filter -> when it was added (the dict's own order)
        self._counter = itertools.count()
        self._topic: str | None = None  # the message amqtt's broadcast just took from the queue

    # -- keeping the index in step with the dict (amqtt adds with [f] = [], removes with del, clear)

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self:
            self._order[key] = next(self._counter)
            self._index(key, add=True)
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        del self._order[key]
        self._index(key, add=False)

    def clear(self) -> None:
        super().clear()
        self._order.clear()
        self._root = _Node()

    def pop(self, key: str, *default: Any) -> Any:
        if key not in self:
            if default:
                return default[0]
            raise KeyError(key)
        value = self[key]
        del self[key]
        return value

    def popitem(self) -> tuple[str, Any]:
        key = next(reversed(self))
        return key, self.pop(key)

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other: Any) -> SubscriptionMap:  # type: ignore[misc]
        self.update(other)
        return self

    def _index(self, key: str, *, add: bool) -> None:
        levels = key.split("/")
        if not _valid(levels):
            return  # matches nothing: stays in the dict (amqtt lists it), not in the tree
        last = levels[-1] == "#"
        path = levels[:-1] if last else levels
        node = self._root
        trail = [node]
        for level in path:
            child = node.children.get(level)
            if child is None:
                if not add:
                    return
                child = node.children[level] = _Node()
            node = child
            trail.append(node)
        bucket = node.rest if last else node.ends
        if add:
            bucket.append(key)
            return
        bucket.remove(key)
        for level, parent in zip(reversed(path), reversed(trail[:-1]), strict=True):  # prune empty branches
            child = parent.children[level]
            if child.children or child.ends or child.rest:
                break
            del parent.children[level]

    # -- what amqtt reads

    def focus(self, topic: str) -> None:
        """The next ``items()`` is for a broadcast of ``topic`` (BroadcastQueue.get calls this)."""
        self._topic = topic

    def matching(self, topic: str) -> list[str]:
        """The filters that match ``topic`` under amqtt's rules, in the dict's order."""
        found: list[str] = []
        levels = topic.split("/")
        dollar = topic.startswith("$")
        stack: list[tuple[_Node, int]] = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            found.extend(node.rest)  # "<path>/#" matches the path itself and anything below
            if i == len(levels):
                found.extend(node.ends)
                continue
            exact = node.children.get(levels[i])
            if exact is not None:
                stack.append((exact, i + 1))
            if i == 0 and dollar:
                continue  # [MQTT-4.7.2-1]: no wildcard at the first level matches a $ topic
            plus = node.children.get("+") if levels[i] != "+" else None  # a "+" level was the exact one
            if plus is not None:
                stack.append((plus, i + 1))
        if dollar:  # "#" alone sits in the root's rest, and must not match a $ topic either
            found = [f for f in found if not f.startswith("#")]
        order = self._order
        return sorted(found, key=order.__getitem__)

    def items(self) -> list[tuple[str, list[Any]]]:  # type: ignore[override]
        topic, self._topic = self._topic, None
        keys = self.matching(topic) if topic is not None else list(super().keys())
        get = dict.__getitem__
        return [(k, list(get(self, k))) for k in keys]

    def __iter__(self) -> Iterator[str]:
        return iter(list(super().keys()))


class BroadcastQueue(asyncio.Queue):  # type: ignore[type-arg]
    """amqtt's broadcast queue, telling the subscription map which topic the broadcast that just
    took a message is about to look up. amqtt's ``_run_broadcast`` calls ``get()`` and then, with
    no ``await`` in between, ``self._subscriptions.items()``; one broadcast runs at a time."""

    def __init__(self, subscriptions: SubscriptionMap) -> None:
        super().__init__()
        self._subscriptions = subscriptions

    async def get(self) -> Any:
        item = await super().get()
        topic = item.get("topic") if isinstance(item, dict) else None
        if isinstance(topic, str):  # anything else: no focus, the broadcast sees every filter as before
            self._subscriptions.focus(topic)
        return item
