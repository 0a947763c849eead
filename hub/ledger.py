"""The command ledger: jobs, command states, delivery, timeouts, rate control.

Invariants:

* A state only moves forward (``queued → sent → acked → terminal``; a result may skip
  ahead). Anything else is ignored.
* Every transition is stored durably before it is announced. Transitions made during one
  turn of the event loop are written together (one store call, one commit); their events
  go out when that write has committed, with the state as it was written.
* Delivery is at least once: a command that was sent and has no result is sent again on
  the agent's next connection, with the same id. The agent guarantees at most once.
* A job never has more than ``max_concurrency`` commands sent and unfinished; once more
  than ``max_errors`` of them ended in error, the rest of the job is cancelled.

Only unfinished commands and running jobs stay in memory; finished ones live in the store.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .audit import Auditor
from .bus import Bus
from .config import HubConfig
from .metrics import Metrics
from .model import CommandRecord, JobRecord
from .protocol.codec import encode
from .protocol.constants import ERROR_STATES, STATE_RANK, TERMINAL_STATES
from .protocol.messages import Dispatch, Output, Result
from .registry import Registry
from .store.base import AuditEntry, Store

log = logging.getLogger(__name__)

__all__ = ["DispatchRefused", "Ledger"]

#: How long non-terminal transitions (sent, acked) may wait to share a commit.
NON_TERMINAL_HOLD = 0.005
#: Commands a dispatch hands to connections per turn of the event loop.
DELIVERY_SLICE = 500
#: Transitions written (and later announced) per turn of the event loop: 1,000 took 5-15 ms
#: to write and 5 ms to announce, and shared their turn with reads and deliveries.
FLUSH_SLICE = 500
#: Finished command ids remembered to tell a harmless repeated result from a foreign one.
RECENT_FINISHED = 20_000


class DispatchRefused(Exception):
    """No target is left after the checks; nothing was accepted."""

    def __init__(self, code: str, message: str, refused: list[dict[str, str]]) -> None:
        super().__init__(message)
        self.code = code
        self.refused = refused


@dataclass(slots=True, eq=False)
class JobRun:
    """A running job and its rate-control window."""

    record: JobRecord
    window: int | None
    error_limit: int | None
    remaining: int
    in_flight: int = 0
    errors: int = 0
    successes: int = 0
    cancelled_by: str | None = None
    #: Set once the job's last command finished: a job finishes exactly once, even when
    #: the failure that passed ``max_errors`` finished it through the cancellations it made.
    finished: bool = False
    #: Queued commands of online agents waiting for a slot in the window.
    waiting: deque[CommandRecord] = field(default_factory=deque)


def _resolve_limit(value: int | str | None, total: int, floor: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        return max(floor, math.floor(total * int(value[:-1]) / 100))
    return value


class Ledger:
    def __init__(
        self,
        config: HubConfig,
        store: Store,
        registry: Registry,
        bus: Bus,
        metrics: Metrics,
        auditor: Auditor,
        send: Callable[[str, bytes], bool],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.registry = registry
        self.bus = bus
        self.metrics = metrics
        self.auditor = auditor
        #: Hands a serialized message to the connection that owns an agent (this hub's,
        #: or in cluster mode another hub's through the bus); False when none does.
        self.send = send
        self.clock = clock
        self.commands: dict[str, CommandRecord] = {}
        self.by_agent: dict[str, list[CommandRecord]] = {}
        self.jobs: dict[str, JobRun] = {}
        self.in_flight = 0
        self._seq = itertools.count(1)
        self._deadlines: list[tuple[float, int, str]] = []
        self._finished: OrderedDict[str, str] = OrderedDict()
        self._pending: list[tuple[CommandRecord | JobRecord, AuditEntry]] = []
        self._flush_handle: asyncio.Handle | None = None
        self._flush_delayed = False
        self._writes: set[asyncio.Future[Any]] = set()
        #: Agents whose heartbeat says ``draining``: they get no new commands.
        self.draining: set[str] = set()

    # -- start-up ------------------------------------------------------------------------

    async def load(self) -> None:
        """Rebuild unfinished jobs and commands after a restart (or a crash)."""
        jobs, commands, top = await self.store.unfinished()
        self._seq = itertools.count(top + 1)
        runs = {}
        for job in jobs:
            runs[job.job_id] = JobRun(
                record=job,
                window=job.max_concurrency,
                error_limit=job.max_errors,
                remaining=0,
            )
        for command in commands:
            self.commands[command.command_id] = command
            self.by_agent.setdefault(command.agent_id, []).append(command)
            run = runs.get(command.job_id)
            if run is not None:
                run.remaining += 1
                if command.state in ("sent", "acked"):
                    run.in_flight += 1
            if command.state in ("sent", "acked"):
                self.in_flight += 1
            self._schedule(command)
        for run in runs.values():
            counts = run.record.counts
            run.errors = sum(counts.get(s, 0) for s in ERROR_STATES)
            run.successes = counts.get("succeeded", 0)
            self.jobs[run.record.job_id] = run
            if run.remaining == 0:
                self._finish_job(run)
        log.info("ledger loaded: %d unfinished commands in %d jobs", len(commands), len(jobs))

    # -- dispatch ------------------------------------------------------------------------

    async def dispatch(
        self, request: Dispatch, actor: str, audit: Sequence[AuditEntry] = ()
    ) -> dict[str, Any]:
        """Accept a job: one durable ``queued`` command per target, then deliver.

        ``audit`` entries (the request as the admin channel saw it) are stored in the job's
        own transaction, or on their own if nothing is accepted."""
        targets, refused = self._targets(request)
        if not targets:
            for entry in audit:
                self.auditor.queue(entry)
            codes = {r["code"] for r in refused}
            code = "unsupported" if "unsupported" in codes else "not_found"
            raise DispatchRefused(code, f"no target can run {request.name!r}", refused)
        now = self.clock()
        job_id = secrets.token_hex(8)
        total = len(targets)
        spec = {
            "max_concurrency": request.max_concurrency,
            "max_errors": request.max_errors,
            "refused": len(refused),
        }
        job = JobRecord(
            job_id=job_id,
            name=request.name,
            args=request.args,
            target=request.target.model_dump(exclude_none=True),
            total=total,
            created_at=now,
            timeout=request.timeout,
            ttl=request.ttl,
            dispatched_by=actor,
            max_concurrency=_resolve_limit(request.max_concurrency, total, 1),
            max_errors=_resolve_limit(request.max_errors, total, 0),
            counts={"queued": total},
            updated_at=now,
            spec=spec,
        )
        commands: list[CommandRecord] = []
        entries = [
            *audit,
            self.auditor.entry(
                "job.dispatch",
                actor=actor,
                subject=job_id,
                name=request.name,
                targets=total,
                refused=len(refused),
            ),
        ]
        for index, agent_id in enumerate(targets, 1):
            command = CommandRecord(
                command_id=secrets.token_hex(12),
                job_id=job_id,
                agent_id=agent_id,
                name=request.name,
                args=request.args,
                timeout=request.timeout,
                issued_at=now,
                expires_at=now + request.ttl,
                seq=next(self._seq),
                updated_at=now,
                dispatched_by=actor,
            )
            commands.append(command)
            entries.append(
                self.auditor.entry(
                    "command.queued", actor=actor, subject=command.command_id, agent_id=agent_id
                )
            )
            if index % DELIVERY_SLICE == 0:
                await asyncio.sleep(0)  # a job to the whole fleet must not stall the loop
        await self.store.add_job(job, commands, entries)
        run = JobRun(
            record=job,
            window=job.max_concurrency,
            error_limit=job.max_errors,
            remaining=total,
        )
        self.jobs[job_id] = run
        # Every command of an accepted job is registered in one go, so that a cancel or a
        # lookup never sees part of a job.
        registered, by_agent, waiting = self.commands, self.by_agent, run.waiting
        for command in commands:
            registered[command.command_id] = command
            by_agent.setdefault(command.agent_id, []).append(command)
            self._schedule(command)
            if self._deliverable(command.agent_id):
                waiting.append(command)
        self.metrics.commands["queued"] += total
        if total > DELIVERY_SLICE:
            await asyncio.sleep(0)  # registering 10,000 took ~10 ms: delivery starts next turn
        # Views taken before delivery moves them on; one that moved already (its agent came
        # back in the meantime) is announced by its next transition, once that is stored.
        views = self._queued_views(commands[:FLUSH_SLICE]) if self.bus.wanted("commands") else []
        # Deliver first and announce after: delivery is on the round trip's critical path,
        # the announcement is not. In slices, so that a job to the whole fleet never stalls
        # the event loop.
        self._pump(run, limit=DELIVERY_SLICE)
        for view in views:
            self._announce(view)
        if len(commands) > FLUSH_SLICE:
            asyncio.get_running_loop().call_soon(self._announce_queued, commands[FLUSH_SLICE:])
        while run.waiting and (run.window is None or run.in_flight < run.window):
            await asyncio.sleep(0)
            self._pump(run, limit=DELIVERY_SLICE)
        return {
            "job_id": job_id,
            "command_ids": [c.command_id for c in commands],
            "refused": refused,
        }

    def _targets(self, request: Dispatch) -> tuple[list[str], list[dict[str, str]]]:
        records = self.registry.records
        refused: list[dict[str, str]] = []
        targets: list[str] = []
        target = request.target
        if target.agent_ids is not None:
            seen: set[str] = set()
            candidates = []
            for agent_id in target.agent_ids:
                if agent_id in seen:
                    continue
                seen.add(agent_id)
                record = records.get(agent_id)
                if record is None:
                    refused.append({"agent_id": agent_id, "code": "not_found"})
                else:
                    candidates.append(record)
        else:
            assert target.selector is not None
            candidates = self.registry.select(target.selector)
        for record in candidates:
            if request.name in record.capabilities:
                targets.append(record.agent_id)
            else:
                refused.append({"agent_id": record.agent_id, "code": "unsupported"})
        return targets, refused

    # -- delivery ------------------------------------------------------------------------

    def _deliverable(self, agent_id: str) -> bool:
        return agent_id in self.registry.live and agent_id not in self.draining

    def _pump(self, run: JobRun, limit: int | None = None) -> None:
        """Send queued commands of a job while its window has room (at most ``limit``)."""
        waiting = run.waiting
        budget = limit if limit is not None else len(waiting)
        while waiting and budget > 0 and (run.window is None or run.in_flight < run.window):
            budget -= 1
            command = waiting.popleft()
            if command.state != "queued":
                continue
            if not self._deliverable(command.agent_id):
                continue  # sent from agent_connected() when the agent is back
            self._send(command, run)

    def _send(self, command: CommandRecord, run: JobRun | None) -> None:
        if not self.send(command.agent_id, encode(command.wire())):
            return
        if command.state == "queued":
            command.sent_at = self.clock()
            self.in_flight += 1
            if run is not None:
                run.in_flight += 1
            self._transition(command, "sent")

    def agent_connected(self, agent_id: str) -> None:
        """Deliver every unfinished command of this agent, in the order they were accepted."""
        if agent_id in self.draining:
            return
        for command in list(self.by_agent.get(agent_id, ())):
            if command.state in ("sent", "acked"):
                # Redelivery with the same id: the agent answers from its journal.
                self.send(agent_id, encode(command.wire()))
            elif command.state == "queued":
                run = self.jobs.get(command.job_id)
                if run is None or run.window is None or run.in_flight < run.window:
                    self._send(command, run)
                elif command not in run.waiting:
                    run.waiting.append(command)

    def set_draining(self, agent_id: str, draining: bool) -> None:
        if draining:
            self.draining.add(agent_id)
        elif agent_id in self.draining:
            self.draining.discard(agent_id)
            if agent_id in self.registry.live:
                self.agent_connected(agent_id)

    # -- messages from agents ------------------------------------------------------------

    def owned(self, agent_id: str, command_id: str) -> tuple[bool, CommandRecord | None]:
        """Whether ``command_id`` is this agent's, and its record while it is unfinished.

        ``(False, None)``: unknown or another agent's (refused). ``(True, None)``: this
        agent's and finished (a harmless repeat, ignored).
        """
        command = self.commands.get(command_id)
        if command is not None:
            if command.agent_id != agent_id:
                return False, None
            return True, None if command.state in TERMINAL_STATES else command
        return self._finished.get(command_id) == agent_id, None

    def on_ack(self, agent_id: str, command_id: str) -> bool:
        owned, command = self.owned(agent_id, command_id)
        if command is None:
            return owned
        if STATE_RANK[command.state] < STATE_RANK["acked"]:
            self._mark_in_flight(command)
            command.acked_at = self.clock()
            self._transition(command, "acked")
            self._schedule(command)
        return True

    def on_output(self, agent_id: str, message: Output) -> bool:
        owned, command = self.owned(agent_id, message.command_id)
        if command is None:
            return owned
        data = message.data
        size = len(data.encode("utf-8", "replace"))
        cap = self.config.output_cap
        if command.output_bytes >= cap:
            if not command.truncated:
                command.truncated = True
            return True
        if command.output_bytes + size > cap:
            room = cap - command.output_bytes
            data = data.encode("utf-8", "replace")[:room].decode("utf-8", "ignore")
            size = room
            command.truncated = True
        command.output_bytes += size
        self.store.add_output(command.command_id, message.seq, message.stream, data)
        if self.bus.wanted("commands"):
            self.bus.publish(
                "commands",
                "output",
                None,
                command_id=command.command_id,
                agent_id=agent_id,
                seq=message.seq,
                stream=message.stream,
                data=data,
            )
        return True

    def on_result(self, agent_id: str, message: Result) -> bool:
        owned, command = self.owned(agent_id, message.command_id)
        if command is None:
            return owned
        command.result = {
            "status": message.status,
            "exit_code": message.exit_code,
            "data": message.data,
            "error": message.error,
        }
        if command.state == "queued":
            self._mark_in_flight(command)
        self.metrics.command_round_trip(self.clock() - command.issued_at)
        self._finish(command, message.status)
        return True

    def _mark_in_flight(self, command: CommandRecord) -> None:
        """A command answered before its ``sent`` was recorded (redelivery after a crash)."""
        if command.state == "queued":
            command.sent_at = command.sent_at or self.clock()
            self.in_flight += 1
            run = self.jobs.get(command.job_id)
            if run is not None:
                run.in_flight += 1
                try:
                    run.waiting.remove(command)
                except ValueError:
                    pass

    # -- cancel --------------------------------------------------------------------------

    def cancel_command(self, command_id: str, actor: str) -> str:
        """``cancelled`` (at once), ``requested`` (sent to the agent) or ``finished``."""
        command = self.commands.get(command_id)
        if command is None or command.state in TERMINAL_STATES:
            return "finished"
        if command.state == "queued" or command.agent_id not in self.registry.live:
            command.result = {
                "status": "cancelled",
                "exit_code": None,
                "data": None,
                "error": f"cancelled by {actor}",
            }
            self._finish(command, "cancelled", actor=actor)
            return "cancelled"
        if not command.cancel_requested:
            command.cancel_requested = True
            self.auditor.record("command.cancel_requested", actor=actor, subject=command_id)
        self.send(command.agent_id, encode({"type": "cancel", "command_id": command_id}))
        return "requested"

    def cancel_job(self, job_id: str, actor: str) -> dict[str, list[str]] | None:
        run = self.jobs.get(job_id)
        if run is None:
            return None
        run.cancelled_by = run.cancelled_by or actor
        outcome: dict[str, list[str]] = {"cancelled": [], "requested": []}
        for command in [c for c in self.commands.values() if c.job_id == job_id]:
            result = self.cancel_command(command.command_id, actor)
            if result in outcome:
                outcome[result].append(command.command_id)
        return outcome

    # -- time ----------------------------------------------------------------------------

    def _schedule(self, command: CommandRecord) -> None:
        if command.state == "acked" and command.acked_at is not None:
            when = command.acked_at + command.timeout + self.config.timeout_grace
        elif command.state in ("queued", "sent"):
            when = command.expires_at
        else:
            return
        heapq.heappush(self._deadlines, (when, command.seq, command.command_id))

    def tick(self) -> None:
        """Expire queued commands and time out unanswered ones (called about once a second)."""
        now = self.clock()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, _, command_id = heapq.heappop(deadlines)
            command = self.commands.get(command_id)
            if command is None or command.state in TERMINAL_STATES:
                continue
            if command.state == "queued" and command.expires_at <= now:
                command.result = {
                    "status": "expired",
                    "exit_code": None,
                    "data": None,
                    "error": "not delivered before expires_at",
                }
                self._finish(command, "expired")
            elif command.state == "sent" and command.expires_at <= now:
                command.result = {
                    "status": "timed_out",
                    "exit_code": None,
                    "data": None,
                    "error": "not acknowledged before expires_at",
                }
                self._finish(command, "timed_out")
            elif command.state == "acked" and command.acked_at is not None:
                limit = command.acked_at + command.timeout + self.config.timeout_grace
                if limit <= now:
                    command.result = {
                        "status": "timed_out",
                        "exit_code": None,
                        "data": None,
                        "error": f"no result within {command.timeout:g} s of the ack",
                    }
                    self.send(
                        command.agent_id,
                        encode({"type": "cancel", "command_id": command.command_id}),
                    )
                    self._finish(command, "timed_out")

    # -- transitions ---------------------------------------------------------------------

    def _finish(self, command: CommandRecord, state: str, actor: str | None = None) -> None:
        was_in_flight = command.state in ("sent", "acked")
        self._transition(command, state, actor=actor)
        if was_in_flight:
            self.in_flight -= 1
        del self.commands[command.command_id]
        siblings = self.by_agent.get(command.agent_id)
        if siblings is not None:
            siblings.remove(command)
            if not siblings:
                del self.by_agent[command.agent_id]
        finished = self._finished
        finished[command.command_id] = command.agent_id
        if len(finished) > RECENT_FINISHED:
            finished.popitem(last=False)
        run = self.jobs.get(command.job_id)
        if run is None:
            return
        if was_in_flight:
            run.in_flight -= 1
        run.remaining -= 1
        if state == "succeeded":
            run.successes += 1
        elif state in ERROR_STATES:
            run.errors += 1
            if run.error_limit is not None and run.errors > run.error_limit:
                self._stop_job(run)
        if run.remaining <= 0:
            self._finish_job(run)
        else:
            # Bounded like every delivery: a result that lands while a job to the whole fleet
            # is still being delivered must not send all the rest in this one callback.
            self._pump(run, limit=DELIVERY_SLICE)

    def _stop_job(self, run: JobRun) -> None:
        """``max_errors`` passed: cancel what has not finished."""
        if run.cancelled_by is not None:
            return
        run.cancelled_by = "max_errors"
        self.auditor.record(
            "job.max_errors", subject=run.record.job_id, errors=run.errors, limit=run.error_limit
        )
        run.waiting.clear()
        for command in [c for c in self.commands.values() if c.job_id == run.record.job_id]:
            self.cancel_command(command.command_id, "max_errors")

    def _transition(self, command: CommandRecord, state: str, actor: str | None = None) -> None:
        old = command.state
        if STATE_RANK[state] <= STATE_RANK[old]:
            return
        command.state = state
        command.updated_at = self.clock()
        run = self.jobs.get(command.job_id)
        if run is not None:
            counts = run.record.counts
            counts[old] = counts.get(old, 0) - 1
            if counts[old] <= 0:
                del counts[old]
            counts[state] = counts.get(state, 0) + 1
        self.metrics.command_state(state)
        entry = self.auditor.entry(
            f"command.{state}",
            actor=actor or command.dispatched_by,
            subject=command.command_id,
            agent_id=command.agent_id,
            job_id=command.job_id,
        )
        self._pending.append((command, entry))
        self._schedule_flush(urgent=state in TERMINAL_STATES)

    def _schedule_flush(self, urgent: bool) -> None:
        handle = self._flush_handle
        if urgent:
            # A result is on someone's critical path: write it at the end of this turn.
            if handle is None or self._flush_delayed:
                if handle is not None:
                    handle.cancel()
                self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)
                self._flush_delayed = False
        elif handle is None:
            # sent and acked are not waited for: hold them briefly so that they usually
            # share one commit with the result that follows.
            self._flush_handle = asyncio.get_running_loop().call_later(
                NON_TERMINAL_HOLD, self._flush
            )
            self._flush_delayed = True

    def _flush(self) -> None:
        """Write this turn's transitions in one store call; announce them once committed."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._flush_delayed = False
        # A slice per turn of the event loop: a job to the whole fleet finishes in bursts
        # of thousands of transitions, and each costs a view and a row.
        pending, self._pending = self._pending[:FLUSH_SLICE], self._pending[FLUSH_SLICE:]
        if not pending:
            return
        if self._pending:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)
        latest: dict[str, CommandRecord] = {}
        jobs: list[JobRecord] = []
        for record, _ in pending:
            if type(record) is CommandRecord:
                latest[record.command_id] = record
            else:
                # Queued after its commands' last transitions, so in this slice or a later
                # one: a job row never runs ahead of its commands.
                jobs.append(record)
        entries = [entry for _, entry in pending]
        future = asyncio.ensure_future(
            self.store.save_commands(list(latest.values()), entries, jobs)
        )
        # Taken after the write is queued (a result's commit is on the round trip's critical
        # path) but in the same callback, so they show what was written.
        views = [c.view() for c in latest.values()] if self.bus.wanted("commands") else []
        self._writes.add(future)
        future.add_done_callback(lambda f: self._written(f, views))

    def _written(self, future: asyncio.Future[None], views: list[dict[str, Any]]) -> None:
        self._writes.discard(future)
        if future.cancelled() or future.exception() is not None:
            log.error("saving command transitions failed: %s", future.exception())
            return
        self._announce_all(views)

    def _announce_all(self, views: list[dict[str, Any]]) -> None:
        for view in views[:FLUSH_SLICE]:
            self._announce(view)
        if len(views) > FLUSH_SLICE:
            asyncio.get_running_loop().call_soon(self._announce_all, views[FLUSH_SLICE:])

    def _announce_queued(self, commands: list[CommandRecord]) -> None:
        """Announce new commands a slice per turn; one that already moved on is announced
        by its next transition, once that is stored."""
        for view in self._queued_views(commands[:FLUSH_SLICE]):
            self._announce(view)
        if len(commands) > FLUSH_SLICE:
            asyncio.get_running_loop().call_soon(self._announce_queued, commands[FLUSH_SLICE:])

    @staticmethod
    def _queued_views(commands: list[CommandRecord]) -> list[dict[str, Any]]:
        return [command.view() for command in commands if command.state == "queued"]

    def _announce(self, view: dict[str, Any]) -> None:
        self.bus.publish("commands", "state", view["command_id"], command=view)

    def _finish_job(self, run: JobRun) -> None:
        if run.finished:
            return
        run.finished = True
        job = run.record
        del self.jobs[job.job_id]
        if run.successes == job.total:
            job.state = "succeeded"
        elif run.cancelled_by is not None and run.cancelled_by != "max_errors":
            job.state = "cancelled"
        elif run.successes == 0:
            job.state = "failed"
        else:
            job.state = "partial"
        job.updated_at = self.clock()
        entry = self.auditor.entry(
            "job.finished", subject=job.job_id, state=job.state, counts=dict(job.counts)
        )
        # In the same commit as the transition that finished it: one fsync, not two, at
        # the end of every job (a job of one command is a round trip's last write).
        self._pending.append((job, entry))
        self._schedule_flush(urgent=True)

    async def drain(self) -> None:
        """Wait for every transition made so far to be stored."""
        while self._pending or self._writes:
            self._flush()
            if self._writes:
                await asyncio.gather(*list(self._writes), return_exceptions=True)

    # -- queries -------------------------------------------------------------------------

    def job_view(self, job_id: str) -> dict[str, Any] | None:
        run = self.jobs.get(job_id)
        return run.record.view() if run is not None else None

    def commands_of_agent(self, agent_id: str) -> list[CommandRecord]:
        return list(self.by_agent.get(agent_id, ()))
