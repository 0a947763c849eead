"""Retention: how long each kind of row is kept, and the small deletions that enforce it.

Why small: pruning a day of a large fleet deletes hundreds of thousands of rows. Each step
here deletes at most ``batch`` rows and is one operation of the writer thread (never the
event loop), so the group commits of live traffic go on between steps. Unfinished commands
and running jobs are never pruned: a job's commands (and their outputs) go only once the job
has finished and its retention has passed.

After pruning, ``PRAGMA incremental_vacuum`` hands the freed pages back to the file system
in steps of :data:`VACUUM_PAGES`, so that the file shrinks instead of only reusing pages
(the schema sets ``auto_vacuum=INCREMENTAL``; see :mod:`hub.store.schema`).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DAY",
    "PRUNE_BATCH",
    "PRUNE_PAUSE",
    "VACUUM_PAGES",
    "Retention",
    "append_synced",
    "prune_steps",
    "vacuum_step",
]

DAY = 86_400.0
#: Rows one step deletes (one writer operation; ~10-20 ms of the writer thread).
PRUNE_BATCH = 1_000
#: After each step, pruning waits this many times as long as the step took: it takes at
#: most half of the writer's time, so that live commits, and the event loop (which shares
#: the machine's cores and the interpreter's lock with the writer thread), are not starved.
PRUNE_PAUSE = 1.0
#: Pages one vacuum step hands back (4 MiB at the default page size).
VACUUM_PAGES = 1_000


@dataclass(frozen=True, slots=True)
class Retention:
    """How long each kind is kept, in seconds; 0 keeps it forever."""

    #: Output chunks of commands of finished jobs, from the job's end.
    outputs: float = 7 * DAY
    #: Finished jobs and their commands, from the job's end.
    commands: float = 30 * DAY
    #: Ended agent sessions, from their end.
    sessions: float = 30 * DAY
    #: Resolved alerts, from their resolution.
    alerts: float = 90 * DAY
    #: Audit entries (exported first when an export file is set).
    audit: float = 365 * DAY
    #: Heartbeat samples.
    heartbeats: float = 1 * DAY


#: A step: deletes up to ``batch`` rows of one kind and returns how many it deleted.
Step = Callable[[sqlite3.Connection], int]

_FINISHED_JOB = "state != 'running'"


def _outputs(cutoff: float, batch: int) -> Step:
    """Outputs of commands of jobs that finished before ``cutoff``. A watermark in ``meta``
    remembers up to when this is done, so that jobs already bare are not walked again."""

    def mark(conn: sqlite3.Connection, to: float) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('outputs_pruned_to', ?)", (repr(to),)
        )

    def step(conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT value FROM meta WHERE key = 'outputs_pruned_to'").fetchone()
        since = float(row[0]) if row is not None else 0.0
        deleted = 0
        jobs = conn.execute(
            f"SELECT job_id, updated_at FROM jobs WHERE {_FINISHED_JOB} "
            "AND updated_at >= ? AND updated_at < ? ORDER BY updated_at",
            (since, cutoff),
        ).fetchall()
        for job_id, updated_at in jobs:
            deleted += conn.execute(
                "DELETE FROM outputs WHERE rowid IN (SELECT o.rowid FROM commands c "
                "JOIN outputs o ON o.command_id = c.command_id WHERE c.job_id = ? LIMIT ?)",
                (job_id, batch - deleted),
            ).rowcount
            if deleted >= batch:
                mark(conn, updated_at)  # this job may have more: the next step starts here
                return deleted
        mark(conn, max(since, cutoff))
        return deleted

    return step


def _jobs(cutoff: float, batch: int) -> Step:
    """Jobs that finished before ``cutoff``: their outputs, commands, then the job row."""

    def step(conn: sqlite3.Connection) -> int:
        deleted = 0
        while deleted < batch:
            job = conn.execute(
                f"SELECT job_id FROM jobs WHERE {_FINISHED_JOB} AND updated_at < ? "
                "ORDER BY updated_at LIMIT 1",
                (cutoff,),
            ).fetchone()
            if job is None:
                break
            job_id = job[0]
            room = batch - deleted
            ids = [
                r[0]
                for r in conn.execute(
                    "SELECT command_id FROM commands WHERE job_id = ? LIMIT ?", (job_id, room)
                )
            ]
            if ids:
                marks = ",".join("?" * len(ids))
                deleted += conn.execute(
                    f"DELETE FROM outputs WHERE command_id IN ({marks})", ids
                ).rowcount
                deleted += conn.execute(
                    f"DELETE FROM commands WHERE command_id IN ({marks})", ids
                ).rowcount
            if len(ids) < room:
                conn.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))
                deleted += 1
        return deleted

    return step


def _rows(table: str, where: str, cutoff: float, batch: int) -> Step:
    def step(conn: sqlite3.Connection) -> int:
        return conn.execute(
            f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} WHERE {where} LIMIT ?)",
            (cutoff, batch),
        ).rowcount

    return step


def append_synced(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` and sync it: an audit entry is deleted only once it is on
    disk elsewhere. A failed export (a full disk) raises, and nothing is deleted."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


#: An audit row as one JSON line, made by SQLite (in C, off the interpreter's lock that the
#: event loop needs): the fields of the ``audit`` listing, ``time`` as RFC 3339 in UTC.
_AUDIT_LINE = (
    "json_object('id', id, 'time', strftime('%Y-%m-%dT%H:%M:%fZ', ts, 'unixepoch'), "
    "'hub_id', hub_id, 'action', action, 'actor', actor, 'subject', subject, "
    "'source', source, 'detail', json(detail))"
)


def _audit(cutoff: float, batch: int, export: Path | None) -> Step:
    """The oldest audit entries (by id, the order they were written) older than ``cutoff``;
    appended to ``export`` as JSON lines, and synced, before they are deleted."""
    line = _AUDIT_LINE if export is not None else "NULL"

    def step(conn: sqlite3.Connection) -> int:
        rows = conn.execute(
            f"SELECT id, ts, {line} FROM audit ORDER BY id LIMIT ?", (batch,)
        ).fetchall()
        old = []
        for row in rows:
            if row[1] >= cutoff:
                break
            old.append(row)
        if not old:
            return 0
        if export is not None:
            append_synced(export, "".join(row[2] + "\n" for row in old).encode())
        return conn.execute("DELETE FROM audit WHERE id <= ?", (old[-1][0],)).rowcount

    return step


def prune_steps(
    retention: Retention, now: float, batch: int = PRUNE_BATCH, export: Path | None = None
) -> list[tuple[str, Step]]:
    """The steps of one pruning, by kind: each is run until it deletes less than ``batch``."""
    steps: list[tuple[str, Step]] = []
    if retention.outputs:
        steps.append(("outputs", _outputs(now - retention.outputs, batch)))
    if retention.commands:
        steps.append(("jobs", _jobs(now - retention.commands, batch)))
    if retention.sessions:
        where = "ended_at IS NOT NULL AND ended_at < ?"
        steps.append(("sessions", _rows("sessions", where, now - retention.sessions, batch)))
    if retention.alerts:
        where = "state = 'resolved' AND resolved_at < ?"
        steps.append(("alerts", _rows("alerts", where, now - retention.alerts, batch)))
    if retention.audit:
        steps.append(("audit", _audit(now - retention.audit, batch, export)))
    if retention.heartbeats:
        steps.append(
            ("heartbeats", _rows("heartbeats", "ts < ?", now - retention.heartbeats, batch))
        )
    return steps


def vacuum_step(conn: sqlite3.Connection) -> int:
    """Hand up to :data:`VACUUM_PAGES` free pages back; the free pages left."""
    conn.execute(f"PRAGMA incremental_vacuum({VACUUM_PAGES})").fetchall()
    return int(conn.execute("PRAGMA freelist_count").fetchone()[0])
