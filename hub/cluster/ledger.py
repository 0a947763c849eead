"""The ledger in cluster mode: one leader runs it, every hub feeds it through one stream.

Why one leader: a job's window and error budget span agents on every hub, and the rules
that keep them (:mod:`hub.ledger_rules`) must see every transition of the job in order.
The hub that holds the leadership runs the one :class:`~hub.ledger.Ledger` of the cluster
on the shared store; every hub — the leader's own included — hands it what its agents say
(acks, outputs, results) and do (connect, leave, drain) as entries of the ledger's stream,
in order, and delivers the commands the leader routes to it. An entry is acknowledged only
once what it caused is stored, so when the leader dies its successor loads the ledger from
the store, claims what was left unacknowledged and goes on: no result is lost, and a
command sent and unanswered is delivered again with its id (the agent's journal keeps it
from running twice). The leader's writes are fenced by its term: a leader that lost its
lease cannot overwrite its successor's.

A dispatch is accepted by the hub the console talks to (stored: accepted, whatever happens
next) and adopted by the leader; a cancel is a call to the leader, answered through the
caller's inbox, and refused ``unavailable`` when no leader answers in time (a call past its
deadline is never carried out).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import orjson

from ..audit import Auditor
from ..ledger import Ledger, accept_job, select_targets
from ..model import CommandRecord, JobRecord
from ..protocol.codec import encode
from ..protocol.constants import Close
from ..protocol.messages import AGENT_MESSAGE, Ack, Dispatch, Output, Result, ValidationError
from ..registry import Registry
from ..store.base import AuditEntry, Store, StoreUnavailable
from .inbox import LedgerStream, Outbox
from .keys import Keys
from .leases import Leases
from .link import RedisLink
from .ownership import Ownership

log = logging.getLogger(__name__)

__all__ = ["Leadership", "LedgerLink"]

#: Kinds of the ledger stream's entries (field ``k``).
CONNECTED, DISCONNECTED, DRAINING, MESSAGE, ADOPT, CALL = b"c", b"d", b"r", b"m", b"j", b"x"
#: How long a call to the leader may take before the caller answers ``unavailable``.
CALL_TIMEOUT = 5.0
#: Commands of a job carried in its adoption entry (beyond: the leader reads the store).
ADOPT_INLINE = 2_000


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


def _command_fields(c: CommandRecord) -> dict[str, Any]:
    return {
        "command_id": c.command_id, "job_id": c.job_id, "agent_id": c.agent_id,
        "name": c.name, "args": c.args, "timeout": c.timeout, "issued_at": c.issued_at,
        "expires_at": c.expires_at, "seq": c.seq, "updated_at": c.updated_at,
        "dispatched_by": c.dispatched_by,
    }  # fmt: skip


class LedgerLink:
    """The ledger as every hub's sessions, fleet and queries see it in cluster mode."""

    def __init__(
        self,
        link: RedisLink,
        keys: Keys,
        hub_id: str,
        outbox: Outbox,
        store: Store,
        registry: Registry,
        auditor: Auditor,
        clock: Callable[[], float],
    ) -> None:
        self.link = link
        self.keys = keys
        self.hub_id = hub_id
        self.outbox = outbox
        self.store = store
        self.registry = registry
        self.auditor = auditor
        self.clock = clock
        self._calls: dict[str, asyncio.Future[Any]] = {}
        #: Set on the leader: its ledger answers queries about running jobs first hand.
        self.leader_ledger: Callable[[], Ledger | None] = lambda: None
        #: Agents a ledger message could not be queued for (Redis gone too long): closed
        #: 1013 so that they come back and answer again from their journal.
        self.shed = 0

    # -- what agents say and do ----------------------------------------------------------

    def _to_leader(self, agent_id: str, fields: dict[str, Any]) -> bool:
        if self.outbox.to_ledger(fields):
            return True
        self.shed += 1
        session = self.registry.live.get(agent_id)
        if session is not None:
            session.close(Close.TRY_AGAIN_LATER, "the hub cannot reach its ledger")
        return True

    def _message(self, agent_id: str, message: Ack | Output | Result) -> bool:
        return self._to_leader(
            agent_id,
            {"k": MESSAGE, "a": agent_id, "h": self.hub_id, "b": encode(message.model_dump())},
        )

    def on_ack(self, agent_id: str, command_id: str) -> bool:
        return self._message(agent_id, Ack(type="ack", command_id=command_id))

    def on_output(self, agent_id: str, message: Output) -> bool:
        return self._message(agent_id, message)

    def on_result(self, agent_id: str, message: Result) -> bool:
        return self._message(agent_id, message)

    def agent_connected(self, agent_id: str, generation: int = 0) -> None:
        self._to_leader(
            agent_id, {"k": CONNECTED, "a": agent_id, "g": generation, "h": self.hub_id}
        )

    def agent_disconnected(self, agent_id: str, generation: int = 0) -> None:
        self._to_leader(agent_id, {"k": DISCONNECTED, "a": agent_id, "g": generation})

    def set_draining(self, agent_id: str, draining: bool) -> None:
        record = self.registry.records.get(agent_id)
        generation = record.generation if record is not None else 0
        self._to_leader(
            agent_id, {"k": DRAINING, "a": agent_id, "v": int(draining), "g": generation}
        )

    # -- what operators ask --------------------------------------------------------------

    async def dispatch(
        self, request: Dispatch, actor: str, audit: Sequence[AuditEntry] = ()
    ) -> dict[str, Any]:
        """Accept the job here (stored: accepted) and hand it to the leader to run."""
        if self.outbox.waiting > self.outbox.limit // 2:
            # Whatever is accepted must reach the leader: not while the queue to it is this
            # long (Redis was away; the hub is catching up).
            raise StoreUnavailable("this hub is still catching up with the ledger")
        chosen, refused = select_targets(self.registry, request)
        first = await self.link.run(
            self.link.client.incrby(f"{self.keys.prefix}:cl:seq", max(1, len(chosen)))
        )
        seq: Iterator[int] = itertools.count(int(first) - len(chosen) + 1)
        job, commands, refused = await accept_job(
            request,
            actor,
            audit,
            targets=(chosen, refused),
            store=self.store,
            auditor=self.auditor,
            now=self.clock(),
            seq=seq,
        )
        fields: dict[str, Any] = {"k": ADOPT, "j": job.job_id}
        if len(commands) <= ADOPT_INLINE:
            fields["b"] = orjson.dumps(
                {"job": _job_fields(job), "commands": [_command_fields(c) for c in commands]}
            )
        self.outbox.to_ledger(fields)
        return {
            "job_id": job.job_id,
            "command_ids": [c.command_id for c in commands],
            "refused": refused,
        }

    async def cancel(
        self, job_id: str | None, command_id: str | None, actor: str
    ) -> dict[str, Any]:
        return await self.call(
            "cancel", {"job_id": job_id, "command_id": command_id, "actor": actor}
        )

    async def call(self, method: str, body: dict[str, Any]) -> Any:
        """Ask the leader and wait for its answer (``unavailable`` when none comes in time)."""
        call_id = secrets.token_hex(8)
        deadline = await self.link.time_ms() + int(CALL_TIMEOUT * 1000)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        try:
            self.outbox.to_ledger(
                {
                    "k": CALL, "i": call_id, "r": self.hub_id, "t": deadline, "n": method,
                    "b": orjson.dumps(body),
                }
            )  # fmt: skip
            async with asyncio.timeout(CALL_TIMEOUT + 1.0):
                return await future
        except TimeoutError:
            raise StoreUnavailable("no ledger leader answered in time") from None
        finally:
            self._calls.pop(call_id, None)

    def replied(self, fields: dict[bytes, bytes]) -> None:
        """A leader's answer to one of this hub's calls (from the inbox)."""
        future = self._calls.get(_text(fields.get(b"i")))
        if future is None or future.done():
            return
        answer = orjson.loads(fields.get(b"b", b"null"))
        if isinstance(answer, dict) and answer.get("error"):
            future.set_exception(StoreUnavailable(str(answer["error"])))
        else:
            future.set_result(answer)

    # -- read by the queries and metrics -------------------------------------------------

    def job_view(self, job_id: str) -> dict[str, Any] | None:
        ledger = self.leader_ledger()
        return ledger.job_view(job_id) if ledger is not None else None

    def unfinished_of_job(self, job_id: str) -> dict[str, CommandRecord]:
        ledger = self.leader_ledger()
        return ledger.unfinished_of_job(job_id) if ledger is not None else {}

    @property
    def in_flight(self) -> int:
        ledger = self.leader_ledger()
        return ledger.in_flight if ledger is not None else 0

    @property
    def commands(self) -> dict[str, CommandRecord]:
        ledger = self.leader_ledger()
        return ledger.commands if ledger is not None else {}

    @property
    def jobs(self) -> dict[str, Any]:
        ledger = self.leader_ledger()
        return ledger.jobs if ledger is not None else {}

    def tick(self) -> None:
        ledger = self.leader_ledger()
        if ledger is not None:
            ledger.tick()


