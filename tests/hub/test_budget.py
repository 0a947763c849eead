"""The read budget: bytes past a turn's budget wait for later turns, none lost or reordered."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from hub.budget import ReadBudget
from hub.protocol.client import AdminClient
from tests.conftest import HubHandle
from tests.hub.wire import Wire
from tests.support import RawAgent, fleet, job_done, wait_for


class Recorder:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def unpark(self) -> None:
        self.log.append(self.name)


async def next_turn() -> None:
    # Callbacks scheduled in a turn run at the start of the next: two yields pass one.
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_the_first_read_of_a_turn_starts_the_clock_and_a_new_turn_resets_it() -> None:
    budget = ReadBudget(seconds=1e-9)
    assert not budget.spent()
    assert budget.spent()
    await next_turn()
    assert not budget.spent()
    assert not ReadBudget(seconds=0).spent(), "0 turns the budget off"


async def test_parked_connections_are_handled_in_arrival_order_a_budget_per_turn() -> None:
    budget = ReadBudget(seconds=1e-9)
    log: list[str] = []
    budget.spent()
    for name in "abcd":
        budget.park(Recorder(name, log))
    assert budget.parked == 4 and log == []
    await asyncio.sleep(0)
    assert 1 <= len(log) < 4, "a spent budget leaves the rest for later turns"
    await wait_for(lambda: not budget.parked, 5, what="every parked connection handled")
    assert log == ["a", "b", "c", "d"]


@pytest.fixture
async def tight(hub_factory: Callable[..., Any]) -> HubHandle:
    # A budget no turn can stay within: every read after a turn's first is parked.
    return await hub_factory(read_budget_ms=0.000001)


@pytest.fixture
async def admin(tight: HubHandle) -> AsyncIterator[AdminClient]:
    client = await AdminClient(tight.url, await tight.admin_token("operator")).open()
    yield client
    await client.close()


async def test_parked_bytes_lose_nothing_and_keep_each_connections_order(
    tight: HubHandle, admin: AdminClient
) -> None:
    agents = await fleet(tight, 12)
    everyone = {"selector": {"agent_id": "edge-*"}}
    reply = await admin.request("dispatch", target=everyone, name="exec", args={"argv": ["true"]})
    commands = [await agent.recv_type("command") for agent in agents]

    async def answer(agent: RawAgent, command: dict[str, Any]) -> None:
        # Sent back to back: they arrive in one read or several, parked or not.
        command_id = command["command_id"]
        await agent.send({"type": "ack", "command_id": command_id})
        for seq in range(5):
            chunk = {"type": "output", "command_id": command_id, "seq": seq}
            await agent.send({**chunk, "stream": "stdout", "data": f"{seq}\n"})
        await agent.send({"type": "result", "command_id": command_id, "status": "succeeded",
                          "exit_code": 0})  # fmt: skip

    await asyncio.gather(*(answer(a, c) for a, c in zip(agents, commands, strict=True)))

    detail = await wait_for(lambda: job_done(admin, reply["job_id"]), 10, what="job finished")
    assert detail["job"]["state"] == "succeeded"
    for command in commands:
        detail = await admin.request("output", command_id=command["command_id"])
        assert [c["data"] for c in detail["chunks"]] == [f"{seq}\n" for seq in range(5)]
    assert tight.hub.read_budget.parked == 0
    for agent in agents:
        await agent.close()


async def test_bytes_parked_when_the_peer_hangs_up_are_handled_before_the_close(
    tight: HubHandle, admin: AdminClient
) -> None:
    agents = await fleet(tight, 6)
    reply = await admin.request("dispatch", target={"selector": {"agent_id": "edge-*"}},
                                name="ping")  # fmt: skip
    commands = [await agent.recv_type("command") for agent in agents]
    for n, (agent, command) in enumerate(zip(agents, commands, strict=True)):
        await agent.send({"type": "result", "command_id": command["command_id"],
                          "status": "succeeded"})  # fmt: skip
        if n % 2:
            agent.ws.transport.abort()  # gone the moment its result is on the wire
        else:
            agent.ws.transport.write_eof()  # or half-closed after it

    detail = await wait_for(lambda: job_done(admin, reply["job_id"]), 10, what="job finished")
    assert detail["job"]["state"] == "succeeded", "every result stored despite hang-ups"


async def test_a_health_probe_does_not_wait_behind_parked_bytes(tight: HubHandle) -> None:
    """A reconnect storm parks thousands of handshakes; a load balancer's probe that queued
    behind them would time out and take the hub out of rotation."""
    port = tight.hub.port
    wires = [await Wire.open(port) for _ in range(200)]
    await asyncio.gather(*(w.send(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n") for w in wires))
    await wait_for(lambda: tight.hub.read_budget.parked >= 100, what="requests parked")
    probe = await Wire.open(port)
    await probe.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    response = await probe.read_response()
    assert response.status == 200
    assert tight.hub.read_budget.parked >= 50  # answered while most of them still wait
    for wire in wires:
        assert (await wire.read_response()).status == 404
    await assert_no_parked(tight)


async def assert_no_parked(hub: HubHandle) -> None:
    await wait_for(lambda: hub.hub.read_budget.parked == 0, what="every parked read handled")
