"""The ledger's rules as a state machine, without sockets, threads or sleeps.

A Hypothesis stateful test runs random interleavings of dispatch, delivery, ack, result,
cancel (of a command and of a job), the clock moving (timeouts, expiry), ``max_errors``,
agents connecting, draining and leaving, writes reaching the store, and the hub crashing
and restarting from what the store holds, and checks the rules' invariants after every
step. A few plain tests pin the cases found by hand.
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from hub.ledger_rules import (
    CancelOnAgent,
    CancelRequested,
    Deliver,
    JobFinished,
    LedgerRules,
    MaxErrorsPassed,
    Moved,
    resolve_limit,
)
from hub.model import CommandRecord, JobRecord
from hub.protocol.states import (
    IN_FLIGHT_STATES,
    STATE_RANK,
    TERMINAL_STATES,
    can_move,
)
from tests.support import FakeClock

AGENTS = ("a0", "a1", "a2")
RESULTS = ("succeeded", "failed", "rejected", "cancelled", "timed_out")
GRACE = 5.0


class Hub:
    """The rules plus what a hub around them keeps: a store that holds what was written,
    writes that are still pending (lost in a crash), agents' own memory of commands."""

    def __init__(self) -> None:
        self.clock = FakeClock(1000.0)
        self.rules = LedgerRules(self.clock, GRACE)
        self.seq = itertools.count(1)
        self.ids = itertools.count(1)
        #: The store: copies of records as last written.
        self.stored_commands: dict[str, CommandRecord] = {}
        self.stored_jobs: dict[str, JobRecord] = {}
        #: Transitions decided and not yet written (a crash loses them).
        self.pending: list[CommandRecord | JobRecord] = []
        #: Jobs whose finishing reached the store, and how often (must be once).
        self.finished_stored: Counter[str] = Counter()
        #: Commands each agent was ever handed (its journal survives hub crashes).
        self.handed: dict[str, set[str]] = {a: set() for a in AGENTS}
        self.cancels_seen: dict[str, int] = Counter()
        #: Jobs that were stopped (cancelled or past max_errors), in this incarnation.
        self.stopped: set[str] = set()
        #: Each command's state as this incarnation's rules last said.
        self.known: dict[str, str] = {}
        #: Jobs an agent took past their window by acking a command still queued here.
        self.overfull: set[str] = set()
        self.addressed: dict[str, str] = {}
        self.job_of: dict[str, str] = {}
        self.job_total: dict[str, int] = {}


