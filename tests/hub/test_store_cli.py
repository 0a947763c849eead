"""``tether-hub store stats|backup|restore`` (issue 19), end to end: a backup taken mid-job
from a running hub, restored into a new data directory, served by a new hub. The unfinished
commands are delivered again and the agents' journals keep each from running twice.

SQLite only (the file of the embedded store); real agents with real journals, the command
line as a subprocess.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.handlers.exec import ExecPolicy
from hub.protocol.client import AdminClient
from tests.agent.test_client_hub import Agents, finished
from tests.conftest import HubHandle
from tests.support import run_cli_async, wait_for


@pytest.fixture
async def agents(tmp_path: Path) -> AsyncIterator[Agents]:
    started = Agents(tmp_path / "agents")
    yield started
    await started.stop_all()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def cli(*args: str) -> Any:
    done = await run_cli_async("store", *args, "--json")
    assert done.returncode == 0, done.stderr
    return orjson.loads(done.stdout)


async def test_stats_count_each_kind_and_a_missing_store_is_a_usage_error(
    hub: HubHandle, tmp_path: Path
) -> None:
    await hub.admin_token("viewer")
    await hub.hub.auditor.drain()
    await hub.hub.store.flush()
    stats = await cli("stats", "--data-dir", str(hub.hub.config.data_dir))
    assert stats["schema"] == 2 and stats["auto_vacuum"] == "incremental"
    assert stats["kinds"]["credentials"]["rows"] == 1
    assert stats["kinds"]["credentials"]["oldest"].endswith("Z")
    assert stats["kinds"]["jobs"] == {"rows": 0, "bytes": stats["kinds"]["jobs"]["bytes"],
                                      "oldest": None}  # fmt: skip
    assert stats["free_pages"] >= 0 and stats["pages"] > 0
    missing = await run_cli_async("store", "stats", "--data-dir", str(tmp_path / "none"))
    assert missing.returncode == 2 and "no store" in missing.stderr


async def test_a_backup_taken_mid_job_restored_on_a_new_hub_finishes_the_job_once(
    hub_factory: Callable[..., Any], agents: Agents, tmp_path: Path
) -> None:
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    first: HubHandle = await hub_factory(listen=f"127.0.0.1:{port}", data_dir=tmp_path / "a")
    tokens = {n: await first.agent_token(f"edge-{n}") for n in (1, 2, 3)}
    admin_token = await first.admin_token("operator")
    marks = tmp_path / "marks"
    marks.mkdir()
    policy = ExecPolicy()
    started = {
        n: await agents.start([url], tokens[n], f"edge-{n}", policy=policy) for n in (1, 2, 3)
    }
    await wait_for(lambda: len(first.hub.registry.live) == 3, what="three agents online")
    await agents.stop(started[3])  # registered once, so a target; offline from now on

    def run(n: int, seconds: float) -> dict[str, Any]:
        # Each run leaves a line: the count of lines is the count of runs.
        script = f"echo run >> {marks}/edge-{n}; sleep {seconds}"
        return {"argv": ["sh", "-c", script]}

    async with AdminClient(first.url, admin_token) as admin:
        # One job per agent, so that one agent's command can be quick, another's slow and a
        # third's queued (edge-3 is not connected) when the backup is taken.
        quick = (await admin.request("dispatch", target={"agent_ids": ["edge-1"]},
                                     name="exec", args=run(1, 0)))["command_ids"][0]  # fmt: skip
        await finished(admin, quick)
        slow = (await admin.request("dispatch", target={"agent_ids": ["edge-2"]},
                                    name="exec", args=run(2, 1.5)))["command_ids"][0]  # fmt: skip
        queued = (await admin.request("dispatch", target={"agent_ids": ["edge-3"]},
                                      name="exec", args=run(3, 0)))["command_ids"][0]  # fmt: skip
        await wait_for(lambda: (marks / "edge-2").exists(), what="the slow command running")

        backup = tmp_path / "backup.db"
        made = await cli("backup", str(backup), "--data-dir", str(tmp_path / "a"))
        assert made["bytes"] > 0

        # The first hub goes on: the slow command finishes there (and in edge-2's journal).
        await finished(admin, slow)
    await first.hub.stop()

    restored = await cli("restore", str(backup), "--data-dir", str(tmp_path / "b"))
    assert restored["schema"] == 2
    again = await run_cli_async("store", "restore", str(backup), "--data-dir", str(tmp_path / "b"))
    assert again.returncode == 1 and "already" in again.stderr

    second: HubHandle = await hub_factory(listen=f"127.0.0.1:{port}", data_dir=tmp_path / "b")
    # As the backup saw them: the quick command done, the slow one sent, one queued.
    states = {c.command_id: c.state for c in second.hub.ledger.commands.values()}
    assert quick not in states
    assert states[slow] in ("sent", "acked")
    assert states[queued] == "queued"
    await agents.start([url], tokens[3], "edge-3", policy=policy)
    async with AdminClient(second.url, admin_token) as admin:
        for command_id in (quick, slow, queued):
            result = await finished(admin, command_id, timeout=30)
            assert result["state"] == "succeeded", result
    # edge-2 was sent its command again and answered from its journal: it ran once.
    for n in (1, 2, 3):
        assert (marks / f"edge-{n}").read_text() == "run\n", n
    assert started[2].executor.journal.known(slow)
    stats = await cli("stats", "--data-dir", str(tmp_path / "b"))
    assert stats["kinds"]["jobs"]["rows"] == 3
