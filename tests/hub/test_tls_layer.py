"""TLS inside the hub's connection (hub/protocol/tls_layer.py), from outside.

The client here drives its own ``ssl.SSLObject`` over a plain TCP stream (``TlsWire``), so
that a test decides every byte: half a ClientHello, garbage, a close_notify without a
close frame, a session ticket offered again. OpenSSL is on both ends; nothing of the hub is
replaced.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from dataclasses import dataclass, field
from typing import Any

import pytest
import trustme

from hub.gate import SWAP_AGE
from hub.protocol.client import AdminClient
from hub.protocol.tls_layer import TlsLayer
from tests.hub import test_tls
from tests.hub.test_tls import client_context, revocation_list, tls_hub, wss
from tests.hub.wire import close_payload, frame, text, upgrade_request
from tests.support import FakeClock, RawAgent, job_done, wait_for

CLOSE, BINARY = 0x8, 0x2
# The certificates of tests/hub/test_tls.py.
ca = test_tls.ca
server_files = test_tls.server_files


@dataclass
class TlsWire:
    """A TCP connection whose TLS the test drives by hand."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    sslobj: ssl.SSLObject
    incoming: ssl.MemoryBIO
    outgoing: ssl.MemoryBIO
    plain: bytearray = field(default_factory=bytearray)

    @classmethod
    async def open(
        cls,
        port: int,
        context: ssl.SSLContext,
        session: ssl.SSLSession | None = None,
        local_host: str | None = None,
    ) -> TlsWire:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=(local_host, 0) if local_host else None
        )
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        sslobj = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1", session=session)
        return cls(reader, writer, sslobj, incoming, outgoing)

    def client_hello(self) -> bytes:
        with pytest.raises(ssl.SSLWantReadError):
            self.sslobj.do_handshake()
        return self.outgoing.read()

    async def flush(self) -> None:
        if self.outgoing.pending:
            self.writer.write(self.outgoing.read())
            await self.writer.drain()

    async def handshake(self, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    self.sslobj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await self.flush()
                    data = await self.reader.read(65536)
                    if not data:
                        raise ConnectionError("closed during the handshake") from None
                    self.incoming.write(data)
            await self.flush()

    async def send(self, data: bytes) -> None:
        self.sslobj.write(data)
        await self.flush()

    async def _more(self) -> str | None:
        """Read and decrypt once; 'close_notify', 'eof' or 'reset' when the stream ends."""
        try:
            data = await self.reader.read(65536)
        except ConnectionResetError:
            return "reset"
        if not data:
            self.incoming.write_eof()
        else:
            self.incoming.write(data)
        while True:
            try:
                chunk = self.sslobj.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                return "close_notify"
            except ssl.SSLEOFError:
                return "eof"
            if not chunk:
                return "close_notify"
            self.plain += chunk
        await self.flush()
        return None if data else "eof"

    async def read_response(self, timeout: float = 5.0) -> bytes:
        async with asyncio.timeout(timeout):
            while b"\r\n\r\n" not in self.plain:
                if await self._more() and b"\r\n\r\n" not in self.plain:
                    raise ConnectionError("closed before the response")
        head, _, rest = bytes(self.plain).partition(b"\r\n\r\n")
        self.plain = bytearray(rest)
        return head

    async def read_frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        async with asyncio.timeout(timeout):
            while True:
                buf = self.plain
                if len(buf) >= 2:
                    n, start = buf[1] & 0x7F, 2
                    if n == 126 and len(buf) >= 4:
                        n, start = int.from_bytes(buf[2:4], "big"), 4
                    elif n == 127 and len(buf) >= 10:
                        n, start = int.from_bytes(buf[2:10], "big"), 10
                    if (n < 126 or start > 2) and len(buf) >= start + n:
                        opcode, payload = buf[0] & 0x0F, bytes(buf[start : start + n])
                        del buf[: start + n]
                        return opcode, payload
                if await self._more():
                    raise ConnectionError("closed before a frame")

    async def end(self, timeout: float = 5.0) -> str:
        """Read until the stream ends: how it ended."""
        async with asyncio.timeout(timeout):
            while True:
                how = await self._more()
                if how:
                    return how

    async def close_notify(self) -> None:
        with pytest.raises(ssl.SSLWantReadError):
            self.sslobj.unwrap()
        await self.flush()


def certificate_context(ca: trustme.CA, agent_id: str) -> ssl.SSLContext:
    return client_context(ca, ca.issue_cert(agent_id, common_name=agent_id))


async def upgraded(hub: Any, context: ssl.SSLContext, token: str | None, **kw: Any) -> TlsWire:
    wire = await TlsWire.open(hub.hub.port, context, **kw)
    await wire.handshake()
    await wire.send(upgrade_request("/ws", token))
    head = await wire.read_response()
    assert head.startswith(b"HTTP/1.1 101"), head
    return wire


async def register(wire: TlsWire, agent_id: str) -> dict[str, Any]:
    import json

    await wire.send(text({"type": "register", "agent_id": agent_id, "platform": "linux"}))
    while True:
        opcode, payload = await wire.read_frame()
        if opcode == 0x1:
            message = json.loads(payload)
            if message["type"] == "welcome":
                return message


async def healthy(hub: Any, ca: trustme.CA) -> None:
    """The hub still answers ``/healthz`` over TLS."""
    wire = await TlsWire.open(hub.hub.port, client_context(ca))
    await wire.handshake()
    await wire.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await wire.read_response()).startswith(b"HTTP/1.1 200")
    wire.writer.close()


