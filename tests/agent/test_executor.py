"""The executor: ack/result ordering, dedup, at-most-once across a crash, limits, cancel."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from agent.executor import Executor
from agent.handlers import (
    CommandContext,
    HandlerRegistry,
    HandlerResult,
    Rejected,
    default_registry,
)
from agent.handlers.exec import ExecPolicy
from agent.journal import INTERRUPTED, MemoryJournal, SqliteJournal, utc_now
from agent.profile import AgentProfile
from hub.protocol.messages import Command, Output, Result

from .conftest import eventually, gone

ROOT = Path(__file__).resolve().parents[2]


class Recorder:
    """The hub end of the connection, reduced to what the executor hands it."""

    def __init__(self) -> None:
        self.messages: list[BaseModel] = []

    def send(self, message: BaseModel) -> bool:
        self.messages.append(message)
        return True

    async def drain(self) -> None:
        return None

    def kinds(self, command_id: str) -> list[str]:
        return [
            m.type  # type: ignore[attr-defined]
            for m in self.messages
            if getattr(m, "command_id", None) == command_id
        ]

    def results(self, command_id: str) -> list[Result]:
        return [m for m in self.messages if isinstance(m, Result) and m.command_id == command_id]


def command(
    command_id: str,
    name: str = "ping",
    args: dict[str, Any] | None = None,
    timeout: float = 30,
    expires_in: float = 600,
) -> Command:
    return Command(
        type="command",
        command_id=command_id,
        name=name,
        args=args or {},
        timeout=timeout,
        issued_at=utc_now(),
        expires_at=utc_now(lambda: time.time() + expires_in),
    )


class Gate:
    """A handler that blocks until released, counting how many run at once."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls: list[str] = []
        self.active = 0
        self.peak = 0

    async def __call__(self, ctx: CommandContext) -> HandlerResult:
        self.calls.append(ctx.command_id)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await self.release.wait()
        finally:
            self.active -= 1
        return HandlerResult(data={"ran": ctx.command_id})


@pytest.fixture
def profile() -> AgentProfile:
    return AgentProfile(agent_id="exec-test", hostname="h")


def make(
    profile: AgentProfile,
    gate: Gate | None = None,
    journal: Any = None,
    max_concurrency: int = 4,
    registry: HandlerRegistry | None = None,
) -> tuple[Executor, Recorder]:
    if registry is None:
        registry = default_registry()
        if gate is not None:
            registry.add("gate", gate)
    executor = Executor(
        profile, registry, journal or MemoryJournal(), max_concurrency=max_concurrency
    )
    recorder = Recorder()
    executor.outbound = recorder
    return executor, recorder


async def test_ack_comes_first_then_a_timed_result(profile: AgentProfile) -> None:
    executor, hub = make(profile)
    executor.on_command(command("c1"))
    assert hub.kinds("c1") == ["ack"]  # on receipt, before any work
    await eventually(lambda: hub.results("c1"))
    assert hub.kinds("c1") == ["ack", "result"]
    result = hub.results("c1")[0]
    assert result.status == "succeeded" and result.data["pong"] is True
    assert result.started_at and result.finished_at
    assert result.started_at <= result.finished_at
    assert executor.running == 0


async def test_repeated_command_while_running_gets_a_fresh_ack(profile: AgentProfile) -> None:
    gate = Gate()
    executor, hub = make(profile, gate)
    executor.on_command(command("c1", "gate"))
    await eventually(lambda: gate.calls)
    executor.on_command(command("c1", "gate"))
    assert hub.kinds("c1") == ["ack", "ack"]
    gate.release.set()
    await eventually(lambda: hub.results("c1"))
    assert gate.calls == ["c1"]


async def test_repeated_command_after_it_finished_gets_the_stored_result(
    profile: AgentProfile,
) -> None:
    gate = Gate()
    gate.release.set()
    executor, hub = make(profile, gate)
    executor.on_command(command("c1", "gate"))
    await eventually(lambda: hub.results("c1"))
    executor.on_command(command("c1", "gate"))
    await eventually(lambda: len(hub.results("c1")) == 2)
    first, second = hub.results("c1")
    assert first == second
    assert hub.kinds("c1") == ["ack", "result", "result"]  # no second ack, no second run
    assert gate.calls == ["c1"]


async def test_concurrency_limit_is_respected(profile: AgentProfile) -> None:
    gate = Gate()
    executor, hub = make(profile, gate, max_concurrency=2)
    for i in range(6):
        executor.on_command(command(f"c{i}", "gate"))
    assert all(hub.kinds(f"c{i}") == ["ack"] for i in range(6))  # all acked on receipt
    await eventually(lambda: len(gate.calls) == 2)
    assert executor.running == 6
    gate.release.set()
    await eventually(lambda: all(hub.results(f"c{i}") for i in range(6)))
    assert gate.peak == 2
    assert sorted(gate.calls) == [f"c{i}" for i in range(6)]


