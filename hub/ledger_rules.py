"""The ledger's rules without I/O: command states, job counts, the concurrency window.

Sans-I/O, like websockets' protocol objects: calls come in (a job accepted, an agent
connected or gone, an ack, a result, a cancel, the clock moving) and what must happen
goes out as *effects*, which the caller takes with :meth:`LedgerRules.take_effects` and
performs in order: hand a command to an agent, send a cancel, store and then announce a
transition, store a finished job. Nothing here touches a socket, a store, a bus or an
event loop, so every rule is tested with a fake clock and random interleavings
(``tests/hub/test_ledger_rules.py``); :mod:`hub.ledger` drives it and does the I/O.

Rules (PROTOCOL §4.3, §5):

* A state only moves forward, along :data:`~hub.protocol.states.NEXT_STATES`.
* A job finishes exactly once, when its last command does; its counts always add up to
  its total.
* A job never has more than ``max_concurrency`` commands sent and unfinished. Once more
  than ``max_errors`` of them ended in error, nothing more of it is delivered and the rest
  is cancelled.
* A command is only ever delivered to the agent it is addressed to, and only while that
  agent is connected and not draining; a command sent and unfinished is delivered again,
  with its pending cancel, each time its agent reconnects.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .model import CommandRecord, JobRecord
from .protocol.states import (
    ERROR_STATES,
    IN_FLIGHT_STATES,
    TERMINAL_STATES,
    CommandState,
    JobState,
    can_move,
)

__all__ = [
    "CancelOnAgent",
    "CancelRequested",
    "Deliver",
    "Effect",
    "JobFinished",
    "JobRun",
    "LedgerRules",
    "MaxErrorsPassed",
    "Moved",
    "resolve_limit",
]

#: Finished command ids remembered to tell a harmless repeated result from a foreign one.
RECENT_FINISHED = 20_000
#: Commands one result may hand out when it frees a slot of a big job's window: the rest
#: follow with the next results or the caller's next :meth:`LedgerRules.pump`.
PUMP_SLICE = 500

# Records hold plain strings (they are stored and serialized as they are): the members' values.
QUEUED, SENT, ACKED = CommandState.QUEUED.value, CommandState.SENT.value, CommandState.ACKED.value
SUCCEEDED, CANCELLED = CommandState.SUCCEEDED.value, CommandState.CANCELLED.value
TIMED_OUT, EXPIRED = CommandState.TIMED_OUT.value, CommandState.EXPIRED.value


# -- effects ---------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Deliver:
    """Hand ``command`` to its agent (``again``: a redelivery with the same id)."""

    command: CommandRecord
    again: bool = False


@dataclass(slots=True, frozen=True)
class CancelOnAgent:
    """Ask the agent to stop a command it was handed."""

    agent_id: str
    command_id: str


@dataclass(slots=True, frozen=True)
class Moved:
    """``command`` moved from ``old`` to its current state: store it, then announce it."""

    command: CommandRecord
    old: str
    new: str
    actor: str | None


@dataclass(slots=True, frozen=True)
class JobFinished:
    """The job's last command finished: store the job (with that command's transition)."""

    job: JobRecord


@dataclass(slots=True, frozen=True)
class CancelRequested:
    """A cancel was asked of an agent for the first time (for the audit trail)."""

    command_id: str
    actor: str


@dataclass(slots=True, frozen=True)
class MaxErrorsPassed:
    """A job passed ``max_errors`` and is being stopped (for the audit trail)."""

    job_id: str
    errors: int
    limit: int | None


Effect = Deliver | CancelOnAgent | Moved | JobFinished | CancelRequested | MaxErrorsPassed


# -- jobs ------------------------------------------------------------------------------


def resolve_limit(value: int | str | None, total: int, floor: int) -> int | None:
    """A ``max_concurrency``/``max_errors`` of a dispatch as a count of this job's targets."""
    if value is None:
        return None
    if isinstance(value, str):
        return max(floor, math.floor(total * int(value[:-1]) / 100))
    return value


