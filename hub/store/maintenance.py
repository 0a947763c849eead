"""What an operator does to a store file from the command line: read its figures, back it up
while the hub runs, restore a backup into a data directory.

Each works on its own connection to ``DATA_DIR/tether.db``; WAL lets it read while a hub
writes. A backup goes through SQLite's online backup API in one step: one read transaction,
so the copy is the database as of one commit (never half a job), and a hub writing meanwhile
neither waits nor makes the copy start over.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path
from typing import Any

from ..protocol.times import format_time
from .schema import SCHEMA_VERSION

__all__ = ["DB_NAME", "RestoreError", "backup", "restore", "stats"]

DB_NAME = "tether.db"

#: Each kind's table and the column that says how old a row is (None: no time of its own).
KINDS: dict[str, tuple[str, str | None]] = {
    "agents": ("agents", "first_seen"),
    "sessions": ("sessions", "connected_at"),
    "heartbeats": ("heartbeats", "ts"),
    "jobs": ("jobs", "created_at"),
    "commands": ("commands", "issued_at"),
    "outputs": ("outputs", None),
    "audit": ("audit", "ts"),
    "alerts": ("alerts", "first_seen"),
    "credentials": ("credentials", "created_at"),
    "enrollments": ("enrollments", "enrolled_at"),
}


class RestoreError(Exception):
    """The backup cannot be restored (damaged, from a newer Tether, or a store is there)."""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_only(path: Path) -> sqlite3.Connection:
    if not path.exists():
        raise FileNotFoundError(f"no store at {path}")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def stats(data_dir: Path) -> dict[str, Any]:
    """Sizes and row counts per kind, each kind's oldest entry, free pages."""
    path = Path(data_dir) / DB_NAME
    conn = _read_only(path)
    try:
        conn.execute("BEGIN")  # one snapshot for every figure
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        owner = dict(conn.execute("SELECT name, tbl_name FROM sqlite_master").fetchall())
        sizes: dict[str, int] = {}
        for name, size in conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name"):
            table = owner.get(name, name)
            sizes[table] = sizes.get(table, 0) + int(size)
        kinds: dict[str, Any] = {}
        for kind, (table, column) in KINDS.items():
            rows = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            oldest = None
            if column is not None:
                value = conn.execute(f"SELECT min({column}) FROM {table}").fetchone()[0]
                oldest = format_time(value) if value is not None else None
            kinds[kind] = {"rows": rows, "bytes": sizes.get(table, 0), "oldest": oldest}
        result = {
            "path": str(path),
            "schema": conn.execute("PRAGMA user_version").fetchone()[0],
            "file_bytes": _size(path),
            "wal_bytes": _size(path.with_name(DB_NAME + "-wal")),
            "page_size": page_size,
            "pages": conn.execute("PRAGMA page_count").fetchone()[0],
            "free_pages": conn.execute("PRAGMA freelist_count").fetchone()[0],
            "auto_vacuum": {0: "none", 1: "full", 2: "incremental"}.get(
                conn.execute("PRAGMA auto_vacuum").fetchone()[0], "?"
            ),
            "kinds": kinds,
        }
        conn.execute("COMMIT")
        return result
    finally:
        conn.close()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy(source: sqlite3.Connection, out: Path) -> None:
    """``source`` into ``out``, through a temporary file renamed once complete and synced:
    ``out`` is never half written."""
    temporary = out.with_name(out.name + ".partial")
    temporary.unlink(missing_ok=True)
    try:
        target = sqlite3.connect(temporary)
        try:
            source.backup(target)  # pages=-1: one step, one read transaction
            target.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        finally:
            target.close()
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, out)
        _fsync_dir(out.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def backup(data_dir: Path, out: Path) -> dict[str, Any]:
    """A consistent copy of the store, taken while the hub may be running."""
    source = _read_only(Path(data_dir) / DB_NAME)
    try:
        _copy(source, Path(out))
    finally:
        source.close()
    return {"backup": str(out), "bytes": _size(Path(out))}


def _check(path: Path) -> int:
    conn = _read_only(path)
    try:
        problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise RestoreError(f"{path} is damaged: {'; '.join(problems[:5])}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RestoreError(
                f"{path} was written by a newer Tether (schema {version} > {SCHEMA_VERSION})"
            )
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        if not {"jobs", "commands", "credentials"} <= tables:
            raise RestoreError(f"{path} is not a Tether store")
        return version
    except sqlite3.DatabaseError as exc:
        raise RestoreError(f"{path} is not a readable store: {exc}") from None
    finally:
        conn.close()


def restore(backup_file: Path, data_dir: Path, force: bool = False) -> dict[str, Any]:
    """Put a backup in place as ``DATA_DIR/tether.db``, with no hub running on it.

    A store already there is kept unless ``force``; then it is moved aside as
    ``tether.db.replaced`` (with its WAL), never deleted."""
    backup_file = Path(backup_file)
    version = _check(backup_file)
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / DB_NAME
    if path.exists():
        if not force:
            raise RestoreError(f"a store is already in {data_dir} (stop its hub; --force)")
        for suffix in ("", "-wal", "-shm"):
            old = path.with_name(DB_NAME + suffix)
            if old.exists():
                os.replace(old, path.with_name(DB_NAME + ".replaced" + suffix))
    source = _read_only(backup_file)
    try:
        _copy(source, path)
    finally:
        source.close()
    return {"restored": str(path), "from": str(backup_file), "schema": version}