# -- the handshake inside the gate's bounds -----------------------------------------------


async def test_mtls_through_the_layer_and_a_resumed_session_keeps_its_certificate(
    hub_factory, server_files, ca
) -> None:
    hub = await tls_hub(
        hub_factory, server_files, client_ca=server_files["ca"], require_client_cert=True
    )
    context = certificate_context(ca, "edge-1")
    wire = await upgraded(hub, context, None)  # no token: the certificate authenticates
    assert (await register(wire, "edge-1"))["type"] == "welcome"
    conn = hub.hub.registry.live["edge-1"].conn
    assert isinstance(conn.transport, TlsLayer)
    assert hub.hub.gate.certificate_agent(conn) == "edge-1"
    assert not wire.sslobj.session_reused
    session = wire.sslobj.session
    assert session is not None and session.has_ticket  # the hub's one TLS 1.3 ticket
    wire.writer.close()
    await wait_for(lambda: "edge-1" not in hub.hub.registry.live, what="offline")
    # Resumed from the ticket: no certificate crosses the wire, the hub still knows it.
    again = await upgraded(hub, context, None, session=session)
    assert again.sslobj.session_reused
    assert (await register(again, "edge-1"))["type"] == "welcome"
    conn = hub.hub.registry.live["edge-1"].conn
    assert hub.hub.gate.certificate_agent(conn) == "edge-1"
    again.writer.close()


async def test_a_reloaded_crl_voids_the_tickets(hub_factory, server_files, ca, tmp_path) -> None:
    crl = tmp_path / "agents.crl"
    crl.write_bytes(revocation_list(ca, [], age_minutes=2))
    hub = await tls_hub(hub_factory, server_files, client_ca=server_files["ca"], client_crl=crl)
    cert = ca.issue_cert("edge-1", common_name="edge-1")
    context = client_context(ca, cert)
    wire = await upgraded(hub, context, None)
    await register(wire, "edge-1")
    session = wire.sslobj.session
    wire.writer.close()
    resumed = await TlsWire.open(hub.hub.port, context, session=session)
    await resumed.handshake()
    assert resumed.sslobj.session_reused  # the ticket works until the CRL changes
    resumed.writer.close()
    crl.write_bytes(revocation_list(ca, [cert], age_minutes=1))
    os.utime(crl, ns=(crl.stat().st_atime_ns, crl.stat().st_mtime_ns + 10**9))
    await hub.hub.reload_crl()
    # The ticket no longer resumes: a full handshake, where the new CRL refuses the
    # certificate (TLS 1.3: the client learns it when it reads).
    again = await TlsWire.open(hub.hub.port, context, session=session)
    await again.handshake()
    assert not again.sslobj.session_reused
    await again.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(ssl.SSLError, match="REVOKED"):
        await again.read_response()


