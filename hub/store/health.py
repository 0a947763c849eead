"""Whether the store can write, as its last commit, probe and checkpoint found out.

Why: a full disk (or EIO, or a read-only remount) makes every commit fail while reads still
answer, so a ping says nothing. The writer thread and the checkpoint report each outcome
here; the event loop reads :attr:`StoreHealth.reason` to answer ``/readyz``, to refuse what
it would have to store (``unavailable``) and to raise the ``store_unavailable`` alert. The
condition is logged when it starts, then at a slow pace, and when it ends: a full disk must
not fill the log too, one line a second.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

__all__ = ["StoreHealth", "write_error"]

#: SQLite primary result codes that mean "the disk cannot take writes": SQLITE_READONLY,
#: SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN (extended codes keep these in the low byte).
_SQLITE_WRITE_ERRORS = {8: "read-only", 10: "I/O error", 13: "disk full", 14: "cannot open"}
_OS_WRITE_ERRORS = {errno.ENOSPC, errno.EIO, errno.EROFS, errno.EDQUOT}
#: While writes fail, the condition is logged again this often (seconds).
LOG_EVERY = 60.0


def write_error(exc: BaseException) -> str | None:
    """A short reason when ``exc`` says the disk cannot take writes, else None (a bug, a
    constraint, a busy database: not a condition of the disk)."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and code & 0xFF in _SQLITE_WRITE_ERRORS:
            return f"{_SQLITE_WRITE_ERRORS[code & 0xFF]} ({exc})"
        return None
    if isinstance(exc, OSError) and exc.errno in _OS_WRITE_ERRORS:
        return f"{exc.strerror or exc}"
    return None


class StoreHealth:
    """Which sources (``write``, ``checkpoint``) currently fail, and why; thread-safe.

    The store is healthy when no source fails. A source recovers when it next succeeds: the
    writer probes by itself while it fails, the checkpoint runs every second anyway.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._failing: dict[str, str] = {}
        self._last_log = 0.0
        #: When the current condition started (monotonic), None while healthy.
        self.since: float | None = None
        #: Failed attempts in the current condition, and over the process's life.
        self.failures = 0
        self.total_failures = 0
        #: Batched writes the writer keeps for when writing works again, and those it shed
        #: past its bound (each shed is logged).
        self.retained = 0
        self.shed = 0

    @property
    def reason(self) -> str:
        """Empty while the store can write; else why not (for ``/readyz`` and errors)."""
        failing = self._failing
        if not failing:
            return ""
        return "; ".join(sorted(set(failing.values())))

    def failing(self, source: str) -> bool:
        return source in self._failing

    def failed(self, source: str, reason: str) -> None:
        """``source`` could not write, for ``reason`` (from :func:`write_error`)."""
        now = self._clock()
        with self._lock:
            began = not self._failing
            self._failing[source] = reason
            self.failures += 1
            self.total_failures += 1
            if began:
                self.since = now
            due = began or now - self._last_log >= LOG_EVERY
            if due:
                self._last_log = now
        if began:
            log.critical(
                "the store cannot write (%s): %s; refusing what would have to be stored, "
                "keeping accepted transitions in memory until writing works again",
                source,
                reason,
            )
        elif due:
            assert self.since is not None
            log.error(
                "the store still cannot write after %.0f s (%s): %d failed attempts, "
                "%d batched writes kept, %d shed",
                now - self.since,
                self.reason,
                self.failures,
                self.retained,
                self.shed,
            )

    def recovered(self, source: str) -> None:
        """``source`` wrote successfully."""
        if source not in self._failing:
            return
        with self._lock:
            if self._failing.pop(source, None) is None:
                return
            ended = not self._failing
            since, failures = self.since, self.failures
            if ended:
                self.since = None
                self.failures = 0
        if ended:
            log.warning(
                "the store can write again after %.0f s (%d failed attempts)",
                self._clock() - (since or self._clock()),
                failures,
            )
