"""``tether-hub serve --workers N``: N hub processes on one port, one fleet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.cluster.test_failover import cluster_token, fleet_view
from tests.support import HubProcess, RawAgent, run_cli, wait_for
from tests.test_faults import connect_admin


async def test_two_workers_serve_agents_on_one_port_and_drain_on_sigterm(
    redis_factory: Any, tmp_path: Path
) -> None:
    redis = redis_factory(appendfsync="everysec")
    operator = cluster_token(redis, "--admin", "--role", "operator")
    enroll = cluster_token(redis, "--enroll")
    hub = HubProcess(tmp_path / "w", "--redis", redis.url, "--hub-id", "w", "--workers", "2")
    hub.start()
    agents = []
    try:
        admin = await connect_admin(hub.url, operator)
        # Both workers up (their leases say so) before the agents dial.
        await wait_for(lambda: _hubs(admin, {"w-1", "w-2"}), timeout=20, what="two workers")
        for n in range(24):
            agent = await RawAgent.connect(f"{hub.url}/ws", enroll)
            await agent.register(f"edge-{n:02d}")
            agents.append(agent)
        fleet = await wait_for(lambda: _all_online(admin, 24), timeout=15, what="24 online")
        hubs = {view["hub_id"] for view in fleet.values()}
        assert hubs == {"w-1", "w-2"}, hubs  # the kernel spread the connections
        await admin.close()
        for agent in agents:
            await agent.close()
        assert hub.terminate(timeout=30) == 0
    finally:
        hub.stop()


async def two_workers(redis_factory: Any, tmp_path: Path) -> tuple[HubProcess, str, Any]:
    """``serve --workers 2`` on a Redis of its own, both workers up (their leases say so)."""
    redis = redis_factory(appendfsync="everysec")
    operator = cluster_token(redis, "--admin", "--role", "operator")
    hub = HubProcess(tmp_path / "w", "--redis", redis.url, "--hub-id", "w", "--workers", "2")
    hub.start()
    admin = await connect_admin(hub.url, operator)
    await wait_for(lambda: _hubs(admin, {"w-1", "w-2"}), timeout=20, what="two workers")
    return hub, operator, admin


async def _hubs(admin: Any, expected: set[str]) -> bool:
    stats = (await admin.request("subscribe", topics=["metrics"]))["metrics"]
    return set(stats["hubs"]) == expected


async def _all_online(admin: Any, count: int) -> dict[str, Any] | None:
    fleet = await fleet_view(admin)
    online = {k: v for k, v in fleet.items() if v["state"] == "online"}
    return online if len(online) == count else None


def test_workers_without_redis_is_a_usage_error_that_says_why(tmp_path: Path) -> None:
    done = run_cli(
        "serve", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path), "--workers", "2"
    )
    assert done.returncode == 2
    assert "--workers needs --redis" in done.stderr


async def test_a_worker_that_dies_is_started_again(redis_factory: Any, tmp_path: Path) -> None:
    import signal

    import psutil

    hub, operator, admin = await two_workers(redis_factory, tmp_path)
    try:
        assert hub.process is not None
        workers = psutil.Process(hub.process.pid).children()
        assert len(workers) == 2
        victim = workers[0]
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)

        def replaced() -> bool:
            children = psutil.Process(hub.process.pid).children()  # type: ignore[union-attr]
            return len(children) == 2 and victim.pid not in {c.pid for c in children}

        await wait_for(replaced, timeout=30, what="a new worker")
        await admin.close()
        admin = await connect_admin(hub.url, operator)
        await wait_for(lambda: _hubs(admin, {"w-1", "w-2"}), timeout=40, what="both back")
        await admin.close()
        assert hub.terminate(timeout=30) == 0
    finally:
        hub.stop()


async def test_workers_go_when_their_supervisor_is_killed(
    redis_factory: Any, tmp_path: Path
) -> None:
    import psutil

    hub, _operator, admin = await two_workers(redis_factory, tmp_path)
    try:
        await admin.close()
        assert hub.process is not None
        workers = psutil.Process(hub.process.pid).children()
        hub.kill()  # -9: no chance to pass anything on
        await wait_for(
            lambda: not any(w.is_running() and w.status() != "zombie" for w in workers),
            timeout=15,
            what="workers gone with their supervisor",
        )
    finally:
        hub.stop()
