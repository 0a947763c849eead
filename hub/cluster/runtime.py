"""A hub as one of several: the cluster's parts, built and run for :class:`~hub.app.Hub`.

The hub builds this when it has ``redis_url``; it takes its store and bus from here, hands
its sessions a :class:`~hub.cluster.ledger.LedgerLink` instead of a ledger and a
:class:`~hub.cluster.fleet.ClusterFleet` instead of a fleet, and calls :meth:`Cluster.tick`
every lease interval. Everything else of the hub is the same on one hub and on many.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from ..config import HubConfig
from ..store.base import StoreUnavailable
from .events import ClusterBus
from .inbox import Inbox, Outbox
from .keys import Keys
from .leases import HubLease, Leases
from .link import RedisLink
from .mirror import Mirror
from .ownership import Ownership

log = logging.getLogger(__name__)

__all__ = ["Cluster"]


class Cluster:
    def __init__(self, config: HubConfig) -> None:
        assert config.redis_url is not None
        self.config = config
        self.hub_id = config.hub_id
        #: This incarnation of the hub: leases, claims and batches name it.
        self.boot = secrets.token_hex(4)
        self.origin = f"{self.hub_id}|{self.boot}"
        self.keys = Keys(config.redis_prefix)
        self.link = RedisLink(config.redis_url, self.keys, timeout=config.redis_timeout)
        self.bus = ClusterBus(self.link, self.keys, self.origin)
        self.leases = Leases(self.link, self.keys, self.hub_id, self.boot, config.cluster_lease_ttl)
        self.ownership = Ownership(self.link, self.keys, self.hub_id, self.boot)
        self.outbox = Outbox(self.link, self.keys)
        #: The hubs whose leases live, as last read (this one included once it renewed).
        self.hubs: dict[str, HubLease] = {}
        #: Hubs seen live by this hub whose lease lapsed since (until they are back).
        self.down: set[str] = set()
        self._tasks: list[asyncio.Task[Any]] = []
        # Set by the hub once its parts exist.
        self.mirror: Mirror | None = None
        self.on_hub_down: Callable[[str], None] = lambda hub_id: None
        self.on_hub_up: Callable[[str], None] = lambda hub_id: None
        self.on_inbox: Callable[[dict[bytes, bytes]], None] = lambda fields: None
        self.on_recovered: Callable[[bool], Any] = lambda data_lost: None
        #: Called when this hub's own lease had lapsed (it stalled past the TTL): the
        #: others took its agents for unknown and the leader for disconnected.
        self.on_lapsed: Callable[[], Any] = lambda: None
        self._renewed = False
        self.figures: Callable[[], dict[str, Any]] = dict
        self._data_lost = False
        self._was_down = False
        self.link.on_data_lost = self._lost_data
        self.link.on_down = lambda reason: setattr(self, "_was_down", True)

    def make_store(self, fence: Callable[[], tuple[str, str] | None]) -> Any:
        from ..store.redis import RedisStore

        retention = self.config.audit_retention  # the operator's, as on one hub (0: forever)
        return RedisStore(
            self.link.client,
            prefix=self.keys.prefix,
            fence=fence,
            audit_retention=retention or None,
        )

    # -- start and stop ------------------------------------------------------------------

    async def connect(self) -> None:
        """At start: Redis must answer (a hub that cannot reach it refuses to start)."""
        if not await self.link.check():
            raise StoreUnavailable(f"cannot reach redis at {self.link.url}: {self.link.reason}")
        await self.link.read_persistence()

    def start(self) -> None:
        inbox = Inbox(self.link, self.keys, self.hub_id, self.on_inbox)
        self._tasks = [
            asyncio.create_task(inbox.run(), name="cluster-inbox"),
            asyncio.create_task(self.bus.run(), name="cluster-events"),
        ]

    async def stop(self) -> None:
        await self.outbox.drain(self.config.shutdown_timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self.leases.withdraw()
        except StoreUnavailable:
            pass
        await self.link.close()

    # -- every lease interval ------------------------------------------------------------

    async def tick(self) -> None:
        """Check Redis, renew the lease, learn which hubs live and what their consoles want."""
        healthy = await self.link.check()
        if not healthy:
            return
        if self._was_down or self._data_lost:
            lost, self._data_lost, self._was_down = self._data_lost, False, False
            result = self.on_recovered(lost)
            if asyncio.iscoroutine(result):
                await result
        try:
            lapsed = await self.leases.renew(self.figures()) and self._renewed
            self._renewed = True
            live = await self.leases.live()
        except StoreUnavailable:
            return
        if lapsed:
            log.warning("this hub's lease had lapsed (was it stalled?): re-announcing its agents")
            result = self.on_lapsed()
            if asyncio.iscoroutine(result):
                await result
        before = set(self.hubs)
        self.hubs = live
        for hub_id in set(live):
            self.down.discard(hub_id)
        for hub_id in before - set(live):
            self.down.add(hub_id)
            log.warning("hub %s stopped renewing its lease", hub_id)
            if self.mirror is not None:
                self.mirror.hub_down(hub_id)
            self.on_hub_down(hub_id)
        for hub_id in set(live) - before:
            if hub_id != self.hub_id:
                self.on_hub_up(hub_id)
        wanted: set[str] = set()
        for lease in live.values():
            if lease.hub_id != self.hub_id:
                wanted.update(lease.figures.get("topics", ()))
        self.bus.remote_wanted = frozenset(wanted)

    def _lost_data(self, old: str, new: str) -> None:
        self._data_lost = True

    # -- figures -------------------------------------------------------------------------

    def agents_per_hub(self) -> dict[str, int]:
        return {hub_id: lease.agents for hub_id, lease in sorted(self.hubs.items())}

    def cluster_stats(self, local: dict[str, Any]) -> dict[str, Any]:
        """A metrics tick for the whole cluster: rates summed over the live hubs, the round
        trip and commands in flight as the leader measures them, and each hub's state."""
        stats = dict(local)
        figures = [lease.figures for lease in self.hubs.values()] or [{}]
        for name in ("connects_per_min", "disconnects_per_min", "auth_failures_per_min"):
            stats[name] = sum(int(f.get(name, 0) or 0) for f in figures)
        leader = next((f for f in figures if f.get("leader")), None)
        if leader is not None:
            for name in ("commands_in_flight", "rtt_p50_ms", "rtt_p99_ms"):
                stats[name] = leader.get(name)
        stats["hubs"] = self.agents_per_hub()
        hubs: dict[str, Any] = {
            hub_id: {
                "state": "up",
                "agents": lease.agents,
                "leader": bool(lease.figures.get("leader")),
                "lag_ms": lease.figures.get("lag_ms"),
                "max_agents": lease.figures.get("max_agents"),
            }
            for hub_id, lease in sorted(self.hubs.items())
        }
        for hub_id in self.down:
            hubs.setdefault(hub_id, {"state": "down", "agents": 0, "leader": False})
        stats["cluster"] = {
            "redis": "up" if self.link.healthy else "down",
            "hubs": hubs,
            "hub_id": self.hub_id,  # the hub that sent this tick (ticks never cross hubs)
        }
        return stats

    def readiness(self) -> str:
        return "" if self.link.healthy else (self.link.reason or "redis unavailable")


def lease_figures(
    connected: int,
    topics: frozenset[str] | set[str],
    max_agents: int,
    stats: dict[str, Any],
    leader: bool,
    lag_ms: float,
) -> dict[str, Any]:
    """What a hub says of itself in its lease (read by the others' metrics ticks)."""
    return {
        "agents": connected,
        "topics": sorted(topics),
        "max_agents": max_agents,
        "connects_per_min": stats.get("connects_per_min", 0),
        "disconnects_per_min": stats.get("disconnects_per_min", 0),
        "auth_failures_per_min": stats.get("auth_failures_per_min", 0),
        "commands_in_flight": stats.get("commands_in_flight", 0),
        "rtt_p50_ms": stats.get("rtt_p50_ms"),
        "rtt_p99_ms": stats.get("rtt_p99_ms"),
        "leader": leader,
        "lag_ms": round(lag_ms, 1),
        "at": time.time(),
    }
