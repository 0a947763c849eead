"""The hub's one port: ``/ws``, ``/admin``, ``/healthz``, ``/readyz``, ``/metrics``.

Every connection starts as a :class:`HubConnection`. The opening handshake is checked in
the order of PROTOCOL §2 and refused with an HTTP status before any WebSocket exists:
path, Origin, credential (with the failed-auth cool-off), revocation and channel,
admission, subprotocol. All checks run synchronously on in-memory state, so a handshake
costs one pass through this module and never waits on the store.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from websockets.exceptions import (
    HeaderLineTooLong,
    InvalidHeader,
    RequestLineTooLong,
    TooManyHeaders,
)
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import Frame
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import StatusLike

from .audit import Auditor
from .auth import NotCached, Principal
from .budget import ReadBudget
from .channel import Session
from .config import HubConfig
from .gate import (
    ADMITTED,
    SHED_BUSY,
    SHED_FULL,
    SHED_NOW,
    SHED_SOURCE,
    Gate,
    json_response,
    offered_subprotocols,
    plain_response,
)
from .metrics import Metrics
from .protocol.connection import WIRE_LOGGER, Connection
from .protocol.constants import (
    ADMIN_PATH,
    ADMIN_SUBPROTOCOL,
    AGENT_PATH,
    AGENT_SUBPROTOCOL,
    MAX_MESSAGE_BYTES,
)
from .protocol.listening import listen_now as listen_now
from .protocol.tls_layer import TlsLayer

log = logging.getLogger(__name__)

__all__ = ["HubConnection", "ServerHost", "accept", "listen_now"]

#: The error code of each refusal that websockets' own parser or checks make.
_WEBSOCKETS_ERRORS = {
    400: "bad_request",
    405: "method_not_allowed",
    414: "uri_too_long",
    426: "upgrade_required",
    431: "headers_too_large",
    500: "internal_error",
    505: "http_version_not_supported",
}
_CHANNELS = {AGENT_PATH: AGENT_SUBPROTOCOL, ADMIN_PATH: ADMIN_SUBPROTOCOL}


#: Requests answered even past the pending-handshake cap, told apart by their first bytes: a
#: load balancer that got 503 from a busy hub's health check would take it out of rotation.
_PROBES = (b"GET /healthz ", b"HEAD /healthz ", b"GET /readyz ", b"HEAD /readyz ")
#: How long a connection past the cap may take to send its request before it gets the 503.
SHED_WAIT = 1.0
#: A refused newcomer that was answered already (its close is under way).
_SHED_ANSWERED = -1
#: A half-open connection the gate shed or timed out: answered if it could be, and closed.
_DROPPED = -2
#: A request head (request line and headers) longer than this is refused 431 while it is
#: still coming: websockets bounds each line (8 KiB) and the header count (128), which
#: still lets one half-open connection hold a megabyte. Real upgrades carry well under
#: 4 KiB, a JWT included.
MAX_REQUEST_HEAD = 16 * 1024
#: The states of a newcomer the gate refused and counts among the refusals in flight.
_REFUSING = (SHED_FULL, SHED_SOURCE, SHED_BUSY, _SHED_ANSWERED)
#: Where a request head ends.
_HEAD_END = b"\r\n\r\n"


class ServerHost(Protocol):
    """What a connection may use of the hub before and while it carries a session."""

    @property
    def config(self) -> HubConfig: ...

    @property
    def gate(self) -> Gate: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def auditor(self) -> Auditor: ...

    @property
    def read_budget(self) -> ReadBudget: ...

    def not_ready_reason(self) -> str:
        """Why ``/readyz`` answers 503 ('' when ready)."""
        ...

    def readiness_warnings(self) -> list[str]:
        """What an operator should know even while ready (Redis without persistence)."""
        ...

    def open_session(self, conn: HubConnection, principal: Principal, agent: bool) -> Session:
        """The session of a connection just upgraded on ``/ws`` (agent) or ``/admin``."""
        ...

    def spawn(self, coroutine: Any) -> asyncio.Future[Any]: ...


def _describe(exc: BaseException | None) -> str:
    """An exception and its causes, for an audit entry (data, never a log line)."""
    parts = []
    while exc is not None and len(parts) < 3:
        parts.append(str(exc) or type(exc).__name__)
        exc = exc.__cause__
    return "; ".join(parts)[:200]


class _ServerProtocol(ServerProtocol):
    """websockets' server side, refusing in the hub's own format: ``{"error": code}``."""

    def send_frame(self, frame: Frame) -> None:
        # Before the handshake response, write no frame: websockets would answer a ping
        # pipelined behind the request with a pong ahead of the HTTP response.
        if self.state is not State.CONNECTING:
            super().send_frame(frame)

    def reject(self, status: StatusLike, text: str) -> Response:
        code = int(status)
        extra = []
        exc = self.handshake_exc
        if isinstance(exc, InvalidHeader) and exc.name == "Sec-WebSocket-Version":
            # RFC 6455 §4.4: name the version this server speaks.
            extra.append(("Sec-WebSocket-Version", "13"))
        return json_response(code, {"error": _WEBSOCKETS_ERRORS.get(code, "bad_request")}, extra)


class HubConnection(Connection):
    """A connection to the hub, from the first byte to the close."""

    __slots__ = ("_head_bytes", "_parked_data", "_pending", "_shed", "host", "session")

    def __init__(self, host: ServerHost) -> None:
        protocol = _ServerProtocol(max_size=MAX_MESSAGE_BYTES, logger=WIRE_LOGGER)
        super().__init__(protocol, max_buffer=host.config.agent_write_buffer)
        self.host = host
        self.session: Session | None = None
        #: Counted among the gate's pending handshakes until the request is handled.
        self._pending = False
        #: Bytes of a request head still coming (bounded by MAX_REQUEST_HEAD); -1 once it
        #: is complete and waits for the read budget.
        self._head_bytes = 0
        #: Refused at arrival: why (``SHED_*``) until answered, then answered; or dropped.
        self._shed = ADMITTED
        #: Bytes read past this turn's read budget, handled in a later turn (hub.budget).
        self._parked_data: bytes | None = None
        self.limit_frames(host.config.frame_rate, host.config.frame_burst)

    # -- connection ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        shed = self.host.gate.arrive(self)
        if shed == ADMITTED:
            self._pending = True  # the gate times it out (Gate.open_timeout) or sheds it
            return
        self._shed = shed
        if shed == SHED_NOW:
            transport.abort()  # type: ignore[attr-defined]
            return
        # Refused: answered from the request's first bytes, without parsing it — a 503
        # with a Retry-After drawn per refusal (it spreads a reconnect storm out, where a
        # reset would send every agent into ever longer backoff), or the answer to a
        # health probe. A client silent for SHED_WAIT gets the 503 all the same.
        asyncio.get_running_loop().call_later(SHED_WAIT, self._answer_shed, b"")

    def _answer_shed(self, first: bytes) -> None:
        shed = self._shed
        if shed <= ADMITTED or shed == SHED_NOW:
            return
        self._shed = _SHED_ANSWERED
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if first.startswith(_PROBES):
            head, _, rest = first.partition(b" ")
            response = self._probe("/healthz" if rest.startswith(b"/healthz ") else "/readyz")
            if head == b"HEAD":
                response = Response(response.status_code, response.reason_phrase, response.headers)
            transport.write(response.serialize())  # type: ignore[attr-defined]
        else:
            transport.write(self.host.gate.shed_answer(shed, self))  # type: ignore[attr-defined]
        # Half-close and read the request to its end, so that the client gets the answer
        # rather than a reset; a client that never finishes is cut at 2 s.
        if transport.can_write_eof():  # type: ignore[attr-defined]
            transport.write_eof()  # type: ignore[attr-defined]
        asyncio.get_running_loop().call_later(2.0, self.abort)

    def drop(self, answer: bytes | None) -> None:
        """The gate gave up on this connection (half-open and shed or timed out, or a
        refusal already answered): ``answer`` in one write if the socket takes it at once,
        then close — nothing lingers, so a flood of sheds costs the hub no file descriptors.
        Else (or without an answer) the connection is reset."""
        self._pending = False
        self._shed = _DROPPED
        self._parked_data = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if answer is not None and not transport.get_write_buffer_size():
            transport.write(answer)
            if not transport.get_write_buffer_size():
                transport.close()
                return
        transport.abort()

    def tls_progressed(self) -> None:
        """TLS moved on (hub/protocol/tls_layer.py): a fresh open timeout for the next step."""
        if self._pending and self._head_bytes >= 0:
            self.host.gate.progressed(self)

    def _handshake_done(self) -> None:
        if self._pending:
            self._pending = False
            self.host.gate.depart(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._handle_parked()  # bytes that arrived before the close go before it
        self._handshake_done()
        if self._shed in _REFUSING:
            self.host.gate.refusal_ended(self)
        if self._shed:
            self._shed = _DROPPED  # a refusal's timers find nothing left to do
        super().connection_lost(exc)
        self._break_cycles()

    def _break_cycles(self) -> None:
        """Leave nothing for the cyclic garbage collector: free the protocol by reference
        counting the moment the connection goes.

        websockets' parser is a generator that references its protocol, and an error it
        raised (the EOF of a connection closed mid-request, a request it could not read)
        keeps a traceback through the generator's frame. Such a cycle waits for a
        collection, and the hub freezes every survivor once a second (``gc_freeze_interval``):
        a connection that lived past a freeze (every shed or timed-out half-open one) then
        stayed in memory until the hourly full collection — 4.5 KB each, 9 MB a second under
        a flood of 2,000 connections a second (measured).
        """
        protocol = self.protocol
        protocol.parser.close()
        protocol.handshake_exc = None
        protocol.parser_exc = None

    def data_received(self, data: bytes) -> None:
        if self._shed:
            self._answer_shed(data)  # the first bytes decide; the rest is read and dropped
            return
        if self._parked_data is not None:
            self._parked_data += data
            if self._pending:
                self._head_arriving(data, self._parked_data)
        elif (
            self.host.read_budget.spent()
            and self.transport is not None
            # A health probe is cheap and must not wait behind a reconnect storm's
            # thousands of parked handshakes: a late answer fails the probe.
            and not (self.session is None and data.startswith(_PROBES))
        ):
            self._parked_data = data
            self.transport.pause_reading()
            self.host.read_budget.park(self)
            if self._pending:
                self._head_arriving(data, data)
        else:
            self._handle(data)
            if self._pending and not self.closed:
                self._head_arriving(data, b"")

    def _head_arriving(self, data: bytes, parked: bytes) -> None:
        """Bytes of a request not handled yet: a head that is complete (parked, waiting for
        the read budget) is no longer half-open; one growing past MAX_REQUEST_HEAD is 431."""
        if self._head_bytes < 0:
            return  # complete already
        if parked and _HEAD_END in parked[-len(data) - 3 :]:
            self._head_bytes = -1
            self.host.gate.arrived(self)
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_REQUEST_HEAD:
            self._parked_data = None
            self._handshake_done()
            self.respond(
                self.host.gate.refuse(
                    self, 431, "headers_too_large", f"request head over {MAX_REQUEST_HEAD} bytes",
                    None,
                )
            )  # fmt: skip

    def unpark(self) -> None:
        self._handle_parked()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def _handle_parked(self) -> None:
        """Handle bytes the read budget held back (if the close did not already)."""
        data, self._parked_data = self._parked_data, None
        if data is not None:
            self._handle(data)

    def _handle(self, data: bytes) -> None:
        super().data_received(data)
        exc = self.protocol.handshake_exc
        if exc is not None and self._pending:
            # websockets refused the request before it became a Request: a request line
            # or header block too large (it answered 414 or 431), or bytes it could not
            # read as HTTP at all (it hung up without an answer).
            self._handshake_done()
            if isinstance(exc, RequestLineTooLong):
                status: int | None = 414
            elif isinstance(exc, HeaderLineTooLong | TooManyHeaders):
                status = 431
            else:
                status = None
            error = _WEBSOCKETS_ERRORS[status] if status else "bad_request"
            self.host.gate.record_refusal(self, status, error, _describe(exc), None)

    def eof_received(self) -> bool | None:
        if self._shed:
            if self.transport is not None:
                self.transport.close()
            return None
        self._handle_parked()  # bytes that arrived before the end of the stream go before it
        return super().eof_received()

    def on_open(self) -> None:
        if self.session is not None:
            self.session.opened()

    def on_message(self, data: bytes) -> None:
        if self.session is not None:
            self.session.receive(data)

    def on_close(self, code: int, reason: str) -> None:
        session, self.session = self.session, None  # no cycle left for the collector
        if session is not None:
            session.closed(code, reason)

    def on_writable(self) -> None:
        if self.session is not None:
            self.session.writable()

    def on_frame_flood(self) -> None:
        session = self.session
        self.host.auditor.record(
            "message.frame_rate_exceeded",
            actor=session.actor if session is not None else None,
            source=self.peer,
        )

    # -- handshake -----------------------------------------------------------------------

    def on_request(self, request: Request) -> None:
        self._handshake_done()
        path = request.path.partition("?")[0]
        if path not in _CHANNELS:
            self.respond(self._plain(path, request))
            return
        try:
            verdict = self.host.gate.check(request, path, self)
        except NotCached as miss:
            # A credential created moments ago (say, by `tether-hub token create` against
            # this hub's store): look it up without blocking, then check again.
            self.host.spawn(self._check_after_lookup(request, path, miss))
            return
        self._open(request, path, verdict)

    async def _check_after_lookup(self, request: Request, path: str, miss: NotCached) -> None:
        gate = self.host.gate
        try:
            await gate.look_up(miss.credential_id)
        except Exception:
            log.exception("credential lookup failed")
        if self.closed:
            return
        try:
            verdict = gate.check(request, path, self)
        except NotCached:
            verdict = gate.refuse(
                self, 401, "unauthorized", "unknown token", path, [("WWW-Authenticate", "Bearer")]
            )
        self._open(request, path, verdict)

    def _open(self, request: Request, path: str, verdict: Principal | Response) -> None:
        """Upgrade with the principal the gate admitted, or send its refusal."""
        if isinstance(verdict, Response):
            self.respond(verdict)
            return
        host = self.host
        agent_channel = path == AGENT_PATH
        protocol = self.protocol
        assert isinstance(protocol, ServerProtocol)
        offered = offered_subprotocols(request.headers)
        protocol.available_subprotocols = [_CHANNELS[path]] if offered else None  # type: ignore[list-item]
        if not agent_channel and host.config.admin_compression:
            # Level 1: on JSON it compresses nearly as well as the default and 3-4x faster,
            # which matters for multi-megabyte snapshots.
            protocol.available_extensions = [
                ServerPerMessageDeflateFactory(compress_settings={"level": 1, "memLevel": 5})
            ]
            self.max_buffer = host.config.admin_write_buffer
        response = protocol.accept(request)
        if response.status_code != 101:
            # Refused by websockets' checks (key, version, Connection header...), in our
            # format by _ServerProtocol.reject.
            status = response.status_code
            host.gate.record_refusal(
                self,
                status,
                _WEBSOCKETS_ERRORS.get(status, "bad_request"),
                _describe(protocol.handshake_exc),
                path,
            )
            self.respond(response)
            return
        host.gate.accepted(agent_channel)
        self.session = host.open_session(self, verdict, agent_channel)
        self.respond(response)

    def _plain(self, path: str, request: Request) -> Response:
        """Health, readiness and metrics: no credential, no client certificate."""
        if request.method not in ("GET", "HEAD"):
            return self.host.gate.refuse(
                self, 405, "method_not_allowed", f"method {request.method[:20]}", path,
                [("Allow", "GET")],
            )  # fmt: skip
        if path in ("/healthz", "/readyz"):
            return self._probe(path)
        if path == "/metrics":
            return plain_response(
                200, self.host.metrics.exposition(), "text/plain; version=0.0.4; charset=utf-8"
            )
        return self.host.gate.refuse(self, 404, "not_found", "unknown path", path)

    def _probe(self, path: str) -> Response:
        """``/healthz`` (alive) or ``/readyz`` (the store answers, not draining)."""
        if path == "/healthz":
            return json_response(200, {"status": "ok"})
        reason = self.host.not_ready_reason()
        warnings = self.host.readiness_warnings()
        if reason:
            body: dict[str, object] = {"status": "not_ready", "reason": reason}
        else:
            body = {"status": "ready"}
        if warnings:
            body["warnings"] = warnings
        return json_response(503 if reason else 200, body)


def accept(host: ServerHost) -> asyncio.BaseProtocol:
    """A new TCP connection: the hub's connection, inside TLS when the hub serves wss://
    (the context is read per connection: a reloaded CRL swaps it, hub.gate)."""
    conn = HubConnection(host)
    context = host.gate.tls
    return conn if context is None else TlsLayer(conn, context, server_side=True)
