"""A full disk, for real: the hub's data directory on a small tmpfs mounted by the test,
filled by another file, then freed (issue 19).

While the disk is full the hub says so on ``/readyz``, refuses what it would have to store
with ``unavailable`` (PROTOCOL §5), keeps its agents, raises one ``store_unavailable`` alert,
logs the condition once, and keeps every transition it accepted in memory, announcing none
before it is stored. Once space returns it recovers by itself: every job's counts agree with
its commands, before and after a restart.

Needs root (``mount``): a test that cannot mount fails, it does not skip.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from hub.protocol.client import AdminClient, AdminError
from tests.conftest import HubHandle
from tests.hub.test_ledger_durability import StoreReader
from tests.hub.wire import http_get
from tests.support import RawAgent, run_cli_async, wait_for

#: Large enough for a hub's store, small enough to fill in a moment.
DISK_SIZE = "16m"


class SmallDisk:
    """A tmpfs of its own, and a file that fills it."""

    def __init__(self, mount: Path) -> None:
        self.mount = mount
        self.data_dir = mount / "data"
        self.filler = mount / "filler"

    def fill(self) -> None:
        """Take every free byte. The store's WAL is first cut to nothing (a checkpoint from
        another connection, as any tool may run), so that the hub's next commit has to grow
        a file rather than reuse pages it had."""
        db = sqlite3.connect(self.data_dir / "tether.db", timeout=10)
        try:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            db.close()
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            chunk = b"\0" * 65536
            while True:
                try:
                    if os.write(fd, chunk) == 0:
                        break
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    if len(chunk) == 1:
                        break
                    chunk = chunk[: len(chunk) // 2]
        finally:
            os.close(fd)
        assert os.statvfs(self.mount).f_bavail == 0

    def free(self) -> None:
        self.filler.unlink()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs", str(mount)],
        check=True,
        capture_output=True,
    )
    try:
        yield SmallDisk(mount)
    finally:
        # Lazy: a hub the test failed to stop must not keep the mount (and the test's
        # tmp dir) busy for good.
        subprocess.run(["umount", "-l", str(mount)], check=True)


async def ready(handle: HubHandle) -> tuple[int, dict[str, Any]]:
    response = await http_get(handle.hub.port, "/readyz")
    return response.status, orjson.loads(response.body)


def stored_counts(data_dir: Path) -> list[tuple[str, str, dict[str, int], dict[str, int]]]:
    """Each job's state, its stored counts and the counts its stored commands make."""
    db = sqlite3.connect(data_dir / "tether.db")
    try:
        jobs = db.execute("SELECT job_id, state, counts FROM jobs").fetchall()
        out = []
        for job_id, state, counts in jobs:
            actual = dict(
                db.execute(
                    "SELECT state, count(*) FROM commands WHERE job_id = ? GROUP BY state",
                    (job_id,),
                ).fetchall()
            )
            out.append((job_id, state, orjson.loads(counts), actual))
        return out
    finally:
        db.close()


def rows(data_dir: Path, query: str, *args: Any) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(data_dir / "tether.db")
    try:
        return db.execute(query, args).fetchall()
    finally:
        db.close()


async def reply(agent: RawAgent, command: dict[str, Any]) -> None:
    await agent.send({"type": "ack", "command_id": command["command_id"]})
    await agent.send(
        {
            "type": "result",
            "command_id": command["command_id"],
            "status": "succeeded",
            "exit_code": 0,
            "data": {"pong": True},
        }
    )


def cannot_write_logs(caplog: pytest.LogCaptureFixture) -> Callable[[], list[str]]:
    def lines() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "hub.store.health" and r.levelno >= logging.ERROR
        ]

    return lines


