"""The console on a cluster: real hub processes on a real ``redis-server``, simulated agents
from ``tether-agent simulate``, the real window offscreen. A hub is killed with -9.

Leases are short (2 s) so a dead hub is seen within seconds; nothing else is shortened.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hub.protocol.client import AdminClient
from tests.redis_server import RedisServer
from tests.support import ROOT, HubProcess, run_cli, wait_for

LEASES = "cluster_lease_ttl = 2.0\ncluster_lease_interval = 0.25\nheartbeat_interval = 5\n"
PER_HUB = 6


class Cluster:
    """Hub processes on one Redis, simulated agents pinned to each, tokens for both."""

    def __init__(self, redis: RedisServer, tmp_path: Path) -> None:
        self.redis = redis
        self.tmp_path = tmp_path
        self.hubs: dict[str, HubProcess] = {}
        self.fleets: list[subprocess.Popen[bytes]] = []
        self.viewer = self.token("--admin", "--role", "viewer")
        self.enroll = self.token("--enroll")

    def token(self, *args: str) -> str:
        done = run_cli("token", "create", "--redis", self.redis.url, *args)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def hub(self, hub_id: str) -> HubProcess:
        config = self.tmp_path / f"{hub_id}.toml"
        config.write_text(LEASES)
        hub = HubProcess(
            self.tmp_path / hub_id,
            "--redis", self.redis.url, "--hub-id", hub_id, "--config", str(config),
        )  # fmt: skip
        self.hubs[hub_id] = hub.start()
        return hub

    def agents(self, hub: HubProcess, prefix: str, count: int = PER_HUB) -> set[str]:
        """``count`` simulated agents that know only this hub (they stay with it)."""
        fleet = subprocess.Popen(
            [sys.executable, "-m", "agent", "simulate", "--hub", hub.url,
             "--token", self.enroll, "--count", str(count), "--prefix", prefix],
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.fleets.append(fleet)
        return {f"{prefix}{n:05d}" for n in range(1, count + 1)}

    def close(self) -> None:
        for fleet in self.fleets:
            fleet.kill()
            fleet.wait(10)
        for hub in self.hubs.values():
            hub.stop()


@pytest.fixture
def two_hubs(redis_factory: Any, tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(redis_factory(appendfsync="always"), tmp_path)
    try:
        cluster.hub("hub-a")
        cluster.hub("hub-b")
        yield cluster
    finally:
        cluster.close()


async def open_console(tmp_path: Path, urls: list[str], token: str) -> Any:
    from console.app import ConnectionParams
    from console.settings import ConsoleSettings, TokenStore
    from console.window import MainWindow

    settings = ConsoleSettings(str(tmp_path / "console.ini"))
    window = MainWindow(settings, TokenStore(settings))
    window.resize(1600, 1000)
    window.show()
    window.connect_to(ConnectionParams(urls[0], token, fallback_hubs=tuple(urls[1:])))
    await wait_for(lambda: window.fleet.snapshot_count > 0, 20, what="the first snapshot")
    return window


def states(window: Any, ids: set[str], hub_id: str) -> set[str]:
    """The conditions the console shows for these agents, when all are on ``hub_id``."""
    agents = [window.fleet.agents.get(agent_id) for agent_id in ids]
    if any(a is None or a.view.hub_id != hub_id for a in agents):
        return set()
    return {a.condition for a in agents if a is not None}


def seen(window: Any, ids: set[str]) -> dict[str, tuple[str, str | None] | None]:
    """What the console shows of these agents: (condition, hub), for failure messages."""
    return {
        agent_id: (a.condition, a.view.hub_id) if a is not None else None
        for agent_id in sorted(ids)
        for a in [window.fleet.agents.get(agent_id)]
    }


def hub_column(window: Any) -> dict[str, str]:
    """What the agent table's Hub column shows, per agent id."""
    from console.views.agents import COL_HUB, COLUMNS

    model = window.agent_model
    window.fleet.flush()
    model.rebuild()
    assert COLUMNS[COL_HUB][0] == "Hub"
    return {model.agent_at(row): model.index(row, COL_HUB).data() for row in range(len(model.rows))}


def hub_node(window: Any, hub_id: str) -> Any:
    window.fleet.flush()
    window.topology.refresh()
    return next((h for h in window.topology.graph.hubs if h.hub_id == hub_id), None)


