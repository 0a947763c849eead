"""Hostile frames after a valid upgrade, byte for byte (RFC 6455 §5, PROTOCOL §3–4).

Each case writes frames by hand on a raw socket, parses the close frame the hub answers
with, checks the audit entry and the disconnect counter, and that the hub still serves.
Cases about floods also measure what the hub holds for the peer.

Decisions where PROTOCOL.md is silent (also in docs/security.md):

* Framing errors are websockets' ``Fail the WebSocket Connection``: close 1002 and the TCP
  connection ends at once. A close frame whose reason is not UTF-8 is 1007 (RFC 6455 §8.1:
  invalid UTF-8 anywhere is "inconsistent data"), an invalid close code is 1002.
* A 64-bit length beyond 1 MiB closes with 1009 as soon as the header is read; nothing of
  the payload is read or allocated.
* Fragments are held as one contiguous buffer: a message of many tiny or empty fragments
  costs the hub no more than its own bytes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from typing import Any

import psutil
import pytest

from tests.conftest import HubHandle
from tests.hub.wire import (
    BINARY,
    CLOSE,
    CONT,
    PING,
    PONG,
    TEXT,
    Wire,
    assert_healthy,
    audit,
    close_payload,
    deflate,
    frame,
    inflate,
    text,
)
from tests.support import RawAgent, online_agent, wait_for

MiB = 1024 * 1024


async def registered(hub: HubHandle, agent_id: str = "edge-1", **kwargs: Any) -> tuple[Wire, Any]:
    """A registered agent on a raw socket, and the hub's connection object for it."""
    wire = await Wire.upgrade(hub.hub.port, "/ws", await hub.agent_token(agent_id), **kwargs)
    await wire.register(agent_id)
    return wire, hub.hub.registry.live[agent_id].conn


async def expect_close(hub: HubHandle, wire: Wire, code: int, agent_id: str = "edge-1") -> None:
    """The hub sends a close frame with ``code``, ends the TCP connection, and records it."""
    before = hub.hub.metrics.disconnects[code]
    assert await wire.closed_code() == code
    await wait_for(lambda: agent_id not in hub.hub.registry.live, what="session cleaned up")
    assert hub.hub.metrics.disconnects[code] == before + 1
    entry = (await audit(hub, "agent.disconnect"))[0]
    assert (entry["subject"], entry["detail"]["code"]) == (agent_id, code)
    assert entry["source"] == "127.0.0.1"


def held(conn: Any) -> int:
    """Bytes the hub holds for a partly received fragmented message."""
    fragments = conn._fragments
    if fragments is None:
        return 0
    if isinstance(fragments, list):
        return sys.getsizeof(fragments) + sum(sys.getsizeof(f) for f in fragments)
    return sys.getsizeof(fragments)


HEARTBEAT = b'{"type":"heartbeat","metrics":{"probe":7}}'


async def still_up(hub: HubHandle, wire: Wire, agent_id: str = "edge-1", value: int = 7) -> None:
    """The connection still carries messages: a heartbeat lands in the agent's record."""
    record = hub.hub.registry.records[agent_id]
    record.metrics = {}
    await wire.send(text(HEARTBEAT.replace(b"7", str(value).encode())))
    await wait_for(lambda: record.metrics == {"probe": float(value)}, what="heartbeat")


# -- framing errors: 1002 ----------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        frame(TEXT, HEARTBEAT, mask=False),
        frame(TEXT, HEARTBEAT, rsv=4),  # RSV1 without a negotiated extension
        frame(TEXT, HEARTBEAT, rsv=2),
        frame(TEXT, HEARTBEAT, rsv=1),
        *(frame(op, b"x") for op in (0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xF)),
        frame(PING, b"x", fin=False),
        frame(PING, b"p" * 126),
        frame(PONG, b"p" * 200),
        frame(CLOSE, b"\x03"),  # a one-byte close payload
        frame(CONT, b"orphan"),
        frame(TEXT, b'{"type":', fin=False) + frame(TEXT, b'"heartbeat"}'),
        frame(TEXT, b'{"type":', fin=False) + frame(BINARY, b"x"),
    ],
    ids=[
        "unmasked",
        "rsv1",
        "rsv2",
        "rsv3",
        *(f"opcode-{op:x}" for op in (0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xF)),
        "fragmented-ping",
        "ping-126",
        "pong-200",
        "close-1-byte",
        "orphan-continuation",
        "text-inside-fragmented",
        "binary-inside-fragmented",
    ],
)
async def test_framing_errors_close_1002(hub: HubHandle, bad: bytes) -> None:
    wire, _ = await registered(hub)
    await wire.send(bad)
    await expect_close(hub, wire, 1002)
    await assert_healthy(hub)