def _job_fields(j: JobRecord) -> dict[str, Any]:
    return {
        "job_id": j.job_id, "name": j.name, "args": j.args, "target": j.target, "total": j.total,
        "created_at": j.created_at, "timeout": j.timeout, "ttl": j.ttl,
        "dispatched_by": j.dispatched_by, "max_concurrency": j.max_concurrency,
        "max_errors": j.max_errors, "counts": j.counts, "updated_at": j.updated_at,
        "spec": j.spec,
    }  # fmt: skip


class Leadership:
    """Run for the leadership, and while holding it run the cluster's ledger."""

    def __init__(
        self,
        link: RedisLink,
        keys: Keys,
        leases: Leases,
        ownership: Ownership,
        outbox: Outbox,
        hub_id: str,
        make_ledger: Callable[
            [Callable[[str, bytes], bool], Callable[[], tuple[str, str] | None]], Ledger
        ],
        local_send: Callable[[str, bytes], bool],
        live_hubs: Callable[[], Awaitable[set[str]]],
        auditor: Auditor,
        on_change: Callable[[bool], None] = lambda leading: None,
    ) -> None:
        self.link = link
        self.keys = keys
        self.leases = leases
        self.ownership = ownership
        self.outbox = outbox
        self.hub_id = hub_id
        self.make_ledger = make_ledger
        self.local_send = local_send
        self.live_hubs = live_hubs
        self.auditor = auditor
        self.on_change = on_change
        self.token: str | None = None
        self.ledger: Ledger | None = None
        self.stream = LedgerStream(link, keys, consumer=leases.me)
        #: Where each agent is connected, and the generation of that connection.
        self.where: dict[str, str] = {}
        self.generations: dict[str, int] = {}
        self._consumer: asyncio.Task[None] | None = None
        #: Calls the leader answers besides ``cancel`` (name → handler of the call's body).
        self.calls: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {}
        #: Told (agent id, takeovers within the window) when an agent connected anywhere
        #: while it was connected somewhere: the cluster's count for ``agent_conflict``.
        self.on_takeover: Callable[[str, int], None] = lambda agent_id, recent: None
        self.conflict_window = 600.0
        self._takeovers: dict[str, deque[float]] = {}

    @property
    def leading(self) -> bool:
        return self.ledger is not None

    def fence(self) -> tuple[str, str] | None:
        return (self.keys.leader, self.token) if self.token is not None else None

    async def step(self) -> None:
        """Called about once a second: take, keep or lose the leadership."""
        try:
            token = await self.leases.lead()
        except StoreUnavailable:
            token = None
        if token is not None and token == self.token and self.leading:
            return
        if self.leading:
            self._stop("the leadership moved on" if token is None else "a new term")
        if token is not None:
            self.token = token
            try:
                await self._start()
            except StoreUnavailable as exc:
                log.error("could not take the lead: %s", exc)
                self._stop("could not load the ledger")

    async def _start(self) -> None:
        log.info("hub %s leads the cluster (%s)", self.hub_id, self.token)
        ledger = self.make_ledger(self._send, self.fence)
        # A write that fails (fenced: another leads; or Redis away) ends this leadership:
        # a successor, or this hub again, starts over from the store, which is the truth.
        ledger.on_write_failed = lambda exc: self._stop(f"a ledger write failed: {exc}")
        await ledger.load()
        owners = await self.ownership.all()
        draining = await self.ownership.draining()
        live = await self.live_hubs()
        self.where.clear()
        self.generations.clear()
        for agent_id, owner in owners.items():
            self.generations[agent_id] = owner.generation
            if owner.hub_id in live:
                self.where[agent_id] = owner.hub_id
                ledger.rules.connected.add(agent_id)
        for agent_id in draining & set(self.where):
            ledger.rules.draining.add(agent_id)
        # Everyone connected gets again what was handed out and not answered: the agents
        # answer repeats from their journals.
        for agent_id in list(self.where):
            ledger.agent_connected(agent_id)
        await self.stream.prepare()
        self.ledger = ledger
        self.auditor.record("cluster.leader", subject=self.hub_id, term=self.token)
        self.on_change(True)
        self._consumer = asyncio.create_task(self._consume(), name="ledger-stream")

    def _stop(self, reason: str) -> None:
        if self.ledger is not None:
            log.warning("hub %s no longer leads: %s", self.hub_id, reason)
            self.ledger.close()
        self.ledger = None
        self.token = None
        if self._consumer is not None:
            self._consumer.cancel()
            self._consumer = None
        self.on_change(False)

    async def stop(self) -> None:
        token = self.token
        self._stop("stopping")
        if token is not None:
            try:
                await self.leases.resign(token)
            except StoreUnavailable:
                pass

    def lost_hub(self, hub_id: str) -> None:
        """A hub's lease lapsed: its agents are not connected any more, as far as the
        ledger knows (they are when they register elsewhere)."""
        ledger = self.ledger
        if ledger is None:
            return
        for agent_id, where in list(self.where.items()):
            if where == hub_id:
                del self.where[agent_id]
                ledger.agent_disconnected(agent_id)

    # -- the stream ----------------------------------------------------------------------

    async def _consume(self) -> None:
        try:
            entries = await self.stream.claim()
            while True:
                if entries:
                    await self._handle(entries)
                entries = await self.stream.read()
        except asyncio.CancelledError:
            raise
        except StoreUnavailable as exc:
            self._stop(f"redis: {exc}")
        except Exception:
            log.exception("the ledger's stream failed")
            self._stop("the ledger's stream failed")

    async def _handle(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        ledger = self.ledger
        if ledger is None:
            return
        now_ms: int | None = None
        for _entry_id, fields in entries:
            kind = fields.get(b"k")
            try:
                if kind == MESSAGE:
                    self._agent_message(ledger, fields)
                elif kind == CONNECTED:
                    self._connected(ledger, fields)
                elif kind == DISCONNECTED:
                    self._disconnected(ledger, fields)
                elif kind == DRAINING:
                    agent_id = _text(fields.get(b"a"))
                    if int(fields.get(b"g", 0)) >= self.generations.get(agent_id, 0):
                        ledger.set_draining(agent_id, fields.get(b"v") == b"1")
                elif kind == ADOPT:
                    await self._adopt(ledger, fields)
                elif kind == CALL:
                    if now_ms is None:
                        now_ms = await self.link.time_ms()
                    await self._call(ledger, fields, now_ms)
            except StoreUnavailable:
                raise
            except Exception:
                log.exception("a ledger entry of kind %r failed", kind)
        if not await ledger.settled():
            raise StoreUnavailable("the ledger could not store what these entries caused")
        await self.stream.acknowledge([entry_id for entry_id, _ in entries])

    def _connected(self, ledger: Ledger, fields: dict[bytes, bytes]) -> None:
        agent_id = _text(fields.get(b"a"))
        generation = int(fields.get(b"g", 0))
        if generation < self.generations.get(agent_id, 0):
            return
        self.generations[agent_id] = generation
        if agent_id in self.where:
            self._takeover(agent_id)
        self.where[agent_id] = _text(fields.get(b"h"))
        ledger.agent_connected(agent_id)

    def _takeover(self, agent_id: str) -> None:
        now = time.monotonic()
        takeovers = self._takeovers.setdefault(agent_id, deque(maxlen=32))
        takeovers.append(now)
        while takeovers and takeovers[0] < now - self.conflict_window:
            takeovers.popleft()
        self.on_takeover(agent_id, len(takeovers))
        if len(self._takeovers) > 10_000:
            for key in [
                k for k, v in self._takeovers.items() if not v or v[-1] < now - self.conflict_window
            ]:
                del self._takeovers[key]

    def _disconnected(self, ledger: Ledger, fields: dict[bytes, bytes]) -> None:
        agent_id = _text(fields.get(b"a"))
        if int(fields.get(b"g", 0)) < self.generations.get(agent_id, 0):
            return  # a superseded connection's goodbye: the agent is connected elsewhere
        self.where.pop(agent_id, None)
        ledger.agent_disconnected(agent_id)

    def _agent_message(self, ledger: Ledger, fields: dict[bytes, bytes]) -> None:
        agent_id = _text(fields.get(b"a"))
        try:
            message = AGENT_MESSAGE.validate_json(fields.get(b"b", b"{}"))
        except ValidationError:
            log.warning("an invalid agent message in the ledger's stream was dropped")
            return
        if isinstance(message, Ack):
            owned = ledger.on_ack(agent_id, message.command_id)
        elif isinstance(message, Output):
            owned = ledger.on_output(agent_id, message)
        elif isinstance(message, Result):
            owned = ledger.on_result(agent_id, message)
        else:
            return
        if not owned:
            self.auditor.record(
                "command.foreign_reply", actor=f"agent:{agent_id}", subject=message.command_id
            )
            self._send(
                agent_id,
                encode(
                    {
                        "type": "error",
                        "code": "unknown_command",
                        "ref": message.command_id,
                        "message": "no such command for this agent",
                    }
                ),
            )

    async def _adopt(self, ledger: Ledger, fields: dict[bytes, bytes]) -> None:
        job_id = _text(fields.get(b"j"))
        if job_id in ledger.jobs:
            return  # adopted already (the entry came back after a failover)
        body = fields.get(b"b")
        if body:
            data = orjson.loads(body)
            job = JobRecord(**data["job"])
            commands = [CommandRecord(**c) for c in data["commands"]]
        else:
            jobs, unfinished, _top = await ledger.store.unfinished()
            found = [j for j in jobs if j.job_id == job_id]
            if not found:
                return  # finished, or loaded with the ledger already
            job = found[0]
            commands = [c for c in unfinished if c.job_id == job_id]
        if any(c.command_id in ledger.commands for c in commands):
            return  # loaded with the ledger when this hub took the lead
        await ledger.start(job, commands)

    async def _call(self, ledger: Ledger, fields: dict[bytes, bytes], now_ms: int) -> None:
        if int(fields.get(b"t", 0)) < now_ms:
            return  # the caller has answered `unavailable` already: do nothing
        method = _text(fields.get(b"n"))
        body = orjson.loads(fields.get(b"b", b"{}"))
        answer: Any
        handler = self.calls.get(method)
        if method == "cancel":
            answer = ledger.cancel_now(body.get("job_id"), body.get("command_id"), body["actor"])
        elif handler is not None:
            answer = await handler(body)
        else:
            answer = {"error": f"unknown call {method!r}"}
        self.outbox.to_hub(
            _text(fields.get(b"r")),
            {"k": b"reply", "i": fields.get(b"i", b""), "b": orjson.dumps(answer)},
        )

    # -- deliveries ----------------------------------------------------------------------

    def _send(self, agent_id: str, data: bytes) -> bool:
        """The ledger's ``send``: to the agent's connection here, or through its hub's inbox."""
        hub_id = self.where.get(agent_id)
        if hub_id is None:
            return False
        if hub_id == self.hub_id:
            return self.local_send(agent_id, data)
        self.outbox.to_hub(hub_id, {"k": b"deliver", "a": agent_id, "d": data})
        return True
