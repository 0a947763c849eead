"""Fault tests across real processes: the hub killed with -9 mid-work, a real agent killed
with -9 mid-command. Nothing accepted is lost; nothing runs twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from hub.protocol.client import AdminClient
from tests.support import ROOT, HubProcess, run_cli, wait_for


def token(data: Path, *args: str) -> str:
    done = run_cli("token", "create", "--data-dir", str(data), *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


class AgentProcess:
    """``tether-agent run`` as a real process with its own state dir."""

    def __init__(self, hub_url: str, key: str, agent_id: str, state: Path, *extra: str) -> None:
        self.args = [
            sys.executable, "-m", "agent", "run", "--hub", hub_url, "--token", key,
            "--agent-id", agent_id, "--state-dir", str(state), "--allow-exec", *extra,
        ]  # fmt: skip
        self.log = state.parent / f"{agent_id}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=log, env=env)
        return self

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def marker_command(path: Path, marker: str, seconds: float) -> dict:
    script = (
        "import sys, time; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n'); "
        "time.sleep(float(sys.argv[3]))"
    )
    return {"argv": [sys.executable, "-c", script, str(path), marker, str(seconds)]}


async def job_finished(admin: AdminClient, job_id: str) -> dict | None:
    try:
        detail = await admin.request("job", job_id=job_id)
    except ConnectionError:
        return None
    return detail if detail["job"]["state"] != "running" else None


async def connect_admin(url: str, token_: str) -> AdminClient:
    async def attempt() -> AdminClient | None:
        try:
            return await AdminClient(url, token_).open()
        except OSError:
            return None

    return await wait_for(attempt, timeout=20, interval=0.2, what="admin connection")


async def test_hub_kill_9_with_commands_queued_and_in_flight(tmp_path: Path) -> None:
    data = tmp_path / "hub"
    markers = tmp_path / "markers.txt"
    operator = token(data, "--admin", "--role", "operator")
    enroll = token(data, "--enroll")
    hub = HubProcess(data).start()
    busy = AgentProcess(hub.url, enroll, "busy", tmp_path / "busy", "--max-concurrency", "1")
    late = AgentProcess(hub.url, enroll, "late", tmp_path / "late")
    try:
        busy.start()
        late.start()
        admin = await connect_admin(hub.url, operator)
        await wait_for(
            lambda: _online(admin, {"busy", "late"}), timeout=20, what="agents registered"
        )
        late.stop()  # "late" is offline: its commands stay queued in the hub
        await wait_for(lambda: _offline(admin, "late"), timeout=20)
        jobs = []
        for n in range(4):
            reply = await admin.request(
                "dispatch",
                target={"agent_ids": ["busy"]},
                name="exec",
                args=marker_command(markers, f"busy-{n}", 1.0),
            )
            jobs.append(reply["job_id"])
        for n in range(2):
            reply = await admin.request(
                "dispatch",
                target={"agent_ids": ["late"]},
                name="exec",
                args=marker_command(markers, f"late-{n}", 0.1),
            )
            jobs.append(reply["job_id"])
        # Kill the hub while busy runs its first command and holds the others.
        await wait_for(lambda: markers.exists() and "busy-0" in markers.read_text(), timeout=20)
        await admin.close()
        hub.kill()

        hub = HubProcess(data, port=hub.port).start()
        late.start()
        admin = await connect_admin(hub.url, operator)
        for job_id in jobs:
            detail = await wait_for(
                lambda j=job_id: job_finished(admin, j), timeout=60, interval=0.2, what=job_id
            )
            assert detail["job"]["state"] == "succeeded", detail
        lines = markers.read_text().split()
        assert sorted(lines) == sorted([f"busy-{n}" for n in range(4)] + ["late-0", "late-1"])
        await admin.close()
    finally:
        busy.stop()
        late.stop()
        hub.stop()


async def test_agent_kill_9_mid_command_is_reported_interrupted_not_rerun(tmp_path: Path) -> None:
    data = tmp_path / "hub"
    markers = tmp_path / "markers.txt"
    operator = token(data, "--admin", "--role", "operator")
    key = token(data, "--agent", "edge-1")
    hub = HubProcess(data).start()
    agent = AgentProcess(hub.url, key, "edge-1", tmp_path / "edge-1")
    try:
        agent.start()
        admin = await connect_admin(hub.url, operator)
        await wait_for(lambda: _online(admin, {"edge-1"}), timeout=20)
        reply = await admin.request(
            "dispatch",
            target={"agent_ids": ["edge-1"]},
            name="exec",
            args=marker_command(markers, "ran", 30),
            timeout=120,
        )
        await wait_for(lambda: markers.exists() and markers.read_text(), timeout=20)
        agent.kill()
        agent.start()
        detail = await wait_for(
            lambda: job_finished(admin, reply["job_id"]), timeout=60, interval=0.2
        )
        (command,) = detail["commands"]
        assert command["state"] == "failed"
        assert command["result"]["error"] == "interrupted"
        assert markers.read_text().split() == ["ran"]
        await admin.close()
    finally:
        agent.stop()
        hub.stop()
        # The orphaned sleeper of the killed agent: gone with the test.
        subprocess.run(["pkill", "-f", str(markers)], check=False)


async def _online(admin: AdminClient, ids: set[str]) -> bool:
    agents = (await admin.request("agents"))["agents"]
    return ids <= {a["agent_id"] for a in agents if a["state"] == "online"}


async def _offline(admin: AdminClient, agent_id: str) -> bool:
    agents = (await admin.request("agents"))["agents"]
    return any(a["agent_id"] == agent_id and a["state"] == "offline" for a in agents)