async def test_control_frames_inside_a_fragmented_message_are_fine(hub: HubHandle) -> None:
    wire, _ = await registered(hub)
    await wire.send(
        frame(TEXT, HEARTBEAT[:10], fin=False)
        + frame(PING, b"mid")
        + frame(CONT, HEARTBEAT[10:20], fin=False)
        + frame(PONG, b"unsolicited")
        + frame(CONT, HEARTBEAT[20:])
    )
    pong = await wire.read_frame()
    assert (pong.opcode, pong.payload) == (PONG, b"mid")
    await wait_for(lambda: hub.hub.registry.records["edge-1"].metrics == {"probe": 7.0})
    await still_up(hub, wire, value=8)
    wire.abort()


# -- close frames ------------------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
async def test_close_with_an_invalid_code_is_1002(hub: HubHandle, code: int) -> None:
    wire, _ = await registered(hub)
    await wire.send(frame(CLOSE, close_payload(code, b"bye")))
    await expect_close(hub, wire, 1002)


async def test_close_with_a_reason_that_is_not_utf8_is_1007(hub: HubHandle) -> None:
    wire, _ = await registered(hub)
    await wire.send(frame(CLOSE, close_payload(1000, b"bye \xff\xfe")))
    await expect_close(hub, wire, 1007)


@pytest.mark.parametrize("code", [1000, 1001, 3000, 4999])
async def test_a_valid_close_is_echoed(hub: HubHandle, code: int) -> None:
    wire, _ = await registered(hub)
    await wire.send(frame(CLOSE, close_payload(code, "ciao 👋".encode())))
    await expect_close(hub, wire, code)


# -- sizes: 1009 -------------------------------------------------------------------------


@pytest.mark.parametrize("length", [MiB + 1, 2**62, 2**63 + 5, 2**64 - 1])
async def test_huge_length_header_closes_1009_without_reading_or_allocating(
    hub: HubHandle, length: int
) -> None:
    wire, _ = await registered(hub)
    rss = psutil.Process().memory_info().rss
    # Only the header and a mask key: the hub must not wait for (or reserve) the payload.
    await wire.send(frame(TEXT, b"", length=length, length_form=127))
    await expect_close(hub, wire, 1009)
    assert psutil.Process().memory_info().rss - rss < 8 * MiB
    await assert_healthy(hub)


async def test_fragments_adding_up_past_1_mib_close_1009(hub: HubHandle) -> None:
    wire, conn = await registered(hub)
    chunk = b" " * 4096
    await wire.send(frame(TEXT, HEARTBEAT, fin=False))
    for _ in range(255):
        await wire.send(frame(CONT, chunk, fin=False))
    assert held(conn) < 2 * MiB
    await wire.send(frame(CONT, chunk, fin=False))  # now past 1 MiB
    await expect_close(hub, wire, 1009)
    await assert_healthy(hub)


#: Frame budgets out of the way, for tests of what a flood costs when it is allowed.
UNBUDGETED = {"frame_rate": 1e9, "frame_burst": 1e9}


async def test_tiny_and_empty_fragments_cost_no_more_than_their_bytes(hub_factory) -> None:
    hub = await hub_factory(**UNBUDGETED)
    wire, conn = await registered(hub)
    head = b'{"type":"heartbeat","metrics":{"probe":9},"pad":"'
    await wire.send(frame(TEXT, head, fin=False))
    one_byte = b"".join(frame(CONT, b"a", fin=False) for _ in range(40_000))
    empty = frame(CONT, b"", fin=False) * 100_000  # one mask key for all: still valid
    await wire.send(one_byte)
    await wire.send(empty)
    await wire.send(frame(PING, b"sync"))
    assert (await wire.read_frame(timeout=20)).payload == b"sync"  # all of it was parsed
    payload = len(head) + 40_000
    assert held(conn) <= 2 * payload + 64 * 1024, held(conn)
    await wire.send(frame(CONT, b'"}'))
    await wait_for(lambda: hub.hub.registry.records["edge-1"].metrics == {"probe": 9.0})
    assert held(conn) == 0
    wire.abort()


