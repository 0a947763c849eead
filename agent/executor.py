"""Runs commands off the read loop, at most once each, under a concurrency limit.

What a ``command`` message becomes, decided synchronously on receipt (PROTOCOL §4.3):

1. its id is running or waiting for a slot here: a fresh ``ack``;
2. the journal knows the id: its stored ``result`` is sent again (the hub redelivers what it
   has no result for, and this is how results made while disconnected reach it);
3. the name is not a handler (unknown, or refused like ``exec`` without ``--allow-exec``):
   ``result`` ``rejected`` with the reason;
4. ``expires_at`` has passed (by the hub's clock, estimated from ``welcome.server_time``):
   ``result`` ``rejected`` with error ``expired``. The operator asked for the work within the
   ttl; a command redelivered long after that is stale, and the hub cannot expire a command
   it already sent, so the agent says so. Nothing runs;
5. otherwise ``ack`` at once, then the command waits for a slot, is journaled durably,
   runs, and its ``result`` is journaled and sent.

Rejections (3, 4) are not journaled: nothing ran, and a redelivery gets the same answer.
The deadline (``timeout``) runs from the ack, as the hub's does, so time spent waiting for a
slot counts. ``cancel`` of a running or waiting command ends it ``cancelled``; of any other
id it is ignored. Results are sent on whatever connection is attached when they are ready;
while none is, they wait in the journal for the hub's redelivery.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime
from typing import Any, Literal, Protocol

from pydantic import BaseModel

from hub.protocol.messages import Ack, Command, Output, Result

from .handlers import CommandContext, HandlerRegistry, HandlerResult, Rejected, Stream
from .journal import Journal, utc_now
from .profile import AgentProfile
from .status import CommandLog

__all__ = ["Executor", "Outbound"]

log = logging.getLogger("tether.agent.executor")

MAX_ERROR = 8000
#: Why a running command was stopped by the agent rather than by its own end.
StopReason = Literal["cancel", "shutdown"]


#: Tasks sending stored results again, kept alive until done.
_resends: set[asyncio.Task[None]] = set()


class Outbound(Protocol):
    """The live hub connection, as the executor sees it."""

    def send(self, message: BaseModel) -> bool:
        """Queue one message; False when the connection can no longer send."""
        ...

    async def drain(self) -> None:
        """Wait while the connection's write buffer is over its high-water mark."""
        ...


class _Job:
    __slots__ = ("command", "phase", "seq", "stop", "task")

    def __init__(self, command: Command) -> None:
        self.command = command
        self.task: asyncio.Task[None] | None = None
        #: Why the agent stopped it, if it did; checked before the handler starts too.
        self.stop: StopReason | None = None
        #: ``new`` until the task's body runs (a task cancelled before that would skip its
        #: clean-up), ``running``, then ``finishing`` while the result is stored and sent.
        self.phase: Literal["new", "running", "finishing"] = "new"
        self.seq = 0

    def halt(self, reason: StopReason) -> None:
        if self.stop is not None or self.phase == "finishing" or self.task is None:
            return
        self.stop = reason
        if self.phase == "running":
            self.task.cancel()