async def test_a_peer_stalled_mid_handshake_is_timed_out_by_the_gate(
    hub_factory, server_files, ca
) -> None:
    hub = await tls_hub(hub_factory, server_files, open_timeout=1.0, open_timeout_min=0.5)
    gate = hub.hub.gate
    before = hub.hub.metrics.connections["handshake_timeout"]
    wire = await TlsWire.open(hub.hub.port, client_context(ca))
    hello = wire.client_hello()
    wire.writer.write(hello[: len(hello) // 2])
    # Counted from TCP accept, and half-open while TLS is not done.
    await wait_for(lambda: gate.pending_handshakes == 1 and len(gate.half_open) == 1)
    assert await wire.end(timeout=10) in ("eof", "reset")
    await wait_for(lambda: gate.pending_handshakes == 0)
    assert hub.hub.metrics.connections["handshake_timeout"] == before + 1
    await healthy(hub, ca)


async def test_each_tls_step_gets_its_own_open_timeout(hub_factory, server_files, ca) -> None:
    # A storm's agents wait for the hub's CPU between steps: a handshake the hub has answered
    # is not timed out for the time its own earlier steps took.
    hub = await tls_hub(hub_factory, server_files, open_timeout=10.0)
    gate = hub.hub.gate
    clock = gate.clock = FakeClock()
    wire = await TlsWire.open(hub.hub.port, client_context(ca))
    wire.writer.write(wire.client_hello())
    data = await wire.reader.read(65536)  # the hub's flight: its clock starts again
    clock.now += 9
    wire.incoming.write(data)
    await wire.handshake()  # Finished: the clock starts again for the request
    await wait_for(lambda: gate.half_open.oldest()[1] == clock.now, what="handshake done")
    clock.now += 9
    gate._sweep()
    assert len(gate.half_open) == 1  # 18 s after accept, 9 s after its last step
    await wire.send(upgrade_request("/ws", await hub.agent_token("edge-1")))
    assert (await wire.read_response()).startswith(b"HTTP/1.1 101")
    # Silence after a step still ends at the open timeout.
    late = await TlsWire.open(hub.hub.port, client_context(ca))
    late.writer.write(late.client_hello())
    await late.reader.read(65536)
    await wait_for(lambda: len(gate.half_open) == 1, what="answered")
    clock.now += 10
    gate._sweep()
    assert await late.end() in ("eof", "reset")
    assert gate.pending_handshakes == 0


async def test_a_client_hello_in_pieces_completes(hub_factory, server_files, ca) -> None:
    hub = await tls_hub(hub_factory, server_files)
    token = await hub.agent_token("edge-1")
    wire = await TlsWire.open(hub.hub.port, client_context(ca))
    hello = wire.client_hello()
    for start in range(0, len(hello), 7):
        wire.writer.write(hello[start : start + 7])
        await wire.writer.drain()
    await wire.handshake()
    await wire.send(upgrade_request("/ws", token))
    assert (await wire.read_response()).startswith(b"HTTP/1.1 101")
    assert (await register(wire, "edge-1"))["type"] == "welcome"
    wire.writer.close()


async def test_at_the_cap_a_stalled_tls_handshake_is_shed_for_an_agent(
    hub_factory, server_files, ca
) -> None:
    hub = await tls_hub(hub_factory, server_files, max_pending_handshakes=2)
    gate = hub.hub.gate
    clock = gate.clock = FakeClock()
    before = hub.hub.metrics.connections["shed_half_open"]
    stalled = []
    for count in (1, 2):
        wire = await TlsWire.open(hub.hub.port, client_context(ca), local_host="127.0.0.2")
        wire.writer.write(wire.client_hello()[:40])
        await wait_for(lambda count=count: len(gate.half_open) == count, what="arrival")
        stalled.append(wire)
    clock.now += SWAP_AGE
    token = await hub.agent_token("edge-1")
    agent = await RawAgent.connect(wss(hub), token, ssl=client_context(ca))
    assert (await agent.register("edge-1"))["type"] == "welcome"
    # The oldest stalled handshake made room; no 503 can be written before TLS: closed.
    assert await stalled[0].end() in ("eof", "reset")
    assert not stalled[0].plain
    assert hub.hub.metrics.connections["shed_half_open"] == before + 1
    stalled[1].writer.close()
    await agent.close()
    await wait_for(lambda: gate.pending_handshakes == 0)


@pytest.mark.parametrize(
    "garbage",
    [b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(300), b"\x16\x03\x01\x00\x05hello"],
    ids=["plain-http", "random", "bad-record"],
)
async def test_garbage_instead_of_a_client_hello_gets_a_clean_close(
    hub_factory, server_files, ca, garbage: bytes
) -> None:
    hub = await tls_hub(hub_factory, server_files)
    reader, writer = await asyncio.open_connection("127.0.0.1", hub.hub.port)
    writer.write(garbage)
    got = b""
    async with asyncio.timeout(5):
        while chunk := await reader.read(65536):  # a reset would raise here
            got += chunk
    # Nothing but (at most) a TLS alert record, then FIN.
    assert got == b"" or got[0] == 0x15, got[:20]
    writer.close()
    await wait_for(lambda: hub.hub.gate.pending_handshakes == 0)
    await healthy(hub, ca)


# -- closing ----------------------------------------------------------------------------


async def test_a_close_notify_from_the_agent_ends_its_session_and_is_answered(
    hub_factory, server_files, ca
) -> None:
    hub = await tls_hub(hub_factory, server_files)
    wire = await upgraded(hub, client_context(ca), await hub.agent_token("edge-1"))
    await register(wire, "edge-1")
    await wire.close_notify()  # no close frame: TLS ends the stream
    await wait_for(lambda: "edge-1" not in hub.hub.registry.live, what="offline")
    assert await wire.end() == "close_notify"


async def test_the_hubs_close_ends_with_close_notify(hub_factory, server_files, ca) -> None:
    hub = await tls_hub(hub_factory, server_files)
    wire = await upgraded(hub, client_context(ca), await hub.agent_token("edge-1"))
    await register(wire, "edge-1")
    await wire.send(frame(BINARY, b"\x00"))  # Tether speaks text: the hub closes (1003)
    while (got := await wire.read_frame())[0] != CLOSE:
        pass
    assert int.from_bytes(got[1][:2], "big") == 1003
    await wire.send(frame(CLOSE, close_payload(1003)))
    assert await wire.end() == "close_notify"  # not a truncated stream


# -- data across many records -----------------------------------------------------------


async def test_a_large_message_crosses_many_records_both_ways(
    hub_factory, server_files, ca
) -> None:
    hub = await tls_hub(hub_factory, server_files)
    context = client_context(ca)
    admin = await AdminClient(
        wss(hub, "/admin"), await hub.admin_token("operator"), ssl_context=context
    ).open()
    agent = await RawAgent.connect(wss(hub), await hub.agent_token("edge-1"), ssl=context)
    await agent.register("edge-1")
    job = await admin.request("dispatch", target={"agent_ids": ["edge-1"]}, name="ping")
    command_id = (await agent.recv_type("command"))["command_id"]
    # Ten frames of 60 KB in (a string is at most 64 KiB), each across several records and
    # fed to OpenSSL in SLICEs; one of 600 KB out to the admin, across ~150 records.
    chunks = [os.urandom(30_000).hex() for _ in range(10)]
    for seq, chunk in enumerate(chunks):
        await agent.send(
            {"type": "output", "command_id": command_id, "seq": seq, "stream": "stdout",
             "data": chunk}
        )  # fmt: skip
    await agent.send({"type": "result", "command_id": command_id, "status": "succeeded"})
    await wait_for(lambda: job_done(admin, job["job_id"]), what="job done")
    output = await admin.request("output", command_id=command_id)
    assert "".join(chunk["data"] for chunk in output["chunks"]) == "".join(chunks)
    await agent.close()
    await admin.close()
