"""Structured, safe log lines.

Anything that came from the network may end up in a log message; control characters are
escaped so that no peer can forge log lines or terminal escape sequences. ``--log-json``
writes one JSON object per line for log shippers.
"""

from __future__ import annotations

import logging
import sys
import time

import orjson

__all__ = ["configure_logging", "escape"]

_CONTROL = {c: f"\\x{c:02x}" for c in range(32) if c not in (9,)}
_CONTROL[0x7F] = "\\x7f"
_CONTROL.update({c: f"\\u{c:04x}" for c in range(0x80, 0xA0)})
_CONTROL.update({0x2028: "\\u2028", 0x2029: "\\u2029"})
#: Bidi controls cannot split a line but can make it *display* in another order (an agent id
#: that reads as something else, "Trojan Source"): the marks, embeddings, overrides, isolates.
_BIDI = (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
_CONTROL.update({c: f"\\u{c:04x}" for c in _BIDI})


def escape(text: str) -> str:
    """Make a string safe for a single log line."""
    return text.translate(_CONTROL)


class _SafeFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        created = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{created}.{int(record.msecs):03d}Z {record.levelname:<7} {record.name}: "
        line += escape(record.getMessage())
        if record.exc_info:
            # Every traceback line is indented, so none can pass for a log line of its own.
            trace = self.formatException(record.exc_info).splitlines()
            line += "".join(f"\n    | {escape(part)}" for part in trace)
        return line


#: What orjson leaves raw inside JSON strings (RFC 8259 allows it) but that can still end a
#: line for a reader or act on a terminal: DEL, the C1 controls (NEL, CSI...), U+2028/9, and
#: the bidi controls.
#: Outside strings orjson writes only ASCII, so these \u escapes are always valid JSON.
_JSON_UNSAFE = {c: f"\\u{c:04x}" for c in (0x7F, *range(0x80, 0xA0), 0x2028, 0x2029, *_BIDI)}


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        # orjson escapes the C0 controls; the rest of what could break a line is escaped here,
        # so each record stays on one line for every reader.
        return orjson.dumps(payload, default=str).decode().translate(_JSON_UNSAFE)


def configure_logging(level: str = "INFO", json: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if json else _SafeFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("websockets").setLevel(logging.WARNING)
