"""Jobs at fleet scale: selectors, rate control, max_errors, expiry, output caps (§5)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from hub.protocol.client import AdminClient
from tests.conftest import HubHandle
from tests.support import RawAgent, fleet, job_done, wait_for


@pytest.fixture
async def admin(hub: HubHandle) -> AsyncIterator[AdminClient]:
    client = await AdminClient(hub.url, await hub.admin_token("operator")).open()
    yield client
    await client.close()


async def job(admin: AdminClient, job_id: str) -> dict:
    return await admin.request("job", job_id=job_id)


async def drain(agents: list[RawAgent], timeout: float = 0.3) -> list[tuple[int, dict]]:
    """Every message that reaches the agents until none arrives for ``timeout``."""
    got: list[tuple[int, dict]] = []

    async def read(index: int, agent: RawAgent) -> None:
        while True:
            try:
                got.append((index, await agent.recv(timeout=timeout)))
            except TimeoutError:
                return

    await asyncio.gather(*(read(i, a) for i, a in enumerate(agents)))
    return got


async def pending_commands(agents: list[RawAgent], timeout: float = 0.3) -> list[tuple[int, str]]:
    """Commands that reached agents: (agent index, command id)."""
    return [
        (index, message["command_id"])
        for index, message in await drain(agents, timeout)
        if message["type"] == "command"
    ]


async def test_selector_dispatch_with_globs_labels_and_status(
    hub: HubHandle, admin: AdminClient
) -> None:
    enroll = await hub.token("enroll")
    specs = [
        ("berlin-1", "eu-central", {"site": "berlin"}),
        ("berlin-2", "eu-central", {"site": "berlin"}),
        ("paris-1", "eu-west", {"site": "paris"}),
        ("ohio-1", "us-east", {"site": "ohio"}),
    ]
    agents = {}
    for agent_id, region, labels in specs:
        agent = await RawAgent.connect(hub.agent_url, enroll)
        await agent.register(agent_id, region=region, labels=labels)
        agents[agent_id] = agent
    await agents["berlin-2"].close()
    await wait_for(lambda: "berlin-2" not in hub.hub.registry.live)
    data = await admin.request(
        "dispatch", target={"selector": {"region": "eu-*", "labels": {"site": "ber*"}}}, name="ping"
    )
    assert len(data["command_ids"]) == 2  # offline targets are included and queued
    online_only = await admin.request(
        "dispatch", target={"selector": {"region": "eu-*", "status": "online"}}, name="ping"
    )
    detail = await job(admin, online_only["job_id"])
    assert sorted(c["agent_id"] for c in detail["commands"]) == ["berlin-1", "paris-1"]
    # An agent that matches later does not join an existing job.
    late = await RawAgent.connect(hub.agent_url, enroll)
    await late.register("berlin-3", region="eu-central", labels={"site": "berlin"})
    detail = await job(admin, data["job_id"])
    assert sorted(c["agent_id"] for c in detail["commands"]) == ["berlin-1", "berlin-2"]
    for agent in [*agents.values(), late]:
        await agent.close()


async def test_max_concurrency_bounds_commands_in_flight(
    hub: HubHandle, admin: AdminClient
) -> None:
    agents = await fleet(hub, 12)
    data = await admin.request(
        "dispatch", target={"selector": {"agent_id": "edge-*"}}, name="ping", max_concurrency=3
    )
    assert len(data["command_ids"]) == 12
    outstanding: dict[str, int] = {}
    answered = 0
    peak = 0
    while answered < 12:
        for index, command_id in await pending_commands(agents):
            outstanding[command_id] = index
        peak = max(peak, len(outstanding))
        assert len(outstanding) <= 3, f"{len(outstanding)} commands in flight"
        run = hub.hub.ledger.jobs.get(data["job_id"])
        assert run is None or run.in_flight <= 3
        command_id, index = next(iter(outstanding.items()))
        del outstanding[command_id]
        await agents[index].send(
            {"type": "result", "command_id": command_id, "status": "succeeded"}
        )
        answered += 1
    assert peak == 3
    detail = await wait_for(lambda: job_done(admin, data["job_id"]))
    assert detail["job"]["state"] == "succeeded"
    assert detail["job"]["counts"] == {"succeeded": 12}
    for agent in agents:
        await agent.close()


async def test_percentages_resolve_against_the_target_count(
    hub: HubHandle, admin: AdminClient
) -> None:
    agents = await fleet(hub, 10)
    data = await admin.request(
        "dispatch", target={"selector": {"agent_id": "edge-*"}}, name="ping", max_concurrency="20%"
    )
    got = await pending_commands(agents)
    assert len(got) == 2
    assert hub.hub.ledger.jobs[data["job_id"]].window == 2
    for agent in agents:
        await agent.close()


async def test_max_errors_cancels_the_rest(hub: HubHandle, admin: AdminClient) -> None:
    agents = await fleet(hub, 10)
    data = await admin.request(
        "dispatch",
        target={"selector": {"agent_id": "edge-*"}},
        name="ping",
        max_concurrency=2,
        max_errors=1,
    )
    failed = 0
    while failed < 2:
        for index, command_id in await pending_commands(agents):
            await agents[index].send(
                {"type": "result", "command_id": command_id, "status": "failed", "exit_code": 1}
            )
            failed += 1
    # The command still running when the limit passed is asked to stop; it complies.
    for index, message in await drain(agents):
        if message["type"] == "cancel":
            await agents[index].send(
                {"type": "result", "command_id": message["command_id"], "status": "cancelled"}
            )
    detail = await wait_for(lambda: job_done(admin, data["job_id"]))
    assert detail["job"]["counts"] == {"failed": 2, "cancelled": 8}
    assert detail["job"]["state"] == "failed"
    # Nothing else was ever sent to the agents.
    assert await pending_commands(agents, timeout=0.2) == []
    for agent in agents:
        await agent.close()


async def test_offline_targets_expire_and_are_told_apart(
    hub: HubHandle, admin: AdminClient
) -> None:
    agents = await fleet(hub, 2)
    await agents[1].close()
    await wait_for(lambda: "edge-01" not in hub.hub.registry.live)
    data = await admin.request(
        "dispatch", target={"agent_ids": ["edge-00", "edge-01"]}, name="ping", ttl=0.5
    )
    ((_index, command_id),) = await pending_commands(agents[:1])
    await agents[0].send({"type": "result", "command_id": command_id, "status": "succeeded"})
    detail = await wait_for(lambda: job_done(admin, data["job_id"]), timeout=5)
    states = {c["agent_id"]: c["state"] for c in detail["commands"]}
    assert states == {"edge-00": "succeeded", "edge-01": "expired"}
    assert detail["job"]["state"] == "partial"
    expired = next(c for c in detail["commands"] if c["state"] == "expired")
    assert expired["result"]["status"] == "expired"
    await agents[0].close()


async def test_output_is_capped_and_flagged_never_cut_silently(hub_factory) -> None:
    hub = await hub_factory(output_cap=10)
    admin = await AdminClient(hub.url, await hub.admin_token("operator")).open()
    (agent,) = await fleet(hub, 1)
    data = await admin.request("dispatch", target={"agent_ids": ["edge-00"]}, name="ping")
    command_id = (await agent.recv_type("command"))["command_id"]
    for seq in range(3):
        await agent.send(
            {
                "type": "output",
                "command_id": command_id,
                "seq": seq,
                "stream": "stdout",
                "data": "abcdef",
            }
        )
    await agent.send({"type": "result", "command_id": command_id, "status": "succeeded"})
    detail = await wait_for(lambda: job_done(admin, data["job_id"]))
    command = detail["commands"][0]
    assert command["output_bytes"] == 10
    assert command["truncated"] is True
    output = await admin.request("output", command_id=command_id)
    assert "".join(chunk["data"] for chunk in output["chunks"]) == "abcdefabcd"
    await agent.close()
    await admin.close()


async def test_cancel_reports_requested_then_too_late(hub: HubHandle, admin: AdminClient) -> None:
    agents = await fleet(hub, 1)
    data = await admin.request("dispatch", target={"agent_ids": ["edge-00"]}, name="ping")
    command_id = (await agents[0].recv_type("command"))["command_id"]
    reply = await admin.request("cancel", job_id=data["job_id"])
    assert reply["requested"] == [command_id]
    assert (await agents[0].recv_type("cancel"))["command_id"] == command_id
    # The agent had already finished: its result stands and is reported truthfully.
    await agents[0].send({"type": "result", "command_id": command_id, "status": "succeeded"})
    detail = await wait_for(lambda: job_done(admin, data["job_id"]))
    assert detail["commands"][0]["state"] == "succeeded"
    await agents[0].close()


async def test_progress_events_as_targets_finish(hub: HubHandle, admin: AdminClient) -> None:
    agents = await fleet(hub, 3)
    await admin.request("subscribe", topics=["commands"])
    data = await admin.request("dispatch", target={"selector": {"agent_id": "edge-*"}}, name="ping")
    for index, command_id in await pending_commands(agents):
        await agents[index].send(
            {"type": "result", "command_id": command_id, "status": "succeeded"}
        )
    finals: set[str] = set()
    events = admin.events()
    async with asyncio.timeout(5):
        while len(finals) < 3:
            event = await anext(events)
            command = event.get("command") or {}
            if command.get("job_id") == data["job_id"] and command["state"] == "succeeded":
                finals.add(command["command_id"])
    for agent in agents:
        await agent.close()


async def test_max_errors_zero_with_a_window_of_one_finishes_the_job_once(
    hub: HubHandle, admin: AdminClient
) -> None:
    """The first failure cancels the two queued commands; each cancellation finishes a
    command, the last of them the job, inside the failure's own bookkeeping. The job is
    finished once, and the failing agent's connection stays up."""
    agents = await fleet(hub, 3)
    await admin.request("subscribe", topics=["commands"])
    data = await admin.request(
        "dispatch",
        target={"selector": {"agent_id": "edge-*"}},
        name="ping",
        max_concurrency=1,
        max_errors=0,
    )
    ((index, command_id),) = await pending_commands(agents)
    await agents[index].send(
        {"type": "result", "command_id": command_id, "status": "failed", "exit_code": 1}
    )
    detail = await wait_for(lambda: job_done(admin, data["job_id"]))
    assert detail["job"]["counts"] == {"failed": 1, "cancelled": 2}
    assert detail["job"]["state"] == "failed"
    # The connection that sent the failure is still served.
    await agents[index].send({"type": "heartbeat", "status": "ok"})
    await agents[index].send({"type": "ack", "command_id": "nope"})
    assert (await agents[index].recv_type("error"))["code"] == "unknown_command"
    assert await pending_commands(agents, timeout=0.2) == []
    auditor = await AdminClient(hub.url, await hub.admin_token("admin")).open()
    await hub.hub.auditor.drain()
    page = await auditor.request(
        "audit", filter={"action": "job.finished", "subject": data["job_id"]}
    )
    assert len(page["entries"]) == 1
    await auditor.close()
    for agent in agents:
        await agent.close()
