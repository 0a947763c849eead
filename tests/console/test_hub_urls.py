"""Several hub URLs: how the command line reads them, and how the session moves between
them (a dead URL is passed over at once, not after a backoff)."""

from __future__ import annotations

import socket

import pytest

from console.app import ConnectionParams, parse_args, parse_hub_urls
from console.client import ConnState, HubSession

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
