"""The hub's one port: ``/ws``, ``/admin``, ``/healthz``, ``/readyz``, ``/metrics``.

Every connection starts as a :class:`HubConnection`. The opening handshake is checked in
the order of PROTOCOL §2 and refused with an HTTP status before any WebSocket exists:
path, Origin, credential (with the failed-auth cool-off), revocation and channel,
admission, subprotocol. All checks run synchronously on in-memory state, so a handshake
costs one pass through this module and never waits on the store.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import socket
from typing import TYPE_CHECKING, Any

from websockets.datastructures import Headers
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

from .admin import AdminSession
from .agent_session import AgentSession
from .auth import AuthFailure, NotCached, Principal
from .channel import Session
from .protocol.codec import encode
from .protocol.connection import WIRE_LOGGER, Connection
from .protocol.constants import (
    ADMIN_PATH,
    ADMIN_SUBPROTOCOL,
    AGENT_PATH,
    AGENT_SUBPROTOCOL,
    MAX_MESSAGE_BYTES,
)

if TYPE_CHECKING:
    from .app import Hub

log = logging.getLogger(__name__)

__all__ = ["HubConnection", "json_response", "listen_now"]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    414: "URI Too Long",
    426: "Upgrade Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
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
_OVERLOADED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Content-Length: 22\r\nRetry-After: %d\r\nCache-Control: no-store\r\n"
    b"Connection: close\r\n\r\n"
    b'{"error":"overloaded"}'
)


#: Requests answered even past the pending-handshake cap, told apart by their first bytes: a
#: load balancer that got 503 from a busy hub's health check would take it out of rotation.
_PROBES = (b"GET /healthz ", b"HEAD /healthz ", b"GET /readyz ", b"HEAD /readyz ")
#: How long a connection past the cap may take to send its request before it gets the 503.
SHED_WAIT = 1.0
#: A shed connection: waiting for its first bytes (the hub's cap, or its address's), answered.
_SHED_WAITING, _SHED_WAITING_SOURCE, _SHED_ANSWERED = 1, 2, 3


def json_response(status: int, body: Any, headers: list[tuple[str, str]] | None = None) -> Response:
    return _response(status, encode(body), "application/json", headers)


def _response(
    status: int, body: bytes, content_type: str, extra: list[tuple[str, str]] | None = None
) -> Response:
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("Connection", "close"),
        ]
    )
    for name, value in extra or ():
        headers[name] = value
    return Response(status, _REASONS.get(status, "Error"), headers, body)


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

    __slots__ = ("_open_timer", "_parked_data", "_shed", "_source", "hub", "session")

    def __init__(self, hub: Hub) -> None:
        protocol = _ServerProtocol(max_size=MAX_MESSAGE_BYTES, logger=WIRE_LOGGER)
        super().__init__(protocol, max_buffer=hub.config.agent_write_buffer)
        self.hub = hub
        self.session: Session | None = None
        self._open_timer: asyncio.TimerHandle | None = None
        #: Past the pending-handshake cap: 0 no, then waiting for the request, then answered.
        self._shed = 0
        #: The source address counted in ``hub.pending_by_source`` while the handshake runs.
        self._source: str | None = None
        #: Bytes read past this turn's read budget, handled in a later turn (hub.budget).
        self._parked_data: bytes | None = None
        self.limit_frames(hub.config.frame_rate, hub.config.frame_burst)

    # -- connection ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        hub = self.hub
        per_source = hub.config.max_pending_per_source
        over_source = per_source and hub.pending_by_source.get(self.peer, 0) >= per_source
        if hub.pending_handshakes >= hub.config.max_pending_handshakes or over_source:
            # Shed: answered from the request's first bytes, without parsing it — a 503
            # with a Retry-After drawn per refusal (it spreads a reconnect storm out, where
            # a reset would send every agent into ever longer backoff), or the answer to a
            # health probe. A client silent for SHED_WAIT gets the 503 all the same. One
            # address past its own share is shed the same way, so that it cannot hold every
            # pending place and shed everyone else.
            self._shed = _SHED_WAITING_SOURCE if over_source else _SHED_WAITING
            self._open_timer = None
            asyncio.get_running_loop().call_later(SHED_WAIT, self._answer_shed, b"")
            return
        hub.pending_handshakes += 1
        if per_source:
            self._source = self.peer
            hub.pending_by_source[self.peer] = hub.pending_by_source.get(self.peer, 0) + 1
        self._open_timer = asyncio.get_running_loop().call_later(
            hub.config.open_timeout, self._handshake_timeout
        )

    def _answer_shed(self, first: bytes) -> None:
        shed = self._shed
        if shed not in (_SHED_WAITING, _SHED_WAITING_SOURCE):
            return
        self._shed = _SHED_ANSWERED
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        hub = self.hub
        if first.startswith(_PROBES):
            head, _, rest = first.partition(b" ")
            response = self._probe("/healthz" if rest.startswith(b"/healthz ") else "/readyz")
            if head == b"HEAD":
                response = Response(response.status_code, response.reason_phrase, response.headers)
            transport.write(response.serialize())  # type: ignore[attr-defined]
        else:
            hub.metrics.connection(
                "source_overloaded" if shed == _SHED_WAITING_SOURCE else "overloaded"
            )
            transport.write(_OVERLOADED % hub.busy_refusals.retry_after())  # type: ignore[attr-defined]
        # Half-close and read the request to its end, so that the client gets the answer
        # rather than a reset; a client that never finishes is cut at 2 s.
        if transport.can_write_eof():  # type: ignore[attr-defined]
            transport.write_eof()  # type: ignore[attr-defined]
        asyncio.get_running_loop().call_later(2.0, self.abort)

    def _handshake_timeout(self) -> None:
        self._open_timer = None
        self._not_pending()
        self.hub.metrics.connection("handshake_timeout")
        self.abort()

    def _handshake_done(self) -> None:
        if self._open_timer is not None:
            self._open_timer.cancel()
            self._open_timer = None
            self._not_pending()

    def _not_pending(self) -> None:
        hub = self.hub
        hub.pending_handshakes -= 1
        source = self._source
        if source is not None:
            self._source = None
            left = hub.pending_by_source[source] - 1
            if left:
                hub.pending_by_source[source] = left
            else:
                del hub.pending_by_source[source]

    def connection_lost(self, exc: Exception | None) -> None:
        self._handle_parked()  # bytes that arrived before the close go before it
        self._handshake_done()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._shed:
            self._answer_shed(data)  # the first bytes decide; the rest is read and dropped
            return
        if self._parked_data is not None:
            self._parked_data += data
        elif (
            self.hub.read_budget.spent()
            and self.transport is not None
            # A health probe is cheap and must not wait behind a reconnect storm's
            # thousands of parked handshakes: a late answer fails the probe.
            and not (self.session is None and data.startswith(_PROBES))
        ):
            self._parked_data = data
            self.transport.pause_reading()
            self.hub.read_budget.park(self)
        else:
            self._handle(data)

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
        if exc is not None and self._open_timer is not None:
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
            self._record_refusal(status, error, _describe(exc), None)

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
        self.hub.auditor.record(
            "message.frame_rate_exceeded",
            actor=session.actor if session is not None else None,
            source=self.peer,
        )

    # -- handshake -----------------------------------------------------------------------

    def on_request(self, request: Request) -> None:
        self._handshake_done()
        path = request.path.partition("?")[0]
        channel = _CHANNELS.get(path)
        if channel is None:
            self.respond(self._plain(path, request))
            return
        try:
            response = self._check(request, path, channel)
        except NotCached as miss:
            # A credential created moments ago (say, by `tether-hub token create` against
            # this hub's store): look it up without blocking, then check again.
            task = asyncio.ensure_future(self._check_after_lookup(request, path, channel, miss))
            self.hub.tasks.add(task)
            task.add_done_callback(self.hub.tasks.discard)
            return
        if response is not None:
            self.respond(response)

    async def _check_after_lookup(
        self, request: Request, path: str, channel: str, miss: NotCached
    ) -> None:
        try:
            await self.hub.credentials.look_up(miss.credential_id)
        except Exception:
            log.exception("credential lookup failed")
        if self.closed:
            return
        try:
            response = self._check(request, path, channel)
        except NotCached:
            response = self._refuse(
                401, "unauthorized", "unknown token", path, [("WWW-Authenticate", "Bearer")]
            )
        if response is not None:
            self.respond(response)

    def _plain(self, path: str, request: Request) -> Response:
        """Health, readiness and metrics: no credential, no client certificate."""
        hub = self.hub
        if request.method not in ("GET", "HEAD"):
            return self._refuse(
                405, "method_not_allowed", f"method {request.method[:20]}", path, [("Allow", "GET")]
            )
        if path in ("/healthz", "/readyz"):
            return self._probe(path)
        if path == "/metrics":
            return _response(
                200, hub.metrics.exposition(), "text/plain; version=0.0.4; charset=utf-8"
            )
        return self._refuse(404, "not_found", "unknown path", path)

    def _probe(self, path: str) -> Response:
        """``/healthz`` (alive) or ``/readyz`` (the store answers, not draining)."""
        if path == "/healthz":
            return json_response(200, {"status": "ok"})
        reason = self.hub.not_ready_reason()
        if reason:
            return json_response(503, {"status": "not_ready", "reason": reason})
        return json_response(200, {"status": "ready"})

    def _refuse(
        self,
        status: int,
        error: str,
        reason: str,
        path: str,
        headers: list[tuple[str, str]] | None = None,
    ) -> Response:
        self._record_refusal(status, error, reason, path)
        return json_response(status, {"error": error}, headers)

    def _refuse_full(self, reason: str, path: str) -> Response:
        """503 at a connection limit. Full, not busy: the Retry-After is drawn from 1 s up to
        twice the setting, so refused clients come back spread out instead of in one wave
        that is refused again."""
        retry = random.randint(1, 2 * self.hub.config.overload_retry_after)
        return self._refuse(503, "overloaded", reason, path, [("Retry-After", str(retry))])

    def _record_refusal(
        self, status: int | None, error: str, reason: str, path: str | None
    ) -> None:
        """Every refusal is counted and audited with its source (PROTOCOL §2); ``status``
        is None for a request dropped without an answer."""
        hub = self.hub
        hub.metrics.connection(error)
        hub.auditor.record(
            "connection.refused",
            source=self.peer,
            status=status,
            error=error,
            reason=reason,
            path=path[:200] if path is not None else None,
        )

    def _check(self, request: Request, path: str, subprotocol: str) -> Response | None:
        hub = self.hub
        headers = request.headers
        if request.method != "GET":
            return self._refuse(
                405, "method_not_allowed", f"method {request.method[:20]}", path, [("Allow", "GET")]
            )
        # Headers.get raises on a repeated name. Origin and Authorization are singletons
        # (RFC 6454 §7.3, RFC 9110 §11.6.2): two of them are a malformed request, and a
        # way to smuggle an origin past a check that reads only one of them.
        for name in ("Origin", "Authorization"):
            if len(headers.get_all(name)) > 1:
                return self._refuse(400, "bad_request", f"repeated {name} header", path)
        if self.early_data:
            # Whether the credential was cached or looked up: frames pipelined behind the
            # request never reach a session.
            return self._refuse(400, "bad_request", "frames sent before the handshake", path)
        if "websocket" not in ", ".join(headers.get_all("Upgrade")).lower():
            return self._refuse(
                426, "upgrade_required", "no websocket upgrade", path, [("Upgrade", "websocket")]
            )

        origin = headers.get("Origin")
        if origin is not None and origin not in hub.config.allowed_origins:
            return self._refuse(403, "origin_not_allowed", f"origin {origin[:200]!r}", path)

        if hub.config.require_client_cert and not hub.has_client_certificate(self):
            return self._refuse(403, "forbidden", "no client certificate", path)

        try:
            principal = self._authenticate(headers)
        except AuthFailure as failure:
            if failure.status == 401:
                retry = hub.failures.cooling_down(self.peer)
                hub.failures.failed(self.peer)
                if retry:
                    return self._refuse(
                        429, "rate_limited", failure.reason, path, [("Retry-After", str(retry))]
                    )
                return self._refuse(
                    401, "unauthorized", failure.reason, path, [("WWW-Authenticate", "Bearer")]
                )
            return self._refuse(403, "forbidden", failure.reason, path)

        agent_channel = path == AGENT_PATH
        if principal.is_agent != agent_channel:
            return self._refuse(403, "forbidden", f"{principal.kind} credential on {path}", path)

        if agent_channel:
            takeover = principal.agent_id is not None and principal.agent_id in hub.registry.live
            if hub.registry.connected >= hub.config.max_agents and not takeover:
                return self._refuse_full("agent limit", path)
            if not hub.handshake_rate.take():
                retry = hub.busy_refusals.retry_after()
                return self._refuse(
                    503, "overloaded", "handshake rate", path, [("Retry-After", str(retry))]
                )
        else:
            limit = hub.admin_limit_reached(principal)
            if limit is not None:
                return self._refuse_full(limit, path)

        offered = [
            p.strip()
            for value in headers.get_all("Sec-WebSocket-Protocol")
            for p in value.split(",")
            if p.strip()
        ]
        if offered and subprotocol not in offered:
            return self._refuse(400, "unsupported_subprotocol", f"offered {offered[:5]}", path)

        protocol = self.protocol
        assert isinstance(protocol, ServerProtocol)
        protocol.available_subprotocols = [subprotocol] if offered else None  # type: ignore[list-item]
        if not agent_channel and hub.config.admin_compression:
            # Level 1: on JSON it compresses nearly as well as the default and 3-4x faster,
            # which matters for multi-megabyte snapshots.
            protocol.available_extensions = [
                ServerPerMessageDeflateFactory(compress_settings={"level": 1, "memLevel": 5})
            ]
            self.max_buffer = hub.config.admin_write_buffer
        response = protocol.accept(request)
        if response.status_code != 101:
            # Refused by websockets' checks (key, version, Connection header...), in our
            # format by _ServerProtocol.reject.
            status = response.status_code
            self._record_refusal(
                status,
                _WEBSOCKETS_ERRORS.get(status, "bad_request"),
                _describe(protocol.handshake_exc),
                path,
            )
            self.respond(response)
            return None
        hub.metrics.connection("accepted")
        if agent_channel:
            hub.busy_refusals.admitted()
        self.session = (
            AgentSession(hub, self, principal)
            if agent_channel
            else AdminSession(hub, self, principal)
        )
        self.respond(response)
        return None

    def _authenticate(self, headers: Headers) -> Principal:
        hub = self.hub
        authorization = headers.get("Authorization")
        if authorization is None:
            identity = hub.certificate_identity(self)
            if identity is not None:
                return identity
            raise AuthFailure(401, "no credential")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthFailure(401, "malformed authorization header")
        return hub.authenticate(token.strip(), self)


def listen_now(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Bound, listening sockets for ``host:port``, one per address, to be served later.

    A hub listens before it loads its state: while it reads tens of thousands of agents
    back in, connections of a fleet that was just sent away wait in the kernel's backlog
    instead of being refused (a refusal means a retry later; a wait is answered as soon as
    the hub serves). ``socket.create_server`` makes each as ``create_server`` would:
    ``SO_REUSEADDR``, IPv6 sockets IPv6-only.
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, address in dict.fromkeys((info[0], info[4]) for info in infos):
            sock = socket.create_server(address, family=family, backlog=backlog)
            sockets.append(sock)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
