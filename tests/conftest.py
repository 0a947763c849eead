"""Fixtures: real hubs on 127.0.0.1 with ephemeral ports and SQLite files in tmp dirs."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("QT_API", "pyside6")

from hub.app import Hub
from hub.config import HubConfig
from tests.redis_server import RedisServer


class HubHandle:
    """A started in-process hub and helpers to make credentials for it."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.hub.port}"

    @property
    def agent_url(self) -> str:
        return self.url + "/ws"

    @property
    def admin_url(self) -> str:
        return self.url + "/admin"

    async def token(self, kind: str = "agent", **fields: Any) -> str:
        credentials = self.hub.credentials
        record, token = credentials.make(kind, **fields)
        await self.hub.store.add_credential(record)
        credentials.apply([record])
        return token

    async def agent_token(self, agent_id: str) -> str:
        return await self.token("agent", agent_id=agent_id)

    async def admin_token(self, role: str = "admin") -> str:
        return await self.token("admin", role=role, name=f"test-{role}")


@pytest.fixture
async def hub_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    hubs: list[Hub] = []

    async def make(**overrides: Any) -> HubHandle:
        values: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "data_dir": tmp_path / f"hub{len(hubs)}",
            "hub_id": f"hub-test-{len(hubs)}",
            "reconnect_spread_ms": 200,
            "shutdown_timeout": 2.0,
            "gc_freeze_interval": 0,
        }
        values.update(overrides)
        hub = Hub(HubConfig(**values))
        await hub.start()
        hubs.append(hub)
        return HubHandle(hub)

    yield make
    for hub in hubs:
        await hub.stop()


@pytest.fixture
async def hub(hub_factory: Callable[..., Any]) -> HubHandle:
    return await hub_factory()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One ``redis-server`` for the session's tests that only need a Redis (each uses its
    own key prefix). Tests that stop, kill or restart Redis make their own
    (:func:`redis_factory`)."""
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start ``redis-server`` processes of the test's own; all are killed after it."""
    servers: list[RedisServer] = []

    def make(**options: Any) -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(servers)}", **options)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.close()
