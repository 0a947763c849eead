"""Durable messages between hubs: each hub's inbox, and the ledger's stream.

Redis pub/sub is at most once: a subscriber that is reconnecting, or slow past its output
buffer limit, loses messages without a word. What must arrive goes through streams:

* **A hub's inbox** (``inbox:<hub>``): deliveries to the agents it holds, supersedes,
  replies. One reader (the hub), read in order. A new incarnation of a hub starts with an
  empty inbox: whatever was addressed to the old one concerned connections that are gone
  (their commands are delivered again when the agents reconnect). A message is only added
  while the addressee's lease lives, so a dead hub's inbox does not grow; it expires.
* **The ledger's stream** (``ledger``): every message the ledger leader must see, from
  every hub, in one order — agents' acks, outputs and results, agents connecting and
  leaving, jobs to adopt, calls. Read through a consumer group by whichever hub leads; an
  entry is acknowledged only once what it caused is stored, so a leader that dies leaves
  its unacknowledged entries pending, and the next leader claims them (XAUTOCLAIM) before
  reading on. It is trimmed only below the oldest pending entry (MAXLEN on Redis 7.0 would
  delete pending entries).

Writes are queued and sent at the end of the event-loop turn, many in one round trip. While
Redis does not answer, messages for the ledger wait in a bounded queue and go out, in
order, once it does; the caller learns when the queue is full (and sheds the work).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from redis import exceptions as redis_errors

from ..store.base import StoreUnavailable
from .keys import Keys
from .link import RedisLink

log = logging.getLogger(__name__)

__all__ = ["Inbox", "LedgerStream", "Outbox"]

Fields = Mapping[bytes | str, bytes | str | int]

#: XADD to a hub's inbox only while its lease lives; refresh the inbox's expiry.
#: KEYS: lease, inbox.  ARGV: inbox expiry (ms), then field, value, field, value...
_SEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local args = {}
for i = 2, #ARGV do args[#args + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], '*', unpack(args))
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return 1
"""
#: How long a hub's inbox outlives its last message if nobody reads it.
INBOX_EXPIRY_MS = 120_000
#: Entries read from a stream at once.
READ_BATCH = 500
#: How long a blocking read waits for new entries before it looks again (ms).
BLOCK_MS = 1_000
GROUP = "leader"


def _flat(fields: Fields) -> list[Any]:
    out: list[Any] = []
    for key, value in fields.items():
        out.append(key)
        out.append(value)
    return out


class Outbox:
    """Messages to other hubs' inboxes and to the ledger's stream, sent per turn."""

    def __init__(self, link: RedisLink, keys: Keys, limit: int = 200_000) -> None:
        self.link = link
        self.keys = keys
        self.limit = limit
        self._send = link.client.register_script(_SEND)
        self._to_hubs: list[tuple[str, Fields]] = []
        self._to_ledger: deque[Fields] = deque()
        self._scheduled = False
        self._sending: asyncio.Task[None] | None = None
        self.dropped = 0

    def to_hub(self, hub_id: str, fields: Fields) -> None:
        """Best effort: a hub that is gone does not need it (its agents come back elsewhere)."""
        self._to_hubs.append((hub_id, fields))
        self._schedule()

    def to_ledger(self, fields: Fields) -> bool:
        """Queued for the ledger leader; False when the queue is full (Redis down too long)."""
        if len(self._to_ledger) >= self.limit:
            self.dropped += 1
            return False
        self._to_ledger.append(fields)
        self._schedule()
        return True

    @property
    def waiting(self) -> int:
        return len(self._to_ledger)

    def _schedule(self) -> None:
        if not self._scheduled and (self._sending is None or self._sending.done()):
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self._sending is not None and not self._sending.done():
            return
        self._sending = asyncio.ensure_future(self._send_all())

    async def _send_all(self) -> None:
        while self._to_hubs or self._to_ledger:
            hubs, self._to_hubs = self._to_hubs, []
            ledger = [self._to_ledger[i] for i in range(min(len(self._to_ledger), 2_000))]
            pipe = self.link.client.pipeline(transaction=False)
            for hub_id, fields in hubs:
                # Awaiting queues it on the pipeline (and loads the script with it).
                await self._send(
                    keys=[self.keys.lease(hub_id), self.keys.inbox(hub_id)],
                    args=[INBOX_EXPIRY_MS, *_flat(fields)],
                    client=pipe,
                )
            for fields in ledger:
                pipe.xadd(self.keys.ledger, dict(fields))  # type: ignore[arg-type]
            try:
                await self.link.run(pipe.execute(), timeout=self.link.timeout * 3)
            except StoreUnavailable:
                # Deliveries are dropped (they are redelivered when the agent reconnects);
                # the ledger's messages stay queued, in order, for the next try.
                await asyncio.sleep(0.25)
                continue
            except redis_errors.ResponseError:
                log.exception("sending to other hubs failed")
            for _ in ledger:
                self._to_ledger.popleft()

    async def drain(self, timeout: float) -> None:
        """Send what is queued (at shutdown), for at most ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                while (
                    self._to_hubs
                    or self._to_ledger
                    or (self._sending is not None and not self._sending.done())
                ):
                    self._flush()
                    if self._sending is not None:
                        await asyncio.shield(self._sending)
        except TimeoutError:
            log.error("%d messages for the ledger not sent at shutdown", len(self._to_ledger))


class Inbox:
    """This hub's own stream, read in order by one reader."""

    def __init__(
        self,
        link: RedisLink,
        keys: Keys,
        hub_id: str,
        handle: Callable[[dict[bytes, bytes]], None],
    ) -> None:
        self.link = link
        self.key = keys.inbox(hub_id)
        self.handle = handle

    async def run(self) -> None:
        """Start empty (a new incarnation), then read for ever; survive Redis outages."""
        while True:
            try:
                await self.link.run(self.link.client.delete(self.key))
                break
            except StoreUnavailable:
                await asyncio.sleep(0.5)
        last: bytes | str = "0-0"
        while True:
            try:
                found = await self.link.run(
                    self.link.blocking.xread({self.key: last}, count=READ_BATCH, block=BLOCK_MS),
                    timeout=self.link.timeout + BLOCK_MS / 1000,
                )
            except StoreUnavailable:
                await asyncio.sleep(0.5)
                continue
            for _stream, entries in found or ():
                for entry_id, fields in entries:
                    last = entry_id
                    try:
                        self.handle(fields)
                    except Exception:
                        log.exception("a message in this hub's inbox failed")
                if entries:
                    try:
                        await self.link.run(self.link.client.xtrim(self.key, minid=last))
                    except StoreUnavailable:
                        pass


