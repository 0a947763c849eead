"""The agent channel: register, welcome, takeover, liveness, frames, close codes (§3–4)."""

from __future__ import annotations

import json

import pytest

from hub.protocol.times import parse_time
from tests.conftest import HubHandle
from tests.support import RawAgent, wait_for


async def connect(hub: HubHandle, agent_id: str = "edge-1") -> RawAgent:
    return await RawAgent.connect(hub.agent_url, await hub.agent_token(agent_id))


async def test_welcome(hub: HubHandle) -> None:
    agent = await connect(hub)
    welcome = await agent.register(
        "edge-1", labels={"site": "berlin"}, location={"lat": 52.5, "lon": 13.4}
    )
    assert welcome["hub_id"] == hub.hub.hub_id
    assert welcome["heartbeat_interval"] == 15
    assert welcome["session_id"]
    assert "agent_key" not in welcome
    parse_time(welcome["server_time"])
    record = hub.hub.registry.records["edge-1"]
    assert (record.state, record.labels, record.location) == (
        "online",
        {"site": "berlin"},
        (52.5, 13.4),
    )
    await agent.close()
    await wait_for(lambda: record.state == "offline", what="offline after close")


async def test_register_must_come_in_time(hub_factory) -> None:
    hub = await hub_factory(register_timeout=0.3)
    agent = await connect(hub)
    assert await agent.closed() == 1008


async def test_first_message_must_be_register(hub: HubHandle) -> None:
    agent = await connect(hub)
    await agent.send({"type": "heartbeat"})
    assert await agent.closed() == 1008


@pytest.mark.parametrize(
    "fields",
    [
        {"agent_id": "-bad"},
        {"agent_id": "x" * 129},
        {"agent_id": 7},
        {"platform": "p" * 129},
        {"labels": {"k": 1}},
        {"labels": {f"k{i}": "v" for i in range(65)}},
        {"location": {"lat": 91, "lon": 0}},
        {"location": {"lat": 0, "lon": -180.5}},
        {"capabilities": "ping"},
    ],
)
async def test_invalid_register_closes_1008(hub: HubHandle, fields: dict) -> None:
    agent = await RawAgent.connect(hub.agent_url, await hub.agent_token("edge-1"))
    message = {"type": "register", "agent_id": "edge-1", **fields}
    await agent.send(message)
    assert await agent.closed() == 1008


async def test_identity_mismatch_closes_1008_and_is_audited(hub: HubHandle) -> None:
    agent = await connect(hub, "edge-1")
    await agent.send({"type": "register", "agent_id": "edge-2"})
    assert await agent.closed() == 1008
    await hub.hub.auditor.drain()
    entries = (
        await hub.hub.store.audit_entries({"action": "agent.register_refused"}, 10, None)
    ).items
    assert entries and "another agent id" in entries[0]["detail"]["reason"]
    assert "edge-2" not in hub.hub.registry.records


async def test_takeover_newest_wins_and_late_cleanup_keeps_it(hub: HubHandle) -> None:
    token = await hub.agent_token("edge-1")
    old = await RawAgent.connect(hub.agent_url, token)
    await old.register("edge-1")
    new = await RawAgent.connect(hub.agent_url, token)
    await new.register("edge-1")
    assert await old.closed() == 4001
    # Wait for the old connection's clean-up (its disconnect is counted when it runs): the
    # new connection must still be the live one afterwards.
    await wait_for(lambda: hub.hub.metrics.disconnects[4001] == 1, what="old clean-up")
    live = hub.hub.registry.live["edge-1"]
    assert hub.hub.registry.records["edge-1"].state == "online"
    await new.send({"type": "heartbeat", "metrics": {"cpu_percent": 3.0}})
    await wait_for(lambda: hub.hub.registry.records["edge-1"].metrics == {"cpu_percent": 3.0})
    assert hub.hub.registry.live["edge-1"] is live
    await hub.hub.auditor.drain()
    takeovers = (await hub.hub.store.audit_entries({"action": "agent.takeover"}, 10, None)).items
    assert len(takeovers) == 1
    await new.close()


async def test_repeated_takeovers_raise_agent_conflict(hub: HubHandle) -> None:
    token = await hub.agent_token("edge-1")
    agents = []
    for _ in range(4):
        agent = await RawAgent.connect(hub.agent_url, token)
        await agent.register("edge-1")
        agents.append(agent)
    hub.hub.alerts.evaluate()
    await wait_for(lambda: ("agent_conflict", "edge-1") in hub.hub.alerts.open)
    for agent in agents:
        await agent.close()


