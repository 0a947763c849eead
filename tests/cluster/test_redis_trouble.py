"""Redis stopped, and Redis restarted without its data: hubs keep their agents, say why they
are not ready, refuse what they would have to store, and recover on their own."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from hub.protocol.client import AdminClient, AdminError
from tests.hub.test_http import http_get
from tests.support import RawAgent, job_done, wait_for


async def readiness(port: int) -> tuple[int, dict[str, Any]]:
    status, _headers, body = await http_get(port, "/readyz")
    return status, orjson.loads(body)


async def one_agent_on_each(a: Any, b: Any) -> tuple[str, RawAgent, RawAgent]:
    """An enrollment key, ``edge-a`` registered on hub a and ``edge-b`` on hub b."""
    enroll = await a.token("enroll")
    on_a = await RawAgent.connect(a.agent_url, enroll)
    await on_a.register("edge-a")
    on_b = await RawAgent.connect(b.agent_url, enroll)
    await on_b.register("edge-b")
    return enroll, on_a, on_b


async def test_redis_down_then_back_hubs_keep_their_agents_and_recover(cluster: Any) -> None:
    a, b = await cluster(2)
    redis = cluster.state["redis"]
    _enroll, on_a, on_b = await one_agent_on_each(a, b)
    admin = await AdminClient(a.url, await a.admin_token("operator")).open()
    try:
        await wait_for(lambda: _online(admin, {"edge-a", "edge-b"}), timeout=10)
        redis.stop()
        for hub in (a, b):
            _status, body = await wait_for(
                lambda h=hub: _not_ready(h.hub.port), timeout=5, what="readyz 503"
            )
            assert "redis" in body["reason"]
        with pytest.raises(AdminError) as refused:
            await admin.request("dispatch", target={"agent_ids": ["edge-b"]}, name="ping")
        assert refused.value.code == "unavailable"
        # The agents stay connected and their heartbeats are taken.
        for agent in (on_a, on_b):
            await agent.send({"type": "heartbeat", "status": "ok"})
        await asyncio.sleep(0.5)
        assert "edge-a" in a.hub.registry.live and "edge-b" in b.hub.registry.live
        redis.start()
        for hub in (a, b):
            await wait_for(lambda h=hub: _ready(h.hub.port), timeout=8, what="ready again")
        data = await wait_for(
            lambda: _dispatch(admin, "edge-b"), timeout=10, what="a dispatch accepted again"
        )
        command = await on_b.recv_type("command", timeout=10)
        assert command["command_id"] == data["command_ids"][0]
        await on_b.send(
            {"type": "result", "command_id": command["command_id"], "status": "succeeded"}
        )
        job = await wait_for(lambda: job_done(admin, data["job_id"]), timeout=10)
        assert job["job"]["state"] == "succeeded"
    finally:
        await admin.close()
        await on_a.close()
        await on_b.close()


async def test_redis_restarted_without_its_data_hubs_write_back_and_raise_it(cluster: Any) -> None:
    a, b = await cluster(2)
    redis = cluster.state["redis"]
    enroll, on_a, on_b = await one_agent_on_each(a, b)
    admin = await AdminClient(b.url, await a.admin_token("operator")).open()
    try:
        await wait_for(lambda: _online(admin, {"edge-a", "edge-b"}), timeout=10)
        redis.restart(keep_data=False)
        # Every hub notices, writes back what it holds and claims its agents again.
        await wait_for(
            lambda: _claimed(redis, cluster.state["prefix"], 2), timeout=10, what="claimed again"
        )
        alerts = await wait_for(lambda: _alerts(admin, "redis_data_lost"), timeout=10)
        assert alerts[0]["severity"] == "critical"
        # The credentials the hubs held are back: a new agent enrolls with the old key.
        late = await RawAgent.connect(b.agent_url, enroll)
        await late.register("edge-late")
        await wait_for(lambda: _online(admin, {"edge-a", "edge-b", "edge-late"}), timeout=10)
        await late.close()
    finally:
        await admin.close()
        await on_a.close()
        await on_b.close()


async def _online(admin: AdminClient, ids: set[str]) -> bool:
    try:
        agents = (await admin.request("agents"))["agents"]
    except AdminError:
        return False
    return ids <= {a["agent_id"] for a in agents if a["state"] == "online"}


async def _not_ready(port: int) -> tuple[int, dict[str, Any]] | None:
    status, body = await readiness(port)
    return (status, body) if status == 503 else None


async def _ready(port: int) -> bool:
    status, _ = await readiness(port)
    return status == 200


async def _dispatch(admin: AdminClient, agent_id: str) -> dict[str, Any] | None:
    try:
        return await admin.request("dispatch", target={"agent_ids": [agent_id]}, name="ping")
    except AdminError as exc:
        if exc.code == "unavailable":
            return None
        raise


async def _owners(redis: Any, prefix: str) -> int:
    client = aioredis.Redis.from_url(redis.url)
    try:
        return int(await client.hlen(f"{prefix}:cl:owner"))
    except OSError:
        return 0
    finally:
        await client.aclose()


async def _claimed(redis: Any, prefix: str, count: int) -> bool:
    return await _owners(redis, prefix) >= count


async def _alerts(admin: AdminClient, rule: str) -> list[dict[str, Any]] | None:
    page = await admin.request("alerts", filter={"rule": rule})
    return page["alerts"] or None


async def test_a_redis_without_the_append_only_file_is_warned_about_on_readyz(
    cluster: Any, redis_factory: Any
) -> None:
    redis = redis_factory(appendonly=False)
    (a,) = await cluster(1, redis=redis)
    status, body = await readiness(a.hub.port)
    assert status == 200
    assert body["status"] == "ready"
    assert any("appendonly no" in warning for warning in body["warnings"])


async def test_redis_killed_mid_job_and_back_with_its_aof_every_command_finishes_once(
    cluster: Any, tmp_path: Any
) -> None:
    """Redis dies (-9, appendfsync always) while a job to 30 simulated agents on two hubs
    runs, and comes back with its AOF: every command ends succeeded, each once."""
    import subprocess
    import sys

    from tests.support import ROOT

    a, b = await cluster(2)
    redis = cluster.state["redis"]
    enroll = await a.token("enroll")
    simulated = subprocess.Popen(
        [sys.executable, "-m", "agent", "simulate", "--hub", a.url, "--hub", b.url,
         "--token", enroll, "--count", "30", "--prefix", "sim-"],
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    admin = await AdminClient(b.url, await a.admin_token("operator")).open()
    try:
        ids = {f"sim-{n:05d}" for n in range(1, 31)}
        await wait_for(lambda: _online(admin, ids), timeout=30, what="30 agents online")
        job = await admin.request(
            "dispatch", target={"selector": {"agent_id": "sim-*"}}, name="sysinfo",
            max_concurrency=3,
        )  # fmt: skip
        redis.kill()
        await asyncio.sleep(1.0)  # the job cannot move on without Redis: let it notice
        redis.start()
        detail = await wait_for(
            lambda: _job_if_done(admin, job["job_id"]), timeout=60, interval=0.25, what="job"
        )
        assert detail["job"]["state"] == "succeeded", detail["job"]
        assert detail["job"]["counts"] == {"succeeded": 30}
        assert sorted(c["agent_id"] for c in detail["commands"]) == sorted(ids)
        assert all(c["state"] == "succeeded" for c in detail["commands"])
    finally:
        simulated.kill()
        simulated.wait(10)
        await admin.close()


async def _job_if_done(admin: AdminClient, job_id: str) -> dict[str, Any] | None:
    try:
        return await job_done(admin, job_id)
    except (AdminError, ConnectionError):
        return None
