"""The agent against the real hub, in-process, on 127.0.0.1: enrollment, commands,
redelivery, cancel, revocation, takeover, drain, shutdown, doctor and the simulator."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.client import AgentClient, ClientSettings
from agent.doctor import DoctorOptions, doctor
from agent.executor import Executor
from agent.handlers import default_registry
from agent.handlers.exec import ExecPolicy
from agent.journal import MemoryJournal, SqliteJournal
from agent.metrics import HostMetrics
from agent.profile import AgentProfile
from agent.simulate import Simulation, SimulationOptions
from agent.state import Credentials, KeyFile, prepare_state_dir
from hub.protocol.client import AdminClient
from tests.conftest import HubHandle
from tests.support import wait_for

from .conftest import eventually, gone

ROOT = Path(__file__).resolve().parents[2]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Agents:
    """Starts AgentClients (real ones, with real journals) and stops them after the test."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.running: list[tuple[AgentClient, asyncio.Task[None]]] = []

    async def start(
        self,
        urls: list[str],
        token: str | None,
        agent_id: str = "edge-1",
        *,
        policy: ExecPolicy | None = None,
        state: Path | None = None,
        **settings: Any,
    ) -> AgentClient:
        state = prepare_state_dir(state or self.tmp_path / agent_id)
        journal = await SqliteJournal.open(state / "journal.sqlite3")
        profile = AgentProfile(
            agent_id=agent_id,
            platform="linux",
            region="eu-central",
            labels={"site": "test"},
            location=(52.5, 13.4),
        )
        client = AgentClient(
            profile,
            ClientSettings(urls=urls, shutdown_grace=0.5, **settings),
            Credentials.from_state(token, KeyFile(state)),
            Executor(profile, default_registry(policy), journal),
            HostMetrics(),
        )
        self.running.append((client, asyncio.ensure_future(client.run())))
        return client

    async def stop(self, client: AgentClient) -> None:
        for known, task in self.running:
            if known is client:
                await client.shutdown()
                await asyncio.wait_for(task, 10)
                await client.executor.journal.close()
        self.running = [(c, t) for c, t in self.running if c is not client]

    async def stop_all(self) -> None:
        for client, _ in list(self.running):
            await self.stop(client)


@pytest.fixture
async def agents(tmp_path: Path) -> AsyncIterator[Agents]:
    started = Agents(tmp_path)
    yield started
    await started.stop_all()


@pytest.fixture
async def admin(hub: HubHandle) -> AsyncIterator[AdminClient]:
    client = AdminClient(hub.url, await hub.admin_token("operator"))
    await client.open()
    yield client
    await client.close()


def live(hub: HubHandle, agent_id: str) -> Any:
    return hub.hub.registry.live.get(agent_id)


async def dispatch(admin: AdminClient, agent_id: str, name: str, **fields: Any) -> str:
    data = await admin.request("dispatch", target={"agent_ids": [agent_id]}, name=name, **fields)
    (command_id,) = data["command_ids"]
    return command_id


async def finished(admin: AdminClient, command_id: str, timeout: float = 20.0) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        page = await admin.request("commands", filter={"command_id": command_id})
        (command,) = page["commands"]
        return command if command["result"] is not None else None

    return await wait_for(check, timeout, interval=0.05, what=f"{command_id} finished")


async def test_enrollment_stores_the_agent_key_and_uses_it_on_reconnect(
    hub: HubHandle, agents: Agents, tmp_path: Path
) -> None:
    enroll = await hub.token("enroll", uses=5)
    client = await agents.start([hub.url], enroll, "edge-enroll")
    await eventually(lambda: client.registered, message="registered")
    session = live(hub, "edge-enroll")
    assert session.principal.kind == "enroll"
    key_file = KeyFile(tmp_path / "edge-enroll")
    stored = await eventually(key_file.load, message="agent key stored")
    assert stored.startswith("tta_")
    assert oct(key_file.path.stat().st_mode & 0o777) == "0o600"
    record = hub.hub.registry.records["edge-enroll"]
    assert (record.platform, record.region, record.labels, record.location) == (
        "linux",
        "eu-central",
        {"site": "test"},
        (52.5, 13.4),
    )
    assert list(record.capabilities) == ["ping", "sysinfo"]

    assert client.connection is not None
    client.connection.abort()  # a network drop
    await eventually(lambda: live(hub, "edge-enroll") not in (None, session), message="back")
    assert live(hub, "edge-enroll").principal.kind == "agent"
    assert client.credentials.kind == "agent_key"


