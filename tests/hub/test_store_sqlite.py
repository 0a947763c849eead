"""What the embedded SQLite store does on its own: the file's schema version and WAL, group
commits and their savepoints, checkpoints off the write path, rows read by column name.

The behaviour every store shares is in ``test_store_conformance.py``.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from hub.model import CredentialRecord
from hub.store.base import AuditEntry, StoreUnavailable
from hub.store.schema import SCHEMA_VERSION
from hub.store.sqlite import SQLiteStore


async def test_schema_version_and_wal(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)
    await store.open()
    await store.close()
    conn = sqlite3.connect(tmp_path / "tether.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


async def test_a_store_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "tether.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreUnavailable, match="newer"):
        await SQLiteStore(tmp_path).open()


async def test_one_failing_write_does_not_undo_its_group(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)
    await store.open()
    record = CredentialRecord(id="abc", kind="agent", secret_hash=b"x" * 32, created_at=1.0)
    duplicate = CredentialRecord(id="abc", kind="agent", secret_hash=b"y" * 32, created_at=2.0)
    results = await asyncio.gather(
        store.audit([AuditEntry(ts=1.0, action="one")]),
        store.add_credential(record),
        store.add_credential(duplicate),  # primary key conflict, same group
        store.audit([AuditEntry(ts=2.0, action="two")]),
        return_exceptions=True,
    )
    assert isinstance(results[2], sqlite3.IntegrityError)
    assert [r for i, r in enumerate(results) if i != 2] == [None, None, None]
    page = await store.audit_entries({}, 10, None)
    assert [e["action"] for e in page.items] == ["two", "one"]
    assert [c.secret_hash for c in await store.credentials()] == [b"x" * 32]
    await store.close()


async def test_checkpoints_happen_off_the_write_path(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)
    await store.open()
    # 2,000 pages of commits: past SQLite's default of 1,000, the writer would have copied
    # them into the database inside some commit; it leaves that to checkpoint().
    blob = "x" * 3000
    for round_ in range(20):
        await store.audit([AuditEntry(ts=time.time(), action=f"r{round_}-{n}", detail={"pad": blob})
                           for n in range(120)])  # fmt: skip
    log_pages, copied = await store.checkpoint()
    assert log_pages > 1000, "the writer did not checkpoint by itself"
    assert copied == log_pages, "a passive checkpoint with nobody in the way copies all"
    page = await store.audit_entries({}, 10, None)
    assert len(page.items) == 10
    await store.close()
    # What the checkpoint copied is in the database file itself, WAL or not.
    conn = sqlite3.connect(tmp_path / "tether.db")
    assert conn.execute("SELECT count(*) FROM audit").fetchone()[0] == 20 * 120
    conn.close()


async def test_writes_queued_together_share_one_commit(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)
    await store.open()
    before = store.commits
    await asyncio.gather(*(store.audit([AuditEntry(ts=1.0, action=f"a{n}")]) for n in range(300)))
    # Queued in one turn of the event loop: the writer takes them in a group or a few.
    assert 1 <= store.commits - before < 30
    await store.close()


async def test_every_column_is_mapped_by_name(tmp_path: Path) -> None:
    """Each record type names exactly its table's columns: a migration that adds a column
    must map it (or it would never be written or read), and no mapping names a column the
    schema lacks."""
    from hub.store import rows

    store = SQLiteStore(tmp_path)
    await store.open()
    await store.close()
    conn = sqlite3.connect(tmp_path / "tether.db")
    own_keys = {"audit": {"id"}}  # given by SQLite: the listing's cursor
    for table in (rows.CREDENTIALS, rows.AGENTS, rows.COMMANDS, rows.JOBS, rows.ALERTS, rows.AUDIT):
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table.name})")}
        assert columns - own_keys.get(table.name, set()) == set(table.columns), table.name
        assert len(table.columns) == len(set(table.columns))
    conn.close()