async def test_cancel_running_and_waiting_commands(profile: AgentProfile) -> None:
    gate = Gate()
    executor, hub = make(profile, gate, max_concurrency=1)
    executor.on_command(command("running", "gate"))
    executor.on_command(command("waiting", "gate"))
    await eventually(lambda: gate.calls == ["running"])
    executor.on_cancel("waiting")
    executor.on_cancel("running")
    await eventually(lambda: hub.results("running") and hub.results("waiting"))
    running, waiting = hub.results("running")[0], hub.results("waiting")[0]
    assert running.status == "cancelled" and running.started_at is not None
    assert waiting.status == "cancelled" and waiting.started_at is None
    assert gate.calls == ["running"]  # the waiting one never started
    # A repeat of a cancelled command gets the cancellation again, not a run.
    executor.on_command(command("waiting", "gate"))
    await eventually(lambda: len(hub.results("waiting")) == 2)
    assert gate.calls == ["running"]


async def test_cancel_of_unknown_or_finished_command_is_ignored(profile: AgentProfile) -> None:
    executor, hub = make(profile)
    executor.on_command(command("c1"))
    await eventually(lambda: hub.results("c1"))
    before = list(hub.messages)
    executor.on_cancel("c1")
    executor.on_cancel("never-seen")
    assert hub.messages == before


async def test_cancel_right_after_receipt_still_answers(profile: AgentProfile) -> None:
    gate = Gate()
    executor, hub = make(profile, gate)
    executor.on_command(command("c1", "gate"))
    executor.on_cancel("c1")  # before the command's task ever ran
    await eventually(lambda: hub.results("c1"))
    assert hub.results("c1")[0].status == "cancelled"
    assert gate.calls == []


async def test_deadline_gives_timed_out(profile: AgentProfile) -> None:
    gate = Gate()
    executor, hub = make(profile, gate)
    executor.on_command(command("slow", "gate", timeout=0.2))
    await eventually(lambda: hub.results("slow"))
    result = hub.results("slow")[0]
    assert result.status == "timed_out"
    assert "0.2" in (result.error or "")


async def test_unknown_and_refused_commands_are_rejected_without_ack(
    profile: AgentProfile,
) -> None:
    executor, hub = make(profile)
    executor.on_command(command("u1", "reboot"))
    executor.on_command(command("e1", "exec", {"argv": ["true"]}))
    assert hub.kinds("u1") == ["result"] and hub.kinds("e1") == ["result"]
    assert hub.results("u1")[0].status == "rejected"
    assert "unknown command" in (hub.results("u1")[0].error or "")
    assert "--allow-exec" in (hub.results("e1")[0].error or "")
    assert not executor.journal.known("u1")


async def test_handler_rejection_and_crash_become_results(profile: AgentProfile) -> None:
    async def picky(ctx: CommandContext) -> HandlerResult:
        raise Rejected("args.x is required")

    async def broken(ctx: CommandContext) -> HandlerResult:
        raise RuntimeError("disk on fire")

    registry = HandlerRegistry()
    registry.add("picky", picky)
    registry.add("broken", broken)
    executor, hub = make(profile, registry=registry)
    executor.on_command(command("p", "picky"))
    executor.on_command(command("b", "broken"))
    await eventually(lambda: hub.results("p") and hub.results("b"))
    assert hub.results("p")[0].status == "rejected"
    assert hub.results("p")[0].error == "args.x is required"
    assert hub.results("b")[0].status == "failed"
    assert "disk on fire" in (hub.results("b")[0].error or "")


async def test_expired_command_is_rejected_by_the_hub_clock(profile: AgentProfile) -> None:
    executor, hub = make(profile)
    executor.on_command(command("old", expires_in=-1))
    assert hub.results("old")[0].status == "rejected"
    assert hub.results("old")[0].error == "expired"
    # Our clock says "still valid", the hub's (ten minutes ahead) says "expired".
    executor.clock_offset = 600.0
    executor.on_command(command("skewed", expires_in=60))
    assert hub.results("skewed")[0].error == "expired"