async def test_the_topology_draws_both_hubs_and_a_killed_one_turns_red(
    two_hubs: Cluster, tmp_path: Path, qtbot: Any
) -> None:
    a, b = two_hubs.hubs["hub-a"], two_hubs.hubs["hub-b"]
    on_a = two_hubs.agents(a, "on-a-")
    on_b = two_hubs.agents(b, "on-b-", PER_HUB + 2)
    window = await open_console(tmp_path, [b.url], two_hubs.viewer)
    window.show_view("topology")
    try:
        await wait_for(lambda: states(window, on_a, "hub-a") == {"online"}, 30, what="on-a")
        await wait_for(lambda: states(window, on_b, "hub-b") == {"online"}, 30, what="on-b")
        graph = window.topology.graph
        # Both hubs are nodes on Redis, with their lease up and the agents each holds.
        await wait_for(
            lambda: (
                getattr(hub_node(window, "hub-a"), "agents", 0) == PER_HUB
                and getattr(hub_node(window, "hub-b"), "agents", 0) == PER_HUB + 2
            ),
            15,
            what="both hubs' agent counts in the graph",
        )
        assert graph.isVisibleTo(window.topology)
        assert window.fleet.redis_state == "up"
        assert [(h.hub_id, h.state) for h in graph.hubs] == [("hub-a", "up"), ("hub-b", "up")]
        assert graph.counts["hub-a"]["online"] == PER_HUB
        assert graph.counts["hub-b"]["online"] == PER_HUB + 2
        assert set(graph.hub_rects) == {"hub-a", "hub-b"}
        # The agent table's hub column, and the agent's detail, name each agent's hub.
        assert hub_column(window) == {
            **dict.fromkeys(on_a, "hub-a"),
            **dict.fromkeys(on_b, "hub-b"),
        }
        detail = window.open_detail(sorted(on_a)[0])
        assert detail.fields["hub_id"].text().startswith("hub-a — up")
        # The tree beside it: one row per hub with its agents.
        assert window.topology.hub_items["hub-a"].text(1) == str(PER_HUB)
        assert window.topology.hub_items["hub-b"].text(1) == str(PER_HUB + 2)

        a.kill()
        # Hub A's node turns red, its agents unknown; hub B and its agents are untouched.
        await wait_for(
            lambda: getattr(hub_node(window, "hub-a"), "state", "") == "down", 40, what="down"
        )
        await wait_for(lambda: states(window, on_a, "hub-a") == {"unknown"}, 40, what="unknown")
        hub_node(window, "hub-a")
        assert graph.counts["hub-a"] == {**dict.fromkeys(graph.counts["hub-a"], 0),
                                         "unknown": PER_HUB}  # fmt: skip
        assert getattr(hub_node(window, "hub-b"), "state", "") == "up"
        assert states(window, on_b, "hub-b") == {"online"}
        assert "DOWN" in window.topology.hub_items["hub-a"].text(0)
        await wait_for(lambda: "DOWN" in detail.fields["hub_id"].text(), 5, what="detail")
        assert hub_column(window)[sorted(on_a)[0]] == "hub-a"
        # A click on the red node lists its agents below.
        qtbot.mouseClick(graph, _left(), pos=graph.hub_rects["hub-a"].center().toPoint())
        assert set(window.topology.drill_model.rows) == on_a
    finally:
        await window.shutdown()
        window.close()


async def test_the_console_fails_over_to_the_next_url_when_its_hub_is_killed(
    two_hubs: Cluster, tmp_path: Path
) -> None:
    a, b = two_hubs.hubs["hub-a"], two_hubs.hubs["hub-b"]
    on_a = two_hubs.agents(a, "on-a-")
    on_b = two_hubs.agents(b, "on-b-")
    window = await open_console(tmp_path, [a.url, b.url], two_hubs.viewer)
    session = window.session
    try:
        await wait_for(lambda: states(window, on_b, "hub-b") == {"online"}, 30, what="on-b")
        await wait_for(lambda: states(window, on_a, "hub-a") == {"online"}, 30, what="on-a")
        assert session.hub_url == a.url and session.connections == 1
        await wait_for(lambda: window.fleet.this_hub == "hub-a", 5, what="the hub's own name")
        window._set_indicator(session.state, session.detail)
        assert f"connected  {a.url}  (hub-a)" in window.indicator.text()
        assert "hub 1 of 2" in window.windowTitle()
        snapshots = window.fleet.snapshot_count

        a.kill()
        # The console moves to the next URL by itself and resyncs from that hub's snapshot.
        await wait_for(
            lambda: session.is_connected and session.hub_url == b.url, 40, what="on hub-b"
        )
        assert session.failovers == 1 and session.connections == 2
        assert window.fleet.snapshot_count > snapshots
        await wait_for(lambda: window.fleet.this_hub == "hub-b", 5, what="hub-b's ticks")
        window._set_indicator(session.state, session.detail)
        assert f"connected  {b.url}  (hub-b)" in window.indicator.text()
        assert "hub 2 of 2" in window.windowTitle()
        assert f"failed over from {a.url}" in window.status_text.text()
        # The fleet is whole from hub B: nothing of hub A's view lingers. Hub A's agents are
        # shown exactly as hub B has them (`unknown` once hub A's lease lapsed; a full run
        # under load once saw hub B say `offline` for some: the console shows hub B's word).
        admin = await AdminClient(b.url, two_hubs.viewer).open()
        try:

            async def as_hub_b_says() -> bool:
                hub_b = {
                    x["agent_id"]: x["state"] for x in (await admin.request("agents"))["agents"]
                }
                shown = seen(window, on_a)
                return all(
                    shown[i] == (hub_b.get(i), "hub-a") and hub_b.get(i) != "online" for i in on_a
                )

            try:
                await wait_for(as_hub_b_says, 40)
            except AssertionError as exc:
                raise AssertionError(
                    f"hub-a's agents on the console: {seen(window, on_a)}"
                ) from exc
        finally:
            await admin.close()
        assert states(window, on_b, "hub-b") == {"online"}
    finally:
        await window.shutdown()
        window.close()


def _left() -> Any:
    from PySide6.QtCore import Qt

    return Qt.MouseButton.LeftButton


async def test_on_a_single_hub_the_topology_is_as_before(hub: Any, window_factory: Any) -> None:
    from .helpers import online_agent

    agent = await online_agent(hub, "edge-1", region="eu-central")
    window = await window_factory(hub, "viewer")
    try:
        await wait_for(lambda: "edge-1" in window.fleet.agents, 5, what="edge-1")
        window.fleet.flush()
        window.topology.refresh()
        assert not window.fleet.is_cluster and window.fleet.hub_infos() == {}
        assert not window.topology.graph.isVisibleTo(window.topology)
        assert window.topology.hub_items["hub-test-0"].text(0) == "hub-test-0"
        assert hub_column(window) == {"edge-1": "hub-test-0"}
        assert window.windowTitle() == f"Tether console — {hub.url}"
    finally:
        await agent.close()
