"""The admin channel: roles, requests, subscriptions, coalescing and backpressure (§5)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from hub.protocol.client import AdminClient, AdminError
from tests.conftest import HubHandle
from tests.support import RawAgent, fleet, online_agent, wait_for


async def admin_client(hub: HubHandle, role: str = "admin") -> AdminClient:
    return await AdminClient(hub.url, await hub.admin_token(role)).open()


async def test_viewer_cannot_dispatch_cancel_or_read_audit(hub: HubHandle) -> None:
    agent = await online_agent(hub)
    viewer = await admin_client(hub, "viewer")
    for request, fields in (
        ("dispatch", {"target": {"agent_ids": ["edge-1"]}, "name": "ping"}),
        ("cancel", {"job_id": "x"}),
        ("ack_alert", {"alert_id": "x"}),
        ("audit", {}),
    ):
        with pytest.raises(AdminError) as error:
            await viewer.request(request, **fields)
        assert error.value.code == "forbidden", request
    with pytest.raises(AdminError) as error:
        await viewer.request("subscribe", topics=["agents", "audit"])
    assert error.value.code == "forbidden"
    assert not hub.hub.ledger.commands
    await viewer.close()
    await agent.close()


async def test_forbidden_is_checked_before_validation(hub: HubHandle) -> None:
    viewer = await admin_client(hub, "viewer")
    with pytest.raises(AdminError) as error:
        await viewer.request("dispatch", target="nonsense")
    assert error.value.code == "forbidden"
    await viewer.close()


async def test_invalid_request_with_an_id_gets_a_reply(hub: HubHandle) -> None:
    admin = await admin_client(hub)
    with pytest.raises(AdminError) as error:
        await admin.request("agents", limit=0)
    assert error.value.code == "invalid_message"
    with pytest.raises(AdminError) as error:
        await admin.request("teleport")
    assert error.value.code == "invalid_message"
    with pytest.raises(AdminError) as error:
        await admin.request("commands", filter={"colour": "red"})
    assert error.value.code == "invalid_message"
    assert (await admin.request("agents"))["agents"] == []
    await admin.close()


async def test_invalid_message_without_id_gets_an_error(hub: HubHandle) -> None:
    raw = await RawAgent.connect(hub.admin_url, await hub.admin_token())
    await raw.send({"type": "agents", "limit": "many"})
    error = await raw.recv_type("error")
    assert (error["code"], error["ref"]) == ("invalid_message", "agents")
    await raw.close()


async def test_agents_and_agent_detail(hub: HubHandle) -> None:
    agent = await online_agent(hub, "edge-1", region="eu-central", labels={"site": "berlin"})
    other = await online_agent(hub, "edge-2", region="us-east")
    await agent.send({"type": "heartbeat", "metrics": {"cpu_percent": 5}})
    admin = await admin_client(hub)
    everyone = (await admin.request("agents"))["agents"]
    assert [a["agent_id"] for a in everyone] == ["edge-1", "edge-2"]
    europe = (await admin.request("agents", selector={"region": "eu-*"}))["agents"]
    assert [a["agent_id"] for a in europe] == ["edge-1"]
    berlin = (await admin.request("agents", selector={"labels": {"site": "ber*"}}))["agents"]
    assert [a["agent_id"] for a in berlin] == ["edge-1"]
    await wait_for(lambda: hub.hub.registry.records["edge-1"].metrics)
    detail = await admin.request("agent", agent_id="edge-1")
    assert detail["agent"]["state"] == "online"
    assert detail["agent"]["metrics"] == {"cpu_percent": 5.0}
    assert detail["sessions"][0]["ended_at"] is None
    with pytest.raises(AdminError) as error:
        await admin.request("agent", agent_id="ghost")
    assert error.value.code == "not_found"
    await admin.close()
    await agent.close()
    await other.close()


async def test_subscribe_snapshot_then_events(hub: HubHandle) -> None:
    first = await online_agent(hub, "edge-1")
    admin = await admin_client(hub)
    snapshot = await admin.request("subscribe", topics=["agents", "commands", "alerts", "metrics"])
    assert [a["agent_id"] for a in snapshot["agents"]] == ["edge-1"]
    assert snapshot["commands"] == []
    assert snapshot["alerts"] == []
    assert snapshot["metrics"]["agents"]["online"] == 1
    second = await online_agent(hub, "edge-2")
    events = admin.events()

    async def next_agent_event() -> dict:
        while True:
            event = await anext(events)
            if event.get("topic") == "agents":
                return event

    async with asyncio.timeout(5):
        event = await next_agent_event()
    assert (event["kind"], event["agent"]["agent_id"]) == ("connected", "edge-2")
    data = await admin.request("dispatch", target={"agent_ids": ["edge-1"]}, name="ping")
    async with asyncio.timeout(5):
        while True:
            event = await anext(events)
            if event.get("topic") == "commands":
                break
    assert event["kind"] == "state"
    assert event["command"]["command_id"] == data["command_ids"][0]
    await admin.close()
    await first.close()
    await second.close()


async def test_metrics_tick(hub: HubHandle) -> None:
    admin = await admin_client(hub)
    await admin.request("subscribe", topics=["metrics"])
    events = admin.events()
    async with asyncio.timeout(5):
        event = await anext(events)
    assert (event["topic"], event["kind"]) == ("metrics", "tick")
    stats = event["stats"]
    for key in (
        "agents", "connects_per_min", "disconnects_per_min", "auth_failures_per_min",
        "commands_in_flight", "rtt_p50_ms", "rtt_p99_ms", "hubs",
    ):  # fmt: skip
        assert key in stats
    assert stats["hubs"] == {hub.hub.hub_id: 0}
    await admin.close()


async def test_metrics_history_gives_a_new_console_the_last_hour(hub: HubHandle) -> None:
    """Kept every 5 s whether or not anyone subscribes; a viewer may read it."""
    history = hub.hub.metrics.history
    history.interval = 0.2  # the test's own pace; the default keeps one tick in five seconds
    agent = await online_agent(hub, "edge-h")
    await wait_for(lambda: len(history) >= 3, what="three ticks kept")
    viewer = await admin_client(hub, "viewer")
    data = await viewer.request("metrics_history")
    ticks = data["ticks"]
    assert len(ticks) >= 3
    ats = [tick["at"] for tick in ticks]
    assert ats == sorted(ats)
    assert ticks[-1]["stats"]["agents"]["online"] == 1
    assert ticks[-1]["stats"]["hubs"] == {hub.hub.hub_id: 1}
    later = await viewer.request("metrics_history", since=ats[-2])
    assert [tick["at"] for tick in later["ticks"]][:1] == [ats[-1]]
    for bad in (-1, "yesterday", True):
        with pytest.raises(AdminError) as refused:
            await viewer.request("metrics_history", since=bad)
        assert refused.value.code == "invalid_message"
    await viewer.close()
    await agent.close()


async def test_heartbeat_events_coalesce_per_agent(hub: HubHandle) -> None:
    agents = [await online_agent(hub, f"edge-{n}") for n in range(5)]
    admin = await admin_client(hub)
    await admin.request("subscribe", topics=["agents"])
    session = next(iter(hub.hub.admins))
    for round_ in range(30):
        for agent in agents:
            await agent.send({"type": "heartbeat", "metrics": {"round": round_}})
    await wait_for(
        lambda: hub.hub.registry.records["edge-4"].metrics == {"round": 29.0}, what="last beat"
    )
    # However many heartbeats arrived, at most one unsent event per agent waits.
    assert len(session._queue) <= len(agents)
    latest: dict[str, float] = {}
    events = admin.events()
    async with asyncio.timeout(5):
        while latest != {f"edge-{n}": 29.0 for n in range(5)}:
            event = await anext(events)
            agent = event["agent"]
            latest[agent["agent_id"]] = agent["metrics"].get("round", -1)
    await admin.close()
    for agent in agents:
        await agent.close()


async def test_a_subscriber_that_stops_reading_is_resynced_not_buffered(hub_factory) -> None:
    hub = await hub_factory(subscriber_max_events=50, subscriber_max_bytes=64 * 1024)
    agents = await fleet(hub, 120)
    # A console with a small receive window and no compression, so the hub's socket
    # buffer fills quickly once it stops reading.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", hub.hub.port))
    sock.setblocking(False)
    raw = await RawAgent.connect(
        hub.admin_url, await hub.admin_token(), sock=sock, compression=None
    )
    await raw.send({"type": "subscribe", "id": 1, "topics": ["agents"]})
    assert (await raw.recv_type("reply", timeout=10))["ok"]
    session = next(iter(hub.hub.admins))
    raw.ws.transport.pause_reading()
    last = hub.hub.registry.records["edge-119"]
    for round_ in range(400):
        for agent in agents:
            await agent.send({"type": "heartbeat", "metrics": {"round": round_}})
        await wait_for(lambda r=round_: last.metrics.get("round") == r, what="beats processed")
        if session.resync_pending:
            break
    assert session.resync_pending, "the hub never noticed the subscriber fell behind"
    # What the hub holds for this subscriber is bounded: its queue, and the socket buffer
    # that made it stop writing.
    assert len(session._queue) <= 50
    assert session._queue_bytes <= 64 * 1024
    assert session.conn.buffered() < 2 * 1024 * 1024
    raw.ws.transport.resume_reading()
    seen = []
    async with asyncio.timeout(20):
        while "snapshot" not in seen:
            seen.append((await raw.recv(timeout=20))["type"])
    assert "resync" in seen
    await hub.hub.auditor.drain()
    assert (await hub.hub.store.audit_entries({"action": "admin.resync"}, 10, None)).items
    await raw.close()
    for agent in agents:
        await agent.close()


async def test_commands_and_jobs_pagination(hub: HubHandle) -> None:
    agent = await online_agent(hub)
    admin = await admin_client(hub)
    for _ in range(5):
        await admin.request("dispatch", target={"agent_ids": ["edge-1"]}, name="ping")
    page = await admin.request("commands", limit=2)
    assert len(page["commands"]) == 2 and page["next"]
    rest = await admin.request("commands", limit=10, before=page["next"])
    assert len(rest["commands"]) == 3 and rest["next"] is None
    ids = [c["command_id"] for c in page["commands"] + rest["commands"]]
    assert len(set(ids)) == 5
    jobs = await admin.request("jobs", limit=10)
    assert len(jobs["jobs"]) == 5
    audit = await admin.request("audit", filter={"action": "job.dispatch"}, limit=2)
    assert len(audit["entries"]) == 2 and audit["next"]
    await admin.close()
    await agent.close()