async def test_result_made_while_disconnected_is_answered_on_redelivery(
    profile: AgentProfile,
) -> None:
    gate = Gate()
    executor, hub = make(profile, gate)
    executor.on_command(command("c1", "gate"))
    await eventually(lambda: gate.calls)
    executor.outbound = None  # the connection dropped
    gate.release.set()
    await eventually(lambda: executor.running == 0)
    assert hub.results("c1") == []
    reconnected = Recorder()
    executor.outbound = reconnected
    executor.on_command(command("c1", "gate"))  # the hub redelivers after welcome
    await eventually(lambda: reconnected.results("c1"))
    assert reconnected.kinds("c1") == ["result"]
    assert reconnected.results("c1")[0].data == {"ran": "c1"}
    assert gate.calls == ["c1"]


async def test_output_is_numbered_per_command(profile: AgentProfile) -> None:
    registry = default_registry(ExecPolicy())
    executor, hub = make(profile, registry=registry)
    code = "import sys; print('out'); sys.stdout.flush(); print('err', file=sys.stderr)"
    for cid in ("x1", "x2"):
        executor.on_command(command(cid, "exec", {"argv": [sys.executable, "-c", code]}))
    await eventually(lambda: hub.results("x1") and hub.results("x2"))
    for cid in ("x1", "x2"):
        outputs = [m for m in hub.messages if isinstance(m, Output) and m.command_id == cid]
        assert [o.seq for o in outputs] == list(range(len(outputs)))
        assert {o.stream for o in outputs} == {"stdout", "stderr"}
        kinds = hub.kinds(cid)
        assert kinds[0] == "ack" and kinds[-1] == "result"
        assert hub.results(cid)[0].exit_code == 0


async def test_shutdown_stops_running_commands(profile: AgentProfile) -> None:
    gate = Gate()
    executor, hub = make(profile, gate)
    executor.on_command(command("c1", "gate"))
    await eventually(lambda: gate.calls)
    await executor.shutdown(grace=0.1)
    result = hub.results("c1")[0]
    assert result.status == "failed" and result.error == "agent shutting down"
    executor.on_command(command("c2", "gate"))  # ignored: the hub will redeliver it
    assert hub.kinds("c2") == []


async def test_journal_survives_restart_with_sqlite(profile: AgentProfile, tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    journal = await SqliteJournal.open(path)
    executor, hub = make(profile, journal=journal)
    executor.on_command(command("c1"))
    await eventually(lambda: hub.results("c1"))
    await journal.close()

    journal = await SqliteJournal.open(path)
    try:
        executor, hub = make(profile, journal=journal)
        executor.on_command(command("c1"))
        await eventually(lambda: hub.results("c1"))
        assert hub.kinds("c1") == ["result"]  # the stored one: not run again
    finally:
        await journal.close()


CRASHING_AGENT = """
import asyncio, sys, time
from pathlib import Path
from agent.executor import Executor
from agent.handlers import default_registry
from agent.handlers.exec import ExecPolicy
from agent.journal import SqliteJournal, utc_now
from agent.profile import AgentProfile
from hub.protocol.messages import Command

async def main():
    journal = await SqliteJournal.open(Path(sys.argv[1]))
    executor = Executor(AgentProfile("crash-test", hostname="h"),
                        default_registry(ExecPolicy()), journal)
    executor.on_command(Command(type="command", command_id="c1", name="exec",
        args={"argv": sys.argv[2:]}, issued_at=utc_now(),
        expires_at=utc_now(lambda: time.time() + 600)))
    while not executor.running or not journal.known("c1"):
        await asyncio.sleep(0.01)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_command_running_at_a_crash_is_interrupted_not_rerun(
    profile: AgentProfile, tmp_path: Path
) -> None:
    path = tmp_path / "journal.sqlite3"
    marker = tmp_path / "runs"
    work = textwrap.dedent(
        f"""
        import os, time
        with open({str(marker)!r}, "a") as f:
            f.write(f"{{os.getpid()}}\\n")
        time.sleep(600)
        """
    )
    argv = [sys.executable, "-c", work]
    agent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CRASHING_AGENT,
        str(path),
        *argv,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        await eventually(lambda: marker.exists() and marker.read_text().strip(), 20, "a run")
    finally:
        agent.kill()  # the crash: SIGKILL, no clean-up of any kind
        await agent.wait()
    orphan = int(marker.read_text().split()[0])
    try:
        journal = await SqliteJournal.open(path)
        assert journal.interrupted == ["c1"]
        executor, hub = make(profile, journal=journal, registry=default_registry(ExecPolicy()))
        executor.on_command(command("c1", "exec", {"argv": argv}))  # the hub redelivers
        await eventually(lambda: hub.results("c1"))
        assert hub.kinds("c1") == ["result"]
        result = hub.results("c1")[0]
        assert result.status == "failed" and result.error == INTERRUPTED
        assert len(marker.read_text().split()) == 1  # it ran exactly once
        await journal.close()
    finally:
        if not gone(orphan):
            os.kill(orphan, signal.SIGKILL)
