"""Hubs in cluster mode on a real ``redis-server`` of the test's own.

In-process hubs (:func:`cluster`) for what happens between live hubs; real processes
(``tests.support.HubProcess`` with ``--redis``) where a hub must die with ``kill -9``.
Short leases keep a dead hub's detection to a second or two; nothing else is shortened.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from hub.cluster_hub import ClusterHub
from hub.config import HubConfig
from tests.conftest import HubHandle
from tests.redis_server import RedisServer

#: Leases short enough that a dead hub is noticed within a couple of seconds in tests.
FAST_LEASES = {"cluster_lease_ttl": 2.0, "cluster_lease_interval": 0.25}


class ClusterHandle(HubHandle):
    hub: ClusterHub


@pytest.fixture
async def cluster(
    redis_factory: Callable[..., RedisServer], tmp_path: Path
) -> AsyncIterator[Callable[..., Any]]:
    """``await cluster(n)``: n started hubs on one Redis (and ``cluster.redis``)."""
    hubs: list[ClusterHub] = []
    state: dict[str, Any] = {}

    async def make(
        count: int = 2, redis: RedisServer | None = None, **overrides: Any
    ) -> list[ClusterHandle]:
        server = redis or state.get("redis") or redis_factory(appendfsync="always")
        state["redis"] = server
        prefix = state.setdefault("prefix", f"t{secrets.token_hex(3)}")
        made = []
        for _ in range(count):
            index = len(hubs)
            values: dict[str, Any] = {
                "listen": "127.0.0.1:0",
                "data_dir": tmp_path / f"hub{index}",
                "hub_id": f"hub-{chr(ord('a') + index)}",
                "redis_url": server.url,
                "redis_prefix": prefix,
                "reconnect_spread_ms": 200,
                "shutdown_timeout": 2.0,
                "gc_freeze_interval": 0,
                **FAST_LEASES,
            }
            values.update(overrides)
            hub = ClusterHub(HubConfig(**values))
            await hub.start()
            hubs.append(hub)
            made.append(ClusterHandle(hub))
        return made

    make.state = state  # type: ignore[attr-defined]
    yield make
    for hub in hubs:
        await hub.stop()