async def test_deflate_bomb_on_admin_closes_1009(hub: HubHandle) -> None:
    token = await hub.admin_token("viewer")
    wire = await Wire.upgrade(
        hub.hub.port, "/admin", token, extra="Sec-WebSocket-Extensions: permessage-deflate\r\n"
    )
    assert wire.response is not None
    assert "permessage-deflate" in wire.response.headers["sec-websocket-extensions"]
    # Under the limit after inflation: a real request padded with JSON whitespace.
    request = b'{"type":"agents","id":"near"}' + b" " * (MiB - 100)
    small = deflate(request)
    assert len(small) < 4096
    await wire.send(frame(TEXT, small, rsv=4))
    reply = await wire.read_frame()
    assert reply.opcode == TEXT  # the hub compresses its answer; decoding it is not the point
    # Past the limit: 64 MiB of zeros in about 64 KB.
    bomb = deflate(b"0" * (64 * MiB))
    assert len(bomb) < 128 * 1024
    rss = psutil.Process().memory_info().rss
    await wire.send(frame(TEXT, bomb, rsv=4))
    assert await wire.closed_code() == 1009
    assert psutil.Process().memory_info().rss - rss < 16 * MiB
    await hub.hub.auditor.drain()
    entry = (await audit(hub, "admin.disconnect"))[0]
    assert entry["detail"]["code"] == 1009
    await assert_healthy(hub)


async def test_admin_deflate_small_messages_go_plain_and_big_ones_compressed(
    hub: HubHandle,
) -> None:
    # RFC 7692 lets each side choose per message. Plain small messages save the hub (and
    # the console) a deflate each way; big ones, a snapshot of the fleet, still shrink.
    agents = [await online_agent(hub, f"edge-{n}", labels={"site": "x" * 40}) for n in range(8)]
    token = await hub.admin_token("viewer")
    wire = await Wire.upgrade(
        hub.hub.port, "/admin", token, extra="Sec-WebSocket-Extensions: permessage-deflate\r\n"
    )
    await wire.send(text({"type": "jobs", "id": "plain"}))  # none yet: a short answer
    small = await wire.read_frame()
    assert small.rsv == 0 and json.loads(small.payload)["id"] == "plain"
    await wire.send(frame(TEXT, deflate(b'{"type":"agents","id":"big"}'), rsv=4))
    big = await wire.read_frame()
    assert big.rsv == 4
    inflated = json.loads(inflate(big.payload))
    assert inflated["id"] == "big" and len(inflated["data"]["agents"]) == 8
    wire.abort()
    for agent in agents:
        await agent.close()


# -- content: 1003, 1007, invalid_message ------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [frame(BINARY, b"\x00\x01"), frame(BINARY, b"{}", fin=False), frame(BINARY, b"")],
    ids=["binary", "binary-fragment", "empty-binary"],
)
async def test_binary_closes_1003(hub: HubHandle, bad: bytes) -> None:
    wire, _ = await registered(hub)
    await wire.send(bad)
    await expect_close(hub, wire, 1003)


async def test_binary_before_register_closes_1003(hub: HubHandle) -> None:
    wire = await Wire.upgrade(hub.hub.port, "/ws", await hub.agent_token("edge-1"))
    before = hub.hub.metrics.disconnects[1003]
    await wire.send(frame(BINARY, b"\x00"))
    assert await wire.closed_code() == 1003
    await wait_for(lambda: hub.hub.metrics.disconnects[1003] == before + 1)
    assert "edge-1" not in hub.hub.registry.records


@pytest.mark.parametrize(
    "payload",
    [
        b'{"type":"heartbeat","h":"\xc0\xaf"}',  # overlong "/"
        b'{"type":"heartbeat","h":"\xed\xa0\x80"}',  # a surrogate, UTF-8 encoded
        b'{"type":"heartbeat","h":"\xf4\x90\x80\x80"}',  # beyond U+10FFFF
        b'{"type":"heartbeat","h":"\xe2\x82"}',  # truncated sequence
        b'{"type":"heartbeat"}\xff',
    ],
    ids=["overlong", "surrogate", "beyond-max", "truncated", "trailing-ff"],
)
async def test_invalid_utf8_closes_1007_and_is_audited(hub: HubHandle, payload: bytes) -> None:
    wire, _ = await registered(hub)
    await wire.send(frame(TEXT, payload))
    await expect_close(hub, wire, 1007)
    entry = (await audit(hub, "message.not_json"))[0]
    assert (entry["actor"], entry["source"]) == ("agent:edge-1", "127.0.0.1")


