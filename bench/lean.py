"""The cheapest honest WebSocket client we can write in Python, for load generation.

Why not the agent's own connection? It drives websockets' sans-I/O client protocol, whose
handshake (random key, request object, generator-based response parser, accept check) costs
about as much CPU as the server's side of it. On two shared cores a load generator that
expensive measures itself: the registration figures came out the same for the hub and for a
bare server doing no authentication at all. This client sends a prebuilt upgrade request,
checks the status line and the accept value, masks with one fixed key (legal: the server
cannot tell) and reads unmasked server frames by hand — the same bytes on the wire, a small
fraction of the work.

Nothing in the hub, agent or console uses this module; it exists for ``bench/``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import ssl
import struct
from urllib.parse import urlsplit

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets without its C speedups
    from websockets.utils import apply_mask

__all__ = ["LeanClient", "Refused", "lean_connect"]

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: One key per process: the server answers it with the same accept value every time.
KEY = base64.b64encode(os.urandom(16))
ACCEPT = b"Sec-WebSocket-Accept: " + base64.b64encode(hashlib.sha1(KEY + GUID).digest())  # noqa: S324 (RFC 6455)
MASK = os.urandom(4)
#: What ``wss://`` dials trust (bench/tls.py sets a context trusting its own CA).
TLS: ssl.SSLContext | None = None


class Refused(ConnectionError):
    """The server answered the upgrade with ``status`` instead of 101."""

    def __init__(self, status: int, line: str, retry_after: float | None = None) -> None:
        super().__init__(f"refused: {line}")
        self.status = status
        #: The answer's ``Retry-After`` (seconds), when it had one.
        self.retry_after = retry_after


def frame(opcode: int, payload: bytes) -> bytes:
    """One final client frame, masked with the process's key."""
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
    elif size < 65_536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
    return head + MASK + apply_mask(payload, MASK)


def text(payload: bytes) -> bytes:
    return frame(0x1, payload)


class LeanClient(asyncio.Protocol):
    """One client connection: ``opened`` resolves after the 101, ``on_message`` per text."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.buffer = b""
        self.upgraded = False

    # -- overridden by users ----------------------------------------------------------------

    def on_message(self, data: bytes) -> None:
        """One text message from the server."""

    def on_close(self, reason: str) -> None:
        """The connection ended (``reason`` says how)."""

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        if not self.upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buffer
                return
            head, buffer = buffer[:end], buffer[end + 4 :]
            if not head.startswith(b"HTTP/1.1 101") or ACCEPT not in head:
                line = head.split(b"\r\n", 1)[0].decode(errors="replace")
                parts = line.split(" ", 2)
                status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
                retry = re.search(rb"\r\nRetry-After: *(\d+)", head, re.IGNORECASE)
                retry_after = float(retry.group(1)) if retry else None
                self._fail(f"refused: {line}", Refused(status, line, retry_after))
                return
            self.upgraded = True
            if not self.opened.done():
                self.opened.set_result(None)
        offset = 0
        size = len(buffer)
        while size - offset >= 2:
            first, second = buffer[offset], buffer[offset + 1]
            length = second & 0x7F
            start = offset + 2
            if length == 126:
                if size - offset < 4:
                    break
                (length,) = struct.unpack_from("!H", buffer, start)
                start += 2
            elif length == 127:
                if size - offset < 10:
                    break
                (length,) = struct.unpack_from("!Q", buffer, start)
                start += 8
            if size < start + length:
                break
            payload = buffer[start : start + length]
            offset = start + length
            opcode = first & 0x0F
            if opcode == 0x1:
                self.on_message(payload)
            elif opcode == 0x8:
                code = struct.unpack_from("!H", payload)[0] if len(payload) >= 2 else 1005
                self.write(frame(0x8, payload[:2]))
                self._fail(f"closed {code} {payload[2:].decode(errors='replace')}")
                return
            elif opcode == 0x9 and self.transport is not None:
                self.transport.write(frame(0xA, payload))
        self.buffer = buffer[offset:]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection lost: {exc}")

    # -- sending -----------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send_text(self, payload: bytes) -> None:
        self.write(text(payload))

    def close(self) -> None:
        self.write(frame(0x8, struct.pack("!H", 1000)))
        if self.transport is not None:
            self.transport.close()

    def _fail(self, reason: str, error: ConnectionError | None = None) -> None:
        if not self.opened.done():
            self.opened.set_exception(error or ConnectionError(reason))
        if not self.closed.done():
            self.closed.set_result(None)
            self.on_close(reason)
        if self.transport is not None:
            self.transport.close()


def upgrade_request(url: str, path: str, headers: list[tuple[str, str]]) -> bytes:
    """The bytes of an upgrade request to ``url`` + ``path``."""
    parts = urlsplit(url)
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {KEY.decode()}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def lean_connect(
    url: str, factory: type[LeanClient], request: bytes, timeout: float = 30.0
) -> LeanClient:
    """Open a TCP connection to ``url`` (TLS for ``wss://``) and upgrade it with ``request``."""
    parts = urlsplit(url)
    loop = asyncio.get_running_loop()
    secure = parts.scheme == "wss"
    _transport, client = await loop.create_connection(
        lambda: factory(request), parts.hostname, parts.port,
        ssl=(TLS or ssl.create_default_context()) if secure else None,
        server_hostname=parts.hostname if secure else None,
    )  # fmt: skip
    async with asyncio.timeout(timeout):
        await client.opened
    return client
