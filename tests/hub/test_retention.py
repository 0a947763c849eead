"""Retention on the embedded SQLite store (issue 19): each kind pruned after its own time,
never an unfinished command or a running job, in small batches, the file shrinking after,
the audit exported before it goes.

SQLite only: the Redis store keeps pruning heartbeat samples alone (the default
``Store.prune_expired``), so these are not conformance tests. Time is the ``now`` the store
is given (the hub's clock), never a wait.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from hub.model import AgentRecord
from hub.store.base import AuditEntry
from hub.store.retention import DAY, Retention
from hub.store.schema import MIGRATIONS, connect
from hub.store.sqlite import SQLiteStore
from tests.conftest import HubHandle
from tests.hub.test_store_conformance import T0, alert, finish, job_with
from tests.support import FakeClock, online_agent, wait_for


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    opened = SQLiteStore(tmp_path / "store")
    await opened.open()
    yield opened
    await opened.close()


def count(store: SQLiteStore, query: str, *args: Any) -> int:
    db = sqlite3.connect(store.path)
    try:
        return int(db.execute(query, args).fetchone()[0])
    finally:
        db.close()


async def finished_job(store: SQLiteStore, at: float, agents: int = 2, output: str = "x") -> str:
    job, commands = job_with([f"a{n}" for n in range(agents)], seq=int(at))
    await store.add_job(job, commands)
    for command in commands:
        store.add_output(command.command_id, 1, "stdout", output)
        finish(command, at=at)
    job.state, job.updated_at, job.counts = "succeeded", at, {"succeeded": agents}
    await store.save_commands(commands, (), [job])
    return job.job_id


async def test_each_kind_goes_after_its_own_retention_and_not_before(
    store: SQLiteStore, tmp_path: Path
) -> None:
    old = await finished_job(store, T0)
    recent = await finished_job(store, T0 + 20 * DAY)
    # A job still running since T0: one command finished long ago, one still queued.
    running, commands = job_with(["r0", "r1"], seq=100)
    await store.add_job(running, commands)
    store.add_output(commands[0].command_id, 1, "stdout", "kept")
    finish(commands[0], at=T0)
    await store.save_commands([commands[0]])
    store.save_agent(AgentRecord(agent_id="r0"))
    store.open_session("s-old", "r0", "hub", "peer", None, T0)
    store.close_session("s-old", T0 + 1, 1000, "bye")
    store.open_session("s-open", "r0", "hub", "peer", None, T0)
    await store.save_alert(alert("r0", state="resolved", resolved_at=T0, first_seen=T0))
    await store.save_alert(alert("r1", first_seen=T0))
    await store.audit(
        [AuditEntry(ts=T0 + n, action="old.thing", subject=f"s{n}") for n in range(5)]
    )
    await store.audit([AuditEntry(ts=T0 + 400 * DAY, action="new.thing")])
    await store.flush()
    export = tmp_path / "audit.jsonl"

    def prune(days: float) -> Any:
        return store.prune_expired(Retention(), T0 + days * DAY, export)

    # Day 6: nothing is old enough.
    assert not any((await prune(6)).values())
    assert count(store, "SELECT count(*) FROM outputs") == 5
    # Day 8: the outputs of the job that ended at T0 go; its commands stay.
    pruned = await prune(8)
    assert pruned["outputs"] == 2
    assert count(store, "SELECT count(*) FROM outputs") == 3
    assert count(store, "SELECT count(*) FROM commands WHERE job_id = ?", old) == 2
    # Day 31: the old job and its commands go, sessions ended then too; the recent job,
    # the running one (its finished command and its output included) and open sessions stay.
    pruned = await prune(31)
    assert pruned["jobs"] == 3  # two commands and the job row
    assert pruned["sessions"] == 1
    assert await store.job(old) is None
    assert (await store.job(recent)) is not None
    kept = await store.job(running.job_id)
    assert kept is not None and len(kept["commands"]) == 2
    assert await store.command_output(commands[0].command_id) == [
        {"seq": 1, "stream": "stdout", "data": "kept"}
    ]
    jobs, unfinished, _ = await store.unfinished()
    assert [j.job_id for j in jobs] == [running.job_id]
    assert [c.command_id for c in unfinished] == [commands[1].command_id]
    assert count(store, "SELECT count(*) FROM sessions") == 1
    # Day 91: the resolved alert goes, the firing one stays.
    assert (await prune(91))["alerts"] == 1
    assert [a.subject for a in await store.open_alerts()] == ["r1"]
    # Day 366: the old audit entries go, exported first, in order, as JSON lines.
    assert not export.exists()
    assert (await prune(366))["audit"] == 5
    lines = [orjson.loads(line) for line in export.read_bytes().splitlines()]
    assert [line["subject"] for line in lines] == [f"s{n}" for n in range(5)]
    assert lines[0]["action"] == "old.thing" and lines[0]["time"].startswith("2023-11-14")
    page = await store.audit_entries({}, 100, None)
    assert [e["action"] for e in page.items] == ["new.thing"]
    # Nothing is pruned twice, and the export is not written again.
    assert not any((await prune(366)).values())
    assert len(export.read_bytes().splitlines()) == 5


async def test_zero_keeps_a_kind_forever(store: SQLiteStore) -> None:
    job_id = await finished_job(store, T0)
    pruned = await store.prune_expired(Retention(outputs=0, commands=0), T0 + 3000 * DAY)
    assert "outputs" not in pruned and "jobs" not in pruned
    assert len((await store.job(job_id) or {})["commands"]) == 2
    assert count(store, "SELECT count(*) FROM outputs") == 2


async def test_pruning_goes_in_small_batches_between_other_writes(store: SQLiteStore) -> None:
    """A job of 50 commands with 50 outputs pruned 7 rows at a time: every row goes, and
    live writes queued meanwhile land between the steps."""
    job_id = await finished_job(store, T0, agents=50)
    for n in range(30):
        store.open_session(f"s{n}", "a0", "hub", "peer", None, T0)
        store.close_session(f"s{n}", T0, 1000, "bye")
    commits = store.commits
    pruning = asyncio.ensure_future(store.prune_expired(Retention(), T0 + 40 * DAY, batch=7))
    later = await finished_job(store, T0 + 39 * DAY, agents=3)
    pruned = await pruning
    assert pruned["outputs"] == 50 and pruned["jobs"] == 51 and pruned["sessions"] == 30
    assert store.commits - commits >= (50 + 51 + 30) // 7
    assert await store.job(job_id) is None
    assert await store.job(later) is not None


async def test_the_file_shrinks_after_pruning(store: SQLiteStore) -> None:
    for day in range(4):
        await finished_job(store, T0 + day, agents=20, output="y" * 60_000)
    await store.checkpoint()
    size = store.path.stat().st_size
    assert size > 4 * 20 * 60_000
    await store.prune_expired(Retention(), T0 + 8 * DAY)
    await store.checkpoint()
    assert count(store, "PRAGMA freelist_count") == 0
    assert store.path.stat().st_size < size / 4


async def test_a_store_made_before_incremental_vacuum_is_rewritten_once(tmp_path: Path) -> None:
    import sqlite_utils

    data_dir = tmp_path / "old"
    data_dir.mkdir()
    conn = connect(data_dir / "tether.db")
    conn.row_factory = None
    MIGRATIONS[0](sqlite_utils.Database(conn))
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO meta (key, value) VALUES ('kept', 'yes')")
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    conn.close()
    store = SQLiteStore(data_dir)
    await store.open()
    await store.close()
    conn = sqlite3.connect(data_dir / "tether.db")
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert conn.execute("SELECT value FROM meta WHERE key = 'kept'").fetchone() == ("yes",)
    conn.close()


async def test_the_hub_prunes_by_its_settings_and_its_clock(
    hub_factory: Callable[..., Any], tmp_path: Path
) -> None:
    export = tmp_path / "exported-audit.jsonl"
    handle: HubHandle = await hub_factory(
        output_retention=3600, command_retention=7200, audit_retention=10 * DAY,
        audit_export=export,
    )  # fmt: skip
    hub = handle.hub
    clock = FakeClock(T0)
    hub.clock = clock
    agent = await online_agent(handle, "edge-1")
    sent = await hub.ledger.dispatch(_dispatch(["edge-1"]), "admin:test")
    command = await agent.recv_type("command")
    await agent.send({"type": "output", "command_id": command["command_id"], "seq": 1,
                      "stream": "stdout", "data": "hello"})  # fmt: skip
    await agent.send({"type": "result", "command_id": command["command_id"],
                      "status": "succeeded", "exit_code": 0})  # fmt: skip
    await wait_for(lambda: not hub.ledger.jobs, what="the job finished")
    await hub.ledger.drain()
    await hub.store.flush()
    job_id = sent["job_id"]
    # The job ended at the real time; the hub's clock moves on from there.
    clock.now = _ended(hub.store.path, job_id) + 3601
    assert (await hub.prune())["outputs"] == 1
    assert await hub.store.command_output(command["command_id"]) == []
    assert await hub.store.job(job_id) is not None
    clock.now += 3600
    assert (await hub.prune())["jobs"] == 2
    assert await hub.store.job(job_id) is None
    clock.now += 20 * DAY
    await hub.auditor.drain()
    assert (await hub.prune())["audit"] > 0
    actions = {orjson.loads(line)["action"] for line in export.read_bytes().splitlines()}
    assert {"job.dispatch", "command.succeeded"} <= actions
    await agent.close()


def _ended(path: Path, job_id: str) -> float:
    db = sqlite3.connect(path)
    try:
        return float(
            db.execute("SELECT updated_at FROM jobs WHERE job_id = ?", (job_id,)).fetchone()[0]
        )
    finally:
        db.close()


def _dispatch(agent_ids: list[str]) -> Any:
    from hub.protocol.messages import Dispatch

    return Dispatch(type="dispatch", id=1, target={"agent_ids": agent_ids}, name="ping")


def test_retention_is_set_in_the_config_file(tmp_path: Path) -> None:
    from hub.config import load_config

    path = tmp_path / "hub.toml"
    path.write_text(
        "[hub]\noutput_retention = 86400\ncommand_retention = 0\n"
        'audit_export = "/var/log/a.jsonl"\n'
    )
    config = load_config(path)
    assert config.output_retention == DAY and config.command_retention == 0
    assert config.audit_export == Path("/var/log/a.jsonl")
    assert load_config().session_retention == 30 * DAY


async def test_the_lifecycle_bench_runs_on_a_small_fleet(tmp_path: Path) -> None:
    """The benchmark's own pieces still run (its figures are the benchmark's to judge)."""
    from bench.lifecycle import lifecycle

    result = await lifecycle(tmp_path, agents=40, days=2, sample_hours=0.05)
    assert set(result["bytes_per_agent_per_day"]) >= {"commands", "audit", "sessions"}
    prune = result["prune"]
    assert prune["rows"]["jobs"] == 41 and prune["rows"]["sessions"] == 40
    assert prune["rows"]["heartbeats"] == 40 * 3
    assert prune["pages_after"] < prune["pages_before"]


def test_retention_is_set_by_serve_flags(tmp_path: Path) -> None:
    from hub.cli import UsageError, _config_from, build_parser

    args = build_parser().parse_args(
        ["serve", "--data-dir", str(tmp_path), "--retention", "audit=60",
         "--retention", "outputs=0", "--audit-export", str(tmp_path / "a.jsonl")]
    )  # fmt: skip
    config = _config_from(args)
    assert config.audit_retention == 60 and config.output_retention == 0
    assert config.audit_export == tmp_path / "a.jsonl"
    assert config.command_retention == 30 * DAY
    bad = build_parser().parse_args(["serve", "--retention", "forever"])
    with pytest.raises(UsageError):
        _config_from(bad)
