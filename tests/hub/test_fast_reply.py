"""The hand-written check of ``ack`` and ``result`` accepts exactly what the models do."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hub.protocol.messages import AGENT_MESSAGE, Ack, Result, ValidationError, fast_reply

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=5),
    # Around every length limit of the models (64, 128, 8192), without generating them.
    st.sampled_from(["", "é" * 64, "x" * 65, "x" * 128, "ü" * 129, "x" * 8192, "x" * 8193]),
    st.sampled_from(["succeeded", "failed", "rejected", "cancelled", "timed_out", "sent"]),
)
VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=2),
    st.dictionaries(st.text(max_size=3), SCALARS, max_size=2),
)
KEYS = st.sampled_from(
    ["command_id", "status", "exit_code", "data", "error", "started_at", "finished_at", "extra"]
)


@given(
    kind=st.sampled_from(["ack", "result", "heartbeat", "output", "nope"]),
    fields=st.dictionaries(KEYS, VALUES, max_size=8),
)
# On two loaded cores drawing the examples can take seconds: that is not the test's subject.
@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
def test_the_fast_check_never_accepts_what_validation_refuses(
    kind: str, fields: dict[str, Any]
) -> None:
    obj = {"type": kind, **fields}
    fast = fast_reply(obj)
    if fast is None:
        return
    assert type(fast) in (Ack, Result)
    try:
        validated = AGENT_MESSAGE.validate_python(obj)
    except ValidationError as exc:  # pragma: no cover - the failure this test is for
        raise AssertionError(f"fast path accepted what validation refuses: {obj!r}") from exc
    assert validated == fast
    assert validated.model_dump() == fast.model_dump()


@given(
    command_id=st.text(min_size=1, max_size=128),
    status=st.sampled_from(["succeeded", "failed", "rejected", "cancelled", "timed_out"]),
    exit_code=st.one_of(st.none(), st.integers()),
    data=VALUES,
)
def test_well_formed_replies_take_the_fast_path(
    command_id: str, status: str, exit_code: int | None, data: Any
) -> None:
    assert fast_reply({"type": "ack", "command_id": command_id}) == Ack(
        type="ack", command_id=command_id
    )
    obj = {"type": "result", "command_id": command_id, "status": status, "exit_code": exit_code,
           "data": data, "started_at": "2026-12-07T00:00:00Z"}  # fmt: skip
    assert fast_reply(obj) == AGENT_MESSAGE.validate_python(obj)