class LedgerStream:
    """The leader's side of the ledger's stream: claim what a dead leader left, read on,
    acknowledge once stored."""

    def __init__(self, link: RedisLink, keys: Keys, consumer: str) -> None:
        self.link = link
        self.key = keys.ledger
        self.consumer = consumer

    async def prepare(self) -> None:
        try:
            await self.link.run(
                self.link.client.xgroup_create(self.key, GROUP, id="0", mkstream=True)
            )
        except redis_errors.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def claim(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Entries another consumer (a leader gone) read and never acknowledged, oldest first."""
        claimed: list[tuple[bytes, dict[bytes, bytes]]] = []
        start: bytes | str = "0-0"
        while True:
            reply = await self.link.run(
                self.link.client.xautoclaim(
                    self.key,
                    GROUP,
                    self.consumer,
                    min_idle_time=0,
                    start_id=start,
                    count=READ_BATCH,
                )
            )
            start, entries = reply[0], reply[1]
            claimed += [(entry_id, fields) for entry_id, fields in entries if fields]
            if start in (b"0-0", "0-0"):
                break
        claimed.sort(key=lambda e: _id_key(e[0]))
        return claimed

    async def read(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        found = await self.link.run(
            self.link.blocking.xreadgroup(
                GROUP, self.consumer, {self.key: ">"}, count=READ_BATCH, block=BLOCK_MS
            ),
            timeout=self.link.timeout + BLOCK_MS / 1000,
        )
        return [entry for _stream, entries in found or () for entry in entries]

    async def acknowledge(self, ids: list[bytes]) -> None:
        if not ids:
            return
        client = self.link.client
        await self.link.run(client.xack(self.key, GROUP, *ids))
        pending = await self.link.run(client.xpending(self.key, GROUP))
        if pending and pending.get("pending"):
            floor = pending["min"]
        else:
            newest = max(ids, key=_id_key)
            millis, _, seq = (newest.decode() if isinstance(newest, bytes) else newest).partition(
                "-"
            )
            floor = f"{millis}-{int(seq) + 1}"
        await self.link.run(client.xtrim(self.key, minid=floor))

    async def forget_other_consumers(self) -> None:
        """Drop consumers (past leaders) that hold nothing pending any more."""
        consumers = await self.link.run(self.link.client.xinfo_consumers(self.key, GROUP))
        for consumer in consumers:
            name = consumer["name"]
            name = name.decode() if isinstance(name, bytes) else name
            if name != self.consumer and not consumer["pending"]:
                await self.link.run(self.link.client.xgroup_delconsumer(self.key, GROUP, name))


def _id_key(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    millis, _, seq = text.partition("-")
    return int(millis), int(seq)
