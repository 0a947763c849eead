"""Admin sessions: requests and replies, subscriptions with coalescing and backpressure.

A subscriber's unsent events wait in an insertion-ordered map keyed by subject: a newer
state of the same agent or command replaces the older one in place. Events go out in
batches while the socket drains; when the map passes its bound (events or bytes) the
subscriber is sent ``resync`` and a fresh snapshot instead, so a console that stops reading
costs the hub a bounded amount of memory.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any, Protocol

from pydantic import ValidationError

from .auth import Principal, role_allows
from .bus import Bus
from .channel import Session, SessionHost, error_ref
from .ledger import DispatchRefused
from .protocol.codec import encode
from .protocol.connection import Connection
from .protocol.messages import (
    ADMIN_REQUEST,
    AckAlert,
    AgentRequest,
    AgentsRequest,
    AlertsRequest,
    AuditRequest,
    CancelRequest,
    CommandsRequest,
    Dispatch,
    JobRequest,
    JobsRequest,
    MetricsHistoryRequest,
    OutputRequest,
    Subscribe,
    describe_validation_error,
)
from .queries import AdminQueries, RequestError
from .store.base import StoreUnavailable

log = logging.getLogger(__name__)

__all__ = ["AdminHost", "AdminSession"]

ROLE_NEEDED = {
    "subscribe": "viewer",
    "agents": "viewer",
    "agent": "viewer",
    "dispatch": "operator",
    "cancel": "operator",
    "job": "viewer",
    "jobs": "viewer",
    "commands": "viewer",
    "output": "viewer",
    "alerts": "viewer",
    "ack_alert": "operator",
    "audit": "admin",
    "metrics_history": "viewer",
}
#: Largest batch of events sent as one message.
BATCH_EVENTS = 2_000
BATCH_BYTES = 1024 * 1024
# Events leave at the end of the event-loop turn that produced them, all of that turn's
# events in one batch. There is no timer: when a subscriber reads slower than events come,
# its socket stops being writable, events coalesce in its queue, and the next batch is
# bigger. Batching follows the subscriber's pace instead of a fixed delay.


class AdminHost(SessionHost, Protocol):
    """What an admin session may use of the host."""

    @property
    def bus(self) -> Bus: ...

    @property
    def queries(self) -> AdminQueries: ...

    @property
    def admins(self) -> set[Any]:
        """The open admin sessions (the gate counts them against its limits)."""
        ...


class AdminSession(Session):
    __slots__ = (
        "_flush_handle",
        "_queue",
        "_queue_bytes",
        "_sending_snapshot",
        "_unkeyed",
        "hold",
        "principal",
        "resync_pending",
        "tasks",
        "topics",
    )

    channel = "admin"
    host: AdminHost

    def __init__(self, host: AdminHost, conn: Connection, principal: Principal) -> None:
        super().__init__(host, conn)
        self.principal = principal
        self.topics: frozenset[str] = frozenset()
        self.tasks: set[asyncio.Task[None]] = set()
        self._queue: dict[Any, bytes] = {}
        self._queue_bytes = 0
        self._unkeyed = itertools.count()
        self._flush_handle: asyncio.Handle | None = None
        self.hold = False
        self.resync_pending = False
        self._sending_snapshot = False

    @property
    def actor(self) -> str:
        return self.principal.actor

    # -- life cycle ----------------------------------------------------------------------

    def opened(self) -> None:
        host = self.host
        host.admins.add(self)
        transport = self.conn.transport
        if transport is not None:
            transport.set_write_buffer_limits(high=256 * 1024)
        self.conn.start_keepalive(host.config.admin_ping_interval, host.config.admin_ping_timeout)
        host.auditor.record("admin.connect", actor=self.actor, source=self.conn.peer)

    def closed(self, code: int, reason: str) -> None:
        host = self.host
        host.admins.discard(self)
        host.bus.unsubscribe(self)
        host.metrics.disconnected(code)
        self._queue.clear()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        for task in self.tasks:
            task.cancel()
        host.auditor.record("admin.disconnect", actor=self.actor, source=self.conn.peer, code=code)

    def close(self, code: int, reason: str = "") -> None:
        self.conn.close(code, reason)

    # -- requests ------------------------------------------------------------------------

    def handle(self, obj: dict[str, Any]) -> None:
        ref = error_ref(obj)
        request_id = obj.get("id")
        needed = ROLE_NEEDED.get(obj["type"])
        if needed is not None and not role_allows(self.principal.role, needed):
            self.host.auditor.record(
                "admin.forbidden", actor=self.actor, source=self.conn.peer, request=obj["type"]
            )
            self._reply_error(request_id, "forbidden", f"{obj['type']} needs the {needed} role")
            return
        try:
            request = ADMIN_REQUEST.validate_python(obj)
        except ValidationError as exc:
            message = describe_validation_error(exc)
            if isinstance(request_id, str | int) and not isinstance(request_id, bool):
                # A request we can answer: the reply carries the error (PROTOCOL §5).
                self._reply_error(request_id, "invalid_message", message)
                self.count_invalid(message)
            else:
                self.invalid(ref, message)
            return
        task = asyncio.ensure_future(self._answer(request))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _answer(self, request: Any) -> None:
        try:
            data = await self._dispatch(request)
        except RequestError as exc:
            self._reply_error(request.id, exc.code, exc.message)
            return
        except DispatchRefused as exc:
            self._reply_error(request.id, exc.code, f"{exc}; refused: {exc.refused[:20]}")
            return
        except StoreUnavailable as exc:
            self._reply_error(request.id, "unavailable", str(exc))
            return
        except ValueError as exc:
            self._reply_error(request.id, "invalid_message", str(exc))
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("admin request %s failed", request.type)
            self._reply_error(request.id, "internal_error", "the hub failed to answer")
            return
        self._reply(request.id, data)
        if isinstance(request, Subscribe):
            self.hold = False
            self._schedule_flush()

    def _reply(self, request_id: Any, data: Any) -> None:
        self.send(encode({"type": "reply", "id": request_id, "ok": True, "data": data}))

    def _reply_error(self, request_id: Any, code: str, message: str) -> None:
        self.send(
            encode(
                {
                    "type": "reply",
                    "id": request_id,
                    "ok": False,
                    "error": {"code": code, "message": message},
                }
            )
        )

    async def _dispatch(self, request: Any) -> Any:
        queries = self.host.queries
        kind = type(request)
        if kind is Subscribe:
            return await self._subscribe(request)
        if kind is AgentsRequest:
            return await queries.agents(request)
        if kind is AgentRequest:
            return await queries.agent(request.agent_id)
        if kind is Dispatch:
            return await queries.dispatch(request, self.actor, self.conn.peer)
        if kind is CancelRequest:
            return await queries.cancel(request, self.actor)
        if kind is JobRequest:
            return await queries.job(request.job_id)
        if kind is JobsRequest:
            return await queries.jobs(request)
        if kind is CommandsRequest:
            return await queries.commands(request)
        if kind is OutputRequest:
            return await queries.output(request.command_id)
        if kind is AlertsRequest:
            return await queries.alerts_page(request)
        if kind is AckAlert:
            return await queries.ack_alert(request.alert_id, self.actor, request.comment)
        if kind is AuditRequest:
            return await queries.audit(request)
        if kind is MetricsHistoryRequest:
            return queries.metrics_history(request)
        raise RequestError("invalid_message", f"unsupported request {request.type}")

    # -- subscriptions -------------------------------------------------------------------

    async def _subscribe(self, request: Subscribe) -> dict[str, Any]:
        topics = frozenset(request.topics)
        if "audit" in topics and not role_allows(self.principal.role, "admin"):
            raise RequestError("forbidden", "the audit topic needs the admin role")
        host = self.host
        host.bus.unsubscribe(self)
        self.topics = topics
        self.hold = True  # events wait until the snapshot reply is out
        self._queue.clear()
        self._queue_bytes = 0
        self.resync_pending = False
        host.bus.subscribe(self)
        return await host.queries.snapshot(topics)

    def push(self, key: Any, data: bytes) -> None:
        if self.resync_pending:
            return  # a fresh snapshot will carry this state
        queue = self._queue
        if key is None:
            key = next(self._unkeyed)
        old = queue.get(key)
        if old is not None:
            self._queue_bytes -= len(old)
        queue[key] = data
        self._queue_bytes += len(data)
        config = self.host.config
        if (
            len(queue) > config.subscriber_max_events
            or self._queue_bytes > config.subscriber_max_bytes
        ):
            queue.clear()
            self._queue_bytes = 0
            self.resync_pending = True
            self.host.auditor.record(
                "admin.resync", actor=self.actor, source=self.conn.peer, reason="queue bound"
            )
            self._schedule_flush()
            return
        if self._flush_handle is None:
            self._schedule_flush()

    def request_resync(self, reason: str) -> None:
        """Events meant for this console were lost elsewhere (between hubs): drop what is
        queued and send ``resync`` and a fresh snapshot, as past the queue's bound."""
        if self.resync_pending or self.hold:
            return
        self._queue.clear()
        self._queue_bytes = 0
        self.resync_pending = True
        self.host.auditor.record(
            "admin.resync", actor=self.actor, source=self.conn.peer, reason=reason
        )
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def writable(self) -> None:
        if self._queue or self.resync_pending:
            self._schedule_flush()

    def _flush(self) -> None:
        self._flush_handle = None
        conn = self.conn
        if self.hold or conn.closed or not conn.writable or self._sending_snapshot:
            return
        if self.resync_pending:
            self.resync_pending = False
            self._sending_snapshot = True
            self.send(b'{"type":"resync"}')
            task = asyncio.ensure_future(self._send_snapshot())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            return
        queue = self._queue
        if not queue:
            return
        events: list[bytes] = []
        size = 0
        for key in list(itertools.islice(queue, BATCH_EVENTS)):
            data = queue.pop(key)
            events.append(data)
            size += len(data)
            if size >= BATCH_BYTES:
                break
        self._queue_bytes -= size
        if len(events) == 1:
            self.send(events[0])
        else:
            self.send(b'{"type":"batch","events":[' + b",".join(events) + b"]}")
        if queue and conn.writable:
            self._schedule_flush()

    async def _send_snapshot(self) -> None:
        try:
            data = await self.host.queries.snapshot(self.topics)
            self.send(encode({"type": "snapshot", "data": data}))
        finally:
            self._sending_snapshot = False
        if self._queue or self.resync_pending:
            self._schedule_flush()
