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


def format_time(ts: float) -> str:
    """``2026-11-28T06:00:00.123Z`` for a float epoch timestamp."""
    whole = int(ts)
    millis = int((ts - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def now_rfc3339() -> str:
    return format_time(time.time())


def parse_time(text: str) -> float:
    """Parse an RFC 3339 timestamp (any offset) into epoch seconds; ValueError if invalid."""
    value = datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError("timestamp without a UTC offset")
    return value.astimezone(UTC).timestamp()
