"""When to dial the hub again (PROTOCOL §4.5, §4.6). Pure: no I/O, no sleeping.

Shared by the agent and the admin clients (the console), with their own caps.

A fleet that reconnects in lockstep knocks its hub over again, so every wait is drawn at
random: full-jitter exponential backoff, where retry ``n`` (counting from 0) waits a uniform
time in ``[0, min(cap, base·2ⁿ)]``. The counter resets once a connection has stayed
registered for ``reset_after`` seconds, so one blip after a long healthy session retries fast.

Hints from the hub take precedence over the plain backoff:

* ``reconnect.after_ms`` is already drawn at random per agent by the hub, so it is used as is,
  and it does not count as a retry: a planned reconnect (a drain) is no failure. For
  ``restart_grace`` seconds after it, a dial the hub's host *refused* (nothing listens: the
  hub is between two processes) waits ``[0, base]`` again and again instead of doubling —
  a refused dial costs the hub nothing, and a doubled wait would keep the agent away long
  after the hub is back. Any other failure backs off as usual;
* HTTP ``Retry-After`` may be one number for everyone, so it is a floor to which a jitter
  as wide as itself is added: ``Retry-After: 5`` means 5 to 10 s (thousands of agents
  refused together must not come back in the same second). Not the exponential jitter: an
  agent refused a few times during a reconnect storm would otherwise wait a minute after the
  hub has room again;
* close 4001 (superseded: another process claims our id) waits at least 30 s plus jitter;
* close 4003 (credential revoked) waits at least 10 minutes plus jitter;
* close 1013 (try again later) waits at least 5 s plus jitter, unless the hub sent a hint.

The RNG and the clock are injected so tests can check the bounds exactly.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from .constants import Close

__all__ = ["Backoff", "Hint"]

#: Floors (seconds) and the width of the jitter added to each, for the close codes of §4.5.
SUPERSEDED_WAIT = (30.0, 30.0)
REVOKED_WAIT = (600.0, 300.0)
OVERLOAD_FLOOR = 5.0
#: Close codes whose own waits win over a ``reconnect`` hint sent before them.
_FAULTS = (Close.REVOKED, Close.SUPERSEDED)


@dataclass(frozen=True, slots=True)
class Hint:
    """What the last attempt taught us; every field is optional."""

    close_code: int | None = None
    retry_after: float | None = None  # seconds, from an HTTP refusal
    after_ms: int | None = None  # from a ``reconnect`` message
    refused: bool = False  # the TCP connection was refused (nothing listening)


class Backoff:
    """Full-jitter exponential backoff with hub hints. One per agent; a few dozen bytes."""

    __slots__ = (
        "_clock",
        "_registered_at",
        "_restart_until",
        "_rng",
        "attempt",
        "base",
        "cap",
        "reset_after",
        "restart_grace",
    )

    def __init__(
        self,
        *,
        base: float = 1.0,
        cap: float = 60.0,
        reset_after: float = 30.0,
        restart_grace: float = 30.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base = base
        self.cap = cap
        self.reset_after = reset_after
        self.restart_grace = restart_grace
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self._registered_at: float | None = None
        self._restart_until = float("-inf")
        #: How many retries have been drawn since the last reset.
        self.attempt = 0

    def reset(self) -> None:
        """Start over: the next retry is a first one (the user asked to reconnect now)."""
        self.attempt = 0
        self._registered_at = None

    def registered(self) -> None:
        """The hub welcomed us: start timing the session for the reset rule."""
        self._registered_at = self._clock()
        self._restart_until = float("-inf")  # the restart we waited for is over

    def ceiling(self) -> float:
        """Upper bound of the plain jitter for the next retry."""
        return min(self.cap, self.base * 2.0 ** min(self.attempt, 62))

    def next_delay(self, hint: Hint | None = None) -> float:
        """Seconds to wait before the next dial; advances the retry counter."""
        registered_at, self._registered_at = self._registered_at, None
        if registered_at is not None and self._clock() - registered_at >= self.reset_after:
            self.attempt = 0
        if hint is not None and hint.after_ms is not None and hint.close_code not in _FAULTS:
            # The hub asked us to come back later (a drain): planned, not a failure, so
            # the dial after it is a first try and a refusal then waits at most a second.
            delay = hint.after_ms / 1000.0
            self._restart_until = self._clock() + delay + self.restart_grace
            return delay
        if hint is not None and hint.refused and self._clock() < self._restart_until:
            # Nothing listens yet where the hub is restarting: try again soon, not later.
            return self._rng.uniform(0.0, self.base)
        jitter = self._rng.uniform(0.0, self.ceiling())
        self.attempt += 1
        if hint is None:
            return jitter
        code = hint.close_code
        if code == Close.REVOKED:
            return REVOKED_WAIT[0] + self._rng.uniform(0.0, REVOKED_WAIT[1])
        if code == Close.SUPERSEDED:
            return SUPERSEDED_WAIT[0] + self._rng.uniform(0.0, SUPERSEDED_WAIT[1])
        if hint.retry_after is not None:
            return hint.retry_after + self._rng.uniform(0.0, max(1.0, hint.retry_after))
        if code == Close.TRY_AGAIN_LATER:
            return OVERLOAD_FLOOR + jitter
        return jitter
