"""The cluster store: everything the hubs persist, in one Redis, shared by all of them.

Same contract as the SQLite store (``tests/hub/test_store_conformance.py`` runs the same
tests on both); what differs is where the bytes live and what they cost. Keys, with ``P``
the prefix (``tether``):

==========================  ======  ==========================================================
``P:epoch``                 string  a random marker made when the data set is new: a Redis
                                    that lost its data has another one (:meth:`epoch`)
``P:cred``                  hash    credential id → ``rev,revoked,uses,n,expires;`` + JSON
``P:cred:rev``              string  the credential revision counter
``P:cred:log``              zset    credential id → revision of its last change (the newest
                                    10,000): what ``credentials_since`` reads
``P:cred:floor``            string  highest revision trimmed from the log
``P:enrolled:<key id>``     set     agent ids enrolled through an enrollment key
``P:agents``                hash    agent id → registration row (profile id, hostname,
                                    location, hub, enrolled by, first seen, connected at)
``P:hb``                    hash    agent id → last heartbeat ``[last_seen, status, metrics]``
``P:hist``                  hash    agent id → kept heartbeat samples, then sessions
``P:hist:min``              string  samples before this time (ms) are pruned
``P:mnames``                hash    metric-name list id → the names (see Dictionary)
``P:profiles``              hash    profile id → platform, region, version, labels,
                                    capabilities (shared by many agents)
``P:jobs``                  hash    job id → job row
``P:jobs:order``            zset    job id → insertion number (listing order and cursor)
``P:jobs:running``          zset    running job ids → insertion number
``P:jobs:n``                string  the jobs' insertion counter
``P:cmds``                  hash    command id → command row
``P:cmds:order``            zset    command id → insertion number
``P:cmds:open``             zset    unfinished command ids → insertion number
``P:cmds:n``, ``P:cmds:top``  string  the commands' insertion counter, the highest ``seq``
``P:job:<id>:cmds``         zset    a job's command ids → insertion number
``P:agent:<id>:cmds``       zset    an agent's command ids → insertion number
``P:out:<command id>``      hash    output chunk seq → ``[stream, data]``
``P:audit``                 stream  the audit log, one field ``e``, ids from Redis's clock
``P:alerts``                hash    alert id → alert row
``P:alerts:order``, ``:open``  zset  alert ids → insertion number (all, not resolved)
``P:alerts:n``              string  the alerts' insertion counter
==========================  ======  ==========================================================

Listings page newest first by insertion number (the cursor); a filter uses an index when
one fits (a job's or an agent's commands, unfinished commands, running jobs, open alerts,
ids) and otherwise reads at most :data:`SCAN_WINDOW` rows per request, returning a shorter
page with a cursor to go on. Atomic writes are Lua scripts (:mod:`hub.store.redis_lua`);
every write goes through one writer connection, in order (:mod:`hub.store.redis_writer`).
Every call is bounded by ``timeout``; Redis unreachable, slow or refusing raises
:class:`StoreUnavailable`, never a redis exception.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from ..model import JWT_PREFIX, AgentRecord, AlertRecord, CommandRecord, CredentialRecord, JobRecord
from .base import AuditEntry, Page, Store, StoreUnavailable
from .redis_codec import (
    RESOLVED,
    SESSION_OPEN_TAIL,
    UNFINISHED,
    Dictionary,
    MetricNames,
    decode_agent,
    decode_alert,
    decode_audit,
    decode_command,
    decode_credential,
    decode_job,
    decode_session,
    dumps,
    encode_agent,
    encode_alert,
    encode_audit,
    encode_command,
    encode_credential,
    encode_heartbeat,
    encode_job,
    encode_sample,
    encode_session_close,
    encode_session_open,
    format_millis,
    interned_id,
    loads,
    millis,
    split_history,
    text,
)
from .redis_lua import SCRIPTS
from .redis_writer import Command, Op, Pending, Writer
from .retention import Retention, append_synced

__all__ = ["RedisStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Fence = Callable[[], tuple[str, str] | None]

#: Rows a filtered listing reads at most per request when no index serves the filter.
SCAN_WINDOW = 10_000
#: Rows read per round trip while listing, and fields per command in big writes.
CHUNK = 1_000
BULK = 5_000
#: Changes of credentials kept for ``credentials_since`` (older: a full read instead):
#: hubs sync every second, so this covers thousands of changes a second.
CREDENTIAL_LOG = 5_000
#: Distinct agent profiles (platform, region, version, labels, capabilities) one store
#: interns; past it, rows hold their profile whole.
PROFILES = 10_000
#: How often ``checkpoint`` trims the audit stream.
TRIM_INTERVAL = 60.0
#: Commands in a job above which its rows are encoded in a thread, off the event loop.
THREAD_ENCODE = 500
AUDIT_CURSOR = re.compile(r"\d{1,20}-\d{1,20}")


class Keys:
    """The names of the store's keys under one prefix (the table above)."""

    def __init__(self, prefix: str) -> None:
        p = self.prefix = prefix
        self.epoch = f"{p}:epoch"
        self.cred, self.cred_rev, self.cred_log = f"{p}:cred", f"{p}:cred:rev", f"{p}:cred:log"
        self.agents, self.hb, self.hist = f"{p}:agents", f"{p}:hb", f"{p}:hist"
        self.hist_min, self.metric_names = f"{p}:hist:min", f"{p}:mnames"
        self.profiles = f"{p}:profiles"
        self.jobs, self.jobs_order = f"{p}:jobs", f"{p}:jobs:order"
        self.jobs_running = f"{p}:jobs:running"
        self.cmds, self.cmds_order, self.cmds_open = (
            f"{p}:cmds",
            f"{p}:cmds:order",
            f"{p}:cmds:open",
        )
        self.cmds_top = f"{p}:cmds:top"
        self.audit = f"{p}:audit"
        self.alerts, self.alerts_order = f"{p}:alerts", f"{p}:alerts:order"
        self.alerts_open = f"{p}:alerts:open"

    def job_commands(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:cmds"

    def agent_commands(self, agent_id: str) -> str:
        return f"{self.prefix}:agent:{agent_id}:cmds"

    def output(self, command_id: str) -> str:
        return f"{self.prefix}:out:{command_id}"


def _chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _wanted(filter: dict[str, Any], allowed: frozenset[str]) -> dict[str, set[str]]:
    """A listing's filter as sets of accepted values, refused as the SQLite store refuses
    it (an integer matches its decimal text, as SQL compares it with a text column)."""
    wanted: dict[str, set[str]] = {}
    for key, value in filter.items():
        if key not in allowed:
            raise ValueError(f"unknown filter key {key!r}")
        if isinstance(value, list):
            if not value or not all(isinstance(v, str | int) for v in value):
                raise ValueError(f"filter {key!r} needs strings")
            wanted[key] = {v if isinstance(v, str) else str(int(v)) for v in value}
        elif isinstance(value, str | int) and not isinstance(value, bool):
            wanted[key] = {value if isinstance(value, str) else str(value)}
        else:
            raise ValueError(f"filter {key!r} needs a string or a list of strings")
    return wanted


def _cursor(before: str | None) -> int | None:
    if before is None:
        return None
    try:
        return int(before)
    except ValueError:
        raise ValueError("invalid cursor") from None


def _matches(record: Any, wanted: dict[str, set[str]]) -> bool:
    for key, values in wanted.items():
        value = record.get(key) if isinstance(record, dict) else getattr(record, key)
        if value is None or str(value) not in values:
            return False
    return True


class RedisStore(Store):
    """Tether's store for cluster mode, on one Redis (a primary, with its replicas).

    ``client`` must leave responses undecoded (``decode_responses=False``, the default).
    ``fence``, when given, is asked before every ``save_commands``: a ``(key, token)``
    pair makes the write happen only while ``GET key == token`` in Redis (the ledger
    leader's lease), and raise ``StoreUnavailable("fenced: …")`` otherwise.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str = "tether",
        *,
        timeout: float = 2.0,
        fence: Fence | None = None,
        audit_retention: float | None = 30 * 86400.0,
        samples_kept: int = 3,
        sessions_kept: int = 10,
        owns_client: bool = False,
    ) -> None:
        if client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("RedisStore needs a client with decode_responses=False")
        if samples_kept < 1 or sessions_kept < 1:
            raise ValueError("samples_kept and sessions_kept must be at least 1")
        self.client = client
        self.keys = Keys(prefix)
        self.timeout = timeout
        self.fence = fence
        self.audit_retention = audit_retention
        self.samples_kept = samples_kept
        self.sessions_kept = sessions_kept
        self.names = MetricNames()
        self.profiles = Dictionary(PROFILES)
        self._owns_client = owns_client
        self._writer: Writer | None = None
        #: The writer of the last time the store was open: its counters stay readable.
        self._last_writer: Writer | None = None
        self._closed = False
        self._last_trim = 0.0
        #: Sessions this store opened and did not close: close_session names only the
        #: session, and its line lives under its agent.
        self._session_agents: dict[str, str] = {}
        self._sha = {name: script.sha for name, script in SCRIPTS.items()}

    @classmethod
    def from_url(
        cls,
        url: str,
        prefix: str = "tether",
        *,
        timeout: float = 2.0,
        max_connections: int = 16,
        **options: Any,
    ) -> RedisStore:
        """A store with its own client: a pool of ``max_connections`` for reads (a caller
        past it waits, within ``timeout``) and the writer's connection. Reads are bounded
        by ``timeout`` per call, not by a socket timeout, so big reads are not cut short."""
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,
            socket_connect_timeout=timeout,
            socket_keepalive=True,
        )
        return cls(aioredis.Redis(connection_pool=pool), prefix, timeout=timeout,
                   owns_client=True, **options)  # fmt: skip

    # -- lifecycle -------------------------------------------------------------------

    @property
    def commits(self) -> int:
        writer = self._writer or self._last_writer
        return writer.commits if writer is not None else 0

    @property
    def write_failures(self) -> int:
        """Write round trips that failed (Redis unreachable, slow or refusing)."""
        writer = self._writer or self._last_writer
        return writer.failures if writer is not None else 0

    @property
    def writes_dropped(self) -> int:
        """Batched rows given up: refused by Redis, past the pending bound, or unsent at
        close with Redis away. Each is logged."""
        writer = self._writer or self._last_writer
        return writer.dropped if writer is not None else 0

    async def open(self) -> None:
        self._closed = False
        connection = self.client.connection_pool.make_connection()
        writer = Writer(connection, self.timeout, self._batch_commands)
        self._writer = writer
        writer.start()
        try:
            await self.epoch()
        except StoreUnavailable:
            await self.close()
            raise

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        writer, self._writer = self._writer, None
        if writer is not None:
            self._last_writer = writer
            await writer.close(self.timeout)
        if self._owns_client:
            try:
                await self.client.aclose()
            except (RedisError, OSError):
                pass

    async def ping(self) -> bool:
        if self._closed or self._writer is None:
            return False
        try:
            return bool(await self._read(self.client.ping))
        except StoreUnavailable:
            return False

    async def flush(self) -> None:
        await self._write([])

    async def checkpoint(self) -> int:
        """Trim the audit log to its retention, about once a minute. Returns entries
        trimmed."""
        now = time.monotonic()
        if self.audit_retention is None or now - self._last_trim < TRIM_INTERVAL:
            return 0
        self._last_trim = now
        return await self.trim_audit()

    async def trim_audit(self) -> int:
        if self.audit_retention is None:
            return 0
        trimmed: int = await self._write(
            [self._script("trim_audit", repr(float(self.audit_retention)))], lambda r: r[0]
        )
        return trimmed

    async def epoch(self) -> str:
        """The data set's marker, made when the store first sees it empty. A different
        value than before means Redis lost its data (restarted without persistence, or a
        replica promoted without the latest writes): a cluster calls this every few
        seconds and re-announces what it holds when it changes."""

        async def op() -> bytes:
            fresh = secrets.token_hex(8).encode()
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.set(self.keys.epoch, fresh, nx=True)
                pipe.get(self.keys.epoch)
                _, current = await pipe.execute()
            return current

        return text(await self._read(op))

    async def persistence(self) -> dict[str, str]:
        """Redis's persistence settings (``appendonly``, ``appendfsync``, ``save``), for a
        hub to warn about at start; empty when CONFIG is not allowed (managed Redis)."""
        try:
            found = await self._read(lambda: self.client.config_get("append*"))
            found.update(await self._read(lambda: self.client.config_get("save")))
        except StoreUnavailable:
            return {}
        return {text(k): text(v) for k, v in found.items()}

    # -- plumbing ------------------------------------------------------------------------

    def _script(self, name: str, *args: Any, keys: Sequence[str] = ()) -> Command:
        return ("EVALSHA", self._sha[name], len(keys), *keys, self.keys.prefix, *args)

    def _write(
        self, commands: list[Command], parse: Callable[[list[Any]], Any] | None = None
    ) -> asyncio.Future[Any]:
        """A durable write's future (failed, not raised, when the store is closed, as the
        SQLite store does)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        writer = self._writer
        if writer is None or self._closed:
            future.set_exception(StoreUnavailable("the store is closed"))
        else:
            writer.submit(Op(commands, future, parse))
        return future

    def _batch(self) -> Pending:
        writer = self._writer
        if writer is None or self._closed:
            raise StoreUnavailable("the store is closed")
        return writer.batched()

    async def _read(self, call: Callable[[], Awaitable[T]], scale: float = 1.0) -> T:
        """One read, within the timeout; a connection Redis closed gets one more try."""
        if self._closed:
            raise StoreUnavailable("the store is closed")
        try:
            async with asyncio.timeout(self.timeout * scale):
                try:
                    return await call()
                except RedisConnectionError:
                    return await call()
        except NoScriptError:
            raise
        except (RedisError, OSError, TimeoutError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc) or repr(exc)
            raise StoreUnavailable(f"Redis: {reason}") from exc

    async def _eval(self, name: str, *args: Any) -> Any:
        """A read-only script (loaded again if Redis lost its script cache)."""
        sha = self._sha[name]
        try:
            return await self._read(lambda: self.client.evalsha(sha, 0, self.keys.prefix, *args))
        except NoScriptError:
            await self._read(lambda: self.client.script_load(SCRIPTS[name].source))
            return await self._read(lambda: self.client.evalsha(sha, 0, self.keys.prefix, *args))

    async def _hash(self, key: str) -> dict[bytes, bytes]:
        """A whole hash, read in slices (HSCAN, each call within the timeout): a big one
        never blocks Redis at once."""
        found: dict[bytes, bytes] = {}
        cursor = 0
        while True:
            cursor, part = await self._read(
                lambda cursor=cursor: self.client.hscan(key, cursor, count=BULK)
            )
            found.update(part)
            if not cursor:
                return found

    async def _values(self, key: str, fields: Sequence[Any]) -> list[bytes | None]:
        """HMGET of many fields, in slices, in one round trip."""
        if not fields:
            return []

        async def op() -> list[bytes | None]:
            async with self.client.pipeline(transaction=False) as pipe:
                for part in _chunks(fields, BULK):
                    pipe.hmget(key, list(part))
                return [value for part in await pipe.execute() for value in part]

        return await self._read(op, scale=max(1.0, len(fields) / 20_000))

    # -- batched writes, as the writer sends them ----------------------------------------

    def _batch_commands(self, pending: Pending) -> list[Command]:
        keys, names, profiles = self.keys, self.names, self.profiles
        commands: list[Command] = []
        used_names: set[str] = set()
        used_profiles: set[str] = set()
        agents: list[Any] = []
        for agent_id, record in pending.agents.items():
            row = encode_agent(record, profiles)
            if isinstance(row[0], str):
                used_profiles.add(row[0])
            agents += (agent_id, dumps(row))
        heartbeats: list[Any] = []
        for agent_id, record in pending.heartbeats.items():
            line = encode_heartbeat(record, names)
            if len(line) > 2 and isinstance(line[2], str):
                used_names.add(line[2])
            heartbeats += (agent_id, dumps(line))
        samples: list[Any] = []
        for agent_id, record in pending.samples.items():
            if record.last_seen is None:
                continue
            line = encode_sample(record, names)
            if len(line) > 2 and isinstance(line[2], str):
                used_names.add(line[2])
            samples += (agent_id, dumps(line))
        # The fragments the rows use go first, with every batch that uses them: one
        # command of a few fields, and a Redis that lost its data gets them back.
        for key, table, used in (
            (keys.metric_names, names, used_names),
            (keys.profiles, profiles, used_profiles),
        ):
            if used:
                fields = (v for ident in sorted(used) for v in (ident, table.blob(ident)))
                commands.append(("HSET", key, *fields))
        for part in _chunks(agents, 2 * BULK):
            commands.append(("HSET", keys.agents, *part))
        for part in _chunks(heartbeats, 2 * BULK):
            commands.append(("HSET", keys.hb, *part))
        for part in _chunks(samples, 2 * BULK):
            commands.append(self._script("samples", self.samples_kept, *part))
        history = [v for change in pending.history for v in change]
        for part in _chunks(history, 4 * 2_000):
            commands.append(self._script("sessions", self.sessions_kept, SESSION_OPEN_TAIL, *part))
        for key, seq, value in pending.outputs:
            commands.append(("HSETNX", key, seq, value))
        if pending.prune is not None:
            commands.append(("SET", keys.hist_min, millis(pending.prune)))
        return commands

    # -- credentials -----------------------------------------------------------------

    async def add_credential(self, credential: CredentialRecord) -> None:
        uses, revoked, expires, body = encode_credential(credential)

        def parse(answers: list[Any]) -> None:
            credential.rev = int(answers[0])

        await self._write(
            [self._script("add_credential", CREDENTIAL_LOG, credential.id, uses, revoked,
                          expires, body)],
            parse,
        )  # fmt: skip

    async def credentials(self) -> list[CredentialRecord]:
        stored = await self._hash(self.keys.cred)
        decoded = [decode_credential(k, v) for k, v in stored.items()]
        decoded.sort(key=lambda pair: (pair[0].created_at, pair[1]))
        return [record for record, _ in decoded]

    async def credentials_since(self, rev: int) -> tuple[int, list[CredentialRecord]]:
        # Every hub asks every second and nothing changed almost always: one GET says so.
        current = await self._read(lambda: self.client.get(self.keys.cred_rev))
        if int(current or 0) == rev:
            return rev, []
        answer = await self._eval("credentials_since", rev)
        if int(answer[0]) == 0:
            # Changes older than the log keeps, or a Redis that lost its data: all of them.
            records = await self.credentials()
        else:
            pairs = answer[1:]
            records = [
                decode_credential(pairs[i], pairs[i + 1])[0]
                for i in range(0, len(pairs), 2)
                if pairs[i + 1] is not None
            ]
            records.sort(key=lambda r: r.rev)
        return max((r.rev for r in records), default=rev), records

    async def revoke_credential(self, credential_id: str) -> CredentialRecord | None:
        revocation = CredentialRecord(
            id=credential_id, kind="jwt", secret_hash=b"", created_at=time.time(),
            revoked=True, issued_by="revocation",
        )  # fmt: skip
        body = encode_credential(revocation)[3]

        def parse(answers: list[Any]) -> CredentialRecord | None:
            value = answers[0]
            return None if value is None else decode_credential(credential_id, value)[0]

        record: CredentialRecord | None = await self._write(
            [self._script("revoke_credential", CREDENTIAL_LOG, credential_id, JWT_PREFIX, body)],
            parse,
        )
        return record

    async def enroll(
        self, credential_id: str, agent_id: str, issued: CredentialRecord, revoke: Sequence[str]
    ) -> bool:
        uses, revoked, expires, body = encode_credential(issued)

        def parse(answers: list[Any]) -> bool:
            rev = int(answers[0])
            if rev:
                issued.rev = rev
            return rev != 0

        done: bool = await self._write(
            [self._script("enroll", CREDENTIAL_LOG, credential_id, agent_id,
                          repr(float(issued.created_at)), issued.id, uses, revoked, expires,
                          body, len(revoke), *revoke)],
            parse,
        )  # fmt: skip
        return done

    async def purge_credentials(self, credential_ids: Sequence[str]) -> int:
        ids = list(credential_ids)
        deleted = 0
        for start in range(0, len(ids), BULK):
            chunk = ids[start : start + BULK]
            deleted += await self._write(
                [self._script("purge_credentials", *chunk)], lambda answers: int(answers[0])
            )
        return deleted

    # -- agents and sessions -----------------------------------------------------------

    async def load_agents(self) -> list[AgentRecord]:
        rows = {k: loads(v) for k, v in (await self._hash(self.keys.agents)).items()}
        heartbeats = {k: loads(v) for k, v in (await self._hash(self.keys.hb)).items()}
        await self._learn(self.keys.profiles, self.profiles, (row[:1] for row in rows.values()))
        await self._learn(
            self.keys.metric_names, self.names, (line[2:] for line in heartbeats.values())
        )
        return [
            decode_agent(text(agent_id), row, heartbeats.get(agent_id), self.profiles, self.names)
            for agent_id, row in rows.items()
        ]

    async def _learn(self, key: str, table: Dictionary, parts: Iterable[Sequence[Any]]) -> None:
        """Read the fragments rows refer to that this store does not know yet."""
        unknown = sorted(
            {ident for p in parts if (ident := interned_id(p)) and not table.knows(ident)}
        )
        if unknown:
            for ident, blob in zip(unknown, await self._values(key, unknown), strict=True):
                table.learn(ident, blob)

    def save_agent(self, agent: AgentRecord) -> None:
        pending = self._batch()
        pending.agents[agent.agent_id] = agent
        pending.heartbeats[agent.agent_id] = agent

    def save_heartbeats(self, agents: Iterable[AgentRecord], samples: bool) -> None:
        pending = self._batch()
        heartbeats = pending.heartbeats
        kept = pending.samples
        for agent in agents:
            if agent.last_seen is None:
                continue
            heartbeats[agent.agent_id] = agent
            if samples:
                kept[agent.agent_id] = agent

    def open_session(
        self,
        session_id: str,
        agent_id: str,
        hub_id: str,
        peer: str,
        credential_id: str | None,
        connected_at: float,
    ) -> None:
        pending = self._batch()
        prefix, line = encode_session_open(session_id, hub_id, peer, credential_id, connected_at)
        pending.history.append((b"o", agent_id, prefix, line))
        self._session_agents[session_id] = agent_id

    def close_session(self, session_id: str, ended_at: float, code: int, reason: str) -> None:
        pending = self._batch()
        agent_id = self._session_agents.pop(session_id, None)
        if agent_id is None:
            log.debug("closing session %s that this store did not open", session_id)
            return
        prefix, tail = encode_session_close(session_id, ended_at, code, reason)
        pending.history.append((b"c", agent_id, prefix, tail))

    async def agent_history(self, agent_id: str, limit: int = 100) -> dict[str, list[Any]]:
        async def op() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.hget(self.keys.hist, agent_id)
                pipe.get(self.keys.hist_min)
                return await pipe.execute()

        value, floor = await self._read(op)
        oldest = int(floor) if floor else None
        sample_lines, session_lines = split_history(value)
        samples = [loads(line) for line in sample_lines]
        samples = [s for s in samples if oldest is None or s[0] >= oldest]
        samples.sort(key=lambda s: s[0], reverse=True)
        await self._learn(self.keys.metric_names, self.names, (s[2:] for s in samples))
        heartbeats = [
            {"time": format_millis(s[0]), "status": s[1], "metrics": self.names.decode(s[2:])}
            for s in samples[:limit]
        ]
        sessions = [decode_session(line) for line in session_lines]
        sessions.sort(key=lambda s: s["connected_at"], reverse=True)
        return {"heartbeats": heartbeats, "sessions": sessions[:limit]}

    def prune(self, before: float) -> None:
        pending = self._batch()
        pending.prune = max(pending.prune or 0.0, before)

    # -- retention -------------------------------------------------------------------

    async def prune_expired(
        self, retention: Retention, now: float, export: Path | None = None
    ) -> dict[str, int]:
        """Heartbeat samples (batched, as :meth:`prune`), then outputs, finished jobs with
        their commands, resolved alerts and audit entries past their retention, each in
        writes of at most :data:`CHUNK` ids. Sessions are bounded per agent already
        (``sessions_kept``). Every hub of a cluster may prune: deleting twice is harmless."""
        pruned: dict[str, int] = {}
        if retention.heartbeats:
            self.prune(now - retention.heartbeats)
        if retention.outputs:
            pruned["outputs"] = await self._prune_jobs(now - retention.outputs, whole=False)
        if retention.commands:
            pruned["jobs"] = await self._prune_jobs(now - retention.commands, whole=True)
        if retention.alerts:
            pruned["alerts"] = await self._prune_alerts(now - retention.alerts)
        if retention.audit:
            pruned["audit"] = await self._prune_audit(now - retention.audit, export)
        return pruned

    async def _walk(self, order: str, start: float) -> AsyncIterator[tuple[bytes, float]]:
        """Ids of an order index from the oldest, past ``start``, in chunks."""
        low = f"({start!r}" if start > float("-inf") else "-inf"
        while True:
            found = await self._read(
                lambda low=low: self.client.zrangebyscore(
                    order, low, "+inf", start=0, num=CHUNK, withscores=True
                )
            )
            for member, score in found:
                yield member, score
            if len(found) < CHUNK:
                return
            low = f"({found[-1][1]!r}"

    async def _prune_jobs(self, cutoff: float, whole: bool) -> int:
        """Outputs (``whole`` False) or everything (True) of jobs that finished before
        ``cutoff``. The walk of outputs starts past a watermark (jobs already bare are not
        walked again); a job created after ``cutoff`` ends either walk."""
        keys = self.keys
        mark_key = f"{keys.prefix}:out:pruned"
        start = float("-inf")
        if not whole:
            mark = await self._read(lambda: self.client.get(mark_key))
            start = float(mark) if mark is not None else float("-inf")
        deleted = 0
        mark_to: float | None = None
        blocked = False  # a running or recent job: the watermark stays before it
        async for job_id, score in self._walk(keys.jobs_order, start):
            value = (await self._values(keys.jobs, [job_id]))[0]
            if value is None:
                continue
            job = decode_job(job_id, value)
            if job.created_at >= cutoff:
                break
            if job.state == "running" or job.updated_at >= cutoff:
                blocked = True
                continue
            ids = await self._read(
                lambda job_id=job_id: self.client.zrange(keys.job_commands(text(job_id)), 0, -1)
            )
            deleted += await self._drop_commands(job.job_id, ids, whole)
            if not blocked:
                mark_to = score
        if not whole and mark_to is not None:
            await self._write([("SET", mark_key, repr(mark_to))])
        return deleted

    async def _drop_commands(self, job_id: str, ids: list[bytes], whole: bool) -> int:
        keys = self.keys
        deleted = 0
        for part in _chunks(ids, CHUNK):
            part = list(part)
            outputs = [keys.output(text(c)) for c in part]
            commands: list[Command] = [("DEL", *outputs)]
            if whole:
                by_agent: dict[str, list[bytes]] = {}
                for command_id, value in zip(
                    part, await self._values(keys.cmds, part), strict=True
                ):
                    if value is not None:
                        agent_id = decode_command(command_id, value).agent_id
                        by_agent.setdefault(agent_id, []).append(command_id)
                commands += [
                    ("HDEL", keys.cmds, *part),
                    ("ZREM", keys.cmds_order, *part),
                    ("ZREM", keys.cmds_open, *part),
                ]
                commands += [
                    ("ZREM", keys.agent_commands(agent), *members)
                    for agent, members in by_agent.items()
                ]
            results = await self._write(commands, parse=lambda replies: replies)
            deleted += int(results[0] or 0) + (int(results[1] or 0) if whole else 0)
        if whole:
            await self._write(
                [
                    ("DEL", keys.job_commands(job_id)),
                    ("HDEL", keys.jobs, job_id),
                    ("ZREM", keys.jobs_order, job_id),
                    ("ZREM", keys.jobs_running, job_id),
                ]
            )
            deleted += 1
        return deleted

    async def _prune_alerts(self, cutoff: float) -> int:
        keys = self.keys
        old: list[bytes] = []
        async for alert_id, _ in self._walk(keys.alerts_order, float("-inf")):
            value = (await self._values(keys.alerts, [alert_id]))[0]
            if value is None:
                continue
            alert = decode_alert(alert_id, value)
            if alert.first_seen >= cutoff:
                break
            if alert.state == "resolved" and (alert.resolved_at or 0.0) < cutoff:
                old.append(alert_id)
        for part in _chunks(old, CHUNK):
            await self._write(
                [
                    ("HDEL", keys.alerts, *part),
                    ("ZREM", keys.alerts_order, *part),
                    ("ZREM", keys.alerts_open, *part),
                ]
            )
        return len(old)

    async def _prune_audit(self, cutoff: float, export: Path | None) -> int:
        """The oldest entries (stream order) older than ``cutoff`` by their own time;
        appended to ``export`` before they are deleted."""
        deleted = 0
        while True:
            found = await self._read(
                lambda: self.client.xrange(self.keys.audit, "-", "+", count=CHUNK)
            )
            old = []
            for entry_id, fields in found:
                if loads(fields[b"e"])[0] >= cutoff:
                    break
                old.append((entry_id, fields[b"e"]))
            if not old:
                return deleted
            if export is not None:
                lines = b"".join(
                    orjson.dumps(decode_audit(entry_id, value)) + b"\n" for entry_id, value in old
                )
                await asyncio.to_thread(append_synced, export, lines)
            await self._write([("XDEL", self.keys.audit, *(entry_id for entry_id, _ in old))])
            deleted += len(old)
            if len(old) < len(found) or len(found) < CHUNK:
                return deleted

    # -- ledger ------------------------------------------------------------------------

    def _job_args(
        self, job: JobRecord, commands: Sequence[CommandRecord], audit: Sequence[AuditEntry]
    ) -> Command:
        args: list[Any] = [job.job_id, encode_job(job), int(job.state == "running"),
                           len(commands), len(audit)]  # fmt: skip
        for c in commands:
            args += (c.command_id, c.agent_id, c.seq, int(c.state in UNFINISHED), encode_command(c))
        args.extend(encode_audit(e) for e in audit)
        return self._script("add_job", *args)

    async def add_job(
        self,
        job: JobRecord,
        commands: Sequence[CommandRecord],
        audit: Sequence[AuditEntry] = (),
    ) -> None:
        if self._closed:
            raise StoreUnavailable("the store is closed")
        if len(commands) > THREAD_ENCODE:
            # The records are new and nobody holds them until this write completes; a job
            # to the whole fleet would otherwise cost the event loop tens of milliseconds.
            command = await asyncio.to_thread(self._job_args, job, list(commands), list(audit))
        else:
            command = self._job_args(job, commands, audit)
        await self._write([command])

    def save_commands(
        self,
        commands: Sequence[CommandRecord],
        audit: Sequence[AuditEntry] = (),
        jobs: Sequence[JobRecord] = (),
    ) -> asyncio.Future[None]:
        fence = self.fence() if self.fence is not None else None
        keys = [fence[0]] if fence is not None else []
        args: list[Any] = [fence[1] if fence is not None else "", len(commands), len(jobs),
                           len(audit)]  # fmt: skip
        for c in commands:
            args += (c.command_id, int(c.state in UNFINISHED), encode_command(c))
        for j in jobs:
            args += (j.job_id, int(j.state == "running"), encode_job(j))
        args.extend(encode_audit(e) for e in audit)
        return self._write([self._script("save_commands", *args, keys=keys)])

    def add_output(self, command_id: str, seq: int, stream: str, data: str) -> None:
        self._batch().outputs.append((self.keys.output(command_id), seq, dumps([stream, data])))

    async def unfinished(self) -> tuple[list[JobRecord], list[CommandRecord], int]:
        keys = self.keys

        async def op() -> list[Any]:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.zrange(keys.jobs_running, 0, -1)
                pipe.zrange(keys.cmds_open, 0, -1)
                pipe.get(keys.cmds_top)
                return await pipe.execute()

        running, open_ids, top = await self._read(op)
        jobs = [
            decode_job(job_id, value)
            for job_id, value in zip(running, await self._values(keys.jobs, running), strict=True)
            if value is not None
        ]
        values = await self._values(keys.cmds, open_ids)
        commands = [
            decode_command(command_id, value)
            for command_id, value in zip(open_ids, values, strict=True)
            if value is not None
        ]
        commands.sort(key=lambda c: c.seq)
        # A running job's row is written when it is accepted and when it finishes: its
        # counts are what its commands' stored states say.
        for job in jobs:
            index = keys.job_commands(job.job_id)
            ids = await self._read(lambda index=index: self.client.zrange(index, 0, -1))
            counts: dict[str, int] = {}
            for value in await self._values(keys.cmds, ids):
                if value is not None:
                    state = loads(value)[4]
                    counts[state] = counts.get(state, 0) + 1
            job.counts = counts
        return jobs, commands, int(top or 0)

    async def command(self, command_id: str) -> dict[str, Any] | None:
        value = await self._read(lambda: self.client.hget(self.keys.cmds, command_id))
        return None if value is None else decode_command(command_id, value).view()

    async def command_output(self, command_id: str) -> list[dict[str, Any]]:
        chunks = await self._read(lambda: self.client.hgetall(self.keys.output(command_id)))
        out = []
        for seq, value in sorted(chunks.items(), key=lambda item: int(item[0])):
            stream, data = loads(value)
            out.append({"seq": int(seq), "stream": stream, "data": data})
        return out

    async def job(self, job_id: str) -> dict[str, Any] | None:
        value = await self._read(lambda: self.client.hget(self.keys.jobs, job_id))
        if value is None:
            return None
        ids = await self._read(lambda: self.client.zrange(self.keys.job_commands(job_id), 0, -1))
        commands = [
            decode_command(command_id, v)
            for command_id, v in zip(ids, await self._values(self.keys.cmds, ids), strict=True)
            if v is not None
        ]
        commands.sort(key=lambda c: c.seq)
        return {"job": decode_job(job_id, value).view(), "commands": [c.view() for c in commands]}

    _COMMAND_FILTERS = frozenset(
        ("command_id", "job_id", "agent_id", "name", "state", "dispatched_by")
    )

    async def commands(self, filter: dict[str, Any], limit: int, before: str | None) -> Page:
        wanted = _wanted(filter, self._COMMAND_FILTERS)
        cursor = _cursor(before)
        keys = self.keys
        if "command_id" in wanted:
            return await self._by_ids(wanted["command_id"], keys.cmds, keys.cmds_order,
                                      decode_command, wanted, limit, cursor)  # fmt: skip
        if len(wanted.get("job_id", ())) == 1:
            index = keys.job_commands(next(iter(wanted["job_id"])))
        elif len(wanted.get("agent_id", ())) == 1:
            index = keys.agent_commands(next(iter(wanted["agent_id"])))
        elif "state" in wanted and wanted["state"] <= UNFINISHED:
            index = keys.cmds_open
        else:
            index = keys.cmds_order
        return await self._scan(index, keys.cmds, decode_command, wanted, limit, cursor)

    _JOB_FILTERS = frozenset(("job_id", "name", "state", "dispatched_by"))

    async def jobs(self, filter: dict[str, Any], limit: int, before: str | None) -> Page:
        wanted = _wanted(filter, self._JOB_FILTERS)
        cursor = _cursor(before)
        keys = self.keys
        if "job_id" in wanted:
            return await self._by_ids(wanted["job_id"], keys.jobs, keys.jobs_order, decode_job,
                                      wanted, limit, cursor)  # fmt: skip
        running = "state" in wanted and wanted["state"] <= {"running"}
        index = keys.jobs_running if running else keys.jobs_order
        return await self._scan(index, keys.jobs, decode_job, wanted, limit, cursor)

    async def _scan(
        self,
        index: str,
        rows: str,
        decode: Callable[[bytes, bytes], Any],
        wanted: dict[str, set[str]],
        limit: int,
        cursor: int | None,
    ) -> Page:
        """Newest first along an index (a zset of insertion numbers), keeping the rows
        that match, reading at most :data:`SCAN_WINDOW` rows."""
        items: list[dict[str, Any]] = []
        top: str | int = "+inf" if cursor is None else f"({cursor}"
        size = min(max(limit + 1, 100), CHUNK)
        scanned = 0
        last = 0
        while True:
            upper = top
            found = await self._read(
                lambda upper=upper: self.client.zrevrangebyscore(
                    index, upper, "-inf", start=0, num=size, withscores=True
                )
            )
            if not found:
                return Page(items, None)
            values = await self._values(rows, [member for member, _ in found])
            for (member, score), value in zip(found, values, strict=True):
                scanned += 1
                number = int(score)
                if value is not None:
                    record = decode(member, value)
                    if _matches(record, wanted):
                        if len(items) == limit:
                            return Page(items, str(last))
                        items.append(record.view())
                        last = number
                if scanned >= SCAN_WINDOW:
                    return Page(items, str(number))
            if len(found) < size:
                return Page(items, None)
            top = f"({int(found[-1][1])}"

    async def _by_ids(
        self,
        ids: set[str],
        rows: str,
        order: str,
        decode: Callable[[bytes | str, bytes], Any],
        wanted: dict[str, set[str]],
        limit: int,
        cursor: int | None,
    ) -> Page:
        """A listing filtered by the objects' own ids: read those rows."""
        names = sorted(ids)

        async def op() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.hmget(rows, names)
                pipe.zmscore(order, names)
                return await pipe.execute()

        values, numbers = await self._read(op)
        found = [
            (int(number), decode(name, value))
            for name, value, number in zip(names, values, numbers, strict=True)
            if value is not None and number is not None
            and (cursor is None or number < cursor)
        ]  # fmt: skip
        found = [(n, r) for n, r in found if _matches(r, wanted)]
        found.sort(key=lambda pair: pair[0], reverse=True)
        more = len(found) > limit
        page = found[:limit]
        return Page([r.view() for _, r in page], str(page[-1][0]) if more else None)

    # -- audit -------------------------------------------------------------------------

    def audit(self, entries: Sequence[AuditEntry]) -> asyncio.Future[None]:
        if not entries:
            return self._write([])
        return self._write([self._script("audit", *(encode_audit(e) for e in entries))])

    _AUDIT_FILTERS = frozenset(("action", "actor", "subject", "source", "hub_id"))

    async def audit_entries(self, filter: dict[str, Any], limit: int, before: str | None) -> Page:
        """Newest first by stream id (Redis's clock, so every hub's entries interleave in
        time). A filter reads the stream backwards, at most :data:`SCAN_WINDOW` entries
        per request: cheap for recent entries, a short page with a cursor otherwise."""
        wanted = _wanted(filter, self._AUDIT_FILTERS)
        if before is not None and not AUDIT_CURSOR.fullmatch(before):
            raise ValueError("invalid cursor")
        items: list[dict[str, Any]] = []
        end = "+" if before is None else f"({before}"
        size = min(max(limit + 1, 100), CHUNK)
        scanned = 0
        while True:
            upper = end
            found = await self._read(
                lambda upper=upper: self.client.xrevrange(self.keys.audit, upper, "-", count=size)
            )
            if not found:
                return Page(items, None)
            for entry_id, fields in found:
                scanned += 1
                entry = decode_audit(entry_id, fields[b"e"])
                if _matches(entry, wanted):
                    if len(items) == limit:
                        return Page(items, items[-1]["id"])
                    items.append(entry)
                if scanned >= SCAN_WINDOW:
                    return Page(items, text(entry_id))
            if len(found) < size:
                return Page(items, None)
            end = f"({text(found[-1][0])}"

    # -- alerts ------------------------------------------------------------------------

    async def save_alert(self, alert: AlertRecord) -> None:
        await self._write(
            [self._script("save_alert", alert.alert_id, int(alert.state != RESOLVED),
                          encode_alert(alert))]
        )  # fmt: skip

    async def open_alerts(self) -> list[AlertRecord]:
        ids = await self._read(lambda: self.client.zrange(self.keys.alerts_open, 0, -1))
        return [
            decode_alert(alert_id, value)
            for alert_id, value in zip(ids, await self._values(self.keys.alerts, ids), strict=True)
            if value is not None
        ]

    _ALERT_FILTERS = frozenset(("alert_id", "rule", "severity", "subject", "state"))

    async def alerts(self, filter: dict[str, Any], limit: int, before: str | None) -> Page:
        wanted = _wanted(filter, self._ALERT_FILTERS)
        cursor = _cursor(before)
        keys = self.keys
        if "alert_id" in wanted:
            return await self._by_ids(wanted["alert_id"], keys.alerts, keys.alerts_order,
                                      decode_alert, wanted, limit, cursor)  # fmt: skip
        unresolved = "state" in wanted and RESOLVED not in wanted["state"]
        index = keys.alerts_open if unresolved else keys.alerts_order
        return await self._scan(index, keys.alerts, decode_alert, wanted, limit, cursor)