class LedgerRulesMachine(RuleBasedStateMachine):
    commands = Bundle("commands")
    jobs = Bundle("jobs")

    @initialize()
    def start(self) -> None:
        self.hub = Hub()

    # -- helpers -------------------------------------------------------------------------

    @property
    def ledger(self) -> LedgerRules:
        return self.hub.rules

    def perform(self) -> None:
        """Carry out the effects, checking each as it goes."""
        hub = self.hub
        effects = self.ledger.take_effects()
        for index, effect in enumerate(effects):
            if isinstance(effect, Deliver):
                command = effect.command
                agent_id = command.agent_id
                assert agent_id == hub.addressed[command.command_id]
                assert agent_id in self.ledger.connected, "delivered to an agent not connected"
                if not effect.again:
                    assert agent_id not in self.ledger.draining, "new command to a draining agent"
                    assert command.job_id not in hub.stopped, "delivered after the job stopped"
                hub.handed[agent_id].add(command.command_id)
                if effect.again and command.cancel_requested:
                    # A cancel asked of an earlier connection is asked again of this one.
                    assert any(
                        isinstance(later, CancelOnAgent) and later.command_id == command.command_id
                        for later in effects[index + 1 :]
                    ), "a pending cancel was not sent with the redelivery"
            elif isinstance(effect, CancelOnAgent):
                assert effect.agent_id == hub.addressed[effect.command_id]
                hub.cancels_seen[effect.command_id] += 1
            elif isinstance(effect, Moved):
                command = effect.command
                assert effect.old == hub.known[command.command_id], "a transition skipped a state"
                assert can_move(effect.old, effect.new), f"{effect.old} -> {effect.new}"
                assert (
                    command.state == effect.new
                    or STATE_RANK[command.state] > STATE_RANK[effect.new]
                )
                hub.known[command.command_id] = effect.new
                hub.pending.append(command)
            elif isinstance(effect, JobFinished):
                hub.pending.append(effect.job)
            elif isinstance(effect, MaxErrorsPassed):
                hub.stopped.add(effect.job_id)
        self.check_window_after_deliveries()

    def check_window_after_deliveries(self) -> None:
        for job_id, run in self.ledger.jobs.items():
            in_flight = sum(1 for c in run.commands if c.state in IN_FLIGHT_STATES)
            assert run.in_flight == in_flight
            # An agent acking a command handed to it before a crash lost the write may take
            # a job past its window; the hub itself never does.
            if run.window is not None and job_id not in self.hub.overfull:
                assert in_flight <= run.window, f"{in_flight} in flight, window {run.window}"

    # -- rules ---------------------------------------------------------------------------

    @rule(
        target=jobs,
        agents=st.lists(st.sampled_from(AGENTS), min_size=1, max_size=3, unique=True),
        window=st.sampled_from([None, 1, 2, "50%"]),
        max_errors=st.sampled_from([None, 0, 1]),
        ttl=st.sampled_from([5.0, 60.0]),
        timeout=st.sampled_from([2.0, 30.0]),
        slice_=st.sampled_from([1, 2, None]),
    )
    def dispatch(
        self,
        agents: list[str],
        window: Any,
        max_errors: Any,
        ttl: float,
        timeout: float,
        slice_: int | None,
    ) -> Any:
        hub = self.hub
        now = self.hub.clock()
        job_id = f"job-{next(hub.ids)}"
        targets = agents
        job = JobRecord(
            job_id=job_id,
            name="ping",
            args={},
            target={"agent_ids": targets},
            total=len(targets),
            created_at=now,
            timeout=timeout,
            ttl=ttl,
            max_concurrency=resolve_limit(window, len(targets), 1),
            max_errors=resolve_limit(max_errors, len(targets), 0),
            counts={"queued": len(targets)},
            updated_at=now,
        )
        commands = [
            CommandRecord(
                command_id=f"{job_id}/{agent_id}",
                job_id=job_id,
                agent_id=agent_id,
                name="ping",
                args={},
                timeout=timeout,
                issued_at=now,
                expires_at=now + ttl,
                seq=next(hub.seq),
                updated_at=now,
            )
            for agent_id in targets
        ]
        # Accepted durably before anything else happens (the ledger awaits this write).
        hub.stored_jobs[job_id] = copy.copy(job)
        hub.stored_jobs[job_id].counts = dict(job.counts)
        for command in commands:
            hub.stored_commands[command.command_id] = copy.copy(command)
            hub.known[command.command_id] = "queued"
            hub.addressed[command.command_id] = command.agent_id
            hub.job_of[command.command_id] = job_id
        hub.job_total[job_id] = len(targets)
        self.ledger.add_job(job, commands)
        # Delivered a slice per turn of the event loop, as the ledger does for big jobs.
        while self.ledger.pump(job_id, slice_):
            self.perform()
        self.perform()
        return multiple(job_id)

    @rule(target=commands, job_id=jobs)
    def remember_commands(self, job_id: str) -> Any:
        return multiple(*[c for c, j in self.hub.job_of.items() if j == job_id])

    @rule(agent_id=st.sampled_from(AGENTS))
    def connect(self, agent_id: str) -> None:
        if agent_id in self.ledger.connected:
            return
        self.ledger.agent_connected(agent_id)
        self.perform()

    @rule(agent_id=st.sampled_from(AGENTS))
    def disconnect(self, agent_id: str) -> None:
        self.ledger.agent_disconnected(agent_id)
        self.perform()

    @rule(agent_id=st.sampled_from(AGENTS), draining=st.booleans())
    def heartbeat_status(self, agent_id: str, draining: bool) -> None:
        if agent_id in self.ledger.connected:
            self.ledger.set_draining(agent_id, draining)
            self.perform()

    def _answer(self, agent_id: str, command_id: str) -> CommandRecord | None:
        """What the rules make of a reply from ``agent_id``; None when nothing changes."""
        owned, command = self.ledger.owned(agent_id, command_id)
        addressed = self.hub.addressed[command_id]
        if agent_id != addressed:
            assert not owned, "another agent may not answer a command"
            assert command is None
            return None
        if command is not None:
            assert command.agent_id == agent_id
        return command

    @rule(agent_id=st.sampled_from(AGENTS), command_id=commands)
    def ack(self, agent_id: str, command_id: str) -> None:
        if agent_id not in self.ledger.connected:
            return
        if (
            agent_id == self.hub.addressed[command_id]
            and command_id not in self.hub.handed[agent_id]
        ):
            return  # an agent acks only what it was handed
        command = self._answer(agent_id, command_id)
        if command is not None:
            if command.state == "queued":
                self.hub.overfull.add(command.job_id)
            self.ledger.ack(command)
            self.perform()

    @rule(agent_id=st.sampled_from(AGENTS), command_id=commands, status=st.sampled_from(RESULTS))
    def result(self, agent_id: str, command_id: str, status: str) -> None:
        if agent_id not in self.ledger.connected:
            return
        if (
            agent_id == self.hub.addressed[command_id]
            and command_id not in self.hub.handed[agent_id]
        ):
            return
        command = self._answer(agent_id, command_id)
        if command is not None:
            self.ledger.result(command, status, {"status": status})
            self.perform()

    @rule(command_id=commands)
    def cancel_command(self, command_id: str) -> None:
        before = self.hub.known.get(command_id)
        outcome = self.ledger.cancel_command(command_id, "op")
        self.perform()
        if outcome == "cancelled":
            assert self.hub.known[command_id] == "cancelled"
        elif outcome == "requested":
            assert before in IN_FLIGHT_STATES
            assert self.hub.addressed[command_id] in self.ledger.connected

    @rule(job_id=jobs)
    def cancel_job(self, job_id: str) -> None:
        running = job_id in self.ledger.jobs
        outcome = self.ledger.cancel_job(job_id, "op")
        assert (outcome is None) == (not running)
        if running:
            self.hub.stopped.add(job_id)
        self.perform()

    @rule(seconds=st.sampled_from([0.5, 3.0, 8.0, 70.0]))
    def time_passes(self, seconds: float) -> None:
        self.hub.clock.now += seconds
        self.ledger.tick()
        self.perform()

    @rule()
    def writes_reach_the_store(self) -> None:
        hub = self.hub
        for record in hub.pending:
            if isinstance(record, CommandRecord):
                stored = hub.stored_commands[record.command_id]
                assert STATE_RANK[record.state] >= STATE_RANK[stored.state], "stored backwards"
                hub.stored_commands[record.command_id] = copy.copy(record)
            else:
                if record.state != "running":
                    hub.finished_stored[record.job_id] += 1
                saved = copy.copy(record)
                saved.counts = dict(record.counts)
                hub.stored_jobs[record.job_id] = saved
        hub.pending.clear()

    @rule()
    def crash_and_restart(self) -> None:
        """The hub dies (pending writes lost, every connection gone) and loads the store."""
        hub = self.hub
        hub.pending.clear()
        hub.stopped.clear()
        hub.overfull.clear()
        running = []
        for job in hub.stored_jobs.values():
            if job.state != "running":
                continue
            loaded = copy.copy(job)
            # The store reports a running job's counts from its commands' stored states.
            loaded.counts = dict(
                Counter(c.state for c in hub.stored_commands.values() if c.job_id == job.job_id)
            )
            running.append(loaded)
        unfinished = sorted(
            (copy.copy(c) for c in hub.stored_commands.values() if c.state not in TERMINAL_STATES),
            key=lambda c: c.seq,
        )
        hub.rules = LedgerRules(hub.clock, GRACE)
        hub.known = {c.command_id: c.state for c in hub.stored_commands.values()}
        hub.rules.load(running, unfinished)
        self.perform()

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def counts_add_up(self) -> None:
        hub = getattr(self, "hub", None)
        if hub is None:
            return
        rules = self.ledger
        for job_id, run in rules.jobs.items():
            counts = run.record.counts
            assert sum(counts.values()) == run.record.total, (job_id, counts)
            assert all(n > 0 for n in counts.values())
            mine = Counter(hub.known[c] for c, j in hub.job_of.items() if j == job_id)
            assert dict(mine) == counts
        for job_id, job in hub.stored_jobs.items():
            if job.state != "running":
                stored = Counter(
                    c.state for c in hub.stored_commands.values() if c.job_id == job_id
                )
                assert job.counts == dict(stored), "a finished job's counts disagree"
                assert all(state in TERMINAL_STATES for state in job.counts)

    @invariant()
    def jobs_finish_exactly_once(self) -> None:
        hub = getattr(self, "hub", None)
        if hub is None:
            return
        assert all(n == 1 for n in hub.finished_stored.values())
        for job_id in hub.job_total:
            states = [hub.known[c] for c, j in hub.job_of.items() if j == job_id]
            finished = all(state in TERMINAL_STATES for state in states)
            assert (job_id not in self.ledger.jobs) == finished or (
                # finished in the store, before a crash that lost nothing it needed
                hub.stored_jobs[job_id].state != "running"
            )

    @invariant()
    def in_flight_is_what_was_handed_out(self) -> None:
        if getattr(self, "hub", None) is None:
            return
        rules = self.ledger
        in_flight = sum(1 for c in rules.commands.values() if c.state in IN_FLIGHT_STATES)
        assert rules.in_flight == in_flight
        assert all(c.state not in TERMINAL_STATES for c in rules.commands.values())
        for agent_id, commands in rules.by_agent.items():
            assert all(c.agent_id == agent_id for c in commands)

    @invariant()
    @precondition(lambda self: getattr(self, "hub", None) is not None)
    def cancels_go_only_to_the_addressee(self) -> None:
        for command_id in self.hub.cancels_seen:
            assert command_id in self.hub.addressed


