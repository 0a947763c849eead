"""The embedded store: one SQLite file in WAL mode, written by one thread.

Why a thread: SQLite calls block, and nothing may block the event loop. Every write is a
small function queued to the writer thread, which takes all queued functions at once, runs
them in one transaction (if one fails, the group runs again with each in a savepoint, so
that one failure does not undo the others) and commits with ``synchronous=FULL``: one fsync
for the whole group. The futures of a group are resolved on the event loop in one callback.
Readers use their own connections in their own threads; WAL lets them read while the writer
writes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from ..model import (
    JWT_PREFIX,
    AgentRecord,
    AlertRecord,
    CommandRecord,
    CredentialRecord,
    JobRecord,
)
from ..protocol.times import format_time
from .base import AuditEntry, Page, Store, StoreUnavailable

if TYPE_CHECKING:
    import sqlite_utils

log = logging.getLogger(__name__)

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]
#: What became of one queued operation: the future to settle, its result, its error.
Outcome = tuple[asyncio.Future[Any] | None, Any, BaseException | None]

SCHEMA_VERSION = 1
#: ``full`` fsyncs every commit (survives power loss); ``normal`` lets the OS write the WAL
#: back (survives a crash or kill -9 of the hub, not of the machine).
SYNCHRONOUS = {"full": "FULL", "normal": "NORMAL"}
#: Most operations a writer runs in one transaction; bounds commit latency under load.
MAX_GROUP = 20_000
#: The writer checkpoints the WAL itself only past this many pages (~100 MB): a backstop.
#: Normally the hub checkpoints every second from a reader (:meth:`SQLiteStore.checkpoint`),
#: off the write path: measured, SQLite's own checkpoint every 1,000 pages ran inside some
#: commit and made it the slowest of the round trips (p99 5.9-6.9 ms instead of 2.2 ms
#: with synchronous=NORMAL, 3.9 instead of 3.0 with FULL).
WRITER_AUTOCHECKPOINT_PAGES = 25_000
#: After a checkpoint lets the WAL start over, a bigger file is cut back to this size.
WAL_SIZE_LIMIT = 64 * 1024 * 1024
#: Waiters woken per event-loop callback after a commit.
SETTLE_SLICE = 500


def _dumps(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _loads(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)


def _upsert(table: str, columns: str) -> str:
    """INSERT that updates in place on a key conflict, keeping the rowid paging relies on."""
    names = [c.strip() for c in columns.split(",")]
    updates = ", ".join(f"{n} = excluded.{n}" for n in names[1:])
    return (
        f"INSERT INTO {table} ({columns}) VALUES ({', '.join('?' * len(names))}) "
        f"ON CONFLICT({names[0]}) DO UPDATE SET {updates}"
    )


# -- schema --------------------------------------------------------------------------


def _migrate_1(db: sqlite_utils.Database) -> None:
    db["meta"].create({"key": str, "value": str}, pk="key")
    db["credentials"].create(
        {
            "id": str,
            "kind": str,
            "secret_hash": bytes,
            "agent_id": str,
            "role": str,
            "name": str,
            "pattern": str,
            "uses_left": int,
            "created_at": float,
            "expires_at": float,
            "revoked": int,
            "issued_by": str,
            "rev": int,
        },
        pk="id",
        not_null={"kind", "secret_hash", "created_at", "revoked", "rev"},
        defaults={"revoked": 0},
    )
    db["credentials"].create_index(["rev"])
    db["credentials"].create_index(["agent_id"])
    db["enrollments"].create(
        {"credential_id": str, "agent_id": str, "enrolled_at": float},
        pk=("credential_id", "agent_id"),
    )
    db["agents"].create(
        {
            "agent_id": str,
            "platform": str,
            "region": str,
            "version": str,
            "hostname": str,
            "labels": str,
            "capabilities": str,
            "location": str,
            "status": str,
            "metrics": str,
            "hub_id": str,
            "enrolled_by": str,
            "first_seen": float,
            "connected_at": float,
            "last_seen": float,
        },
        pk="agent_id",
    )
    db["sessions"].create(
        {
            "session_id": str,
            "agent_id": str,
            "hub_id": str,
            "peer": str,
            "credential_id": str,
            "connected_at": float,
            "ended_at": float,
            "close_code": int,
            "close_reason": str,
        },
        pk="session_id",
    )
    db["sessions"].create_index(["agent_id", "connected_at"])
    db["heartbeats"].create(
        {"agent_id": str, "ts": float, "status": str, "metrics": str}, pk=("agent_id", "ts")
    )
    db["heartbeats"].create_index(["ts"])
    db["jobs"].create(
        {
            "job_id": str,
            "name": str,
            "args": str,
            "target": str,
            "state": str,
            "total": int,
            "counts": str,
            "created_at": float,
            "updated_at": float,
            "dispatched_by": str,
            "timeout": float,
            "ttl": float,
            "max_concurrency": int,
            "max_errors": int,
            "spec": str,
        },
        pk="job_id",
    )
    db["jobs"].create_index(["state"])
    db["commands"].create(
        {
            "command_id": str,
            "job_id": str,
            "agent_id": str,
            "name": str,
            "args": str,
            "state": str,
            "timeout": float,
            "issued_at": float,
            "expires_at": float,
            "updated_at": float,
            "sent_at": float,
            "acked_at": float,
            "dispatched_by": str,
            "result": str,
            "output_bytes": int,
            "truncated": int,
            "seq": int,
        },
        pk="command_id",
    )
    db["commands"].create_index(["job_id"])
    db["commands"].create_index(["agent_id", "seq"])
    db["commands"].create_index(["state"])
    db["outputs"].create(
        {"command_id": str, "seq": int, "stream": str, "data": str}, pk=("command_id", "seq")
    )
    db["audit"].create(
        {
            "id": int,
            "ts": float,
            "hub_id": str,
            "action": str,
            "actor": str,
            "subject": str,
            "source": str,
            "detail": str,
        },
        pk="id",
    )
    db["audit"].create_index(["action"])
    db["audit"].create_index(["subject"])
    db["alerts"].create(
        {
            "alert_id": str,
            "rule": str,
            "severity": str,
            "subject": str,
            "state": str,
            "first_seen": float,
            "last_seen": float,
            "message": str,
            "acknowledged_by": str,
            "acknowledged_at": float,
            "comment": str,
            "resolved_at": float,
        },
        pk="alert_id",
    )
    db["alerts"].create_index(["state"])


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_migrate_1]


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to :data:`SCHEMA_VERSION`, one migration per transaction."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise RuntimeError(
            f"the store was written by a newer Tether (schema {version} > {SCHEMA_VERSION})"
        )
    if version == SCHEMA_VERSION:
        return
    # Only a store to create or upgrade needs sqlite-utils: importing it (and numpy, which
    # it takes along) is a fifth of a hub's start, and a restart should serve soonest.
    import sqlite_utils

    db = sqlite_utils.Database(conn)
    for number in range(version, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            MIGRATIONS[number](db)
            conn.execute(f"PRAGMA user_version = {number + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def connect(path: Path, synchronous: str = "FULL") -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={SYNCHRONOUS[synchronous.lower()]}")
    conn.execute("PRAGMA busy_timeout=10000")
    conn.execute("PRAGMA temp_store=MEMORY")
    return conn


# -- threads ---------------------------------------------------------------------------


class _Worker(threading.Thread):
    """A thread with its own connection that runs queued operations.

    The writer groups every queued operation into one transaction; readers run each
    operation on its own.
    """

    def __init__(
        self,
        path: Path,
        loop: asyncio.AbstractEventLoop,
        name: str,
        writer: bool,
        synchronous: str = "full",
    ):
        super().__init__(name=name, daemon=True)
        self.path = path
        self.synchronous = synchronous
        self.loop = loop
        self.writer = writer
        self.queue: queue.SimpleQueue[tuple[Op, asyncio.Future[Any] | None] | None] = (
            queue.SimpleQueue()
        )
        self.ready = threading.Event()
        self.failure: BaseException | None = None
        self.commits = 0

    def run(self) -> None:
        try:
            conn = connect(self.path, self.synchronous)
            if self.writer:
                conn.execute(f"PRAGMA wal_autocheckpoint={WRITER_AUTOCHECKPOINT_PAGES}")
                conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
                migrate(conn)
        except BaseException as exc:
            self.failure = exc
            self.ready.set()
            return
        self.ready.set()
        try:
            if self.writer:
                self._write_loop(conn)
            else:
                self._read_loop(conn)
        finally:
            conn.close()

    def _read_loop(self, conn: sqlite3.Connection) -> None:
        while (item := self.queue.get()) is not None:
            op, future = item
            try:
                result, error = _run(op, conn), None
            except Exception as exc:
                result, error = None, exc
            self._resolve([(future, result, error)])
        self.queue.put(None)  # wake the other readers sharing this queue

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        stopping = False
        while not stopping:
            item = self.queue.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < MAX_GROUP:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self._resolve(self._commit(conn, batch))

    def _commit(
        self, conn: sqlite3.Connection, batch: list[tuple[Op, asyncio.Future[Any] | None]]
    ) -> list[Outcome]:
        if len(batch) == 1:
            return self._commit_one(conn, *batch[0])
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                outcomes = self._run_together(conn, batch)
            except Exception:
                # One operation failed: do the group again, each in a savepoint, so that
                # it alone fails. Operations are pure functions of the connection and
                # their own data, so running them again after the rollback is safe.
                conn.execute("ROLLBACK")
                conn.execute("BEGIN IMMEDIATE")
                outcomes = self._run_isolated(conn, batch)
            conn.execute("COMMIT")
            self.commits += 1
        except Exception as exc:
            log.error("store commit failed: %s", exc)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            failure = StoreUnavailable(f"commit failed: {exc}")
            return [(future, None, failure) for _, future in batch]
        return outcomes

    @staticmethod
    def _run_together(
        conn: sqlite3.Connection, batch: list[tuple[Op, asyncio.Future[Any] | None]]
    ) -> list[Outcome]:
        """The usual case: every operation succeeds, no savepoint each (two statements
        fewer per operation; a registration makes two of them)."""
        return [(future, _run(op, conn), None) for op, future in batch]

    @staticmethod
    def _run_isolated(
        conn: sqlite3.Connection, batch: list[tuple[Op, asyncio.Future[Any] | None]]
    ) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for op, future in batch:
            conn.execute("SAVEPOINT op")
            try:
                outcomes.append((future, _run(op, conn), None))
                conn.execute("RELEASE op")
            except Exception as exc:
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                log.warning("store operation failed: %s", exc, exc_info=True)
                outcomes.append((future, None, exc))
        return outcomes

    def _commit_one(
        self, conn: sqlite3.Connection, op: Op, future: asyncio.Future[Any] | None
    ) -> list[Outcome]:
        """A group of one needs no savepoint: its transaction is its own."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            result = _run(op, conn)
            conn.execute("COMMIT")
            self.commits += 1
        except Exception as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            log.warning("store operation failed: %s", exc, exc_info=True)
            return [(future, None, exc)]
        return [(future, result, None)]

    def _resolve(self, outcomes: list[Outcome]) -> None:
        waiting = [outcome for outcome in outcomes if outcome[0] is not None]
        if not waiting:
            return
        try:
            self.loop.call_soon_threadsafe(_settle, self.loop, waiting)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more


