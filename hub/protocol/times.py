"""RFC 3339 UTC timestamps, the only time format on the wire (PROTOCOL §3).

Inside each program times are float seconds since the epoch; they become strings only at
the edge, with millisecond precision and a ``Z`` suffix.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from datetime import UTC, datetime

__all__ = ["format_instant", "format_time", "now", "now_rfc3339", "parse_time"]


def now() -> float:
    return time.time()


@functools.lru_cache(maxsize=16)
def _second(whole: int) -> str:
    # A few recent seconds: a command's view formats its creation second and the current
    # one in turn, so a single remembered second missed every other call.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))


def format_instant(ts: float) -> str:
    """``2026-11-28T06:00:00.123Z`` for a float epoch timestamp."""
    whole = int(ts)
    return f"{_second(whole)}.{int((ts - whole) * 1000):03d}Z"


@functools.lru_cache(maxsize=8192)
def format_time(ts: float) -> str:
    """:func:`format_instant`, remembered: one command's timestamps are formatted again for
    its view, its row and its audit entry at every transition, and a job's ten thousand
    commands share their ``issued_at`` and ``expires_at``."""
    return format_instant(ts)


def now_rfc3339(clock: Callable[[], float] = time.time) -> str:
    """Now, not remembered: every call is another instant."""
    return format_instant(clock())


def parse_time(text: str) -> float:
    """Parse an RFC 3339 timestamp (any offset) into epoch seconds; ValueError if invalid."""
    value = datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError("timestamp without a UTC offset")
    return value.astimezone(UTC).timestamp()