async def test_utf8_split_across_fragments_is_fine(hub: HubHandle) -> None:
    wire, _ = await registered(hub)
    euro = "€".encode()
    head = b'{"type":"heartbeat","metrics":{"probe":3},"note":"' + euro[:1]
    await wire.send(frame(TEXT, head, fin=False) + frame(CONT, euro[1:] + b'"}'))
    await wait_for(lambda: hub.hub.registry.records["edge-1"].metrics == {"probe": 3.0})
    wire.abort()


DEEP = 100_000


@pytest.mark.parametrize(
    ("payload", "outcome"),
    [
        (b"[" * DEEP + b"]" * DEEP, "invalid"),
        (b'{"a":' * DEEP + b"1" + b"}" * DEEP, "invalid"),
        (b"[" * DEEP, 1007),
        (b'{"type":"heartbeat","s":"' + b"x" * (64 * 1024 + 1) + b'"}', "invalid"),
        (b'{"type":"heartbeat","' + b"k" * (64 * 1024 + 1) + b'":1}', "invalid"),
        (b'{"type":"heartbeat","n":' + b"9" * 5000 + b"}", "invalid"),
        (b'{"type":"heartbeat","n":' + b"9" * 5000 + b".0}", "invalid"),
        (b'{"type":"heartbeat","n":-Infinity}', 1007),
        (b'{"type":"heartbeat","n":nan}', 1007),
        (b'{"type":"heartbeat","s":"\\udc00"}', "invalid"),
        (b'{"type":"heartbeat","s":"\\ud83d\\ude00","metrics":{"probe":5}}', "ok"),
        (b'{"type":"heartbeat","type":"heartbeat"}', "invalid"),
        (b'{"type":"heartbeat"}{"type":"heartbeat"}', 1007),
        (b'\xef\xbb\xbf{"type":"heartbeat"}', 1007),  # a byte-order mark is not JSON text
        (b"", 1007),
    ],
    ids=[
        "deep-array",
        "deep-object",
        "deep-unbalanced",
        "long-string",
        "long-key",
        "5000-digit-int",
        "5000-digit-float",
        "minus-infinity",
        "nan",
        "lone-low-surrogate",
        "surrogate-pair",
        "duplicate-type",
        "two-documents",
        "bom",
        "empty",
    ],
)
async def test_json_limits(hub: HubHandle, payload: bytes, outcome: Any) -> None:
    wire, _ = await registered(hub)
    await wire.send(frame(TEXT, payload))
    if outcome == "ok":
        await wait_for(lambda: hub.hub.registry.records["edge-1"].metrics == {"probe": 5.0})
    elif outcome == "invalid":
        error = await wire.recv_type("error")
        assert error["code"] == "invalid_message"
        await still_up(hub, wire)
    else:
        await expect_close(hub, wire, outcome)
        return
    wire.abort()


# -- budgets: 1008 -----------------------------------------------------------------------


async def test_twenty_invalid_messages_stay_up_the_twenty_first_closes_1008(
    hub: HubHandle,
) -> None:
    wire, _ = await registered(hub)
    await wire.send(text('{"type":"nope"}') * 20)
    for _ in range(20):
        assert (await wire.recv_type("error"))["code"] == "invalid_message"
    await still_up(hub, wire)
    await wire.send(text('{"type":"nope","id":"last"}'))
    assert (await wire.recv_type("error"))["ref"] == "last"
    await expect_close(hub, wire, 1008)
    entry = (await audit(hub, "message.invalid_budget"))[0]
    assert (entry["actor"], entry["source"]) == ("agent:edge-1", "127.0.0.1")


