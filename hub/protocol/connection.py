"""A lean WebSocket connection: websockets' sans-I/O protocol under an ``asyncio.Protocol``.

Why not ``websockets.asyncio``? Its connection keeps a reader task, queues, locks and the
handshake headers for the connection's life: about 14 KB per idle connection, more than the
hub's whole per-agent budget. Driving the same sans-I/O core from transport callbacks costs a
fraction of that, needs no task per connection, and gives us what a hub must control itself:
a bound on each peer's buffered output, close codes, and keepalive only where it is wanted.

The class is shared by the hub (server side) and by agents and admin clients (client side).
Subclasses override the ``on_*`` hooks; nothing here knows about Tether's messages.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from websockets.client import ClientProtocol
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus, PayloadTooBig
from websockets.extensions.permessage_deflate import (
    ClientPerMessageDeflateFactory,
    PerMessageDeflate,
)
from websockets.frames import Frame, Opcode

try:
    from websockets.speedups import apply_mask
except ImportError:  # a websockets build without its C speedups
    from websockets.utils import apply_mask
from websockets.http11 import Request, Response
from websockets.protocol import OPEN, Protocol, Side, State
from websockets.uri import parse_uri

from .constants import Close
from .tls import pin_matches
from .tls_layer import TlsLayer, client_layer

__all__ = ["Connection", "HandshakeRefused", "connect"]

#: websockets logs every open and close at INFO; at fleet scale that is noise and cost.
WIRE_LOGGER = logging.getLogger("tether.wire")
WIRE_LOGGER.setLevel(logging.WARNING)

log = logging.getLogger(__name__)

SEND_EOF = b""
#: Linux's IP_BIND_ADDRESS_NO_PORT (not every Python names it): bind the address now, choose
#: the port at connect time.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
#: Largest frame the fast path reads when the protocol has no size limit.
MAX_FAST = 65_535
#: On a permessage-deflate connection, messages shorter than this go uncompressed.
PLAIN_BELOW = 1024


class Connection(asyncio.Protocol):
    """One WebSocket connection. Subclasses handle messages in :meth:`on_message`.

    ``max_buffer`` bounds the bytes waiting in the transport's write buffer, whatever wrote
    them (messages, pongs, close frames): a peer that stops reading is aborted instead of
    growing the process without bound.
    """

    __slots__ = (
        "_client",
        "_close_timer",
        "_deflate",
        "_eof_sent",
        "_fast",
        "_fragments",
        "_frame_stamp",
        "_frame_tokens",
        "_handshake",
        "_keepalive",
        "_ping_sent_at",
        "close_timeout",
        "closed",
        "early_data",
        "frame_burst",
        "frame_rate",
        "max_buffer",
        "opened",
        "peer",
        "protocol",
        "transport",
        "writable",
    )

    def __init__(
        self,
        protocol: Protocol,
        *,
        max_buffer: int = 1024 * 1024,
        close_timeout: float = 5.0,
    ) -> None:
        self.protocol = protocol
        self.transport: asyncio.Transport | None = None
        self.max_buffer = max_buffer
        self.close_timeout = close_timeout
        self.peer: str = ""
        self.opened = False
        self.closed = False
        #: Whole plain text frames take the fast paths (set once open).
        self._fast = False
        #: permessage-deflate was negotiated: only small messages are written plain.
        self._deflate = False
        self._client = protocol.side is Side.CLIENT
        self.writable = True
        #: Server side: frames arrived before the handshake response was sent.
        self.early_data = False
        self._fragments: bytearray | None = None
        #: Frames a second that are not whole text messages (control frames, fragments),
        #: which no message budget counts; 0: unbounded. Each costs a parse, a ping also a
        #: pong: a flood of them must not cost the process unbounded CPU.
        self.frame_rate = 0.0
        self.frame_burst = 0.0
        self._frame_tokens = 0.0
        self._frame_stamp = 0.0
        self._close_timer: asyncio.TimerHandle | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._ping_sent_at: float = 0.0
        self._handshake: asyncio.Future[None] | None = None
        #: Client side: our end of the stream is closed; nothing more may be written.
        self._eof_sent = False

    # -- hooks for subclasses ---------------------------------------------------------

    def on_request(self, request: Request) -> None:
        """Server side: answer the opening handshake with :meth:`respond`."""
        raise NotImplementedError

    def on_response(self, response: Response) -> None:
        """Client side: the handshake response arrived (101 or a refusal)."""

    def on_open(self) -> None:
        """The WebSocket is open."""

    def on_message(self, data: bytes) -> None:
        """One complete text message, as UTF-8 bytes (not yet validated)."""

    def on_frame_flood(self) -> None:
        """More frames than ``frame_rate`` allows arrived; the connection is being closed."""

    def on_binary(self) -> None:
        """A binary frame arrived; Tether speaks text only (PROTOCOL §3)."""
        self.close(Close.UNSUPPORTED_DATA, "binary frames are not accepted")

    def on_close(self, code: int, reason: str) -> None:
        """The connection is gone; called exactly once."""

    def on_writable(self) -> None:
        """The transport's write buffer drained below its low-water mark."""

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        peername = transport.get_extra_info("peername")
        if peername:
            self.peer = str(peername[0])

    def data_received(self, data: bytes) -> None:
        protocol = self.protocol
        if (
            self._fast
            and self._fragments is None
            and protocol.state is OPEN
            and not protocol.reader.buffer
        ):
            consumed = self._fast_text_frames(data)
            if consumed == len(data):
                return
            if consumed:
                data = data[consumed:]
            if self.closed:
                return
        try:
            protocol.receive_data(data)
        except EOFError:
            return
        self._flush()
        events = protocol.events_received()
        if not self.opened and protocol.side is Side.SERVER:
            # RFC 6455 §4.1: a client MUST wait for the response before sending frames.
            # Anything parsed as a frame in the same read as the request, or while the
            # answer is pending, was sent before the client could have seen a 101.
            self.early_data = self.early_data or any(type(e) is Frame for e in events)
        for event in events:
            if self.closed:
                break
            if type(event) is Frame:
                self._frame(event)
            elif type(event) is Request:
                self._guard(self.on_request, event)
            elif type(event) is Response:
                self._response(event)
        if protocol.parser_exc is not None and not self.closed:
            self._note_parser_failure(protocol.parser_exc)
        self._flush()

    def _fast_text_frames(self, data: bytes) -> int:
        """Handle whole, final text frames straight from the read buffer.

        Nearly every frame a hub receives is one of these (a heartbeat, an ack, a result),
        and so is nearly every frame an agent receives (a command); websockets'
        generator-based parser costs about a quarter of the time per message. This path
        takes only the plain case — FIN set, no RSV bits, TEXT, masked from a client and
        unmasked from a server, a length under 64 KiB, no extension — and stops at anything
        else (control frames, fragments, a partial frame, a frame masked the wrong way),
        handing the rest to the sans-I/O protocol at a frame boundary, where its parser
        stands ready. Returns the bytes consumed.
        """
        position = 0
        end = len(data)
        limit = self.protocol.max_message_size or MAX_FAST
        masked = not self._client
        header = 6 if masked else 2
        while end - position >= header:
            if data[position] != 0x81:
                break
            second = data[position + 1]
            if masked:
                length = second ^ 0x80  # the mask bit must be set: else length >= 128
            elif second & 0x80:
                break  # a server must not mask: websockets closes with the right code
            else:
                length = second
            if length < 126:
                start = position + header
            elif length == 126 and end - position >= header + 2:
                length = (data[position + 2] << 8) | data[position + 3]
                start = position + header + 2
            else:
                break
            if length > limit or start + length > end:
                break
            if masked:
                payload = apply_mask(data[start : start + length], data[start - 4 : start])
            else:
                payload = data[start : start + length]
            position = start + length
            self._guard(self.on_message, payload)
            if self.closed:
                break
        return position

    def eof_received(self) -> bool | None:
        self.protocol.receive_eof()
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        if self.closed:
            return
        self.closed = True
        self.writable = False
        protocol = self.protocol
        if protocol.state is not State.CLOSED:
            try:
                protocol.receive_eof()
            except EOFError:
                pass
        code, reason = self.close_code()
        self.transport = None  # the transport references us: break the cycle now
        handshake = self._handshake
        if handshake is not None and not handshake.done():
            handshake.set_exception(
                self._refusal()
                or ConnectionError(
                    f"connection closed during the handshake: {protocol.handshake_exc or exc}"
                )
            )
        if self.opened:
            self._guard(self.on_close, code, reason)

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        if self.closed:
            return
        self.writable = True
        self._guard(self.on_writable)

    # -- sending ---------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return not self.closed and self.protocol.state is OPEN

    def send_text(self, data: bytes) -> bool:
        """Queue one text message; False when the connection can no longer send."""
        if self.closed or self.protocol.state is not OPEN:
            return False
        transport = self.transport
        if self._fast and transport is not None and (not self._deflate or len(data) < PLAIN_BELOW):
            # The frame websockets would build, built here: no Frame object, and a mask key
            # from a pooled urandom draw instead of a getrandom call per frame. With
            # permessage-deflate, a small message goes uncompressed (RFC 7692 lets either
            # side choose per message; the peer's inflater never sees it): deflating a reply
            # or a single event costs tens of microseconds each way to save a few hundred
            # bytes.
            return self._write(text_frame(data, self._client))
        self.protocol.send_text(data)
        self._flush()
        transport = self.transport
        return transport is not None and not transport.is_closing()

    def send_texts(self, messages: Sequence[bytes]) -> bool:
        """Queue several text messages with one write when the fast path allows it."""
        if self.closed or self.protocol.state is not OPEN:
            return False
        if not self._fast or self._deflate:
            return all([self.send_text(data) for data in messages])
        return self._write(b"".join([text_frame(data, self._client) for data in messages]))

    def _write(self, data: bytes) -> bool:
        """Hand bytes to the transport, within the bound on what the peer has not read.

        Every write counts against the bound, not only our own messages: websockets answers
        each ping with a pong, so a peer that floods pings and never reads would otherwise
        grow the buffer without limit.
        """
        transport = self.transport
        if transport is None or transport.is_closing() or self._eof_sent:
            return False
        transport.write(data)
        if transport.get_write_buffer_size() > self.max_buffer:
            self._overflow()
            return False
        return True

    def buffered(self) -> int:
        """Bytes accepted for sending that the peer has not read yet."""
        transport = self.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def close(
        self, code: int = Close.NORMAL, reason: str = "", farewell: bytes | None = None
    ) -> None:
        """Start the closing handshake; the transport is aborted if the peer stalls.

        ``farewell``, a last text message, goes in the same write as the close frame (a hub
        sending 19,000 agents away writes once per agent, not twice).
        """
        if self.closed:
            return
        protocol = self.protocol
        if protocol.state is OPEN:
            if farewell is not None:
                protocol.send_text(farewell)  # queued, not written: _flush writes both at once
            protocol.send_close(code, reason[:120])
            self._flush()
            if self._close_timer is None and not self.closed:
                loop = asyncio.get_running_loop()
                self._close_timer = loop.call_later(self.close_timeout, self.abort)
        elif protocol.state is State.CONNECTING:
            self.abort()

    def abort(self) -> None:
        """Drop the TCP connection without a closing handshake."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.abort()
        elif transport is None:
            self.closed = True

    def close_code(self) -> tuple[int, str]:
        """The code that ended (or is ending) the connection; 1006 when there was none."""
        protocol = self.protocol
        if protocol.close_sent is not None and (
            protocol.close_rcvd is None or protocol.close_rcvd_then_sent is False
        ):
            return protocol.close_sent.code, protocol.close_sent.reason
        if protocol.close_rcvd is not None:
            return protocol.close_rcvd.code, protocol.close_rcvd.reason
        return 1006, ""

    # -- server handshake --------------------------------------------------------------

    def respond(self, response: Response) -> None:
        """Send the handshake response; 101 opens the WebSocket, anything else closes."""
        protocol = self.protocol
        protocol.send_response(response)  # type: ignore[attr-defined]
        self._flush()
        if response.status_code == 101:
            self.opened = True
            self._forget_handshake()
            self._open_fast_paths()
            self._guard(self.on_open)
        else:
            # The response is buffered; close() flushes it, then the socket goes.
            transport = self.transport
            if transport is not None:
                transport.close()

    def _open_fast_paths(self) -> None:
        extensions = self.protocol.extensions
        # Frames with RSV1 clear are plain text whatever was negotiated, as long as the only
        # extension is permessage-deflate (the only one Tether offers or accepts).
        self._fast = all(type(e) is PerMessageDeflate for e in extensions)
        self._deflate = bool(extensions)

    # -- keepalive ---------------------------------------------------------------------

    def start_keepalive(self, interval: float, timeout: float) -> None:
        """Ping every ``interval`` s; a pong missing after ``timeout`` s closes with 1011."""
        if interval <= 0:
            return
        loop = asyncio.get_running_loop()
        last_ping = time.monotonic()

        def tick() -> None:
            nonlocal last_ping
            if self.closed:
                return
            now = time.monotonic()
            pending = self._ping_sent_at
            if pending and now - pending >= timeout:
                self.close(Close.INTERNAL_ERROR, "keepalive ping timeout")
                return
            if not pending and now - last_ping >= interval:
                last_ping = self._ping_sent_at = now
                if self.protocol.state is OPEN:
                    self.protocol.send_ping(b"")
                    self._flush()
            # Wake for the next ping, or for the pong deadline while one is outstanding
            # (the next ping waits for the pong).
            wake = last_ping + interval
            if self._ping_sent_at:
                deadline = self._ping_sent_at + timeout
                if wake <= now or deadline < wake:
                    wake = deadline
            self._keepalive = loop.call_later(max(0.0, wake - now), tick)

        self._keepalive = loop.call_later(interval, tick)

    # -- internals ---------------------------------------------------------------------

    def limit_frames(self, rate: float, burst: float) -> None:
        """Bound the frames a second that are not whole text messages (``frame_rate``)."""
        self.frame_rate = rate
        self.frame_burst = self._frame_tokens = burst
        self._frame_stamp = time.monotonic()

    def _frame(self, frame: Frame) -> None:
        rate = self.frame_rate
        if rate and not (frame.fin and frame.opcode is Opcode.TEXT):  # messages have theirs
            now = time.monotonic()
            tokens = min(self.frame_burst, self._frame_tokens + (now - self._frame_stamp) * rate)
            self._frame_stamp = now
            self._frame_tokens = tokens - 1
            if tokens < 1:
                self.frame_rate = 0.0  # once is enough: the close is under way
                self._guard(self.on_frame_flood)
                self.close(Close.POLICY, "too many frames")
                return
        opcode = frame.opcode
        if opcode is Opcode.TEXT:
            if frame.fin:
                self._guard(self.on_message, frame.data)
            else:
                # One contiguous buffer, not a list of pieces: a message of many tiny or
                # empty fragments then costs its own bytes (websockets bounds those at
                # max_size), not a Python object per fragment.
                self._fragments = bytearray(frame.data)
        elif opcode is Opcode.CONT:
            fragments = self._fragments
            if fragments is None:
                return
            fragments += frame.data
            if frame.fin:
                self._fragments = None
                self._guard(self.on_message, bytes(fragments))
        elif opcode is Opcode.BINARY:
            self._guard(self.on_binary)
        elif opcode is Opcode.PONG:
            self._ping_sent_at = 0.0
        elif opcode is Opcode.CLOSE and self.transport is not None:
            # websockets answered the close frame; the server side hangs up now.
            pass

    def _response(self, response: Response) -> None:
        if response.status_code == 101 and self.protocol.state is OPEN:
            self.opened = True
            self._open_fast_paths()
        self._guard(self.on_response, response)
        handshake = self._handshake
        if handshake is not None and not handshake.done():
            if self.opened:
                handshake.set_result(None)
            else:
                handshake.set_exception(
                    self._refusal()
                    or HandshakeRefused(
                        response.status_code, response.headers, response.body or b""
                    )
                )
        if self.opened:
            self._guard(self.on_open)

    def _refusal(self) -> HandshakeRefused | None:
        exc = self.protocol.handshake_exc
        if isinstance(exc, InvalidStatus):
            response = exc.response
            return HandshakeRefused(response.status_code, response.headers, response.body or b"")
        return None

    def _forget_handshake(self) -> None:
        """Drop the handshake request the server's parser generator still references.

        ``ServerProtocol.parse`` keeps its local ``request`` (every header) alive for the
        connection's whole life: about 2 KB per connection. A fresh frame parser holds
        nothing. Swapping is safe when no frame bytes are buffered, which is always the
        case for a client that waits for the 101, as the protocol requires.
        """
        protocol = self.protocol
        if protocol.side is Side.SERVER and not protocol.reader.buffer:
            protocol.parser = Protocol.parse(protocol)
            next(protocol.parser)

    def _note_parser_failure(self, exc: Exception) -> None:
        if isinstance(exc, PayloadTooBig):
            log.debug("peer %s sent a message over the size limit", self.peer)

    def _flush(self) -> None:
        writes = self.protocol.data_to_send()
        if not writes:
            return
        transport = self.transport
        if transport is None or transport.is_closing() or self._eof_sent:
            return
        # One write for everything queued (a last message and its close frame, a pong and
        # an answer): each write is a system call and, on the other end, a wakeup.
        pending: list[bytes] = []
        for chunk in writes:
            if chunk == SEND_EOF:
                if pending:
                    transport.write(b"".join(pending))
                if self.protocol.side is Side.CLIENT and transport.can_write_eof():
                    transport.write_eof()
                    self._eof_sent = True
                else:
                    transport.close()
                return
            pending.append(chunk)
        self._write(pending[0] if len(pending) == 1 else b"".join(pending))

    def _overflow(self) -> None:
        log.warning(
            "aborting connection from %s: %d bytes unread by the peer",
            self.peer,
            self.buffered(),
        )
        self.abort()

    def _cancel_timers(self) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None

    def _guard(self, hook: Callable[..., Any], *args: Any) -> None:
        """Run a hook; a bug in one connection's handler must not take the process down."""
        try:
            hook(*args)
        except Exception:
            log.exception("error in %s for peer %s", hook.__name__, self.peer)
            if not self.closed and self.protocol.state is OPEN:
                self.close(Close.INTERNAL_ERROR, "internal error")
            elif not self.closed:
                self.abort()