async def test_disk_full_mid_job_refuses_keeps_and_recovers(
    small_disk: SmallDisk,
    hub_factory: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    handle: HubHandle = await hub_factory(data_dir=small_disk.data_dir)
    hub = handle.hub
    reader = StoreReader(hub.store.path)
    hub.bus.subscribe(reader)
    enroll = await handle.token("enroll")
    admin = await AdminClient(handle.url, await handle.admin_token("operator")).open()
    agents = []
    for n in range(20):
        agent = await RawAgent.connect(handle.agent_url, enroll)
        await agent.register(f"edge-{n:02d}")
        agents.append(agent)
    try:
        sent = await admin.request("dispatch", target={"selector": {}}, name="ping", args={})
        job_id = sent["job_id"]
        commands = [await agent.recv_type("command") for agent in agents]
        for agent, command in zip(agents[:10], commands[:10], strict=True):
            await reply(agent, command)
        await wait_for(
            lambda: hub.ledger.jobs[job_id].record.counts.get("succeeded") == 10,
            what="half the job done",
        )
        await hub.ledger.settled()

        small_disk.fill()
        for agent, command in zip(agents[10:], commands[10:], strict=True):
            await reply(agent, command)

        # Within seconds: not ready, with the store's reason.
        async def not_ready() -> dict[str, Any] | None:
            status, body = await ready(handle)
            return body if status == 503 else None

        body = await wait_for(not_ready, timeout=10, what="/readyz 503")
        assert body["status"] == "not_ready"
        assert body["reason"].startswith("store: disk full"), body
        exposition = hub.metrics.exposition().decode()
        assert "tether_store_writable 0.0" in exposition
        # The transitions of the second half are kept, and none is announced.
        await wait_for(lambda: hub.ledger.failed_writes > 0, what="a refused write")
        stored = dict(rows(small_disk.data_dir, "SELECT command_id, state FROM commands"))
        assert sum(1 for s in stored.values() if s == "succeeded") == 10
        assert not reader.violations, reader.violations[:5]

        # What would have to be stored is refused with `unavailable`; nothing accepted.
        with pytest.raises(AdminError) as refused:
            await admin.request("dispatch", target={"selector": {}}, name="ping", args={})
        assert refused.value.code == "unavailable"
        assert "cannot write" in refused.value.message
        with pytest.raises(AdminError) as refused:
            await admin.request("cancel", job_id=job_id)
        assert refused.value.code == "unavailable"
        alert = await wait_for(
            lambda: hub.alerts.open.get(("store_unavailable", hub.hub_id)), what="the alert"
        )
        assert alert.severity == "critical"
        with pytest.raises(AdminError) as refused:
            await admin.request("ack_alert", alert_id=alert.alert_id, comment="seen")
        assert refused.value.code == "unavailable"
        assert alert.state == "firing"
        # A token made by the command line against the same file is refused too.
        credentials = rows(small_disk.data_dir, "SELECT count(*) FROM credentials")
        cli = await run_cli_async(
            "token", "create", "--admin", "--role", "viewer", "--data-dir",
            str(small_disk.data_dir),
        )  # fmt: skip
        assert cli.returncode != 0, cli.stdout
        assert rows(small_disk.data_dir, "SELECT count(*) FROM credentials") == credentials

        # Agents stay connected; their heartbeats are kept in memory.
        await agents[0].send({"type": "heartbeat", "status": "degraded", "metrics": {"cpu": 9}})
        await wait_for(lambda: hub.registry.records["edge-00"].status == "degraded")
        assert hub.registry.connected == 20
        # The condition is logged once (the checkpoint loop does not log every second).
        await wait_for(lambda: hub.store.health.failures >= 3, what="several failed tries")
        assert len(cannot_write_logs(caplog)()) == 1, cannot_write_logs(caplog)()
        assert not [r for r in caplog.records if "periodic checkpoint" in r.getMessage()]

        small_disk.free()

        # By itself: ready again, every transition stored, then announced.
        async def is_ready() -> bool:
            return (await ready(handle))[0] == 200

        await wait_for(is_ready, timeout=15, what="/readyz 200")
        detail = await wait_for(
            lambda: _finished(admin, job_id), timeout=15, what="the job stored as finished"
        )
        assert detail["job"]["counts"] == {"succeeded": 20}
        for job, state, counts, actual in stored_counts(small_disk.data_dir):
            assert counts == actual, (job, state)
        assert not reader.violations, reader.violations[:5]
        assert reader.announced >= 40
        # The alert was stored (raised, then resolved), and the heartbeat kept.
        await wait_for(
            lambda: (
                rows(
                    small_disk.data_dir,
                    "SELECT state FROM alerts WHERE rule = 'store_unavailable'",
                )
                == [("resolved",)]
            ),
            what="the alert stored resolved",
        )
        await wait_for(
            lambda: (
                rows(small_disk.data_dir, "SELECT status FROM agents WHERE agent_id = 'edge-00'")
                == [("degraded",)]
            ),
            what="the heartbeat stored",
        )
        # Dispatch works again.
        again = await admin.request("dispatch", target={"agent_ids": ["edge-01"]}, name="ping")
        await reply(agents[1], await agents[1].recv_type("command"))
        await wait_for(lambda: _finished(admin, again["job_id"]), what="a new job done")
    finally:
        await admin.close()
        for agent in agents:
            await agent.close()

    # A restart reads back the same truth.
    await hub.stop()
    for job, state, counts, actual in stored_counts(small_disk.data_dir):
        assert state == "succeeded" and counts == actual, (job, state, counts, actual)
    restarted: HubHandle = await hub_factory(data_dir=small_disk.data_dir)
    assert not restarted.hub.ledger.jobs
    assert not restarted.hub.ledger.commands


async def _finished(admin: AdminClient, job_id: str) -> dict[str, Any] | None:
    detail = await admin.request("job", job_id=job_id)
    return detail if detail["job"]["state"] != "running" else None


async def test_disk_full_during_registrations_keeps_agents_and_heartbeats(
    small_disk: SmallDisk, hub_factory: Callable[..., Any]
) -> None:
    handle: HubHandle = await hub_factory(data_dir=small_disk.data_dir)
    hub = handle.hub
    tokens = [await handle.agent_token(f"node-{n:02d}") for n in range(30)]
    admin_token = await handle.admin_token("operator")
    enroll = await handle.token("enroll")
    await hub.store.flush()

    small_disk.fill()
    agents = []
    try:
        for n, token in enumerate(tokens):
            agent = await RawAgent.connect(handle.agent_url, token)
            await agent.register(f"node-{n:02d}", region="full-disk")
            agents.append(agent)
            await agent.send({"type": "heartbeat", "status": "ok", "metrics": {"n": n}})
        await wait_for(lambda: hub.store.health.reason, timeout=10, what="the store failing")
        assert hub.registry.connected == 30
        # Enrolling needs a commit (a key issued, a use spent): try again later, not 1011.
        newcomer = await RawAgent.connect(handle.agent_url, enroll)
        await newcomer.send({"type": "register", "agent_id": "node-new"})
        code = await newcomer.closed()
        assert code == 1013
        assert hub.not_ready_reason().startswith("store: disk full")
        assert rows(small_disk.data_dir, "SELECT count(*) FROM agents") == [(0,)]

        small_disk.free()
        await wait_for(lambda: not hub.store.health.reason, timeout=10, what="recovery")
        await wait_for(
            lambda: rows(small_disk.data_dir, "SELECT count(*) FROM agents") == [(30,)],
            what="every registration stored",
        )
        await wait_for(
            lambda: (
                rows(small_disk.data_dir, "SELECT count(*) FROM sessions WHERE ended_at IS NULL")
                == [(30,)]
            ),
            what="every session stored",
        )
        async with AdminClient(handle.url, admin_token) as admin:
            sent = await admin.request(
                "dispatch", target={"selector": {"region": "full-disk"}}, name="ping"
            )
            assert len(sent["command_ids"]) == 30
            for agent in agents:
                await reply(agent, await agent.recv_type("command"))
            await wait_for(lambda: _finished(admin, sent["job_id"]), what="the job done")
    finally:
        for agent in agents:
            await agent.close()
    await hub.stop()
    restarted: HubHandle = await hub_factory(data_dir=small_disk.data_dir)
    assert len(restarted.hub.registry.records) == 30
    for job, state, counts, actual in stored_counts(small_disk.data_dir):
        assert state == "succeeded" and counts == actual == {"succeeded": 30}, job
