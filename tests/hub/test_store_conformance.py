"""The store contract: what every :class:`hub.store.base.Store` must do, whichever backend.

These tests talk to the ``Store`` interface only, through the ``store`` fixture, which is
parametrized over every backend in ``conftest.STORE_BACKENDS``. What one backend does on its
own (SQLite's WAL, its group commit, its migrations) is tested in ``test_store_sqlite.py``.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import orjson
import pytest

from hub.model import AgentRecord, AlertRecord, CommandRecord, CredentialRecord, JobRecord
from hub.protocol.times import format_time
from hub.store.base import AuditEntry, Store, StoreUnavailable
from hub.store.retention import Retention
from tests.hub.conftest import StoreBackend

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
    agents: list[str], job_id: str | None = None, seq: int = 1, **fields: Any
) -> tuple[JobRecord, list[CommandRecord]]:
    job_id = job_id or f"job-{next(_ids):06d}"
    job = JobRecord(
        job_id=job_id,
        name="exec",
        args={"argv": ["true"]},
        target={"agents": agents},
        total=len(agents),
        created_at=T0,
        timeout=60.0,
        ttl=600.0,
        dispatched_by="admin:test",
        counts={"queued": len(agents)},
        updated_at=T0,
        spec={"max_concurrency": None, "max_errors": None},
        **fields,
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


def finish(command: CommandRecord, state: str = "succeeded", at: float = T0 + 5) -> None:
    command.state = state
    command.sent_at = command.acked_at = command.updated_at = at
    command.result = {"status": state, "exit_code": 0, "data": {"out": "ok"}, "error": None}


def alert(subject: str, state: str = "firing", **fields: Any) -> AlertRecord:
    values: dict[str, Any] = {
        "alert_id": f"al-{next(_ids):06d}",
        "rule": "agent_offline",
        "severity": "warning",
        "subject": subject,
        "first_seen": T0,
        "last_seen": T0,
        "message": f"{subject} is offline",
        "state": state,
    }
    values.update(fields)
    return AlertRecord(**values)


async def all_pages(fetch: Any, limit: int) -> list[dict[str, Any]]:
    """Every item of a listing, following cursors; each page at most ``limit`` long."""
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


async def test_an_open_store_answers_and_a_closed_one_refuses(store_backend: StoreBackend) -> None:
    store = store_backend.make()
    await store.open()
    assert await store.ping()
    await store.close()
    assert not await store.ping()
    with pytest.raises(StoreUnavailable):
        await store.audit([AuditEntry(ts=T0, action="late")])
    with pytest.raises(StoreUnavailable):
        await store.add_credential(credential())
    with pytest.raises(StoreUnavailable):
        await store.credentials()
    with pytest.raises(StoreUnavailable):
        store.save_agent(AgentRecord(agent_id="late"))
    await store.close()  # closing again is harmless


async def test_what_was_written_is_there_after_a_restart(store_backend: StoreBackend) -> None:
    """close() stores every pending write, batched ones included; a new store sees them."""
    first = store_backend.make()
    await first.open()
    await first.add_credential(credential(id="agt_restart"))
    job, commands = job_with(["a1"])
    await first.add_job(job, commands)
    first.save_agent(AgentRecord(agent_id="a1", region="eu-west", first_seen=T0))
    first.add_output(commands[0].command_id, 1, "stdout", "hello")
    await first.close()

    second = store_backend.make()
    await second.open()
    try:
        assert [c.id for c in await second.credentials()] == ["agt_restart"]
        assert [a.agent_id for a in await second.load_agents()] == ["a1"]
        jobs, unfinished, top = await second.unfinished()
        assert [j.job_id for j in jobs] == [job.job_id]
        assert [c.command_id for c in unfinished] == [commands[0].command_id]
        assert top == commands[0].seq
        output = await second.command_output(commands[0].command_id)
        assert output == [{"seq": 1, "stream": "stdout", "data": "hello"}]
    finally:
        await second.close()


async def test_flush_waits_for_batched_writes(store: Store) -> None:
    store.save_agent(AgentRecord(agent_id="a1"))
    store.save_agent(AgentRecord(agent_id="a2"))
    await store.flush()
    assert sorted(a.agent_id for a in await store.load_agents()) == ["a1", "a2"]


async def test_many_concurrent_writes_all_land(store: Store) -> None:
    for round_ in range(5):
        await asyncio.gather(
            *(store.audit([AuditEntry(ts=T0 + n, action=f"r{round_}-{n}")]) for n in range(300))
        )
    actions = [e["action"] for e in await all_pages(
        lambda limit, before: store.audit_entries({}, limit, before), 500
    )]  # fmt: skip
    assert len(actions) == 1500 and len(set(actions)) == 1500


async def test_one_failing_write_does_not_undo_the_others(store: Store) -> None:
    record = credential(id="agt_dup", secret_hash=b"x" * 32)
    duplicate = credential(id="agt_dup", secret_hash=b"y" * 32)
    results = await asyncio.gather(
        store.audit([AuditEntry(ts=T0, action="one")]),
        store.add_credential(record),
        store.add_credential(duplicate),  # the same id again
        store.audit([AuditEntry(ts=T0 + 1, action="two")]),
        return_exceptions=True,
    )
    assert isinstance(results[2], Exception)
    assert not isinstance(results[2], StoreUnavailable)  # refused, not "try again later"
    assert [r for i, r in enumerate(results) if i != 2] == [None, None, None]
    page = await store.audit_entries({}, 10, None)
    assert [e["action"] for e in page.items] == ["two", "one"]
    assert [c.secret_hash for c in await store.credentials()] == [b"x" * 32]


# -- credentials ---------------------------------------------------------------------


async def test_a_credential_reads_back_as_written(store: Store) -> None:
    record = credential(
        "enroll",
        id="enr_all",
        secret_hash=bytes(range(32)),
        pattern="edge-*",
        uses_left=3,
        expires_at=T0 + 3600,
        issued_by="cli",
        name="batch",
    )
    await store.add_credential(record)
    admin = credential("admin", id="adm_one", role="operator", name="ops")
    await store.add_credential(admin)
    stored = {c.id: c for c in await store.credentials()}
    assert list(stored) == ["enr_all", "adm_one"]  # oldest first
    got = stored["enr_all"]
    assert (got.kind, got.secret_hash, got.pattern, got.uses_left) == (
        "enroll", bytes(range(32)), "edge-*", 3,
    )  # fmt: skip
    assert (got.expires_at, got.issued_by, got.name, got.revoked) == (
        T0 + 3600,
        "cli",
        "batch",
        False,
    )
    assert stored["adm_one"].role == "operator"
    assert got.rev > 0 and stored["adm_one"].rev > got.rev


async def test_credentials_since_a_revision_are_the_changes_after_it(store: Store) -> None:
    await store.add_credential(credential(id="agt_one"))
    rev, first = await store.credentials_since(0)
    assert [c.id for c in first] == ["agt_one"]
    assert await store.credentials_since(rev) == (rev, [])
    await store.add_credential(credential(id="agt_two"))
    revoked = await store.revoke_credential("agt_one")
    assert revoked is not None and revoked.revoked
    newest, changed = await store.credentials_since(rev)
    assert [c.id for c in changed] == ["agt_two", "agt_one"]  # in the order they changed
    assert changed[-1].revoked and newest == changed[-1].rev > rev


async def test_revoking(store: Store) -> None:
    await store.add_credential(credential(id="agt_rev"))
    first = await store.revoke_credential("agt_rev")
    assert first is not None and first.revoked
    again = await store.revoke_credential("agt_rev")
    assert again is not None and again.rev == first.rev  # twice is a no-op
    assert await store.revoke_credential("agt_unknown") is None
    # A JWT is never stored, so its revocation is: never unknown.
    jwt = await store.revoke_credential("jwt:batch-7")
    assert jwt is not None and (jwt.kind, jwt.revoked) == ("jwt", True)
    stored = {c.id: c for c in await store.credentials()}
    assert stored["agt_rev"].revoked and stored["jwt:batch-7"].revoked


async def test_enrollment_spends_a_use_per_new_agent(store: Store) -> None:
    await store.add_credential(credential("enroll", id="enr_two", uses_left=2))
    assert await store.enroll("enr_two", "edge-1", credential(id="agt_e1", agent_id="edge-1"), [])
    # The same agent again (it lost its key): no use spent, the old key replaced.
    assert await store.enroll(
        "enr_two", "edge-1", credential(id="agt_e1b", agent_id="edge-1"), ["agt_e1"]
    )
    assert await store.enroll("enr_two", "edge-2", credential(id="agt_e2", agent_id="edge-2"), [])
    assert not await store.enroll(
        "enr_two", "edge-3", credential(id="agt_e3", agent_id="edge-3"), []
    )
    stored = {c.id: c for c in await store.credentials()}
    assert stored["enr_two"].uses_left == 0
    assert stored["agt_e1"].revoked and not stored["agt_e1b"].revoked
    assert "agt_e2" in stored and "agt_e3" not in stored


async def test_enrollment_refuses_revoked_expired_and_unknown_keys(store: Store) -> None:
    await store.add_credential(credential("enroll", id="enr_old", expires_at=T0 + 10))
    await store.add_credential(credential("enroll", id="enr_rev"))
    await store.revoke_credential("enr_rev")
    late = credential(id="agt_late", agent_id="edge-1", created_at=T0 + 11)
    assert not await store.enroll("enr_old", "edge-1", late, [])
    assert not await store.enroll("enr_rev", "edge-1", credential(agent_id="edge-1"), [])
    assert not await store.enroll("enr_none", "edge-1", credential(agent_id="edge-1"), [])
    assert {c.id for c in await store.credentials()} == {"enr_old", "enr_rev"}


# -- agents and sessions -----------------------------------------------------------


async def test_an_agent_reads_back_as_written(store: Store) -> None:
    record = AgentRecord(
        agent_id="edge-1",
        platform="linux",
        region="eu-west",
        version="1.2.3",
        hostname="edge-1.example",
        labels={"role": "db"},
        capabilities=("exec", "ping"),
        location=(48.85, 2.35),
        status="ok",
        hub_id="hub-a",
        first_seen=T0,
        connected_at=T0 + 1,
        last_seen=T0 + 2,
        metrics={"cpu": 0.5},
        enrolled_by="enr_x",
    )
    store.save_agent(record)
    store.save_agent(AgentRecord(agent_id="bare"))
    await store.flush()
    loaded = {a.agent_id: a for a in await store.load_agents()}
    got = loaded["edge-1"]
    for field in (
        "platform", "region", "version", "hostname", "labels", "capabilities", "location",
        "status", "hub_id", "first_seen", "connected_at", "last_seen", "metrics", "enrolled_by",
    ):  # fmt: skip
        assert getattr(got, field) == getattr(record, field), field
    bare = loaded["bare"]
    assert (bare.labels, bare.capabilities, bare.location, bare.metrics) == ({}, (), None, {})


async def test_heartbeats_update_agents_and_keep_samples(store: Store) -> None:
    record = AgentRecord(agent_id="edge-1", first_seen=T0)
    store.save_agent(record)
    for n in range(3):
        # A batch may read the record when it is written (the latest values then): each
        # batch here is flushed before the record changes again.
        record.last_seen, record.status, record.metrics = T0 + 60 * n, "ok", {"cpu": n / 10}
        store.save_heartbeats([record], samples=n != 1)  # the middle one: no sample
        await store.flush()
    (loaded,) = await store.load_agents()
    assert (loaded.last_seen, loaded.metrics) == (T0 + 120, {"cpu": 0.2})
    history = await store.agent_history("edge-1")
    assert [h["time"] for h in history["heartbeats"]] == [format_time(T0 + 120), format_time(T0)]
    assert history["heartbeats"][0] == {
        "time": format_time(T0 + 120), "status": "ok", "metrics": {"cpu": 0.2}
    }  # fmt: skip
    assert len((await store.agent_history("edge-1", limit=1))["heartbeats"]) == 1
    store.prune(T0 + 60)
    await store.flush()
    history = await store.agent_history("edge-1")
    assert [h["time"] for h in history["heartbeats"]] == [format_time(T0 + 120)]


async def test_sessions_are_listed_newest_first(store: Store) -> None:
    store.open_session("s1", "edge-1", "hub-a", "10.0.0.1:5000", "agt_1", T0)
    store.close_session("s1", T0 + 30, 4001, "replaced")
    store.open_session("s2", "edge-1", "hub-b", "10.0.0.1:5001", None, T0 + 31)
    store.open_session("s3", "edge-2", "hub-a", "10.0.0.2:5000", None, T0 + 40)
    await store.flush()
    sessions = (await store.agent_history("edge-1"))["sessions"]
    assert sessions == [
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
    assert await store.agent_history("nobody") == {"heartbeats": [], "sessions": []}


# -- ledger ------------------------------------------------------------------------


async def test_a_job_and_its_commands_are_stored_together(store: Store) -> None:
    job, commands = job_with(["a1", "a2", "a3"], seq=10)
    entries = [AuditEntry(T0, "job.dispatch", "admin:test", job.job_id, None, {"targets": 3})]
    await store.add_job(job, commands, entries)
    stored = await store.job(job.job_id)
    assert stored is not None
    assert stored["job"] == job.view()
    assert stored["commands"] == [c.view() for c in commands]  # in seq order
    assert await store.command(commands[1].command_id) == commands[1].view()
    assert await store.command("nope") is None and await store.job("nope") is None
    jobs, unfinished, top = await store.unfinished()
    assert [j.job_id for j in jobs] == [job.job_id]
    assert jobs[0].spec == job.spec and jobs[0].counts == job.counts
    assert [c.command_id for c in unfinished] == [c.command_id for c in commands]
    assert top == 12
    page = await store.audit_entries({"subject": job.job_id}, 10, None)
    assert [e["action"] for e in page.items] == ["job.dispatch"]


async def test_transitions_results_and_the_finished_job_are_stored(store: Store) -> None:
    job, commands = job_with(["a1", "a2"])
    await store.add_job(job, commands)
    commands[0].state, commands[0].sent_at, commands[0].updated_at = "sent", T0 + 1, T0 + 1
    await store.save_commands([commands[0]])
    finish(commands[0])
    finish(commands[1], "failed")
    commands[1].output_bytes, commands[1].truncated = 2048, True
    job.state, job.counts, job.updated_at = "failed", {"succeeded": 1, "failed": 1}, T0 + 5
    entries = [AuditEntry(T0 + 5, "job.finished", None, job.job_id, None, {"state": "failed"})]
    await store.save_commands(commands, entries, [job])
    stored = await store.job(job.job_id)
    assert stored is not None
    assert stored["job"]["state"] == "failed"
    assert stored["job"]["counts"] == {"succeeded": 1, "failed": 1}
    assert stored["commands"] == [c.view() for c in commands]
    assert stored["commands"][1]["truncated"] and stored["commands"][1]["output_bytes"] == 2048
    jobs, unfinished, top = await store.unfinished()
    assert (jobs, unfinished, top) == ([], [], commands[-1].seq)
    assert [e["action"] for e in (await store.audit_entries({}, 10, None)).items] == [
        "job.finished"
    ]


async def test_writes_of_one_command_land_in_the_order_made(store: Store) -> None:
    job, (command,) = job_with(["a1"])
    await store.add_job(job, [command])
    writes = []
    for state in ("sent", "acked", "succeeded"):
        command.state = state
        writes.append(store.save_commands([command]))
    await asyncio.gather(*writes)
    assert (await store.command(command.command_id) or {})["state"] == "succeeded"


async def test_output_is_kept_per_chunk_in_order(store: Store) -> None:
    job, (command,) = job_with(["a1"])
    await store.add_job(job, [command])
    for seq, stream, data in [(2, "stderr", "b"), (1, "stdout", "a"), (2, "stdout", "dup")]:
        store.add_output(command.command_id, seq, stream, data)
    await store.flush()
    assert await store.command_output(command.command_id) == [
        {"seq": 1, "stream": "stdout", "data": "a"},
        {"seq": 2, "stream": "stderr", "data": "b"},  # a repeated chunk is ignored
    ]
    assert await store.command_output("nope") == []


async def test_command_and_job_listings_page_newest_first(store: Store) -> None:
    made: list[tuple[JobRecord, list[CommandRecord]]] = []
    for n in range(5):
        job, commands = job_with(["a1", "a2"], seq=1 + 2 * n)
        await store.add_job(job, commands)
        made.append((job, commands))
    finish(made[0][1][0])
    await store.save_commands([made[0][1][0]])  # an update does not move it
    newest_first = [c.command_id for _, commands in reversed(made) for c in reversed(commands)]
    listed = await all_pages(lambda limit, before: store.commands({}, limit, before), 3)
    assert [c["command_id"] for c in listed] == newest_first
    jobs = await all_pages(lambda limit, before: store.jobs({}, limit, before), 2)
    assert [j["job_id"] for j in jobs] == [job.job_id for job, _ in reversed(made)]
    one_page = await store.commands({}, 10, None)
    assert len(one_page.items) == 10 and one_page.next is None


async def test_command_and_job_listings_filter(store: Store) -> None:
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
    assert await ids({"agent_id": "a1"}) == [others[0].command_id, commands[0].command_id]
    assert await ids({"state": ["succeeded", "failed"]}) == [
        commands[1].command_id, commands[0].command_id
    ]  # fmt: skip
    assert await ids({"agent_id": "a1", "state": "queued"}) == [others[0].command_id]
    assert await ids({"command_id": "nope"}) == []
    jobs = await store.jobs({"state": "running", "name": "exec"}, 10, None)
    assert [j["job_id"] for j in jobs.items] == [other.job_id, job.job_id]
    assert (await store.jobs({"job_id": job.job_id}, 10, None)).items[0]["total"] == 3


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
async def test_a_bad_filter_or_cursor_is_a_value_error(
    store: Store, filter: dict[str, Any], before: str | None
) -> None:
    for listing in (store.commands, store.jobs, store.alerts, store.audit_entries):
        with pytest.raises(ValueError):
            await listing(filter, 10, before)


# -- audit -------------------------------------------------------------------------


async def test_audit_entries_read_back_newest_first(store: Store) -> None:
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
    assert second["detail"] is None and second["hub_id"] == "hub-b"
    for filter, expected in [
        ({"action": "credential.revoked"}, [second]),
        ({"actor": "admin:ops"}, [first]),
        ({"subject": ["job-1", "agt_x"]}, [second, first]),
        ({"source": "10.0.0.9"}, [first]),
        ({"hub_id": "hub-b"}, [second]),
    ]:
        assert (await store.audit_entries(filter, 10, None)).items == expected, filter


async def test_audit_listing_pages_without_gaps_or_repeats(store: Store) -> None:
    await store.audit([AuditEntry(T0 + n, f"a{n}") for n in range(25)])
    actions = [
        e["action"]
        for e in await all_pages(lambda limit, before: store.audit_entries({}, limit, before), 7)
    ]
    assert actions == [f"a{n}" for n in reversed(range(25))]


# -- alerts ------------------------------------------------------------------------


async def test_alerts_update_in_place_and_list_by_state(store: Store) -> None:
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
    # Listed in the order raised: an update does not move an alert to the top.
    listed = await all_pages(lambda limit, before: store.alerts({}, limit, before), 2)
    assert [a["alert_id"] for a in listed] == [third.alert_id, second.alert_id, first.alert_id]
    assert listed[1] == second.view()
    resolved = await store.alerts({"state": "resolved"}, 10, None)
    assert [a["alert_id"] for a in resolved.items] == [second.alert_id]
    critical = await store.alerts({"severity": "critical", "rule": "agent_offline"}, 10, None)
    assert [a["subject"] for a in critical.items] == ["edge-3"]


# -- more of the contract: what a second backend showed needed saying ------------------


async def test_credentials_are_listed_by_creation_time(store: Store) -> None:
    await store.add_credential(credential(id="agt_late", created_at=T0 + 1))
    await store.add_credential(credential(id="agt_early", created_at=T0 - 1))
    await store.add_credential(credential(id="agt_same", created_at=T0 + 1))
    assert [c.id for c in await store.credentials()] == ["agt_early", "agt_late", "agt_same"]


async def test_enrollment_before_the_expiry_is_accepted(store: Store) -> None:
    await store.add_credential(credential("enroll", id="enr_soon", expires_at=T0 + 10.5))
    issued = credential(id="agt_in_time", agent_id="edge-1", created_at=T0 + 10.25)
    assert await store.enroll("enr_soon", "edge-1", issued, [])
    assert issued.rev > 0
    rev, changed = await store.credentials_since(issued.rev - 1)
    assert [c.id for c in changed] == ["agt_in_time"] and rev == issued.rev


async def test_an_agent_saved_again_is_replaced(store: Store) -> None:
    record = AgentRecord(agent_id="edge-1", region="eu", hub_id="hub-a", connected_at=T0 + 1.5)
    store.save_agent(record)
    await store.flush()
    record.connected_at, record.hub_id, record.labels = None, "hub-b", {"tier": "edge"}
    store.save_agent(record)
    await store.flush()
    (loaded,) = await store.load_agents()
    assert (loaded.connected_at, loaded.hub_id, loaded.labels) == (None, "hub-b", {"tier": "edge"})


async def test_heartbeats_of_many_agents_in_one_batch(store: Store) -> None:
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
    assert (loaded["sim-1499"].last_seen, loaded["sim-1499"].metrics) == (
        T0 + 1499, {"cpu_percent": 1499.0, "mem_percent": 50.0},
    )  # fmt: skip
    assert (await store.agent_history("sim-0042"))["heartbeats"] == [
        {"time": format_time(T0 + 42), "status": "ok",
         "metrics": {"cpu_percent": 42.0, "mem_percent": 50.0}}
    ]  # fmt: skip


async def test_a_session_is_closed_by_a_later_batch(store: Store) -> None:
    store.open_session("s1", "edge-1", "hub-a", "10.0.0.1:5000", None, T0)
    store.open_session("s2", "edge-1", "hub-a", "10.0.0.1:5001", None, T0 + 10)
    await store.flush()
    store.close_session("s1", T0 + 5, 1000, "bye")
    await store.flush()
    sessions = (await store.agent_history("edge-1"))["sessions"]
    assert [(s["session_id"], s["ended_at"], s["close_code"]) for s in sessions] == [
        ("s2", None, None), ("s1", format_time(T0 + 5), 1000),
    ]  # fmt: skip
    assert len((await store.agent_history("edge-1", limit=1))["sessions"]) == 1


async def test_a_running_jobs_counts_are_its_commands_as_stored(store: Store) -> None:
    job, commands = job_with(["a1", "a2", "a3"])
    await store.add_job(job, commands)
    commands[0].state = "sent"
    finish(commands[1], "failed")
    await store.save_commands(commands[:2])
    jobs, unfinished, _ = await store.unfinished()
    assert jobs[0].counts == {"sent": 1, "failed": 1, "queued": 1}
    assert [(c.command_id, c.state) for c in unfinished] == [
        (commands[0].command_id, "sent"), (commands[2].command_id, "queued"),
    ]  # fmt: skip


async def test_saving_a_command_never_stored_changes_nothing(store: Store) -> None:
    _, (ghost,) = job_with(["a1"])
    await store.save_commands([ghost])
    assert await store.command(ghost.command_id) is None
    assert (await store.commands({}, 10, None)).items == []


async def test_filtered_listings_page_too(store: Store) -> None:
    job, commands = job_with(["a1", "a2", "a3"])
    other, others = job_with(["a1", "a2"], seq=10)
    await store.add_job(job, commands)
    await store.add_job(other, others)

    async def ids(filter: dict[str, Any], limit: int = 2) -> list[str]:
        listed = await all_pages(lambda n, b: store.commands(filter, n, b), limit)
        return [c["command_id"] for c in listed]

    assert await ids({"agent_id": "a2"}, 1) == [others[1].command_id, commands[1].command_id]
    assert await ids({"job_id": [job.job_id, other.job_id], "agent_id": "a1"}) == [
        others[0].command_id, commands[0].command_id
    ]  # fmt: skip
    assert await ids({"state": "queued"}) == [
        c.command_id for c in [*reversed(others), *reversed(commands)]
    ]
    wanted = [commands[0].command_id, commands[2].command_id, others[1].command_id, "nope"]
    assert await ids({"command_id": wanted}, 1) == [wanted[2], wanted[1], wanted[0]]
    assert [j["job_id"] for j in await all_pages(
        lambda n, b: store.jobs({"job_id": [job.job_id, other.job_id]}, n, b), 1
    )] == [other.job_id, job.job_id]  # fmt: skip


async def test_alerts_filtered_by_id_and_by_unresolved_states(store: Store) -> None:
    first, second, third = alert("edge-1"), alert("edge-2", "acknowledged"), alert("edge-3")
    for record in (first, second, third):
        await store.save_alert(record)
    third.state, third.resolved_at = "resolved", T0 + 60
    await store.save_alert(third)
    unresolved = await store.alerts({"state": ["firing", "acknowledged"]}, 10, None)
    assert [a["alert_id"] for a in unresolved.items] == [second.alert_id, first.alert_id]
    assert (await store.alerts({"alert_id": second.alert_id}, 10, None)).items == [second.view()]


async def test_audit_filters_with_many_values_page(store: Store) -> None:
    await store.audit([AuditEntry(T0 + n, f"a{n}") for n in range(25)])
    odd = [f"a{n}" for n in range(1, 25, 2)]
    listed = await all_pages(lambda n, b: store.audit_entries({"action": odd}, n, b), 5)
    assert [e["action"] for e in listed] == list(reversed(odd))


# -- retention (issue 19) --------------------------------------------------------------


async def test_retention_prunes_finished_jobs_outputs_alerts_and_audit_only(
    store: Store, tmp_path: Any
) -> None:
    """What ``prune_expired`` removes is gone from every read; what it keeps (a running
    job, its commands and their output, whatever their age) reads as before."""
    day = 86_400.0

    async def finished_job(at: float, *agents: str) -> tuple[JobRecord, list[CommandRecord]]:
        job, commands = job_with(list(agents), seq=int(at) % 1_000_000)
        await store.add_job(job, commands)
        for command in commands:
            store.add_output(command.command_id, 1, "stdout", "out")
            finish(command, at=at)
        job.state, job.updated_at, job.counts = "succeeded", at, {"succeeded": len(agents)}
        await store.save_commands(commands, (), [job])
        return job, commands

    old, old_commands = await finished_job(T0, "p1", "p2")
    recent, _ = await finished_job(T0 + 20 * day, "p1")
    running, running_commands = job_with(["p1", "p3"], seq=900)
    await store.add_job(running, running_commands)
    store.add_output(running_commands[0].command_id, 1, "stdout", "kept")
    finish(running_commands[0], at=T0)
    await store.save_commands([running_commands[0]])
    resolved = alert("p1", state="resolved", resolved_at=T0)
    firing = alert("p2")
    await store.save_alert(resolved)
    await store.save_alert(firing)
    await store.audit([AuditEntry(T0 + n, "old.thing", subject=f"s{n}") for n in range(3)])
    await store.audit([AuditEntry(ts=T0 + 400 * day, action="new.thing")])
    await store.flush()
    export = tmp_path / "audit.jsonl"
    retention = Retention()

    await store.prune_expired(retention, T0 + 8 * day, export)
    assert await store.command_output(old_commands[0].command_id) == []
    assert (await store.job(old.job_id)) is not None
    assert await store.command_output(running_commands[0].command_id) != []

    await store.prune_expired(retention, T0 + 31 * day, export)
    assert await store.job(old.job_id) is None
    assert await store.command(old_commands[0].command_id) is None
    by_agent = await store.commands({"agent_id": "p2"}, 100, None)
    assert by_agent.items == []
    assert await store.job(recent.job_id) is not None
    kept = await store.job(running.job_id)
    assert kept is not None and len(kept["commands"]) == 2
    jobs, unfinished, _ = await store.unfinished()
    assert [j.job_id for j in jobs] == [running.job_id]
    assert [c.command_id for c in unfinished] == [running_commands[1].command_id]
    listed = await store.jobs({}, 100, None)
    assert {j["job_id"] for j in listed.items} == {recent.job_id, running.job_id}

    await store.prune_expired(retention, T0 + 91 * day, export)
    alerts = await store.alerts({}, 100, None)
    assert [a["alert_id"] for a in alerts.items] == [firing.alert_id]

    assert not export.exists()
    await store.prune_expired(retention, T0 + 366 * day, export)
    entries = await store.audit_entries({}, 100, None)
    assert [e["action"] for e in entries.items] == ["new.thing"]
    exported = [orjson.loads(line) for line in export.read_bytes().splitlines()]
    assert [e["subject"] for e in exported] == ["s0", "s1", "s2"]
