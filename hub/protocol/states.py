"""The states of the contract's objects (PROTOCOL §4.3, §5) and how commands move between them.

One definition, shared by the hub's ledger, the CLI and the console. Members are ``str``
subclasses, so they compare equal to the strings on the wire and in the store.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "ERROR_STATES",
    "IN_FLIGHT_STATES",
    "NEXT_STATES",
    "STATE_RANK",
    "TERMINAL_STATES",
    "AgentState",
    "CommandState",
    "JobState",
    "can_move",
]


class CommandState(StrEnum):
    QUEUED = "queued"
    SENT = "sent"
    ACKED = "acked"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    EXPIRED = "expired"


class JobState(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PARTIAL = "partial"


class AgentState(StrEnum):
    ONLINE = "online"
    STALE = "stale"
    OFFLINE = "offline"
    UNKNOWN = "unknown"


_S = CommandState
#: A command's last state: nothing moves it again.
TERMINAL_STATES = frozenset(
    {_S.SUCCEEDED, _S.FAILED, _S.REJECTED, _S.CANCELLED, _S.TIMED_OUT, _S.EXPIRED}
)
#: Terminal states that count against a job's ``max_errors``.
ERROR_STATES = frozenset({_S.FAILED, _S.REJECTED, _S.TIMED_OUT})
#: Handed to the agent and not finished: these occupy a job's concurrency window.
IN_FLIGHT_STATES = frozenset({_S.SENT, _S.ACKED})
#: Order of command states; a transition only ever moves to a later rank.
STATE_RANK = {
    _S.QUEUED: 0,
    _S.SENT: 1,
    _S.ACKED: 2,
    **dict.fromkeys(TERMINAL_STATES, 3),
}
#: The transition table. A result may skip ahead (an agent that answers a redelivered
#: command from its journal never acks it again); ``expired`` is only for a command that
#: never left the hub; a hub timeout is ``timed_out`` whether or not the agent acked.
NEXT_STATES: dict[str, frozenset[str]] = {
    _S.QUEUED: frozenset({_S.SENT, _S.ACKED, *TERMINAL_STATES}),
    _S.SENT: frozenset({_S.ACKED, *(TERMINAL_STATES - {_S.EXPIRED})}),
    _S.ACKED: TERMINAL_STATES - {_S.EXPIRED},
    **{state: frozenset() for state in TERMINAL_STATES},
}


def can_move(old: str, new: str) -> bool:
    """Whether the table allows ``old → new`` (states only move forward)."""
    return new in NEXT_STATES[old]
