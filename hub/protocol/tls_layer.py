"""TLS inside the lean connection: OpenSSL's ``SSLObject`` driven over memory BIOs.

Why not the event loop's SSL transport? asyncio's and uvloop's keep a transport object, a
protocol object, queues and a read buffer per connection (about 7 KB more than this layer
for an idle connection on uvloop, measured; asyncio's zeroes a 256 KB buffer per connection),
and they finish the handshake before the hub's connection exists, so the gate could neither
count nor shed a handshake in progress. Here the connection exists from TCP accept: the
gate counts it, sheds it and times it out like any half-open one (docs/security.md).

OpenSSL does all of TLS (records, handshake, alerts, tickets); this module only moves bytes
between the socket and OpenSSL's memory BIOs, as websockets' sans-I/O core is driven by
:mod:`hub.protocol.connection`. What an idle connection holds: OpenSSL's own state (with
``SSL_MODE_RELEASE_BUFFERS``, which Python sets on every context, no record buffers), two
memory BIOs whose buffers never exceed :data:`SLICE` and a bit (bytes go in and out in
slices), and no read buffer of its own: the socket is read into one buffer shared by every
connection of the thread, decrypted into another, and handed on at once.

:class:`TlsLayer` is the raw transport's protocol and the inner connection's transport.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from typing import Any

__all__ = ["TlsLayer", "client_layer"]

log = logging.getLogger(__name__)

#: Bytes fed to (or encrypted for) OpenSSL at a time. A memory BIO's buffer grows to the
#: largest write it took and stays that size for the connection's life: slices bound it
#: (to about 5.5 KB) whatever size of messages a connection once carried.
SLICE = 4096
#: The shared buffers' size: what one socket read may bring.
READ_SIZE = 256 * 1024


class _Buffers(threading.local):
    """Per thread (the hub runs one event loop per thread): the socket's bytes and the
    plain text decrypted from them; nothing keeps a reference past one callback."""

    def __init__(self) -> None:
        self.cipher = memoryview(bytearray(READ_SIZE))
        self.plain = memoryview(bytearray(READ_SIZE))


_buffers = _Buffers()


class TlsLayer(asyncio.BufferedProtocol):
    """TLS between a TCP transport and a connection (any ``asyncio.Protocol``).

    Server side, the connection is told of the transport at TCP accept (the gate counts
    from there) and sees plain text once the handshake is done; what it writes before that
    waits (and counts in :meth:`get_write_buffer_size`, so a shed half-open connection is
    closed, not answered). Client side, it is told once the handshake is done, as asyncio
    does, so that a certificate pin can be checked in ``connection_made``; ``session``
    (an earlier connection's) is offered for resumption.
    """

    __slots__ = (
        "_closing",
        "_eof",
        "_hostname",
        "_pending",
        "_session",
        "_waiter",
        "app",
        "context",
        "done",
        "incoming",
        "outgoing",
        "raw",
        "server_side",
        "sslobj",
    )

    def __init__(
        self,
        app: asyncio.BaseProtocol,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> None:
        self.app = app
        self.context = context
        self.server_side = server_side
        self._hostname = server_hostname
        self._session = session
        self.raw: asyncio.Transport | None = None
        #: Made at the first bytes from the peer (server) or at connect (client): a silent
        #: connection costs no OpenSSL state.
        self.sslobj: ssl.SSLObject | None = None
        self.incoming: ssl.MemoryBIO | None = None
        self.outgoing: ssl.MemoryBIO | None = None
        #: The handshake finished.
        self.done = False
        #: Plain text written before the handshake finished.
        self._pending: list[bytes] | None = None
        self._closing = False
        self._eof = False
        #: Client side: resolves when the handshake is done (``connect`` awaits it).
        self._waiter: asyncio.Future[None] | None = None

    # -- the raw transport's protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport  # type: ignore[assignment]  # uvloop's is no subclass
        if self.server_side:
            self.app.connection_made(self)  # type: ignore[arg-type]
        else:
            self._waiter = asyncio.get_running_loop().create_future()
            self._start()
            self._handshake()

    def get_buffer(self, sizehint: int) -> memoryview:
        return _buffers.cipher

    def buffer_updated(self, nbytes: int) -> None:
        if self._closing:
            return
        if self.sslobj is None:
            self._start()
        incoming = self.incoming
        assert incoming is not None
        data = _buffers.cipher
        for start in range(0, nbytes, SLICE):
            incoming.write(data[start : min(nbytes, start + SLICE)])
            if not self.done and not self._handshake():
                if self._closing:
                    return
                continue
            if not self._read() or self._closing:
                return

    def eof_received(self) -> bool | None:
        if self.incoming is not None and not self._closing:
            # A peer that closes TCP without close_notify: whatever came is handled, then
            # the connection sees the end of the stream (a truncation attack can end a
            # stream early, never change it: WebSocket frames carry their own lengths).
            self.incoming.write_eof()
            if self.done:
                self._read()
        self._end_of_stream()
        return None  # the raw transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionError(f"connection closed during TLS: {exc}"))
        app, self.raw = self.app, None
        # The inner connection saw the transport only if the handshake finished (client)
        # or from the start (server).
        if self.server_side or self.done:
            app.connection_lost(exc)
        # OpenSSL's state goes now, not when the last reference to this object does.
        self.sslobj = self.incoming = self.outgoing = None
        self._pending = None

    def pause_writing(self) -> None:
        self.app.pause_writing()

    def resume_writing(self) -> None:
        self.app.resume_writing()

    # -- TLS -------------------------------------------------------------------------------

    def _start(self) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.sslobj = self.context.wrap_bio(
            self.incoming,
            self.outgoing,
            server_side=self.server_side,
            server_hostname=self._hostname,
            session=self._session,
        )
        self._session = None

    def _handshake(self) -> bool:
        """Advance the handshake; True once it is done."""
        sslobj = self.sslobj
        assert sslobj is not None
        try:
            sslobj.do_handshake()
        except ssl.SSLWantReadError:
            if self._send() and self.server_side:
                self._progressed()  # the hub answered the ClientHello
            return False
        except (ssl.SSLError, ValueError) as exc:
            # Not TLS, a version or cipher we refuse, a certificate that fails: OpenSSL's
            # alert (if it wrote one) goes out, then the connection closes.
            self._fail(exc)
            return False
        self.done = True
        self._send()
        pending, self._pending = self._pending, None
        if self.server_side:
            self._progressed()
            if pending:
                self._write(b"".join(pending))
        else:
            self.app.connection_made(self)  # type: ignore[arg-type]
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        return not self._closing

    def _read(self) -> bool:
        """Decrypt what the BIO holds and hand it on; False when the connection ends."""
        sslobj = self.sslobj
        if sslobj is None:
            return False
        plain = _buffers.plain
        size = len(plain)
        got = 0
        ended = False
        while True:
            try:
                count = sslobj.read(size - got, plain[got:])
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                ended = True
                break
            except (ssl.SSLError, ValueError) as exc:
                if got:
                    self._deliver(plain, got)
                self._fail(exc)
                return False
            if not count:
                ended = True  # close_notify
                break
            got += count
            if got == size:
                self._deliver(plain, got)
                got = 0
                if self._closing:
                    return False
        if got:
            self._deliver(plain, got)
        self._send()  # a KeyUpdate answered, a ticket, an alert
        if ended and not self._closing:
            self._end_of_stream()
            self.close()
            return False
        return not self._closing

    def _deliver(self, plain: memoryview, count: int) -> None:
        self.app.data_received(bytes(plain[:count]))  # type: ignore[attr-defined]

    def _end_of_stream(self) -> None:
        if self._eof or not self.done:
            return
        self._eof = True
        keep_open = self.app.eof_received()  # type: ignore[attr-defined]
        if keep_open:
            log.debug("eof_received() returning true has no effect over TLS")

    def _progressed(self) -> None:
        """Tell the connection (``tls_progressed``, if it has one) that the handshake moved
        on: the hub's gate gives each step its own open timeout."""
        hook = getattr(self.app, "tls_progressed", None)
        if hook is not None and not self._closing:
            hook()

    def _send(self) -> bool:
        outgoing, raw = self.outgoing, self.raw
        if outgoing is not None and outgoing.pending and raw is not None and not raw.is_closing():
            raw.write(outgoing.read())
            return True
        return False

    def _write(self, data: bytes) -> None:
        sslobj, outgoing, raw = self.sslobj, self.outgoing, self.raw
        assert sslobj is not None and outgoing is not None and raw is not None
        if len(data) <= SLICE:
            sslobj.write(data)
            raw.write(outgoing.read())
            return
        view = memoryview(data)
        records = []
        for start in range(0, len(data), SLICE):
            sslobj.write(view[start : start + SLICE])
            records.append(outgoing.read())
        raw.write(b"".join(records))

    def _fail(self, exc: BaseException) -> None:
        log.debug("TLS with %s failed: %s", self.get_extra_info("peername"), exc)
        self._send()
        raw = self.raw
        self._closing = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if raw is not None:
            raw.close()

    # -- the inner connection's transport ------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self.raw is None or self.raw.is_closing() or not data:
            return
        if not self.done:
            if self._pending is None:
                self._pending = []
            self._pending.append(bytes(data))
            return
        try:
            self._write(bytes(data) if not isinstance(data, bytes) else data)
        except ssl.SSLError as exc:
            self._fail(exc)

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def is_closing(self) -> bool:
        raw = self.raw
        return self._closing or raw is None or raw.is_closing()

    def close(self) -> None:
        """close_notify after what was written, then the TCP close."""
        if self._closing:
            return
        self._closing = True
        raw, sslobj = self.raw, self.sslobj
        if raw is None:
            return
        if self.done and sslobj is not None:
            try:
                sslobj.unwrap()
            except (ssl.SSLError, ValueError):
                pass  # SSLWantReadError: the peer's close_notify is not awaited
            self._send()
        raw.close()

    def abort(self) -> None:
        self._closing = True
        if self.raw is not None:
            self.raw.abort()

    def can_write_eof(self) -> bool:
        return False  # TLS has no half-close (asyncio's SSL transport says the same)

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close")

    def get_write_buffer_size(self) -> int:
        pending = sum(map(len, self._pending)) if self._pending else 0
        raw = self.raw
        return pending + (raw.get_write_buffer_size() if raw is not None else 0)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self.raw is not None:
            self.raw.set_write_buffer_limits(high, low)

    def pause_reading(self) -> None:
        if self.raw is not None:
            self.raw.pause_reading()

    def resume_reading(self) -> None:
        if self.raw is not None and not self._closing:
            self.raw.resume_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        sslobj = self.sslobj if self.done else None
        if name == "ssl_object":
            return sslobj
        if name == "sslcontext":
            return self.context
        if name == "peercert":
            return sslobj.getpeercert() if sslobj is not None else default
        if name == "cipher":
            return sslobj.cipher() if sslobj is not None else default
        if name == "compression":
            return sslobj.compression() if sslobj is not None else default
        raw = self.raw
        return raw.get_extra_info(name, default) if raw is not None else default

    async def handshake(self) -> None:
        """Client side: wait for the handshake (its failure raises ``ssl.SSLError``)."""
        assert self._waiter is not None
        await self._waiter


def client_layer(
    app: asyncio.BaseProtocol,
    context: ssl.SSLContext,
    server_hostname: str,
    session: ssl.SSLSession | None = None,
) -> TlsLayer:
    """The client side (``connect``): ``session`` resumed if the server still takes it."""
    return TlsLayer(
        app, context, server_side=False, server_hostname=server_hostname, session=session
    )
