"""The agent-channel probe and the doctor built on it: diagnosing changes nothing.

The hub side is driven with the raw ``websockets`` client (tests.support.RawAgent), so the
bytes are exactly the ones docs/protocol.md describes; the doctor side through
``tether-agent doctor``'s own code and command line.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from agent.cli import main
from agent.doctor import DoctorOptions, doctor
from agent.profile import AgentProfile
from agent.state import KeyFile, prepare_state_dir
from hub.protocol.messages import ProbeResult
from hub.protocol.times import parse_time
from tests.conftest import HubHandle
from tests.support import RawAgent, refused_status, run_cli_async, wait_for


async def probe(hub: HubHandle, token: str, **fields: Any) -> tuple[dict[str, Any], int | None]:
    agent = await RawAgent.connect(hub.agent_url, token)
    await agent.send({"type": "probe", **fields})
    answer = await agent.recv_type("probe_result")
    code = await agent.closed()
    ProbeResult.model_validate(answer)  # the one definition of the message
    return answer, code


async def audit(hub: HubHandle, action: str) -> list[dict[str, Any]]:
    await hub.hub.auditor.drain()
    return (await hub.hub.store.audit_entries({"action": action}, 100, None)).items


async def test_probe_with_an_agent_key_answers_its_binding_and_changes_nothing(
    hub: HubHandle,
) -> None:
    key = await hub.agent_token("edge-1")
    answer, code = await probe(hub, key)
    assert code == 1000
    assert answer["agent_id"] == "edge-1" and answer["accepted"] is True
    assert answer["credential"]["kind"] == "agent_key"
    assert answer["credential"]["agent_id"] == "edge-1"
    assert answer["hub_id"] == hub.hub.hub_id and answer["heartbeat_interval"] > 0
    assert abs(time.time() - parse_time(answer["server_time"])) < 5

    answer, _ = await probe(hub, key, agent_id="edge-2")
    assert answer["accepted"] is False
    assert answer["reason"] == "the credential is bound to another agent id"
    assert "edge-1" not in hub.hub.registry.records and "edge-2" not in hub.hub.registry.records
    assert hub.hub.metrics.reconnects == 0


async def test_probe_of_an_enrollment_key_spends_nothing_and_issues_nothing(
    hub: HubHandle,
) -> None:
    enroll = await hub.token("enroll", pattern="edge-*", uses=1)
    credentials = hub.hub.credentials
    before = len(credentials.records)
    answer, _ = await probe(hub, enroll, agent_id="edge-7")
    assert answer["accepted"] is True and answer["spends_use"] is True
    assert answer["credential"]["pattern"] == "edge-*"
    assert answer["credential"]["uses_left"] == 1
    answer, _ = await probe(hub, enroll, agent_id="core-1")
    assert answer["accepted"] is False and "pattern" in answer["reason"]
    answer, _ = await probe(hub, enroll)
    assert answer["accepted"] is None and answer["agent_id"] is None
    assert len(credentials.records) == before  # no key issued
    record = credentials.records[enroll[4:16]]
    assert record.uses_left == 1  # no use spent
    assert "edge-7" not in hub.hub.registry.records  # no agent created

    # Spend the one use for real; the key then readmits only the id it enrolled.
    agent = await RawAgent.connect(hub.agent_url, enroll)
    await agent.register("edge-7")
    await agent.close()
    answer, _ = await probe(hub, enroll, agent_id="edge-8")
    assert answer["accepted"] is False and answer["reason"] == "enrollment key exhausted"
    answer, _ = await probe(hub, enroll, agent_id="edge-7")
    assert answer["accepted"] is True and answer["spends_use"] is False
    answer, _ = await probe(hub, enroll)
    assert "exhausted" in answer["reason"]


async def test_probe_does_not_take_over_a_live_connection(hub: HubHandle) -> None:
    key = await hub.agent_token("edge-1")
    live = await RawAgent.connect(hub.agent_url, key)
    await live.register("edge-1")
    session = hub.hub.registry.live["edge-1"]
    answer, _ = await probe(hub, key, agent_id="edge-1")
    assert answer["accepted"] is True and answer["connected"] is True
    assert hub.hub.registry.live["edge-1"] is session and not session.conn.closed
    entries = await audit(hub, "agent.takeover")
    assert entries == []
    probes = await audit(hub, "agent.probe")
    assert probes and probes[0]["subject"] == "edge-1" and probes[0]["detail"]["accepted"] is True
    await live.close()


async def test_probe_is_refused_at_the_upgrade_like_register(hub: HubHandle) -> None:
    status, _ = await refused_status(hub.agent_url, "tta_000000000000_nope")
    assert status == 401
    key = await hub.agent_token("edge-1")
    record = hub.hub.credentials.records[key[4:16]]
    record.revoked = True
    status, _ = await refused_status(hub.agent_url, key)
    assert status == 403
    admin = await hub.admin_token()
    status, _ = await refused_status(hub.agent_url, admin)
    assert status == 403


async def test_an_invalid_probe_closes_1008_and_probe_after_register_is_invalid(
    hub: HubHandle,
) -> None:
    key = await hub.agent_token("edge-1")
    agent = await RawAgent.connect(hub.agent_url, key)
    await agent.send({"type": "probe", "agent_id": "bad/id"})
    assert await agent.closed() == 1008
    agent = await RawAgent.connect(hub.agent_url, key)
    await agent.register("edge-1")
    await agent.send({"type": "probe"})
    error = await agent.recv_type("error")
    assert error["code"] == "invalid_message"
    await agent.close()


async def test_probe_checks_jwt_claims(hub_factory: Any, tmp_path: Path) -> None:
    secret = tmp_path / "jwt.secret"
    secret.write_text("s" * 40)
    hub = await hub_factory(jwt_secret_file=secret)
    claims = {"sub": "edge-j", "aud": "tether-agent", "exp": time.time() + 600, "region": "eu"}
    token = jwt.encode(claims, "s" * 40, algorithm="HS256")
    answer, _ = await probe(hub, token, region="us")
    assert answer["accepted"] is False and "region" in answer["reason"]
    answer, _ = await probe(hub, token, region="eu")
    assert answer["accepted"] is True and answer["credential"]["kind"] == "jwt"


@pytest.mark.parametrize(
    ("credential", "agent_id", "prepare"),
    [
        ("key", "edge-1", None),
        ("key", "edge-2", None),
        ("enroll-pattern", "edge-3", None),
        ("enroll-pattern", "core-3", None),
        ("enroll-spent", "edge-9", "spend"),
        ("enroll-spent", "edge-4", "spend"),
    ],
)
async def test_probe_predicts_what_register_does(
    hub: HubHandle, credential: str, agent_id: str, prepare: str | None
) -> None:
    if credential == "key":
        token = await hub.agent_token("edge-1")
    else:
        token = await hub.token("enroll", pattern="edge-*", uses=1)
    if prepare == "spend":
        agent = await RawAgent.connect(hub.agent_url, token)
        await agent.register("edge-4")
        await agent.close()
        await wait_for(lambda: "edge-4" not in hub.hub.registry.live, what="gone")
    answer, _ = await probe(hub, token, agent_id=agent_id)
    agent = await RawAgent.connect(hub.agent_url, token)
    await agent.send({"type": "register", "agent_id": agent_id})
    try:
        await agent.recv_type("welcome", timeout=3)
        registered = True
    except Exception:
        registered = False
    await agent.close()
    assert answer["accepted"] is registered


async def test_doctor_with_an_enrollment_key_enrolls_nothing(hub: HubHandle) -> None:
    enroll = await hub.token("enroll", uses=1)
    out = io.StringIO()
    options = DoctorOptions(url=hub.url, token=enroll, profile=AgentProfile(agent_id="new-1"))
    assert await doctor(options, out)
    text = out.getvalue()
    assert "enrollment key" in text and "1 uses left" in text and "spends a use" in text
    assert "new-1" not in hub.hub.registry.records
    assert hub.hub.credentials.records[enroll[4:16]].uses_left == 1


async def test_doctor_cli_reads_the_installed_agent_and_its_saved_key(
    hub: HubHandle, tmp_path: Path
) -> None:
    """On the box: the agent's state dir holds the key it was issued; doctor with no
    --agent-id and no token diagnoses that agent, and passes."""
    state = prepare_state_dir(tmp_path / "state" / "edge-5")
    KeyFile(state).save(await hub.agent_token("edge-5"))
    config = tmp_path / "agent.toml"
    config.write_text(f'hub = "{hub.url}"\nstate_dir = "{state}"\n')
    result = await run_cli_async("agent", "doctor", "--config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "agent key" in result.stdout and f"saved in {state}" in result.stdout
    assert "bound to 'edge-5'" in result.stdout and "ok    clock" in result.stdout
    assert "edge-5" not in hub.hub.registry.records

    # No hub configured in the shell: the hub the installed agent last dialed (its status).
    (state / "status.json").write_text(
        json.dumps({"agent_id": "edge-5", "state": "stopped", "hub_url": hub.url})
    )
    bare = tmp_path / "bare.toml"
    bare.write_text(f'state_dir = "{state}"\n')
    result = await run_cli_async("agent", "doctor", "--config", str(bare))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{hub.url}/ws as agent 'edge-5'" in result.stdout


def test_doctor_without_a_credential_is_a_usage_error(tmp_path: Path, capsys: Any) -> None:
    env = {"XDG_STATE_HOME": str(tmp_path), "TETHER_HUB_URL": "ws://127.0.0.1:1"}
    assert main(["doctor"], env) == 2
    assert "token is required" in capsys.readouterr().err