async def test_message_flood_is_warned_then_closed_1008(hub_factory) -> None:
    hub = await hub_factory(agent_message_rate=5, agent_message_burst=10)
    wire, _ = await registered(hub)  # register spent one token
    await wire.send(text(HEARTBEAT) * 40)
    seen = []
    while (got := await wire.read_frame()).opcode != CLOSE:
        seen.append(json.loads(got.payload))
    assert seen == [
        {
            "type": "error",
            "code": "rate_limited",
            "ref": None,
            "message": "message rate exceeded; slow down or be closed",
        }
    ]
    assert got.close_code == 1008
    await wire.send(frame(CLOSE, got.payload[:2]))
    await wire.eof()
    await wait_for(lambda: "edge-1" not in hub.hub.registry.live)
    entry = (await audit(hub, "message.rate_exceeded"))[0]
    assert (entry["actor"], entry["source"]) == ("agent:edge-1", "127.0.0.1")
    await assert_healthy(hub)


async def test_register_never_sent_closes_1008_and_a_deaf_peer_is_cut_off(hub_factory) -> None:
    hub = await hub_factory(register_timeout=0.5)
    wire = await Wire.upgrade(hub.hub.port, "/ws", await hub.agent_token("edge-1"))
    started = asyncio.get_running_loop().time()
    # Keepalive traffic is not a register.
    for n in range(3):
        await wire.send(frame(PING, str(n).encode()))
        assert (await wire.read_frame()).opcode == PONG
        await asyncio.sleep(0.1)
    got = await wire.close_frame()
    assert (got.close_code, got.close_reason) == (1008, "no register within the time limit")
    entry = (await audit(hub, "agent.register_refused"))[0]
    assert entry["detail"]["reason"] == "no register within the time limit"
    # The peer never answers the close: the hub drops it after its close timeout (5 s).
    assert await wire.eof(timeout=8) == b""
    assert 4.5 < asyncio.get_running_loop().time() - started < 7.5
    assert not hub.hub.registry.live
    await assert_healthy(hub)


async def test_register_twice_is_invalid_and_changes_nothing(hub: HubHandle) -> None:
    wire, _ = await registered(hub)
    await wire.send(text({"type": "register", "agent_id": "edge-2", "hostname": "evil"}))
    error = await wire.recv_type("error")
    assert (error["code"], error["ref"]) == ("invalid_message", "register")
    assert hub.hub.registry.records["edge-1"].hostname == "edge-1"
    assert "edge-2" not in hub.hub.registry.records
    await still_up(hub, wire)
    wire.abort()


async def test_enrollment_pattern_mismatch_closes_1008_and_issues_nothing(
    hub: HubHandle,
) -> None:
    enroll = await hub.token("enroll", pattern="edge-berlin-*")
    wire = await Wire.upgrade(hub.hub.port, "/ws", enroll)
    await wire.send(text({"type": "register", "agent_id": "edge-paris-1"}))
    got = await wire.close_frame()
    assert got.close_code == 1008
    assert "pattern" in got.close_reason
    entry = (await audit(hub, "agent.register_refused"))[0]
    assert (entry["subject"], entry["source"]) == ("edge-paris-1", "127.0.0.1")
    assert "edge-paris-1" not in hub.hub.registry.records
    assert not await audit(hub, "credential.issued")


# -- floods and peers that stop reading ---------------------------------------------------


@pytest.mark.parametrize("kind", ["pings", "empty fragments"])
async def test_a_flood_of_control_frames_or_fragments_closes_1008(hub_factory, kind: str) -> None:
    hub = await hub_factory(frame_rate=50, frame_burst=100)
    wire, _ = await registered(hub)
    # Within the budget: answered, and the agent stays.
    await wire.send(frame(PING, b"x") * 20 + frame(PING, b"sync"))
    while (await wire.read_frame()).payload != b"sync":
        pass
    assert "edge-1" in hub.hub.registry.live
    # Past it (the burst, then 50 a second): closed as a policy breach and audited.
    if kind == "pings":
        flood = frame(PING, b"p") * 1_000
    else:
        flood = frame(TEXT, b'{"type":"heartbeat"', fin=False) + frame(CONT, b"", fin=False) * 1_000
    await wire.send(flood)
    await expect_close(hub, wire, 1008)
    entry = (await audit(hub, "message.frame_rate_exceeded"))[0]
    assert (entry["actor"], entry["source"]) == ("agent:edge-1", "127.0.0.1")
    await assert_healthy(hub)


