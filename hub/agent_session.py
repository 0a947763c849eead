"""One agent's connection after the upgrade: register, heartbeats, command replies.

The session keeps only what a connection needs; what the hub knows about the agent itself
lives in its :class:`~hub.model.AgentRecord`, which outlives connections.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

from .auth import Principal
from .channel import Session, error_ref
from .model import AgentRecord
from .probe import answer_probe, probe_audit
from .protocol.codec import encode
from .protocol.constants import Close
from .protocol.messages import (
    AGENT_MESSAGE,
    Ack,
    Heartbeat,
    Output,
    Probe,
    Register,
    Result,
    ValidationError,
    describe_validation_error,
)
from .protocol.times import format_time
from .store.base import StoreUnavailable

if TYPE_CHECKING:
    from .app import Hub
    from .server import HubConnection

log = logging.getLogger(__name__)

__all__ = ["AgentSession", "next_session_id"]

#: Session ids need to be unique, not secret: a random per-process prefix and a counter
#: (no system call per registration, unlike a fresh random token).
_SESSION_PREFIX = secrets.token_hex(4)
_session_numbers = itertools.count(1)


def next_session_id() -> str:
    return f"{_SESSION_PREFIX}{next(_session_numbers):08x}"


class AgentSession(Session):
    __slots__ = (
        "_register_timer",
        "agent_id",
        "credential_id",
        "generation",
        "principal",
        "record",
        "registered",
        "registering",
        "session_id",
    )

    channel = "agent"

    def __init__(self, hub: Hub, conn: HubConnection, principal: Principal) -> None:
        super().__init__(hub, conn)
        self.principal = principal
        self.credential_id = principal.credential_id
        self.agent_id = ""
        self.generation = 0
        self.session_id = ""
        self.record: AgentRecord | None = None
        self.registered = False
        self.registering = False
        self._register_timer: asyncio.TimerHandle | None = None

    @property
    def actor(self) -> str:
        return f"agent:{self.agent_id}" if self.agent_id else self.principal.actor

    # -- life cycle ----------------------------------------------------------------------

    def opened(self) -> None:
        loop = asyncio.get_running_loop()
        self._register_timer = loop.call_later(
            self.hub.config.register_timeout, self._register_timeout
        )

    def _register_timeout(self) -> None:
        self._register_timer = None
        if not self.registered and not self.registering:
            self._refuse("no register within the time limit")

    def close(self, code: int, reason: str = "", farewell: bytes | None = None) -> None:
        self.conn.close(code, reason, farewell)

    def closed(self, code: int, reason: str) -> None:
        hub = self.hub
        if self._register_timer is not None:
            self._register_timer.cancel()
            self._register_timer = None
        hub.metrics.disconnected(code)
        if not self.registered:
            return
        record = self.record
        assert record is not None
        now = time.time()
        hub.store.close_session(self.session_id, now, code, reason)
        hub.auditor.record(
            "agent.disconnect",
            actor=self.actor,
            subject=self.agent_id,
            source=self.conn.peer,
            code=code,
            reason=reason,
        )
        if hub.registry.remove(self):
            record.connected_at = None
            hub.registry.set_state(record, "offline")
            hub.ledger.set_draining(self.agent_id, False)
            hub.store.save_agent(record)
            hub.events.agent(record, "disconnected", code=code)
        # else: superseded; the newer session owns the record now.

    # -- messages ------------------------------------------------------------------------

    def handle(self, obj: dict[str, Any]) -> None:
        if not self.registered:
            self._first_message(obj)
            return
        record = self.record
        assert record is not None
        record.last_seen = time.time()
        try:
            message = AGENT_MESSAGE.validate_python(obj)
        except ValidationError as exc:
            self.invalid(error_ref(obj), describe_validation_error(exc))
            return
        kind = type(message)
        if kind is Heartbeat:
            self._heartbeat(record, message)  # type: ignore[arg-type]
        elif kind is Ack:
            if not self.hub.ledger.on_ack(self.agent_id, message.command_id):  # type: ignore[union-attr]
                self._unknown_command(message.command_id)  # type: ignore[union-attr]
        elif kind is Output:
            if not self.hub.ledger.on_output(self.agent_id, message):  # type: ignore[arg-type]
                self._unknown_command(message.command_id)  # type: ignore[union-attr]
        elif kind is Result:
            if not self.hub.ledger.on_result(self.agent_id, message):  # type: ignore[arg-type]
                self._unknown_command(message.command_id)  # type: ignore[union-attr]
        elif kind is Register:
            self.invalid("register", "already registered on this connection")

    def _unknown_command(self, command_id: str) -> None:
        self.hub.auditor.record(
            "command.foreign_reply", actor=self.actor, subject=command_id, source=self.conn.peer
        )
        self.error("unknown_command", command_id, "no such command for this agent")

    def _heartbeat(self, record: AgentRecord, message: Heartbeat) -> None:
        hub = self.hub
        record.metrics = message.metrics
        status = message.status
        if status != record.status:
            if status == "draining" or record.status == "draining":
                hub.ledger.set_draining(self.agent_id, status == "draining")
            record.status = status
        record.dirty = True
        if record.state != "online":
            hub.registry.set_state(record, "online")
        hub.events.agent(record, "heartbeat")

    # -- registration --------------------------------------------------------------------

    def _first_message(self, obj: dict[str, Any]) -> None:
        if self.registering:
            # Reading is paused while a registration completes; this is a pipelined extra.
            self.invalid(error_ref(obj), "wait for welcome before sending more")
            return
        if obj.get("type") == "probe":  # extension: hub/probe.py, docs/protocol.md §4
            hub = self.hub
            try:
                probe = Probe.model_validate(obj)
            except ValidationError as exc:
                self._refuse(f"invalid probe: {describe_validation_error(exc)}")
                return
            answer = answer_probe(
                self.principal, probe, hub.credentials, hub.registry, hub.config.max_agents,
                hub.hub_id, hub.heartbeat_interval_wire,
            )  # fmt: skip
            audit = probe_audit(answer)
            hub.auditor.record("agent.probe", actor=self.actor, source=self.conn.peer, **audit)
            self.close(Close.NORMAL, "probe answered", farewell=encode(answer.model_dump()))
            return
        if obj.get("type") != "register":
            self._refuse("the first message must be register")
            return
        try:
            message = Register.model_validate(obj)
        except ValidationError as exc:
            self._refuse(f"invalid register: {describe_validation_error(exc)}")
            return
        problem = self._identity_problem(message)
        if problem:
            self._refuse(problem, agent_id=message.agent_id)
            return
        hub = self.hub
        live = hub.registry.live
        if message.agent_id not in live and len(live) >= hub.config.max_agents:
            hub.auditor.record(
                "agent.refused", subject=message.agent_id, source=self.conn.peer, reason="full"
            )
            self.conn.close(Close.TRY_AGAIN_LATER, "hub at its agent limit")
            return
        self.agent_id = message.agent_id
        if self.principal.kind == "enroll":
            self.registering = True
            transport = self.conn.transport
            if transport is not None:
                transport.pause_reading()
            task = asyncio.ensure_future(self._enroll(message))
            hub.tasks.add(task)
            task.add_done_callback(hub.tasks.discard)
        else:
            self._complete(message, agent_key=None)

    def _identity_problem(self, message: Register) -> str:
        principal = self.principal
        if principal.agent_id is not None and principal.agent_id != message.agent_id:
            return "the credential is bound to another agent id"
        if principal.region is not None and principal.region != message.region:
            return "the credential is bound to another region"
        if principal.platform is not None and principal.platform != message.platform:
            return "the credential is bound to another platform"
        if self.hub.credentials.is_revoked(principal.credential_id):
            return "the credential was revoked"
        if principal.kind == "enroll":
            record = self.hub.registry.records.get(message.agent_id)
            return self.hub.credentials.check_enrollment(
                principal, message.agent_id, record.enrolled_by if record else None
            )
        return ""

    async def _enroll(self, message: Register) -> None:
        hub = self.hub
        credentials = hub.credentials
        enroll_id = self.principal.credential_id
        assert enroll_id is not None
        record = hub.registry.records.get(message.agent_id)
        replaced = credentials.enrollment_keys_of(message.agent_id) if record else []
        issued, token = credentials.make(
            "agent", agent_id=message.agent_id, issued_by=f"enroll:{enroll_id}"
        )
        try:
            ok = await hub.store.enroll(enroll_id, message.agent_id, issued, replaced)
        except StoreUnavailable:
            ok = None
        finally:
            self.registering = False
        if self.conn.closed:
            return
        if ok is None:
            self.conn.close(Close.INTERNAL_ERROR, "store unavailable")
            return
        if not ok:
            self._refuse("enrollment key exhausted, expired or revoked", agent_id=message.agent_id)
            return
        credentials.enrolled(
            enroll_id, issued, replaced, new_id=record is None or (record.enrolled_by != enroll_id)
        )
        self._complete(message, agent_key=token, enrolled_by=enroll_id)
        hub.auditor.record(
            "credential.issued",
            actor=f"enroll:{enroll_id}",
            subject=issued.id,
            agent_id=message.agent_id,
            replaced=replaced,
        )
        transport = self.conn.transport
        if transport is not None and not self.conn.closed:
            transport.resume_reading()

    def _complete(
        self, message: Register, agent_key: str | None, enrolled_by: str | None = None
    ) -> None:
        hub = self.hub
        registry = hub.registry
        if self._register_timer is not None:
            self._register_timer.cancel()
            self._register_timer = None
        now = time.time()
        record, new = registry.register(message, now)
        if enrolled_by is not None:
            record.enrolled_by = enrolled_by
        self.record = record
        self.session_id = next_session_id()
        previous = registry.install(self)
        self.registered = True
        if previous is not None:
            hub.on_takeover(self.agent_id, self.conn.peer)
            previous.close(Close.SUPERSEDED, "superseded by a newer connection")
        elif not new:
            hub.metrics.reconnects += 1
        hub.metrics.connected()
        record.connected_at = now
        record.last_seen = now
        record.hub_id = hub.hub_id
        record.status = "ok"
        record.metrics = {}
        registry.set_state(record, "online")
        hub.store.save_agent(record)
        hub.store.open_session(
            self.session_id, self.agent_id, hub.hub_id, self.conn.peer, self.credential_id, now
        )
        hub.auditor.record(
            "agent.connect",
            actor=self.principal.actor,
            subject=self.agent_id,
            source=self.conn.peer,
            session_id=self.session_id,
            new=new,
        )
        welcome: dict[str, Any] = {
            "type": "welcome",
            "hub_id": hub.hub_id,
            "session_id": self.session_id,
            "heartbeat_interval": hub.heartbeat_interval_wire,
            "server_time": format_time(now),
        }
        if agent_key is not None:
            welcome["agent_key"] = agent_key
        self.send(encode(welcome))
        hub.events.agent(record, "connected")
        hub.ledger.agent_connected(self.agent_id)

    def _refuse(self, reason: str, agent_id: str | None = None) -> None:
        self.hub.auditor.record(
            "agent.register_refused",
            actor=self.principal.actor,
            subject=agent_id,
            source=self.conn.peer,
            reason=reason,
        )
        self.conn.close(Close.POLICY, reason)

    # -- sweeping ------------------------------------------------------------------------

    def check_liveness(self, now: float, interval: float) -> None:
        """Called by the sweeper: stale after two silent intervals, gone after three."""
        record = self.record
        if record is None or record.last_seen is None:
            return
        silence = now - record.last_seen
        if silence > 3 * interval:
            self.conn.close(Close.GOING_AWAY, "heartbeat timeout")
        elif silence > 2 * interval and record.state == "online":
            self.hub.registry.set_state(record, "stale")
            self.hub.events.agent(record, "updated")
