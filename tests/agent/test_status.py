"""``tether-agent status``: what the running agent keeps in its state dir, read back."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import orjson

from agent.status import MIN_INTERVAL, STATUS_FILE, CommandLog, StatusReport, read_status
from tests.conftest import HubHandle
from tests.support import ROOT, job_done, run_cli_async, wait_for

from .test_agent_cli import clean_env

KEYS = {
    "agent_id",
    "state",
    "hub_url",
    "hub_id",
    "since",
    "last_disconnect",
    "next_attempt_in_s",
    "credential",
    "version",
    "commands",
}


async def test_report_writes_atomically_and_coalesces_changes(tmp_path: Path) -> None:
    report = StatusReport(tmp_path, "edge-1", "1.0", CommandLog())
    report.connecting("ws://h:1", {"kind": "agent_key", "id": "abc"}, None)
    assert report.writes == 1
    for n in range(50):  # a reconnect loop: many changes, few writes
        report.ended(1006, f"lost {n}")
        report.waiting(5.0)
        report.connecting("ws://h:1", {"kind": "agent_key", "id": "abc"}, None)
    assert report.writes == 1
    await wait_for(lambda: report.writes == 2, MIN_INTERVAL + 3, what="the coalesced write")
    document = orjson.loads((tmp_path / STATUS_FILE).read_bytes())
    assert document["last_disconnect"]["reason"] == "lost 49"
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    status = read_status(tmp_path)
    assert status is not None and set(status) == KEYS and status["state"] == "connecting"
    report.close()


def test_log_keeps_the_last_twenty_newest_first() -> None:
    log = CommandLog()
    for n in range(25):
        log.received(f"c{n}", "ping")
    log.finished("c24", "succeeded")
    view = log.view()
    assert len(view) == 20 and view[0]["command_id"] == "c24" and view[-1]["command_id"] == "c5"
    assert view[0]["state"] == "succeeded" and view[0]["finished_at"] is not None


def test_a_dead_writer_reads_as_stopped(tmp_path: Path) -> None:
    document = {
        "agent_id": "edge-1",
        "state": "connected",
        "pid": 2**22 + 7,  # no such process
        "since": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:01:00Z",
        "commands": [],
    }
    (tmp_path / STATUS_FILE).write_bytes(orjson.dumps(document))
    status = read_status(tmp_path)
    assert status is not None and status["state"] == "stopped" and status["hub_id"] is None
    assert read_status(tmp_path / "nothing") is None


async def test_status_of_a_running_agent(hub: HubHandle, tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = clean_env(
        TETHER_HUB_URL=hub.url,
        TETHER_TOKEN=await hub.token("enroll"),
        TETHER_AGENT_ID="edge-st",
        TETHER_STATE_DIR=str(state),
        PYTHONPATH=str(ROOT),
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "run", env=env, cwd=ROOT, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        await wait_for(lambda: "edge-st" in hub.hub.registry.live, 20, what="registered")

        async def status(*args: str) -> tuple[int, str]:
            result = await run_cli_async("agent", "status", *args)
            return result.returncode, result.stdout

        async def connected() -> bool:
            code, out = await status("--state-dir", str(state), "--json")
            return code == 0 and json.loads(out)["state"] == "connected"

        await wait_for(connected, 20, what="status says connected")
        from hub.protocol.client import AdminClient

        admin = AdminClient(hub.url, await hub.admin_token("operator"))
        await admin.open()
        reply = await admin.request("dispatch", target={"agent_ids": ["edge-st"]}, name="ping")
        await wait_for(lambda: job_done(admin, reply["job_id"]), 15, what="ping done")
        await admin.close()

        async def ran() -> dict[str, object] | None:
            _, out = await status("--state-dir", str(state), "--json")
            found = json.loads(out)
            commands = found["commands"]
            return found if commands and commands[0]["state"] == "succeeded" else None

        found = await wait_for(ran, 10, what="the command in the status")
        assert set(found) == KEYS
        assert found["hub_id"] == hub.hub.hub_id and found["hub_url"] == hub.url
        assert found["credential"]["kind"] == "agent_key"  # the key issued at enrollment
        assert found["commands"][0]["name"] == "ping"
        assert env["TETHER_TOKEN"] not in json.dumps(found)
        code, text = await status("--state-dir", str(state))
        assert code == 0 and "connected since" in text and "ping" in text

        # The hub goes away: the agent waits and says why, with the time to its next try.
        await hub.hub.stop()

        async def waiting() -> dict[str, object] | None:
            code, out = await status("--state-dir", str(state), "--json")
            found = json.loads(out)
            return found if code == 1 and found["state"] in ("waiting", "connecting") else None

        found = await wait_for(waiting, 20, what="waiting")
        assert found["last_disconnect"] is not None

        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
        code, out = await status("--state-dir", str(state), "--json")
        assert code == 1 and json.loads(out)["state"] == "stopped"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    code, _ = await status("--state-dir", str(tmp_path / "none"))
    assert code == 2
