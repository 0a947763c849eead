"""Several hubs, one fleet: consoles on any hub see and command agents on every hub.

Real hubs (in this process), a real ``redis-server``, real sockets; agents and consoles
speak the wire protocol (``RawAgent``, ``AdminClient``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from hub.protocol.client import AdminClient
from tests.support import RawAgent, job_done, wait_for


async def agents_on(admin: AdminClient) -> dict[str, dict[str, Any]]:
    return {a["agent_id"]: a for a in (await admin.request("agents"))["agents"]}


async def test_a_console_on_either_hub_sees_and_commands_the_whole_fleet(cluster: Any) -> None:
    a, b = await cluster(2)
    enroll = await a.token("enroll")
    on_a = await RawAgent.connect(a.agent_url, enroll)
    await on_a.register("edge-a", region="eu-central")
    on_b = await RawAgent.connect(b.agent_url, enroll)
    welcome = await on_b.register("edge-b", region="us-east")
    assert welcome["hub_id"] == "hub-b"
    admin = await AdminClient(a.url, await a.admin_token("operator")).open()
    try:
        fleet = await wait_for(
            lambda: _both_online(admin), timeout=10, what="both agents online on hub-a"
        )
        assert fleet["edge-a"]["hub_id"] == "hub-a"
        assert fleet["edge-b"]["hub_id"] == "hub-b"
        # A command dispatched on hub-a reaches the agent on hub-b, and its result comes back.
        data = await admin.request("dispatch", target={"agent_ids": ["edge-b"]}, name="ping")
        command = await on_b.recv_type("command", timeout=10)
        assert command["command_id"] == data["command_ids"][0]
        await on_b.send({"type": "ack", "command_id": command["command_id"]})
        await on_b.send(
            {"type": "result", "command_id": command["command_id"], "status": "succeeded"}
        )
        job = await wait_for(lambda: job_done(admin, data["job_id"]), timeout=10)
        assert job["job"]["state"] == "succeeded"
        assert job["commands"][0]["state"] == "succeeded"
        # Each hub's count, as the hubs' leases (renewed every lease interval) report it.
        await wait_for(
            lambda: _hubs_reported(admin, {"hub-a": 1, "hub-b": 1}), timeout=5, what="stats.hubs"
        )
    finally:
        await admin.close()
        await on_a.close()
        await on_b.close()


async def _hubs_reported(admin: AdminClient, expected: dict[str, int]) -> bool:
    stats = (await admin.request("subscribe", topics=["metrics"]))["metrics"]
    return bool(stats["hubs"] == expected)


async def _both_online(admin: AdminClient) -> dict[str, dict[str, Any]] | None:
    fleet = await agents_on(admin)
    if all(fleet.get(a, {}).get("state") == "online" for a in ("edge-a", "edge-b")):
        return fleet
    return None


async def test_the_newest_connection_wins_across_hubs(cluster: Any) -> None:
    a, b = await cluster(2)
    key = await a.agent_token("edge-1")
    first = await RawAgent.connect(a.agent_url, key)
    await first.register("edge-1")
    await wait_for(lambda: a.hub.fleet.claims.get("edge-1", (None, 0))[1] > 0, timeout=5)
    second = await RawAgent.connect(b.agent_url, key)
    welcome = await second.register("edge-1")
    assert welcome["hub_id"] == "hub-b"
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await first.closed(timeout=5) == 4001
    assert loop.time() - started < 2.0
    # The superseded hub's late goodbye does not take the agent offline anywhere.
    admin = await AdminClient(a.url, await a.admin_token("viewer")).open()
    try:
        view = await wait_for(
            lambda: _view_on(admin, "edge-1", hub_id="hub-b"), timeout=5, what="edge-1 on hub-b"
        )
        assert view["state"] == "online"
        await asyncio.sleep(0.5)
        assert (await agents_on(admin))["edge-1"]["state"] == "online"
    finally:
        await admin.close()
        await second.close()


async def _view_on(admin: AdminClient, agent_id: str, **expected: Any) -> dict[str, Any] | None:
    view = (await agents_on(admin)).get(agent_id)
    if view is not None and all(view.get(k) == v for k, v in expected.items()):
        return view
    return None


async def test_a_revocation_on_one_hub_closes_the_connection_on_another(cluster: Any) -> None:
    a, b = await cluster(2)
    key = await a.agent_token("edge-1")
    agent = await RawAgent.connect(b.agent_url, key)
    await agent.register("edge-1")
    credential_id = key[4:16]
    await a.hub.store.revoke_credential(credential_id)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await agent.closed(timeout=8) == 4003
    assert loop.time() - started < 5.0


async def test_two_consoles_on_different_hubs_see_the_same_events(cluster: Any) -> None:
    a, b = await cluster(2)
    seen: dict[str, list[tuple[str, str]]] = {"a": [], "b": []}

    def watcher(name: str) -> Callable[[dict[str, Any]], None]:
        def on_event(event: dict[str, Any]) -> None:
            if event.get("topic") == "commands" and event.get("command"):
                seen[name].append((event["command"]["command_id"], event["command"]["state"]))

        return on_event

    console_a = AdminClient(a.url, await a.admin_token("operator"), on_event=watcher("a"))
    console_b = AdminClient(b.url, await b.admin_token("viewer"), on_event=watcher("b"))
    await console_a.open()
    await console_b.open()
    await console_a.request("subscribe", topics=["commands", "agents"])
    await console_b.request("subscribe", topics=["commands", "agents"])
    agent = await RawAgent.connect(b.agent_url, await b.agent_token("edge-1"))
    await agent.register("edge-1")
    try:
        await wait_for(lambda: _view_on(console_a, "edge-1", state="online"), timeout=10)
        data = await console_a.request("dispatch", target={"agent_ids": ["edge-1"]}, name="ping")
        command = await agent.recv_type("command", timeout=10)
        await agent.send(
            {"type": "result", "command_id": command["command_id"], "status": "succeeded"}
        )
        command_id = data["command_ids"][0]
        for name in ("a", "b"):
            await wait_for(
                lambda n=name: (command_id, "succeeded") in seen[n],
                timeout=10,
                what=f"console {name} saw the result",
            )
    finally:
        await agent.close()
        await console_a.close()
        await console_b.close()


async def test_a_draining_agent_on_another_hub_gets_nothing_new_until_ok(cluster: Any) -> None:
    a, b = await cluster(2)
    agent = await RawAgent.connect(b.agent_url, await b.agent_token("edge-1"))
    await agent.register("edge-1")
    admin = await AdminClient(a.url, await a.admin_token("operator")).open()
    try:
        await wait_for(lambda: _view_on(admin, "edge-1", state="online"), timeout=10)
        await agent.send({"type": "heartbeat", "status": "draining"})
        leader = a.hub.leadership
        assert leader is not None and leader.ledger is not None
        await wait_for(lambda: "edge-1" in leader.ledger.draining, timeout=10, what="draining")
        data = await admin.request("dispatch", target={"agent_ids": ["edge-1"]}, name="ping")
        with pytest.raises(TimeoutError):
            await agent.recv_type("command", timeout=1.0)
        await agent.send({"type": "heartbeat", "status": "ok"})
        command = await agent.recv_type("command", timeout=10)
        assert command["command_id"] == data["command_ids"][0]
    finally:
        await admin.close()
        await agent.close()


async def test_the_cluster_keeps_the_audit_for_the_operators_retention(cluster: Any) -> None:
    """``audit_retention`` means the same on one hub and on a cluster (the Redis store had
    its own 30 days)."""
    (kept,) = await cluster(1, audit_retention=400 * 86400.0)
    assert kept.hub.store.audit_retention == 400 * 86400.0
    (forever,) = await cluster(1, audit_retention=0)
    assert forever.hub.store.audit_retention is None