TestLedgerRules = LedgerRulesMachine.TestCase
TestLedgerRules.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)


# -- cases found by hand -------------------------------------------------------------------


def _job(rules: LedgerRules, clock: FakeClock, agents: list[str], **limits: Any) -> str:
    now = clock()
    job = JobRecord(
        job_id="j",
        name="ping",
        args={},
        target={},
        total=len(agents),
        created_at=now,
        timeout=30,
        ttl=600,
        counts={"queued": len(agents)},
        **limits,
    )
    commands = [
        CommandRecord(
            command_id=f"c-{a}",
            job_id="j",
            agent_id=a,
            name="ping",
            args={},
            timeout=30,
            issued_at=now,
            expires_at=now + 600,
            seq=n,
        )
        for n, a in enumerate(agents)
    ]
    rules.add_job(job, commands)
    rules.pump("j")
    return "j"


def test_max_errors_zero_with_a_window_of_one_finishes_the_job_once() -> None:
    clock = FakeClock()
    rules = LedgerRules(clock)
    for agent in AGENTS:
        rules.agent_connected(agent)
    _job(rules, clock, list(AGENTS), max_concurrency=1, max_errors=0)
    (delivered,) = [e.command for e in rules.take_effects() if isinstance(e, Deliver)]
    rules.result(delivered, "failed", {"status": "failed"})
    effects = rules.take_effects()
    finished = [e.job for e in effects if isinstance(e, JobFinished)]
    assert len(finished) == 1
    assert finished[0].state == "failed"
    assert finished[0].counts == {"failed": 1, "cancelled": 2}
    assert not any(isinstance(e, Deliver) for e in effects)


