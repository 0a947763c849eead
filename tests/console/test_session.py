"""The admin session: reconnects with jittered backoff, resubscribes, replaces the model;
handles the hub's resync + snapshot; stops on a refused token.
"""

from __future__ import annotations

import random

from console.app import ConnectionParams
from console.client import Backoff, ConnState, HubSession
from hub.app import Hub
from hub.config import HubConfig
from tests.conftest import HubHandle

from .helpers import online_agent, wait_for


def test_backoff_is_exponential_with_full_jitter():
    backoff = Backoff(base=1.0, cap=30.0, rng=random.Random(1))
    ceilings = []
    for _ in range(8):
        ceiling = backoff.ceiling()
        delay = backoff.next_delay()
        assert 0.0 <= delay <= ceiling
        ceilings.append(ceiling)
    assert ceilings == [1, 2, 4, 8, 16, 30, 30, 30]
    delays = [Backoff(rng=random.Random(seed)).next_delay() for seed in range(200)]
    assert min(delays) < 0.1 and max(delays) > 0.9  # full jitter: anywhere in [0, ceiling]
    backoff.reset()
    assert backoff.ceiling() == 1


async def test_console_survives_a_hub_restart(hub_factory, window_factory, tmp_path):
    data_dir = tmp_path / "restarted-hub"
    first = await hub_factory(data_dir=data_dir)
    port = first.hub.port
    agent = await online_agent(first, "edge-1", region="eu-central")
    window = await window_factory(first, "viewer")
    session = window.session
    assert session.connections == 1
    assert window.fleet.counts["online"] == 1

    await first.hub.stop()  # SIGTERM-like drain: agents told to reconnect, admins closed
    await wait_for(lambda: session.state == ConnState.RECONNECTING, what="reconnecting")
    assert "reconnecting" in window.indicator.text()

    second = Hub(HubConfig(listen=f"127.0.0.1:{port}", data_dir=data_dir, hub_id="hub-test-b",
                           reconnect_spread_ms=200, shutdown_timeout=2.0))  # fmt: skip
    await second.start()
    try:
        snapshots = window.fleet.snapshot_count
        await wait_for(lambda: session.connections == 2, 20, what="reconnected and resubscribed")
        assert window.fleet.snapshot_count > snapshots  # the model was replaced from a snapshot
        assert session.state == ConnState.CONNECTED
        assert "connected" in window.indicator.text()
        # The agent is known from the store; it comes back when it reconnects.
        assert "edge-1" in window.fleet.agents
        again = await online_agent(HubHandle(second), "edge-1", region="eu-central")
        await wait_for(lambda: window.fleet.agents["edge-1"].view.state == "online", what="back")
        await wait_for(
            lambda: window.fleet.agents["edge-1"].view.hub_id == "hub-test-b", what="hub"
        )
        # Events keep flowing on the new subscription.
        await again.send({"type": "heartbeat", "metrics": {"cpu_percent": 42.0}})
        await wait_for(
            lambda: window.fleet.agents["edge-1"].view.metrics.get("cpu_percent") == 42.0,
            what="heartbeat after the restart",
        )
        await again.close()
    finally:
        await window.shutdown()
        await second.stop()
    await agent.close()


async def test_resync_and_snapshot_replace_the_model(hub_factory, window_factory):
    # A tiny subscriber bound: a burst of events makes the hub send resync + snapshot.
    hub = await hub_factory(subscriber_max_events=10)
    agents = [await online_agent(hub, f"edge-{i:02d}") for i in range(30)]
    window = await window_factory(hub, "viewer")
    before = window.fleet.snapshot_count
    for round_ in range(3):
        for agent in agents:
            await agent.send({"type": "heartbeat", "metrics": {"cpu_percent": float(round_)}})
    await wait_for(lambda: window.fleet.snapshot_count > before, what="a resync snapshot")
    await wait_for(
        lambda: all(a.view.metrics.get("cpu_percent") == 2.0 for a in window.fleet.agents.values()),
        what="the latest state after resync",
    )
    assert window.fleet.total == 30 and len(window.agent_model.rows) == 30
    # F5: resubscribe on demand, the model is replaced again.
    count = window.fleet.snapshot_count
    window.resync()
    await wait_for(lambda: window.fleet.snapshot_count > count, what="F5 resync")
    for agent in agents:
        await agent.close()


async def test_a_refused_token_stops_retrying(hub: HubHandle, tmp_path):
    session = HubSession(hub.url, "not-a-token")
    session.start()
    await wait_for(lambda: session.state == ConnState.FAILED, what="failed")
    assert "401" in session.last_error
    assert session.client is None
    await session.stop()


async def test_unreachable_hub_backs_off(window_factory, hub: HubHandle, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    window = await window_factory(hub, "viewer")
    window.connect_to(ConnectionParams(f"ws://127.0.0.1:{port}", "whatever"))
    session = window.session
    await wait_for(lambda: session.backoff.attempt >= 2, 15, what="retries")
    assert session.state == ConnState.RECONNECTING
    assert "refused" in session.last_error
