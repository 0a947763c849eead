"""The Redis store's writer: every write on one connection, one pipeline in flight.

Why one connection: Redis runs the commands of one connection in the order they arrive,
so writes land in the order they were made (a command's ``sent`` before its ``succeeded``)
without waiting for each other's answers. Why one pipeline at a time: every write made
while one round trip is under way rides the next one, however many there are, the way the
SQLite store groups its commits. :attr:`Writer.commits` counts those round trips.

Batched writes (agents, heartbeats, sessions, output, pruning) wait in :class:`Pending`,
coalesced (the latest row of an agent replaces an older one), and ride the next round trip.
When Redis cannot be reached they stay there and are tried again, with a backoff, until
Redis answers: a hub keeps its heartbeats while Redis is away. Only past a bound, or when
the store closes without Redis, are they dropped, and then logged and counted.

The connection is the writer's own (made from the client's pool, never returned to it) and
has no automatic retry: a pipeline sent again after a lost answer could apply a write twice.
A durable write whose round trip fails raises :class:`StoreUnavailable`; whether Redis
applied it is then unknown, which is why ``add_job`` is idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError, RedisError, ResponseError

from ..model import AgentRecord
from .base import StoreUnavailable
from .redis_lua import SCRIPTS

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection

__all__ = ["Command", "Op", "Pending", "Writer", "response_error"]

log = logging.getLogger(__name__)

Command = tuple[Any, ...]

#: Batched rows a writer keeps while Redis is away (history changes and output chunks;
#: agent rows are one per agent anyway). Past it, the oldest are dropped and counted.
MAX_PENDING = 200_000
#: How long to wait before sending batched writes again after a failure, at most.
MAX_BACKOFF = 5.0


def response_error(exc: ResponseError) -> Exception:
    """What an error answered by Redis means to the store's callers."""
    message = str(exc)
    if message.startswith("FENCED"):
        return StoreUnavailable("fenced: not the ledger leader")
    if message.startswith("EXISTS"):
        return ValueError(f"{message.removeprefix('EXISTS ')} already exists")
    return StoreUnavailable(f"Redis refused the write: {message}")


@dataclass(slots=True)
class Op:
    """One durable write: its commands, what its answers mean, who waits for it."""

    commands: list[Command]
    future: asyncio.Future[Any]
    parse: Callable[[list[Any]], Any] | None = None


@dataclass(slots=True)
class Pending:
    """Batched writes not sent yet. Agents' rows and samples are encoded when sent, from
    the records then (the latest values; a record's heartbeat fields are replaced whole,
    never mutated, so a row is always consistent)."""

    agents: dict[str, AgentRecord] = field(default_factory=dict)
    heartbeats: dict[str, AgentRecord] = field(default_factory=dict)
    samples: dict[str, AgentRecord] = field(default_factory=dict)
    #: Session changes in the order made: (kind, agent id, line prefix, payload).
    history: list[tuple[bytes, str, bytes, bytes]] = field(default_factory=list)
    #: Output chunks: (key, chunk seq, value), stored unless that seq already is.
    outputs: list[tuple[str, int, bytes]] = field(default_factory=list)
    prune: float | None = None

    def __bool__(self) -> bool:
        return bool(
            self.agents or self.heartbeats or self.samples or self.history or self.outputs
            or self.prune is not None
        )  # fmt: skip

    def size(self) -> int:
        return (
            len(self.agents) + len(self.heartbeats) + len(self.samples) + len(self.history)
            + len(self.outputs)
        )  # fmt: skip

    def put_back(self, older: Pending) -> int:
        """Put writes that failed back under the newer ones; returns how many were
        dropped to stay under :data:`MAX_PENDING`."""
        for mine, theirs in (
            (self.agents, older.agents),
            (self.heartbeats, older.heartbeats),
            (self.samples, older.samples),
        ):
            for key, value in theirs.items():
                mine.setdefault(key, value)  # type: ignore[attr-defined]
        self.history[:0] = older.history
        self.outputs[:0] = older.outputs
        if older.prune is not None:
            self.prune = max(self.prune or 0.0, older.prune)
        dropped = 0
        for rows in (self.history, self.outputs):
            if len(rows) > MAX_PENDING:
                excess = len(rows) - MAX_PENDING
                del rows[:excess]
                dropped += excess
        return dropped


