"""A hub killed with -9 mid-job: its agents come back on the other hub, the other hub takes
the lead, and every command is finished exactly once. Real hub and agent processes, a real
``redis-server`` with ``appendfsync always``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from hub.protocol.client import AdminClient
from tests.redis_server import RedisServer
from tests.support import ROOT, HubProcess, run_cli, wait_for
from tests.test_faults import AgentProcess, connect_admin, job_finished, marker_command

LEASES = "cluster_lease_ttl = 2.0\ncluster_lease_interval = 0.25\nheartbeat_interval = 5\n"


def hub_process(tmp_path: Path, redis: RedisServer, hub_id: str) -> HubProcess:
    config = tmp_path / f"{hub_id}.toml"
    config.write_text(LEASES)
    return HubProcess(
        tmp_path / hub_id, "--redis", redis.url, "--hub-id", hub_id, "--config", str(config)
    )


def cluster_token(redis: RedisServer, *args: str) -> str:
    """``tether-hub token create --redis URL …``: credentials straight into the cluster."""
    done = run_cli("token", "create", "--redis", redis.url, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def ten_agents_on_hub_a(
    redis_factory: Any, tmp_path: Path, prefix: str
) -> tuple[str, HubProcess, HubProcess, subprocess.Popen[bytes], set[str]]:
    """Hub-b (it leads: it starts first) and hub-a on one Redis, ten simulated agents
    dialing hub-a: (an operator token, hub-a, hub-b, the simulator, the agents' ids)."""
    redis = redis_factory(appendfsync="always")
    operator = cluster_token(redis, "--admin", "--role", "operator")
    enroll = cluster_token(redis, "--enroll")
    b = hub_process(tmp_path, redis, "hub-b").start()
    a = hub_process(tmp_path, redis, "hub-a").start()
    simulated = subprocess.Popen(
        [sys.executable, "-m", "agent", "simulate", "--hub", a.url, "--token", enroll,
         "--count", "10", "--prefix", prefix],
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return operator, a, b, simulated, {f"{prefix}{n:05d}" for n in range(1, 11)}


async def fleet_view(admin: AdminClient) -> dict[str, dict[str, Any]]:
    return {a["agent_id"]: a for a in (await admin.request("agents"))["agents"]}


async def test_kill_9_of_a_hub_mid_job_every_command_finishes_once_on_the_other(
    redis_factory: Any, tmp_path: Path
) -> None:
    redis = redis_factory(appendfsync="always")
    operator = cluster_token(redis, "--admin", "--role", "operator")
    enroll = cluster_token(redis, "--enroll")
    markers = tmp_path / "markers.txt"
    a = hub_process(tmp_path, redis, "hub-a").start()
    b = hub_process(tmp_path, redis, "hub-b").start()
    real = [
        AgentProcess(a.url, enroll, f"real-{n}", tmp_path / f"real-{n}", "--hub", b.url)
        for n in range(3)
    ]
    simulated = subprocess.Popen(
        [sys.executable, "-m", "agent", "simulate", "--hub", a.url, "--hub", b.url,
         "--token", enroll, "--count", "20", "--prefix", "sim-"],
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for agent in real:
            agent.start()
        admin = await connect_admin(b.url, operator)
        expected = {f"real-{n}" for n in range(3)} | {f"sim-{n:05d}" for n in range(1, 21)}
        await wait_for(
            lambda: _all_online_on(admin, expected, "hub-a"), timeout=30, what="agents on hub-a"
        )
        exec_job = await admin.request(
            "dispatch",
            target={"selector": {"agent_id": "real-*"}},
            name="exec",
            args=marker_command(markers, "ran", 2.0),
        )
        sim_job = await admin.request(
            "dispatch",
            target={"selector": {"agent_id": "sim-*"}},
            name="sysinfo",
            max_concurrency=5,
        )
        await wait_for(lambda: markers.exists() and markers.read_text().strip(), timeout=20)
        a.kill()  # the leader, and the hub that holds every agent
        for job_id in (exec_job["job_id"], sim_job["job_id"]):
            detail = await wait_for(
                lambda j=job_id: job_finished(admin, j), timeout=30, interval=0.2, what=job_id
            )
            assert detail["job"]["state"] == "succeeded", detail["job"]
            assert all(c["state"] == "succeeded" for c in detail["commands"]), detail["commands"]
        # Each real agent ran its command once, whatever the hubs redelivered.
        assert sorted(markers.read_text().split()) == ["ran", "ran", "ran"]
        # Every agent is back, on the hub left (those done before the kill come back in
        # their own time: the jobs did not need them).
        await wait_for(lambda: _all_online_on(admin, expected, "hub-b"), timeout=30)
        await admin.close()
    finally:
        simulated.kill()
        simulated.wait(10)
        for agent in real:
            agent.stop()
        a.stop()
        b.stop()
        subprocess.run(["pkill", "-f", str(markers)], check=False)


async def _all_online_on(admin: AdminClient, ids: set[str], hub_id: str) -> bool:
    fleet = await fleet_view(admin)
    return all(
        fleet.get(agent_id, {}).get("state") == "online"
        and fleet.get(agent_id, {}).get("hub_id") == hub_id
        for agent_id in ids
    )


async def test_a_dead_hub_is_hub_down_once_and_its_agents_unknown_until_back(
    redis_factory: Any, tmp_path: Path
) -> None:
    operator, a, b, simulated, ids = ten_agents_on_hub_a(redis_factory, tmp_path, "only-a-")
    try:
        admin = await connect_admin(b.url, operator)
        await wait_for(lambda: _all_online_on(admin, ids, "hub-a"), timeout=30)
        a.kill()
        await wait_for(lambda: _all_in_state(admin, ids, "unknown"), timeout=10, what="unknown")
        alerts = await wait_for(lambda: _open_alerts(admin, "hub_down"), timeout=10)
        assert [(x["subject"], x["severity"]) for x in alerts] == [("hub-a", "critical")]
        stats = (await admin.request("subscribe", topics=["metrics"]))["metrics"]
        assert stats["cluster"]["hubs"]["hub-a"]["state"] == "down"
        assert stats["cluster"]["hubs"]["hub-b"] == {
            **stats["cluster"]["hubs"]["hub-b"],
            "state": "up",
            "leader": True,
        }
        a = HubProcess(a.data_dir, *a.extra, port=a.port).start()  # back, a new incarnation
        await wait_for(lambda: _all_online_on(admin, ids, "hub-a"), timeout=30, what="back")
        await wait_for(lambda: _no_open_alerts(admin, "hub_down"), timeout=10, what="resolved")
        page = await admin.request("alerts", filter={"rule": "hub_down"})
        assert len(page["alerts"]) == 1  # raised once, by one hub
        await admin.close()
    finally:
        simulated.kill()
        simulated.wait(10)
        a.stop()
        b.stop()


async def _all_in_state(admin: AdminClient, ids: set[str], state: str) -> bool:
    fleet = await fleet_view(admin)
    return all(fleet.get(agent_id, {}).get("state") == state for agent_id in ids)


async def _open_alerts(admin: AdminClient, rule: str) -> list[dict[str, Any]] | None:
    alerts = (await admin.request("alerts", filter={"rule": rule}))["alerts"]
    opened = [a for a in alerts if a["state"] != "resolved"]
    return opened or None


async def _no_open_alerts(admin: AdminClient, rule: str) -> bool:
    return await _open_alerts(admin, rule) is None