async def test_heartbeats_carry_host_metrics(
    hub_factory: Callable[..., Any], agents: Agents
) -> None:
    hub = await hub_factory(heartbeat_interval=0.2)
    client = await agents.start([hub.url], await hub.agent_token("edge-1"))
    await eventually(lambda: client.registered)
    record = hub.hub.registry.records["edge-1"]
    await eventually(lambda: record.metrics, message="metrics")
    assert set(record.metrics) == {"cpu_percent", "mem_percent", "load1", "uptime_s"}
    assert record.status == "ok"


async def test_ping_sysinfo_and_exec_round_trip(
    hub: HubHandle, agents: Agents, admin: AdminClient
) -> None:
    policy = ExecPolicy(programs=frozenset({"echo"}))
    client = await agents.start([hub.url], await hub.agent_token("edge-1"), policy=policy)
    await eventually(lambda: client.registered)
    assert list(hub.hub.registry.records["edge-1"].capabilities) == ["exec", "ping", "sysinfo"]

    ping = await finished(admin, await dispatch(admin, "edge-1", "ping"))
    assert ping["state"] == "succeeded" and ping["result"]["data"]["pong"] is True

    info = await finished(admin, await dispatch(admin, "edge-1", "sysinfo"))
    assert info["state"] == "succeeded" and info["result"]["data"]["cpu"]["logical"] >= 1

    echo_id = await dispatch(admin, "edge-1", "exec", args={"argv": ["echo", "hi", "there"]})
    echo = await finished(admin, echo_id)
    assert echo["state"] == "succeeded" and echo["result"]["exit_code"] == 0
    output = await admin.request("output", command_id=echo_id)
    assert output["chunks"] == [{"seq": 0, "stream": "stdout", "data": "hi there\n"}]

    refused = await finished(admin, await dispatch(admin, "edge-1", "exec", args={"argv": ["id"]}))
    assert refused["state"] == "rejected"
    assert "allow-exec" in refused["result"]["error"]


async def test_command_survives_a_reconnect_and_runs_once(
    hub: HubHandle, agents: Agents, admin: AdminClient, tmp_path: Path
) -> None:
    marker = tmp_path / "runs"
    script = f"open({str(marker)!r}, 'a').write('run\\n'); import time; time.sleep(1.5)"
    policy = ExecPolicy()
    client = await agents.start([hub.url], await hub.agent_token("edge-1"), policy=policy)
    await eventually(lambda: client.registered)
    command_id = await dispatch(
        admin, "edge-1", "exec", args={"argv": [sys.executable, "-c", script]}
    )
    await eventually(marker.exists, message="started")
    first = live(hub, "edge-1")
    assert client.connection is not None
    client.connection.abort()  # the hub redelivers it on the next connection
    await eventually(lambda: live(hub, "edge-1") not in (None, first), message="reconnected")
    command = await finished(admin, command_id)
    assert command["state"] == "succeeded"
    assert marker.read_text() == "run\n"


async def test_cancel_and_timeout_stop_the_process(
    hub: HubHandle, agents: Agents, admin: AdminClient, tmp_path: Path
) -> None:
    client = await agents.start([hub.url], await hub.agent_token("edge-1"), policy=ExecPolicy())
    await eventually(lambda: client.registered)
    pid_file = tmp_path / "pid"
    script = (
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    )
    command_id = await dispatch(
        admin, "edge-1", "exec", args={"argv": [sys.executable, "-c", script]}
    )
    pid = int(await eventually(lambda: pid_file.exists() and pid_file.read_text()))
    await admin.request("cancel", command_id=command_id)
    command = await finished(admin, command_id)
    assert command["state"] == "cancelled"
    await eventually(lambda: gone(pid), message="process gone")

    pid_file.unlink()
    command_id = await dispatch(
        admin, "edge-1", "exec", args={"argv": [sys.executable, "-c", script]}, timeout=1
    )
    pid = int(await eventually(lambda: pid_file.exists() and pid_file.read_text()))
    command = await finished(admin, command_id)
    assert command["state"] == "timed_out"
    assert "timed out" in command["result"]["error"]
    await eventually(lambda: gone(pid), message="process gone")


async def test_revocation_drops_the_key_and_waits_long(
    hub: HubHandle, agents: Agents, tmp_path: Path
) -> None:
    enroll = await hub.token("enroll")
    client = await agents.start([hub.url], enroll, "edge-rev")
    key_file = KeyFile(tmp_path / "edge-rev")
    key = await eventually(key_file.load)
    await eventually(lambda: client.registered and client.credentials.kind == "agent_key")
    assert client.connection is not None
    client.connection.abort()  # come back on the agent key, so that revoking it hits us
    await eventually(
        lambda: client.registered and live(hub, "edge-rev").principal.kind == "agent",
        message="back on the agent key",
    )
    client.last_delay = None
    await hub.hub.store.revoke_credential(key[4:16])
    await eventually(lambda: client.last_error == "revoked (4003)", message="4003")
    await eventually(lambda: client.last_delay is not None)
    assert client.last_delay is not None and client.last_delay >= 600
    assert key_file.load() is None
    assert client.credentials.current() == enroll


