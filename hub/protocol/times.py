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


def format_time(ts: float) -> str:
    """``2026-11-28T06:00:00.123Z`` for a float epoch timestamp.

    Timestamps come in runs of a few seconds (a job's commands, a batch of events), so the
    formatted seconds are reused: strftime is most of the cost.
    """
    whole = int(ts)
    prefix = _prefixes.get(whole)
    if prefix is None:
        if len(_prefixes) >= _PREFIXES_KEPT:
            _prefixes.clear()
        prefix = _prefixes[whole] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{prefix}.{int((ts - whole) * 1000):03d}Z"


def now_rfc3339() -> str:
    return format_time(time.time())


def parse_time(text: str) -> float:
    """Parse an RFC 3339 timestamp (any offset) into epoch seconds; ValueError if invalid."""
    value = datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError("timestamp without a UTC offset")
    return value.astimezone(UTC).timestamp()
