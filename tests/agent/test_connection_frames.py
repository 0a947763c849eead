"""The client side's own frame paths: what it writes and what it reads without websockets'
parser must be exactly what the parser and serializer would have produced or accepted."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from hub.protocol.connection import Connection, connect, text_frame
from tests.support import wait_for

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SIZES = [0, 1, 125, 126, 1000, 65_535, 65_536, 200_000]


def parse_first(data: bytes, mask: bool) -> tuple[Frame, bytes]:
    """The first frame in ``data`` and the bytes after it."""
    reader = StreamReader()
    reader.feed_data(data)
    parser = Frame.parse(reader.read_exact, mask=mask, max_size=None, extensions=[])
    with pytest.raises(StopIteration) as done:
        next(parser)
    return done.value.value, bytes(reader.buffer)


def parse(data: bytes, mask: bool) -> Frame:
    frame, rest = parse_first(data, mask)
    assert not rest, "one frame, nothing after it"
    return frame


@pytest.mark.parametrize("size", SIZES)
def test_unmasked_text_frames_are_byte_for_byte_websockets(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    expected = Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])
    assert text_frame(payload, mask=False) == expected


@pytest.mark.parametrize("size", SIZES)
def test_masked_text_frames_parse_back_with_fresh_keys(size: int) -> None:
    payload = b"x" * size
    frames = [text_frame(payload, mask=True) for _ in range(3)]
    for data in frames:
        frame = parse(data, mask=True)
        assert frame.opcode is Opcode.TEXT and frame.fin and frame.data == payload
    keys = {data[len(data) - size - 4 : len(data) - size] for data in frames}
    assert len(keys) == 3, "every frame draws its own mask key"


class Collect(Connection):
    __slots__ = ("ended", "got")

    def __init__(self, protocol: object) -> None:
        super().__init__(protocol)  # type: ignore[arg-type]
        self.got: list[bytes] = []
        self.ended: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()

    def on_message(self, data: bytes) -> None:
        self.got.append(data)

    def on_close(self, code: int, reason: str) -> None:
        if not self.ended.done():
            self.ended.set_result((code, reason))


async def serve_once(
    frames: bytes, received: asyncio.Queue[bytes], later: bytes = b""
) -> asyncio.Server:
    """A bare server: answers the upgrade with ``frames`` in the same write, reports what it
    reads, and writes ``later`` once the client has sent something."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        key = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())  # noqa: S324
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n" + frames
        )
        await writer.drain()
        pending = later
        while data := await reader.read(65_536):
            await received.put(data)
            if pending:
                writer.write(pending)
                pending = b""
        writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0)


async def test_frames_from_the_server_arrive_whole_and_in_order() -> None:
    messages = [b'{"type":"command","n":1}', b"y" * 126, b"z" * 70_000, b"", b'{"n":4}']
    frames = b"".join(Frame(Opcode.TEXT, m).serialize(mask=False, extensions=[]) for m in messages)
    # A ping between them goes the slow way, and the messages after it still arrive.
    ping = Frame(Opcode.PING, b"hi").serialize(mask=False, extensions=[])
    received: asyncio.Queue[bytes] = asyncio.Queue()
    server = await serve_once(frames + ping + frames, received)
    port = server.sockets[0].getsockname()[1]
    try:
        conn = await connect(f"ws://127.0.0.1:{port}/ws", Collect, max_size=None)
        assert isinstance(conn, Collect)
        await wait_for(lambda: len(conn.got) >= 2 * len(messages), 5, what="all messages")
        assert conn.got == messages + messages
        # What the client sends back parses as masked frames: the pong, then our text.
        assert conn.send_text(b'{"type":"ack"}')
        data = b""
        while len(data) < (6 + 2) + (6 + 14):
            data += await asyncio.wait_for(received.get(), 5)
        pong, rest = parse_first(data, mask=True)
        assert pong.opcode is Opcode.PONG and pong.data == b"hi"
        assert parse(rest, mask=True).data == b'{"type":"ack"}'
        conn.close()
    finally:
        server.close()


async def test_a_masked_frame_from_the_server_is_a_protocol_error() -> None:
    masked = bytes((0x81, 0x80 | 2)) + b"\x00\x00\x00\x00" + b"hi"
    received: asyncio.Queue[bytes] = asyncio.Queue()
    server = await serve_once(b"", received, later=masked)
    port = server.sockets[0].getsockname()[1]
    try:
        conn = await connect(f"ws://127.0.0.1:{port}/ws", Collect)
        assert isinstance(conn, Collect)
        assert conn.send_text(b"{}")
        data = b""
        while len(data) < (6 + 2) + (6 + 2):  # our {}, then a close frame with its code
            data += await asyncio.wait_for(received.get(), 5)
        _, rest = parse_first(data, mask=True)
        close, _ = parse_first(rest, mask=True)
        assert close.opcode is Opcode.CLOSE
        assert struct.unpack("!H", close.data[:2])[0] == 1002
        assert conn.got == []
        conn.abort()
    finally:
        server.close()


async def test_several_messages_leave_in_one_write_and_in_order() -> None:
    received: asyncio.Queue[bytes] = asyncio.Queue()
    server = await serve_once(b"", received)
    port = server.sockets[0].getsockname()[1]
    try:
        conn = await connect(f"ws://127.0.0.1:{port}/ws", Collect)
        messages = [b'{"type":"ack"}', b'{"type":"result"}', b"x" * 300]
        assert conn.send_texts(messages)
        data = b""
        while len(data) < sum(6 + len(m) for m in messages) + 2:
            data += await asyncio.wait_for(received.get(), 5)
        got = []
        while data:
            frame, data = parse_first(data, mask=True)
            got.append(frame.data)
        assert got == messages
        conn.abort()
    finally:
        server.close()