def _run(op: Op, conn: sqlite3.Connection) -> Any:
    """Run one operation in this worker's thread. A cursor it returns dies here: freed in
    another thread, it would reset a cached statement under the worker's feet (SQLITE_MISUSE)."""
    result = op(conn)
    if type(result) is sqlite3.Cursor:
        result.close()
        return None
    return result


def _settle(
    loop: asyncio.AbstractEventLoop,
    outcomes: list[Outcome],
) -> None:
    """Wake the waiters of a commit, a slice per turn of the event loop: thousands woken in
    one callback would stall every connection behind them."""
    for future, result, error in outcomes[:SETTLE_SLICE]:
        if future is None or future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    if len(outcomes) > SETTLE_SLICE:
        loop.call_soon(_settle, loop, outcomes[SETTLE_SLICE:])


# -- the store ---------------------------------------------------------------------------


class SQLiteStore(Store):
    """Tether's embedded store in ``DATA_DIR/tether.db``."""

    def __init__(
        self, data_dir: str | os.PathLike[str], readers: int = 2, synchronous: str = "full"
    ) -> None:
        if synchronous.lower() not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {sorted(SYNCHRONOUS)}")
        self.synchronous = synchronous.lower()
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / "tether.db"
        self._readers_count = readers
        self._writer: _Worker | None = None
        self._readers: list[_Worker] = []
        self._read_queue: queue.SimpleQueue[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._commits_before = 0  # by writers already closed

    @property
    def commits(self) -> int:
        writer = self._writer
        return self._commits_before + (writer.commits if writer is not None else 0)

    # -- plumbing ------------------------------------------------------------------------

    async def open(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        self._loop = loop
        writer = _Worker(
            self.path, loop, "tether-store-writer", writer=True, synchronous=self.synchronous
        )
        writer.start()
        await asyncio.to_thread(writer.ready.wait)
        if writer.failure is not None:
            raise StoreUnavailable(f"cannot open {self.path}: {writer.failure}")
        self._writer = writer
        shared: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for index in range(self._readers_count):
            reader = _Worker(self.path, loop, f"tether-store-reader-{index}", writer=False)
            reader.queue = shared
            reader.start()
            self._readers.append(reader)
        self._read_queue = shared
        await asyncio.to_thread(lambda: [r.ready.wait() for r in self._readers])

    async def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.queue.put(None)
            await asyncio.to_thread(writer.join)
            self._commits_before += writer.commits
        if self._read_queue is not None:
            self._read_queue.put(None)
            for reader in self._readers:
                await asyncio.to_thread(reader.join)
            self._readers.clear()
            self._read_queue = None

    def _submit(self, op: Op) -> None:
        writer = self._writer
        if writer is None:
            raise StoreUnavailable("the store is closed")
        writer.queue.put((op, None))

    def _write(self, op: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """The future of a write. A closed store gives a failed future rather than raising,
        so callers that fire writes and watch them (the ledger's transitions, audit batches)
        need neither a coroutine nor a task per write, and awaiting callers see the same
        StoreUnavailable either way."""
        writer = self._writer
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        if writer is None:
            future.set_exception(StoreUnavailable("the store is closed"))
        else:
            writer.queue.put((op, future))
        return future

    def _read(self, op: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        if self._read_queue is None or self._loop is None:
            raise StoreUnavailable("the store is closed")
        future: asyncio.Future[T] = self._loop.create_future()
        self._read_queue.put((op, future))
        return future

    async def ping(self) -> bool:
        if self._writer is None or not self._writer.is_alive():
            return False
        try:
            # asyncio.timeout, not wait_for: on Python 3.11, wait_for swallows a cancel that
            # lands as the read completes, and a cancelled readiness loop then never ended.
            async with asyncio.timeout(2.0):
                await self._read(lambda c: c.execute("SELECT 1").fetchone())
        except (TimeoutError, sqlite3.Error, StoreUnavailable):
            return False
        return True

    async def flush(self) -> None:
        await self._write(lambda conn: None)

    async def checkpoint(self) -> tuple[int, int]:
        """Copy committed pages from the WAL into the database, from a reader: a PASSIVE
        checkpoint waits for nobody and the writer never waits for it. Returns (pages in
        the WAL, pages copied)."""

        def op(conn: sqlite3.Connection) -> tuple[int, int]:
            _busy, log_pages, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            return int(log_pages), int(copied)

        return await self._read(op)

    # -- credentials -----------------------------------------------------------------

    @staticmethod
    def _credential(row: sqlite3.Row | tuple[Any, ...]) -> CredentialRecord:
        (id_, kind, secret_hash, agent_id, role, name, pattern, uses_left, created_at,
         expires_at, revoked, issued_by, rev) = row  # fmt: skip
        return CredentialRecord(
            id=id_,
            kind=kind,
            secret_hash=bytes(secret_hash),
            agent_id=agent_id,
            role=role,
            name=name,
            pattern=pattern,
            uses_left=uses_left,
            created_at=created_at,
            expires_at=expires_at,
            revoked=bool(revoked),
            issued_by=issued_by,
            rev=rev,
        )

    _CREDENTIAL_COLUMNS = (
        "id, kind, secret_hash, agent_id, role, name, pattern, uses_left, created_at, "
        "expires_at, revoked, issued_by, rev"
    )

    @staticmethod
    def _next_rev(conn: sqlite3.Connection) -> int:
        return conn.execute("SELECT coalesce(max(rev), 0) + 1 FROM credentials").fetchone()[0]

    @classmethod
    def _insert_credential(cls, conn: sqlite3.Connection, cred: CredentialRecord) -> None:
        cred.rev = cls._next_rev(conn)
        conn.execute(
            f"INSERT INTO credentials ({cls._CREDENTIAL_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (cred.id, cred.kind, cred.secret_hash, cred.agent_id, cred.role, cred.name,
             cred.pattern, cred.uses_left, cred.created_at, cred.expires_at, int(cred.revoked),
             cred.issued_by, cred.rev),
        )  # fmt: skip

    async def add_credential(self, credential: CredentialRecord) -> None:
        await self._write(lambda conn: self._insert_credential(conn, credential))

    async def credentials(self) -> list[CredentialRecord]:
        def op(conn: sqlite3.Connection) -> list[CredentialRecord]:
            rows = conn.execute(
                f"SELECT {self._CREDENTIAL_COLUMNS} FROM credentials ORDER BY created_at"
            )
            return [self._credential(row) for row in rows]

        return await self._read(op)

    async def credentials_since(self, rev: int) -> tuple[int, list[CredentialRecord]]:
        def op(conn: sqlite3.Connection) -> tuple[int, list[CredentialRecord]]:
            rows = conn.execute(
                f"SELECT {self._CREDENTIAL_COLUMNS} FROM credentials WHERE rev > ? ORDER BY rev",
                (rev,),
            ).fetchall()
            records = [self._credential(row) for row in rows]
            newest = max((r.rev for r in records), default=rev)
            return newest, records

        return await self._read(op)

    async def revoke_credential(self, credential_id: str) -> CredentialRecord | None:
        def op(conn: sqlite3.Connection) -> CredentialRecord | None:
            row = conn.execute(
                f"SELECT {self._CREDENTIAL_COLUMNS} FROM credentials WHERE id = ?",
                (credential_id,),
            ).fetchone()
            if row is None:
                if not credential_id.startswith(JWT_PREFIX):
                    return None
                # A JWT the hub never stored: its revocation is the record.
                revocation = CredentialRecord(
                    id=credential_id, kind="jwt", secret_hash=b"", created_at=time.time(),
                    revoked=True, issued_by="revocation",
                )  # fmt: skip
                self._insert_credential(conn, revocation)
                return revocation
            record = self._credential(row)
            if not record.revoked:
                record.revoked = True
                record.rev = self._next_rev(conn)
                conn.execute(
                    "UPDATE credentials SET revoked = 1, rev = ? WHERE id = ?",
                    (record.rev, credential_id),
                )
            return record

        return await self._write(op)

    async def enroll(
        self, credential_id: str, agent_id: str, issued: CredentialRecord, revoke: Sequence[str]
    ) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT uses_left, revoked, expires_at FROM credentials WHERE id = ?",
                (credential_id,),
            ).fetchone()
            if row is None or row[1]:
                return False
            uses_left, _, expires_at = row
            if expires_at is not None and expires_at <= issued.created_at:
                return False
            known = conn.execute(
                "SELECT 1 FROM enrollments WHERE credential_id = ? AND agent_id = ?",
                (credential_id, agent_id),
            ).fetchone()
            if known is None:
                if uses_left is not None:
                    if uses_left <= 0:
                        return False
                    conn.execute(
                        "UPDATE credentials SET uses_left = uses_left - 1, rev = ? WHERE id = ?",
                        (self._next_rev(conn), credential_id),
                    )
                conn.execute(
                    "INSERT INTO enrollments VALUES (?, ?, ?)",
                    (credential_id, agent_id, issued.created_at),
                )
            for old in revoke:
                conn.execute(
                    "UPDATE credentials SET revoked = 1, rev = ? WHERE id = ? AND revoked = 0",
                    (self._next_rev(conn), old),
                )
            self._insert_credential(conn, issued)
            return True

        return await self._write(op)

    # -- agents and sessions -----------------------------------------------------------

    async def load_agents(self) -> list[AgentRecord]:
        def op(conn: sqlite3.Connection) -> list[AgentRecord]:
            rows = conn.execute(
                "SELECT agent_id, platform, region, version, hostname, labels, capabilities, "
                "location, status, metrics, hub_id, enrolled_by, first_seen, connected_at, "
                "last_seen FROM agents"
            )
            agents = []
            for row in rows:
                location = _loads(row[7])
                agents.append(
                    AgentRecord(
                        agent_id=row[0],
                        platform=row[1] or "",
                        region=row[2] or "",
                        version=row[3] or "",
                        hostname=row[4] or "",
                        labels=_loads(row[5]) or {},
                        capabilities=tuple(_loads(row[6]) or ()),
                        location=tuple(location) if location else None,  # type: ignore[arg-type]
                        status=row[8],
                        metrics=_loads(row[9]) or {},
                        hub_id=row[10],
                        enrolled_by=row[11],
                        first_seen=row[12] or 0.0,
                        connected_at=row[13],
                        last_seen=row[14],
                    )
                )
            return agents

        return await self._read(op)

    def save_agent(self, agent: AgentRecord) -> None:
        row = (
            agent.agent_id, agent.platform, agent.region, agent.version, agent.hostname,
            _dumps(agent.labels), _dumps(list(agent.capabilities)),
            _dumps(list(agent.location) if agent.location else None), agent.status,
            _dumps(agent.metrics), agent.hub_id, agent.enrolled_by, agent.first_seen,
            agent.connected_at, agent.last_seen,
        )  # fmt: skip
        self._submit(
            lambda conn: conn.execute(
                "INSERT OR REPLACE INTO agents (agent_id, platform, region, version, hostname, "
                "labels, capabilities, location, status, metrics, hub_id, enrolled_by, "
                "first_seen, connected_at, last_seen) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
        )

    def save_heartbeats(self, agents: Iterable[AgentRecord], samples: bool) -> None:
        agents = list(agents)
        if not agents:
            return

        def op(conn: sqlite3.Connection) -> None:
            # Built in the writer thread: heartbeat fields are replaced whole, never mutated,
            # so a row reads one consistent value of each, and the next batch has the latest.
            rows = [
                (a.last_seen, a.status, _dumps(a.metrics), a.agent_id)
                for a in agents
                if a.last_seen is not None
            ]
            conn.executemany(
                "UPDATE agents SET last_seen = ?, status = ?, metrics = ? WHERE agent_id = ?",
                rows,
            )
            if samples:
                conn.executemany(
                    "INSERT OR IGNORE INTO heartbeats (ts, status, metrics, agent_id) "
                    "VALUES (?, ?, ?, ?)",
                    rows,
                )

        self._submit(op)

    def open_session(
        self,
        session_id: str,
        agent_id: str,
        hub_id: str,
        peer: str,
        credential_id: str | None,
        connected_at: float,
    ) -> None:
        row = (session_id, agent_id, hub_id, peer, credential_id, connected_at)
        self._submit(
            lambda conn: conn.execute(
                "INSERT OR REPLACE INTO sessions (session_id, agent_id, hub_id, peer, "
                "credential_id, connected_at) VALUES (?, ?, ?, ?, ?, ?)",
                row,
            )
        )

    def close_session(self, session_id: str, ended_at: float, code: int, reason: str) -> None:
        self._submit(
            lambda conn: conn.execute(
                "UPDATE sessions SET ended_at = ?, close_code = ?, close_reason = ? "
                "WHERE session_id = ?",
                (ended_at, code, reason, session_id),
            )
        )

    async def agent_history(self, agent_id: str, limit: int = 100) -> dict[str, list[Any]]:
        def op(conn: sqlite3.Connection) -> dict[str, list[Any]]:
            heartbeats = [
                {"time": format_time(ts), "status": status, "metrics": _loads(metrics) or {}}
                for ts, status, metrics in conn.execute(
                    "SELECT ts, status, metrics FROM heartbeats WHERE agent_id = ? "
                    "ORDER BY ts DESC LIMIT ?",
                    (agent_id, limit),
                )
            ]
            sessions = [
                {
                    "session_id": sid,
                    "hub_id": hub,
                    "peer": peer,
                    "connected_at": format_time(start),
                    "ended_at": format_time(end) if end is not None else None,
                    "close_code": code,
                    "close_reason": reason,
                }
                for sid, hub, peer, start, end, code, reason in conn.execute(
                    "SELECT session_id, hub_id, peer, connected_at, ended_at, close_code, "
                    "close_reason FROM sessions WHERE agent_id = ? "
                    "ORDER BY connected_at DESC LIMIT ?",
                    (agent_id, limit),
                )
            ]
            return {"heartbeats": heartbeats, "sessions": sessions}

        return await self._read(op)

    def prune(self, before: float) -> None:
        self._submit(lambda conn: conn.execute("DELETE FROM heartbeats WHERE ts < ?", (before,)))

    # -- ledger ------------------------------------------------------------------------

    @staticmethod
    def _command_row(c: CommandRecord) -> tuple[Any, ...]:
        return (
            c.command_id, c.job_id, c.agent_id, c.name, _dumps(c.args), c.state, c.timeout,
            c.issued_at, c.expires_at, c.updated_at, c.sent_at, c.acked_at, c.dispatched_by,
            _dumps(c.result), c.output_bytes, int(c.truncated), c.seq,
        )  # fmt: skip

    @staticmethod
    def _job_row(j: JobRecord) -> tuple[Any, ...]:
        return (
            j.job_id, j.name, _dumps(j.args), _dumps(j.target), j.state, j.total,
            _dumps(j.counts), j.created_at, j.updated_at or j.created_at, j.dispatched_by,
            j.timeout, j.ttl, j.max_concurrency, j.max_errors, _dumps(j.spec),
        )  # fmt: skip

    _JOB_SQL = _upsert(
        "jobs",
        "job_id, name, args, target, state, total, counts, created_at, updated_at, "
        "dispatched_by, timeout, ttl, max_concurrency, max_errors, spec",
    )
    _COMMAND_SQL = (
        "INSERT OR REPLACE INTO commands (command_id, job_id, agent_id, name, args, state, "
        "timeout, issued_at, expires_at, updated_at, sent_at, acked_at, dispatched_by, result, "
        "output_bytes, truncated, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )

    async def add_job(
        self,
        job: JobRecord,
        commands: Sequence[CommandRecord],
        audit: Sequence[AuditEntry] = (),
    ) -> None:
        job_row = self._job_row(job)
        commands = list(commands)
        audit = list(audit)

        def op(conn: sqlite3.Connection) -> None:
            # Rows are built here, in the writer thread: the records are new and nobody
            # else holds them until this write completes, and a job to the whole fleet
            # would otherwise cost the event loop tens of milliseconds.
            conn.execute(self._JOB_SQL, job_row)
            conn.executemany(self._COMMAND_SQL, map(self._command_row, commands))
            conn.executemany(self._AUDIT_SQL, map(self._audit_row, audit))

        await self._write(op)

    def save_commands(
        self,
        commands: Sequence[CommandRecord],
        audit: Sequence[AuditEntry] = (),
        jobs: Sequence[JobRecord] = (),
    ) -> asyncio.Future[None]:
        # A command's fields and a job's counts change as the ledger goes on, so they are
        # taken now; a result and an audit entry never change once made (a new result is a
        # new dict), so they are serialized in the writer thread, off the event loop.
        rows = [
            (c.state, c.updated_at, c.sent_at, c.acked_at, c.result, c.output_bytes,
             int(c.truncated), c.command_id)
            for c in commands
        ]  # fmt: skip
        audit = list(audit)
        job_rows = [self._job_row(job) for job in jobs]

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE commands SET state = ?, updated_at = ?, sent_at = ?, acked_at = ?, "
                "result = ?, output_bytes = ?, truncated = ? WHERE command_id = ?",
                [(s, u, sent, acked, _dumps(r), o, t, i) for s, u, sent, acked, r, o, t, i in rows],
            )
            if audit:
                conn.executemany(self._AUDIT_SQL, map(self._audit_row, audit))
            if job_rows:
                conn.executemany(self._JOB_SQL, job_rows)

        return self._write(op)

    def add_output(self, command_id: str, seq: int, stream: str, data: str) -> None:
        self._submit(
            lambda conn: conn.execute(
                "INSERT OR IGNORE INTO outputs (command_id, seq, stream, data) VALUES (?, ?, ?, ?)",
                (command_id, seq, stream, data),
            )
        )

    _COMMAND_COLUMNS = (
        "command_id, job_id, agent_id, name, args, state, timeout, issued_at, expires_at, "
        "updated_at, sent_at, acked_at, dispatched_by, result, output_bytes, truncated, seq"
    )

    @staticmethod
    def _command_record(row: tuple[Any, ...]) -> CommandRecord:
        return CommandRecord(
            command_id=row[0],
            job_id=row[1],
            agent_id=row[2],
            name=row[3],
            args=_loads(row[4]) or {},
            state=row[5],
            timeout=row[6],
            issued_at=row[7],
            expires_at=row[8],
            updated_at=row[9] or row[7],
            sent_at=row[10],
            acked_at=row[11],
            dispatched_by=row[12],
            result=_loads(row[13]),
            output_bytes=row[14] or 0,
            truncated=bool(row[15]),
            seq=row[16],
        )

    _JOB_COLUMNS = (
        "job_id, name, args, target, state, total, counts, created_at, updated_at, "
        "dispatched_by, timeout, ttl, max_concurrency, max_errors, spec"
    )

    @staticmethod
    def _job_record(row: tuple[Any, ...]) -> JobRecord:
        return JobRecord(
            job_id=row[0],
            name=row[1],
            args=_loads(row[2]) or {},
            target=_loads(row[3]) or {},
            state=row[4],
            total=row[5],
            counts=_loads(row[6]) or {},
            created_at=row[7],
            updated_at=row[8] or row[7],
            dispatched_by=row[9],
            timeout=row[10],
            ttl=row[11],
            max_concurrency=row[12],
            max_errors=row[13],
            spec=_loads(row[14]) or {},
        )

    async def unfinished(self) -> tuple[list[JobRecord], list[CommandRecord], int]:
        def op(conn: sqlite3.Connection) -> tuple[list[JobRecord], list[CommandRecord], int]:
            jobs = [
                self._job_record(row)
                for row in conn.execute(
                    f"SELECT {self._JOB_COLUMNS} FROM jobs WHERE state = 'running'"
                )
            ]
            # A running job's row is written when it is accepted and when it finishes: its
            # counts are what its commands' stored states say.
            for job in jobs:
                job.counts = dict(
                    conn.execute(
                        "SELECT state, count(*) FROM commands WHERE job_id = ? GROUP BY state",
                        (job.job_id,),
                    ).fetchall()
                )
            commands = [
                self._command_record(row)
                for row in conn.execute(
                    f"SELECT {self._COMMAND_COLUMNS} FROM commands "
                    "WHERE state IN ('queued', 'sent', 'acked') ORDER BY seq"
                )
            ]
            top = conn.execute("SELECT coalesce(max(seq), 0) FROM commands").fetchone()[0]
            return jobs, commands, top

        return await self._read(op)

    async def command(self, command_id: str) -> dict[str, Any] | None:
        def op(conn: sqlite3.Connection) -> dict[str, Any] | None:
            row = conn.execute(
                f"SELECT {self._COMMAND_COLUMNS} FROM commands WHERE command_id = ?",
                (command_id,),
            ).fetchone()
            return self._command_record(row).view() if row else None

        return await self._read(op)

    @staticmethod
    def _where(
        filter: dict[str, Any], columns: dict[str, str], cursor_column: str, before: str | None
    ) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        for key, value in filter.items():
            column = columns.get(key)
            if column is None:
                raise ValueError(f"unknown filter key {key!r}")
            if isinstance(value, list):
                if not value or not all(isinstance(v, str | int) for v in value):
                    raise ValueError(f"filter {key!r} needs strings")
                clauses.append(f"{column} IN ({', '.join('?' * len(value))})")
                params.extend(value)
            elif isinstance(value, str | int) and not isinstance(value, bool):
                clauses.append(f"{column} = ?")
                params.append(value)
            else:
                raise ValueError(f"filter {key!r} needs a string or a list of strings")
        if before is not None:
            try:
                cursor = int(before)
            except ValueError:
                raise ValueError("invalid cursor") from None
            clauses.append(f"{cursor_column} < ?")
            params.append(cursor)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        return where, params

    _COMMAND_FILTERS = {
        k: k for k in ("command_id", "job_id", "agent_id", "name", "state", "dispatched_by")
    }

    async def commands(self, filter: dict[str, Any], limit: int, before: str | None) -> Page:
        where, params = self._where(filter, self._COMMAND_FILTERS, "rowid", before)

        def op(conn: sqlite3.Connection) -> Page:
            rows = conn.execute(
                f"SELECT rowid, {self._COMMAND_COLUMNS} FROM commands {where} "
                "ORDER BY rowid DESC LIMIT ?",
                [*params, limit + 1],
            ).fetchall()
            items = [self._command_record(row[1:]).view() for row in rows[:limit]]
            cursor = str(rows[limit - 1][0]) if len(rows) > limit else None
            return Page(items, cursor)

        return await self._read(op)

    async def command_output(self, command_id: str) -> list[dict[str, Any]]:
        def op(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            return [
                {"seq": seq, "stream": stream, "data": data}
                for seq, stream, data in conn.execute(
                    "SELECT seq, stream, data FROM outputs WHERE command_id = ? ORDER BY seq",
                    (command_id,),
                )
            ]

        return await self._read(op)

    async def job(self, job_id: str) -> dict[str, Any] | None:
        def op(conn: sqlite3.Connection) -> dict[str, Any] | None:
            row = conn.execute(
                f"SELECT {self._JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
            if row is None:
                return None
            commands = [
                self._command_record(r).view()
                for r in conn.execute(
                    f"SELECT {self._COMMAND_COLUMNS} FROM commands WHERE job_id = ? ORDER BY seq",
                    (job_id,),
                )
            ]
            return {"job": self._job_record(row).view(), "commands": commands}

        return await self._read(op)

    _JOB_FILTERS = {k: k for k in ("job_id", "name", "state", "dispatched_by")}

    async def jobs(self, filter: dict[str, Any], limit: int, before: str | None) -> Page:
        where, params = self._where(filter, self._JOB_FILTERS, "rowid", before)

        def op(conn: sqlite3.Connection) -> Page:
            rows = conn.execute(
                f"SELECT rowid, {self._JOB_COLUMNS} FROM jobs {where} ORDER BY rowid DESC LIMIT ?",
                [*params, limit + 1],
            ).fetchall()
            items = [self._job_record(row[1:]).view() for row in rows[:limit]]
            cursor = str(rows[limit - 1][0]) if len(rows) > limit else None
            return Page(items, cursor)

        return await self._read(op)

    # -- audit -------------------------------------------------------------------------

    _AUDIT_SQL = (
        "INSERT INTO audit (ts, hub_id, action, actor, subject, source, detail) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)"
    )

    @staticmethod
    def _audit_row(e: AuditEntry) -> tuple[Any, ...]:
        return (e.ts, e.hub_id, e.action, e.actor, e.subject, e.source, _dumps(e.detail))

    def audit(self, entries: Sequence[AuditEntry]) -> asyncio.Future[None]:
        entries = list(entries)  # rows made in the writer thread: entries never change
        return self._write(
            lambda conn: conn.executemany(self._AUDIT_SQL, map(self._audit_row, entries))
        )

    _AUDIT_FILTERS = {k: k for k in ("action", "actor", "subject", "source", "hub_id")}

    async def audit_entries(self, filter: dict[str, Any], limit: int, before: str | None) -> Page:
        where, params = self._where(filter, self._AUDIT_FILTERS, "id", before)

        def op(conn: sqlite3.Connection) -> Page:
            rows = conn.execute(
                "SELECT id, ts, hub_id, action, actor, subject, source, detail FROM audit "
                f"{where} ORDER BY id DESC LIMIT ?",
                [*params, limit + 1],
            ).fetchall()
            items = [
                {
                    "id": str(row[0]),
                    "time": format_time(row[1]),
                    "hub_id": row[2],
                    "action": row[3],
                    "actor": row[4],
                    "subject": row[5],
                    "source": row[6],
                    "detail": _loads(row[7]),
                }
                for row in rows[:limit]
            ]
            cursor = str(rows[limit - 1][0]) if len(rows) > limit else None
            return Page(items, cursor)

        return await self._read(op)

    # -- alerts ------------------------------------------------------------------------

    _ALERT_COLUMNS = (
        "alert_id, rule, severity, subject, state, first_seen, last_seen, message, "
        "acknowledged_by, acknowledged_at, comment, resolved_at"
    )

    @staticmethod
    def _alert_record(row: tuple[Any, ...]) -> AlertRecord:
        return AlertRecord(
            alert_id=row[0],
            rule=row[1],
            severity=row[2],
            subject=row[3],
            state=row[4],
            first_seen=row[5],
            last_seen=row[6],
            message=row[7],
            acknowledged_by=row[8],
            acknowledged_at=row[9],
            comment=row[10],
            resolved_at=row[11],
        )

    async def save_alert(self, alert: AlertRecord) -> None:
        row = (
            alert.alert_id, alert.rule, alert.severity, alert.subject, alert.state,
            alert.first_seen, alert.last_seen, alert.message, alert.acknowledged_by,
            alert.acknowledged_at, alert.comment, alert.resolved_at,
        )  # fmt: skip
        await self._write(lambda conn: conn.execute(_upsert("alerts", self._ALERT_COLUMNS), row))

    async def open_alerts(self) -> list[AlertRecord]:
        def op(conn: sqlite3.Connection) -> list[AlertRecord]:
            return [
                self._alert_record(row)
                for row in conn.execute(
                    f"SELECT {self._ALERT_COLUMNS} FROM alerts WHERE state != 'resolved'"
                )
            ]

        return await self._read(op)

    _ALERT_FILTERS = {k: k for k in ("alert_id", "rule", "severity", "subject", "state")}

    async def alerts(self, filter: dict[str, Any], limit: int, before: str | None) -> Page:
        where, params = self._where(filter, self._ALERT_FILTERS, "rowid", before)

        def op(conn: sqlite3.Connection) -> Page:
            rows = conn.execute(
                f"SELECT rowid, {self._ALERT_COLUMNS} FROM alerts {where} "
                "ORDER BY rowid DESC LIMIT ?",
                [*params, limit + 1],
            ).fetchall()
            items = [self._alert_record(row[1:]).view() for row in rows[:limit]]
            cursor = str(rows[limit - 1][0]) if len(rows) > limit else None
            return Page(items, cursor)

        return await self._read(op)