class HandshakeRefused(Exception):
    """The server answered the opening handshake with an HTTP status other than 101."""

    def __init__(self, status: int, headers: Headers, body: bytes) -> None:
        super().__init__(f"server refused the connection with HTTP {status}")
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def retry_after(self) -> float | None:
        value = self.headers.get("Retry-After")
        if value is None:
            return None
        try:
            return max(0.0, float(int(value)))
        except ValueError:
            return None

    @property
    def error(self) -> str | None:
        import orjson

        try:
            body = orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return None
        return body.get("error") if isinstance(body, dict) else None


async def connect(
    url: str,
    factory: Callable[[ClientProtocol], Connection],
    *,
    headers: Sequence[tuple[str, str]] = (),
    subprotocols: Sequence[str] = (),
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    compression: bool = False,
    max_size: int | None = 1024 * 1024,
    open_timeout: float = 10.0,
    local_addr: tuple[str, int] | None = None,
    pin_sha256: bytes | None = None,
    sock: socket.socket | None = None,
    tls_session: ssl.SSLSession | None = None,
) -> Connection:
    """Open a client WebSocket and return the connection once the handshake succeeded.

    ``sock``, already connected (a tunnel through a proxy, say), is used instead of dialing
    ``url``'s host; TLS, when the URL asks for it, still runs end to end over it. It is
    closed when the handshake fails.

    Raises :class:`HandshakeRefused` for an HTTP refusal, ``OSError`` for network errors,
    ``ssl.SSLError`` for TLS failures (a certificate that does not match ``pin_sha256``
    among them, checked before a byte of HTTP is sent) and ``TimeoutError`` when
    ``open_timeout`` passes. TLS runs in :class:`~hub.protocol.tls_layer.TlsLayer`, which
    offers ``tls_session`` (an earlier connection's, with its ticket) for resumption.
    """
    uri = parse_uri(url)
    extensions = [ClientPerMessageDeflateFactory()] if compression else None
    protocol = ClientProtocol(
        uri,
        subprotocols=list(subprotocols) or None,  # type: ignore[arg-type]
        extensions=extensions,
        max_size=max_size,
        logger=WIRE_LOGGER,
    )
    connection = factory(protocol)
    loop = asyncio.get_running_loop()
    opened: asyncio.Future[None] = loop.create_future()
    connection._handshake = opened
    if uri.secure and ssl_context is None:
        ssl_context = ssl.create_default_context()
    layer: TlsLayer | None = None
    try:
        async with asyncio.timeout(open_timeout):
            try:
                if uri.secure:
                    assert ssl_context is not None
                    layer = client_layer(
                        connection, ssl_context, server_hostname or uri.host, tls_session
                    )
                    factory: Callable[[], asyncio.BaseProtocol] = lambda: layer  # noqa: E731
                else:
                    factory = lambda: connection  # noqa: E731
                if local_addr is None and sock is None:
                    await loop.create_connection(factory, uri.host, uri.port)
                else:
                    if sock is None:
                        assert local_addr is not None
                        sock = await _dial_from(loop, local_addr, uri.host, uri.port)
                    try:
                        await loop.create_connection(factory, sock=sock)
                    except BaseException:
                        sock.close()
                        raise
                if uri.secure:
                    await layer.handshake()
                if pin_sha256 is not None and uri.secure:
                    transport = connection.transport
                    ssl_object = transport.get_extra_info("ssl_object") if transport else None
                    if not pin_matches(ssl_object, pin_sha256):
                        raise ssl.SSLCertVerificationError(
                            "the hub's certificate does not match the pinned SHA-256"
                        )
                if not opened.done():  # a server may answer before it reads: a refusal
                    request = protocol.connect()
                    for name, value in headers:
                        request.headers[name] = value
                    protocol.send_request(request)
                    connection._flush()
                await opened
            except BaseException:
                connection.abort()
                if layer is not None:
                    layer.abort()  # a handshake that did not finish: the socket goes too
                if opened.done() and not opened.cancelled():
                    opened.exception()  # seen: no "never retrieved" noise if we re-raise
                raise
    except (TimeoutError, OSError, ValueError) as exc:
        # The server's answer may have come as the open timed out or as sending the
        # request failed (a 503 written on accept, under load): that answer, with its
        # Retry-After, is the cause to report.
        refusal = opened.exception() if opened.done() and not opened.cancelled() else None
        if refusal is not None and refusal is not exc:
            raise refusal from None
        raise
    return connection


