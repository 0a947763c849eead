"""Hubs' leases and the one leader, on Redis keys that expire.

Every hub renews a lease (a hash with an expiry) every ``interval`` seconds; a hub whose
lease lapsed is down, whatever it believes. A lease names the hub's *incarnation* (a boot
id drawn at start), so a restarted hub is a new hub to everyone who kept state about the
old one. The figures a hub reports with its lease (agents connected, load, the topics its
consoles want) are how the others see it.

One hub at a time is the leader: it runs the ledger and the alerts for the whole cluster.
Leadership is a key ``hub|boot|term`` with an expiry, taken with SET-if-absent and extended
only by its holder (compare-and-extend, one script), so two hubs never both believe they
lead for longer than the expiry; ``term`` grows with every new leadership and fences the
store writes of a leader that lost its lease.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from .keys import Keys
from .link import RedisLink

log = logging.getLogger(__name__)

__all__ = ["HubLease", "Leases"]

#: Take the leadership if nobody holds it; extend it if we do. Returns the token we hold,
#: or nil.  KEYS: leader, term.  ARGV: our ``hub|boot``, expiry in ms.
_LEAD = """
local current = redis.call('GET', KEYS[1])
if not current then
  local term = redis.call('INCR', KEYS[2])
  local token = ARGV[1] .. '|' .. term
  redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
  return token
end
if string.sub(current, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. '|' then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return current
end
return false
"""
#: Give the leadership up if we still hold it.  KEYS: leader.  ARGV: our token.
_RESIGN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(slots=True)
class HubLease:
    """Another hub as its lease describes it."""

    hub_id: str
    boot: str
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def agents(self) -> int:
        return int(self.figures.get("agents", 0))


class Leases:
    def __init__(
        self,
        link: RedisLink,
        keys: Keys,
        hub_id: str,
        boot: str,
        ttl: float = 5.0,
    ) -> None:
        self.link = link
        self.keys = keys
        self.hub_id = hub_id
        self.boot = boot
        self.ttl_ms = int(ttl * 1000)
        self.me = f"{hub_id}|{boot}"
        self._lead = link.client.register_script(_LEAD)
        self._resign = link.client.register_script(_RESIGN)

    async def renew(self, figures: dict[str, Any]) -> bool:
        """Renew this hub's lease with its current figures (one round trip). True when the
        lease had to be made anew: it had lapsed (or this is the first renewal), so the
        other hubs may have taken this hub for down meanwhile."""
        now_ms = int(time.time() * 1000)  # informational: expiry is Redis's own clock
        key = self.keys.lease(self.hub_id)
        pipe = self.link.client.pipeline(transaction=True)
        pipe.hset(
            key, mapping={"boot": self.boot, "seen": now_ms, "figures": orjson.dumps(figures)}
        )
        pipe.pexpire(key, self.ttl_ms)
        pipe.zadd(self.keys.hubs, {self.hub_id: now_ms})
        added, *_ = await self.link.run(pipe.execute())
        return bool(added)  # HSET counts the fields it created: none while the lease lives

    async def withdraw(self) -> None:
        """A hub that stops cleanly gives its lease back at once."""
        await self.link.run(self.link.client.delete(self.keys.lease(self.hub_id)))

    async def live(self) -> dict[str, HubLease]:
        """Every hub whose lease has not lapsed, with its figures."""
        client = self.link.client
        names = await self.link.run(client.zrange(self.keys.hubs, 0, -1))
        hub_ids = [n.decode() if isinstance(n, bytes) else n for n in names]
        if not hub_ids:
            return {}
        pipe = client.pipeline(transaction=False)
        for hub_id in hub_ids:
            pipe.hgetall(self.keys.lease(hub_id))
        leases = await self.link.run(pipe.execute())
        live = {}
        for hub_id, lease in zip(hub_ids, leases, strict=True):
            if not lease:
                continue
            boot = lease.get(b"boot", b"").decode()
            figures = orjson.loads(lease.get(b"figures", b"{}"))
            live[hub_id] = HubLease(hub_id, boot, figures)
        return live

    async def known(self) -> dict[str, int]:
        """Every hub ever seen and when its lease was last renewed (ms), live or not."""
        pairs = await self.link.run(self.link.client.zrange(self.keys.hubs, 0, -1, withscores=True))
        return {(n.decode() if isinstance(n, bytes) else n): int(s) for n, s in pairs}

    async def forget(self, hub_id: str) -> None:
        """Drop a hub that is gone for good from the list of known hubs."""
        await self.link.run(self.link.client.zrem(self.keys.hubs, hub_id))

    # -- leadership ----------------------------------------------------------------------

    async def lead(self) -> str | None:
        """Take or keep the leadership: our token ``hub|boot|term``, or None."""
        token = await self.link.run(
            self._lead(keys=[self.keys.leader, self.keys.term], args=[self.me, self.ttl_ms])
        )
        if not token:
            return None
        return token.decode() if isinstance(token, bytes) else str(token)

    async def resign(self, token: str) -> None:
        await self.link.run(self._resign(keys=[self.keys.leader], args=[token]))

    async def leader(self) -> str | None:
        """Who leads now (``hub|boot|term``), as Redis says."""
        token = await self.link.run(self.link.client.get(self.keys.leader))
        return token.decode() if isinstance(token, bytes) else token