async def test_ping_flood_from_a_peer_that_never_reads_is_cut_off_at_the_write_bound(
    hub_factory, caplog: pytest.LogCaptureFixture
) -> None:
    bound = 64 * 1024
    hub = await hub_factory(agent_write_buffer=bound, **UNBUDGETED)
    wire, conn = await registered(hub, rcvbuf=4096)
    chunk = frame(PING, b"p" * 125) * 1000  # 131 KB of pings, 127 KB of pongs owed
    sent = 0
    with caplog.at_level(logging.WARNING, logger="hub.protocol.connection"):
        try:
            while sent < 64 * MiB and not conn.closed:
                await wire.send(chunk)
                sent += len(chunk)
                await asyncio.sleep(0)
        except ConnectionError:
            pass
        await wait_for(lambda: conn.closed, what="the hub aborts the flooding peer")
    assert sent < 32 * MiB, "the hub kept answering a peer that reads nothing"
    unread = [
        int(m.group(1))
        for r in caplog.records
        if (m := re.search(r"aborting connection from 127\.0\.0\.1: (\d+) bytes unread", r.message))
    ]
    assert len(unread) == 1
    # At most the bound plus the pongs owed for one read of the socket (256 KiB).
    assert bound < unread[0] <= bound + 256 * 1024
    await wait_for(lambda: "edge-1" not in hub.hub.registry.live)
    assert hub.hub.metrics.disconnects[1006] == 1
    await assert_healthy(hub)


async def test_agent_that_stops_reading_commands_is_cut_off_at_the_write_bound(
    hub_factory, caplog: pytest.LogCaptureFixture
) -> None:
    bound = 64 * 1024
    hub = await hub_factory(agent_write_buffer=bound)
    _, conn = await registered(hub, rcvbuf=4096)
    admin = await RawAgent.connect(hub.admin_url, await hub.admin_token("operator"))
    big = "x" * 60_000
    with caplog.at_level(logging.WARNING, logger="hub.protocol.connection"):
        for n in range(200):
            await admin.send(
                {
                    "type": "dispatch",
                    "id": n,
                    "target": {"agent_ids": ["edge-1"]},
                    "name": "exec",
                    "args": {"argv": [big]},
                }
            )
            assert (await admin.recv_type("reply"))["ok"]
            if conn.closed:
                break
        await wait_for(lambda: conn.closed, what="the hub aborts the deaf agent")
    unread = [
        int(m.group(1))
        for r in caplog.records
        if (m := re.search(r"(\d+) bytes unread", r.message))
    ]
    assert len(unread) == 1 and bound < unread[0] <= bound + 61_000
    # Nothing was lost: what the agent never read is still owed to it.
    await wait_for(lambda: hub.hub.registry.records["edge-1"].state == "offline")
    sent = [c for c in hub.hub.ledger.commands.values() if c.state == "sent"]
    assert sent, "commands written to the dead socket stay sent, to be delivered again"
    await admin.close()
    await assert_healthy(hub)


# -- a compromised agent -----------------------------------------------------------------


async def test_replies_to_another_agents_command_change_nothing(hub: HubHandle) -> None:
    victim, _ = await registered(hub, "edge-a")
    rogue, _ = await registered(hub, "edge-b")
    admin = await RawAgent.connect(hub.admin_url, await hub.admin_token("operator"))
    await admin.send(
        {"type": "dispatch", "id": 1, "target": {"agent_ids": ["edge-a"]}, "name": "ping"}
    )
    reply = await admin.recv_type("reply")
    command_id = reply["data"]["command_ids"][0]
    assert (await victim.recv_type("command"))["command_id"] == command_id
    for message in (
        {"type": "ack", "command_id": command_id},
        {"type": "output", "command_id": command_id, "seq": 0, "stream": "stdout", "data": "x"},
        {"type": "result", "command_id": command_id, "status": "failed", "error": "pwned"},
    ):
        await rogue.send(text(message))
        error = await rogue.recv_type("error")
        assert (error["code"], error["ref"]) == ("unknown_command", command_id)
    assert hub.hub.ledger.commands[command_id].state == "sent"
    foreign = await audit(hub, "command.foreign_reply")
    assert {(e["actor"], e["subject"]) for e in foreign} == {("agent:edge-b", command_id)}
    await victim.send(text({"type": "result", "command_id": command_id, "status": "succeeded"}))
    await wait_for(lambda: command_id not in hub.hub.ledger.commands)
    await admin.send({"type": "job", "id": 2, "job_id": reply["data"]["job_id"]})
    job = (await admin.recv_type("reply"))["data"]
    assert job["commands"][0]["state"] == "succeeded"
    await admin.close()
    victim.abort()
    rogue.abort()