async def test_two_processes_with_one_id_back_off_after_4001(
    hub: HubHandle, agents: Agents, tmp_path: Path
) -> None:
    token = await hub.agent_token("twin")
    first = await agents.start([hub.url], token, "twin", state=tmp_path / "a")
    await eventually(lambda: first.registered)
    second = await agents.start([hub.url], token, "twin", state=tmp_path / "b")
    await eventually(lambda: first.last_error == "superseded (4001)", message="4001")
    await eventually(lambda: first.last_delay is not None)
    assert first.last_delay is not None and 30 <= first.last_delay <= 60
    assert second.registered


async def test_an_unforeseen_error_while_dialing_does_not_end_the_agent(
    hub: HubHandle, agents: Agents
) -> None:
    # A port past 65535 makes the dial raise ValueError, which no dialing path expects:
    # the agent must log it, back off and go on to the next URL, never stop dialing.
    client = await agents.start(["ws://127.0.0.1:70000", hub.url], await hub.agent_token("edge-1"))
    await eventually(lambda: client.registered, message="registered via the second URL")
    assert client.attempts >= 2


async def test_bad_token_is_refused_and_next_url_is_tried(hub: HubHandle, agents: Agents) -> None:
    dead = f"ws://127.0.0.1:{closed_port()}"
    client = await agents.start([dead, hub.url], await hub.agent_token("edge-1"))
    await eventually(lambda: client.registered, message="registered via the second URL")
    assert client.attempts >= 2

    bad = await agents.start([hub.url], "tta_000000000000_nope", "edge-2")
    await eventually(lambda: bad.last_error == "HTTP 401", message="401")
    assert not bad.registered


async def test_hub_drain_sends_agents_to_the_restarted_hub(
    hub_factory: Callable[..., Any], agents: Agents, tmp_path: Path
) -> None:
    data_dir = tmp_path / "hubdata"
    first = await hub_factory(data_dir=data_dir, reconnect_spread_ms=300)
    port = first.hub.port
    client = await agents.start([first.url], await first.agent_token("edge-1"))
    await eventually(lambda: client.registered)
    connection = client.connection
    assert connection is not None
    await first.hub.stop()
    await eventually(lambda: connection.done.done(), message="drained")
    assert connection.done.result()[0] == 1012
    assert connection.after_ms is not None and connection.after_ms <= 300
    # Nothing listens until the second hub starts: refused dials retry within a second
    # and do not grow the wait.
    attempts = client.attempts
    # An attempt clears last_error when it starts: wait for one that has ended.
    await eventually(
        lambda: (
            client.attempts >= attempts + 3
            and client.last_error == "connect: ConnectionRefusedError"
        ),
        20,
        "refused three times",
    )
    assert client.backoff.attempt == 0
    assert client.last_delay is not None and client.last_delay <= 1.0
    second = await hub_factory(data_dir=data_dir, listen=f"127.0.0.1:{port}")
    await eventually(lambda: live(second, "edge-1") is not None, 20, "re-registered")


async def test_shutdown_closes_1000_and_the_agent_goes_offline(
    hub: HubHandle, agents: Agents
) -> None:
    client = await agents.start([hub.url], await hub.agent_token("edge-1"))
    await eventually(lambda: client.registered)
    session = live(hub, "edge-1")
    await agents.stop(client)
    assert session.conn.close_code()[0] == 1000
    record = hub.hub.registry.records["edge-1"]
    await eventually(lambda: record.state == "offline", message="offline")


async def test_doctor_passes_against_a_live_hub_and_explains_refusals(
    hub: HubHandle, tmp_path: Path
) -> None:
    profile = AgentProfile(agent_id="doc-1", platform="linux")
    out = io.StringIO()
    token = await hub.agent_token("doc-1")
    assert await doctor(DoctorOptions(url=hub.url, token=token, profile=profile), out)
    text = out.getvalue()
    for step in ("DNS", "TCP", "upgrade", "credential", "clock"):
        assert f"ok    {step}" in text
    assert "skip  TLS" in text and "skip  proxy" in text and "all checks passed" in text
    assert "register as 'doc-1' would be accepted" in text

    out = io.StringIO()
    assert not await doctor(DoctorOptions(url=hub.url, token="tta_x_y", profile=profile), out)
    assert "FAIL  credential HTTP 401" in out.getvalue()
    assert "tether-hub token create" in out.getvalue()

    other = AgentProfile(agent_id="someone-else")
    out = io.StringIO()
    assert not await doctor(DoctorOptions(url=hub.url, token=token, profile=other), out)
    assert "FAIL  credential" in out.getvalue()
    assert "bound to another agent id" in out.getvalue()
    assert "--agent-id doc-1" in out.getvalue()  # the hint names the bound id

    # Nothing of that registered anything.
    assert "doc-1" not in hub.hub.registry.records
    assert "someone-else" not in hub.hub.registry.records