class Executor:
    """One agent's command runner. Cheap until used: simulated agents have one each."""

    __slots__ = (
        "_jobs",
        "_slots",
        "accepting",
        "agent",
        "clock_offset",
        "degraded",
        "journal",
        "max_concurrency",
        "outbound",
        "registry",
        "tracker",
    )

    def __init__(
        self,
        agent: AgentProfile,
        registry: HandlerRegistry,
        journal: Journal,
        *,
        max_concurrency: int = 4,
    ) -> None:
        self.agent = agent
        self.registry = registry
        self.journal = journal
        self.max_concurrency = max_concurrency
        #: The connection results go to; None while disconnected.
        self.outbound: Outbound | None = None
        #: Hub clock minus ours, in seconds (set from ``welcome.server_time``).
        self.clock_offset = 0.0
        #: False once shutting down: new commands are ignored (the hub redelivers them).
        self.accepting = True
        #: True while the journal cannot be written (commands are refused meanwhile).
        self.degraded = False
        self._jobs: dict[str, _Job] = {}
        self._slots: asyncio.Semaphore | None = None
        #: The recent commands ``tether-agent status`` shows (None: not kept, as simulated
        #: agents do).
        self.tracker: CommandLog | None = None

    @property
    def running(self) -> int:
        """Commands acked and not finished (waiting for a slot or running)."""
        return len(self._jobs)

    # -- from the read loop ------------------------------------------------------------

    def on_command(self, command: Command) -> None:
        if not self.accepting:
            return
        command_id = command.command_id
        if command_id in self._jobs:
            self._send(Ack(type="ack", command_id=command_id))
            return
        if self.journal.known(command_id):
            task = asyncio.get_running_loop().create_task(self._resend(command_id))
            _resends.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(_resends.discard)
            return
        handler = self.registry.lookup(command.name)
        if isinstance(handler, str):
            self._reject(command_id, handler, command.name)
            return
        if self._expired(command.expires_at):
            self._reject(command_id, "expired", command.name)
            return
        if self.tracker is not None:
            self.tracker.received(command_id, command.name)
        job = _Job(command)
        self._jobs[command_id] = job
        # The task first, then the ack: a command that finishes in its first step sends its
        # result in the same turn, and both leave in one write (AgentConnection.send).
        job.task = asyncio.get_running_loop().create_task(self._process(job))
        self._send(Ack(type="ack", command_id=command_id))

    def on_cancel(self, command_id: str) -> None:
        job = self._jobs.get(command_id)
        if job is not None:
            job.halt("cancel")

    async def shutdown(self, grace: float = 5.0) -> None:
        """Stop taking commands, give running ones ``grace`` s, then stop them (``failed``,
        error ``agent shutting down``) and wait until their results are journaled and sent."""
        self.accepting = False
        tasks = [job.task for job in self._jobs.values() if job.task is not None]
        if tasks and grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        for job in list(self._jobs.values()):
            job.halt("shutdown")
        if tasks:
            await asyncio.wait(tasks)

    # -- internals ---------------------------------------------------------------------

    def _send(self, message: BaseModel) -> None:
        outbound = self.outbound
        if outbound is not None:
            outbound.send(message)

    def _reject(self, command_id: str, reason: str, name: str = "") -> None:
        if self.tracker is not None:
            self.tracker.finished(command_id, "rejected", name)
        self._send(Result(type="result", command_id=command_id, status="rejected", error=reason))

    def _expired(self, expires_at: str) -> bool:
        try:
            deadline = datetime.fromisoformat(expires_at).timestamp()
        except ValueError:
            return False  # the hub's business; do not refuse work over a format quirk
        return time.time() + self.clock_offset > deadline

    async def _resend(self, command_id: str) -> None:
        stored = await self.journal.result(command_id)
        if stored is not None:
            self._send(Result(type="result", command_id=command_id, **stored))

    async def _process(self, job: _Job) -> None:
        command = job.command
        job.phase = "running"
        try:
            try:
                result = await self._execute(job)
            except Exception as exc:  # a bug in the agent must still end the command
                log.exception("event=command_crashed command_id=%s", command.command_id)
                result = {"status": "failed", "error": f"agent error: {exc!r}"[:MAX_ERROR]}
            job.phase = "finishing"
            stored = {
                "status": result["status"],
                "exit_code": result.get("exit_code"),
                "data": result.get("data"),
                "error": result.get("error"),
                "started_at": result.get("started_at"),
                "finished_at": utc_now(),
            }
            try:
                await self.journal.finish(command.command_id, stored)
            except Exception as exc:
                log.error(
                    "event=journal_write_failed command_id=%s error=%r", command.command_id, exc
                )
        finally:
            self._jobs.pop(command.command_id, None)
        if self.tracker is not None:
            self.tracker.finished(command.command_id, stored["status"], command.name)
        self._send(Result(type="result", command_id=command.command_id, **stored))
        log.info(
            "event=command_finished command_id=%s name=%s status=%s",
            command.command_id,
            command.name,
            stored["status"],
        )

    async def _execute(self, job: _Job) -> dict[str, Any]:
        """Wait for a slot, journal, run; map every way of ending to a result."""
        command = job.command
        handler = self.registry.lookup(command.name)
        assert not isinstance(handler, str)
        slots = self._slots
        if slots is None:
            slots = self._slots = asyncio.Semaphore(self.max_concurrency)
        started_at: str | None = None
        try:
            if job.stop is not None:
                raise asyncio.CancelledError
            async with asyncio.timeout(command.timeout):
                async with slots:
                    started_at = utc_now()
                    try:
                        await self.journal.begin(command.command_id, command.name, started_at)
                    except Exception as exc:
                        self.degraded = True
                        log.error("event=journal_unavailable error=%r", exc)
                        return {
                            "status": "rejected",
                            "error": f"journal unavailable, cannot run at most once: {exc!r}",
                        }
                    self.degraded = False
                    log.info(
                        "event=command_started command_id=%s name=%s",
                        command.command_id,
                        command.name,
                    )
                    outcome = await handler(self._context(job))
        except TimeoutError:
            outcome = HandlerResult(
                status="timed_out", error=f"timed out after {command.timeout:g} s"
            )
        except asyncio.CancelledError:
            if job.stop is None:
                raise
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                task.uncancel()
            if job.stop == "cancel":
                outcome = HandlerResult(status="cancelled", error="cancelled")
            else:
                outcome = HandlerResult(status="failed", error="agent shutting down")
        except Rejected as exc:
            outcome = HandlerResult(status="rejected", error=str(exc))
        except Exception as exc:
            outcome = HandlerResult(status="failed", error=f"{type(exc).__name__}: {exc}")
        return {
            "status": outcome.status,
            "exit_code": outcome.exit_code,
            "data": outcome.data,
            "error": outcome.error[:MAX_ERROR] if outcome.error else outcome.error,
            "started_at": started_at,
        }

    def _context(self, job: _Job) -> CommandContext:
        command = job.command

        async def emit(stream: Stream, data: str) -> None:
            seq = job.seq
            job.seq += 1
            outbound = self.outbound
            if outbound is None:
                return  # output is best effort; the result waits in the journal
            outbound.send(
                Output(
                    type="output",
                    command_id=command.command_id,
                    seq=seq,
                    stream=stream,
                    data=data,
                )
            )
            await outbound.drain()

        return CommandContext(
            command_id=command.command_id,
            name=command.name,
            args=command.args,
            timeout=command.timeout,
            emit=emit,
            agent=self.agent,
        )
