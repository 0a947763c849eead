"""The fleet as this hub sees it: its own agents first hand, the others' from their hubs.

Every hub keeps a record of every agent (a console on any hub sees the whole fleet, and a
selector on any hub targets it). Records of agents held elsewhere change with the events
their hubs publish; an event carries the generation of the connection it is about, and an
event about an older connection than the record already knows is ignored (so a superseded
hub's late "disconnected" never hides the agent's newer connection elsewhere). When a hub's
lease lapses, its agents become ``unknown`` — their hub vanished, not necessarily they —
until they register elsewhere. When events were missed, the fleet is re-read from Redis.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from ..model import AgentRecord
from ..protocol.states import AgentState
from ..protocol.times import parse_time
from ..registry import Registry
from .ownership import Owner

log = logging.getLogger(__name__)

__all__ = ["Mirror"]

ONLINE, STALE = AgentState.ONLINE.value, AgentState.STALE.value
OFFLINE, UNKNOWN = AgentState.OFFLINE.value, AgentState.UNKNOWN.value
_LIVE = frozenset({ONLINE, STALE})


def _time(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return parse_time(text)
    except ValueError:
        return None


class Mirror:
    def __init__(
        self,
        registry: Registry,
        hub_id: str,
        announce: Callable[[AgentRecord, str], None],
    ) -> None:
        self.registry = registry
        self.hub_id = hub_id
        #: Tell this hub's consoles about a change the mirror made itself (hub down).
        self.announce = announce

    def apply(self, event: dict[str, Any]) -> None:
        """An agent event from another hub."""
        if event.get("topic") != "agents":
            return
        view = event.get("agent")
        if not isinstance(view, dict) or not isinstance(view.get("agent_id"), str):
            return
        agent_id = view["agent_id"]
        generation = event.get("gen")
        generation = generation if isinstance(generation, int) else 0
        record = self.registry.records.get(agent_id)
        if record is None:
            record = AgentRecord(
                agent_id=agent_id, first_seen=_time(view.get("connected_at")) or 0.0
            )
            self.registry.add(record)
        elif generation < record.generation:
            return  # about a connection older than the one this hub knows
        if agent_id in self.registry.live and generation <= record.generation:
            return  # this hub holds the agent's newest connection: its own state wins
        self._update(record, view)
        record.generation = generation
        state = view.get("state")
        if state in (ONLINE, STALE, OFFLINE, UNKNOWN):
            self.registry.set_state(record, state)

    def _update(self, record: AgentRecord, view: dict[str, Any]) -> None:
        record.platform = str(view.get("platform") or "")
        record.region = str(view.get("region") or "")
        record.version = str(view.get("version") or "")
        record.hostname = str(view.get("hostname") or "")
        labels = view.get("labels")
        record.labels = dict(labels) if isinstance(labels, dict) else {}
        capabilities = view.get("capabilities")
        record.capabilities = tuple(capabilities) if isinstance(capabilities, list) else ()
        location = view.get("location")
        if isinstance(location, dict):
            record.location = (float(location.get("lat", 0)), float(location.get("lon", 0)))
        status = view.get("status")
        record.status = status if isinstance(status, str) else None
        hub_id = view.get("hub_id")
        record.hub_id = hub_id if isinstance(hub_id, str) else None
        record.connected_at = _time(view.get("connected_at"))
        record.last_seen = _time(view.get("last_seen"))
        metrics = view.get("metrics")
        record.metrics = metrics if isinstance(metrics, dict) else {}
        self.registry.share(record)

    def hub_down(self, hub_id: str) -> int:
        """A hub's lease lapsed: its agents are ``unknown`` until they register elsewhere."""
        changed = 0
        for record in self.registry.records.values():
            if record.hub_id == hub_id and record.state in _LIVE:
                if record.agent_id in self.registry.live:
                    continue
                self.registry.set_state(record, UNKNOWN)
                self.announce(record, "updated")
                changed += 1
        return changed

    def reload(
        self,
        records: Iterable[AgentRecord],
        owners: dict[str, Owner],
        live_hubs: Iterable[str],
    ) -> None:
        """Re-read the fleet (events were missed, or at start): records from the store,
        connection state from the owners and the hubs' leases."""
        live = set(live_hubs)
        registry = self.registry
        for stored in records:
            agent_id = stored.agent_id
            if agent_id in registry.live:
                continue  # ours: first hand
            record = registry.records.get(agent_id)
            if record is None:
                registry.add(stored)
                record = stored
            elif record is not stored:
                self._copy(stored, record)
            owner = owners.get(agent_id)
            if owner is None:
                state = OFFLINE
            elif owner.hub_id in live:
                state = record.state if record.state in _LIVE else ONLINE
                record.hub_id = owner.hub_id
                record.generation = max(record.generation, owner.generation)
            else:
                state = UNKNOWN
                record.hub_id = owner.hub_id
            registry.set_state(record, state)

    @staticmethod
    def _copy(source: AgentRecord, target: AgentRecord) -> None:
        for name in (
            "platform", "region", "version", "hostname", "labels", "capabilities", "location",
            "enrolled_by", "first_seen",
        ):  # fmt: skip
            setattr(target, name, getattr(source, name))
