"""Byte-level WebSocket for hostile tests: raw TCP, frames built and parsed by hand.

Nothing here uses a WebSocket library: a normal client refuses to produce most of what
these tests send (unmasked frames, reserved bits, lying lengths, early frames), and the
hub's answers (HTTP status lines, close frames) are parsed from the bytes it wrote.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from tests.support import wait_for

# Opcodes (RFC 6455 §5.2).
CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

KEY = base64.b64encode(b"0123456789abcdef").decode()


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    length: int | None = None,
    length_form: int | None = None,
) -> bytes:
    """One frame as a client would send it, with every field under the caller's control.

    ``length`` lies about the payload length; ``length_form`` forces the 7-bit (0),
    16-bit (126) or 64-bit (127) length encoding.
    """
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | (rsv & 0x7) << 4 | opcode])
    form = length_form if length_form is not None else (0 if n < 126 else 126 if n < 65536 else 127)
    bit = 0x80 if mask else 0
    if form == 0:
        head += bytes([bit | n])
    elif form == 126:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def text(data: str | bytes | dict[str, Any], **kwargs: Any) -> bytes:
    if isinstance(data, dict):
        data = json.dumps(data)
    if isinstance(data, str):
        data = data.encode()
    return frame(TEXT, data, **kwargs)


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


def deflate(data: bytes) -> bytes:
    """A permessage-deflate payload (RFC 7692 §7.2.1: raw deflate, tail removed)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def inflate(data: bytes) -> bytes:
    """The message a permessage-deflate payload carries (the first message of a context)."""
    return zlib.decompressobj(-15).decompress(data + b"\x00\x00\xff\xff")


def upgrade_request(
    path: str = "/ws",
    token: str | None = None,
    *,
    extra: str = "",
    method: str = "GET",
    version: str = "HTTP/1.1",
    key: str | None = KEY,
) -> bytes:
    lines = [f"{method} {path} {version}", "Host: 127.0.0.1", "Upgrade: websocket"]
    lines.append("Connection: Upgrade")
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    lines.append("Sec-WebSocket-Version: 13")
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode("latin-1")


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Frame:
    fin: bool
    opcode: int
    payload: bytes
    #: RSV1-3 as one number: 4 is RSV1, a compressed message under permessage-deflate.
    rsv: int = 0

    @property
    def close_code(self) -> int | None:
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None

    @property
    def close_reason(self) -> str:
        return self.payload[2:].decode("utf-8", "replace")


