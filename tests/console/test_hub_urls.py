"""Several hub URLs: how the command line reads them, and how the session moves between
them (a dead URL is passed over at once, not after a backoff)."""

from __future__ import annotations

import socket

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from console.app import ConnectionParams, parse_args, parse_hub_urls
from console.client import ConnState, HubSession, Rotation
from console.fleet import FleetModel

from .helpers import wait_for


def test_hub_urls_repeat_or_separate_with_commas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TETHER_HUB_URL", raising=False)
    args = parse_args(["--hub", "ws://a:1, ws://b:2", "--hub", "wss://c:3", "--hub", "ws://a:1"])
    assert args.hubs == ["ws://a:1", "ws://b:2", "wss://c:3"]
    assert args.hub == "ws://a:1"  # the first, as before
    monkeypatch.setenv("TETHER_HUB_URL", "ws://x:1,ws://y:2")
    assert parse_args([]).hubs == ["ws://x:1", "ws://y:2"]
    assert parse_args(["--hub", "ws://z:3"]).hubs == ["ws://z:3"]  # flags beat the environment
    with pytest.raises(SystemExit) as refused:
        parse_args(["--hub", "ws://a:1,http://b:2"])
    assert refused.value.code == 2
    assert parse_hub_urls(" , ") == []
    params = ConnectionParams("ws://a:1", "t", fallback_hubs=("ws://b:2", "ws://a:1"))
    assert params.urls == ["ws://a:1", "ws://b:2"]


def _closed_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"ws://127.0.0.1:{probe.getsockname()[1]}"  # nothing listens once closed


async def test_a_dead_first_url_is_passed_over_at_once(hub_factory) -> None:
    hub = await hub_factory()
    token = await hub.admin_token("viewer")
    dead = _closed_port()
    session = HubSession([dead, hub.url], token)
    snapshots: list[object] = []
    session.snapshot_received.connect(snapshots.append)
    session.start()
    try:
        await wait_for(lambda: session.is_connected, 10, what="connected to the live hub")
        assert session.hub_url == hub.url and snapshots
        assert session.backoff.attempt == 0  # one URL failed, not a round: no backoff drawn
        assert session.failovers == 0  # never connected before: no failover
        await hub.hub.stop()  # its only hub gone: a round fails and the backoff begins
        await wait_for(lambda: session.backoff.attempt >= 1, 10, what="a backoff step")
        assert session.state == ConnState.RECONNECTING
        assert dead in session.last_error or hub.url in session.last_error
    finally:
        await session.stop()


class RotationMachine(RuleBasedStateMachine):
    """Failover over n URLs: every URL is tried once per round, in order, and the backoff is
    asked for exactly once per round of n failures in a row, never after a success."""

    @initialize(n=st.integers(min_value=1, max_value=5))
    def start(self, n: int) -> None:
        self.urls = [f"ws://hub-{k}:8765" for k in range(n)]
        self.rotation = Rotation(self.urls)
        self.streak = 0  # failures since the last connection
        self.waits = 0  # backoff waits since the last connection
        self.tried: list[str] = []  # URLs tried in the current round
        self.expected = 0  # the index the next dial must use

    @rule()
    def connect(self) -> None:
        assert self.rotation.current == self.urls[self.expected]
        self.rotation.connected()
        self.streak = self.waits = 0
        self.tried = []

    @rule()
    def fail(self) -> None:
        url = self.rotation.current
        assert url == self.urls[self.expected]
        assert url not in self.tried  # no URL twice in one round
        self.tried.append(url)
        self.streak += 1
        self.expected = (self.expected + 1) % len(self.urls)
        if self.rotation.failed():
            self.waits += 1
            assert sorted(self.tried) == sorted(self.urls)  # the round covered every URL
            self.tried = []
        assert self.rotation.current == self.urls[self.expected]

    @invariant()
    def one_wait_per_round(self) -> None:
        if hasattr(self, "rotation"):
            assert self.waits == self.streak // len(self.urls)
            assert 0 <= self.rotation.misses < len(self.urls)


RotationMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40,
                                             deadline=None)  # fmt: skip
test_rotation_over_hub_urls = RotationMachine.TestCase


def test_hostile_cluster_stats_are_dropped_not_shown(qtbot) -> None:
    fleet = FleetModel()
    fleet.apply_snapshot({"metrics": {"cluster": {
        "redis": "sideways",
        "hub_id": "x" * 500,
        "hubs": {
            "hub-a": {"state": "up", "agents": 5, "leader": 1, "lag_ms": float("nan"),
                      "max_agents": True},
            "hub-b": {"state": "exploded", "agents": -3, "max_agents": 10},
            "": {"state": "down"},
            "x" * 200: {"state": "down"},
            "hub-c": "not an object",
            "hub-d": {"state": "down", "agents": "many", "lag_ms": 1e400},
        },
    }}})  # fmt: skip
    assert fleet.is_cluster and fleet.redis_state == "unknown" and fleet.this_hub is None
    infos = fleet.hub_infos()
    assert list(infos) == ["hub-a", "hub-b", "hub-d"]
    a, b, d = infos["hub-a"], infos["hub-b"], infos["hub-d"]
    assert (a.state, a.agents, a.leader, a.lag_ms, a.max_agents, a.load) == (
        "up", 5, False, None, None, None)  # fmt: skip
    assert (b.state, b.agents, b.load) == ("up", 0, 0.0)
    assert (d.state, d.agents, d.lag_ms) == ("down", 0, None)
    fleet.apply_snapshot({"metrics": {"agents": {}}})  # a single hub again
    assert not fleet.is_cluster and fleet.hub_infos() == {}
