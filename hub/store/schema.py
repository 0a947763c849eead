"""The store's schema: its tables, the migrations that make them, and how a connection is set up.

A store file records its schema version in ``PRAGMA user_version``. Opening it runs the
migrations it lacks, one transaction each; a file from a newer Tether is refused rather than
half understood.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sqlite_utils

log = logging.getLogger(__name__)

__all__ = ["SCHEMA_VERSION", "SYNCHRONOUS", "connect", "migrate"]

SCHEMA_VERSION = 2
#: ``full`` fsyncs every commit (survives power loss); ``normal`` lets the OS write the WAL
#: back (survives a crash or kill -9 of the hub, not of the machine).
SYNCHRONOUS = {"full": "FULL", "normal": "NORMAL"}


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


def _migrate_2(db: sqlite_utils.Database) -> None:
    """Retention (:mod:`hub.store.retention`) finds finished jobs by when they ended."""
    db["jobs"].create_index(["updated_at"], if_not_exists=True)


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_migrate_1, _migrate_2]


def _incremental_vacuum(conn: sqlite3.Connection) -> None:
    """Let pruning shrink the file: ``auto_vacuum=INCREMENTAL`` takes effect through a
    ``VACUUM`` (the WAL header makes even a new file not new enough to set it alone). On a
    file made before it (schema 1) that rewrites the file once, which needs about the file's
    size free on the disk for a moment; when that fails (a disk too full) the file works as
    before, only reusing freed pages, and the next start tries again."""
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
        return
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    try:
        conn.execute("VACUUM")
    except sqlite3.Error as exc:
        log.warning("could not rewrite the store for incremental vacuum: %s", exc)


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_migrate_1, _migrate_2]


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to :data:`SCHEMA_VERSION`, one migration per transaction."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise RuntimeError(
            f"the store was written by a newer Tether (schema {version} > {SCHEMA_VERSION})"
        )
    _incremental_vacuum(conn)
    if version == SCHEMA_VERSION:
        return
    # Only a store to create or upgrade needs sqlite-utils: importing it (and numpy, which
    # it takes along) is a fifth of a hub's start, and a restart should serve soonest.
    import sqlite_utils

    # sqlite-utils reads rows as tuples: the connection's named rows wait until it is done.
    factory, conn.row_factory = conn.row_factory, None
    try:
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
    finally:
        conn.row_factory = factory


def connect(path: Path, synchronous: str = "full") -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL journal, rows
    readable by column name."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={SYNCHRONOUS[synchronous.lower()]}")
    conn.execute("PRAGMA busy_timeout=10000")
    conn.execute("PRAGMA temp_store=MEMORY")
    conn.row_factory = sqlite3.Row
    return conn
