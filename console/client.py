"""The console's session on the hub's admin channel, as Qt signals.

:class:`HubSession` keeps one :class:`hub.protocol.client.AdminClient` open: it connects,
subscribes, hands the snapshot to whoever listens (the fleet model) and then the events,
gathered per turn of the event loop into one list. When the connection drops it reconnects
by itself with exponential backoff and **full jitter** (the n-th retry waits a random time in
``[0, min(cap, base·2ⁿ)]``; the count resets once a connection has stayed up for 30 s), and
on every new connection it subscribes again, so the model is replaced from a fresh
snapshot. ``resync`` + ``snapshot`` from the hub pass through in order.

With several hub URLs (a cluster: every hub serves the whole fleet) a connection that
fails or drops moves on to the **next URL at once**; only a full round of URLs that all
failed costs a backoff step, so a console whose hub was killed is on another hub within a
second, its model replaced from that hub's snapshot. One URL behaves as before.

A refused credential (HTTP 401/403) or a revoked one (close 4003) stops the retries: trying
the same token again would only feed the hub's failed-authentication counter.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import ssl
import time
from collections.abc import Sequence
from typing import Any

from PySide6.QtCore import QObject, Signal

from hub.protocol.backoff import Backoff, Hint
from hub.protocol.client import AdminClient, AdminError, HandshakeRefused, admin_url
from hub.protocol.constants import Close

log = logging.getLogger(__name__)

__all__ = ["AdminError", "Backoff", "ConnState", "HubSession", "Rotation"]

#: The console's cap: an operator waits for a hub that is back, not a minute more.
BACKOFF_CAP = 30.0

TOPICS = ("agents", "commands", "alerts", "metrics")
#: A connection that stayed up this long resets the backoff.
STABLE_AFTER = 30.0


class ConnState(enum.StrEnum):
    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    FAILED = "failed"  # credential refused or revoked: no automatic retry
    CLOSED = "closed"


class Rotation:
    """Which of several hub URLs to dial next, and when a round of them has failed. Pure.

    Each failure moves to the next URL; a connection ends the round. Only when every URL
    failed since the last connection does :meth:`failed` say so (the caller then waits its
    backoff), and the next round starts from the URL after the last one tried.
    """

    __slots__ = ("index", "misses", "urls")

    def __init__(self, urls: Sequence[str]) -> None:
        if not urls:
            raise ValueError("at least one hub URL is needed")
        self.urls = list(urls)
        self.index = 0  # the URL tried now, or connected to
        self.misses = 0  # failures since the last connection

    @property
    def current(self) -> str:
        return self.urls[self.index]

    def connected(self) -> None:
        self.misses = 0

    def failed(self) -> bool:
        """The current URL failed: move on; True when that ended a round of failures."""
        self.misses += 1
        self.index = (self.index + 1) % len(self.urls)
        if self.misses < len(self.urls):
            return False
        self.misses = 0
        return True


class HubSession(QObject):
    """One admin token on one hub at a time (of one or several URLs); reconnects, failing
    over to the next URL, until :meth:`stop`."""

    state_changed = Signal(str, str)  # ConnState value, human-readable detail
    snapshot_received = Signal(object)  # dict: the subscribe reply's data
    history_received = Signal(object)  # dict: the metrics_history reply's data
    events_received = Signal(object)  # list of events (and resync/snapshot markers), in order

    def __init__(
        self,
        hub_url: str | Sequence[str],
        token: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        pin_sha256: bytes | None = None,
        topics: tuple[str, ...] = TOPICS,
        backoff: Backoff | None = None,
        open_timeout: float = 10.0,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.rotation = Rotation([hub_url] if isinstance(hub_url, str) else hub_url)
        self.hub_urls = self.rotation.urls
        #: The URL of the last connection that subscribed, and how often the session
        #: came back on another URL than the one before (a failover).
        self.connected_url: str | None = None
        self.failovers = 0
        self._token = token
        self.ssl_context = ssl_context
        self.pin_sha256 = pin_sha256
        self.topics = topics
        self.backoff = backoff or Backoff(cap=BACKOFF_CAP, reset_after=STABLE_AFTER)
        self.open_timeout = open_timeout
        self.state = ConnState.IDLE
        self.detail = ""
        self.client: AdminClient | None = None
        self.connections = 0  # successful subscribes, ever
        self.messages_total = 0  # events received (batches unpacked)
        self.retry_at: float | None = None  # monotonic time of the next attempt
        self.last_error = ""
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._pending: list[dict[str, Any]] = []
        self._holding = False
        self._flush_scheduled = False
        self._connected_since: float | None = None

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Close the WebSocket (1000) first, then end the task."""
        self._stopping = True
        self._wake.set()
        client = self.client
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._set_state(ConnState.CLOSED, "disconnected")

    def reconnect_now(self) -> None:
        """Skip the rest of a backoff wait (also restarts after a refused credential)."""
        self.backoff.reset()
        self._wake.set()
        if self._task is None or self._task.done():
            self.start()

    @property
    def hub_url(self) -> str:
        """The hub URL connected to, or tried now."""
        return self.rotation.current

    @property
    def url(self) -> str:
        return admin_url(self.hub_url)

    @property
    def is_connected(self) -> bool:
        return self.state == ConnState.CONNECTED and self.client is not None

    # -- requests ------------------------------------------------------------------------

    async def request(self, request_type: str, /, **fields: Any) -> Any:
        """One request on the current connection; AdminError or ConnectionError."""
        client = self.client
        if client is None or not client.is_open:
            raise ConnectionError("not connected to the hub")
        return await client.request(request_type, **fields)

    async def resync(self) -> None:
        """Subscribe again on the open connection: the model is replaced from the snapshot."""
        client = self.client
        if client is None or not client.is_open:
            self.reconnect_now()
            return
        await self._subscribe(client)

    # -- the connection loop -------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            first = not (self.connections or self.backoff.attempt or self.rotation.misses)
            self._set_state(
                ConnState.CONNECTING if first else ConnState.RECONNECTING,
                f"connecting to {self.hub_url}",
            )
            hint = await self._connect_once()
            if self._stopping or hint is None:
                return
            delay = self._next_try(hint)
            if delay <= 0:
                continue
            self.retry_at = time.monotonic() + delay
            self._set_state(
                ConnState.RECONNECTING,
                f"{self.last_error}; retrying in {delay:.1f} s"
                if self.last_error
                else f"retrying in {delay:.1f} s",
            )
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self.retry_at = None

    def _next_try(self, hint: Hint) -> float:
        """After a failed or ended connection: the next URL, and how long to wait for it.

        Another URL is tried at once until every one failed since the last connection;
        then the backoff decides, and a new round starts from the next URL."""
        return self.backoff.next_delay(hint) if self.rotation.failed() else 0.0

    async def _connect_once(self) -> Hint | None:
        """One connection from open to close; what it taught (for the backoff), None to stop."""
        url = self.hub_url
        client = AdminClient(
            url,
            self._token,
            ssl_context=self.ssl_context if url.startswith("wss://") else None,
            pin_sha256=self.pin_sha256,
            on_event=self._on_event,
            open_timeout=self.open_timeout,
        )
        try:
            await client.open()
        except HandshakeRefused as exc:
            reason = exc.error or f"HTTP {exc.status}"
            if exc.status in (401, 403):
                self.last_error = f"{url} refused the token ({exc.status} {reason})"
                self._set_state(ConnState.FAILED, self.last_error)
                return None
            self.last_error = f"{url} refused the connection ({exc.status} {reason})"
            return Hint(retry_after=exc.retry_after)
        except (OSError, TimeoutError, ssl.SSLError, ValueError) as exc:
            self.last_error = f"{url}: {_describe(exc)}"
            return Hint()
        self.client = client
        try:
            await self._subscribe(client)
        except AdminError as exc:
            self.last_error = f"subscribe refused: {exc.code} {exc.message}"
            await client.close()
            self.client = None
            self._set_state(ConnState.FAILED, self.last_error)
            return None
        except (ConnectionError, TimeoutError) as exc:
            self.last_error = f"{url}: {_describe(exc)}"
            await client.close()
            self.client = None
            return Hint()
        self.connections += 1
        self.rotation.connected()
        self.last_error = ""
        self._connected_since = time.monotonic()
        previous, self.connected_url = self.connected_url, url
        if previous is not None and previous != url:
            self.failovers += 1
            self._set_state(
                ConnState.CONNECTED, f"connected to {url} (failed over from {previous})"
            )
        else:
            self._set_state(ConnState.CONNECTED, f"connected to {url}")
        await self._load_history(client)
        await client.wait_closed()
        self.client = None
        code = client.close_code
        if self._connected_since is not None:
            if time.monotonic() - self._connected_since >= STABLE_AFTER:
                self.backoff.reset()
            self._connected_since = None
        if self._stopping:
            return None
        if code == Close.REVOKED:
            self.last_error = "the hub revoked this token (4003)"
            self._set_state(ConnState.FAILED, self.last_error)
            return None
        self.last_error = f"{url}: connection closed ({code})"
        return Hint()

    async def _subscribe(self, client: AdminClient) -> None:
        self._holding = True  # events that arrive with the reply wait for the snapshot
        try:
            data = await client.request("subscribe", topics=list(self.topics), reply_timeout=120)
            self.snapshot_received.emit(data if isinstance(data, dict) else {})
        finally:
            self._holding = False
        self._flush()

    async def _load_history(self, client: AdminClient) -> None:
        """The graphs' last hour, from the hub (an extension: an older hub refuses it)."""
        if "metrics" not in self.topics:
            return
        try:
            history = await client.request("metrics_history", reply_timeout=30)
        except (AdminError, ConnectionError, TimeoutError) as exc:
            log.info("no metrics history from the hub: %s", exc)
        else:
            self.history_received.emit(history)

    # -- events --------------------------------------------------------------------------

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("type") == "event":
            self.messages_total += 1
        self._pending.append(event)
        if not self._holding and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._holding or not self._pending:
            return
        events, self._pending = self._pending, []
        self.events_received.emit(events)

    def _set_state(self, state: ConnState, detail: str) -> None:
        if state == self.state and detail == self.detail:
            return
        self.state = state
        self.detail = detail
        self.state_changed.emit(state.value, detail)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({exc.verify_message})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    text = str(exc) or type(exc).__name__
    return text if len(text) < 160 else text[:157] + "..."
