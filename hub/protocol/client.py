"""A client of the admin channel, for the CLI, the console and scripts.

Requests are matched to replies by id; events (unbatched) go to a queue or a callback.
It runs on any asyncio loop (plain, uvloop or qasync) and on the same lean connection as
everything else in Tether.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from websockets.client import ClientProtocol

from .codec import encode
from .connection import Connection, HandshakeRefused, connect
from .constants import ADMIN_PATH, ADMIN_SUBPROTOCOL, MAX_ADMIN_INBOUND_BYTES
from .tls import TlsOptions, make_ssl_context

__all__ = ["AdminClient", "AdminError", "HandshakeRefused", "admin_url"]


class AdminError(Exception):
    """The hub answered a request with ``ok: false``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def admin_url(hub: str) -> str:
    """``ws://host:port`` (a base URL) into the admin channel's URL."""
    base = hub.rstrip("/")
    if base.endswith(ADMIN_PATH):
        return base
    return base + ADMIN_PATH


class _AdminConnection(Connection):
    __slots__ = ("client",)

    def __init__(self, protocol: ClientProtocol, client: AdminClient) -> None:
        super().__init__(protocol, max_buffer=64 * 1024 * 1024)
        self.client = client

    def on_message(self, data: bytes) -> None:
        self.client._received(data)

    def on_close(self, code: int, reason: str) -> None:
        self.client._closed(code, reason)


class AdminClient:
    """One admin connection. Use :meth:`open`, then :meth:`request` and :meth:`events`."""

    def __init__(
        self,
        hub: str,
        token: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        pin_sha256: bytes | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        on_close: Callable[[int, str], None] | None = None,
        open_timeout: float = 10.0,
        max_queue: int = 100_000,
    ) -> None:
        self.url = admin_url(hub)
        self.token = token
        self.ssl_context = ssl_context
        self.pin_sha256 = pin_sha256
        self.on_event = on_event
        self.on_close = on_close
        self.open_timeout = open_timeout
        self.conn: Connection | None = None
        self.close_code: int | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[Any, asyncio.Future[Any]] = {}
        self._events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(max_queue)
        self._closed_event = asyncio.Event()

    async def open(self) -> AdminClient:
        if self.url.startswith("wss://") and self.ssl_context is None:
            self.ssl_context = make_ssl_context(TlsOptions())
        self.conn = await connect(
            self.url,
            lambda protocol: _AdminConnection(protocol, self),
            headers=[("Authorization", f"Bearer {self.token}")],
            subprotocols=[ADMIN_SUBPROTOCOL],
            ssl_context=self.ssl_context,
            compression=True,
            max_size=MAX_ADMIN_INBOUND_BYTES,
            open_timeout=self.open_timeout,
            pin_sha256=self.pin_sha256,
        )
        return self

    async def __aenter__(self) -> AdminClient:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        conn = self.conn
        if conn is not None and not conn.closed:
            conn.close(1000, "bye")
            try:
                async with asyncio.timeout(2):
                    await self._closed_event.wait()
            except TimeoutError:
                conn.abort()

    @property
    def is_open(self) -> bool:
        return self.conn is not None and self.conn.is_open

    async def request(
        self, request_type: str, /, *, reply_timeout: float | None = 60.0, **fields: Any
    ) -> Any:
        """Send one request and return its reply's ``data``; raises :class:`AdminError`.

        ``fields`` are the request's own fields (``timeout`` of a dispatch among them);
        ``reply_timeout`` is how long to wait for the reply.
        """
        conn = self.conn
        if conn is None or not conn.is_open:
            raise ConnectionError("the admin connection is closed")
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            conn.send_text(encode({"type": request_type, "id": request_id, **fields}))
            async with asyncio.timeout(reply_timeout):
                reply = await future
        finally:
            self._waiting.pop(request_id, None)
        if not reply.get("ok"):
            error = reply.get("error") or {}
            raise AdminError(str(error.get("code", "error")), str(error.get("message", "")))
        return reply.get("data")

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Events one at a time (batches unpacked), plus ``resync`` and ``snapshot`` markers."""
        while True:
            event = await self._events.get()
            if event is None:
                return
            yield event

    async def next_event(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next event, or None when ``timeout`` passes first.

        Raises ConnectionError once the connection has closed and every event was read.
        (Unlike :meth:`events`, a timeout here leaves the stream usable.)
        """
        try:
            async with asyncio.timeout(timeout):
                event = await self._events.get()
        except TimeoutError:
            return None
        if event is None:
            self._events.put_nowait(None)  # keep the end visible to later calls
            raise ConnectionError(f"the admin connection closed ({self.close_code})")
        return event

    async def wait_closed(self) -> None:
        await self._closed_event.wait()

    # -- internals -----------------------------------------------------------------------

    def _received(self, data: bytes) -> None:
        # The hub is the server this client authenticated, not a hostile peer: its messages
        # are parsed by orjson alone (C, bounded depth), not by the strict codec the hub
        # applies to what it receives, whose per-value walk would cost a console ~0.3 ms
        # per event at fleet scale. Callers validate objects with the protocol's models.
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(message, dict):
            return
        kind = message.get("type")
        if kind == "reply":
            future = self._waiting.get(message.get("id"))
            if future is not None and not future.done():
                future.set_result(message)
        elif kind == "batch":
            for event in message.get("events") or ():
                if isinstance(event, dict):
                    self._deliver(event)
        elif kind in ("event", "resync", "snapshot", "error"):
            self._deliver(message)

    def _deliver(self, event: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(event)
            return
        try:
            self._events.put_nowait(event)
        except asyncio.QueueFull:
            pass  # a caller that never reads events gets none rather than unbounded memory

    def _closed(self, code: int, reason: str) -> None:
        self.close_code = code
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ConnectionError(f"connection closed ({code} {reason})"))
        try:
            self._events.put_nowait(None)
        except asyncio.QueueFull:
            pass
        self._closed_event.set()
        if self.on_close is not None:
            self.on_close(code, reason)
