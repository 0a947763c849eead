"""RFC 3339 UTC timestamps, the only time format on the wire (PROTOCOL §3).

Inside each program times are float seconds since the epoch; they become strings only at
the edge, with millisecond precision and a ``Z`` suffix.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

__all__ = ["format_time", "now", "now_rfc3339", "parse_time"]


def now() -> float:
    return time.time()


_last_second = -1
_last_prefix = ""


def format_time(ts: float) -> str:
    """``2026-11-28T06:00:00.123Z`` for a float epoch timestamp.

    Timestamps come in runs of the same second (a job's commands, a batch of events), so
    the formatted second is reused: strftime is most of the cost.
    """
    global _last_second, _last_prefix
    whole = int(ts)
    if whole != _last_second:
        _last_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _last_second = whole
    return f"{_last_prefix}.{int((ts - whole) * 1000):03d}Z"


def now_rfc3339() -> str:
    return format_time(time.time())


def parse_time(text: str) -> float:
    """Parse an RFC 3339 timestamp (any offset) into epoch seconds; ValueError if invalid."""
    value = datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError("timestamp without a UTC offset")
    return value.astimezone(UTC).timestamp()