async def test_simulated_fleet_registers_answers_and_reenrolls_with_keys(
    hub: HubHandle, admin: AdminClient
) -> None:
    enroll = await hub.token("enroll", pattern="sim-*")
    simulation = Simulation(
        SimulationOptions(count=40, token=enroll, rate=400, report_every=0),
        ClientSettings(urls=[hub.url], shutdown_grace=0.5),
    )
    runner = asyncio.ensure_future(simulation.run())
    try:
        await eventually(lambda: simulation.summary()["registered"] == 40, 20, "40 registered")
        records = hub.hub.registry.records
        assert {f"sim-{i:05d}" for i in range(1, 41)} <= set(records)
        assert len({records[f"sim-{i:05d}"].region for i in range(1, 41)}) > 3
        assert all(records[f"sim-{i:05d}"].location is not None for i in range(1, 41))
        data = await admin.request(
            "dispatch", target={"selector": {"agent_id": "sim-*"}}, name="sysinfo"
        )
        assert len(data["command_ids"]) == 40
        for command_id in data["command_ids"]:
            command = await finished(admin, command_id)
            assert command["state"] == "succeeded"
            assert command["result"]["data"]["simulated"] is True
        victims = simulation.clients[:5]
        for client in victims:
            assert client.connection is not None
            client.connection.abort()
        await eventually(
            lambda: all(
                c.registered and live(hub, c.profile.agent_id).principal.kind == "agent"
                for c in victims
            ),
            20,
            "reconnected with agent keys",
        )
    finally:
        await simulation.shutdown()
        await asyncio.wait_for(runner, 20)
    await eventually(lambda: not hub.hub.registry.live, message="all closed")


@pytest.mark.skipif(
    sys.platform != "linux", reason="only Linux loops back all of 127.0.0.0/8; CI runs Linux"
)
async def test_simulated_agents_dial_from_the_source_addresses_given(hub: HubHandle) -> None:
    enroll = await hub.token("enroll", pattern="src-*")
    sources = ("127.0.0.2", "127.0.0.3")
    simulation = Simulation(
        SimulationOptions(count=6, token=enroll, prefix="src-", rate=400, report_every=0,
                          sources=sources),
        ClientSettings(urls=[hub.url], shutdown_grace=0.5),
    )  # fmt: skip
    runner = asyncio.ensure_future(simulation.run())
    try:
        await eventually(lambda: simulation.summary()["registered"] == 6, 20, "6 registered")
        peers = {live(hub, c.profile.agent_id).conn.peer for c in simulation.clients}
        assert peers == set(sources)
    finally:
        await simulation.shutdown()
        await asyncio.wait_for(runner, 20)


async def test_real_agent_process_runs_commands_and_stops_on_sigterm(
    hub: HubHandle, admin: AdminClient, tmp_path: Path
) -> None:
    token = await hub.agent_token("proc-1")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TETHER_")},
        "PYTHONPATH": str(ROOT),
        "TETHER_TOKEN": token,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "run", "--hub", hub.url, "--agent-id", "proc-1",
        "--state-dir", str(tmp_path / "proc"), "--allow-exec", "echo",
        "--label", "site=lab", "--lat", "48.1", "--lon", "11.6",
        env=env, cwd=ROOT, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await eventually(lambda: live(hub, "proc-1") is not None, 20, "registered")
        record = hub.hub.registry.records["proc-1"]
        assert record.labels == {"site": "lab"} and record.location == (48.1, 11.6)
        command_id = await dispatch(admin, "proc-1", "exec", args={"argv": ["echo", "ok"]})
        assert (await finished(admin, command_id))["state"] == "succeeded"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    log = (await proc.stderr.read()).decode()
    assert token not in log
    await eventually(lambda: record.state == "offline", message="offline")


async def test_memory_journal_agent_shares_the_same_core(hub: HubHandle) -> None:
    """A client with an in-memory journal (as simulate uses) registers like any other."""
    profile = AgentProfile(agent_id="mem-1")
    client = AgentClient(
        profile,
        ClientSettings(urls=[hub.url]),
        Credentials(await hub.agent_token("mem-1")),
        Executor(profile, default_registry(), MemoryJournal()),
        HostMetrics(),
    )
    task = asyncio.ensure_future(client.run())
    await eventually(lambda: client.registered)
    await client.shutdown()
    await asyncio.wait_for(task, 10)