@dataclass(slots=True, eq=False)
class JobRun:
    """A running job: its unfinished commands and its rate-control window."""

    record: JobRecord
    window: int | None
    error_limit: int | None
    remaining: int = 0
    in_flight: int = 0
    errors: int = 0
    successes: int = 0
    #: Who stopped the job (an actor, or ``max_errors``); nothing new is delivered after.
    cancelled_by: str | None = None
    finished: bool = False
    #: Every command of the job that was unfinished when the job (re)started.
    commands: list[CommandRecord] = field(default_factory=list)
    #: Queued commands of deliverable agents waiting for a slot in the window, and their ids
    #: (entries that moved on meanwhile are skipped when their turn comes).
    waiting: deque[CommandRecord] = field(default_factory=deque)
    waiting_ids: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, job: JobRecord) -> JobRun:
        return cls(record=job, window=job.max_concurrency, error_limit=job.max_errors)

    def has_room(self) -> bool:
        return self.cancelled_by is None and (self.window is None or self.in_flight < self.window)

    def wait(self, command: CommandRecord) -> None:
        if command.command_id not in self.waiting_ids:
            self.waiting_ids.add(command.command_id)
            self.waiting.append(command)

    def unfinished(self) -> list[CommandRecord]:
        return [c for c in self.commands if c.state not in TERMINAL_STATES]


# -- the rules -------------------------------------------------------------------------


