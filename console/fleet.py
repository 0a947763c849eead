"""The console's one model of the fleet: every view reads it, nothing else holds fleet state.

What the hub says arrives as a snapshot (the ``subscribe`` reply, or a ``snapshot`` after
``resync``) and then as events. The model applies each at once to its own dictionaries,
but tells the views only in **batches**: the changes of an interval are gathered in one
:class:`Changes` object and :attr:`FleetModel.changed` is emitted at most
:data:`MAX_BATCHES_PER_SECOND` times a second. A flood of a thousand heartbeats a second
thus costs each view ten repaints a second, not a thousand, and a view that needs a full
rebuild (a snapshot replaced the fleet) is told so by ``Changes.reset``.

Everything is validated with the protocol's own models (``hub.protocol.messages``); an
object that does not validate is dropped and counted, never shown half-parsed.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PySide6.QtCore import QObject, QTimer, Signal

from hub.protocol.messages import AgentView, AlertView, CommandView, JobView, ValidationError
from hub.protocol.times import parse_time

log = logging.getLogger(__name__)

__all__ = [
    "CONDITIONS",
    "CONDITION_RANK",
    "MAX_BATCHES_PER_SECOND",
    "Agent",
    "Changes",
    "FleetModel",
    "HubInfo",
    "MetricsHistory",
    "condition_of",
]

#: The model tells its views about changes at most this often.
MAX_BATCHES_PER_SECOND = 10
BATCH_INTERVAL = 1.0 / MAX_BATCHES_PER_SECOND

#: What the console shows per agent, best first. ``degraded`` is an online agent that
#: reports ``degraded`` or ``draining`` itself; the others are the hub's states.
CONDITIONS = ("online", "unknown", "degraded", "stale", "offline")
CONDITION_RANK = {name: rank for rank, name in enumerate(CONDITIONS)}

#: Metrics ticks kept for the graphs (about one a second: the last hour).
HISTORY_SECONDS = 3600
#: Recent commands kept for the job and detail views (oldest dropped first).
MAX_COMMANDS = 50_000
#: Resolved alerts kept in the history.
MAX_RESOLVED = 1_000
#: Live output chunks kept per command (the hub has them all: ``output`` request).
MAX_OUTPUT_CHUNKS = 2_000


def condition_of(state: str, status: str | None) -> str:
    if state == "online" and status in ("degraded", "draining"):
        return "degraded"
    return state if state in CONDITION_RANK else "unknown"


def _time_or_none(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return parse_time(text)
    except ValueError:
        return None


class Agent:
    """One agent as the views need it: the hub's view plus a few derived, cached fields."""

    __slots__ = ("_text", "condition", "connected_at", "last_seen", "rank", "view")

    def __init__(self, view: AgentView) -> None:
        self.view = view
        self.condition = condition_of(view.state, view.status)
        self.rank = CONDITION_RANK[self.condition]
        self.last_seen = _time_or_none(view.last_seen)
        self.connected_at = _time_or_none(view.connected_at)
        self._text: str | None = None

    @property
    def agent_id(self) -> str:
        return self.view.agent_id

    @property
    def search_text(self) -> str:
        """Lower-case text that free-text filtering searches (built once per update)."""
        if self._text is None:
            v = self.view
            labels = " ".join(f"{k}={val}" for k, val in v.labels.items())
            self._text = " ".join(
                (v.agent_id, v.hostname, v.region, v.platform, v.version, v.hub_id or "", labels)
            ).casefold()
        return self._text


