"""The store's threads: one writer that commits queued writes in groups, and readers.

Why threads: SQLite calls block, and nothing may block the event loop. Every write is a
small function of a connection, queued to the writer thread, which takes all queued
functions at once, runs them in one transaction (if one fails, the group runs again with each
in a savepoint, so that one failure does not undo the others) and commits: one fsync for the
whole group when ``synchronous`` is ``full``, none when it is ``normal``. The futures of a
group are resolved on the event loop, a slice per turn. Readers use their own connections in
their own threads and share one queue; WAL lets them read while the writer writes.

Nothing here knows a table: :mod:`hub.store.sqlite` hands in operations, :mod:`hub.store.schema`
the migration that runs on the writer's connection before anything else.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .base import StoreUnavailable
from .schema import connect

log = logging.getLogger(__name__)

__all__ = ["Op", "Threads"]

T = TypeVar("T")
#: One unit of work: a function of the thread's connection.
Op = Callable[[sqlite3.Connection], Any]
#: A queued operation and the future waiting for it (None: fire and forget).
Item = tuple[Op, "asyncio.Future[Any] | None"]
#: What became of one queued operation: the future to settle, its result, its error.
Outcome = tuple["asyncio.Future[Any] | None", Any, BaseException | None]

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


def _run(op: Op, conn: sqlite3.Connection) -> Any:
    """Run one operation in this thread. A cursor it returns dies here: freed in another
    thread, it would reset a cached statement under the thread's feet (SQLITE_MISUSE)."""
    result = op(conn)
    if type(result) is sqlite3.Cursor:
        result.close()
        return None
    return result


def _settle(loop: asyncio.AbstractEventLoop, outcomes: list[Outcome]) -> None:
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


class _Thread(threading.Thread):
    """A thread with its own connection that runs queued operations until it gets None."""

    def __init__(
        self,
        path: Path,
        loop: asyncio.AbstractEventLoop,
        name: str,
        synchronous: str,
        work: queue.SimpleQueue[Item | None],
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.path = path
        self.synchronous = synchronous
        self.loop = loop
        self.queue = work
        self.ready = threading.Event()
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            conn = connect(self.path, self.synchronous)
            self.prepare(conn)
        except BaseException as exc:
            self.failure = exc
            self.ready.set()
            return
        self.ready.set()
        try:
            self.loop_on(conn)
        finally:
            conn.close()

    def prepare(self, conn: sqlite3.Connection) -> None:
        """Set the connection up before the first operation."""

    def loop_on(self, conn: sqlite3.Connection) -> None:
        raise NotImplementedError

    def resolve(self, outcomes: list[Outcome]) -> None:
        waiting = [outcome for outcome in outcomes if outcome[0] is not None]
        if not waiting:
            return
        try:
            self.loop.call_soon_threadsafe(_settle, self.loop, waiting)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more


class _Reader(_Thread):
    """Runs each read on its own; several readers share one queue."""

    def loop_on(self, conn: sqlite3.Connection) -> None:
        while (item := self.queue.get()) is not None:
            op, future = item
            try:
                result, error = _run(op, conn), None
            except Exception as exc:
                result, error = None, exc
            self.resolve([(future, result, error)])
        self.queue.put(None)  # wake the other readers sharing this queue


class _Writer(_Thread):
    """Takes every queued write at once and commits them as one group."""

    def __init__(self, *args: Any, migrate: Callable[[sqlite3.Connection], None]) -> None:
        super().__init__(*args)
        self.migrate = migrate
        self.commits = 0

    def prepare(self, conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA wal_autocheckpoint={WRITER_AUTOCHECKPOINT_PAGES}")
        conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        self.migrate(conn)

    def loop_on(self, conn: sqlite3.Connection) -> None:
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
            self.resolve(self._commit(conn, batch))

    def _commit(self, conn: sqlite3.Connection, batch: list[Item]) -> list[Outcome]:
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
    def _run_together(conn: sqlite3.Connection, batch: list[Item]) -> list[Outcome]:
        """The usual case: every operation succeeds, no savepoint each (two statements
        fewer per operation; a registration makes two of them)."""
        return [(future, _run(op, conn), None) for op, future in batch]

    @staticmethod
    def _run_isolated(conn: sqlite3.Connection, batch: list[Item]) -> list[Outcome]:
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


class Threads:
    """The writer and the readers of one store file, and the futures between them and the
    event loop."""

    def __init__(
        self,
        path: Path,
        synchronous: str,
        readers: int,
        migrate: Callable[[sqlite3.Connection], None],
    ) -> None:
        self.path = path
        self.synchronous = synchronous
        self.migrate = migrate
        self._readers_count = readers
        self._writer: _Writer | None = None
        self._readers: list[_Reader] = []
        self._read_queue: queue.SimpleQueue[Item | None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._commits_before = 0  # by writers already closed

    @property
    def commits(self) -> int:
        writer = self._writer
        return self._commits_before + (writer.commits if writer is not None else 0)

    @property
    def alive(self) -> bool:
        return self._writer is not None and self._writer.is_alive()

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        writer = _Writer(
            self.path,
            loop,
            "tether-store-writer",
            self.synchronous,
            queue.SimpleQueue(),
            migrate=self.migrate,
        )
        writer.start()
        await asyncio.to_thread(writer.ready.wait)
        if writer.failure is not None:
            raise StoreUnavailable(f"cannot open {self.path}: {writer.failure}")
        self._writer = writer
        shared: queue.SimpleQueue[Item | None] = queue.SimpleQueue()
        for index in range(self._readers_count):
            # Readers write nothing but the checkpoints, which sync the database file
            # under either setting.
            reader = _Reader(self.path, loop, f"tether-store-reader-{index}", "full", shared)
            reader.start()
            self._readers.append(reader)
        self._read_queue = shared
        await asyncio.to_thread(lambda: [r.ready.wait() for r in self._readers])

    async def close(self) -> None:
        """Commit what is queued, then end every thread."""
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

    def submit(self, op: Op) -> None:
        """Fire and forget: ``op`` reaches the disk with the next group commit."""
        writer = self._writer
        if writer is None:
            raise StoreUnavailable("the store is closed")
        writer.queue.put((op, None))

    def write(self, op: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
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

    def read(self, op: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        if self._read_queue is None or self._loop is None:
            raise StoreUnavailable("the store is closed")
        future: asyncio.Future[T] = self._loop.create_future()
        self._read_queue.put((op, future))
        return future
