"""The command journal on a real SQLite file: durability, restarts, retention."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.journal import INTERRUPTED, MemoryJournal, SqliteJournal, utc_now

RESULT = {
    "status": "succeeded",
    "exit_code": 0,
    "data": {"pong": True},
    "error": None,
    "started_at": "2026-11-28T06:00:00.000Z",
    "finished_at": "2026-11-28T06:00:01.000Z",
}


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_begin_finish_and_lookup(tmp_path: Path) -> None:
    journal = await SqliteJournal.open(tmp_path / "j.sqlite3")
    try:
        assert not journal.known("c1")
        await journal.begin("c1", "ping", utc_now())
        assert journal.known("c1")
        assert await journal.result("c1") is None  # running: no result yet
        await journal.finish("c1", RESULT)
        assert await journal.result("c1") == RESULT
        assert await journal.result("nope") is None
    finally:
        await journal.close()


async def test_file_is_wal_with_full_sync(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    journal = await SqliteJournal.open(path)
    await journal.begin("c1", "ping", utc_now())
    await journal.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT command_id FROM commands").fetchall() == [("c1",)]


async def test_restart_keeps_results_and_marks_unfinished_interrupted(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    first = await SqliteJournal.open(path)
    await first.begin("done", "ping", "2026-11-28T06:00:00.000Z")
    await first.finish("done", RESULT)
    await first.begin("crashed", "exec", "2026-11-28T06:00:02.000Z")
    await first.close()  # the "crash": the process goes away with "crashed" running

    second = await SqliteJournal.open(path)
    try:
        assert second.interrupted == ["crashed"]
        assert second.known("done") and second.known("crashed")
        assert await second.result("done") == RESULT
        interrupted = await second.result("crashed")
        assert interrupted is not None
        assert interrupted["status"] == "failed"
        assert interrupted["error"] == INTERRUPTED
        assert interrupted["exit_code"] is None
        assert interrupted["started_at"] == "2026-11-28T06:00:02.000Z"
        assert interrupted["finished_at"].endswith("Z")
    finally:
        await second.close()

    third = await SqliteJournal.open(path)
    assert third.interrupted == []  # marked once, stored for good
    await third.close()


async def test_finish_without_begin_is_stored(tmp_path: Path) -> None:
    journal = await SqliteJournal.open(tmp_path / "j.sqlite3")
    cancelled = dict(RESULT, status="cancelled", started_at=None)
    await journal.finish("never-started", cancelled)
    assert journal.known("never-started")
    assert await journal.result("never-started") == cancelled
    await journal.close()


async def test_retention_by_count_keeps_the_newest(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    journal = await SqliteJournal.open(path, max_entries=5)
    for i in range(12):
        await journal.begin(f"c{i}", "ping", utc_now())
        await journal.finish(f"c{i}", RESULT)
    await journal.begin("running", "exec", utc_now())
    await journal.close()
    reopened = await SqliteJournal.open(path, max_entries=5)
    try:
        # Five entries remain: the newest four finished ones and the one that was running
        # (marked interrupted at reopen, then counted like any other).
        kept = {f"c{i}" for i in range(12) if reopened.known(f"c{i}")}
        assert kept == {"c8", "c9", "c10", "c11"}
        assert reopened.known("running")
    finally:
        await reopened.close()


async def test_retention_by_age(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "j.sqlite3"
    journal = await SqliteJournal.open(path, clock=clock)
    await journal.finish("old", RESULT)
    clock.now += 8 * 86_400
    await journal.finish("new", RESULT)
    await journal.close()
    reopened = await SqliteJournal.open(path, clock=clock)
    assert not reopened.known("old")
    assert reopened.known("new")
    await reopened.close()


async def test_memory_journal_same_interface_and_bounded() -> None:
    journal = MemoryJournal(max_entries=3)
    assert not journal.known("a")
    await journal.begin("a", "ping", utc_now())
    assert journal.known("a") and await journal.result("a") is None
    for name in ("a", "b", "c", "d"):
        await journal.finish(name, RESULT)
    assert not journal.known("a")
    assert all(journal.known(name) for name in ("b", "c", "d"))
    assert await journal.result("d") == RESULT


def test_utc_now_is_rfc3339_utc() -> None:
    assert utc_now(lambda: 1_800_000_000.25) == "2027-01-15T08:00:00.250Z"


@pytest.mark.parametrize("count", [0, 3])
async def test_reopen_loads_known_ids(tmp_path: Path, count: int) -> None:
    path = tmp_path / "j.sqlite3"
    journal = await SqliteJournal.open(path)
    for i in range(count):
        await journal.finish(f"k{i}", RESULT)
    await journal.close()
    reopened = await SqliteJournal.open(path)
    assert all(reopened.known(f"k{i}") for i in range(count))
    await reopened.close()