@dataclass
class Wire:
    """One raw TCP connection to the hub."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    response: HttpResponse | None = None
    received: list[Frame] = field(default_factory=list)

    @classmethod
    async def open(
        cls, port: int, *, rcvbuf: int | None = None, local_host: str | None = None
    ) -> Wire:
        if rcvbuf is None and local_host is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**22)
            return cls(reader, writer)
        sock = socket.socket()
        if rcvbuf is not None:
            # A small receive window: the hub's output backs up into its own buffers.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if local_host is not None:
            sock.bind((local_host, 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=2**22)
        return cls(reader, writer)

    @classmethod
    async def upgrade(
        cls, port: int, path: str = "/ws", token: str | None = None, **kwargs: Any
    ) -> Wire:
        """A connection that completed the opening handshake (asserts the 101)."""
        rcvbuf = kwargs.pop("rcvbuf", None)
        local_host = kwargs.pop("local_host", None)
        wire = await cls.open(port, rcvbuf=rcvbuf, local_host=local_host)
        await wire.send(upgrade_request(path, token, **kwargs))
        response = await wire.read_response()
        assert response.status == 101, (response.status, response.body)
        return wire

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_response(self, timeout: float = 5.0) -> HttpResponse:
        """The HTTP response head, and the body its Content-Length announces."""
        async with asyncio.timeout(timeout):
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head[:-4].decode("latin-1").split("\r\n")
            version, status, *_ = lines[0].split(" ", 2)
            assert version == "HTTP/1.1", lines[0]
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            body = await self.reader.readexactly(length) if length else b""
        self.response = HttpResponse(int(status), headers, body, head)
        return self.response

    async def read_frame(self, timeout: float = 5.0) -> Frame:
        """One frame from the hub, which must not mask (RFC 6455 §5.1)."""
        async with asyncio.timeout(timeout):
            b1, b2 = await self.reader.readexactly(2)
            assert not b2 & 0x80, "the server masked a frame"
            n = b2 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
            payload = await self.reader.readexactly(n)
        got = Frame(bool(b1 & 0x80), b1 & 0x0F, payload, (b1 >> 4) & 0x07)
        self.received.append(got)
        return got

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next text message (unfragmented, as the hub sends them), as JSON."""
        while True:
            got = await self.read_frame(timeout)
            if got.opcode == TEXT:
                return json.loads(got.payload)
            assert got.opcode in (PING, PONG), f"expected a message, got {got}"

    async def recv_type(self, kind: str, timeout: float = 5.0) -> dict[str, Any]:
        while True:
            message = await self.recv(timeout)
            if message.get("type") == kind:
                return message

    async def close_frame(self, timeout: float = 5.0) -> Frame:
        """Skip messages until the hub's close frame; return it."""
        while True:
            got = await self.read_frame(timeout)
            if got.opcode == CLOSE:
                return got

    async def closed_code(self, timeout: float = 5.0) -> int | None:
        """The close code the hub sent. Answers it as a well-behaved client does (RFC 6455
        §5.5.1); then the hub must end the TCP connection."""
        got = await self.close_frame(timeout)
        with contextlib.suppress(ConnectionError):
            await self.send(frame(CLOSE, got.payload[:2]))
        await self.eof(timeout)
        return got.close_code

    async def eof(self, timeout: float = 5.0) -> bytes:
        """Read until the hub ends the connection (FIN or RST); what came before."""
        data = b""
        async with asyncio.timeout(timeout):
            with contextlib.suppress(ConnectionResetError):
                while chunk := await self.reader.read(65536):
                    data += chunk
        return data

    async def register(self, agent_id: str, **fields: Any) -> dict[str, Any]:
        message = {
            "type": "register",
            "agent_id": agent_id,
            "platform": "linux",
            "region": "eu-central",
            "version": "1.0.0",
            "hostname": agent_id,
            "capabilities": ["ping", "exec"],
            **fields,
        }
        await self.send(text(message))
        return await self.recv_type("welcome")

    def abort(self) -> None:
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


# -- checks against a hub ----------------------------------------------------------------


async def http_get(port: int, path: str = "/healthz") -> HttpResponse:
    wire = await Wire.open(port)
    await wire.send(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    response = await wire.read_response()
    await wire.close()
    return response


async def refused(port: int, request: bytes) -> HttpResponse:
    """Send ``request``; the hub's HTTP answer, after which it must end the connection."""
    wire = await Wire.open(port)
    await wire.send(request)
    response = await wire.read_response()
    assert response.headers.get("connection") == "close"
    assert await wire.eof() == b"", "bytes after a refusal"
    return response


async def dropped(port: int, request: bytes, timeout: float = 5.0) -> None:
    """The hub ends the connection without writing a single byte."""
    wire = await Wire.open(port)
    with contextlib.suppress(ConnectionError):
        await wire.send(request)
    assert await wire.eof(timeout) == b""


async def audit(hub: Any, action: str) -> list[dict[str, Any]]:
    """Audit entries of ``action``, newest first."""
    await hub.hub.auditor.drain()
    return (await hub.hub.store.audit_entries({"action": action}, 1000, None)).items


async def assert_healthy(hub: Any) -> None:
    """The hub still serves: /healthz answers, a fresh agent registers, nothing is pending."""
    assert (await http_get(hub.hub.port)).json() == {"status": "ok"}
    agent_id = f"fresh-{os.urandom(4).hex()}"
    wire = await Wire.upgrade(hub.hub.port, "/ws", await hub.agent_token(agent_id))
    welcome = await wire.register(agent_id)
    assert welcome["type"] == "welcome"
    await wire.send(frame(CLOSE, close_payload(1000)))
    assert await wire.closed_code() == 1000
    await wait_for(
        lambda: not hub.hub.gate.pending_handshakes and agent_id not in hub.hub.registry.live,
        5,
        what="connections cleaned up",
    )
