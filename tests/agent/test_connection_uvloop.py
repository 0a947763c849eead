"""Regression: ``hub.protocol.connection`` must work on uvloop, which the CLI uses."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from hub.protocol.connection import Connection, HandshakeRefused, connect

uvloop = pytest.importorskip("uvloop")

NOT_FOUND = (
    b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
    b'Content-Length: 21\r\nConnection: close\r\n\r\n{"error":"not_found"}'
)


async def _refusals(server: asyncio.Server, dials: int) -> list[HandshakeRefused]:
    """Dial ``server`` ``dials`` times; each must end in a refusal, which is returned."""
    port = server.sockets[0].getsockname()[1]
    refusals = []
    try:
        for _ in range(dials):
            with pytest.raises(HandshakeRefused) as refused:
                await connect(f"ws://127.0.0.1:{port}/ws", Connection, open_timeout=5)
            refusals.append(refused.value)
    finally:
        server.close()
        await server.wait_closed()
    return refusals


async def _refused_handshake() -> HandshakeRefused:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(NOT_FOUND)
        await writer.drain()
        writer.close()

    (refused,) = await _refusals(await asyncio.start_server(answer, "127.0.0.1", 0), 1)
    return refused


def test_client_handshake_on_uvloop() -> None:
    # Before the fix, connection_made asserted an asyncio.Transport subclass, uvloop's
    # transport is not one, and every dial ended in an open timeout instead.
    refused = uvloop.run(_refused_handshake())
    assert refused.status == 404
    assert refused.error == "not_found"


OVERLOADED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Content-Length: 22\r\nRetry-After: 7\r\nConnection: close\r\n\r\n"
    b'{"error":"overloaded"}'
)


async def _answered_on_accept() -> list[HandshakeRefused]:
    """The hub past its pending-handshake cap answers 503 before reading the request."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(OVERLOADED)
        writer.write_eof()
        await reader.read()
        writer.close()

    return await _refusals(await asyncio.start_server(answer, "127.0.0.1", 0), 20)


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_a_503_written_on_accept_is_the_refusal_with_its_retry_after(run) -> None:
    # Before the fix, the answer could arrive before the request went out; sending it then
    # failed, that error was raised instead and the Retry-After was lost (agents fell back
    # to their exponential backoff in a reconnect storm).
    for refused in run(_answered_on_accept()):
        assert refused.status == 503
        assert refused.retry_after == 7


class _ShedOnAccept(asyncio.Protocol):
    """What the hub does past its pending-handshake cap: the 503 and the end of its side of
    the stream are written in ``connection_made``, before a byte of the request is read."""

    def connection_made(self, transport: Any) -> None:  # uvloop's is no WriteTransport
        transport.write(OVERLOADED)
        transport.write_eof()
        self.transport = transport

    def eof_received(self) -> bool | None:
        self.transport.close()
        return None


async def _shed_on_accept() -> list[HandshakeRefused]:
    server = await asyncio.get_running_loop().create_server(_ShedOnAccept, "127.0.0.1", 0)
    return await _refusals(server, 50)


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_a_503_and_end_of_stream_before_the_request_is_the_refusal(run) -> None:
    # Before the fix, the client ended its side too on the hub's EOF and then wrote its
    # request: "Cannot call write() after write_eof()", a RuntimeError no caller expected —
    # in a reconnect storm it ended the agents' reconnect loops for good.
    for refused in run(_shed_on_accept()):
        assert refused.status == 503
        assert refused.retry_after == 7