class LedgerRules:
    """Every unfinished command and running job, and what happens to them next."""

    def __init__(self, clock: Callable[[], float], timeout_grace: float = 5.0) -> None:
        self.clock = clock
        self.timeout_grace = timeout_grace
        self.commands: dict[str, CommandRecord] = {}
        self.by_agent: dict[str, list[CommandRecord]] = {}
        self.jobs: dict[str, JobRun] = {}
        #: Commands sent and unfinished, across jobs.
        self.in_flight = 0
        #: Agents with a live connection (anywhere, in cluster mode) and those draining.
        self.connected: set[str] = set()
        self.draining: set[str] = set()
        self._deadlines: list[tuple[float, int, str]] = []
        self._finished: OrderedDict[str, str] = OrderedDict()
        self._effects: list[Effect] = []

    def take_effects(self) -> list[Effect]:
        """What the last calls decided, in order; the caller performs each."""
        effects, self._effects = self._effects, []
        return effects

    # -- loading and accepting --------------------------------------------------------

    def load(self, jobs: Iterable[JobRecord], commands: Iterable[CommandRecord]) -> None:
        """Unfinished jobs and commands as stored (after a restart or a crash).

        A job whose commands all finished before the crash let its own row fall behind is
        finished now (and stored again by the caller through the effect)."""
        runs = {job.job_id: JobRun.of(job) for job in jobs}
        for command in commands:
            self._register(command)
            run = runs.get(command.job_id)
            if run is not None:
                run.commands.append(command)
                run.remaining += 1
                if command.state in IN_FLIGHT_STATES:
                    run.in_flight += 1
            if command.state in IN_FLIGHT_STATES:
                self.in_flight += 1
        for run in runs.values():
            counts = run.record.counts
            run.errors = sum(counts.get(s, 0) for s in ERROR_STATES)
            run.successes = counts.get(SUCCEEDED, 0)
            self.jobs[run.record.job_id] = run
            if run.remaining == 0:
                self._finish_job(run)

    def add_job(self, job: JobRecord, commands: list[CommandRecord]) -> JobRun:
        """A job the store has accepted, with one queued command per target. Nothing is
        delivered yet: the caller calls :meth:`pump` (in slices, for big jobs)."""
        run = JobRun.of(job)
        run.commands = commands
        run.remaining = len(commands)
        self.jobs[job.job_id] = run
        for command in commands:
            self._register(command)
            if self.deliverable(command.agent_id):
                run.wait(command)
        return run

    def _register(self, command: CommandRecord) -> None:
        self.commands[command.command_id] = command
        self.by_agent.setdefault(command.agent_id, []).append(command)
        self._schedule(command)

    # -- delivery ---------------------------------------------------------------------

    def deliverable(self, agent_id: str) -> bool:
        return agent_id in self.connected and agent_id not in self.draining

    def pump(self, job_id: str, limit: int | None = None) -> bool:
        """Deliver waiting commands of a job while its window has room, at most ``limit``.
        True while more are waiting and the window has room (call again next turn)."""
        run = self.jobs.get(job_id)
        return run is not None and self._pump(run, limit)

    def _pump(self, run: JobRun, limit: int | None = None) -> bool:
        waiting = run.waiting
        budget = len(waiting) if limit is None else limit
        while waiting and budget > 0 and run.has_room():
            budget -= 1
            command = waiting.popleft()
            run.waiting_ids.discard(command.command_id)
            if command.state == QUEUED and self.deliverable(command.agent_id):
                self._deliver(command, run)
        return bool(waiting) and run.has_room()

    def _deliver(self, command: CommandRecord, run: JobRun | None) -> None:
        self._effects.append(Deliver(command))
        command.sent_at = self.clock()
        self._count_in_flight(command, run)
        self._move(command, SENT)

    def _count_in_flight(self, command: CommandRecord, run: JobRun | None) -> None:
        self.in_flight += 1
        if run is not None:
            run.in_flight += 1

    def agent_connected(self, agent_id: str) -> None:
        """Deliver every unfinished command of this agent, in the order they were accepted:
        again (with a pending cancel) what it was handed before, anew what is queued and
        fits its job's window."""
        self.connected.add(agent_id)
        if agent_id in self.draining:
            return
        for command in list(self.by_agent.get(agent_id, ())):
            if command.state in IN_FLIGHT_STATES:
                self._effects.append(Deliver(command, again=True))
                if command.cancel_requested:
                    self._effects.append(CancelOnAgent(agent_id, command.command_id))
            elif command.state == QUEUED:
                run = self.jobs.get(command.job_id)
                if run is None:
                    self._deliver(command, None)
                elif run.has_room():
                    self._deliver(command, run)
                elif run.cancelled_by is None:
                    run.wait(command)

    def agent_disconnected(self, agent_id: str) -> None:
        self.connected.discard(agent_id)
        self.draining.discard(agent_id)

    def set_draining(self, agent_id: str, draining: bool) -> None:
        """A draining agent is sent nothing new until it reports ``ok`` again."""
        if draining:
            self.draining.add(agent_id)
        elif agent_id in self.draining:
            self.draining.discard(agent_id)
            if agent_id in self.connected:
                self.agent_connected(agent_id)

    # -- messages from agents ---------------------------------------------------------

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

    def ack(self, command: CommandRecord) -> None:
        if command.state in (QUEUED, SENT):
            self._mark_in_flight(command)
            command.acked_at = self.clock()
            self._move(command, ACKED)
            self._schedule(command)

    def result(self, command: CommandRecord, status: str, result: dict[str, Any]) -> None:
        command.result = result
        self._unwait(command)
        self._finish(command, status)

    def _mark_in_flight(self, command: CommandRecord) -> None:
        """A command acked before its ``sent`` was recorded (redelivery after a crash)."""
        if command.state == QUEUED:
            command.sent_at = command.sent_at or self.clock()
            self._count_in_flight(command, self.jobs.get(command.job_id))
            self._unwait(command)

    def _unwait(self, command: CommandRecord) -> None:
        """No longer waiting for a slot. Its entry stays in the deque (a removal there costs
        the length of a job) and is skipped when its turn comes: it is not queued any more."""
        run = self.jobs.get(command.job_id)
        if run is not None:
            run.waiting_ids.discard(command.command_id)

    # -- cancel -----------------------------------------------------------------------

    def cancel_command(self, command_id: str, actor: str) -> str:
        """``cancelled`` (at once), ``requested`` (asked of the agent) or ``finished``."""
        command = self.commands.get(command_id)
        if command is None or command.state in TERMINAL_STATES:
            return "finished"
        if command.state == QUEUED or command.agent_id not in self.connected:
            command.result = {
                "status": "cancelled",
                "exit_code": None,
                "data": None,
                "error": f"cancelled by {actor}",
            }
            self._finish(command, CANCELLED, actor=actor)
            return "cancelled"
        if not command.cancel_requested:
            command.cancel_requested = True
            self._effects.append(CancelRequested(command_id, actor))
        self._effects.append(CancelOnAgent(command.agent_id, command_id))
        return "requested"

    def cancel_job(self, job_id: str, actor: str) -> dict[str, list[str]] | None:
        """Cancel what has not finished of a running job; None when it is not running."""
        run = self.jobs.get(job_id)
        if run is None:
            return None
        run.cancelled_by = run.cancelled_by or actor
        return self._cancel_rest(run, actor)

    def _cancel_rest(self, run: JobRun, actor: str) -> dict[str, list[str]]:
        run.waiting.clear()
        run.waiting_ids.clear()
        outcome: dict[str, list[str]] = {"cancelled": [], "requested": []}
        for command in run.unfinished():
            result = self.cancel_command(command.command_id, actor)
            if result in outcome:
                outcome[result].append(command.command_id)
        return outcome

    # -- time -------------------------------------------------------------------------

    def _schedule(self, command: CommandRecord) -> None:
        if command.state == ACKED and command.acked_at is not None:
            when = command.acked_at + command.timeout + self.timeout_grace
        elif command.state in (QUEUED, SENT):
            when = command.expires_at
        else:
            return
        heapq.heappush(self._deadlines, (when, command.seq, command.command_id))

    def next_deadline(self) -> float | None:
        return self._deadlines[0][0] if self._deadlines else None

    def tick(self) -> None:
        """Expire queued commands and time out unanswered ones whose time has come."""
        now = self.clock()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, _, command_id = heapq.heappop(deadlines)
            command = self.commands.get(command_id)
            if command is None or command.state in TERMINAL_STATES:
                continue
            if command.state == QUEUED and command.expires_at <= now:
                self._fail(command, EXPIRED, "not delivered before expires_at")
            elif command.state == SENT and command.expires_at <= now:
                self._fail(command, TIMED_OUT, "not acknowledged before expires_at")
            elif command.state == ACKED and command.acked_at is not None:
                limit = command.acked_at + command.timeout + self.timeout_grace
                if limit <= now:
                    self._effects.append(CancelOnAgent(command.agent_id, command.command_id))
                    self._fail(
                        command, TIMED_OUT, f"no result within {command.timeout:g} s of the ack"
                    )

    def _fail(self, command: CommandRecord, state: str, error: str) -> None:
        command.result = {"status": state, "exit_code": None, "data": None, "error": error}
        self._finish(command, state)

    # -- transitions ------------------------------------------------------------------

    def _move(self, command: CommandRecord, state: str, actor: str | None = None) -> bool:
        old = command.state
        if not can_move(old, state):
            return False
        command.state = state
        command.updated_at = self.clock()
        run = self.jobs.get(command.job_id)
        if run is not None:
            counts = run.record.counts
            left = counts.get(old, 0) - 1
            if left > 0:
                counts[old] = left
            else:
                counts.pop(old, None)
            counts[state] = counts.get(state, 0) + 1
        self._effects.append(Moved(command, old, state, actor))
        return True

    def _finish(self, command: CommandRecord, state: str, actor: str | None = None) -> None:
        was_in_flight = command.state in IN_FLIGHT_STATES
        if not self._move(command, state, actor):
            return
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
        if state == SUCCEEDED:
            run.successes += 1
        elif state in ERROR_STATES:
            run.errors += 1
            if (
                run.error_limit is not None
                and run.errors > run.error_limit
                and run.cancelled_by is None
            ):
                run.cancelled_by = "max_errors"
                self._effects.append(
                    MaxErrorsPassed(run.record.job_id, run.errors, run.error_limit)
                )
                self._cancel_rest(run, "max_errors")
        if run.remaining <= 0:
            self._finish_job(run)
        else:
            # Bounded like every delivery: a result that lands while a job to the whole
            # fleet is still being delivered must not send all the rest at once.
            self._pump(run, PUMP_SLICE)

    def _finish_job(self, run: JobRun) -> None:
        if run.finished:
            return
        run.finished = True
        job = run.record
        del self.jobs[job.job_id]
        if run.successes == job.total:
            job.state = JobState.SUCCEEDED.value
        elif run.cancelled_by is not None and run.cancelled_by != "max_errors":
            job.state = JobState.CANCELLED.value
        elif run.successes == 0:
            job.state = JobState.FAILED.value
        else:
            job.state = JobState.PARTIAL.value
        job.updated_at = self.clock()
        self._effects.append(JobFinished(job))
