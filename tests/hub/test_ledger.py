"""The command ledger through real connections: delivery, redelivery, timeouts, cancel,
expiry, ownership, durability of every transition (PROTOCOL §4.3)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from hub import ledger as ledger_module
from hub.protocol.client import AdminClient, AdminError
from tests.conftest import HubHandle
from tests.support import RawAgent, job_done, online_agent, wait_for


@pytest.fixture
async def admin(hub: HubHandle) -> AsyncIterator[AdminClient]:
    client = AdminClient(hub.url, await hub.admin_token("operator"))
    await client.open()
    yield client
    await client.close()


async def stored_state(hub: HubHandle, command_id: str) -> str:
    command = await hub.hub.store.command(command_id)
    assert command is not None
    return command["state"]


async def test_dispatch_ack_output_result(hub: HubHandle, admin: AdminClient) -> None:
    agent = await online_agent(hub)
    data = await admin.request(
        "dispatch", target={"agent_ids": ["edge-1"]}, name="ping", args={"n": 1}
    )
    assert data["refused"] == []
    (command_id,) = data["command_ids"]
    command = await agent.recv_type("command")
    assert command["command_id"] == command_id
    assert (command["name"], command["args"], command["timeout"]) == ("ping", {"n": 1}, 60)
    await agent.send({"type": "ack", "command_id": command_id})
    await agent.send(
        {
            "type": "output",
            "command_id": command_id,
            "seq": 0,
            "stream": "stdout",
            "data": "hello\n",
        }
    )
    await agent.send(
        {
            "type": "result",
            "command_id": command_id,
            "status": "succeeded",
            "exit_code": 0,
            "data": {"pong": True},
        }
    )
    job = await wait_for(lambda: job_done(admin, data["job_id"]), what="job finished")
    assert job["job"]["state"] == "succeeded"
    (stored,) = job["commands"]
    assert stored["state"] == "succeeded"
    assert stored["result"] == {
        "status": "succeeded",
        "exit_code": 0,
        "data": {"pong": True},
        "error": None,
    }
    assert stored["output_bytes"] == 6
    output = await admin.request("output", command_id=command_id)
    assert output["chunks"] == [{"seq": 0, "stream": "stdout", "data": "hello\n"}]
    await agent.close()


async def test_unknown_and_unsupported_targets_are_refused(
    hub: HubHandle, admin: AdminClient
) -> None:
    agent = await online_agent(hub, capabilities=["ping"])
    data = await admin.request("dispatch", target={"agent_ids": ["edge-1", "ghost"]}, name="ping")
    assert data["refused"] == [{"agent_id": "ghost", "code": "not_found"}]
    with pytest.raises(AdminError) as error:
        await admin.request("dispatch", target={"agent_ids": ["edge-1"]}, name="exec")
    assert error.value.code == "unsupported"
    with pytest.raises(AdminError) as error:
        await admin.request("dispatch", target={"agent_ids": ["ghost"]}, name="ping")
    assert error.value.code == "not_found"
    await agent.close()


async def test_queued_commands_are_delivered_after_welcome_in_order(
    hub: HubHandle, admin: AdminClient
) -> None:
    agent = await online_agent(hub)
    await agent.close()
    await wait_for(lambda: "edge-1" not in hub.hub.registry.live)
    ids = []
    for n in range(3):
        data = await admin.request(
            "dispatch", target={"agent_ids": ["edge-1"]}, name="ping", args={"n": n}
        )
        ids += data["command_ids"]
    assert [await stored_state(hub, i) for i in ids] == ["queued"] * 3
    agent = await RawAgent.connect(hub.agent_url, await hub.agent_token("edge-1"))
    await agent.send({"type": "register", "agent_id": "edge-1", "capabilities": ["ping"]})
    assert (await agent.recv())["type"] == "welcome"
    received = [(await agent.recv())["command_id"] for _ in ids]
    assert received == ids
    await wait_for(lambda: all(hub.hub.ledger.commands[i].state == "sent" for i in ids))
    await agent.close()


async def test_sent_but_unanswered_commands_are_redelivered_with_the_same_id(
    hub: HubHandle, admin: AdminClient
) -> None:
    agent = await online_agent(hub)
    data = await admin.request("dispatch", target={"agent_ids": ["edge-1"]}, name="ping")
    first = await agent.recv_type("command")
    await agent.send({"type": "ack", "command_id": first["command_id"]})
    await wait_for(lambda: hub.hub.ledger.commands[first["command_id"]].state == "acked")
    await agent.close()
    agent = await online_agent(hub)
    again = await agent.recv_type("command")
    assert again == first
    await agent.send({"type": "result", "command_id": first["command_id"], "status": "succeeded"})
    await wait_for(lambda: job_done(admin, data["job_id"]))
    await agent.close()


async def test_states_never_move_backwards_and_repeats_are_harmless(
    hub: HubHandle, admin: AdminClient
) -> None:
    agent = await online_agent(hub)
    data = await admin.request("dispatch", target={"agent_ids": ["edge-1"]}, name="ping")
    command_id = (await agent.recv_type("command"))["command_id"]
    await agent.send(
        {"type": "result", "command_id": command_id, "status": "failed", "exit_code": 3}
    )
    await wait_for(lambda: job_done(admin, data["job_id"]))
    # A late ack and a second, different result change nothing and are not errors.
    await agent.send({"type": "ack", "command_id": command_id})
    await agent.send({"type": "result", "command_id": command_id, "status": "succeeded"})
    await agent.send({"type": "heartbeat"})
    await hub.hub.ledger.drain()
    command = await hub.hub.store.command(command_id)
    assert command["state"] == "failed"
    assert command["result"]["exit_code"] == 3
    await agent.close()


async def test_another_agent_cannot_answer_a_command(hub: HubHandle, admin: AdminClient) -> None:
    owner = await online_agent(hub, "edge-1")
    thief = await online_agent(hub, "edge-2")
    await admin.request("dispatch", target={"agent_ids": ["edge-1"]}, name="ping")
    command_id = (await owner.recv_type("command"))["command_id"]
    await thief.send({"type": "result", "command_id": command_id, "status": "succeeded"})
    error = await thief.recv_type("error")
    assert (error["code"], error["ref"]) == ("unknown_command", command_id)
    assert hub.hub.ledger.commands[command_id].state == "sent"
    await owner.close()
    await thief.close()


async def test_execution_timeout_after_ack(hub_factory) -> None:
    hub = await hub_factory(timeout_grace=0.1)
    admin = await AdminClient(hub.url, await hub.admin_token("operator")).open()
    agent = await online_agent(hub)
    data = await admin.request(
        "dispatch", target={"agent_ids": ["edge-1"]}, name="ping", timeout=0.2
    )
    command_id = (await agent.recv_type("command"))["command_id"]
    await agent.send({"type": "ack", "command_id": command_id})
    cancel = await agent.recv_type("cancel", timeout=5)
    assert cancel["command_id"] == command_id
    detail = await wait_for(lambda: job_done(admin, data["job_id"]))
    assert detail["commands"][0]["state"] == "timed_out"
    await agent.close()
    await admin.close()


async def test_queued_command_expires(hub: HubHandle, admin: AdminClient) -> None:
    agent = await online_agent(hub)
    await agent.close()
    await wait_for(lambda: "edge-1" not in hub.hub.registry.live)
    data = await admin.request("dispatch", target={"agent_ids": ["edge-1"]}, name="ping", ttl=0.2)
    detail = await wait_for(lambda: job_done(admin, data["job_id"]), timeout=5)
    assert detail["commands"][0]["state"] == "expired"
    assert detail["job"]["state"] == "failed"
    agent = await online_agent(hub)
    await agent.send({"type": "heartbeat"})
    with pytest.raises(TimeoutError):
        await agent.recv_type("command", timeout=0.3)
    await agent.close()


async def test_cancel_queued_is_immediate(hub: HubHandle, admin: AdminClient) -> None:
    agent = await online_agent(hub)
    await agent.close()
    await wait_for(lambda: "edge-1" not in hub.hub.registry.live)
    data = await admin.request("dispatch", target={"agent_ids": ["edge-1"]}, name="ping")
    reply = await admin.request("cancel", job_id=data["job_id"])
    assert reply["cancelled"] == data["command_ids"]
    detail = await wait_for(lambda: job_done(admin, data["job_id"]))
    assert detail["job"]["state"] == "cancelled"


async def test_cancel_in_flight_reaches_the_agent_and_its_result_decides(
    hub: HubHandle, admin: AdminClient
) -> None:
    agent = await online_agent(hub)
    data = await admin.request("dispatch", target={"agent_ids": ["edge-1"]}, name="ping")
    command_id = (await agent.recv_type("command"))["command_id"]
    await agent.send({"type": "ack", "command_id": command_id})
    await wait_for(lambda: hub.hub.ledger.commands[command_id].state == "acked")
    reply = await admin.request("cancel", command_id=command_id)
    assert reply["requested"] == [command_id]
    assert (await agent.recv_type("cancel"))["command_id"] == command_id
    await agent.send({"type": "result", "command_id": command_id, "status": "cancelled"})
    detail = await wait_for(lambda: job_done(admin, data["job_id"]))
    assert detail["commands"][0]["state"] == "cancelled"
    await agent.close()


async def test_cancel_in_flight_with_agent_offline_is_immediate_and_final(
    hub: HubHandle, admin: AdminClient
) -> None:
    agent = await online_agent(hub)
    data = await admin.request("dispatch", target={"agent_ids": ["edge-1"]}, name="ping")
    command_id = (await agent.recv_type("command"))["command_id"]
    await agent.close()
    await wait_for(lambda: "edge-1" not in hub.hub.registry.live)
    reply = await admin.request("cancel", command_id=command_id)
    assert reply["cancelled"] == [command_id]
    await wait_for(lambda: job_done(admin, data["job_id"]))
    agent = await online_agent(hub)
    with pytest.raises(TimeoutError):
        await agent.recv_type("command", timeout=0.3)
    await agent.close()


async def test_every_transition_is_audited_with_the_dispatcher(
    hub: HubHandle, admin: AdminClient
) -> None:
    agent = await online_agent(hub)
    data = await admin.request("dispatch", target={"agent_ids": ["edge-1"]}, name="ping")
    command_id = (await agent.recv_type("command"))["command_id"]
    await agent.send({"type": "ack", "command_id": command_id})
    await agent.send({"type": "result", "command_id": command_id, "status": "succeeded"})
    await wait_for(lambda: job_done(admin, data["job_id"]))
    await hub.hub.ledger.drain()
    entries = (await hub.hub.store.audit_entries({"subject": command_id}, 100, None)).items
    actions = [e["action"] for e in reversed(entries)]
    assert actions == ["command.queued", "command.sent", "command.acked", "command.succeeded"]
    assert {e["actor"] for e in entries} == {"admin:test-operator"}
    await agent.close()


async def test_draining_agent_gets_no_new_commands_until_ok(
    hub: HubHandle, admin: AdminClient
) -> None:
    agent = await online_agent(hub)
    await agent.send({"type": "heartbeat", "status": "draining"})
    await wait_for(lambda: "edge-1" in hub.hub.ledger.draining)
    data = await admin.request("dispatch", target={"agent_ids": ["edge-1"]}, name="ping")
    with pytest.raises(TimeoutError):
        await agent.recv_type("command", timeout=0.3)
    await agent.send({"type": "heartbeat", "status": "ok"})
    command = await agent.recv_type("command")
    assert command["command_id"] == data["command_ids"][0]
    await agent.close()


async def test_the_result_that_ends_a_job_is_stored_with_the_job_and_its_audit(
    hub: HubHandle, admin: AdminClient
) -> None:
    """One commit, announced after it: when the console sees the result, the job's row and
    the audit of the whole exchange are already in the store (two fsyncs a round trip)."""
    agent = await online_agent(hub)
    await admin.request("subscribe", topics=["commands"])
    events = admin.events()
    store = hub.hub.store
    await store.flush()
    commits = store.commits
    data = await admin.request("dispatch", target={"agent_ids": ["edge-1"]}, name="ping")
    (command_id,) = data["command_ids"]
    command = await agent.recv_type("command")
    await hub.hub.ledger.drain()  # `sent` is held a few ms for the result: store it now
    # The job, its command `queued` and the request's audit together, then `sent`.
    assert store.commits - commits == 2
    commits = store.commits
    # No ack first: it would be held for the result too, but only for a few ms.
    await agent.send({"type": "result", "command_id": command_id, "status": "succeeded"})
    async with asyncio.timeout(10):
        while True:
            event = await anext(events)
            if event.get("topic") == "commands" and event["command"]["state"] == "succeeded":
                break
    # `succeeded`, the job's row and `job.finished`: one commit, before the event.
    assert store.commits - commits == 1
    # Read at once, without waiting for anything else the hub might still write.
    job = await hub.hub.store.job(data["job_id"])
    assert job is not None and job["job"]["state"] == "succeeded"
    page = await hub.hub.store.audit_entries({"subject": command["command_id"]}, 100, None)
    assert {e["action"] for e in page.items} >= {"command.queued", "command.succeeded"}
    page = await hub.hub.store.audit_entries({"subject": data["job_id"]}, 100, None)
    assert {e["action"] for e in page.items} == {"job.dispatch", "job.finished"}
    page = await hub.hub.store.audit_entries({"action": "admin.dispatch"}, 100, None)
    assert [e["detail"]["name"] for e in page.items] == ["ping"]
    await agent.close()


async def test_a_refused_dispatch_is_still_audited(hub: HubHandle, admin: AdminClient) -> None:
    with pytest.raises(AdminError):
        await admin.request("dispatch", target={"agent_ids": ["ghost"]}, name="ping")
    await hub.hub.auditor.drain()
    page = await hub.hub.store.audit_entries({"action": "admin.dispatch"}, 100, None)
    assert len(page.items) == 1


async def test_a_job_bigger_than_a_slice_is_delivered_stored_and_announced_once_each(
    hub: HubHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Delivery, writes and announcements of a big job go a slice per turn of the loop; with
    slices of 2 and 3, seven targets take every sliced path a job to the whole fleet takes."""
    monkeypatch.setattr(ledger_module, "DELIVERY_SLICE", 2)
    monkeypatch.setattr(ledger_module, "FLUSH_SLICE", 3)
    events: dict[str, list[str]] = {}

    def on_event(event: dict[str, Any]) -> None:
        command = event.get("command")
        if event.get("topic") == "commands" and command:
            events.setdefault(command["command_id"], []).append(command["state"])

    watcher = AdminClient(hub.url, await hub.admin_token("operator"), on_event=on_event)
    await watcher.open()
    await watcher.request("subscribe", topics=["commands"])
    agents = [await online_agent(hub, f"edge-{n}") for n in range(1, 8)]
    data = await watcher.request(
        "dispatch", target={"selector": {"agent_id": "edge-*"}}, name="ping"
    )
    ids = set(data["command_ids"])
    assert len(ids) == 7
    for agent in agents:
        command = await agent.recv_type("command")
        assert command["command_id"] in ids
        await agent.send(
            {"type": "result", "command_id": command["command_id"], "status": "succeeded"}
        )
    job = await wait_for(lambda: job_done(watcher, data["job_id"]), what="job finished")
    assert job["job"]["state"] == "succeeded"
    assert {c["command_id"]: c["state"] for c in job["commands"]} == dict.fromkeys(ids, "succeeded")
    await wait_for(
        lambda: set(events) == ids and all(s[-1] == "succeeded" for s in events.values())
    )
    for states in events.values():
        # Announced in the order stored, never twice (events of one command may coalesce).
        order = ["queued", "sent", "acked", "succeeded"]
        assert [order.index(s) for s in states] == sorted({order.index(s) for s in states})
    for agent in agents:
        await agent.close()
    await watcher.close()