async def test_heartbeat_liveness_online_stale_offline(hub_factory) -> None:
    hub = await hub_factory(heartbeat_interval=0.3)
    agent = await connect(hub)
    welcome = await agent.register("edge-1")
    assert welcome["heartbeat_interval"] == 0.3
    record = hub.hub.registry.records["edge-1"]
    await wait_for(lambda: record.state == "stale", timeout=5, what="stale")
    await agent.send({"type": "heartbeat", "status": "ok"})
    await wait_for(lambda: record.state == "online", what="online again")
    assert await agent.closed(timeout=5) == 1001
    assert record.state == "offline"


async def test_binary_frame_closes_1003(hub: HubHandle) -> None:
    agent = await connect(hub)
    await agent.register("edge-1")
    await agent.ws.send(b"\x00\x01")
    assert await agent.closed() == 1003


@pytest.mark.parametrize(
    "text",
    [b"\xff\xfe", "NaN", '{"type": "heartbeat"} trailing', "heartbeat", '{"a": Infinity}'],
)
async def test_not_json_closes_1007(hub: HubHandle, text: str | bytes) -> None:
    agent = await connect(hub)
    await agent.register("edge-1")
    if isinstance(text, bytes):
        # Invalid UTF-8 in a text frame: sent raw, bypassing the client's own encoding.
        await agent.ws.send(text, text=True)
    else:
        await agent.ws.send(text)
    assert await agent.closed() == 1007


async def test_too_big_closes_1009(hub: HubHandle) -> None:
    agent = await connect(hub)
    await agent.register("edge-1")
    await agent.ws.send(json.dumps({"type": "heartbeat", "pad": "x" * (1024 * 1024)}))
    assert await agent.closed() == 1009


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ('{"type": "heartbeat", "a": 1, "a": 2}', None),
        ('{"type": "warp", "id": "m1"}', "m1"),
        ('{"type": "ack"}', "ack"),
        ('{"type": "heartbeat", "metrics": {"x": 9007199254740993}}', None),
        ('{"type": "heartbeat", "metrics": {"x": 1e999}}', None),
        ('{"type": "heartbeat", "s": "\\ud800"}', None),
        ("[1, 2]", None),
        ('{"type": 5}', None),
        ('{"type": "heartbeat", "status": "sleepy"}', "heartbeat"),
        ("[" * 40 + "]" * 40, None),
    ],
)
async def test_invalid_messages_get_an_error_and_stay_up(
    hub: HubHandle, text: str, ref: str | None
) -> None:
    agent = await connect(hub)
    await agent.register("edge-1")
    await agent.ws.send(text)
    error = await agent.recv_type("error")
    assert error["code"] == "invalid_message"
    assert error["ref"] == ref
    assert error["message"]
    await agent.send({"type": "heartbeat", "metrics": {"cpu_percent": 1}})
    await wait_for(lambda: hub.hub.registry.records["edge-1"].metrics == {"cpu_percent": 1.0})
    await agent.close()


async def test_more_than_20_invalid_messages_close_1008(hub: HubHandle) -> None:
    agent = await connect(hub)
    await agent.register("edge-1")
    for _ in range(21):
        await agent.ws.send('{"type": "nope"}')
    assert await agent.closed() == 1008


async def test_replies_for_foreign_commands_are_unknown_command(hub: HubHandle) -> None:
    agent = await connect(hub)
    await agent.register("edge-1")
    for message in (
        {"type": "ack", "command_id": "c-1"},
        {"type": "output", "command_id": "c-1", "seq": 0, "stream": "stdout", "data": "x"},
        {"type": "result", "command_id": "c-1", "status": "succeeded"},
    ):
        await agent.send(message)
        error = await agent.recv_type("error")
        assert (error["code"], error["ref"]) == ("unknown_command", "c-1")
    await agent.close()


async def test_at_the_limit_register_of_a_new_id_closes_1013(hub_factory) -> None:
    hub = await hub_factory(max_agents=1)
    enroll = await hub.token("enroll")
    first = await RawAgent.connect(hub.agent_url, enroll)
    second = await RawAgent.connect(hub.agent_url, enroll)  # upgrade admitted: 0 registered
    await first.register("edge-1")
    await second.send({"type": "register", "agent_id": "edge-2"})
    assert await second.closed() == 1013
    await first.close()
