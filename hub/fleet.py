"""Agents joining, beating and leaving: what a registration means beyond its connection.

An :class:`~hub.agent_session.AgentSession` parses an agent's messages; this module decides
what they do to the fleet: whether an identity may register (its credential's bindings,
revocation, enrollment), installing the newest connection of an id and superseding the
older one, the agent's record and its rows in the store, the announcements on the bus,
the ledger's deliveries, and the sweep that finds agents gone silent. In cluster mode the
registry behind it holds ownership across hubs; sessions do not change.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from .audit import Auditor
from .auth import Credentials, Principal
from .bus import Bus
from .config import HubConfig
from .ledger import Ledger
from .metrics import Metrics
from .model import AgentRecord, CredentialRecord
from .probe import answer_probe, identity_problem
from .protocol.constants import Close
from .protocol.messages import Heartbeat, Probe, ProbeResult, Register
from .protocol.states import AgentState
from .protocol.times import format_time
from .registry import LiveSession, Registry
from .store.base import Store, StoreUnavailable

log = logging.getLogger(__name__)

__all__ = ["AgentEvents", "Fleet", "Member"]

ONLINE, STALE = AgentState.ONLINE.value, AgentState.STALE.value
OFFLINE, UNKNOWN = AgentState.OFFLINE.value, AgentState.UNKNOWN.value
#: Takeovers of distinct ids remembered at most; older quiet ones are forgotten first.
TAKEOVER_IDS = 10_000


class Member(LiveSession, Protocol):
    """What the fleet needs of an agent's connection."""

    principal: Principal
    record: AgentRecord | None

    @property
    def peer(self) -> str: ...


