"""Alert rules (PROTOCOL §6), evaluated on a tick and on connection events.

An alert is keyed by (rule, subject): a condition that persists keeps one alert open (its
``last_seen`` moves), and the hub resolves it when the condition clears. Every change is
stored before it is announced on the ``alerts`` topic.

Correlation: when many agents of one region drop within a short window, the hub raises one
``mass_disconnect`` for the region and holds back the per-agent ``agent_offline`` alerts of
that region while it fires.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .audit import Auditor
from .bus import Bus
from .config import HubConfig
from .metrics import Metrics
from .model import AgentRecord, AlertRecord
from .registry import Registry
from .store.base import Store, StoreUnavailable

if TYPE_CHECKING:
    from .gate import Shedding

log = logging.getLogger(__name__)

__all__ = ["Alerts"]

#: An alert the store could not take is tried again after this long, doubling (seconds).
ALERT_RETRY_FIRST = 0.5
ALERT_RETRY_MAX = 5.0


class Alerts:
    def __init__(
        self,
        config: HubConfig,
        hub_id: str,
        registry: Registry,
        metrics: Metrics,
        store: Store,
        bus: Bus,
        auditor: Auditor,
    ) -> None:
        self.config = config
        self.hub_id = hub_id
        self.registry = registry
        self.metrics = metrics
        self.store = store
        self.bus = bus
        self.auditor = auditor
        self.open: dict[tuple[str, str], AlertRecord] = {}
        #: Agents that went from connected to offline while this hub ran, and since when.
        self.offline_since: dict[str, float] = {}
        self._connects: dict[str, deque[float]] = {}
        self._region_drops: dict[str, deque[float]] = {}
        self._takeovers: dict[str, float] = {}
        self._writes: set[asyncio.Future[Any]] = set()
        #: The save under way of each alert (the next one waits for it).
        self._saving: dict[str, asyncio.Future[Any]] = {}
        #: Which rules this hub judges: ``all`` (one hub), or in cluster mode ``fleet``
        #: (the leader: everything) and ``hub`` (the others: only rules about themselves).
        self.scope = "all"
        #: Cluster mode: hubs whose lease lapsed, and since when (for ``hub_down``).
        self.hubs_down: dict[str, float] = {}
        #: The gate's shedding at its pending cap (wired by the hub), for handshake_flood.
        self.shedding: Callable[[], Shedding | None] = lambda: None

    async def load(self) -> None:
        for alert in await self.store.open_alerts():
            self.open[alert.key] = alert

    def open_views(self) -> list[dict[str, Any]]:
        return [a.view() for a in self.open.values()]

    # -- inputs --------------------------------------------------------------------------

    def agent_state_changed(self, record: AgentRecord, old: str) -> None:
        """The registry's listener: every change of an agent's live state."""
        now = time.monotonic()
        new = record.state
        config = self.config
        if new == "offline" and old in ("online", "stale"):
            self.offline_since[record.agent_id] = now
            drops = self._region_drops.setdefault(record.region or "(none)", deque())
            drops.append(now)
            while drops and drops[0] < now - config.alert_mass_disconnect_window:
                drops.popleft()
        elif new == "online" and old in ("offline", "unknown"):
            # Only a reconnect (the agent dropped while this hub ran) can be flapping; a
            # fleet's first connections after a hub start cost no memory here.
            if self.offline_since.pop(record.agent_id, None) is not None:
                connects = self._connects.get(record.agent_id)
                if connects is None:
                    connects = self._connects[record.agent_id] = deque(maxlen=64)
                connects.append(now)
            self._resolve("agent_offline", record.agent_id)

    def takeover(self, agent_id: str, recent: int) -> None:
        self._takeovers[agent_id] = time.monotonic()
        if recent >= self.config.alert_conflict_takeovers:
            self._raise(
                "agent_conflict",
                "critical",
                agent_id,
                f"{recent} takeovers of agent id {agent_id} within "
                f"{self.config.alert_conflict_window:g} s: two processes claim this id",
            )

    # -- evaluation ----------------------------------------------------------------------

    def evaluate(self) -> None:
        """Judge every rule in this hub's scope (called about once a second)."""
        config = self.config
        registry = self.registry
        hub_id = self.hub_id
        now = time.monotonic()

        # connection_failures
        refused = self.metrics.refusals_window.total()
        if refused > config.alert_connection_failures_per_min:
            self._raise(
                "connection_failures",
                "warning",
                hub_id,
                f"{refused} refused handshakes in the last minute",
            )
        elif refused <= config.alert_connection_failures_per_min // 2:
            self._resolve("connection_failures", hub_id)

        # handshake_flood: shedding at the pending cap for longer than a minute
        shedding = self.shedding()
        if shedding is None:
            self._resolve("handshake_flood", hub_id)
        elif shedding.seconds >= config.alert_handshake_flood_after:
            heaviest = (
                f"; {shedding.heaviest[0]} holds the most half-open ({shedding.heaviest[1]})"
                if shedding.heaviest is not None
                else ""
            )
            self._raise(
                "handshake_flood",
                "warning",
                hub_id,
                f"shedding handshakes for {shedding.seconds:.0f} s: {shedding.shed} half-open "
                f"connections shed, {shedding.refused} newcomers refused{heaviest}",
            )

        # capacity
        if config.max_agents:
            share = registry.connected / config.max_agents
            if share >= config.alert_capacity_share:
                self._raise(
                    "capacity",
                    "warning",
                    hub_id,
                    f"{registry.connected} of {config.max_agents} agent slots in use",
                )
            elif share < config.alert_capacity_share * 0.95:
                self._resolve("capacity", hub_id)

        # store_unavailable: this hub's store cannot write (a full disk, an I/O error)
        cannot_write = self.store.health.reason
        if cannot_write:
            self._raise(
                "store_unavailable",
                "critical",
                hub_id,
                f"the store cannot write: {cannot_write}; dispatch, cancel and "
                "acknowledgements are refused until it can",
            )
        else:
            self._resolve("store_unavailable", hub_id)

        if self.scope == "hub":
            return
        # no_agents (in cluster mode about the whole fleet, whichever hub leads)
        known = len(registry.records)
        if self.scope == "all":
            connected, subject = registry.connected, hub_id
        else:
            connected, subject = registry.counts["online"] + registry.counts["stale"], "cluster"
        if connected == 0 and known >= max(1, config.alert_expected_agents):
            self._raise("no_agents", "critical", subject, f"no agent connected ({known} known)")
        else:
            self._resolve("no_agents", subject)

        # mass_disconnect, per region
        window = config.alert_mass_disconnect_window
        sizes: dict[str, int] = {}
        for drops_region in self._region_drops:
            sizes[drops_region] = 0
        if self._region_drops:
            for record in registry.records.values():
                region = record.region or "(none)"
                if region in sizes:
                    sizes[region] += 1
        storming: set[str] = set()
        for region, drops in list(self._region_drops.items()):
            while drops and drops[0] < now - window:
                drops.popleft()
            threshold = max(
                config.alert_mass_disconnect_count,
                int(config.alert_mass_disconnect_share * sizes.get(region, 0)),
            )
            if len(drops) >= threshold:
                storming.add(region)
                self._raise(
                    "mass_disconnect",
                    "critical",
                    region,
                    f"{len(drops)} agents of region {region} disconnected within {window:g} s",
                )
            elif not drops:
                del self._region_drops[region]
        for key in list(self.open):
            if key[0] == "mass_disconnect" and key[1] not in storming:
                region = key[1]
                offline = sum(
                    1
                    for r in registry.records.values()
                    if (r.region or "(none)") == region
                    and r.state == "offline"
                    and r.agent_id in self.offline_since
                )
                if offline < config.alert_mass_disconnect_count:
                    self._resolve("mass_disconnect", region)

        # agent_offline, held back for regions under a mass disconnect
        held = {key[1] for key in self.open if key[0] == "mass_disconnect"}
        grace = config.alert_offline_grace
        for agent_id, since in list(self.offline_since.items()):
            record = registry.records.get(agent_id)
            if record is None or record.state != "offline":
                self.offline_since.pop(agent_id, None)
                continue
            if now - since >= grace and (record.region or "(none)") not in held:
                self._raise(
                    "agent_offline",
                    "warning",
                    agent_id,
                    f"agent {agent_id} offline for more than {grace:g} s",
                )

        # agent_flapping
        flap_window = config.alert_flapping_window
        for agent_id, connects in list(self._connects.items()):
            while connects and connects[0] < now - flap_window:
                connects.popleft()
            if len(connects) >= config.alert_flapping_reconnects:
                self._raise(
                    "agent_flapping",
                    "warning",
                    agent_id,
                    f"agent {agent_id} reconnected {len(connects)} times in {flap_window:g} s",
                )
            elif not connects:
                del self._connects[agent_id]
                self._resolve("agent_flapping", agent_id)
            elif len(connects) < config.alert_flapping_reconnects // 2 + 1:
                self._resolve("agent_flapping", agent_id)

        # agent_conflict clears once a window passes without takeovers
        for agent_id, last in list(self._takeovers.items()):
            if now - last > config.alert_conflict_window:
                del self._takeovers[agent_id]
                self._resolve("agent_conflict", agent_id)

        # hub_down (cluster mode): resolved when the hub is back or its agents are elsewhere
        for down_hub in list(self.hubs_down):
            stranded = sum(
                1
                for r in registry.records.values()
                if r.hub_id == down_hub and r.state == "unknown"
            )
            if not stranded:
                self.hub_up(down_hub)

    # -- cluster mode --------------------------------------------------------------------

    def hub_down(self, hub_id: str) -> None:
        """A hub stopped renewing its lease: raised once, by the leader."""
        self.hubs_down.setdefault(hub_id, time.monotonic())
        stranded = sum(1 for r in self.registry.records.values() if r.hub_id == hub_id)
        self._raise(
            "hub_down",
            "critical",
            hub_id,
            f"hub {hub_id} stopped reporting; its {stranded} agents are unknown until they "
            "register elsewhere",
        )

    def hub_up(self, hub_id: str) -> None:
        self.hubs_down.pop(hub_id, None)
        self._resolve("hub_down", hub_id)

    def data_lost(self, message: str) -> None:
        self._raise("redis_data_lost", "critical", self.hub_id, message)

    def forget_fleet_alerts(self) -> None:
        """No longer the leader: the fleet's alerts are the next leader's to judge."""
        mine = {"connection_failures", "capacity"}
        for key in [k for k in self.open if k[0] not in mine or k[1] != self.hub_id]:
            del self.open[key]

    # -- lifecycle -----------------------------------------------------------------------

    def _raise(self, rule: str, severity: str, subject: str, message: str) -> None:
        now = time.time()
        alert = self.open.get((rule, subject))
        if alert is not None:
            alert.last_seen = now
            alert.message = message
            return
        alert = AlertRecord(
            alert_id=secrets.token_hex(8),
            rule=rule,
            severity=severity,
            subject=subject,
            first_seen=now,
            last_seen=now,
            message=message,
        )
        self.open[alert.key] = alert
        self.auditor.record("alert.raised", subject=alert.alert_id, rule=rule, about=subject)
        self._save_and_announce(alert, "raised")

    def _resolve(self, rule: str, subject: str) -> None:
        alert = self.open.pop((rule, subject), None)
        if alert is None:
            return
        alert.state = "resolved"
        alert.resolved_at = alert.last_seen = time.time()
        self.auditor.record("alert.resolved", subject=alert.alert_id, rule=rule, about=subject)
        self._save_and_announce(alert, "resolved")

    async def acknowledge(
        self, alert_id: str, actor: str, comment: str | None
    ) -> dict[str, Any] | None:
        alert = next((a for a in self.open.values() if a.alert_id == alert_id), None)
        if alert is None:
            return None
        before = (alert.state, alert.acknowledged_by, alert.acknowledged_at, alert.comment)
        alert.state = "acknowledged"
        alert.acknowledged_by = actor
        alert.acknowledged_at = time.time()
        alert.comment = comment
        try:
            await self.store.save_alert(alert)
        except StoreUnavailable:
            # Not stored, so not acknowledged.
            alert.state, alert.acknowledged_by, alert.acknowledged_at, alert.comment = before
            raise
        self.auditor.record("alert.acknowledged", actor=actor, subject=alert_id)
        view = alert.view()
        self.bus.publish("alerts", "acknowledged", alert.alert_id, alert=view)
        return view

    def _saved(self, alert_id: str, task: asyncio.Future[Any]) -> None:
        if self._saving.get(alert_id) is task:
            del self._saving[alert_id]

    def _save_and_announce(self, alert: AlertRecord, kind: str) -> None:
        """Store the alert as it stands, then announce this change. A store that cannot
        write now (``store_unavailable`` itself is raised while it cannot) is tried again
        until it can; the saves of one alert go in order, so that ``resolved`` never
        precedes ``raised``."""
        view = alert.view()
        previous = self._saving.get(alert.alert_id)

        async def save() -> None:
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            delay = ALERT_RETRY_FIRST
            while True:
                try:
                    await self.store.save_alert(alert)
                    break
                except StoreUnavailable as exc:
                    if delay == ALERT_RETRY_FIRST:
                        log.error(
                            "could not store alert %s (trying again): %s", alert.alert_id, exc
                        )
                await asyncio.sleep(delay)
                delay = min(ALERT_RETRY_MAX, delay * 2)
            self.bus.publish("alerts", kind, alert.alert_id, alert=view)

        task = asyncio.ensure_future(save())
        self._saving[alert.alert_id] = task
        task.add_done_callback(
            lambda t: (
                self._saving.pop(alert.alert_id, None)
                if self._saving.get(alert.alert_id) is t
                else None
            )
        )
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