@dataclass(frozen=True, slots=True)
class HubInfo:
    """One hub of a cluster as the console shows it (``stats.cluster.hubs``, docs/protocol.md).

    ``state`` is ``up`` (its lease lives) or ``down`` (its lease lapsed, or its agents are
    ``unknown``, or a ``hub_down`` alert names it); ``agents`` is what the hub says it holds,
    ``max_agents`` its limit (the load is their ratio), ``lag_ms`` its event loop's lag.
    """

    hub_id: str
    state: str = "up"
    agents: int = 0
    leader: bool = False
    lag_ms: float | None = None
    max_agents: int | None = None

    @property
    def load(self) -> float | None:
        """Share of the hub's agent limit in use, or None when it has none."""
        if not self.max_agents:
            return None
        return self.agents / self.max_agents


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def parse_cluster(raw: Any) -> tuple[str | None, dict[str, HubInfo], str | None]:
    """``stats.cluster`` into (Redis state, hubs by id, the hub that sent it); hostile or
    missing parts dropped."""
    if not isinstance(raw, dict):
        return None, {}, None
    redis = raw.get("redis")
    hubs: dict[str, HubInfo] = {}
    entries = raw.get("hubs")
    for hub_id, entry in entries.items() if isinstance(entries, dict) else ():
        if not isinstance(hub_id, str) or not hub_id or len(hub_id) > 128:
            continue
        if not isinstance(entry, dict):
            continue
        agents = _number(entry.get("agents"))
        limit = _number(entry.get("max_agents"))
        hubs[hub_id] = HubInfo(
            hub_id,
            "down" if entry.get("state") == "down" else "up",
            max(0, int(agents)) if agents is not None else 0,
            entry.get("leader") is True,
            _number(entry.get("lag_ms")),
            int(limit) if limit is not None and limit > 0 else None,
        )
    sender = raw.get("hub_id")
    sender = sender if isinstance(sender, str) and 0 < len(sender) <= 128 else None
    return (redis if redis in ("up", "down") else "unknown"), hubs, sender


@dataclass
class Changes:
    """What changed since the last batch. Views read the model itself for the values."""

    reset: bool = False
    agents: set[str] = field(default_factory=set)
    alerts: bool = False
    commands: dict[str, CommandView] = field(default_factory=dict)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    metrics: bool = False
    jobs: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(
            self.reset
            or self.agents
            or self.alerts
            or self.commands
            or self.outputs
            or self.metrics
            or self.jobs
        )


