"""The hub as a real process: SIGTERM drains cleanly, kill -9 loses nothing accepted."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from hub.protocol.client import AdminClient
from tests.support import HubProcess, RawAgent, run_cli, wait_for


def token(data_dir: Path, *args: str) -> str:
    done = run_cli("token", "create", "--data-dir", str(data_dir), *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


async def test_sigterm_sends_agents_away_with_a_spread_and_exits_0(tmp_path: Path) -> None:
    config = tmp_path / "hub.toml"
    config.write_text("[hub]\nreconnect_spread_ms = 4000\n")
    enroll = token(tmp_path / "data", "--enroll")
    hub = HubProcess(tmp_path / "data", "--config", str(config)).start()
    try:
        agents = []
        for n in range(8):
            agent = await RawAgent.connect(hub.url + "/ws", enroll)
            await agent.register(f"edge-{n}")
            agents.append(agent)
        code = await asyncio.to_thread(hub.terminate, 15)
        assert code == 0, "".join(hub.log)
        spread = set()
        for agent in agents:
            reconnect = await agent.recv_type("reconnect")
            assert reconnect["reason"] == "draining"
            assert 0 <= reconnect["after_ms"] <= 4000
            spread.add(reconnect["after_ms"])
            assert await agent.closed() == 1012
        assert len(spread) > 1, "after_ms is drawn per agent"
    finally:
        hub.stop()
    # The state was saved: the agents are known and offline after a restart.
    hub = HubProcess(tmp_path / "data").start()
    try:
        admin = await AdminClient(
            hub.url, token(tmp_path / "data", "--admin", "--role", "viewer")
        ).open()
        agents_now = (await admin.request("agents"))["agents"]
        assert len(agents_now) == 8
        assert {a["state"] for a in agents_now} == {"offline"}
        await admin.close()
    finally:
        hub.stop()


async def test_kill_9_loses_no_accepted_command(tmp_path: Path) -> None:
    data = tmp_path / "data"
    busy_key = token(data, "--agent", "busy")
    token(data, "--agent", "away")
    operator = token(data, "--admin", "--role", "operator")
    hub = HubProcess(data).start()
    try:
        away = await RawAgent.connect(hub.url + "/ws", token(data, "--agent", "away"))
        await away.register("away")
        await away.close()
        busy = await RawAgent.connect(hub.url + "/ws", busy_key)
        await busy.register("busy")
        admin = await AdminClient(hub.url, operator).open()
        sent = [
            (
                await admin.request(
                    "dispatch", target={"agent_ids": ["busy"]}, name="ping", args={"n": n}
                )
            )["command_ids"][0]
            for n in range(3)
        ]
        queued = [
            (await admin.request("dispatch", target={"agent_ids": ["away"]}, name="ping"))[
                "command_ids"
            ][0]
            for _ in range(2)
        ]
        received = [(await busy.recv_type("command"))["command_id"] for _ in sent]
        assert received == sent
        await busy.send({"type": "ack", "command_id": sent[1]})
        await busy.send({"type": "result", "command_id": sent[2], "status": "succeeded"})

        async def stored(command_id: str, state: str) -> bool:
            page = await admin.request("commands", filter={"command_id": command_id})
            return page["commands"] and page["commands"][0]["state"] == state

        await wait_for(lambda: stored(sent[2], "succeeded"))
        await wait_for(lambda: stored(sent[1], "acked"))
        await wait_for(lambda: stored(sent[0], "sent"))
        await admin.close()
        hub.kill()
        await busy.closed()
    finally:
        hub.stop()

    hub = HubProcess(data).start()
    try:
        admin = await AdminClient(hub.url, operator).open()
        states = {
            c["command_id"]: c["state"]
            for c in (await admin.request("commands", limit=100))["commands"]
        }
        assert states == {
            sent[0]: "sent", sent[1]: "acked", sent[2]: "succeeded",
            queued[0]: "queued", queued[1]: "queued",
        }  # fmt: skip
        busy = await RawAgent.connect(hub.url + "/ws", busy_key)
        await busy.register("busy")
        redelivered = [(await busy.recv_type("command"))["command_id"] for _ in range(2)]
        assert redelivered == sent[:2]
        away = await RawAgent.connect(hub.url + "/ws", token(data, "--agent", "away"))
        await away.register("away")
        assert [(await away.recv_type("command"))["command_id"] for _ in range(2)] == queued
        await admin.close()
        await busy.close()
        await away.close()
    finally:
        hub.stop()


async def test_an_embedded_hub_stops_without_arming_the_exit_watchdog(hub_factory) -> None:
    """Only ``serve_forever`` (the process that owns the hub) may end the process."""
    handle = await hub_factory()
    await handle.hub.stop()
    names = [thread.name for thread in threading.enumerate()]
    assert "tether-exit-watchdog" not in names
