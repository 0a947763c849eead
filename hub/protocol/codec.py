"""Strict JSON for everything that crosses the wire.

Two failures are told apart because the protocol answers them differently (PROTOCOL §3):

* :class:`NotJSON` — the text is not JSON as RFC 8259 defines it (bad UTF-8, ``NaN``,
  bare words, trailing garbage). The connection is closed with 1007.
* :class:`LimitExceeded` — well-formed JSON that breaks a limit: nesting deeper than 32,
  a number beyond ±2**53 or overflowing a double, duplicate keys, a lone surrogate escape,
  a string longer than 64 KiB. The peer gets an ``invalid_message`` error and stays up.

The fast path is one ``orjson.loads`` plus one walk of the result. orjson already refuses
NaN, infinities and lone surrogates, so anything it refuses goes to a slower, exact path
that classifies the failure. The walk counts object members; duplicate keys are detected
by comparing that count with the number of member separators (``:`` outside strings) in
the text, which is exact for any document orjson accepted.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

import orjson

MAX_DEPTH = 32
MAX_INT = 2**53
MAX_STRING_BYTES = 64 * 1024

__all__ = [
    "MAX_DEPTH",
    "MAX_INT",
    "MAX_STRING_BYTES",
    "LimitExceeded",
    "NotJSON",
    "decode",
    "encode",
]


class NotJSON(ValueError):
    """The bytes are not a JSON text."""


class LimitExceeded(ValueError):
    """Well-formed JSON that breaks one of the protocol's limits."""


# A JSON string literal, for texts already known to be well formed (or nearly so).
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NON_BRACKETS = re.compile(rb"[^\[\]{}]+")
_DEPTH_DELTA = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def encode(obj: Any) -> bytes:
    """Serialize compactly. (orjson writes NaN and infinities as null; validated input has none.)

    orjson hands back its whole 4 KB working buffer even for a 50-byte result; a message
    that waits in a queue (an admin subscriber's, say) would cost 4 KB. Small results are
    copied into an object of their own size.
    """
    data = orjson.dumps(obj)
    return bytes(memoryview(data)) if len(data) < _ORJSON_BUFFER else data


_ORJSON_BUFFER = 4096


def decode(data: bytes | str) -> Any:
    """Parse one message, or raise :class:`NotJSON` or :class:`LimitExceeded`."""
    if isinstance(data, str):
        try:
            data = data.encode("utf-8")
        except UnicodeEncodeError:
            raise NotJSON("text is not valid UTF-8") from None
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        return _decode_exactly(data, str(exc))
    walker = _Walker()
    try:
        walker.walk(value, 1)
    except _NeedsExactPath:
        return _decode_exactly(data, "large number")
    # Every ':' outside a string separates a member. Colons counted in the parsed strings
    # are at least those inside the raw strings (an escape may add one, a dropped duplicate
    # may hide one), so more separators than members is always a duplicate. Only a text
    # with \u escapes needs the exact count, made by stripping its strings.
    colons = data.count(b":")
    members = walker.members
    if (
        members
        and colons > members
        and (
            colons - walker.colons > members
            or (b"\\u" in data and _STRING.sub(b"", data).count(b":") > members)
        )
    ):
        raise LimitExceeded("duplicate key in an object")
    return value


class _NeedsExactPath(Exception):
    """orjson turned an integer beyond 64 bits into a float: re-read the text exactly."""


class _Walker:
    """Checks limits on a parsed value and counts object members (for duplicates).

    This runs on every message the hub receives, so the checks are inlined: one type test
    per value, string lengths tested cheaply before being measured exactly.
    """

    __slots__ = ("colons", "members")

    def __init__(self) -> None:
        self.members = 0
        self.colons = 0

    def walk(self, value: Any, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise LimitExceeded(f"nesting deeper than {MAX_DEPTH}")
        kind = type(value)
        if kind is dict:
            self.members += len(value)
            for key, item in value.items():
                if len(key) > _SHORT:
                    _check_string(key)
                if ":" in key:
                    self.colons += key.count(":")
                self._item(item, depth)
        elif kind is list:
            for item in value:
                self._item(item, depth)
        else:
            self._item(value, depth - 1)

    def _item(self, item: Any, depth: int) -> None:
        kind = type(item)
        if kind is str:
            if len(item) > _SHORT:
                _check_string(item)
            if ":" in item:
                self.colons += item.count(":")
        elif kind is float:
            if not -MAX_INT < item < MAX_INT:
                # Either a legitimate large double or an integer orjson could not hold.
                raise _NeedsExactPath
        elif kind is int:
            if not -MAX_INT <= item <= MAX_INT:
                raise LimitExceeded("integer beyond ±2**53")
        elif kind is dict or kind is list:
            self.walk(item, depth + 1)


#: Strings up to this many characters cannot exceed 64 KiB of UTF-8 (4 bytes a character).
_SHORT = MAX_STRING_BYTES // 4


def _check_string(value: str) -> None:
    n = len(value)
    if n > _SHORT and (
        n > MAX_STRING_BYTES or len(value.encode("utf-8", "surrogatepass")) > MAX_STRING_BYTES
    ):
        raise LimitExceeded("string longer than 64 KiB")


def _max_depth(data: bytes) -> tuple[int, bool]:
    """Deepest bracket nesting outside strings, and whether the brackets balance."""
    brackets = _NON_BRACKETS.sub(b"", _STRING.sub(b"", data))
    if not brackets:
        return 0, True
    running = list(accumulate(_DEPTH_DELTA[b] for b in brackets))
    return max(running), running[-1] == 0 and min(running) >= 0


def _decode_exactly(data: bytes, reason: str) -> Any:
    """Classify a text orjson refused (or could not hold exactly) with the standard parser."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise NotJSON("text is not valid UTF-8") from None
    depth, balanced = _max_depth(data)
    if depth > MAX_DEPTH:
        # Nesting is judged before syntax so that a deep document never recurses.
        if balanced:
            raise LimitExceeded(f"nesting deeper than {MAX_DEPTH}")
        raise NotJSON("unbalanced brackets")
    try:
        value = json.loads(
            text,
            object_pairs_hook=_pairs_no_duplicates,
            parse_constant=_refuse_constant,
            parse_int=_parse_int,
            parse_float=_parse_float,
        )
    except LimitExceeded:
        raise
    except (ValueError, RecursionError) as exc:
        raise NotJSON(str(exc) or reason) from None
    _check_surrogates(value, 1)
    return value


def _pairs_no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise LimitExceeded("duplicate key in an object")
    for key in result:
        _check_string(key)
    return result


def _refuse_constant(name: str) -> Any:
    # NaN, Infinity and -Infinity are not JSON (RFC 8259 §6).
    raise NotJSON(f"{name} is not JSON")


def _parse_int(text: str) -> int:
    if len(text) > 20:
        raise LimitExceeded("integer beyond ±2**53")
    value = int(text)
    if not -MAX_INT <= value <= MAX_INT:
        raise LimitExceeded("integer beyond ±2**53")
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise LimitExceeded("number overflows a double")
    return value


def _check_surrogates(value: Any, depth: int) -> None:
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise LimitExceeded("lone surrogate in a string") from None
        _check_string(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_surrogates(key, depth)
            _check_surrogates(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_surrogates(item, depth + 1)