def test_a_pending_cancel_is_sent_again_with_the_redelivered_command() -> None:
    clock = FakeClock()
    rules = LedgerRules(clock)
    rules.agent_connected("a0")
    _job(rules, clock, ["a0"])
    rules.take_effects()
    assert rules.cancel_command("c-a0", "op") == "requested"
    rules.agent_disconnected("a0")
    rules.agent_connected("a0")
    effects = rules.take_effects()
    assert [type(e) for e in effects] == [CancelRequested, CancelOnAgent, Deliver, CancelOnAgent]
    assert effects[2].again


def test_an_answer_to_a_queued_command_frees_no_slot_it_never_took() -> None:
    """A result for a command the hub still has as queued (it was handed out before a crash
    lost the write) does not count as in flight: the window keeps its size."""
    clock = FakeClock()
    rules = LedgerRules(clock)
    _job(rules, clock, ["a0", "a1"], max_concurrency=1)
    command = rules.commands["c-a0"]
    rules.result(command, "succeeded", {"status": "succeeded"})
    assert rules.in_flight == 0
    assert rules.jobs["j"].in_flight == 0
    rules.agent_connected("a1")
    delivered = [e for e in rules.take_effects() if isinstance(e, Deliver)]
    assert [e.command.command_id for e in delivered] == ["c-a1"]
