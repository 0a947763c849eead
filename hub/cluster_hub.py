"""A hub in cluster mode: the same hub, with the parts that several hubs share on Redis.

:func:`make_hub` builds a :class:`ClusterHub` when the configuration names Redis and a plain
:class:`~hub.app.Hub` otherwise. A cluster hub takes its store (Redis), bus (local plus
pub/sub), ledger (a link to the leader's) and fleet (with ownership) from
:mod:`hub.cluster`, and adds what only several hubs need: the lease, the leadership, the
inbox, the mirror of agents held elsewhere, and the recovery after a Redis outage. Sessions,
the gate, the queries and the ledger's rules are the single hub's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from .app import Hub
from .bus import Bus
from .cluster.fleet import SUPERSEDE, ClusterFleet
from .cluster.ledger import Leadership, LedgerLink
from .cluster.mirror import Mirror
from .cluster.runtime import Cluster, lease_figures
from .config import HubConfig
from .fleet import Fleet
from .ledger import Ledger
from .model import AgentRecord
from .store.base import Store, StoreUnavailable

log = logging.getLogger(__name__)

__all__ = ["ClusterHub", "make_hub"]


def make_hub(config: HubConfig) -> Hub:
    return ClusterHub(config) if config.redis_url else Hub(config)


class ClusterHub(Hub):
    ledger: LedgerLink  # type: ignore[assignment]
    fleet: ClusterFleet  # type: ignore[assignment]

    def __init__(self, config: HubConfig) -> None:
        self.cluster = Cluster(config)
        self.leadership: Leadership | None = None
        super().__init__(config)
        cluster = self.cluster
        self.leadership = Leadership(
            cluster.link,
            cluster.keys,
            cluster.leases,
            cluster.ownership,
            cluster.outbox,
            self.hub_id,
            make_ledger=self._leader_ledger,
            local_send=self._send,
            live_hubs=self._live_hubs,
            auditor=self.auditor,
            on_change=self._leading_changed,
        )
        self.ledger.leader_ledger = lambda: self.leadership.ledger if self.leadership else None
        self.leadership.on_takeover = self.alerts.takeover
        self.leadership.conflict_window = config.alert_conflict_window
        self.leadership.calls["ack_alert"] = self._ack_alert_call
        self.mirror = Mirror(self.registry, self.hub_id, announce=self._announce_here)
        cluster.mirror = self.mirror
        cluster.bus.on_remote = lambda event, data: self.mirror.apply(event)
        cluster.bus.on_gap = self._missed
        cluster.on_inbox = self._inbox
        cluster.on_hub_down = self._hub_down
        cluster.on_hub_up = self._hub_up
        cluster.on_recovered = self._recovered
        cluster.on_lapsed = self._lapsed
        cluster.figures = self._figures
        # Only the leader judges the whole fleet; every hub judges itself.
        self.alerts.scope = "hub"
        self.queries.open_alerts = self._open_alerts
        self.queries.acknowledge = self._acknowledge
        self._resyncing: asyncio.Task[None] | None = None

    # -- the parts cluster mode replaces -------------------------------------------------

    def _make_store(self) -> Store:
        return self.cluster.make_store(fence=self._fence)

    def _fence(self) -> tuple[str, str] | None:
        return self.leadership.fence() if self.leadership is not None else None

    def _make_bus(self) -> Bus:
        return self.cluster.bus

    def _make_ledger(self) -> Any:
        cluster = self.cluster
        return LedgerLink(
            cluster.link,
            cluster.keys,
            self.hub_id,
            cluster.outbox,
            self.store,
            self.registry,
            self.auditor,
            time.time,
        )

    def _make_fleet(self) -> Fleet:
        cluster = self.cluster
        return ClusterFleet(
            self.config,
            self.hub_id,
            self.registry,
            self.store,
            self.bus,
            self.auditor,
            self.metrics,
            self.credentials,
            self.ledger,
            on_takeover=lambda agent_id, recent: None,  # the leader counts them, cluster-wide
            ownership=cluster.ownership,
            outbox=cluster.outbox,
            boot=cluster.boot,
        )

    def _leader_ledger(self, send: Any, fence: Any) -> Ledger:
        """The real ledger, while this hub leads (``send`` routes to the agents' hubs)."""
        ledger: Ledger = Hub._make_ledger(self, send)
        return ledger

    # -- start and stop ------------------------------------------------------------------

    async def _load(self) -> None:
        cluster = self.cluster
        await cluster.connect()
        await self.store.open()
        await self.credentials.load()
        self.registry.load(await self.store.load_agents())
        # States from who holds whom now (an agent held by a live hub is online).
        self.mirror.reload(
            list(self.registry.records.values()),
            await cluster.ownership.all(),
            set(await cluster.leases.live()),
        )
        await cluster.tick()
        cluster.start()
        await self.leadership.step()  # type: ignore[union-attr]

    def _periodic_work(self) -> list[asyncio.Task[None]]:
        loops = super()._periodic_work()
        loops.append(self._every(self.config.cluster_lease_interval, self._cluster_tick, "lease"))
        return loops

    async def _cluster_tick(self) -> None:
        await self.cluster.tick()
        assert self.leadership is not None
        await self.leadership.step()

    def _last_steps(self) -> list[Any]:
        return [
            self._step_down,
            self.auditor.drain,
            self.store.flush,
            self.cluster.stop,
            self.store.close,
        ]

    async def _step_down(self) -> None:
        assert self.leadership is not None
        ledger = self.leadership.ledger
        if ledger is not None:
            await ledger.drain()
        await self.leadership.stop()

    @property  # type: ignore[override]
    def store_ready(self) -> bool:
        """Redis's health as the link last saw it: the link checks it every lease interval,
        so a hub is ready again as soon as Redis answers, not at its next store probe."""
        return self.cluster.link.healthy

    @store_ready.setter
    def store_ready(self, value: bool) -> None:
        pass  # the link's health is the store's

    async def _check_store(self) -> None:
        pass  # the link checks Redis every lease interval (Cluster.tick)

    def _sweep(self) -> None:
        self.fleet.sweep()
        self.ledger.tick()

    def _tick(self) -> None:
        super()._tick()

    # -- what the cluster tells this hub -------------------------------------------------

    def _inbox(self, fields: dict[bytes, bytes]) -> None:
        kind = fields.get(b"k")
        if kind == b"deliver":
            session = self.registry.live.get(fields.get(b"a", b"").decode())
            if session is not None:
                session.send(fields.get(b"d", b""))
        elif kind == SUPERSEDE:
            self.fleet.superseded(fields)
        elif kind == b"reply":
            self.ledger.replied(fields)

    def _announce_here(self, record: AgentRecord, kind: str) -> None:
        """A change this hub concluded itself (a hub went down): its own consoles only."""
        if Bus.wanted(self.bus, "agents"):
            Bus.publish(self.bus, "agents", kind, record.agent_id, agent=record.view())

    def _missed(self, origin: str) -> None:
        """Events from another hub were missed: re-read the fleet, consoles resync."""
        if self._resyncing is None or self._resyncing.done():
            self._resyncing = asyncio.ensure_future(self._resync())

    async def _resync(self) -> None:
        cluster = self.cluster
        try:
            records = await self.store.load_agents()
            owners = await cluster.ownership.all()
            live = await cluster.leases.live()
        except StoreUnavailable:
            return
        self.mirror.reload(records, owners, set(live))
        cluster.bus.resync_subscribers()

    async def _live_hubs(self) -> set[str]:
        return set(await self.cluster.leases.live())

    def _hub_down(self, hub_id: str) -> None:
        assert self.leadership is not None
        self.leadership.lost_hub(hub_id)
        # A hub killed may not have sent its last events (agents that registered on it just
        # before): re-read the fleet from the store, where they are, so they show unknown.
        self._missed(hub_id)
        if self.alerts.scope == "fleet":
            self.alerts.hub_down(hub_id)

    def _hub_up(self, hub_id: str) -> None:
        if self.alerts.scope == "fleet":
            self.alerts.hub_up(hub_id)

    def _leading_changed(self, leading: bool) -> None:
        self.alerts.scope = "fleet" if leading else "hub"
        if leading:
            self.spawn(self.alerts.load())
            known = set(self.cluster.hubs)
            for hub_id in {r.hub_id for r in self.registry.records.values() if r.hub_id}:
                if hub_id not in known and hub_id != self.hub_id:
                    self.alerts.hub_down(hub_id)
        else:
            self.alerts.forget_fleet_alerts()

    async def _recovered(self, data_lost: bool) -> None:
        """Redis answers again: claims made, stale ones given back; after a data loss,
        everything this hub holds in memory written back and the loss raised loudly."""
        cluster = self.cluster
        owners = await cluster.ownership.all()
        made = await self.fleet.reconcile(owners)
        if data_lost:
            log.critical("redis came back without its data: writing this hub's state back")
            await self._write_back()
        log.info("redis answers again: %d agents claimed anew", made)
        self._missed("*")
        if data_lost:
            self.alerts.data_lost(
                "redis restarted without its data: finished commands, audit entries, alerts "
                "and credential changes not yet persisted may be lost; this hub wrote back its "
                "credentials, agents and (if it led) the unfinished jobs"
            )

    async def _lapsed(self) -> None:
        """This hub's lease lapsed while it held its agents (a stall past the TTL): the
        others marked them unknown and the leader took them for disconnected. Say again
        that they are here (claiming anew those whose claim is gone)."""
        owners = await self.cluster.ownership.all()
        await self.fleet.reconcile(owners, announce=True)

    async def _write_back(self) -> None:
        """What a Redis that lost its data needs from this hub's memory."""
        for record in list(self.credentials.records.values()):
            try:
                await self.store.add_credential(record)
            except ValueError:
                pass  # another hub wrote it back first
        self.credentials.rev = 0
        for session in list(self.registry.live.values()):
            record = getattr(session, "record", None)
            if record is not None:
                self.store.save_agent(record)
        leadership = self.leadership
        ledger = leadership.ledger if leadership is not None else None
        if ledger is not None:
            for run in list(ledger.jobs.values()):
                await self.store.add_job(run.record, run.unfinished(), [])

    # -- figures -------------------------------------------------------------------------

    def _figures(self) -> dict[str, Any]:
        topics = {t for t, n in self.bus._by_topic.items() if n}
        leading = self.leadership is not None and self.leadership.leading
        return lease_figures(
            self.registry.connected,
            topics,
            self.config.max_agents,
            self.metrics.stats({self.hub_id: self.registry.connected}),
            leading,
            self.metrics.lag.recent_max(10.0) * 1000,
        )

    def stats(self) -> dict[str, Any]:
        """The whole cluster's figures, with each hub's state (an additive ``cluster`` field,
        docs/protocol.md)."""
        return self.cluster.cluster_stats(
            self.metrics.stats({self.hub_id: self.registry.connected})
        )

    def readiness_warnings(self) -> list[str]:
        return self.cluster.link.warnings

    def not_ready_reason(self) -> str:
        if self.stopping:
            return super().not_ready_reason()
        return self.cluster.readiness() or super().not_ready_reason()  # Redis's own reason

    async def _ack_alert_call(self, body: dict[str, Any]) -> Any:
        return await self.alerts.acknowledge(body["alert_id"], body["actor"], body.get("comment"))

    async def _open_alerts(self) -> list[dict[str, Any]]:
        return [alert.view() for alert in await self.store.open_alerts()]

    async def _acknowledge(
        self, alert_id: str, actor: str, comment: str | None
    ) -> dict[str, Any] | None:
        if self.alerts.scope == "fleet" or any(
            a.alert_id == alert_id for a in self.alerts.open.values()
        ):
            return await self.alerts.acknowledge(alert_id, actor, comment)
        answer = await self.ledger.call(
            "ack_alert", {"alert_id": alert_id, "actor": actor, "comment": comment}
        )
        return answer if isinstance(answer, dict) else None
