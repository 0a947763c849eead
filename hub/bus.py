"""Event fan-out from the hub's parts to admin subscribers.

Each event is serialized once, when at least one subscriber wants its topic, and the same
bytes go to every subscriber. Events carry a coalescing key (an agent id, a command id…)
so that a subscriber's queue can keep only the latest state of each subject.

This in-process bus is the only one so far; its interface is the seam where cluster mode
plugs in a bus that carries events between hub processes, without changing publishers.
"""

from __future__ import annotations

from typing import Any, Protocol

from .protocol.codec import encode

__all__ = ["Bus", "Subscriber"]


class Subscriber(Protocol):
    topics: frozenset[str]

    def push(self, key: Any, data: bytes) -> None:
        """Queue one serialized event; ``key`` is None for events that never coalesce."""


class Bus:
    def __init__(self) -> None:
        self._subscribers: set[Subscriber] = set()
        self._by_topic: dict[str, int] = {}

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.add(subscriber)
        for topic in subscriber.topics:
            self._by_topic[topic] = self._by_topic.get(topic, 0) + 1

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber in self._subscribers:
            self._subscribers.discard(subscriber)
            for topic in subscriber.topics:
                self._by_topic[topic] -= 1

    def wanted(self, topic: str) -> bool:
        return self._by_topic.get(topic, 0) > 0

    def wants(self, topic: str, kind: str) -> bool:
        """Whether an event of this kind would reach anyone (build it only then)."""
        return self._by_topic.get(topic, 0) > 0

    def publish(self, topic: str, kind: str, key: Any, **fields: Any) -> None:
        """Announce an event; cheap when nobody subscribes to ``topic``."""
        if not self._by_topic.get(topic):
            return
        data = encode({"type": "event", "topic": topic, "kind": kind, **fields})
        coalesce = (topic, key) if key is not None else None
        for subscriber in tuple(self._subscribers):
            if topic in subscriber.topics:
                subscriber.push(coalesce, data)
