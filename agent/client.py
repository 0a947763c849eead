"""The agent side of the agent channel (PROTOCOL §4): dial, register, heartbeat, obey.

:class:`AgentClient` keeps one agent connected to some hub forever: it dials the next URL,
presents its credential in the upgrade request, sends ``register`` as soon as the WebSocket
opens, and on ``welcome`` starts heartbeating, pinging the hub (to notice a hub that vanished
without closing) and handing commands to its :class:`~agent.executor.Executor`. When the
connection ends it waits as :class:`~hub.protocol.backoff.Backoff` says, honouring the hub's hints
and the close codes of §4.5, and dials again.

Everything on the read path is synchronous callbacks on :class:`AgentConnection`; the only
task per agent is :meth:`AgentClient.run`, asleep between connections. That is what lets one
process simulate ten thousand agents with the same code a real agent runs.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ValidationError
from websockets.client import ClientProtocol

from hub.protocol.backoff import Backoff, Hint
from hub.protocol.codec import LimitExceeded, NotJSON, decode, encode
from hub.protocol.connection import Connection, HandshakeRefused, connect
from hub.protocol.constants import AGENT_PATH, AGENT_SUBPROTOCOL, Close
from hub.protocol.messages import (
    HUB_TO_AGENT,
    Cancel,
    Command,
    ErrorMessage,
    Heartbeat,
    Reconnect,
    Welcome,
    describe_validation_error,
)
from hub.protocol.tls import pin_matches

from . import __version__
from .executor import Executor
from .metrics import MetricsSource
from .profile import AgentProfile
from .proxy import ProxyRefused, ProxySettings, open_tunnel
from .state import Credentials
from .status import StatusReport, close_reason, credential_view

__all__ = ["AgentClient", "AgentConnection", "ClientSettings", "agent_url"]

log = logging.getLogger("tether.agent.client")

AgentStatus = Literal["ok", "degraded", "draining"]

#: Plain-words reasons for the HTTP refusals of PROTOCOL §2, for logs and ``doctor``.
REFUSALS = {
    400: "the hub does not speak tether.agent.v1 (version mismatch)",
    401: "the token is unknown or expired",
    403: "the credential is revoked or not an agent credential (or a client certificate is "
    "required)",
    404: "no Tether agent endpoint at this URL (check the host, port and path)",
    426: "the server wants a plain HTTP request, not a WebSocket (a proxy in the way?)",
    429: "too many failed logins from this address; cooling off",
    503: "the hub is at capacity or overloaded",
}

#: The reason Connection's keepalive closes with (1011) when a pong is late.
KEEPALIVE_TIMEOUT = "keepalive ping timeout"
#: How long a connection whose keepalive timed out waits for the closing handshake.
DEAD_LINK_CLOSE_TIMEOUT = 1.0

#: Background tasks must be referenced somewhere until they finish.
_background: set[asyncio.Task[None]] = set()


def _spawn(coro: Coroutine[Any, Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)


def agent_url(base: str) -> str:
    """The agent endpoint under a ``--hub`` base URL: ``ws://h:p`` → ``ws://h:p/ws``.

    A base with a path keeps it (``wss://proxy/tether`` → ``wss://proxy/tether/ws``), and a
    URL that already names the endpoint is left alone.
    """
    parts = urlsplit(base)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a ws:// or wss:// URL: {base!r}")
    path = parts.path.rstrip("/")
    if not path.endswith(AGENT_PATH):
        path += AGENT_PATH
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


@dataclass(slots=True)
class ClientSettings:
    """What every agent of a process shares (one object for ten thousand simulated ones)."""

    urls: Sequence[str]
    ssl_context: ssl.SSLContext | None = None
    pin_sha256: bytes | None = None
    open_timeout: float = 10.0
    #: How long to wait for ``welcome`` after the upgrade before giving up on a hub.
    welcome_timeout: float = 15.0
    keepalive_interval: float = 30.0
    keepalive_timeout: float = 20.0
    #: Grace given to running commands when the agent stops.
    shutdown_grace: float = 5.0
    #: Outbound proxies (None: always direct, as ``simulate`` dials).
    proxy: ProxySettings | None = None
    #: The client certificate authenticates when no token is presented (mTLS).
    has_certificate: bool = False


class AgentConnection(Connection):
    """One WebSocket to a hub: register on open, then route hub messages to the client."""

    __slots__ = (
        "_corked",
        "_drained",
        "_timer",
        "after_ms",
        "client",
        "credential",
        "done",
        "welcomed",
    )

    def __init__(self, protocol: ClientProtocol, client: AgentClient, credential: str | None):
        super().__init__(protocol)
        self.client = client
        #: The token presented in this connection's upgrade (to know what a 4003 revokes).
        self.credential = credential
        #: Whether ``welcome`` arrived (the message itself is not kept: memory per agent).
        self.welcomed = False
        #: ``reconnect.after_ms`` if the hub sent one before closing.
        self.after_ms: int | None = None
        self.done: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()
        self._drained: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: Messages of this turn of the loop, written together at its end (see send).
        self._corked: list[bytes] | None = None

    # -- Outbound (for the executor) -------------------------------------------------

    def send(self, message: BaseModel) -> bool:
        """Queue a message; everything sent in one turn of the loop leaves in one write.

        A quick command's ``ack`` and ``result`` are sent a moment apart: as one write they
        cost one system call here and one wakeup and read at the hub instead of two (a job
        to 10,000 simulated agents is 20,000 of each). The order of messages is kept.
        """
        if not self.is_open:
            return False
        data = encode(message.model_dump())
        if self._corked is None:
            self._corked = [data]
            asyncio.get_running_loop().call_soon(self._uncork)
        else:
            self._corked.append(data)
        return True

    def _uncork(self) -> None:
        corked, self._corked = self._corked, None
        if corked:
            self.send_texts(corked)

    def close(self, code: int = Close.NORMAL, reason: str = "") -> None:
        self._uncork()  # what was sent goes before the close frame
        if code == Close.INTERNAL_ERROR and reason == KEEPALIVE_TIMEOUT:
            # The hub stopped answering pings: the link is presumed dead, so waiting the
            # usual 5 s for its closing handshake only delays the next dial.
            self.close_timeout = min(self.close_timeout, DEAD_LINK_CLOSE_TIMEOUT)
        super().close(code, reason)

    async def drain(self) -> None:
        self._uncork()  # backpressure is judged on what is written, not on what waits
        if self.writable or self.closed:
            return
        if self._drained is None or self._drained.done():
            self._drained = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._drained)

    def on_writable(self) -> None:
        self._release_drain()

    # -- Connection hooks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        pin = self.client.settings.pin_sha256
        if pin is not None and not pin_matches(transport.get_extra_info("ssl_object"), pin):
            self.client.last_error = "certificate pin mismatch"
            log.error(
                "event=pin_mismatch agent_id=%s peer=%s "
                "hint='the hub certificate is not the one given by --hub-cert-sha256'",
                self.client.profile.agent_id,
                self.peer,
            )
            self.abort()

    def on_open(self) -> None:
        client = self.client
        self.send(client.profile.register(client.executor.registry.capabilities))
        self._timer = asyncio.get_running_loop().call_later(
            client.settings.welcome_timeout, self._no_welcome
        )

    def on_message(self, data: bytes) -> None:
        try:
            message = HUB_TO_AGENT.validate_python(decode(data))
        except NotJSON as exc:
            log.warning("event=bad_frame reason=%r", str(exc))
            self.close(Close.INVALID_DATA, "not JSON")
            return
        except (LimitExceeded, ValidationError) as exc:
            reason = (
                describe_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
            )
            log.warning("event=invalid_message_from_hub reason=%r", reason)
            return
        self.client._on_message(self, message)

    def on_close(self, code: int, reason: str) -> None:
        self._cancel_timer()
        self._release_drain()
        if not self.done.done():
            self.done.set_result((code, reason))

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        # on_close runs only for connections that opened; settle the rest here.
        self.on_close(*self.close_code())

    # -- timers ----------------------------------------------------------------------

    def _no_welcome(self) -> None:
        log.warning(
            "event=no_welcome agent_id=%s after_s=%s",
            self.client.profile.agent_id,
            self.client.settings.welcome_timeout,
        )
        self.client.last_error = "no welcome"
        self.close(Close.NORMAL, "no welcome")

    def start_heartbeat(self, interval: float) -> None:
        self._cancel_timer()
        self._heartbeat(interval)

    def _heartbeat(self, interval: float) -> None:
        if self.closed:
            return
        self.send(self.client.heartbeat())
        self._timer = asyncio.get_running_loop().call_later(interval, self._heartbeat, interval)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _release_drain(self) -> None:
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)


class AgentClient:
    """One agent's life on the agent channel. ``await run()`` until :meth:`shutdown`."""

    __slots__ = (
        "_stopping",
        "_task",
        "_tls_session",
        "_url_index",
        "_wake",
        "attempts",
        "backoff",
        "connection",
        "credentials",
        "executor",
        "last_delay",
        "last_error",
        "metrics",
        "profile",
        "report",
        "settings",
        "source",
        "tls_resumed",
    )

    def __init__(
        self,
        profile: AgentProfile,
        settings: ClientSettings,
        credentials: Credentials,
        executor: Executor,
        metrics: MetricsSource,
        *,
        backoff: Backoff | None = None,
        source: str | None = None,
        report: StatusReport | None = None,
    ) -> None:
        self.profile = profile
        #: ``status.json`` in the state dir (a real agent's; simulated ones keep none).
        self.report = report
        #: The local address to dial from (None: the system's choice); ``simulate`` spreads
        #: its agents over several so that one address's ports do not run out.
        self.source = source
        self.settings = settings
        self.credentials = credentials
        self.executor = executor
        self.metrics = metrics
        self.backoff = backoff if backoff is not None else Backoff()
        #: The live connection (welcomed or not), or None between connections.
        self.connection: AgentConnection | None = None
        #: Dials so far, and why the last one did not stay up (for ``simulate``'s summary).
        self.attempts = 0
        self.last_error: str | None = None
        #: The wait chosen after the last connection ended, in seconds.
        self.last_delay: float | None = None
        #: The last TLS session with a ticket, and the URL it is for: offered at the next
        #: dial there, a returning agent skips the certificate exchange and signatures (the
        #: hub's CPU in a reconnect storm). In memory only: a ticket is a credential.
        self._tls_session: tuple[str, ssl.SSLSession] | None = None
        #: Whether the last TLS connection resumed a session (None: not TLS).
        self.tls_resumed: bool | None = None
        self._url_index = 0
        self._stopping = False
        self._task: asyncio.Task[Any] | None = None
        self._wake: asyncio.Future[None] | None = None

    @property
    def registered(self) -> bool:
        connection = self.connection
        return connection is not None and connection.welcomed and connection.is_open

    @property
    def status(self) -> AgentStatus:
        if self._stopping or not self.executor.accepting:
            return "draining"
        return "degraded" if self.executor.degraded else "ok"

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(type="heartbeat", metrics=self.metrics.sample(), status=self.status)

    # -- life cycle ------------------------------------------------------------------

    async def run(self) -> None:
        """Stay connected to some hub until :meth:`shutdown`."""
        self._task = asyncio.current_task()
        try:
            await self._run()
        except asyncio.CancelledError:
            if not self._stopping:
                raise
        finally:
            self._task = None

    async def _run(self) -> None:
        urls = self.settings.urls
        while not self._stopping:
            url = urls[self._url_index % len(urls)]
            try:
                hint, rotate = await self._session(url)
            except Exception as exc:
                # Whatever went wrong (a bug, an input nobody foresaw), the agent keeps
                # dialing: an agent whose loop ended is lost until someone logs in to it.
                log.exception(
                    "event=session_failed agent_id=%s url=%s error=%r",
                    self.profile.agent_id,
                    url,
                    exc,
                )
                self.connection = None
                self.last_error = f"internal: {type(exc).__name__}"
                hint, rotate = None, True
            if self._stopping:
                break
            if rotate and len(urls) > 1:
                self._url_index = (self._url_index + 1) % len(urls)
            delay = self.last_delay = self.backoff.next_delay(hint)
            if self.report is not None:
                self.report.waiting(delay)
            log.info(
                "event=reconnect_wait agent_id=%s delay_s=%.2f attempt=%d",
                self.profile.agent_id,
                delay,
                self.backoff.attempt,
            )
            await self._sleep(delay)

    async def shutdown(self) -> None:
        """Drain: report ``draining``, let running commands end (or stop them), close 1000."""
        self._stopping = True
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)
        elif self.connection is None and self._task is not None:
            self._task.cancel()  # dialing: nothing to close, stop waiting for the hub
        connection = self.connection
        if connection is not None and connection.welcomed:
            connection.send(self.heartbeat())
        await self.executor.shutdown(self.settings.shutdown_grace)
        connection = self.connection
        if connection is not None:
            connection.close(Close.NORMAL, "agent stopping")
            await asyncio.wait([connection.done], timeout=connection.close_timeout + 1)
        if self.report is not None:
            self.report.stopped()

    # -- one connection --------------------------------------------------------------

    async def _session(self, url: str) -> tuple[Hint | None, bool]:
        """Dial once and stay until the connection ends; returns the backoff hint and
        whether to try the next URL."""
        agent_id = self.profile.agent_id
        credential = self.credentials.current()
        self.attempts += 1
        self.last_error = None
        target = agent_url(url)
        settings = self.settings
        route = settings.proxy.route(target) if settings.proxy is not None else None
        report = self.report
        if report is not None:
            view = credential_view(credential, settings.has_certificate)
            report.connecting(url, view, route.reason if route is not None else None)
        try:
            async with asyncio.timeout(settings.open_timeout):
                sock = None
                if route is not None and route.proxy is not None:
                    parts = urlsplit(target)
                    port = parts.port or (443 if parts.scheme == "wss" else 80)
                    sock = await open_tunnel(
                        route.proxy, parts.hostname or "", port, settings.open_timeout
                    )
                connection = await connect(
                    target,
                    lambda protocol: AgentConnection(protocol, self, credential),
                    headers=_headers(credential),
                    subprotocols=[AGENT_SUBPROTOCOL],
                    ssl_context=settings.ssl_context,
                    open_timeout=settings.open_timeout,
                    local_addr=(self.source, 0) if self.source else None,
                    sock=sock,
                    tls_session=self._offered_session(target),
                )
        except HandshakeRefused as exc:
            hint = await self._refused(url, exc, credential)
            if report is not None:
                words = REFUSALS.get(exc.status, "unexpected answer")
                report.ended(None, f"HTTP {exc.status} at the upgrade: {words}")
            return hint, True
        except ProxyRefused as exc:
            self.last_error = f"proxy: {exc.stage}"
            log.warning(
                "event=proxy_failed agent_id=%s url=%s reason=%r", agent_id, url, exc.reason
            )
            if report is not None:
                report.ended(None, exc.reason)
            return None, True
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            if report is not None:
                report.ended(None, f"could not connect: {str(exc) or type(exc).__name__}")
            self.last_error = self.last_error or f"connect: {type(exc).__name__}"
            log.warning(
                "event=connect_failed agent_id=%s url=%s error=%r", agent_id, url, str(exc) or exc
            )
            refused = isinstance(exc, ConnectionRefusedError)
            return (Hint(refused=True) if refused else None), True
        assert isinstance(connection, AgentConnection)
        self._keep_session(target, connection)
        self.connection = connection
        try:
            if self._stopping:
                connection.close(Close.NORMAL, "agent stopping")
            code, reason = await connection.done
        except asyncio.CancelledError:
            connection.abort()
            raise
        finally:
            self.connection = None
            if self.executor.outbound is connection:
                self.executor.outbound = None
        if report is not None and not (self._stopping and code == Close.NORMAL):
            report.ended(code, close_reason(code, reason))
        return await self._closed(url, connection, code, reason)

    def _offered_session(self, target: str) -> ssl.SSLSession | None:
        kept = self._tls_session
        return kept[1] if kept is not None and kept[0] == target else None

    def _keep_session(self, target: str, connection: AgentConnection) -> None:
        """The hub's ticket came before its 101: keep the session it resumes."""
        transport = connection.transport
        sslobj = transport.get_extra_info("ssl_object") if transport is not None else None
        if sslobj is None:
            self.tls_resumed = None
            return
        self.tls_resumed = sslobj.session_reused
        session = sslobj.session
        if session is not None and session.has_ticket:
            self._tls_session = (target, session)

    async def _refused(
        self, url: str, exc: HandshakeRefused, credential: str | None
    ) -> Hint | None:
        agent_id = self.profile.agent_id
        status = exc.status
        self.last_error = f"HTTP {status}"
        explanation = REFUSALS.get(status, "unexpected answer")
        if status == 403:
            log.error(
                "event=credential_forbidden agent_id=%s url=%s credential=%s error=%s "
                "reason=%r hint='not using this credential again; retrying in 10+ minutes'",
                agent_id,
                url,
                self.credentials.kind,
                exc.error,
                explanation,
            )
            if await self.credentials.revoked(credential):
                return None  # a new agent key appeared in the state dir: use it soon
            return Hint(close_code=Close.REVOKED)
        if status == 401:
            self.credentials.refused(credential)
        log.warning(
            "event=handshake_refused agent_id=%s url=%s status=%d error=%s reason=%r",
            agent_id,
            url,
            status,
            exc.error,
            explanation,
        )
        return Hint(retry_after=exc.retry_after)

    async def _closed(
        self, url: str, connection: AgentConnection, code: int, reason: str
    ) -> tuple[Hint | None, bool]:
        agent_id = self.profile.agent_id
        welcomed = connection.welcomed
        if code == Close.SUPERSEDED:
            self.last_error = "superseded (4001)"
            log.error(
                "event=superseded agent_id=%s url=%s "
                "message='two processes claim agent id %s: another connection with this id "
                "replaced this one; check for a duplicate agent'",
                agent_id,
                url,
                agent_id,
            )
        elif code == Close.REVOKED:
            self.last_error = "revoked (4003)"
            log.error(
                "event=credential_revoked agent_id=%s url=%s credential=%s "
                "hint='not using this credential again; retrying in 10+ minutes'",
                agent_id,
                url,
                self.credentials.kind,
            )
            if await self.credentials.revoked(connection.credential):
                # A new agent key appeared in the state dir: a fresh credential, not a retry
                # of the revoked one, so the ordinary backoff applies.
                return None, False
        elif code == Close.NORMAL and self._stopping:
            log.info("event=closed agent_id=%s code=1000", agent_id)
        elif not welcomed and code == Close.POLICY:
            self.last_error = "registration refused (1008)"
            log.error(
                "event=registration_refused agent_id=%s url=%s reason=%r hint='identity not "
                "allowed for this credential, enrollment key used up, or register invalid'",
                agent_id,
                url,
                reason,
            )
        else:
            self.last_error = self.last_error or f"closed {code}"
            level = (
                logging.INFO
                if code in (Close.GOING_AWAY, Close.SERVICE_RESTART)
                else (logging.WARNING)
            )
            log.log(
                level,
                "event=disconnected agent_id=%s url=%s code=%d reason=%r",
                agent_id,
                url,
                code,
                reason,
            )
        hint = Hint(close_code=code, after_ms=connection.after_ms)
        rotate = not welcomed or code in (Close.GOING_AWAY, Close.SERVICE_RESTART)
        return hint, rotate

    # -- messages from the hub (synchronous, on the read path) -----------------------

    def _on_message(
        self,
        connection: AgentConnection,
        message: Welcome | Command | Cancel | Reconnect | ErrorMessage,
    ) -> None:
        if type(message) is Command:
            if connection.welcomed:
                self.executor.on_command(message)
        elif type(message) is Cancel:
            self.executor.on_cancel(message.command_id)
        elif type(message) is Welcome:
            self._on_welcome(connection, message)
        elif type(message) is Reconnect:
            connection.after_ms = message.after_ms
            log.info(
                "event=reconnect_requested agent_id=%s after_ms=%d reason=%r",
                self.profile.agent_id,
                message.after_ms,
                message.reason,
            )
        elif type(message) is ErrorMessage:
            log.warning(
                "event=hub_error agent_id=%s code=%s ref=%r message=%r",
                self.profile.agent_id,
                message.code,
                message.ref,
                message.message,
            )

    def _on_welcome(self, connection: AgentConnection, welcome: Welcome) -> None:
        if connection.welcomed:
            return
        connection.welcomed = True
        self.backoff.registered()
        self.executor.clock_offset = _clock_offset(welcome.server_time)
        self.executor.outbound = connection
        if welcome.agent_key:
            _spawn(self.credentials.issued(welcome.agent_key))
        settings = self.settings
        connection.start_keepalive(settings.keepalive_interval, settings.keepalive_timeout)
        connection.start_heartbeat(welcome.heartbeat_interval)
        if self.report is not None:
            if welcome.agent_key:  # enrolled: the key issued is the credential from now on
                self.report.credential = credential_view(welcome.agent_key)
            self.report.connected(welcome.hub_id)
        log.info(
            "event=registered agent_id=%s hub_id=%s session_id=%s heartbeat_s=%g "
            "credential=%s new_key=%s",
            self.profile.agent_id,
            welcome.hub_id,
            welcome.session_id,
            welcome.heartbeat_interval,
            self.credentials.kind,
            welcome.agent_key is not None,
        )

    async def _sleep(self, delay: float) -> None:
        """Sleep, but wake at once on :meth:`shutdown`."""
        if self._stopping:
            return
        loop = asyncio.get_running_loop()
        wake = self._wake = loop.create_future()
        timer = loop.call_later(delay, _settle, wake)
        try:
            await wake
        finally:
            timer.cancel()
            self._wake = None


def _headers(credential: str | None) -> list[tuple[str, str]]:
    """Upgrade headers; built in a call of its own so no frame keeps them for the session."""
    headers = [("User-Agent", f"tether-agent/{__version__}")]
    if credential is not None:
        headers.append(("Authorization", f"Bearer {credential}"))
    return headers


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _clock_offset(server_time: str) -> float:
    """Hub clock minus ours; 0 when the hub's time cannot be read."""
    try:
        return datetime.fromisoformat(server_time).timestamp() - time.time()
    except ValueError:
        return 0.0
