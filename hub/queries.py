"""What the admin channel's requests read and do (PROTOCOL §5), apart from the channel.

:class:`~hub.admin.AdminSession` parses requests, checks roles and sends replies; this
module answers them from the registry, the ledger, the alerts and the store. A request
that cannot be answered raises :class:`RequestError` with the protocol's error code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from .alerts import Alerts
from .audit import Auditor
from .ledger import Ledger
from .metrics import Metrics
from .model import AgentRecord
from .protocol.messages import (
    AgentsRequest,
    CancelRequest,
    Dispatch,
    JobsRequest,
    MetricsHistoryRequest,
    PagedRequest,
)
from .registry import Registry
from .store.base import Store, StoreUnavailable

__all__ = ["AdminQueries", "RequestError"]

#: Agents a snapshot or listing turns into views per turn of the event loop.
VIEW_CHUNK = 2_000


class RequestError(Exception):
    """A request the hub refuses: ``code`` is one of PROTOCOL §5's error codes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class AdminQueries:
    def __init__(
        self,
        registry: Registry,
        ledger: Ledger,
        alerts: Alerts,
        store: Store,
        auditor: Auditor,
        metrics: Metrics,
        stats: Callable[[], dict[str, Any]],
    ) -> None:
        self.registry = registry
        self.ledger = ledger
        self.alerts = alerts
        self.store = store
        self.auditor = auditor
        self.metrics = metrics
        #: The figures of a ``metrics`` tick, as the hub computes them.
        self.stats = stats
        #: Open alerts and acknowledging one (in cluster mode the leader's, through Redis).
        self.open_alerts: Callable[[], Awaitable[list[dict[str, Any]]]] = self._open_alerts_here
        self.acknowledge: Callable[[str, str, str | None], Awaitable[dict[str, Any] | None]] = (
            alerts.acknowledge
        )

    async def _open_alerts_here(self) -> list[dict[str, Any]]:
        return self.alerts.open_views()

    # -- agents --------------------------------------------------------------------------

    async def views(self, records: Iterable[AgentRecord]) -> list[dict[str, Any]]:
        """Agent views, yielding to the event loop between chunks (big fleets)."""
        views = []
        for index, record in enumerate(records, 1):
            views.append(record.view())
            if index % VIEW_CHUNK == 0:
                await asyncio.sleep(0)
        return views

    async def agents(self, request: AgentsRequest) -> dict[str, Any]:
        selector = request.selector
        if selector is not None:
            records = self.registry.select(selector, request.limit)
        else:
            records = sorted(self.registry.records.values(), key=lambda r: r.agent_id)
            records = records[: request.limit]
        return {"agents": await self.views(records)}

    async def agent(self, agent_id: str) -> dict[str, Any]:
        record = self.registry.records.get(agent_id)
        if record is None:
            raise RequestError("not_found", "no such agent")
        history = await self.store.agent_history(agent_id)
        page = await self.store.commands({"agent_id": agent_id}, 100, None)
        return {
            "agent": record.view(),
            "heartbeats": history["heartbeats"],
            "sessions": history["sessions"],
            "commands": page.items,
        }

    async def snapshot(self, topics: frozenset[str]) -> dict[str, Any]:
        """The subscribe reply (and a resync's snapshot): the present state of each topic."""
        data: dict[str, Any] = {}
        if "agents" in topics:
            data["agents"] = await self.views(self.registry.records.values())
        if "commands" in topics:
            page = await self.store.commands({}, 100, None)
            data["commands"] = page.items
        if "alerts" in topics:
            data["alerts"] = await self.open_alerts()
        if "metrics" in topics:
            data["metrics"] = self.stats()
        if "audit" in topics:
            page = await self.store.audit_entries({}, 100, None)
            data["audit"] = page.items
        return data

    # -- commands and jobs ---------------------------------------------------------------

    def _writable(self) -> None:
        """Refuse (``unavailable``) a request that would have to be stored while the store
        cannot write: nothing of it is accepted, nothing waits for a commit that would fail."""
        if reason := self.store.health.reason:
            raise StoreUnavailable(f"the store cannot write: {reason}")

    async def dispatch(self, request: Dispatch, actor: str, source: str) -> dict[str, Any]:
        self._writable()
        entry = self.auditor.entry("admin.dispatch", actor=actor, source=source, name=request.name)
        return await self.ledger.dispatch(request, actor, audit=[entry])

    async def cancel(self, request: CancelRequest, actor: str) -> dict[str, Any]:
        self._writable()
        subject = request.job_id or request.command_id
        self.auditor.record("admin.cancel", actor=actor, subject=subject)
        outcome = await self.ledger.cancel(request.job_id, request.command_id, actor)
        if outcome["finished"]:
            known = (
                await self.store.job(request.job_id)
                if request.job_id is not None
                else await self.store.command(request.command_id or "")
            )
            if known is None:
                raise RequestError("not_found", f"no such {'job' if request.job_id else 'command'}")
        return outcome

    async def job(self, job_id: str) -> dict[str, Any]:
        """A job and its commands: stored rows, overlaid with the live state of a running
        job (its row is written when accepted and when finished)."""
        stored = await self.store.job(job_id)
        if stored is None:
            raise RequestError("not_found", "no such job")
        live = self.ledger.job_view(job_id)
        if live is not None:
            stored["job"] = live
        unfinished = self.ledger.unfinished_of_job(job_id)
        if unfinished:
            stored["commands"] = [
                unfinished[c["command_id"]].view() if c["command_id"] in unfinished else c
                for c in stored["commands"]
            ]
        return stored

    async def jobs(self, request: JobsRequest) -> dict[str, Any]:
        page = await self.store.jobs(request.filter, request.limit, request.before)
        items = [self.ledger.job_view(item["job_id"]) or item for item in page.items]
        return {"jobs": items, "next": page.next}

    async def commands(self, request: PagedRequest) -> dict[str, Any]:
        page = await self.store.commands(request.filter, request.limit, request.before)
        return {"commands": page.items, "next": page.next}

    async def output(self, command_id: str) -> dict[str, Any]:
        command = await self.store.command(command_id)
        if command is None:
            raise RequestError("not_found", "no such command")
        return {"command": command, "chunks": await self.store.command_output(command_id)}

    # -- alerts, audit, metrics ----------------------------------------------------------

    async def alerts_page(self, request: PagedRequest) -> dict[str, Any]:
        page = await self.store.alerts(request.filter, request.limit, request.before)
        return {"alerts": page.items, "next": page.next}

    async def ack_alert(self, alert_id: str, actor: str, comment: str | None) -> dict[str, Any]:
        self._writable()
        alert = await self.acknowledge(alert_id, actor, comment)
        if alert is None:
            raise RequestError("not_found", "no such open alert")
        return {"alert": alert}

    async def audit(self, request: PagedRequest) -> dict[str, Any]:
        page = await self.store.audit_entries(request.filter, request.limit, request.before)
        return {"entries": page.items, "next": page.next}

    def metrics_history(self, request: MetricsHistoryRequest) -> dict[str, Any]:
        return {"ticks": self.metrics.history.since(request.since)}