#: Mask keys are drawn from the OS's CSPRNG, as RFC 6455 §5.3 requires, a few KB at a time.
_mask_pool = b""
_mask_at = 0
_MASK_POOL_BYTES = 4096


def _mask_key() -> bytes:
    global _mask_pool, _mask_at
    if _mask_at + 4 > len(_mask_pool):
        _mask_pool = os.urandom(_MASK_POOL_BYTES)
        _mask_at = 0
    key = _mask_pool[_mask_at : _mask_at + 4]
    _mask_at += 4
    return key


def text_frame(payload: bytes, mask: bool) -> bytes:
    """One final, uncompressed text frame (RFC 6455 §5.2); masked when a client sends it."""
    size = len(payload)
    bit = 0x80 if mask else 0
    if size < 126:
        head = bytes((0x81, bit | size))
    elif size < 65_536:
        head = bytes((0x81, bit | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x81, bit | 127)) + size.to_bytes(8, "big")
    if mask:
        key = _mask_key()
        return head + key + apply_mask(payload, key)
    return head + payload


async def _dial_from(
    loop: asyncio.AbstractEventLoop, local_addr: tuple[str, int], host: str, port: int
) -> socket.socket:
    """A TCP socket connected to ``host:port`` from ``local_addr``.

    Why not ``create_connection(local_addr=...)``: it binds before connecting, so the kernel
    must find a port free on that address for *any* destination, a search that crawls once
    tens of thousands of connections and TIME_WAITs share the range. With the port chosen at
    connect time (``IP_BIND_ADDRESS_NO_PORT``) only the whole 4-tuple has to be unique, and a
    load generator spreading agents over several loopback addresses gets a fresh range each.
    """
    family = socket.AF_INET6 if ipaddress.ip_address(local_addr[0]).version == 6 else socket.AF_INET
    infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"{host} has no address of the family of {local_addr[0]}")
    _family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        if sys.platform == "linux" and local_addr[1] == 0:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind(local_addr)
        await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock
