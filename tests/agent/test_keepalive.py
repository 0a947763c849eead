"""Keepalive of ``hub.protocol.connection`` as the agent uses it: ping every ``interval``
(not every ``timeout``), and close 1011 when a pong does not come in time."""

from __future__ import annotations

import asyncio
import logging
import time

from websockets.asyncio.server import ServerConnection, serve
from websockets.server import ServerProtocol

from hub.protocol.connection import Connection, connect

from .conftest import eventually


class PingCounter(logging.Handler):
    """Counts the pings a websockets server logs receiving (its debug log of frames)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("< PING"):
            self.times.append(time.monotonic())


async def test_pings_are_spaced_by_the_interval_even_when_the_timeout_is_shorter() -> None:
    counter = PingCounter()
    logger = logging.getLogger("tests.keepalive.server")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(counter)

    async def handler(ws: ServerConnection) -> None:
        await ws.wait_closed()

    try:
        async with serve(handler, "127.0.0.1", 0, logger=logger, ping_interval=None) as server:
            port = server.sockets[0].getsockname()[1]
            conn = await connect(f"ws://127.0.0.1:{port}/", Connection)
            conn.start_keepalive(0.3, 0.1)
            await eventually(lambda: len(counter.times) >= 4, message="four pings")
            conn.close()
    finally:
        logger.removeHandler(counter)
    gaps = [b - a for a, b in zip(counter.times, counter.times[1:], strict=False)]
    # Before the fix a pong re-armed the next ping after min(interval, timeout) = 0.1 s.
    assert all(gap > 0.2 for gap in gaps), gaps
    assert not conn.closed or conn.close_code()[0] == 1000


async def test_missing_pong_closes_with_1011() -> None:
    """A peer that completes the handshake, then never reads again (a hung hub)."""

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        protocol = ServerProtocol()
        protocol.receive_data(await reader.readuntil(b"\r\n\r\n"))
        (request,) = protocol.events_received()
        protocol.send_response(protocol.accept(request))
        for chunk in protocol.data_to_send():
            writer.write(chunk)
        await writer.drain()
        await asyncio.sleep(30)  # holds the socket open and answers nothing

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    closed: list[tuple[int, str]] = []

    class Watched(Connection):
        def on_close(self, code: int, reason: str) -> None:
            closed.append((code, reason))

    try:
        conn = await connect(f"ws://127.0.0.1:{port}/", Watched)
        conn.close_timeout = 0.5
        started = time.monotonic()
        conn.start_keepalive(0.2, 0.3)
        await eventually(lambda: closed, 5, "the keepalive to give up")
        assert closed[0][0] == 1011 and "keepalive" in closed[0][1]
        assert time.monotonic() - started >= 0.5  # first ping at 0.2 s, 0.3 s to answer
    finally:
        server.close()
