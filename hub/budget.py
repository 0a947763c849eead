"""A bound on the time one turn of the event loop spends on incoming bytes.

Why: a job to 10,000 agents makes 10,000 sockets readable within a few milliseconds, and the
loop calls every ``data_received`` of one poll in the same turn. At 50–100 µs a message that
turn lasts half a second, and with it every timer: heartbeat deadlines, a console's events,
the lag monitor. Past the budget a connection's bytes are *parked*: its reading is paused
(the kernel's socket buffer and TCP flow control hold the rest, so memory stays bounded) and
the bytes are handled in later turns, a budget's worth per turn, in the order they arrived.
Nothing is dropped and no connection is handled out of order with itself.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Protocol

__all__ = ["Parkable", "ReadBudget"]


class Parkable(Protocol):
    def unpark(self) -> None:
        """Handle the parked bytes now and resume reading."""


class ReadBudget:
    """Shared by every connection of one hub (one event loop)."""

    __slots__ = ("_drain_scheduled", "_new_turn_scheduled", "_parked", "_turn_started", "seconds")

    def __init__(self, seconds: float) -> None:
        #: Time per turn for reads; 0 turns the budget off.
        self.seconds = seconds
        self._turn_started = 0.0
        self._new_turn_scheduled = False
        self._drain_scheduled = False
        self._parked: deque[Parkable] = deque()

    @property
    def parked(self) -> int:
        return len(self._parked)

    def spent(self) -> bool:
        """Whether this turn has used its budget; the first call of a turn starts the clock."""
        if not self.seconds:
            return False
        now = time.perf_counter()
        if not self._new_turn_scheduled:
            # Callbacks scheduled now run at the start of the next turn: that is where
            # this turn's clock stops.
            self._new_turn_scheduled = True
            self._turn_started = now
            asyncio.get_running_loop().call_soon(self._new_turn)
            return False
        return now - self._turn_started > self.seconds

    def park(self, connection: Parkable) -> None:
        """Queue ``connection`` (whose reading the caller paused) for a later turn."""
        self._parked.append(connection)
        if not self._drain_scheduled:
            self._drain_scheduled = True
            asyncio.get_running_loop().call_soon(self._drain)

    def _new_turn(self) -> None:
        self._new_turn_scheduled = False

    def _drain(self) -> None:
        self._drain_scheduled = False
        parked = self._parked
        self.spent()  # starts this turn's clock unless a read already did
        while parked:
            parked.popleft().unpark()
            if self.spent():
                break
        if parked:
            self._drain_scheduled = True
            asyncio.get_running_loop().call_soon(self._drain)
