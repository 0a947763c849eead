"""The embedded store: one SQLite file in WAL mode, ``DATA_DIR/tether.db``.

This module holds the queries: what each method of :class:`~hub.store.base.Store` reads and
writes. The tables and their migrations are in :mod:`hub.store.schema`; records become rows
and rows records, by column name, in :mod:`hub.store.rows`; the threads that run the
queries, and the group commit that makes many writes one transaction (and, with
``synchronous=full``, one fsync), are in :mod:`hub.store.writer`.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ..model import JWT_PREFIX, AgentRecord, AlertRecord, CommandRecord, CredentialRecord, JobRecord
from ..protocol.times import format_time
from .base import AuditEntry, Page, Store, StoreUnavailable
from .health import StoreHealth, write_error
from .retention import PRUNE_BATCH, PRUNE_PAUSE, Retention, prune_steps, vacuum_step
from .rows import (
    AGENTS,
    ALERT_LIST,
    ALERTS,
    AUDIT,
    AUDIT_LIST,
    COMMAND_LIST,
    COMMANDS,
    CREDENTIALS,
    JOB_LIST,
    JOBS,
    dumps,
    loads,
)
from .schema import SYNCHRONOUS, migrate
from .writer import Threads

__all__ = ["SQLiteStore"]


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
        #: Reader threads (and connections): reads running at once.
        self.readers = readers
        #: Whether writes reach the disk (the writer and the checkpoint report here).
        self.health = StoreHealth()
        self._threads = Threads(self.path, self.synchronous, readers, migrate, self.health)
        self._submit = self._threads.submit
        self._write = self._threads.write
        self._read = self._threads.read

    @property
    def commits(self) -> int:
        return self._threads.commits

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        await self._threads.open()

    async def close(self) -> None:
        await self._threads.close()

    async def ping(self) -> bool:
        if not self._threads.alive:
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
        the WAL, pages copied; (-1, -1) when the disk cannot take them).

        A checkpoint that fails for the disk's sake (the database file cannot grow) tells
        :attr:`health`, which logs it at its own pace, rather than raising every second."""
        health = self.health

        def op(conn: sqlite3.Connection) -> tuple[int, int]:
            try:
                row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error as exc:
                reason = write_error(exc)
                if reason is None:
                    raise
                health.failed("checkpoint", reason)
                return -1, -1
            health.recovered("checkpoint")
            return int(row["log"]), int(row["checkpointed"])

        return await self._read(op)

    # -- credentials -----------------------------------------------------------------

    _INSERT_CREDENTIAL = CREDENTIALS.insert()

    @staticmethod
    def _next_rev(conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT coalesce(max(rev), 0) + 1 AS rev FROM credentials").fetchone()
        return int(row["rev"])

    @classmethod
    def _insert_credential(cls, conn: sqlite3.Connection, cred: CredentialRecord) -> None:
        cred.rev = cls._next_rev(conn)
        conn.execute(cls._INSERT_CREDENTIAL, CREDENTIALS.row(cred))

    async def add_credential(self, credential: CredentialRecord) -> None:
        await self._write(lambda conn: self._insert_credential(conn, credential))

    async def credentials(self) -> list[CredentialRecord]:
        def op(conn: sqlite3.Connection) -> list[CredentialRecord]:
            rows = conn.execute(f"SELECT {CREDENTIALS.select} FROM credentials ORDER BY created_at")
            return [CREDENTIALS.record(row) for row in rows]

        return await self._read(op)

    async def credentials_since(self, rev: int) -> tuple[int, list[CredentialRecord]]:
        def op(conn: sqlite3.Connection) -> tuple[int, list[CredentialRecord]]:
            rows = conn.execute(
                f"SELECT {CREDENTIALS.select} FROM credentials WHERE rev > ? ORDER BY rev", (rev,)
            ).fetchall()
            records = [CREDENTIALS.record(row) for row in rows]
            newest = max((r.rev for r in records), default=rev)
            return newest, records

        return await self._read(op)

    async def revoke_credential(self, credential_id: str) -> CredentialRecord | None:
        def op(conn: sqlite3.Connection) -> CredentialRecord | None:
            row = conn.execute(
                f"SELECT {CREDENTIALS.select} FROM credentials WHERE id = ?", (credential_id,)
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
            record = CREDENTIALS.record(row)
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
            key = conn.execute(
                "SELECT uses_left, revoked, expires_at FROM credentials WHERE id = ?",
                (credential_id,),
            ).fetchone()
            if key is None or key["revoked"]:
                return False
            expires_at = key["expires_at"]
            if expires_at is not None and expires_at <= issued.created_at:
                return False
            known = conn.execute(
                "SELECT 1 FROM enrollments WHERE credential_id = ? AND agent_id = ?",
                (credential_id, agent_id),
            ).fetchone()
            if known is None:
                uses_left = key["uses_left"]
                if uses_left is not None:
                    if uses_left <= 0:
                        return False
                    conn.execute(
                        "UPDATE credentials SET uses_left = uses_left - 1, rev = ? WHERE id = ?",
                        (self._next_rev(conn), credential_id),
                    )
                conn.execute(
                    "INSERT INTO enrollments (credential_id, agent_id, enrolled_at) "
                    "VALUES (?, ?, ?)",
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

    async def purge_credentials(self, credential_ids: Sequence[str]) -> int:
        ids = list(credential_ids)

        def op(conn: sqlite3.Connection) -> int:
            deleted = 0
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                deleted += conn.execute(
                    f"DELETE FROM credentials WHERE revoked = 1 AND id IN ({marks})", chunk
                ).rowcount
            return deleted

        return await self._write(op)

    # -- agents and sessions -----------------------------------------------------------

    async def load_agents(self) -> list[AgentRecord]:
        def op(conn: sqlite3.Connection) -> list[AgentRecord]:
            return [
                AGENTS.record(row) for row in conn.execute(f"SELECT {AGENTS.select} FROM agents")
            ]

        return await self._read(op)

    _SAVE_AGENT = AGENTS.insert("REPLACE")

    def save_agent(self, agent: AgentRecord) -> None:
        row = AGENTS.row(agent)
        self._submit(lambda conn: conn.execute(self._SAVE_AGENT, row))

    def save_heartbeats(self, agents: Iterable[AgentRecord], samples: bool) -> None:
        agents = list(agents)
        if not agents:
            return

        def op(conn: sqlite3.Connection) -> None:
            # Built in the writer thread: heartbeat fields are replaced whole, never mutated,
            # so a row reads one consistent value of each, and the next batch has the latest.
            rows = [
                (a.last_seen, a.status, dumps(a.metrics), a.agent_id)
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
                {
                    "time": format_time(row["ts"]),
                    "status": row["status"],
                    "metrics": loads(row["metrics"]) or {},
                }
                for row in conn.execute(
                    "SELECT ts, status, metrics FROM heartbeats WHERE agent_id = ? "
                    "ORDER BY ts DESC LIMIT ?",
                    (agent_id, limit),
                )
            ]
            sessions = [
                {
                    "session_id": row["session_id"],
                    "hub_id": row["hub_id"],
                    "peer": row["peer"],
                    "connected_at": format_time(row["connected_at"]),
                    "ended_at": format_time(row["ended_at"])
                    if row["ended_at"] is not None
                    else None,
                    "close_code": row["close_code"],
                    "close_reason": row["close_reason"],
                }
                for row in conn.execute(
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

    async def prune_expired(
        self,
        retention: Retention,
        now: float,
        export: Path | None = None,
        batch: int = PRUNE_BATCH,
    ) -> dict[str, int]:
        """Each kind in steps of at most ``batch`` rows, one writer operation each (live
        writes share the commits in between), then the file shrinks by incremental vacuum."""
        pruned: dict[str, int] = {}
        for kind, step in prune_steps(retention, now, batch, export):
            total = 0
            while True:
                deleted = await self._paced(step)
                total += deleted
                if deleted < batch:
                    break
            pruned[kind] = total
        while await self._paced(vacuum_step):
            pass
        return pruned

    async def _paced(self, step: Callable[[sqlite3.Connection], int]) -> int:
        """One step, then a pause as long as it took (:data:`PRUNE_PAUSE`)."""
        began = time.monotonic()
        result = await self._write(step)
        await asyncio.sleep(min(1.0, (time.monotonic() - began) * PRUNE_PAUSE))
        return result

    # -- ledger ------------------------------------------------------------------------

    _SAVE_JOB = JOBS.upsert()
    _ADD_COMMAND = COMMANDS.insert("REPLACE")
    _ADD_AUDIT = AUDIT.insert()

    async def add_job(
        self,
        job: JobRecord,
        commands: Sequence[CommandRecord],
        audit: Sequence[AuditEntry] = (),
    ) -> None:
        job_row = JOBS.row(job)
        commands = list(commands)
        audit = list(audit)

        def op(conn: sqlite3.Connection) -> None:
            # Rows are built here, in the writer thread: the records are new and nobody
            # else holds them until this write completes, and a job to the whole fleet
            # would otherwise cost the event loop tens of milliseconds.
            conn.execute(self._SAVE_JOB, job_row)
            conn.executemany(self._ADD_COMMAND, map(COMMANDS.row, commands))
            conn.executemany(self._ADD_AUDIT, map(AUDIT.row, audit))

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
        job_rows = [JOBS.row(job) for job in jobs]

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE commands SET state = ?, updated_at = ?, sent_at = ?, acked_at = ?, "
                "result = ?, output_bytes = ?, truncated = ? WHERE command_id = ?",
                [(s, u, sent, acked, dumps(r), o, t, i) for s, u, sent, acked, r, o, t, i in rows],
            )
            if audit:
                conn.executemany(self._ADD_AUDIT, map(AUDIT.row, audit))
            if job_rows:
                conn.executemany(self._SAVE_JOB, job_rows)

        return self._write(op)

    def add_output(self, command_id: str, seq: int, stream: str, data: str) -> None:
        self._submit(
            lambda conn: conn.execute(
                "INSERT OR IGNORE INTO outputs (command_id, seq, stream, data) VALUES (?, ?, ?, ?)",
                (command_id, seq, stream, data),
            )
        )

    async def unfinished(self) -> tuple[list[JobRecord], list[CommandRecord], int]:
        def op(conn: sqlite3.Connection) -> tuple[list[JobRecord], list[CommandRecord], int]:
            jobs = [
                JOBS.record(row)
                for row in conn.execute(f"SELECT {JOBS.select} FROM jobs WHERE state = 'running'")
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
                COMMANDS.record(row)
                for row in conn.execute(
                    f"SELECT {COMMANDS.select} FROM commands "
                    "WHERE state IN ('queued', 'sent', 'acked') ORDER BY seq"
                )
            ]
            top = conn.execute("SELECT coalesce(max(seq), 0) AS top FROM commands").fetchone()
            return jobs, commands, top["top"]

        return await self._read(op)

    async def command(self, command_id: str) -> dict[str, Any] | None:
        def op(conn: sqlite3.Connection) -> dict[str, Any] | None:
            row = conn.execute(
                f"SELECT {COMMANDS.select} FROM commands WHERE command_id = ?", (command_id,)
            ).fetchone()
            return COMMANDS.record(row).view() if row else None

        return await self._read(op)

    async def commands(self, filter: dict[str, Any], limit: int, before: str | None) -> Page:
        return await self._read(COMMAND_LIST.query(filter, limit, before))

    async def command_output(self, command_id: str) -> list[dict[str, Any]]:
        def op(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            return [
                {"seq": row["seq"], "stream": row["stream"], "data": row["data"]}
                for row in conn.execute(
                    "SELECT seq, stream, data FROM outputs WHERE command_id = ? ORDER BY seq",
                    (command_id,),
                )
            ]

        return await self._read(op)

    async def job(self, job_id: str) -> dict[str, Any] | None:
        def op(conn: sqlite3.Connection) -> dict[str, Any] | None:
            row = conn.execute(
                f"SELECT {JOBS.select} FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
            if row is None:
                return None
            commands = [
                COMMANDS.record(r).view()
                for r in conn.execute(
                    f"SELECT {COMMANDS.select} FROM commands WHERE job_id = ? ORDER BY seq",
                    (job_id,),
                )
            ]
            return {"job": JOBS.record(row).view(), "commands": commands}

        return await self._read(op)

    async def jobs(self, filter: dict[str, Any], limit: int, before: str | None) -> Page:
        return await self._read(JOB_LIST.query(filter, limit, before))

    # -- audit -------------------------------------------------------------------------

    def audit(self, entries: Sequence[AuditEntry]) -> asyncio.Future[None]:
        entries = list(entries)  # rows made in the writer thread: entries never change
        return self._write(lambda conn: conn.executemany(self._ADD_AUDIT, map(AUDIT.row, entries)))

    async def audit_entries(self, filter: dict[str, Any], limit: int, before: str | None) -> Page:
        return await self._read(AUDIT_LIST.query(filter, limit, before))

    # -- alerts ------------------------------------------------------------------------

    _SAVE_ALERT = ALERTS.upsert()

    async def save_alert(self, alert: AlertRecord) -> None:
        row = ALERTS.row(alert)
        await self._write(lambda conn: conn.execute(self._SAVE_ALERT, row))

    async def open_alerts(self) -> list[AlertRecord]:
        def op(conn: sqlite3.Connection) -> list[AlertRecord]:
            return [
                ALERTS.record(row)
                for row in conn.execute(
                    f"SELECT {ALERTS.select} FROM alerts WHERE state != 'resolved'"
                )
            ]

        return await self._read(op)

    async def alerts(self, filter: dict[str, Any], limit: int, before: str | None) -> Page:
        return await self._read(ALERT_LIST.query(filter, limit, before))
