"""`tether-hub` as scripts use it: exact outputs, JSON shapes and exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.conftest import HubHandle
from tests.redis_server import RedisServer
from tests.support import ROOT, RawAgent, online_agent, run_cli, run_cli_async, wait_for


def test_token_create_list_revoke(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    plain = run_cli("token", "create", "--data-dir", data, "--agent", "edge-1")
    assert plain.returncode == 0
    assert plain.stdout.count("\n") == 1 and plain.stdout.startswith("tta_")
    made = run_cli("token", "create", "--data-dir", data, "--enroll", "--ttl", "60", "--uses", "3",
                   "--pattern", "edge-*", "--json")  # fmt: skip
    created = json.loads(made.stdout)
    assert set(created) == {"id", "token"} and created["token"].startswith("tte_")
    admin = run_cli("token", "create", "--data-dir", data, "--admin", "--role", "viewer",
                    "--name", "noc", "--json")  # fmt: skip
    admin_id = json.loads(admin.stdout)["id"]
    listing = json.loads(run_cli("token", "list", "--data-dir", data, "--json").stdout)
    assert len(listing) == 3
    for item in listing:
        assert {"id", "kind", "agent_id", "role", "name", "created_at", "expires_at",
                "uses_left", "revoked"} <= set(item)  # fmt: skip
    assert "tte_" not in json.dumps(listing) and "tta_" not in json.dumps(listing)
    enroll = next(i for i in listing if i["kind"] == "enroll")
    assert (enroll["uses_left"], enroll["expires_at"] is not None) == (3, True)
    assert run_cli("token", "revoke", "--data-dir", data, admin_id).returncode == 0
    listing = json.loads(run_cli("token", "list", "--data-dir", data, "--json").stdout)
    assert next(i for i in listing if i["id"] == admin_id)["revoked"] is True
    missing = run_cli("token", "revoke", "--data-dir", data, "000000000000")
    assert missing.returncode == 1
    # A JWT is revoked by its jti: the revocation is what gets stored.
    jwt = run_cli("token", "revoke", "--data-dir", data, "jwt:batch-7")
    assert (jwt.returncode, jwt.stdout) == (0, "revoked jwt:batch-7\n")
    listing = json.loads(run_cli("token", "list", "--data-dir", data, "--json").stdout)
    assert {"id": "jwt:batch-7", "kind": "jwt", "revoked": True}.items() <= next(
        i for i in listing if i["id"] == "jwt:batch-7"
    ).items()


async def test_token_commands_on_redis_reach_every_hub(
    redis_factory: Callable[..., RedisServer], tmp_path: Path
) -> None:
    """``--redis`` (cluster mode): the credential is where every hub syncs from."""
    from hub.store.redis import RedisStore

    url = redis_factory().url
    hub = RedisStore.from_url(url)
    await hub.open()
    try:
        rev, _ = await hub.credentials_since(0)
        made = await run_cli_async("token", "create", "--redis", url, "--agent", "edge-1", "--json")
        assert made.returncode == 0, made.stderr
        created = json.loads(made.stdout)
        assert created["token"].startswith("tta_")
        rev, changed = await hub.credentials_since(rev)
        assert [(c.id, c.agent_id, c.revoked) for c in changed] == [
            (created["id"], "edge-1", False)
        ]
        listing = await run_cli_async("token", "list", "--redis", url, "--json")
        assert [i["id"] for i in json.loads(listing.stdout)] == [created["id"]]
        revoked = await run_cli_async("token", "revoke", "--redis", url, created["id"])
        assert (revoked.returncode, revoked.stdout) == (0, f"revoked {created['id']}\n")
        _, changed = await hub.credentials_since(rev)
        assert [(c.id, c.revoked) for c in changed] == [(created["id"], True)]
        actions = [e["action"] for e in (await hub.audit_entries({}, 10, None)).items]
        assert actions == ["credential.revoked", "credential.created"]
    finally:
        await hub.close()
    # The configuration file's Redis and key prefix (several clusters on one Redis).
    config = tmp_path / "hub.toml"
    config.write_text(f'[hub]\nredis_url = "{url}"\nredis_prefix = "other"\n')
    made = await run_cli_async("token", "create", "--config", str(config), "--admin", "--role",
                               "viewer", "--json")  # fmt: skip
    assert made.returncode == 0, made.stderr
    other = RedisStore.from_url(url, prefix="other")
    await other.open()
    try:
        assert [c.id for c in await other.credentials()] == [json.loads(made.stdout)["id"]]
    finally:
        await other.close()
    # Nothing answering there: a usage error of one line, the password not shown.
    down = await run_cli_async("token", "list", "--redis", "redis://:hunter2@127.0.0.1:1/0")
    assert down.returncode == 2 and down.stderr.count("\n") == 1, down.stderr
    assert "hunter2" not in down.stderr and "cannot open the store" in down.stderr


def test_usage_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    for args in (
        ("token", "create", "--data-dir", str(tmp_path), "--admin"),
        ("token", "create", "--data-dir", str(tmp_path), "--agent", "bad id"),
        ("agents", "--hub", "ws://127.0.0.1:1", "--token", "x"),
        ("agents", "--token", "x"),
        ("send", "--hub", "ws://127.0.0.1:1", "--token", "x", "ping"),
        (
            "send",
            "--hub",
            "ws://127.0.0.1:1",
            "--token",
            "x",
            "--agent",
            "a",
            "ping",
            "--args",
            "[1]",
        ),
        ("serve", "--data-dir", str(tmp_path), "--client-crl", str(tmp_path / "x.crl")),
    ):
        done = run_cli(*args, env={"TETHER_HUB_URL": "", "TETHER_TOKEN": ""})
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert done.stderr.strip().count("\n") == 0, done.stderr
        assert done.stderr.startswith("tether-hub: ")


async def test_agents_json_and_bad_token(hub: HubHandle) -> None:
    agent = await online_agent(hub, "edge-1", labels={"site": "berlin"})
    token = await hub.admin_token("viewer")
    done = await run_cli_async("agents", "--hub", hub.url, "--token", token, "--json")
    assert done.returncode == 0, done.stderr
    (listed,) = json.loads(done.stdout)
    assert listed["agent_id"] == "edge-1" and listed["state"] == "online"
    assert listed["labels"] == {"site": "berlin"}
    done = await run_cli_async("agents", "--hub", hub.url, "--token", "ttm_000000000000_x")
    assert done.returncode == 2 and "401" in done.stderr
    table = await run_cli_async("agents", "--hub", hub.url, "--token", token)
    assert "edge-1" in table.stdout
    await agent.close()


async def answer_commands(agent: RawAgent, status: str, count: int) -> None:
    for _ in range(count):
        command = await agent.recv_type("command", timeout=20)
        exit_code = 0 if status == "succeeded" else 1
        await agent.send(
            {"type": "result", "command_id": command["command_id"], "status": status,
             "exit_code": exit_code, "data": {"ok": True}}
        )  # fmt: skip


async def test_send_wait_json_and_exit_codes(hub: HubHandle) -> None:
    good = await online_agent(hub, "good", region="eu-central")
    bad = await online_agent(hub, "bad", region="us-east")
    token = await hub.admin_token("operator")
    base = ("send", "--hub", hub.url, "--token", token)

    answering = asyncio.ensure_future(answer_commands(good, "succeeded", 1))
    done = await run_cli_async(*base, "--agent", "good", "ping", "--wait", "--json")
    await answering
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["job"]["state"] == "succeeded"
    assert [c["state"] for c in result["commands"]] == ["succeeded"]

    answering = asyncio.ensure_future(answer_commands(bad, "failed", 1))
    done = await run_cli_async(*base, "--selector", "region=us-*", "ping", "--wait", "--json")
    await answering
    assert done.returncode == 1
    assert json.loads(done.stdout)["commands"][0]["state"] == "failed"

    done = await run_cli_async(*base, "--agent", "ghost", "ping", "--wait", "--json")
    assert done.returncode == 1
    assert json.loads(done.stdout)["error"]["code"] == "not_found"

    done = await run_cli_async(*base, "--agent", "good", "ping")
    assert done.returncode == 0
    assert set(json.loads(done.stdout)) == {"job_id", "command_ids", "refused"}

    viewer = await hub.admin_token("viewer")
    done = await run_cli_async(
        "send", "--hub", hub.url, "--token", viewer, "--agent", "good", "ping"
    )
    assert done.returncode == 2 and "forbidden" in done.stderr
    await good.close()
    await bad.close()


async def test_tail_json_prints_one_event_per_line(hub: HubHandle) -> None:
    token = await hub.admin_token("viewer")
    process = subprocess.Popen(
        [sys.executable, "-m", "hub", "tail", "--hub", hub.url, "--token", token,
         "--topic", "agents", "--json"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        await wait_for(lambda: hub.hub.admins and next(iter(hub.hub.admins)).topics, timeout=20)
        agent = await online_agent(hub, "edge-1")
        assert process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 20)
        event = json.loads(line)
        assert (event["topic"], event["kind"], event["agent"]["agent_id"]) == (
            "agents", "connected", "edge-1",
        )  # fmt: skip
        await agent.close()
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(10)


async def test_jobs_job_alerts_ack_audit(hub_factory) -> None:
    hub = await hub_factory(alert_expected_agents=1)
    agent = await online_agent(hub, "edge-1")
    operator = await hub.admin_token("operator")
    admin = await hub.admin_token("admin")
    answering = asyncio.ensure_future(answer_commands(agent, "succeeded", 1))
    sent = await run_cli_async("send", "--hub", hub.url, "--token", operator, "--agent", "edge-1",
                               "ping", "--wait", "--json")  # fmt: skip
    await answering
    job_id = json.loads(sent.stdout)["job"]["job_id"]
    jobs = json.loads(
        (await run_cli_async("jobs", "--hub", hub.url, "--token", operator, "--json")).stdout
    )
    assert [j["job_id"] for j in jobs] == [job_id]
    job = json.loads(
        (await run_cli_async("job", job_id, "--hub", hub.url, "--token", operator, "--json")).stdout
    )
    assert job["job"]["state"] == "succeeded"
    await agent.close()
    hub.hub.alerts.evaluate()
    await wait_for(lambda: ("no_agents", hub.hub.hub_id) in hub.hub.alerts.open)
    await wait_for(lambda: not hub.hub.alerts._writes)
    alerts = json.loads(
        (await run_cli_async("alerts", "--hub", hub.url, "--token", operator, "--json")).stdout
    )
    (alert,) = [a for a in alerts if a["rule"] == "no_agents"]
    acked = await run_cli_async("ack", alert["alert_id"], "--comment", "looking",
                                "--hub", hub.url, "--token", operator, "--json")  # fmt: skip
    assert acked.returncode == 0 and json.loads(acked.stdout)["state"] == "acknowledged"
    audit = await run_cli_async("audit", "--action", "alert.acknowledged", "--hub", hub.url,
                                "--token", admin, "--json")  # fmt: skip
    assert json.loads(audit.stdout)["entries"][0]["subject"] == alert["alert_id"]
    denied = await run_cli_async("audit", "--hub", hub.url, "--token", operator)
    assert denied.returncode == 2 and "forbidden" in denied.stderr