class MetricsHistory:
    """The ``metrics`` ticks of the last hour as column arrays (for pyqtgraph)."""

    FIELDS = (
        "online",
        "stale",
        "offline",
        "unknown",
        "connects_per_min",
        "disconnects_per_min",
        "auth_failures_per_min",
        "commands_in_flight",
        "rtt_p50_ms",
        "rtt_p99_ms",
    )

    def __init__(self, capacity: int = HISTORY_SECONDS + 60) -> None:
        self.capacity = capacity
        self._t = np.full(capacity, np.nan)
        self._data = {name: np.full(capacity, np.nan) for name in self.FIELDS}
        self._next = 0
        self._size = 0
        self.latest: dict[str, Any] = {}

    def __len__(self) -> int:
        return self._size

    def clear(self) -> None:
        self._t[:] = np.nan
        for array in self._data.values():
            array[:] = np.nan
        self._next = self._size = 0

    def append(self, t: float, stats: dict[str, Any]) -> None:
        self.latest = stats
        agents = stats.get("agents") or {}
        values = {}
        for name in self.FIELDS:
            value = (
                agents.get(name)
                if name in ("online", "stale", "offline", "unknown")
                else (stats.get(name))
            )
            values[name] = float(value) if isinstance(value, int | float) else np.nan
        self._put(t, values)

    def _put(self, t: float, values: dict[str, float]) -> None:
        i = self._next
        self._t[i] = t
        for name, array in self._data.items():
            array[i] = values[name]
        self._next = (i + 1) % self.capacity
        self._size = min(self._size + 1, self.capacity)

    def prepend(self, ticks: list[tuple[float, dict[str, Any]]]) -> int:
        """Put older ticks (the hub's history) before those already here; how many went in.

        Ticks at or after the oldest one here are dropped: the live ticks already cover them.
        """
        order = self._order()
        kept_t = self._t[order].copy()
        kept = {name: array[order].copy() for name, array in self._data.items()}
        oldest = kept_t[0] if len(kept_t) else np.inf
        older = sorted((t, stats) for t, stats in ticks if t < oldest - 0.5)
        room = self.capacity - len(kept_t)
        older = older[-room:] if room > 0 else []
        latest = self.latest
        self.clear()
        for t, stats in older:
            self.append(t, stats)
        for i, t in enumerate(kept_t):
            self._put(t, {name: values[i] for name, values in kept.items()})
        self.latest = latest or (older[-1][1] if older else {})
        return len(older)

    def _order(self) -> np.ndarray:
        if self._size < self.capacity:
            return np.arange(self._size)
        return (np.arange(self.capacity) + self._next) % self.capacity

    def series(self, name: str, since: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(t, values)`` in time order, optionally only ticks at or after ``since``."""
        order = self._order()
        t = self._t[order]
        v = self._data[name][order]
        if since is not None:
            keep = t >= since
            t, v = t[keep], v[keep]
        return t, v


class FleetModel(QObject):
    """Agents keyed by id, alerts, recent commands and jobs, the last hour of metrics."""

    changed = Signal(object)  # Changes, at most MAX_BATCHES_PER_SECOND times a second

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.agents: dict[str, Agent] = {}
        self.counts: dict[str, int] = dict.fromkeys(CONDITIONS, 0)
        self.open_alerts: dict[str, AlertView] = {}
        self.resolved_alerts: deque[AlertView] = deque(maxlen=MAX_RESOLVED)
        self.commands: OrderedDict[str, CommandView] = OrderedDict()
        self.outputs: dict[str, list[dict[str, Any]]] = {}
        self.jobs: dict[str, JobView] = {}
        self.last_rtt_ms: dict[str, float] = {}
        self.history = MetricsHistory()
        self.stats: dict[str, Any] = {}
        self.hubs: dict[str, int] = {}
        #: Cluster mode only (``stats.cluster``): Redis's state and each hub's lease.
        self.redis_state: str | None = None
        self.cluster: dict[str, HubInfo] = {}
        #: The hub this console is on, when its ticks say (cluster mode).
        self.this_hub: str | None = None
        self.snapshot_count = 0
        self.events_total = 0
        self.invalid_total = 0
        self.batches_emitted = 0
        self._pending = Changes()
        self._last_emit = 0.0
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self.flush)

    # -- reading -------------------------------------------------------------------------

    def agent(self, agent_id: str) -> Agent | None:
        return self.agents.get(agent_id)

    @property
    def total(self) -> int:
        return len(self.agents)

    @property
    def is_cluster(self) -> bool:
        """The hub runs in cluster mode (its ticks carry ``stats.cluster``)."""
        return self.redis_state is not None

    def hub_infos(self) -> dict[str, HubInfo]:
        """Every hub of the cluster, by id: those the ticks report, and those that only the
        fleet still names (agents ``unknown`` under them, or an open ``hub_down``), which
        are down. Empty on a single hub."""
        if not self.is_cluster:
            return {}
        infos = dict(self.cluster)
        named = {a.subject for a in self.open_alerts.values() if a.rule == "hub_down"}
        named.update(a.view.hub_id for a in self.agents.values() if a.condition == "unknown")
        for hub_id in named:
            if hub_id and hub_id not in infos:  # the tick's word wins: its lease is fresh
                infos[hub_id] = HubInfo(hub_id, "down")
        return dict(sorted(infos.items()))

    # -- input: snapshots ----------------------------------------------------------------

    def apply_snapshot(self, data: dict[str, Any]) -> None:
        """Replace the model with what a ``subscribe`` reply or ``snapshot`` carries."""
        if not isinstance(data, dict):
            return
        self.snapshot_count += 1
        if "agents" in data:
            self.agents = {}
            self.counts = dict.fromkeys(CONDITIONS, 0)
            for raw in data.get("agents") or ():
                self._set_agent(raw)
        if "alerts" in data:
            self.open_alerts = {}
            for raw in data.get("alerts") or ():
                alert = self._validate(AlertView, raw)
                if alert is not None and alert.state != "resolved":
                    self.open_alerts[alert.alert_id] = alert
        if "commands" in data:
            for raw in reversed(data.get("commands") or ()):
                command = self._validate(CommandView, raw)
                if command is not None:
                    self._set_command(command)
        if "metrics" in data and isinstance(data["metrics"], dict):
            self._set_stats(data["metrics"], append=False)
        # A snapshot's objects live long: keep them out of the cyclic GC's full collections,
        # which otherwise stall the event loop for 100+ ms at 10,000 agents.
        gc.freeze()
        pending = self._pending
        pending.reset = True
        pending.agents.clear()
        self._schedule(now=True)

    # -- input: events -------------------------------------------------------------------

    def apply_events(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            self.apply_event(event)

    def apply_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "snapshot":
            self.apply_snapshot(event.get("data") or {})
            return
        if kind != "event":
            return  # "resync" is only the announcement; the snapshot that follows counts
        self.events_total += 1
        topic = event.get("topic")
        if topic == "agents":
            agent_id = self._set_agent(event.get("agent"))
            if agent_id is not None and not self._pending.reset:
                self._pending.agents.add(agent_id)
        elif topic == "commands":
            if event.get("kind") == "output":
                self._add_output(event)
            else:
                command = self._validate(CommandView, event.get("command"))
                if command is not None:
                    self._set_command(command)
                    self._pending.commands[command.command_id] = command
                    self._pending.jobs.add(command.job_id)
        elif topic == "alerts":
            alert = self._validate(AlertView, event.get("alert"))
            if alert is not None:
                self._set_alert(alert)
                self._pending.alerts = True
        elif topic == "metrics":
            stats = event.get("stats")
            if isinstance(stats, dict):
                self._set_stats(stats, append=True)
        else:
            return
        self._schedule()

    # -- input: request replies ----------------------------------------------------------

    def set_jobs(self, jobs: list[dict[str, Any]]) -> None:
        for raw in jobs:
            job = self._validate(JobView, raw)
            if job is not None:
                self.jobs[job.job_id] = job
                self._pending.jobs.add(job.job_id)
        self._schedule()

    def set_job(self, raw_job: dict[str, Any], commands: list[dict[str, Any]]) -> JobView | None:
        job = self._validate(JobView, raw_job)
        if job is None:
            return None
        self.jobs[job.job_id] = job
        for raw in commands:
            command = self._validate(CommandView, raw)
            if command is not None:
                self._set_command(command, announce=False)
        self._pending.jobs.add(job.job_id)
        self._schedule()
        return job

    def set_resolved_alerts(self, alerts: list[dict[str, Any]]) -> None:
        known = {a.alert_id for a in self.resolved_alerts}
        for raw in reversed(alerts):
            alert = self._validate(AlertView, raw)
            if alert is not None and alert.state == "resolved" and alert.alert_id not in known:
                self.resolved_alerts.appendleft(alert)
        self._pending.alerts = True
        self._schedule()

    def set_alert(self, raw: dict[str, Any]) -> None:
        """An alert from a reply (``ack_alert``); events would bring it too, a bit later."""
        alert = self._validate(AlertView, raw)
        if alert is not None:
            self._set_alert(alert)
            self._pending.alerts = True
            self._schedule()

    def set_output(self, command_id: str, chunks: list[dict[str, Any]]) -> None:
        """Stored output of one command (``output`` reply) replaces what events brought."""
        clean = [
            {"seq": c.get("seq", 0), "stream": str(c.get("stream", "")), "data": str(c["data"])}
            for c in chunks
            if isinstance(c, dict) and isinstance(c.get("data"), str)
        ]
        clean.sort(key=lambda c: c["seq"] if isinstance(c["seq"], int) else 0)
        self.outputs[command_id] = clean[-MAX_OUTPUT_CHUNKS:]

    def commands_of_job(self, job_id: str) -> list[CommandView]:
        return [c for c in self.commands.values() if c.job_id == job_id]

    # -- batching ------------------------------------------------------------------------

    def _schedule(self, now: bool = False) -> None:
        if self._timer.isActive():
            return
        wait = self._last_emit + BATCH_INTERVAL - time.monotonic()
        self._timer.start(max(0, int(wait * 1000) + 1))

    def flush(self) -> None:
        """Emit the gathered changes now (tests and the screenshot mode call this)."""
        self._timer.stop()
        changes = self._pending
        if not changes:
            return
        self._pending = Changes()
        self._last_emit = time.monotonic()
        self.batches_emitted += 1
        self.changed.emit(changes)

    # -- internals -----------------------------------------------------------------------

    def _validate(self, model: Any, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return None
        try:
            return model.model_validate(raw)
        except ValidationError as exc:
            self.invalid_total += 1
            log.debug("dropping invalid %s: %s", model.__name__, exc)
            return None

    def _set_agent(self, raw: Any) -> str | None:
        view = self._validate(AgentView, raw)
        if view is None:
            return None
        agent = Agent(view)
        old = self.agents.get(view.agent_id)
        if old is not None:
            self.counts[old.condition] -= 1
        self.counts[agent.condition] += 1
        self.agents[view.agent_id] = agent
        return view.agent_id

    def _set_command(self, command: CommandView, announce: bool = True) -> None:
        commands = self.commands
        commands[command.command_id] = command
        commands.move_to_end(command.command_id)
        while len(commands) > MAX_COMMANDS:
            old_id, _ = commands.popitem(last=False)
            self.outputs.pop(old_id, None)
        if command.result is not None and command.name == "ping":
            issued = _time_or_none(command.issued_at)
            updated = _time_or_none(command.updated_at)
            if issued is not None and updated is not None and updated >= issued:
                self.last_rtt_ms[command.agent_id] = (updated - issued) * 1000.0

    def _add_output(self, event: dict[str, Any]) -> None:
        command_id = event.get("command_id")
        data = event.get("data")
        if not isinstance(command_id, str) or not isinstance(data, str):
            return
        chunk = {"seq": event.get("seq", 0), "stream": str(event.get("stream", "")), "data": data}
        chunks = self.outputs.setdefault(command_id, [])
        if len(chunks) < MAX_OUTPUT_CHUNKS:
            chunks.append(chunk)
        self._pending.outputs.append({"command_id": command_id, **chunk})

    def _set_alert(self, alert: AlertView) -> None:
        if alert.state == "resolved":
            self.open_alerts.pop(alert.alert_id, None)
            self.resolved_alerts = deque(
                (a for a in self.resolved_alerts if a.alert_id != alert.alert_id),
                maxlen=MAX_RESOLVED,
            )
            self.resolved_alerts.appendleft(alert)
        else:
            self.open_alerts[alert.alert_id] = alert

    def apply_history(self, data: Any) -> None:
        """The hub's last hour of ticks (``metrics_history``), under the live ones."""
        ticks = data.get("ticks") if isinstance(data, dict) else None
        if not isinstance(ticks, list):
            return
        good = [
            (float(tick["at"]), tick["stats"])
            for tick in ticks
            if isinstance(tick, dict)
            and isinstance(tick.get("at"), int | float)
            and not isinstance(tick.get("at"), bool)
            and math.isfinite(tick["at"])
            and isinstance(tick.get("stats"), dict)
        ]
        if self.history.prepend(good):
            self._pending.metrics = True
            self._schedule()

    def _set_stats(self, stats: dict[str, Any], append: bool) -> None:
        self.stats = stats
        hubs = stats.get("hubs")
        if isinstance(hubs, dict):
            self.hubs = {str(k): v for k, v in hubs.items() if isinstance(v, int)}
        self.redis_state, self.cluster, self.this_hub = parse_cluster(stats.get("cluster"))
        if append or len(self.history) == 0:
            self.history.append(time.time(), stats)
        self._pending.metrics = True
