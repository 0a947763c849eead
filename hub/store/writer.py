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
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .base import StoreUnavailable
from .health import StoreHealth, write_error
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
#: While writes fail, the writer tries again this often even when nothing new is queued,
#: so that the store recovers by itself when space returns (seconds).
PROBE_INTERVAL = 1.0
#: Batched writes (heartbeats, registrations, sessions, outputs) kept while the disk cannot
#: take them, to be written when it can; past this the oldest are shed, counted and logged.
MAX_RETAINED = 100_000


def _probe(conn: sqlite3.Connection) -> None:
    """A write that reaches the disk: nothing else to write, the writer still has to know."""
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('probe', ?)", (str(time.time()),)
    )


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
    """Takes every queued write at once and commits them as one group.

    When a commit fails because the disk cannot take it (full, I/O error, read-only), the
    group's waiters get :class:`StoreUnavailable`, its batched writes are kept (bounded) and
    go first into the next group, and :class:`StoreHealth` hears of it; the writer then tries
    again every :data:`PROBE_INTERVAL` until a commit succeeds.
    """

    def __init__(
        self, *args: Any, migrate: Callable[[sqlite3.Connection], None], health: StoreHealth
    ) -> None:
        super().__init__(*args)
        self.migrate = migrate
        self.health = health
        self.commits = 0
        self.retained: deque[Op] = deque()

    def prepare(self, conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA wal_autocheckpoint={WRITER_AUTOCHECKPOINT_PAGES}")
        conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        self.migrate(conn)

    def loop_on(self, conn: sqlite3.Connection) -> None:
        stopping = False
        while not stopping:
            waiting = self.retained or self.health.failing("write")
            try:
                item = self.queue.get(timeout=PROBE_INTERVAL if waiting else None)
            except queue.Empty:
                self.resolve(self._commit(conn, []))  # a probe, with what is retained
                continue
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
        if self.retained:
            self._commit(conn, [])
            if self.retained:
                log.error(
                    "closing with %d batched writes the disk did not take: they are lost",
                    len(self.retained),
                )

    def _commit(self, conn: sqlite3.Connection, batch: list[Item]) -> list[Outcome]:
        retained = len(self.retained)
        if retained:
            batch = [*((op, None) for op in self.retained), *batch]
            self.retained.clear()
        if not batch:
            batch = [(_probe, None)]
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                outcomes = self._run_together(conn, batch)
            except Exception as exc:
                if len(batch) == 1 or write_error(exc) is not None:
                    raise
                # One operation failed: do the group again, each in a savepoint, so that
                # it alone fails. Operations are pure functions of the connection and
                # their own data, so running them again after the rollback is safe.
                conn.execute("ROLLBACK")
                conn.execute("BEGIN IMMEDIATE")
                outcomes = self._run_isolated(conn, batch)
            conn.execute("COMMIT")
            self.commits += 1
        except Exception as exc:
            self._rollback(conn)
            return self._failed(batch, exc)
        if retained:
            log.warning(
                "stored %d batched writes kept while the disk could not take them", retained
            )
        self.health.retained = 0
        self.health.recovered("write")
        return outcomes

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error as exc:  # SQLite may have rolled back by itself already
                log.debug("rollback after a failed commit: %s", exc)

    def _failed(self, batch: list[Item], exc: Exception) -> list[Outcome]:
        reason = write_error(exc)
        if reason is None:
            if len(batch) == 1:
                # A group of one failed on its own account (a constraint, a bug): the error
                # is its caller's.
                log.warning("store operation failed: %s", exc, exc_info=True)
                return [(batch[0][1], None, exc)]
            log.error("store commit failed: %s", exc)
            failure = StoreUnavailable(f"commit failed: {exc}")
            return [(future, None, failure) for _, future in batch]
        kept = [op for op, future in batch if future is None and op is not _probe]
        self.retained.extend(kept)
        shed = len(self.retained) - MAX_RETAINED
        if shed > 0:
            for _ in range(shed):
                self.retained.popleft()
            self.health.shed += shed
            log.error(
                "the store cannot write: shed the %d oldest batched writes kept (%d kept, %d "
                "shed in all)",
                shed,
                len(self.retained),
                self.health.shed,
            )
        self.health.retained = len(self.retained)
        self.health.failed("write", reason)
        failure = StoreUnavailable(f"the store cannot write: {reason}")
        return [(future, None, failure) for _, future in batch if future is not None]

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
                if write_error(exc) is not None:
                    raise  # the disk, not this operation: the whole group fails
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                log.warning("store operation failed: %s", exc, exc_info=True)
                outcomes.append((future, None, exc))
        return outcomes


class Threads:
    """The writer and the readers of one store file, and the futures between them and the
    event loop."""

    def __init__(
        self,
        path: Path,
        synchronous: str,
        readers: int,
        migrate: Callable[[sqlite3.Connection], None],
        health: StoreHealth | None = None,
    ) -> None:
        self.path = path
        self.synchronous = synchronous
        self.migrate = migrate
        self.health = health or StoreHealth()
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
            health=self.health,
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
        StoreUnavailable either way.

        While the disk cannot take writes the future fails at once: what a caller waits for
        is refused (``unavailable``: nothing accepted) rather than held for a commit that
        would fail; the writer probes by itself meanwhile."""
        writer = self._writer
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        reason = self.health.reason
        if writer is None:
            future.set_exception(StoreUnavailable("the store is closed"))
        elif reason:
            future.set_exception(StoreUnavailable(f"the store cannot write: {reason}"))
        else:
            writer.queue.put((op, future))
        return future

    def read(self, op: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        if self._read_queue is None or self._loop is None:
            raise StoreUnavailable("the store is closed")
        future: asyncio.Future[T] = self._loop.create_future()
        self._read_queue.put((op, future))
        return future
