"""The store contract, on every backend: the same tests for the SQLite and the Redis store.

Written against :class:`hub.store.base.Store` only, through the ``store`` and
``store_backend`` fixtures (``tests/hub/store_backends.py``), parametrized over both
backends. What one backend does on its own is tested beside it (``test_store.py`` for
SQLite, ``test_store_redis.py`` for Redis).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from hub.model import AgentRecord, AlertRecord, CommandRecord, CredentialRecord, JobRecord
from hub.protocol.times import format_time
from hub.store.base import AuditEntry, Store, StoreUnavailable
from tests.hub.store_backends import StoreBackend, store, store_backend

__all__ = ["store", "store_backend"]  # fixtures, used by name

T0 = 1_700_000_000.0
_ids = itertools.count(1)


def credential(kind: str = "agent", **fields: Any) -> CredentialRecord:
    values: dict[str, Any] = {
        "id": f"{kind[:3]}_{next(_ids):06d}",
        "kind": kind,
        "secret_hash": b"h" * 32,
        "created_at": T0,
    }
    values.update(fields)
    return CredentialRecord(**values)


def job_with(
    agents: list[str], seq: int = 1, job_id: str | None = None
) -> tuple[JobRecord, list[CommandRecord]]:
    job_id = job_id or f"job-{next(_ids):06d}"
    job = JobRecord(
        job_id=job_id,
        name="exec",
        args={"argv": ["true"]},
        target={"agent_ids": agents},
        total=len(agents),
        created_at=T0,
        timeout=60.0,
        ttl=600.0,
        dispatched_by="admin:test",
        counts={"queued": len(agents)},
        updated_at=T0,
        spec={"max_concurrency": None, "max_errors": None},
    )
    commands = [
        CommandRecord(
            command_id=f"{job_id}-c{index}",
            job_id=job_id,
            agent_id=agent,
            name="exec",
            args={"argv": ["true"]},
            timeout=60.0,
            issued_at=T0,
            expires_at=T0 + 600,
            seq=seq + index,
            updated_at=T0,
            dispatched_by="admin:test",
        )
        for index, agent in enumerate(agents)
    ]
    return job, commands


def finish(command: CommandRecord, state: str = "succeeded") -> None:
    command.state = state
    command.sent_at = command.acked_at = command.updated_at = T0 + 5
    command.result = {"status": state, "exit_code": 0, "data": {"out": "ok"}, "error": None}


async def every_page(fetch: Any, limit: int) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    before = None
    while True:
        page = await fetch(limit, before)
        assert len(page.items) <= limit
        items.extend(page.items)
        if page.next is None:
            return items
        before = page.next


# -- lifecycle -----------------------------------------------------------------------


async def test_closed_store_refuses_work(store_backend: StoreBackend) -> None:
    closed = store_backend.make()
    await closed.open()
    assert await closed.ping()
    await closed.close()
    assert not await closed.ping()
    with pytest.raises(StoreUnavailable):
        await closed.audit([AuditEntry(ts=T0, action="late")])
    with pytest.raises(StoreUnavailable):
        await closed.add_credential(credential())
    with pytest.raises(StoreUnavailable):
        await closed.credentials()
    with pytest.raises(StoreUnavailable):
        closed.save_agent(AgentRecord(agent_id="late"))
    await closed.close()


async def test_everything_written_is_read_back_by_the_next_store(
    store_backend: StoreBackend,
) -> None:
    first = store_backend.make()
    await first.open()
    await first.add_credential(credential(id="agt_kept"))
    job, commands = job_with(["a1"])
    await first.add_job(job, commands)
    first.save_agent(AgentRecord(agent_id="a1", region="eu", first_seen=T0))
    first.add_output(commands[0].command_id, 1, "stdout", "hello")
    await first.close()  # batched writes included

    second = store_backend.make()
    await second.open()
    try:
        assert [c.id for c in await second.credentials()] == ["agt_kept"]
        assert [a.agent_id for a in await second.load_agents()] == ["a1"]
        jobs, unfinished, top = await second.unfinished()
        assert [j.job_id for j in jobs] == [job.job_id]
        assert [c.command_id for c in unfinished] == [commands[0].command_id]
        assert top == commands[0].seq
        assert await second.command_output(commands[0].command_id) == [
            {"seq": 1, "stream": "stdout", "data": "hello"}
        ]
    finally:
        await second.close()


async def test_flush_waits_for_batched_writes(store: Store) -> None:
    store.save_agent(AgentRecord(agent_id="a1"))
    store.save_agent(AgentRecord(agent_id="a2"))
    await store.flush()
    assert sorted(a.agent_id for a in await store.load_agents()) == ["a1", "a2"]


async def test_concurrent_writes_all_land(store: Store) -> None:
    for round_ in range(4):
        await asyncio.gather(
            *(store.audit([AuditEntry(ts=T0 + n, action=f"r{round_}-{n}")]) for n in range(250))
        )
    entries = await every_page(lambda n, b: store.audit_entries({}, n, b), 400)
    assert len({e["action"] for e in entries}) == len(entries) == 1000


async def test_a_refused_write_leaves_the_others_alone(store: Store) -> None:
    results = await asyncio.gather(
        store.audit([AuditEntry(ts=T0, action="one")]),
        store.add_credential(credential(id="agt_dup", secret_hash=b"x" * 32)),
        store.add_credential(credential(id="agt_dup", secret_hash=b"y" * 32)),
        store.audit([AuditEntry(ts=T0 + 1, action="two")]),
        return_exceptions=True,
    )
    assert isinstance(results[2], Exception) and not isinstance(results[2], StoreUnavailable)
    assert [r for i, r in enumerate(results) if i != 2] == [None, None, None]
    page = await store.audit_entries({}, 10, None)
    assert [e["action"] for e in page.items] == ["two", "one"]
    assert [c.secret_hash for c in await store.credentials()] == [b"x" * 32]


# -- credentials ---------------------------------------------------------------------


async def test_credentials_read_back_oldest_first(store: Store) -> None:
    enroll = credential(
        "enroll", id="enr_all", secret_hash=bytes(range(32)), pattern="edge-*", uses_left=3,
        expires_at=T0 + 3600.25, issued_by="cli", name="batch",
    )  # fmt: skip
    admin = credential("admin", id="adm_one", role="operator", name="ops")
    early = credential(id="agt_early", agent_id="edge-9", created_at=T0 - 1)
    for record in (enroll, admin, early):
        await store.add_credential(record)
    stored = await store.credentials()
    assert [c.id for c in stored] == ["agt_early", "enr_all", "adm_one"]
    got = stored[1]
    assert (got.kind, got.secret_hash, got.pattern, got.uses_left, got.expires_at) == (
        "enroll", bytes(range(32)), "edge-*", 3, T0 + 3600.25,
    )  # fmt: skip
    assert (got.issued_by, got.name, got.revoked, got.rev) == ("cli", "batch", False, enroll.rev)
    assert stored[2].role == "operator" and stored[0].agent_id == "edge-9"
    assert 0 < enroll.rev < admin.rev < early.rev


async def test_credentials_since_returns_the_changes_in_order(store: Store) -> None:
    await store.add_credential(credential(id="agt_one"))
    rev, first = await store.credentials_since(0)
    assert [c.id for c in first] == ["agt_one"] and rev == first[0].rev
    assert await store.credentials_since(rev) == (rev, [])
    await store.add_credential(credential(id="agt_two"))
    revoked = await store.revoke_credential("agt_one")
    assert revoked is not None and revoked.revoked
    newest, changed = await store.credentials_since(rev)
    assert [c.id for c in changed] == ["agt_two", "agt_one"]
    assert changed[1].revoked and newest == changed[1].rev == revoked.rev > rev


async def test_revocation(store: Store) -> None:
    await store.add_credential(credential(id="agt_rev"))
    first = await store.revoke_credential("agt_rev")
    assert first is not None and first.revoked
    again = await store.revoke_credential("agt_rev")
    assert again is not None and again.rev == first.rev
    assert await store.revoke_credential("agt_unknown") is None
    jwt = await store.revoke_credential("jwt:batch-7")
    assert jwt is not None and (jwt.kind, jwt.revoked, jwt.issued_by) == ("jwt", True, "revocation")
    stored = {c.id: c for c in await store.credentials()}
    assert stored["agt_rev"].revoked and stored["jwt:batch-7"].revoked


async def test_enrollment_spends_one_use_per_new_agent(store: Store) -> None:
    await store.add_credential(credential("enroll", id="enr_two", uses_left=2))
    first = credential(id="agt_e1", agent_id="edge-1")
    assert await store.enroll("enr_two", "edge-1", first, [])
    assert first.rev > 0
    # The same agent again (it lost its key): no use spent, its old key revoked.
    again = credential(id="agt_e1b", agent_id="edge-1")
    assert await store.enroll("enr_two", "edge-1", again, ["agt_e1"])
    assert await store.enroll("enr_two", "edge-2", credential(id="agt_e2", agent_id="edge-2"), [])
    spent = credential(id="agt_e3", agent_id="edge-3")
    assert not await store.enroll("enr_two", "edge-3", spent, [])
    stored = {c.id: c for c in await store.credentials()}
    assert stored["enr_two"].uses_left == 0
    assert stored["agt_e1"].revoked and not stored["agt_e1b"].revoked
    assert "agt_e2" in stored and "agt_e3" not in stored
    _, changed = await store.credentials_since(first.rev)
    assert [c.id for c in changed] == ["agt_e1", "agt_e1b", "enr_two", "agt_e2"]


async def test_enrollment_refuses_bad_keys(store: Store) -> None:
    await store.add_credential(credential("enroll", id="enr_old", expires_at=T0 + 10))
    await store.add_credential(credential("enroll", id="enr_rev"))
    await store.revoke_credential("enr_rev")
    late = credential(id="agt_late", agent_id="edge-1", created_at=T0 + 10)
    assert not await store.enroll("enr_old", "edge-1", late, [])
    assert not await store.enroll("enr_rev", "edge-1", credential(agent_id="edge-1"), [])
    assert not await store.enroll("enr_none", "edge-1", credential(agent_id="edge-1"), [])
    assert {c.id for c in await store.credentials()} == {"enr_old", "enr_rev"}
    in_time = credential(id="agt_ok", agent_id="edge-1", created_at=T0 + 9.5)
    assert await store.enroll("enr_old", "edge-1", in_time, [])


# -- agents and sessions -------------------------------------------------------------


async def test_agents_read_back_as_written(store: Store) -> None:
    record = AgentRecord(
        agent_id="edge-1", platform="linux", region="eu-west", version="1.2.3",
        hostname="edge-1.example", labels={"role": "db"}, capabilities=("exec", "ping"),
        location=(48.85, 2.35), status="ok", hub_id="hub-a", first_seen=T0,
        connected_at=T0 + 1.5, last_seen=T0 + 2.25, metrics={"cpu": 0.5, "load1": 1.0},
        enrolled_by="enr_x",
    )  # fmt: skip
    store.save_agent(record)
    store.save_agent(AgentRecord(agent_id="bare"))
    await store.flush()
    loaded = {a.agent_id: a for a in await store.load_agents()}
    got = loaded["edge-1"]
    for name in (
        "platform", "region", "version", "hostname", "labels", "capabilities", "location",
        "status", "hub_id", "first_seen", "connected_at", "last_seen", "metrics", "enrolled_by",
    ):  # fmt: skip
        assert getattr(got, name) == getattr(record, name), name
    bare = loaded["bare"]
    assert (bare.labels, bare.capabilities, bare.location, bare.metrics) == ({}, (), None, {})
    # Saved again, it is replaced.
    record.connected_at, record.hub_id = None, "hub-b"
    store.save_agent(record)
    await store.flush()
    again = {a.agent_id: a for a in await store.load_agents()}["edge-1"]
    assert (again.connected_at, again.hub_id) == (None, "hub-b")


async def test_heartbeats_update_agents_and_keep_samples(store: Store) -> None:
    record = AgentRecord(agent_id="edge-1", first_seen=T0)
    store.save_agent(record)
    for n in range(3):
        record.last_seen, record.status, record.metrics = T0 + 60 * n, "ok", {"cpu": n / 10}
        store.save_heartbeats([record], samples=n != 1)
        await store.flush()
    (loaded,) = await store.load_agents()
    assert (loaded.last_seen, loaded.metrics) == (T0 + 120, {"cpu": 0.2})
    history = await store.agent_history("edge-1")
    assert history["heartbeats"] == [
        {"time": format_time(T0 + 120), "status": "ok", "metrics": {"cpu": 0.2}},
        {"time": format_time(T0), "status": "ok", "metrics": {"cpu": 0.0}},
    ]
    assert len((await store.agent_history("edge-1", limit=1))["heartbeats"]) == 1
    store.prune(T0 + 60)
    await store.flush()
    history = await store.agent_history("edge-1")
    assert [h["time"] for h in history["heartbeats"]] == [format_time(T0 + 120)]


async def test_a_batch_of_heartbeats_for_many_agents(store: Store) -> None:
    records = [
        AgentRecord(agent_id=f"sim-{n:04d}", first_seen=T0, last_seen=T0 + n, status="ok",
                    metrics={"cpu_percent": float(n), "mem_percent": 50.0})
        for n in range(1500)
    ]  # fmt: skip
    for record in records:
        store.save_agent(record)
    store.save_heartbeats(records, samples=True)
    await store.flush()
    loaded = {a.agent_id: a for a in await store.load_agents()}
    assert len(loaded) == 1500
    assert loaded["sim-1499"].metrics == {"cpu_percent": 1499.0, "mem_percent": 50.0}
    history = await store.agent_history("sim-0042")
    assert history["heartbeats"] == [
        {"time": format_time(T0 + 42), "status": "ok",
         "metrics": {"cpu_percent": 42.0, "mem_percent": 50.0}}
    ]  # fmt: skip


async def test_sessions_newest_first(store: Store) -> None:
    store.open_session("s1", "edge-1", "hub-a", "10.0.0.1:5000", "agt_1", T0)
    store.close_session("s1", T0 + 30, 4001, "replaced")
    store.open_session("s2", "edge-1", "hub-b", "10.0.0.1:5001", None, T0 + 31)
    store.open_session("s3", "edge-2", "hub-a", "10.0.0.2:5000", None, T0 + 40)
    await store.flush()
    store.close_session("s3", T0 + 50, 1000, "bye")
    await store.flush()
    assert (await store.agent_history("edge-1"))["sessions"] == [
        {
            "session_id": "s2", "hub_id": "hub-b", "peer": "10.0.0.1:5001",
            "connected_at": format_time(T0 + 31), "ended_at": None,
            "close_code": None, "close_reason": None,
        },
        {
            "session_id": "s1", "hub_id": "hub-a", "peer": "10.0.0.1:5000",
            "connected_at": format_time(T0), "ended_at": format_time(T0 + 30),
            "close_code": 4001, "close_reason": "replaced",
        },
    ]  # fmt: skip
    (closed,) = (await store.agent_history("edge-2"))["sessions"]
    assert (closed["ended_at"], closed["close_code"]) == (format_time(T0 + 50), 1000)
    assert len((await store.agent_history("edge-1", limit=1))["sessions"]) == 1
    assert await store.agent_history("nobody") == {"heartbeats": [], "sessions": []}


# -- ledger --------------------------------------------------------------------------


async def test_a_job_is_stored_with_its_commands_and_audit(store: Store) -> None:
    job, commands = job_with(["a1", "a2", "a3"], seq=10)
    entry = AuditEntry(T0, "job.dispatch", "admin:test", job.job_id, None, {"n": 3}, "hub-a")
    await store.add_job(job, commands, [entry])
    stored = await store.job(job.job_id)
    assert stored == {"job": job.view(), "commands": [c.view() for c in commands]}
    assert await store.command(commands[1].command_id) == commands[1].view()
    assert await store.command("nope") is None and await store.job("nope") is None
    jobs, unfinished, top = await store.unfinished()
    assert [(j.job_id, j.spec, j.counts) for j in jobs] == [(job.job_id, job.spec, job.counts)]
    assert [c.command_id for c in unfinished] == [c.command_id for c in commands]
    assert top == 12
    page = await store.audit_entries({"subject": job.job_id}, 10, None)
    assert [e["action"] for e in page.items] == ["job.dispatch"]


async def test_transitions_results_and_finished_jobs(store: Store) -> None:
    job, commands = job_with(["a1", "a2", "a3"])
    await store.add_job(job, commands)
    commands[0].state, commands[0].sent_at, commands[0].updated_at = "sent", T0 + 1, T0 + 1
    await store.save_commands([commands[0]])
    jobs, unfinished, _ = await store.unfinished()
    assert jobs[0].counts == {"sent": 1, "queued": 2}  # from the commands' stored states
    assert [c.state for c in unfinished] == ["sent", "queued", "queued"]
    finish(commands[0])
    finish(commands[1], "failed")
    finish(commands[2], "cancelled")
    commands[1].output_bytes, commands[1].truncated = 2048, True
    job.state, job.updated_at = "partial", T0 + 5
    job.counts = {"succeeded": 1, "failed": 1, "cancelled": 1}
    entry = AuditEntry(T0 + 5, "job.finished", None, job.job_id, None, {"state": "partial"})
    await store.save_commands(commands, [entry], [job])
    stored = await store.job(job.job_id)
    assert stored is not None and stored["job"] == job.view()
    assert stored["commands"] == [c.view() for c in commands]
    assert await store.unfinished() == ([], [], commands[-1].seq)
    assert [e["action"] for e in (await store.audit_entries({}, 10, None)).items] == [
        "job.finished"
    ]


async def test_saving_a_command_never_stored_changes_nothing(store: Store) -> None:
    _, (ghost,) = job_with(["a1"])
    await store.save_commands([ghost])
    assert await store.command(ghost.command_id) is None


async def test_writes_of_one_command_land_in_order(store: Store) -> None:
    job, (command,) = job_with(["a1"])
    await store.add_job(job, [command])
    writes = []
    for state in ("sent", "acked", "succeeded"):
        command.state = state
        writes.append(store.save_commands([command]))
    await asyncio.gather(*writes)
    assert (await store.command(command.command_id) or {})["state"] == "succeeded"


async def test_output_chunks_in_order_repeats_ignored(store: Store) -> None:
    job, (command,) = job_with(["a1"])
    await store.add_job(job, [command])
    for seq, stream, data in [(2, "stderr", "b"), (1, "stdout", "a"), (2, "stdout", "dup")]:
        store.add_output(command.command_id, seq, stream, data)
    store.add_output(command.command_id, 10, "stdout", "c")
    await store.flush()
    assert await store.command_output(command.command_id) == [
        {"seq": 1, "stream": "stdout", "data": "a"},
        {"seq": 2, "stream": "stderr", "data": "b"},
        {"seq": 10, "stream": "stdout", "data": "c"},
    ]
    assert await store.command_output("nope") == []


async def test_listings_page_newest_first_by_insertion(store: Store) -> None:
    made = []
    for n in range(5):
        job, commands = job_with(["a1", "a2"], seq=1 + 2 * n)
        await store.add_job(job, commands)
        made.append((job, commands))
    finish(made[0][1][0])
    await store.save_commands([made[0][1][0]])  # an update does not move it
    newest = [c.command_id for _, commands in reversed(made) for c in reversed(commands)]
    listed = await every_page(lambda n, b: store.commands({}, n, b), 3)
    assert [c["command_id"] for c in listed] == newest
    jobs = await every_page(lambda n, b: store.jobs({}, n, b), 2)
    assert [j["job_id"] for j in jobs] == [job.job_id for job, _ in reversed(made)]
    whole = await store.commands({}, 10, None)
    assert len(whole.items) == 10 and whole.next is None
    by_agent = await every_page(lambda n, b: store.commands({"agent_id": "a2"}, n, b), 2)
    assert [c["command_id"] for c in by_agent] == newest[::2]


async def test_listings_filter(store: Store) -> None:
    job, commands = job_with(["a1", "a2", "a3"])
    other, others = job_with(["a1"], seq=10)
    await store.add_job(job, commands)
    await store.add_job(other, others)
    finish(commands[0])
    finish(commands[1], "failed")
    await store.save_commands(commands[:2])

    async def ids(filter: dict[str, Any]) -> list[str]:
        return [c["command_id"] for c in (await store.commands(filter, 50, None)).items]

    assert await ids({"job_id": job.job_id}) == [c.command_id for c in reversed(commands)]
    assert await ids({"job_id": [job.job_id, other.job_id], "agent_id": "a1"}) == [
        others[0].command_id, commands[0].command_id
    ]  # fmt: skip
    assert await ids({"agent_id": "a1"}) == [others[0].command_id, commands[0].command_id]
    assert await ids({"state": ["succeeded", "failed"]}) == [
        commands[1].command_id, commands[0].command_id
    ]  # fmt: skip
    assert await ids({"state": "queued"}) == [others[0].command_id, commands[2].command_id]
    assert await ids({"agent_id": "a1", "state": "queued"}) == [others[0].command_id]
    assert await ids({"command_id": [commands[2].command_id, "nope"]}) == [commands[2].command_id]
    assert await ids({"name": "exec", "dispatched_by": "admin:nobody"}) == []
    running = await store.jobs({"state": "running", "name": "exec"}, 10, None)
    assert [j["job_id"] for j in running.items] == [other.job_id, job.job_id]
    assert (await store.jobs({"job_id": job.job_id}, 10, None)).items[0]["total"] == 3
    page = await store.commands({"command_id": [c.command_id for c in commands]}, 2, None)
    assert len(page.items) == 2 and page.next is not None
    rest = await store.commands({"command_id": [c.command_id for c in commands]}, 2, page.next)
    assert [c["command_id"] for c in rest.items] == [commands[0].command_id] and rest.next is None


@pytest.mark.parametrize(
    ("filter", "before"),
    [
        ({"nope": "x"}, None),
        ({"state": True}, None),
        ({"state": []}, None),
        ({"state": [{"x": 1}]}, None),
        ({"state": 1.5}, None),
        ({}, "not-a-cursor"),
    ],
)
async def test_bad_filters_and_cursors_are_value_errors(
    store: Store, filter: dict[str, Any], before: str | None
) -> None:
    for listing in (store.commands, store.jobs, store.alerts, store.audit_entries):
        with pytest.raises(ValueError):
            await listing(filter, 10, before)


# -- audit ---------------------------------------------------------------------------


async def test_audit_entries_newest_first_and_filtered(store: Store) -> None:
    await store.audit(
        [
            AuditEntry(T0, "admin.dispatch", "admin:ops", "job-1", "10.0.0.9", {"n": 1}, "hub-a"),
            AuditEntry(T0 + 1, "credential.revoked", "cli", "agt_x", None, None, "hub-b"),
        ]
    )
    page = await store.audit_entries({}, 10, None)
    assert page.next is None
    second, first = page.items
    assert isinstance(first["id"], str) and first["id"] != second["id"]
    assert {k: v for k, v in first.items() if k != "id"} == {
        "time": format_time(T0), "hub_id": "hub-a", "action": "admin.dispatch",
        "actor": "admin:ops", "subject": "job-1", "source": "10.0.0.9", "detail": {"n": 1},
    }  # fmt: skip
    for filter, expected in [
        ({"action": "credential.revoked"}, [second]),
        ({"actor": "admin:ops"}, [first]),
        ({"subject": ["job-1", "agt_x"]}, [second, first]),
        ({"source": "10.0.0.9"}, [first]),
        ({"hub_id": "hub-b"}, [second]),
        ({"hub_id": "hub-c"}, []),
    ]:
        assert (await store.audit_entries(filter, 10, None)).items == expected, filter


async def test_audit_pages_without_gaps_or_repeats(store: Store) -> None:
    await store.audit([AuditEntry(T0 + n, f"a{n}") for n in range(25)])
    actions = [e["action"] for e in await every_page(lambda n, b: store.audit_entries({}, n, b), 7)]
    assert actions == [f"a{n}" for n in reversed(range(25))]
    odd = await every_page(
        lambda n, b: store.audit_entries({"action": [f"a{k}" for k in range(1, 25, 2)]}, n, b), 5
    )
    assert [e["action"] for e in odd] == [f"a{n}" for n in reversed(range(1, 25, 2))]


# -- alerts --------------------------------------------------------------------------


def alert(subject: str, state: str = "firing", **fields: Any) -> AlertRecord:
    values: dict[str, Any] = {
        "alert_id": f"al-{next(_ids):06d}", "rule": "agent_offline", "severity": "warning",
        "subject": subject, "first_seen": T0, "last_seen": T0, "message": f"{subject} gone",
        "state": state,
    }  # fmt: skip
    values.update(fields)
    return AlertRecord(**values)


async def test_alerts_update_in_place_and_list(store: Store) -> None:
    first, second, third = alert("edge-1"), alert("edge-2"), alert("edge-3", severity="critical")
    for record in (first, second, third):
        await store.save_alert(record)
    first.state, first.acknowledged_by, first.acknowledged_at = "acknowledged", "admin:ops", T0
    first.comment = "looking"
    await store.save_alert(first)
    second.state, second.resolved_at = "resolved", T0 + 60
    await store.save_alert(second)
    open_ = {a.alert_id: a for a in await store.open_alerts()}
    assert set(open_) == {first.alert_id, third.alert_id}
    got = open_[first.alert_id]
    assert (got.state, got.acknowledged_by, got.acknowledged_at, got.comment) == (
        "acknowledged", "admin:ops", T0, "looking",
    )  # fmt: skip
    listed = await every_page(lambda n, b: store.alerts({}, n, b), 2)
    assert [a["alert_id"] for a in listed] == [third.alert_id, second.alert_id, first.alert_id]
    assert listed[1] == second.view()
    resolved = await store.alerts({"state": "resolved"}, 10, None)
    assert [a["alert_id"] for a in resolved.items] == [second.alert_id]
    unresolved = await store.alerts({"state": ["firing", "acknowledged"]}, 10, None)
    assert [a["alert_id"] for a in unresolved.items] == [third.alert_id, first.alert_id]
    critical = await store.alerts({"severity": "critical", "rule": "agent_offline"}, 10, None)
    assert [a["subject"] for a in critical.items] == ["edge-3"]
    assert (await store.alerts({"alert_id": first.alert_id}, 10, None)).items == [first.view()]
