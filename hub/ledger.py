"""The command ledger: the I/O around :mod:`hub.ledger_rules`.

The rules decide (states, job counts, the window, timeouts, cancels); this module accepts
jobs into the store, hands commands to agents through ``send``, writes every transition
and announces it once written:

* Every transition is stored durably before it is announced. Transitions made during one
  turn of the event loop are written together (one store call, one commit); their events
  go out when that write has committed, with the state as it was written.
* Delivery is at least once: a command that was sent and has no result is sent again on
  the agent's next connection, with the same id. The agent guarantees at most once.

Only unfinished commands and running jobs stay in memory; finished ones live in the store.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .audit import Auditor
from .bus import Bus
from .config import HubConfig
from .ledger_rules import (
    CancelOnAgent,
    CancelRequested,
    Deliver,
    JobFinished,
    JobRun,
    LedgerRules,
    MaxErrorsPassed,
    Moved,
    resolve_limit,
)
from .metrics import Metrics
from .model import CommandRecord, JobRecord
from .protocol.codec import encode
from .protocol.messages import Dispatch, Output, Result
from .protocol.states import TERMINAL_STATES, CommandState
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
#: A failed write is tried again after this long, doubling up to the maximum (seconds).
RETRY_FIRST = 0.25
RETRY_MAX = 5.0


class DispatchRefused(Exception):
    """No target is left after the checks; nothing was accepted."""

    def __init__(self, code: str, message: str, refused: list[dict[str, str]]) -> None:
        super().__init__(message)
        self.code = code
        self.refused = refused


def select_targets(registry: Registry, request: Dispatch) -> tuple[list[str], list[dict[str, str]]]:
    """The agents a dispatch reaches, and those refused (``not_found``, ``unsupported``)."""
    records = registry.records
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
        candidates = registry.select(target.selector)
    for record in candidates:
        if request.name in record.capabilities:
            targets.append(record.agent_id)
        else:
            refused.append({"agent_id": record.agent_id, "code": "unsupported"})
    return targets, refused


async def accept_job(
    request: Dispatch,
    actor: str,
    audit: Sequence[AuditEntry],
    *,
    targets: tuple[list[str], list[dict[str, str]]],
    store: Store,
    auditor: Auditor,
    now: float,
    seq: Iterator[int],
    job_id: str | None = None,
) -> tuple[JobRecord, list[CommandRecord], list[dict[str, str]]]:
    """Make a job and its queued commands and store them, with their audit entries, in one
    transaction: after this the job is accepted, whatever happens to this hub.

    Raises :class:`DispatchRefused` (its audit entries stored on their own) when no
    target is left."""
    chosen, refused = targets
    if not chosen:
        for entry in audit:
            auditor.queue(entry)
        codes = {r["code"] for r in refused}
        code = "unsupported" if "unsupported" in codes else "not_found"
        raise DispatchRefused(code, f"no target can run {request.name!r}", refused)
    job_id = job_id or secrets.token_hex(8)
    total = len(chosen)
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
        max_concurrency=resolve_limit(request.max_concurrency, total, 1),
        max_errors=resolve_limit(request.max_errors, total, 0),
        counts={CommandState.QUEUED.value: total},
        updated_at=now,
        spec={
            "max_concurrency": request.max_concurrency,
            "max_errors": request.max_errors,
            "refused": len(refused),
        },
    )
    commands: list[CommandRecord] = []
    entries = [
        *audit,
        auditor.entry(
            "job.dispatch",
            actor=actor,
            subject=job_id,
            name=request.name,
            targets=total,
            refused=len(refused),
        ),
    ]
    for index, agent_id in enumerate(chosen, 1):
        command = CommandRecord(
            command_id=secrets.token_hex(12),
            job_id=job_id,
            agent_id=agent_id,
            name=request.name,
            args=request.args,
            timeout=request.timeout,
            issued_at=now,
            expires_at=now + request.ttl,
            seq=next(seq),
            updated_at=now,
            dispatched_by=actor,
        )
        commands.append(command)
        entries.append(
            auditor.entry(
                "command.queued", actor=actor, subject=command.command_id, agent_id=agent_id
            )
        )
        if index % DELIVERY_SLICE == 0:
            await asyncio.sleep(0)  # a job to the whole fleet must not stall the loop
    await store.add_job(job, commands, entries)
    return job, commands, refused


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
        self.rules = LedgerRules(clock, config.timeout_grace)
        self._seq = itertools.count(1)
        self._pending: list[tuple[CommandRecord | JobRecord, AuditEntry]] = []
        #: Command id -> its transitions in ``_pending``. A slice announces a command only
        #: when it holds the last of them: the record is one object, so an earlier slice
        #: already shows (and stores) the latest state, and would announce it twice.
        self._unflushed: dict[str, int] = {}
        self._flush_handle: asyncio.Handle | None = None
        self._flush_delayed = False
        self._writes: set[asyncio.Future[Any]] = set()
        #: Writes that failed (each is retried: see _written), and when the next try is.
        self.failed_writes = 0
        self._retry_delay = 0.0
        self._retry_handle: asyncio.TimerHandle | None = None
        self._closed = False
        #: Told when a write fails (the cluster's leader gives up its lead: its successor
        #: starts again from the store, which is the truth).
        self.on_write_failed: Callable[[BaseException | None], None] = lambda exc: None

    # The rules' state, read by the admin queries, metrics and tests.

    @property
    def commands(self) -> dict[str, CommandRecord]:
        return self.rules.commands

    @property
    def jobs(self) -> dict[str, JobRun]:
        return self.rules.jobs

    @property
    def in_flight(self) -> int:
        return self.rules.in_flight

    @property
    def draining(self) -> set[str]:
        return self.rules.draining

    # -- start-up ------------------------------------------------------------------------

    async def load(self) -> None:
        """Rebuild unfinished jobs and commands after a restart (or a crash)."""
        jobs, commands, top = await self.store.unfinished()
        self._seq = itertools.count(top + 1)
        self.rules.load(jobs, commands)
        self._perform()
        log.info("ledger loaded: %d unfinished commands in %d jobs", len(commands), len(jobs))

    # -- dispatch ------------------------------------------------------------------------

    async def dispatch(
        self, request: Dispatch, actor: str, audit: Sequence[AuditEntry] = ()
    ) -> dict[str, Any]:
        """Accept a job: one durable ``queued`` command per target, then deliver.

        ``audit`` entries (the request as the admin channel saw it) are stored in the job's
        own transaction, or on their own if nothing is accepted."""
        job, commands, refused = await accept_job(
            request,
            actor,
            audit,
            targets=select_targets(self.registry, request),
            store=self.store,
            auditor=self.auditor,
            now=self.clock(),
            seq=self._seq,
        )
        await self.start(job, commands)
        return {
            "job_id": job.job_id,
            "command_ids": [c.command_id for c in commands],
            "refused": refused,
        }

    async def start(self, job: JobRecord, commands: list[CommandRecord]) -> None:
        """Run a job the store has accepted: register its commands, deliver, announce."""
        # Every command of an accepted job is registered in one go, so that a cancel or a
        # lookup never sees part of a job.
        self.rules.add_job(job, commands)
        total = len(commands)
        self.metrics.commands[CommandState.QUEUED.value] += total
        if total > DELIVERY_SLICE:
            await asyncio.sleep(0)  # registering 10,000 took ~10 ms: delivery starts next turn
        # Views taken before delivery moves them on; one that moved already (its agent came
        # back in the meantime) is announced by its next transition, once that is stored.
        views = self._queued_views(commands[:FLUSH_SLICE]) if self.bus.wanted("commands") else []
        # Deliver first and announce after: delivery is on the round trip's critical path,
        # the announcement is not. In slices, so that a job to the whole fleet never stalls
        # the event loop.
        job_id = job.job_id
        more = self.rules.pump(job_id, DELIVERY_SLICE)
        self._perform()
        for view in views:
            self._announce(view)
        if total > FLUSH_SLICE:
            asyncio.get_running_loop().call_soon(self._announce_queued, commands[FLUSH_SLICE:])
        while more:
            await asyncio.sleep(0)
            more = self.rules.pump(job_id, DELIVERY_SLICE)
            self._perform()

    # -- agents coming and going ---------------------------------------------------------

    def agent_connected(self, agent_id: str) -> None:
        """Deliver every unfinished command of this agent, in the order they were accepted."""
        self.rules.agent_connected(agent_id)
        self._perform()

    def agent_disconnected(self, agent_id: str) -> None:
        self.rules.agent_disconnected(agent_id)

    def set_draining(self, agent_id: str, draining: bool) -> None:
        self.rules.set_draining(agent_id, draining)
        self._perform()

    # -- messages from agents ------------------------------------------------------------

    def on_ack(self, agent_id: str, command_id: str) -> bool:
        """False when the command is not this agent's (the caller answers the error)."""
        owned, command = self.rules.owned(agent_id, command_id)
        if command is not None:
            self.rules.ack(command)
            self._perform()
        return owned

    def on_output(self, agent_id: str, message: Output) -> bool:
        owned, command = self.rules.owned(agent_id, message.command_id)
        if command is None:
            return owned
        data = message.data
        size = len(data.encode("utf-8", "replace"))
        cap = self.config.output_cap
        if command.output_bytes >= cap:
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
        owned, command = self.rules.owned(agent_id, message.command_id)
        if command is None:
            return owned
        self.metrics.command_round_trip(self.clock() - command.issued_at)
        result = {
            "status": message.status,
            "exit_code": message.exit_code,
            "data": message.data,
            "error": message.error,
        }
        self.rules.result(command, message.status, result)
        self._perform()
        return True

    # -- cancel and time -----------------------------------------------------------------

    def cancel_command(self, command_id: str, actor: str) -> str:
        """``cancelled`` (at once), ``requested`` (sent to the agent) or ``finished``."""
        outcome = self.rules.cancel_command(command_id, actor)
        self._perform()
        return outcome

    def cancel_job(self, job_id: str, actor: str) -> dict[str, list[str]] | None:
        outcome = self.rules.cancel_job(job_id, actor)
        self._perform()
        return outcome

    def cancel_now(self, job_id: str | None, command_id: str | None, actor: str) -> dict[str, Any]:
        """Cancel a job or a command: ``{"cancelled", "requested", "finished"}``, where
        ``finished`` means nothing of it was running (it may not exist at all)."""
        if job_id is not None:
            outcome = self.cancel_job(job_id, actor)
            if outcome is None:
                return {"cancelled": [], "requested": [], "finished": True}
            return {**outcome, "finished": False}
        assert command_id is not None
        result = self.cancel_command(command_id, actor)
        return {
            "cancelled": [command_id] if result == "cancelled" else [],
            "requested": [command_id] if result == "requested" else [],
            "finished": result == "finished",
        }

    async def cancel(
        self, job_id: str | None, command_id: str | None, actor: str
    ) -> dict[str, Any]:
        return self.cancel_now(job_id, command_id, actor)

    def tick(self) -> None:
        """Expire queued commands and time out unanswered ones (called about once a second)."""
        self.rules.tick()
        self._perform()

    # -- effects -------------------------------------------------------------------------

    def _perform(self) -> None:
        """Carry out what the rules decided, in order."""
        for effect in self.rules.take_effects():
            kind = type(effect)
            if kind is Moved:
                self._moved(effect)  # type: ignore[arg-type]
            elif kind is Deliver:
                command = effect.command  # type: ignore[union-attr]
                # A connection that is going away refuses it; the command is sent again
                # when its agent comes back, like any command sent and unanswered.
                self.send(command.agent_id, encode(command.wire()))
            elif kind is CancelOnAgent:
                self.send(
                    effect.agent_id,  # type: ignore[union-attr]
                    encode({"type": "cancel", "command_id": effect.command_id}),  # type: ignore[union-attr]
                )
            elif kind is JobFinished:
                job = effect.job  # type: ignore[union-attr]
                entry = self.auditor.entry(
                    "job.finished", subject=job.job_id, state=job.state, counts=dict(job.counts)
                )
                # In the same commit as the transition that finished it: one fsync, not two,
                # at the end of every job (a job of one command is a round trip's last write).
                self._pending.append((job, entry))
                self._schedule_flush(urgent=True)
            elif kind is CancelRequested:
                self.auditor.record(
                    "command.cancel_requested",
                    actor=effect.actor,  # type: ignore[union-attr]
                    subject=effect.command_id,  # type: ignore[union-attr]
                )
            elif kind is MaxErrorsPassed:
                self.auditor.record(
                    "job.max_errors",
                    subject=effect.job_id,  # type: ignore[union-attr]
                    errors=effect.errors,  # type: ignore[union-attr]
                    limit=effect.limit,  # type: ignore[union-attr]
                )

    def _moved(self, moved: Moved) -> None:
        command = moved.command
        self.metrics.command_state(moved.new)
        entry = self.auditor.entry(
            f"command.{moved.new}",
            actor=moved.actor or command.dispatched_by,
            subject=command.command_id,
            agent_id=command.agent_id,
            job_id=command.job_id,
        )
        self._pending.append((command, entry))
        unflushed = self._unflushed
        unflushed[command.command_id] = unflushed.get(command.command_id, 0) + 1
        self._schedule_flush(urgent=moved.new in TERMINAL_STATES)

    # -- writing and announcing ----------------------------------------------------------

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
        if self._closed:
            return
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
        jobs: dict[str, JobRecord] = {}
        running = self.rules.jobs
        unflushed = self._unflushed
        for record, _ in pending:
            if type(record) is CommandRecord:
                command_id = record.command_id  # type: ignore[union-attr]
                latest[command_id] = record  # type: ignore[assignment]
                left = unflushed.get(command_id, 1) - 1
                if left > 0:
                    unflushed[command_id] = left
                else:
                    unflushed.pop(command_id, None)
                run = running.get(record.job_id)
                if run is not None:
                    # A running job's row follows its counts, so whoever reads the store
                    # (another hub, a restart) sees the job as it stands.
                    jobs[record.job_id] = run.record
            else:
                # Queued after its commands' last transitions, so in this slice or a later
                # one: a finished job's row never runs ahead of its commands.
                jobs[record.job_id] = record  # type: ignore[assignment]
        entries = [entry for _, entry in pending]
        future = asyncio.ensure_future(
            self.store.save_commands(list(latest.values()), entries, list(jobs.values()))
        )
        # Taken after the write is queued (a result's commit is on the round trip's critical
        # path) but in the same callback, so they show what was written.
        views = (
            [c.view() for i, c in latest.items() if i not in unflushed]
            if self.bus.wanted("commands")
            else []
        )
        self._writes.add(future)
        future.add_done_callback(lambda f: self._written(f, views, pending))

    def _written(
        self,
        future: asyncio.Future[None],
        views: list[dict[str, Any]],
        pending: list[tuple[CommandRecord | JobRecord, AuditEntry]],
    ) -> None:
        self._writes.discard(future)
        failure = future.exception() if not future.cancelled() else None
        if future.cancelled() or failure is not None:
            # Nothing of it is stored, so nothing of it is announced. The same records go
            # again (with whatever state they have reached by then) until a write takes
            # them: transitions the ledger has made are never dropped.
            self.failed_writes += 1
            # Logged when a run of failures starts; the store logs its own condition at a
            # slow pace while it lasts (a full disk must not fill the log as well).
            level = logging.ERROR if self._retry_delay == 0.0 else logging.DEBUG
            log.log(
                level, "saving command transitions failed (%d waiting): %s", len(pending), failure
            )
            if self._closed:
                return
            self._pending[:0] = pending
            unflushed = self._unflushed
            for record, _ in pending:
                if type(record) is CommandRecord:
                    command_id = record.command_id  # type: ignore[union-attr]
                    unflushed[command_id] = unflushed.get(command_id, 0) + 1
            self._retry_delay = min(RETRY_MAX, max(RETRY_FIRST, self._retry_delay * 2))
            if self._retry_handle is not None:
                self._retry_handle.cancel()  # one retry at a time, however many slices failed
            self._retry_handle = asyncio.get_running_loop().call_later(
                self._retry_delay, self._flush
            )
            self.on_write_failed(failure)
            return
        self._retry_delay = 0.0
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
        return [c.view() for c in commands if c.state == CommandState.QUEUED.value]

    def _announce(self, view: dict[str, Any]) -> None:
        self.bus.publish("commands", "state", view["command_id"], command=view)

    def close(self) -> None:
        """Stop writing (a cluster leader that lost its lead): nothing is retried after."""
        self._closed = True
        if self._retry_handle is not None:
            self._retry_handle.cancel()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._pending.clear()
        self._unflushed.clear()

    async def settled(self) -> bool:
        """Wait until every transition made so far is stored (not those made meanwhile);
        False when a write failed."""
        while self._pending:
            self._flush()
        writes = list(self._writes)
        outcomes = await asyncio.gather(*writes, return_exceptions=True) if writes else []
        return not any(isinstance(outcome, BaseException) for outcome in outcomes)

    async def drain(self) -> None:
        """Wait for every transition made so far to be stored."""
        while self._pending or self._writes:
            self._flush()
            if self._writes:
                outcomes = await asyncio.gather(*list(self._writes), return_exceptions=True)
                if any(isinstance(outcome, BaseException) for outcome in outcomes):
                    await asyncio.sleep(RETRY_FIRST)  # the store cannot write: no busy loop

    # -- queries -------------------------------------------------------------------------

    def job_view(self, job_id: str) -> dict[str, Any] | None:
        run = self.rules.jobs.get(job_id)
        return run.record.view() if run is not None else None

    def unfinished_of_job(self, job_id: str) -> dict[str, CommandRecord]:
        run = self.rules.jobs.get(job_id)
        if run is None:
            return {}
        return {c.command_id: c for c in run.unfinished()}