async def test_transitions_of_one_command_in_two_slices_are_announced_once(
    hub: HubHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command's ``sent`` still waiting to be written when its result comes: two
    transitions of one record, flushed a slice each. The first slice already stores (and
    shows) the final state, so only the slice holding the command's last transition
    announces it (it was announced twice)."""
    monkeypatch.setattr(ledger_module, "FLUSH_SLICE", 1)
    monkeypatch.setattr(ledger_module, "NON_TERMINAL_HOLD", 30.0)
    events: list[tuple[str, str]] = []

    def on_event(event: dict[str, Any]) -> None:
        command = event.get("command")
        if event.get("topic") == "commands" and command:
            events.append((command["command_id"], command["state"]))

    watcher = AdminClient(hub.url, await hub.admin_token("operator"), on_event=on_event)
    await watcher.open()
    await watcher.request("subscribe", topics=["commands"])
    agent = await online_agent(hub, "edge-1")
    for status in ("succeeded", "failed"):
        await watcher.request("dispatch", target={"agent_ids": ["edge-1"]}, name="ping")
        command = await agent.recv_type("command")
        await agent.send({"type": "result", "command_id": command["command_id"], "status": status})
        done = (command["command_id"], status)
        await wait_for(lambda done=done: done in events, what=f"{status} announced")
    # Events come in order: a repeat of the first command's would come before the second's
    # result; a repeat of the second's, before the answer to this request.
    await watcher.request("agents")
    assert len(events) == len(set(events)) == 4, events
    await agent.close()
    await watcher.close()


async def test_a_job_running_across_a_restart_keeps_counts_that_agree_with_its_commands(
    hub_factory: Any, tmp_path: Any
) -> None:
    """A running job's row is written when it is accepted and when it finishes; a hub that
    restarts in between rebuilds the job's counts from its commands as stored."""
    data_dir = tmp_path / "restarted"
    first = await hub_factory(data_dir=data_dir)
    admin = await AdminClient(first.url, await first.admin_token("operator")).open()
    keys = {f"edge-{n}": await first.agent_token(f"edge-{n}") for n in range(3)}
    agents = {}
    for agent_id, key in keys.items():
        agents[agent_id] = await RawAgent.connect(first.agent_url, key)
        await agents[agent_id].register(agent_id)
    data = await admin.request("dispatch", target={"selector": {"agent_id": "edge-*"}}, name="ping")
    commands = {a: (await agent.recv_type("command"))["command_id"] for a, agent in agents.items()}
    await agents["edge-0"].send(
        {"type": "result", "command_id": commands["edge-0"], "status": "succeeded"}
    )
    await wait_for(lambda: commands["edge-0"] not in first.hub.ledger.commands)
    await admin.close()
    await first.hub.stop()
    second = await hub_factory(data_dir=data_dir)
    admin = await AdminClient(second.url, await second.admin_token("operator")).open()
    live = await admin.request("job", job_id=data["job_id"])
    assert live["job"]["counts"] == {"succeeded": 1, "sent": 2}
    for agent_id in ("edge-1", "edge-2"):
        agent = await RawAgent.connect(second.agent_url, keys[agent_id])
        await agent.register(agent_id)
        command = await agent.recv_type("command")
        assert command["command_id"] == commands[agent_id]
        await agent.send(
            {"type": "result", "command_id": command["command_id"], "status": "succeeded"}
        )
        agents[agent_id] = agent
    detail = await wait_for(lambda: job_done(admin, data["job_id"]))
    assert detail["job"]["counts"] == {"succeeded": 3}
    assert detail["job"]["state"] == "succeeded"
    await admin.close()
