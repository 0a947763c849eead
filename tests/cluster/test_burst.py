"""A burst of registrations on a cluster hub: every agent registers and the hub stays ready.

Each registration makes a few Redis calls (the claim, the enrollment's credential, the
events); hundreds at once are more than the client's connection pool holds. Waiting for a
connection is the hub's own queue, not Redis failing: a hub that took the pool's limit
("Too many connections") for an outage went not ready and refused agents while Redis
answered everything.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from tests.cluster.test_redis_trouble import _owners, readiness
from tests.support import RawAgent, wait_for

BURST = 400


async def test_a_registration_burst_registers_all_and_the_hub_stays_ready(
    cluster: Any, caplog: pytest.LogCaptureFixture
) -> None:
    (a,) = await cluster(1)
    redis = cluster.state["redis"]
    enroll = await a.token("enroll")
    statuses: list[int] = []
    done = asyncio.Event()

    async def watch_readiness() -> None:
        while not done.is_set():
            status, _body = await readiness(a.hub.port)
            statuses.append(status)
            await asyncio.sleep(0.02)

    async def one(n: int) -> RawAgent:
        agent = await RawAgent.connect(a.agent_url, enroll)
        await agent.register(f"burst-{n:04d}")
        return agent

    watcher = asyncio.create_task(watch_readiness())
    caplog.set_level(logging.WARNING, logger="hub.cluster")
    agents: list[RawAgent] = []
    try:
        results = await asyncio.gather(*(one(n) for n in range(BURST)), return_exceptions=True)
        agents = [r for r in results if isinstance(r, RawAgent)]
        failures = [r for r in results if not isinstance(r, RawAgent)]
        assert not failures, failures[:3]
        await wait_for(
            lambda: _claimed_all(redis, cluster.state["prefix"]), timeout=20, what="all claimed"
        )
        done.set()
        await watcher
        assert statuses and set(statuses) == {200}, sorted(set(statuses))
        outages = [r.getMessage() for r in caplog.records if "redis unavailable" in r.getMessage()]
        assert not outages, outages[:3]
        assert a.hub.cluster.link.healthy
    finally:
        done.set()
        await asyncio.gather(watcher, return_exceptions=True)
        await asyncio.gather(*(agent.close() for agent in agents), return_exceptions=True)


async def _claimed_all(redis: Any, prefix: str) -> bool:
    return await _owners(redis, prefix) >= BURST