class AgentEvents:
    """Announcements about agents, coalesced per agent id in subscriber queues."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    def agent(self, record: AgentRecord, kind: str, **extra: Any) -> None:
        if self.bus.wants("agents", kind):
            if record.generation:
                extra["gen"] = record.generation  # cluster mode: which connection it is about
            self.bus.publish("agents", kind, record.agent_id, agent=record.view(), **extra)


class Fleet:
    def __init__(
        self,
        config: HubConfig,
        hub_id: str,
        registry: Registry,
        store: Store,
        bus: Bus,
        auditor: Auditor,
        metrics: Metrics,
        credentials: Credentials,
        ledger: Ledger,
        on_takeover: Callable[[str, int], None] = lambda agent_id, recent: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.hub_id = hub_id
        self.registry = registry
        self.store = store
        self.events = AgentEvents(bus)
        self.auditor = auditor
        self.metrics = metrics
        self.credentials = credentials
        self.ledger = ledger
        #: Told (agent id, takeovers within the window) at every takeover: the alerts.
        self.on_takeover = on_takeover
        self.clock = clock
        self.started_at = clock()
        interval = config.heartbeat_interval
        #: The interval as the welcome states it (an integer when it is one).
        self.heartbeat_interval_wire: float = (
            int(interval) if interval == int(interval) else interval
        )
        self._takeovers: dict[str, deque[float]] = {}
        self._last_sample = 0.0

    # -- may it register? ----------------------------------------------------------------

    def identity_problem(self, principal: Principal, message: Register) -> str:
        """Why ``principal`` may not register as ``message`` says ('' when it may)."""
        return identity_problem(
            principal,
            message.agent_id,
            message.region,
            message.platform,
            self.credentials,
            self.registry.records,
        )

    def probe(self, principal: Principal, probe: Probe) -> ProbeResult:
        """What a ``register`` would meet, answered without changing anything."""
        return answer_probe(
            principal,
            probe,
            self.credentials,
            self.registry,
            self.config.max_agents,
            self.hub_id,
            self.heartbeat_interval_wire,
        )

    def full(self, agent_id: str) -> bool:
        """At the agent limit, for an id that is not already connected (takeovers pass)."""
        live = self.registry.live
        return agent_id not in live and len(live) >= self.config.max_agents

    async def enroll(
        self, principal: Principal, agent_id: str
    ) -> tuple[bool | None, CredentialRecord, str]:
        """Issue ``agent_id`` its own agent key through an enrollment key, replacing keys it
        got the same way before. ``(ok, issued, token)``; ok is None when the store could
        not take it, False when the key is exhausted, expired or revoked."""
        credentials = self.credentials
        enroll_id = principal.credential_id
        assert enroll_id is not None
        record = self.registry.records.get(agent_id)
        replaced = credentials.enrollment_keys_of(agent_id) if record else []
        issued, token = credentials.make(
            "agent", agent_id=agent_id, issued_by=f"enroll:{enroll_id}"
        )
        try:
            ok: bool | None = await self.store.enroll(enroll_id, agent_id, issued, replaced)
        except StoreUnavailable:
            ok = None
        if ok:
            credentials.enrolled(
                enroll_id,
                issued,
                replaced,
                new_id=record is None or record.enrolled_by != enroll_id,
            )
            self.auditor.record(
                "credential.issued",
                actor=f"enroll:{enroll_id}",
                subject=issued.id,
                agent_id=agent_id,
                replaced=replaced,
            )
        return ok, issued, token

    # -- joining and leaving -------------------------------------------------------------

    def join(
        self,
        member: Member,
        message: Register,
        agent_key: str | None = None,
        enrolled_by: str | None = None,
    ) -> dict[str, Any]:
        """Install ``member`` as the live connection of its agent id; the ``welcome``.

        A connection already live for the id is superseded (closed 4001, audited, counted
        for ``agent_conflict``). The caller sends the welcome, then calls :meth:`joined`.
        """
        registry = self.registry
        now = self.clock()
        record, new = registry.register(message, now)
        if enrolled_by is not None:
            record.enrolled_by = enrolled_by
        member.record = record
        previous = registry.install(member)
        if previous is not None:
            self._takeover(member.agent_id, member.peer)
            previous.close(Close.SUPERSEDED, "superseded by a newer connection")
        elif not new:
            self.metrics.reconnects += 1
        self.metrics.connected()
        record.connected_at = now
        record.last_seen = now
        record.hub_id = self.hub_id
        record.status = "ok"
        record.metrics = {}
        registry.set_state(record, ONLINE)
        self.store.save_agent(record)
        self.store.open_session(
            member.session_id,
            member.agent_id,
            self.hub_id,
            member.peer,
            member.principal.credential_id,
            now,
        )
        self.auditor.record(
            "agent.connect",
            actor=member.principal.actor,
            subject=member.agent_id,
            source=member.peer,
            session_id=member.session_id,
            new=new,
        )
        welcome: dict[str, Any] = {
            "type": "welcome",
            "hub_id": self.hub_id,
            "session_id": member.session_id,
            "heartbeat_interval": self.heartbeat_interval_wire,
            "server_time": format_time(now),
        }
        if agent_key is not None:
            welcome["agent_key"] = agent_key
        return welcome

    def joined(self, member: Member) -> None:
        """After the welcome: announce the agent and deliver what waits for it."""
        assert member.record is not None
        self.events.agent(member.record, "connected")
        self.ledger.agent_connected(member.agent_id)

    def leave(self, member: Member, code: int, reason: str) -> None:
        """A registered connection closed. Only the live one takes the agent offline: a
        superseded connection's late clean-up leaves the newer one alone."""
        record = member.record
        assert record is not None
        self.store.close_session(member.session_id, self.clock(), code, reason)
        self.auditor.record(
            "agent.disconnect",
            actor=f"agent:{member.agent_id}",
            subject=member.agent_id,
            source=member.peer,
            code=code,
            reason=reason,
        )
        if self.registry.remove(member):
            self._gone(member, code)

    def _gone(self, member: Member, code: int) -> None:
        """The agent's live connection ended: it is offline (in cluster mode, once its
        claim is given back)."""
        record = member.record
        assert record is not None
        record.connected_at = None
        self.registry.set_state(record, OFFLINE)
        self.ledger.agent_disconnected(member.agent_id)
        self.store.save_agent(record)
        self.events.agent(record, "disconnected", code=code)

    def _takeover(self, agent_id: str, peer: str) -> None:
        now = time.monotonic()
        window = self.config.alert_conflict_window
        takeovers = self._takeovers.setdefault(agent_id, deque(maxlen=32))
        takeovers.append(now)
        while takeovers and takeovers[0] < now - window:
            takeovers.popleft()
        self.auditor.record("agent.takeover", subject=agent_id, source=peer, recent=len(takeovers))
        self.on_takeover(agent_id, len(takeovers))
        if len(self._takeovers) > TAKEOVER_IDS:
            for key in [k for k, v in self._takeovers.items() if not v or v[-1] < now - window]:
                del self._takeovers[key]

    # -- while connected -----------------------------------------------------------------

    def heartbeat(self, record: AgentRecord, message: Heartbeat) -> None:
        """Memory at once; the store in the next batch (:meth:`flush_heartbeats`)."""
        record.metrics = message.metrics
        status = message.status
        if status != record.status:
            if status == "draining" or record.status == "draining":
                self.ledger.set_draining(record.agent_id, status == "draining")
            record.status = status
        record.dirty = True
        kind = "heartbeat"
        if record.state != ONLINE:
            self.registry.set_state(record, ONLINE)
            kind = "updated"  # back from stale: a change every hub must see, not a beat
        self.events.agent(record, kind)

    def flush_heartbeats(self, force: bool = False) -> None:
        """Hand the heartbeats that changed since the last batch to the store (and, once a
        sample interval has passed, their history rows)."""
        now = self.clock()
        samples = now - self._last_sample >= self.config.heartbeat_sample_interval
        dirty = [r for r in self.registry.records.values() if r.dirty]
        if not dirty and not force:
            return
        for record in dirty:
            record.dirty = False
        if samples:
            self._last_sample = now
        self.store.save_heartbeats(dirty, samples)

    def _sweep_connections(self, now: float, interval: float) -> None:
        """This hub's connections: stale after two silent intervals, closed after three."""
        for member in list(self.registry.live.values()):
            record = member.record  # type: ignore[attr-defined]
            if record is None or record.last_seen is None:
                continue
            silence = now - record.last_seen
            if silence > 3 * interval:
                member.close(Close.GOING_AWAY, "heartbeat timeout")
            elif silence > 2 * interval and record.state == ONLINE:
                self.registry.set_state(record, STALE)
                self.events.agent(record, "updated")

    def sweep(self) -> None:
        """Stale after two silent heartbeat intervals, closed (1001) after three; agents
        whose hub vanished (``unknown`` since a crash) go ``offline`` after a grace."""
        now = self.clock()
        interval = self.config.heartbeat_interval
        registry = self.registry
        self._sweep_connections(now, interval)
        grace = max(60.0, 3 * interval + self.config.reconnect_spread_ms / 1000)
        if now - self.started_at > grace and registry.counts[UNKNOWN]:
            for record in registry.records.values():
                if record.state == UNKNOWN:
                    record.connected_at = None
                    registry.set_state(record, OFFLINE)
                    self.events.agent(record, "updated")
