"""Which hub holds which agent: ``agent → hub|boot|generation``, changed only by scripts.

An agent that registers on a hub *claims* itself there: one script draws the next
generation for the id (a counter that only grows), records the new owner and returns the
one it replaces, so that hub can be told to close its connection (4001) — newest wins,
across hubs as on one. Only the owner may *release* the entry (compare-and-delete with its
own ``hub|boot|generation``): a superseded connection's late clean-up, or a hub that was
down and comes back, can never remove the entry of the agent's newer connection elsewhere.

Claims made in the same turn of the event loop go to Redis in one pipeline: a burst of
registrations (a hub restarted, its agents back at once) costs a round trip per batch,
not per agent.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from .keys import Keys
from .link import RedisLink

__all__ = ["Owner", "Ownership"]

#: KEYS: owners, generations.  ARGV: agent id, ``hub|boot``.  → {generation, previous owner}
_CLAIM = """
local generation = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
local previous = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|' .. generation)
return {generation, previous or false}
"""
#: KEYS: owners.  ARGV: agent id, ``hub|boot|generation``.  → 1 when released
_RELEASE = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Owner:
    hub_id: str
    boot: str
    generation: int

    @classmethod
    def parse(cls, raw: bytes | str) -> Owner:
        text = raw.decode() if isinstance(raw, bytes) else raw
        hub_id, boot, generation = text.rsplit("|", 2)
        return cls(hub_id, boot, int(generation))

    def __str__(self) -> str:
        return f"{self.hub_id}|{self.boot}|{self.generation}"


class Ownership:
    def __init__(self, link: RedisLink, keys: Keys, hub_id: str, boot: str) -> None:
        self.link = link
        self.keys = keys
        self.me = f"{hub_id}|{boot}"
        self._claim = link.client.register_script(_CLAIM)
        self._release = link.client.register_script(_RELEASE)
        self._claims: list[tuple[str, asyncio.Future[tuple[int, Owner | None]]]] = []
        self._batching: asyncio.Task[None] | None = None

    async def claim(self, agent_id: str) -> tuple[int, Owner | None]:
        """Make this hub the agent's owner: its new generation, and the owner it replaced."""
        future: asyncio.Future[tuple[int, Owner | None]] = (
            asyncio.get_running_loop().create_future()
        )
        self._claims.append((agent_id, future))
        if len(self._claims) == 1:
            self._batching = asyncio.ensure_future(self._claim_batch())
        return await future

    async def _claim_batch(self) -> None:
        await asyncio.sleep(0)  # the rest of this turn's claims join the batch
        batch, self._claims = self._claims, []
        pipe = self.link.client.pipeline(transaction=False)
        keys = [self.keys.owners, self.keys.generations]
        for agent_id, _future in batch:
            await self._claim(keys=keys, args=[agent_id, self.me], client=pipe)
        try:
            replies = await self.link.run(pipe.execute())
        except BaseException as exc:
            for _agent_id, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_agent_id, future), (generation, previous) in zip(batch, replies, strict=True):
            if not future.done():
                future.set_result((int(generation), Owner.parse(previous) if previous else None))

    async def release(self, agent_id: str, generation: int) -> bool:
        """Remove the entry if it is still ours at this generation; False when it moved on."""
        released = await self.link.run(
            self._release(keys=[self.keys.owners], args=[agent_id, f"{self.me}|{generation}"])
        )
        return bool(released)

    async def all(self) -> dict[str, Owner]:
        raw = await self.link.run(self.link.client.hgetall(self.keys.owners))
        return {k.decode(): Owner.parse(v) for k, v in raw.items()}

    async def set_draining(self, agent_id: str, draining: bool) -> None:
        client = self.link.client
        call = client.sadd if draining else client.srem
        await self.link.run(call(self.keys.draining, agent_id))

    async def draining(self) -> set[str]:
        raw = await self.link.run(self.link.client.smembers(self.keys.draining))
        return {m.decode() for m in raw}