class Writer:
    """Sends durable writes and batched writes, in order, one round trip at a time."""

    def __init__(
        self,
        connection: AbstractConnection,
        timeout: float,
        build: Callable[[Pending], list[Command]],
    ) -> None:
        self.connection = connection
        self.timeout = timeout
        self.pending = Pending()
        self.commits = 0
        #: Round trips that failed, and batched rows given up (logged, never silent).
        self.failures = 0
        self.dropped = 0
        self._build = build
        self._ops: list[Op] = []
        self._wake = asyncio.Event()
        #: Set by durable writes: they are tried at once, whatever the backoff.
        self._durable = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._failing_since: float | None = None

    # -- submitting --------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="tether-redis-writer")

    def submit(self, op: Op) -> None:
        self._ops.append(op)
        self._wake.set()
        self._durable.set()

    def batched(self) -> Pending:
        """The batch to add to; the writer sends it with its next round trip (after the
        backoff, while Redis is failing: a storm of batched writes must not turn into a
        storm of attempts)."""
        self._wake.set()
        return self.pending

    async def close(self, timeout: float) -> None:
        """Send what is pending (once more, if Redis answers), then stop."""
        self._closing = True
        self._wake.set()
        self._durable.set()
        task = self._task
        if task is not None:
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(task)
            except TimeoutError:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        lost = self.pending.size()
        if lost:
            self.dropped += lost
            log.error("Redis store closed with %d batched writes unsent (Redis unreachable)", lost)
        for op in self._ops:
            if not op.future.done():
                op.future.set_exception(StoreUnavailable("the store is closed"))
        self._ops.clear()
        await self.connection.disconnect()

    # -- the loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = 0.0
        while True:
            if backoff and not self._ops and not self._closing:
                try:
                    async with asyncio.timeout(backoff):
                        await self._durable.wait()
                except TimeoutError:
                    pass
            else:
                await self._wake.wait()
            self._wake.clear()
            self._durable.clear()
            ops, self._ops = self._ops, []
            taken, self.pending = self.pending, Pending()
            ok = await self._round_trip(ops, taken)
            backoff = 0.0 if ok else min(max(2 * backoff, 0.2), MAX_BACKOFF)
            if self._closing and not self._ops and (not ok or not self.pending):
                return  # all sent, or Redis away: close() counts what is left

    async def _round_trip(self, ops: list[Op], taken: Pending) -> bool:
        try:
            batch = self._build(taken) if taken else []
        except Exception:  # a bug in encoding must not stop every later write
            log.exception("Redis store: a batch of %d rows could not be encoded", taken.size())
            self.dropped += taken.size()
            batch = []
        commands = batch + [command for op in ops for command in op.commands]
        if not commands:
            for op in ops:
                if not op.future.done():
                    op.future.set_result(op.parse([]) if op.parse else None)
            return True
        try:
            results = await self._execute(commands)
        except StoreUnavailable as exc:
            self.failures += 1
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                log.error("Redis store: writes failing: %s", exc)
            self.dropped += self.pending.put_back(taken)
            for op in ops:
                if not op.future.done():
                    op.future.set_exception(exc)
            return False
        self.commits += 1
        if self._failing_since is not None:
            log.warning(
                "Redis store: writes resumed after %.1f s", time.monotonic() - self._failing_since
            )
            self._failing_since = None
        for result in results[: len(batch)]:
            if isinstance(result, ResponseError):
                # Refused, not lost in transit: sending it again would fail again.
                self.failures += 1
                self.dropped += 1
                log.error("Redis store: a batched write was refused: %s", result)
        offset = len(batch)
        for op in ops:
            answers = results[offset : offset + len(op.commands)]
            offset += len(op.commands)
            if op.future.done():
                continue
            error = next((a for a in answers if isinstance(a, ResponseError)), None)
            if error is not None:
                op.future.set_exception(response_error(error))
                continue
            try:
                op.future.set_result(op.parse(answers) if op.parse else None)
            except Exception as exc:  # a bug in decoding: the waiter sees it
                op.future.set_exception(exc)
        return True

    def _deadline(self, commands: list[Command]) -> float:
        """The timeout, plus time for big writes (a job to 100,000 agents is one script):
        2 µs a byte sent (Redis's script works on every one of them), counted by size,
        not by arguments (a job's script is a few arguments of megabytes)."""
        size = 0
        for command in commands:
            for arg in command:
                size += len(arg) if isinstance(arg, (bytes, str)) else 8
        return self.timeout + size * 2e-6

    async def _execute(self, commands: list[Command]) -> list[Any]:
        try:
            async with asyncio.timeout(self._deadline(commands)):
                results = await self._send(commands)
                missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
                if missing:
                    # Redis lost its script cache (SCRIPT FLUSH, a failover): the scripts
                    # that ran into it did nothing, so they are sent again, in order.
                    await self._load_scripts(self.connection)
                    again = await self._send([commands[i] for i in missing])
                    for index, result in zip(missing, again, strict=True):
                        results[index] = result
                return results
        except asyncio.CancelledError:
            await self.connection.disconnect(nowait=True)
            raise
        except (RedisError, OSError, TimeoutError) as exc:
            # The connection's state is unknown (answers may be on their way): start over.
            await self.connection.disconnect(nowait=True)
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc) or repr(exc)
            raise StoreUnavailable(f"Redis: {reason}") from exc

    async def _send(self, commands: list[Command]) -> list[Any]:
        conn = self.connection
        if await ensure_connected(conn):
            await self._load_scripts(conn)
        await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        # The whole round trip is bounded by _execute's deadline, which allows big writes
        # (a job to the fleet) more than the client's socket timeout might.
        timeout = self._deadline(commands)
        results: list[Any] = []
        for _ in commands:
            try:
                results.append(await conn.read_response(disable_decoding=True, timeout=timeout))
            except ResponseError as exc:
                results.append(exc)
        return results

    async def _load_scripts(self, conn: AbstractConnection) -> None:
        """On every new connection: a restarted Redis has an empty script cache."""
        for script in SCRIPTS.values():
            await conn.send_command("SCRIPT", "LOAD", script.source, check_health=False)
            await conn.read_response()


async def ensure_connected(conn: AbstractConnection) -> bool:
    """Connect, or reconnect a connection the server closed while it was idle (as the
    pool does before lending one): a restarted Redis must not cost the first write.
    True when this made a new connection."""
    if not conn.is_connected:
        await conn.connect()
        return True
    can_read = getattr(conn, "can_read", None) or conn.can_read_destructive
    try:
        stale = await can_read()
    except (RedisError, OSError):
        stale = True
    if stale:
        await conn.disconnect()
        await conn.connect()
    return stale
