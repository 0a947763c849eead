"""The command journal: execute at most once, across reconnects and agent restarts.

The hub delivers commands at least once (PROTOCOL §4.3), so the agent must remember which
ids it has started and what came of them. An id is written durably *before* the command
starts and its result when it ends; a repeated ``command`` then gets the stored result, and
an id that was started but has no result at startup (the agent crashed while running it)
becomes ``failed`` with error ``interrupted``.

Two implementations share one interface: :class:`SqliteJournal` (stdlib ``sqlite3``, WAL,
``synchronous=FULL``, all disk work on one worker thread so the event loop never waits on an
fsync) for real agents, and :class:`MemoryJournal` for simulated ones. Both keep the set of
known ids in memory so the executor can decide synchronously, on receipt, what a command is.
Retention is bounded (10,000 ids or 7 days by default); ids still running are never pruned.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

import orjson

from hub.protocol.times import now_rfc3339 as utc_now

__all__ = ["INTERRUPTED", "Journal", "MemoryJournal", "SqliteJournal", "utc_now"]

INTERRUPTED = "interrupted"
MAX_ENTRIES = 10_000
MAX_AGE = 7 * 86_400.0
#: Prune after this many finished commands (and at startup).
PRUNE_EVERY = 500

T = TypeVar("T")


class Journal(Protocol):
    """What the executor needs; results are the ``result`` message's fields as a dict."""

    def known(self, command_id: str) -> bool:
        """True once :meth:`begin` or :meth:`finish` was called for the id (and not pruned)."""
        ...

    async def begin(self, command_id: str, name: str, started_at: str) -> None:
        """Record durably that the command starts now; returns once it is on disk."""
        ...

    async def finish(self, command_id: str, result: dict[str, Any]) -> None:
        """Store the command's result (also for ids that never began, e.g. cancelled)."""
        ...

    async def result(self, command_id: str) -> dict[str, Any] | None:
        """The stored result, or None when unknown or still running."""
        ...

    async def close(self) -> None: ...


class MemoryJournal:
    """The journal of a simulated agent: a bounded dict, created on first use. Results are
    kept as JSON text, a fraction of the size of the nested dicts, since they are rarely read
    again (text, not orjson's bytes, which keep a 4 KB allocation however short they are)."""

    __slots__ = ("_entries", "max_entries")

    def __init__(self, max_entries: int = 1_000) -> None:
        self.max_entries = max_entries
        self._entries: dict[str, str | None] | None = None

    def known(self, command_id: str) -> bool:
        return self._entries is not None and command_id in self._entries

    async def begin(self, command_id: str, name: str, started_at: str) -> None:
        self._put(command_id, None)

    async def finish(self, command_id: str, result: dict[str, Any]) -> None:
        self._put(command_id, orjson.dumps(result).decode())

    async def result(self, command_id: str) -> dict[str, Any] | None:
        raw = self._entries.get(command_id) if self._entries is not None else None
        return orjson.loads(raw) if raw is not None else None

    async def close(self) -> None:
        self._entries = None

    def _put(self, command_id: str, value: str | None) -> None:
        entries = self._entries
        if entries is None:
            entries = self._entries = {}
        entries[command_id] = value
        if len(entries) > self.max_entries:
            # Drop the oldest finished entry; running ones are few and must stay.
            for key, stored in entries.items():
                if stored is not None:
                    del entries[key]
                    break


class SqliteJournal:
    """The durable journal of a real agent, in ``<state dir>/journal.sqlite3``.

    Open it with :meth:`open`; every statement runs on one worker thread that owns the
    SQLite connection, in the order the calls were made.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_entries: int = MAX_ENTRIES,
        max_age: float = MAX_AGE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.max_entries = max_entries
        self.max_age = max_age
        self._clock = clock
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tether-journal")
        self._db: sqlite3.Connection | None = None
        self._known: set[str] = set()
        self._since_prune = 0
        #: Ids found started-but-unfinished at open, now stored as failed/interrupted.
        self.interrupted: list[str] = []

    @classmethod
    async def open(cls, path: Path, **kwargs: Any) -> SqliteJournal:
        journal = cls(path, **kwargs)
        try:
            journal._known, journal.interrupted = await journal._run(journal._open)
        except BaseException:
            journal._worker.shutdown(wait=False)
            raise
        return journal

    def known(self, command_id: str) -> bool:
        return command_id in self._known

    async def begin(self, command_id: str, name: str, started_at: str) -> None:
        self._known.add(command_id)
        await self._run(self._begin, command_id, name, started_at)

    async def finish(self, command_id: str, result: dict[str, Any]) -> None:
        self._known.add(command_id)
        await self._run(self._finish, command_id, orjson.dumps(result))
        self._since_prune += 1
        if self._since_prune >= PRUNE_EVERY:
            self._since_prune = 0
            self._known.difference_update(await self._run(self._prune))

    async def result(self, command_id: str) -> dict[str, Any] | None:
        if command_id not in self._known:
            return None
        raw = await self._run(self._result, command_id)
        return orjson.loads(raw) if raw is not None else None

    async def close(self) -> None:
        if self._db is not None:
            await self._run(self._close)
        self._worker.shutdown(wait=True)

    # -- on the worker thread ----------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def _open(self) -> tuple[set[str], list[str]]:
        db = sqlite3.connect(self.path, isolation_level=None)
        self._db = db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS commands ("
            " command_id TEXT PRIMARY KEY,"
            " name TEXT NOT NULL,"
            " received REAL NOT NULL,"
            " started_at TEXT,"
            " result BLOB)"
        )
        rows = db.execute(
            "UPDATE commands SET result = json_object("
            " 'status', 'failed', 'exit_code', NULL, 'data', NULL, 'error', ?,"
            " 'started_at', started_at, 'finished_at', ?)"
            " WHERE result IS NULL RETURNING command_id",
            (INTERRUPTED, utc_now(self._clock)),
        ).fetchall()
        interrupted = [row[0] for row in rows]
        self._prune()
        known = {row[0] for row in db.execute("SELECT command_id FROM commands")}
        return known, interrupted

    def _begin(self, command_id: str, name: str, started_at: str) -> None:
        assert self._db is not None
        self._db.execute(
            "INSERT INTO commands (command_id, name, received, started_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (command_id) DO NOTHING",
            (command_id, name, self._clock(), started_at),
        )

    def _finish(self, command_id: str, result: bytes) -> None:
        assert self._db is not None
        self._db.execute(
            "INSERT INTO commands (command_id, name, received, result) VALUES (?, '', ?, ?)"
            " ON CONFLICT (command_id) DO UPDATE SET result = excluded.result",
            (command_id, self._clock(), result),
        )

    def _result(self, command_id: str) -> bytes | None:
        assert self._db is not None
        row = self._db.execute(
            "SELECT result FROM commands WHERE command_id = ?", (command_id,)
        ).fetchone()
        return row[0] if row is not None else None

    def _prune(self) -> list[str]:
        """Forget finished commands beyond the age or count bound; returns their ids."""
        assert self._db is not None
        cutoff = self._clock() - self.max_age
        rows = self._db.execute(
            "DELETE FROM commands WHERE result IS NOT NULL AND (received < ? OR rowid <="
            " (SELECT rowid FROM commands ORDER BY rowid DESC LIMIT 1 OFFSET ?))"
            " RETURNING command_id",
            (cutoff, self.max_entries),
        ).fetchall()
        return [row[0] for row in rows]

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
