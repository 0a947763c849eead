"""Events between hubs: the local bus, plus Redis pub/sub for what other hubs must see.

Pub/sub only nudges and fans out events whose loss is repaired, never what must arrive
(that goes through streams, :mod:`hub.cluster.inbox`). Each hub publishes its events in
batches, at most every ``FLUSH_INTERVAL``, and numbers its batches per incarnation; a
receiver that sees a number skipped knows it missed events and re-reads the fleet from
Redis (and tells its consoles to resync). A hub also expects its own batches back: it
publishes at least every ``PROBE_INTERVAL`` and, when its own batch does not come back
within ``PROBE_TIMEOUT`` while Redis answers, its subscription is dead (a subscriber can
look connected and receive nothing after a failover) and it subscribes again.

What crosses: agent, command and alert events always (every hub keeps the whole fleet's
state, and a console that just subscribed on another hub must not miss a transition), but
plain heartbeats and command output only while some console anywhere wants the topic, and
audit entries likewise (each hub's lease says which topics its consoles want; a console's
interest reaches the other hubs with its hub's next lease renewal).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson

from ..bus import Bus
from ..protocol.codec import encode
from ..store.base import StoreUnavailable
from .keys import Keys
from .link import OUTAGES, RedisLink

log = logging.getLogger(__name__)

__all__ = ["ClusterBus"]

#: Topics whose events other hubs' consoles may want.
FORWARDED = frozenset({"agents", "commands", "alerts", "audit"})
#: Topics whose events always cross, whoever watches: every hub keeps the whole fleet's
#: state, and a console that subscribes on another hub must see a job's next transition
#: (its interest reaches the other hubs only with its hub's next lease renewal).
ALWAYS_FORWARDED = frozenset({"agents", "commands", "alerts"})
#: …except these kinds, which cross only while a console somewhere wants the topic.
FORWARDED_WHEN_WANTED = frozenset({"heartbeat", "output"})
#: Longest a batch of outgoing events waits (seconds): bounds the PUBLISH rate per hub.
FLUSH_INTERVAL = 0.05
PROBE_INTERVAL = 2.0
PROBE_TIMEOUT = 6.0
#: Largest batch published at once.
BATCH_BYTES = 512 * 1024


class ClusterBus(Bus):
    def __init__(self, link: RedisLink, keys: Keys, origin: str) -> None:
        super().__init__()
        self.link = link
        self.channel = keys.events
        #: This incarnation (``hub|boot``): batches carry it with their number.
        self.origin = origin
        #: Topics some console on another hub wants (from the leases).
        self.remote_wanted: frozenset[str] = frozenset()
        #: Events of other hubs, parsed, for the mirror (agents) before local subscribers.
        self.on_remote: Callable[[dict[str, Any], bytes], None] = lambda event, data: None
        #: Called with the origin whose batches were missed (the fleet must be re-read).
        self.on_gap: Callable[[str], None] = lambda origin: None
        self._outgoing: dict[Any, bytes] = {}
        self._unkeyed = 0
        self._seq = 0
        self._last_seen: dict[str, int] = {}
        self._flush_handle: asyncio.TimerHandle | None = None
        self._last_echo = time.monotonic()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.published = 0
        self.received = 0

    # -- publishing ----------------------------------------------------------------------

    def wanted(self, topic: str) -> bool:
        return (
            topic in ALWAYS_FORWARDED
            or super().wanted(topic)
            or (topic in FORWARDED and topic in self.remote_wanted)
        )

    def wants(self, topic: str, kind: str) -> bool:
        if topic in ALWAYS_FORWARDED and kind not in FORWARDED_WHEN_WANTED:
            return True
        return super().wanted(topic) or (topic in FORWARDED and topic in self.remote_wanted)

    def publish(self, topic: str, kind: str, key: Any, **fields: Any) -> None:
        local = bool(self._by_topic.get(topic))
        forward = (topic in ALWAYS_FORWARDED and kind not in FORWARDED_WHEN_WANTED) or (
            topic in FORWARDED and topic in self.remote_wanted
        )
        if not (local or forward):
            return
        data = encode({"type": "event", "topic": topic, "kind": kind, **fields})
        coalesce = (topic, key) if key is not None else None
        if local:
            for subscriber in tuple(self._subscribers):
                if topic in subscriber.topics:
                    subscriber.push(coalesce, data)
        if forward:
            self._queue(coalesce, data)

    def _queue(self, coalesce: Any, data: bytes) -> None:
        if coalesce is None:
            self._unkeyed += 1
            coalesce = ("", self._unkeyed)
        self._outgoing.pop(coalesce, None)  # the latest state, in the place of its time
        self._outgoing[coalesce] = data
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        events, self._outgoing = list(self._outgoing.values()), {}
        batches: list[list[bytes]] = [[]]
        size = 0
        for data in events:
            if size + len(data) > BATCH_BYTES and batches[-1]:
                batches.append([])
                size = 0
            batches[-1].append(data)
            size += len(data)
        for batch in batches:
            self._publish(batch)

    def _publish(self, events: list[bytes]) -> None:
        self._seq += 1
        origin = orjson.dumps(self.origin)
        payload = b'{"o":%s,"s":%d,"e":[%s]}' % (origin, self._seq, b",".join(events))
        task = asyncio.ensure_future(self._send(payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, payload: bytes) -> None:
        try:
            await self.link.run(self.link.client.publish(self.channel, payload))
            self.published += 1
        except StoreUnavailable:
            pass  # lost: receivers see the numbers skip and re-read the fleet
        except Exception:
            log.exception("publishing events failed")

    # -- receiving -----------------------------------------------------------------------

    async def run(self) -> None:
        """Subscribe and deliver other hubs' events for ever; resubscribe when dead."""
        while True:
            pubsub = self.link.blocking.pubsub(ignore_subscribe_messages=True)
            try:
                await self.link.run(pubsub.subscribe(self.channel))
                self._last_echo = time.monotonic()
                self._last_seen.clear()
                self.on_gap("*")  # whatever was missed while not subscribed
                await self._receive(pubsub)
            except (StoreUnavailable, *OUTAGES):
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _receive(self, pubsub: Any) -> None:
        next_probe = time.monotonic() + PROBE_INTERVAL
        while True:
            message = await pubsub.get_message(timeout=0.5)
            now = time.monotonic()
            if message is not None and message.get("type") == "message":
                self._batch(message["data"])
            if now >= next_probe:
                next_probe = now + PROBE_INTERVAL
                self._publish([])  # a probe: our own batch must come back
            if now - self._last_echo > PROBE_TIMEOUT and self.link.healthy:
                log.warning(
                    "no event of this hub came back in %.0f s: subscribing again", PROBE_TIMEOUT
                )
                return

    def _batch(self, payload: bytes) -> None:
        try:
            batch = orjson.loads(payload)
            origin, seq, events = batch["o"], int(batch["s"]), batch["e"]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("a malformed event batch on %s was ignored", self.channel)
            return
        if origin == self.origin:
            self._last_echo = time.monotonic()
            return
        last = self._last_seen.get(origin)
        self._last_seen[origin] = seq
        if last is not None and seq != last + 1:
            log.warning(
                "events of %s missed (%d after %d): re-reading the fleet", origin, seq, last
            )
            self.on_gap(origin)
        self.received += len(events)
        for event in events:
            self._deliver(event)

    def _deliver(self, event: dict[str, Any]) -> None:
        topic = event.get("topic")
        if not isinstance(topic, str):
            return
        data = encode(event)
        self.on_remote(event, data)
        if not self._by_topic.get(topic):
            return
        subject = event.get("agent") or event.get("command") or event.get("alert") or {}
        key = subject.get("agent_id") or subject.get("command_id") or subject.get("alert_id")
        coalesce = (topic, key) if key is not None and event.get("kind") != "output" else None
        for subscriber in tuple(self._subscribers):
            if topic in subscriber.topics:
                subscriber.push(coalesce, data)

    def resync_subscribers(self) -> None:
        """Tell every local console to take a fresh snapshot (events were missed)."""
        for subscriber in tuple(self._subscribers):
            resync = getattr(subscriber, "request_resync", None)
            if resync is not None:
                resync("events between hubs were missed")
