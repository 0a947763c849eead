"""Strict JSON: what is not JSON (1007) and what breaks a limit (invalid_message)."""

from __future__ import annotations

import json

import pytest

from hub.protocol.codec import LimitExceeded, NotJSON, decode, encode


@pytest.mark.parametrize(
    "text",
    [
        b"\xff", b'{"a": "\xc3"}', b"NaN", b"Infinity", b"-Infinity", b'{"a": NaN}', b"nul",
        b'{"a": 1} x', b"[1,]", b"{'a': 1}", b"", b"   ", b"\xef\xbb\xbf{}", b'"\\x"',
        b"[" * 50,
    ],
)  # fmt: skip
def test_not_json(text: bytes) -> None:
    with pytest.raises(NotJSON):
        decode(text)


@pytest.mark.parametrize(
    "text",
    [
        b'{"a": 1, "a": 2}', b'{"a": {"b": [{"c": 1, "c": 1}]}}', b'{"\\u0061": 1, "a": 2}',
        b"9007199254740993", b"-9007199254740993", b"18446744073709551616",
        b"1" * 400, b"1e400", b"-1e400", b'"\\ud800"', b'"\\udc00x"', b'{"\\ud800": 1}',
        b"[" * 33 + b"]" * 33, b"[" * 100_000 + b"]" * 100_000,
        b'"' + b"x" * (64 * 1024 + 1) + b'"', b'"' + "é".encode() * (32 * 1024 + 1) + b'"',
    ],
)  # fmt: skip
def test_limits(text: bytes) -> None:
    with pytest.raises(LimitExceeded):
        decode(text)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (b"9007199254740992", 2**53), (b"-9007199254740992", -(2**53)), (b"1e20", 1e20),
        (b"1.7976931348623157e308", 1.7976931348623157e308),
        (b'{"a:b": 1, "c": ":"}', {"a:b": 1, "c": ":"}),
        (b'"\\ud83d\\ude00"', "😀"),
        (b"[" * 32 + b"]" * 32, json.loads("[" * 32 + "]" * 32)),
        (b'"' + b"x" * (64 * 1024) + b'"', "x" * 65536),
        (b' {"a": [true, false, null]} ', {"a": [True, False, None]}),
    ],
)  # fmt: skip
def test_accepted(text: bytes, value: object) -> None:
    assert decode(text) == value


def test_encode_round_trip() -> None:
    assert decode(encode({"a": [1, 2.5, "x"]})) == {"a": [1, 2.5, "x"]}
    with pytest.raises(TypeError):
        encode({"a": object()})
