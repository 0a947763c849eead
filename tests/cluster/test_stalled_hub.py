"""A hub stalled past its lease (SIGSTOP longer than the TTL, then SIGCONT) comes back whole.

While it was stopped, the other hubs saw its lease lapse: its agents became ``unknown``,
``hub_down`` was raised and the leader's ledger took its agents for disconnected. Its
agents never left it, though, and it never knew it had lapsed. Back, it must say so
itself: its agents show online again, commands reach them, and ``hub_down`` resolves.
Real hub processes, a real ``redis-server``.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from tests.cluster.test_failover import (
    _all_in_state,
    _all_online_on,
    _no_open_alerts,
    _open_alerts,
    ten_agents_on_hub_a,
)
from tests.support import wait_for
from tests.test_faults import connect_admin, job_finished


async def test_a_hub_stalled_past_its_lease_gets_its_agents_back_online(
    redis_factory: Any, tmp_path: Path
) -> None:
    operator, a, b, simulated, ids = ten_agents_on_hub_a(redis_factory, tmp_path, "held-")
    stopped = False
    try:
        admin = await connect_admin(b.url, operator)
        await wait_for(lambda: _all_online_on(admin, ids, "hub-a"), timeout=30, what="on a")
        assert a.process is not None
        a.process.send_signal(signal.SIGSTOP)
        stopped = True
        # Past the lease: the others take hub-a for down.
        await wait_for(lambda: _all_in_state(admin, ids, "unknown"), timeout=10, what="unknown")
        await wait_for(lambda: _open_alerts(admin, "hub_down"), timeout=10, what="hub_down")
        a.process.send_signal(signal.SIGCONT)
        stopped = False
        # The same incarnation, the same connections: its agents are online on it again...
        await wait_for(lambda: _all_online_on(admin, ids, "hub-a"), timeout=15, what="online")
        await wait_for(lambda: _no_open_alerts(admin, "hub_down"), timeout=10, what="resolved")
        # ...and the ledger routes to them again: a job dispatched on hub-b reaches them.
        job = await admin.request(
            "dispatch", target={"selector": {"agent_id": "held-*"}}, name="sysinfo"
        )
        detail = await wait_for(
            lambda: job_finished(admin, job["job_id"]), timeout=20, interval=0.2, what="job"
        )
        assert detail["job"]["state"] == "succeeded", detail["job"]
        assert detail["job"]["counts"] == {"succeeded": 10}
        await admin.close()
    finally:
        if stopped and a.process is not None:
            a.process.send_signal(signal.SIGCONT)
        simulated.kill()
        simulated.wait(10)
        a.stop()
        b.stop()
