"""What every WebSocket session of the hub does with incoming bytes before they mean anything.

Both channels parse frames the same way (PROTOCOL §3): not-JSON closes with 1007; JSON that
breaks a limit, an unknown type or invalid fields gets an ``invalid_message`` error and the
connection stays up, until more than 20 such errors within a sliding minute close it with
1008. A per-connection message-rate budget protects the hub from floods.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Coroutine
from typing import Any, Protocol

from .audit import Auditor
from .config import HubConfig
from .metrics import Metrics
from .protocol.codec import LimitExceeded, NotJSON, decode, encode
from .protocol.connection import Connection
from .protocol.constants import INVALID_MESSAGE_BUDGET, INVALID_MESSAGE_WINDOW, Close

__all__ = ["Session", "SessionHost", "error_ref"]


class SessionHost(Protocol):
    """What every session may use of the hub around it."""

    @property
    def config(self) -> HubConfig: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def auditor(self) -> Auditor: ...

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
        """Run ``coroutine`` as a task the hub keeps (and cancels when it stops)."""
        ...


def error_ref(obj: Any) -> Any:
    """The ``ref`` of an error: the message's ``id``, else its ``type``, else null."""
    if isinstance(obj, dict):
        ref = obj.get("id")
        if isinstance(ref, str | int) and not isinstance(ref, bool):
            return ref
        kind = obj.get("type")
        if isinstance(kind, str):
            return kind
    return None


class Session:
    """Base of the agent and admin sessions: parsing, error budget, rate budget."""

    __slots__ = ("_errors", "_rate_last", "_rate_tokens", "_rate_warned", "conn", "host")

    channel = "agent"

    def __init__(self, host: SessionHost, conn: Connection) -> None:
        self.host = host
        self.conn = conn
        self._errors: deque[float] | None = None
        self._rate_tokens = host.config.agent_message_burst
        self._rate_last = time.monotonic()
        self._rate_warned = False

    # -- hooks ---------------------------------------------------------------------------

    def opened(self) -> None: ...

    def handle(self, obj: dict[str, Any]) -> None:
        raise NotImplementedError

    def closed(self, code: int, reason: str) -> None: ...

    def writable(self) -> None: ...

    @property
    def actor(self) -> str:
        return self.conn.peer

    # -- receiving -----------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        host = self.host
        host.metrics.messages[(self.channel, "in")] += 1
        if not self._within_rate():
            return
        try:
            obj = decode(data)
        except NotJSON as exc:
            host.auditor.record(
                "message.not_json", actor=self.actor, source=self.conn.peer, reason=str(exc)[:200]
            )
            self.conn.close(Close.INVALID_DATA, "message is not JSON")
            return
        except LimitExceeded as exc:
            self.invalid(None, str(exc))
            return
        if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
            self.invalid(error_ref(obj), "a message is a JSON object with a string 'type'")
            return
        self.handle(obj)

    def _within_rate(self) -> bool:
        config = self.host.config
        now = time.monotonic()
        tokens = min(
            config.agent_message_burst,
            self._rate_tokens + (now - self._rate_last) * config.agent_message_rate,
        )
        self._rate_last = now
        tokens -= 1
        self._rate_tokens = tokens
        if tokens >= 0:
            self._rate_warned = False
            return True
        if tokens < -config.agent_message_burst:
            self.host.auditor.record(
                "message.rate_exceeded", actor=self.actor, source=self.conn.peer
            )
            self.conn.close(Close.POLICY, "message rate exceeded")
            return False
        if not self._rate_warned:
            self._rate_warned = True
            self.error("rate_limited", None, "message rate exceeded; slow down or be closed")
        return True

    # -- answering -----------------------------------------------------------------------

    def send(self, data: bytes) -> bool:
        if self.conn.send_text(data):
            self.host.metrics.messages[(self.channel, "out")] += 1
            return True
        return False

    def error(self, code: str, ref: Any, message: str) -> None:
        self.send(encode({"type": "error", "code": code, "ref": ref, "message": message}))

    def invalid(self, ref: Any, message: str) -> None:
        """Answer ``invalid_message`` with an error message, and count it."""
        self.error("invalid_message", ref, message[:500])
        self.count_invalid(message)

    def count_invalid(self, message: str) -> None:
        """More than 20 invalid messages within a sliding minute close the connection."""
        host = self.host
        host.metrics.invalid_messages[self.channel] += 1
        now = time.monotonic()
        errors = self._errors
        if errors is None:
            errors = self._errors = deque(maxlen=INVALID_MESSAGE_BUDGET + 1)
        errors.append(now)
        if len(errors) > INVALID_MESSAGE_BUDGET and now - errors[0] <= INVALID_MESSAGE_WINDOW:
            host.auditor.record(
                "message.invalid_budget", actor=self.actor, source=self.conn.peer, last=message
            )
            self.conn.close(Close.POLICY, "too many invalid messages")
