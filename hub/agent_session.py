"""One agent's connection after the upgrade: register, heartbeats, command replies.

The session keeps only what a connection needs and reads the agent's messages; what they
mean for the fleet is :class:`~hub.fleet.Fleet`'s (registration, takeover, heartbeats) and
the ledger's (command replies). What the hub knows about the agent itself lives in its
:class:`~hub.model.AgentRecord`, which outlives connections.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from typing import Any, Protocol

from .auth import Principal
from .channel import Session, SessionHost, error_ref
from .fleet import Fleet
from .ledger import Ledger
from .model import AgentRecord
from .probe import probe_audit
from .protocol.codec import encode
from .protocol.connection import Connection
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
    fast_reply,
)

log = logging.getLogger(__name__)

__all__ = ["AgentHost", "AgentSession", "next_session_id"]

#: Session ids need to be unique, not secret: a random per-process prefix and a counter
#: (no system call per registration, unlike a fresh random token).
_SESSION_PREFIX = secrets.token_hex(4)
_session_numbers = itertools.count(1)


def next_session_id() -> str:
    return f"{_SESSION_PREFIX}{next(_session_numbers):08x}"


class AgentHost(SessionHost, Protocol):
    """What an agent's session may use of the hub."""

    @property
    def fleet(self) -> Fleet: ...

    @property
    def ledger(self) -> Ledger: ...


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
    host: AgentHost

    def __init__(self, host: AgentHost, conn: Connection, principal: Principal) -> None:
        super().__init__(host, conn)
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

    @property
    def peer(self) -> str:
        return self.conn.peer

    # -- life cycle ----------------------------------------------------------------------

    def opened(self) -> None:
        loop = asyncio.get_running_loop()
        self._register_timer = loop.call_later(
            self.host.config.register_timeout, self._register_timeout
        )

    def _register_timeout(self) -> None:
        self._register_timer = None
        if not self.registered and not self.registering:
            self._refuse("no register within the time limit")

    def close(self, code: int, reason: str = "", farewell: bytes | None = None) -> None:
        self.conn.close(code, reason, farewell)

    def closed(self, code: int, reason: str) -> None:
        if self._register_timer is not None:
            self._register_timer.cancel()
            self._register_timer = None
        self.host.metrics.disconnected(code)
        if self.registered:
            self.host.fleet.leave(self, code, reason)

    # -- messages ------------------------------------------------------------------------

    def handle(self, obj: dict[str, Any]) -> None:
        if not self.registered:
            self._first_message(obj)
            return
        record = self.record
        assert record is not None
        record.last_seen = time.time()
        message = fast_reply(obj)
        if message is None:
            try:
                message = AGENT_MESSAGE.validate_python(obj)
            except ValidationError as exc:
                self.invalid(error_ref(obj), describe_validation_error(exc))
                return
        kind = type(message)
        ledger = self.host.ledger
        if kind is Heartbeat:
            self.host.fleet.heartbeat(record, message)  # type: ignore[arg-type]
        elif kind is Ack:
            if not ledger.on_ack(self.agent_id, message.command_id):  # type: ignore[union-attr]
                self._unknown_command(message.command_id)  # type: ignore[union-attr]
        elif kind is Output:
            if not ledger.on_output(self.agent_id, message):  # type: ignore[arg-type]
                self._unknown_command(message.command_id)  # type: ignore[union-attr]
        elif kind is Result:
            if not ledger.on_result(self.agent_id, message):  # type: ignore[arg-type]
                self._unknown_command(message.command_id)  # type: ignore[union-attr]
        elif kind is Register:
            self.invalid("register", "already registered on this connection")

    def _unknown_command(self, command_id: str) -> None:
        self.host.auditor.record(
            "command.foreign_reply", actor=self.actor, subject=command_id, source=self.peer
        )
        self.error("unknown_command", command_id, "no such command for this agent")

    # -- registration --------------------------------------------------------------------

    def _first_message(self, obj: dict[str, Any]) -> None:
        if self.registering:
            # Reading is paused while a registration completes; this is a pipelined extra.
            self.invalid(error_ref(obj), "wait for welcome before sending more")
            return
        if obj.get("type") == "probe":  # extension: hub/probe.py, docs/protocol.md §4
            try:
                probe = Probe.model_validate(obj)
            except ValidationError as exc:
                self._refuse(f"invalid probe: {describe_validation_error(exc)}")
                return
            answer = self.host.fleet.probe(self.principal, probe)
            audit = probe_audit(answer)
            self.host.auditor.record("agent.probe", actor=self.actor, source=self.peer, **audit)
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
        fleet = self.host.fleet
        problem = fleet.identity_problem(self.principal, message)
        if problem:
            self._refuse(problem, agent_id=message.agent_id)
            return
        if fleet.full(message.agent_id):
            self.host.auditor.record(
                "agent.refused", subject=message.agent_id, source=self.peer, reason="full"
            )
            self.conn.close(Close.TRY_AGAIN_LATER, "hub at its agent limit")
            return
        self.agent_id = message.agent_id
        if self.principal.kind == "enroll":
            self.registering = True
            transport = self.conn.transport
            if transport is not None:
                transport.pause_reading()
            self.host.spawn(self._enroll(message))
        else:
            self._complete(message)

    async def _enroll(self, message: Register) -> None:
        try:
            try:
                ok, _issued, token = await self.host.fleet.enroll(self.principal, message.agent_id)
            finally:
                self.registering = False
            if self.conn.closed:
                return
            if ok is None:
                # Nothing was issued or spent: the agent comes back later (PROTOCOL §3:
                # 1013, backoff), as it would from a hub at its limit.
                self.conn.close(Close.TRY_AGAIN_LATER, "store unavailable")
                return
            if not ok:
                self._refuse(
                    "enrollment key exhausted, expired or revoked", agent_id=message.agent_id
                )
                return
            self._complete(message, agent_key=token, enrolled_by=self.principal.credential_id)
        finally:
            # Reading resumes whatever the outcome: a refusal's closing handshake needs the
            # agent's close frame read (paused, the close waited for its timeout, 5 s).
            transport = self.conn.transport
            if transport is not None:
                transport.resume_reading()

    def _complete(
        self, message: Register, agent_key: str | None = None, enrolled_by: str | None = None
    ) -> None:
        if self._register_timer is not None:
            self._register_timer.cancel()
            self._register_timer = None
        self.session_id = next_session_id()
        fleet = self.host.fleet
        welcome = fleet.join(self, message, agent_key, enrolled_by)
        self.registered = True
        self.send(encode(welcome))
        fleet.joined(self)

    def _refuse(self, reason: str, agent_id: str | None = None) -> None:
        self.host.auditor.record(
            "agent.register_refused",
            actor=self.principal.actor,
            subject=agent_id,
            source=self.peer,
            reason=reason,
        )
        self.conn.close(Close.POLICY, reason)
