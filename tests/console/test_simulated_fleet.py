"""The console with the real agent: ``tether-agent simulate`` against a real hub."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from tests.conftest import HubHandle
from tests.support import ROOT

from .helpers import wait_for

pytestmark = pytest.mark.slow

COUNT = 60


async def test_console_shows_and_drives_a_simulated_fleet(hub: HubHandle, window_factory):
    enroll = await hub.token("enroll")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "simulate", "--hub", hub.url, "--token", enroll,
        "--count", str(COUNT), "--rate", "200", "--log-level", "warning",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        window = await window_factory(hub, "operator")
        fleet = window.fleet
        await wait_for(lambda: fleet.counts["online"] + fleet.counts["degraded"] == COUNT, 60,
                       what="every simulated agent online in the console")  # fmt: skip
        await wait_for(lambda: len(window.agent_model.rows) == COUNT, what="table rows")
        await wait_for(lambda: len(window.map.ids) == COUNT, what="map points")
        assert all(agent_id.startswith("sim-") for agent_id in fleet.agents)
        window.topology.refresh()
        total = sum(int(item.text(1)) for item in window.topology.hub_items.values())
        assert total == COUNT
        # Dispatch ping to the whole fleet by selector; the job view shows every result.
        dialog = window.open_dispatch()
        dialog.sel_agent.setText("sim-*")
        dialog.command.setCurrentIndex(dialog.command.findData("ping"))
        dialog.send()
        jobs = window.jobs
        await wait_for(
            lambda: (
                len(jobs.command_model.rows) == COUNT
                and all(c.state == "succeeded" for c in jobs.command_model.rows)
            ),
            30,
            what="60 pings succeeded in the job view",
        )
        await wait_for(lambda: jobs.progress.value() == COUNT, what="progress bar")
    finally:
        process.terminate()
        await process.wait()
