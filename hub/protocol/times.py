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


#: Formatted seconds, most recent few: a command's view formats its creation second and
#: the current one in turn, so a single remembered second missed every other call.
_prefixes: dict[int, str] = {}
_PREFIXES_KEPT = 16
#: Formatted timestamps, most recent thousands: one command's timestamps are formatted again
#: for its view, its row and its audit entry at every transition, and a job's ten thousand
#: commands share their ``issued_at`` and ``expires_at``. Cleared whole when full.
_formatted: dict[float, str] = {}
_FORMATTED_KEPT = 8192


def format_time(ts: float) -> str:
    """``2026-11-28T06:00:00.123Z`` for a float epoch timestamp."""
    text = _formatted.get(ts)
    if text is not None:
        return text
    whole = int(ts)
    prefix = _prefixes.get(whole)
    if prefix is None:
        if len(_prefixes) >= _PREFIXES_KEPT:
            _prefixes.clear()
        prefix = _prefixes[whole] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    if len(_formatted) >= _FORMATTED_KEPT:
        _formatted.clear()
    text = _formatted[ts] = f"{prefix}.{int((ts - whole) * 1000):03d}Z"
    return text


def now_rfc3339() -> str:
    return format_time(time.time())


def parse_time(text: str) -> float:
    """Parse an RFC 3339 timestamp (any offset) into epoch seconds; ValueError if invalid."""
    value = datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError("timestamp without a UTC offset")
    return value.astimezone(UTC).timestamp()
