"""Admission control before any WebSocket exists: failed-auth cool-off and handshake rate.

Both are bounded maps and counters: a flood of sources cannot grow them without limit.
A valid credential is never refused because of its source address (many agents share one
NAT address); the cool-off only turns a failing source's 401 into a 429.
"""

from __future__ import annotations

import math
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from .metrics import RateWindow

__all__ = ["FailureTracker", "RefusalSpread", "TokenBucket"]


class FailureTracker:
    """Failed authentications per source address, with a cool-off once over the limit."""

    def __init__(
        self,
        limit: int = 10,
        window: float = 60.0,
        cooloff: float = 60.0,
        max_sources: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self.cooloff = cooloff
        self.max_sources = max_sources
        self.clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._cooling: OrderedDict[str, float] = OrderedDict()

    def cooling_down(self, source: str) -> int:
        """Seconds left in this source's cool-off (0 when none), for ``Retry-After``."""
        until = self._cooling.get(source)
        if until is None:
            return 0
        left = until - self.clock()
        if left <= 0:
            del self._cooling[source]
            return 0
        return max(1, math.ceil(left))

    def failed(self, source: str) -> None:
        now = self.clock()
        failures = self._failures.get(source)
        if failures is None:
            failures = self._failures[source] = deque(maxlen=self.limit)
            if len(self._failures) > self.max_sources:
                self._failures.popitem(last=False)
        else:
            self._failures.move_to_end(source)
        failures.append(now)
        if len(failures) >= self.limit and now - failures[0] <= self.window:
            self._cooling[source] = now + self.cooloff
            self._cooling.move_to_end(source)
            if len(self._cooling) > self.max_sources:
                self._cooling.popitem(last=False)
            failures.clear()


class TokenBucket:
    """At most ``rate`` events a second on average, ``burst`` at once."""

    __slots__ = ("burst", "clock", "last", "rate", "tokens")

    def __init__(
        self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else rate
        self.tokens = self.burst
        self.clock = clock
        self.last = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class RefusalSpread:
    """``Retry-After`` for a refusal because the hub is busy (handshake rate, pending
    handshakes): as long as it takes to admit everyone refused lately, and no longer.

    A fixed window (say 1–10 s, plus the agent's own jitter) sends a storm's refused agents
    up to 20 s away although the hub, admitting thousands a second, has room again within
    a second or two; a window of one second would bring a sustained flood back in one
    wave. So the window is the refusals of the last ``span`` seconds divided by the rate at
    which the hub admitted upgrades over the same seconds (the configured ``rate`` until it
    has admitted some: a slow or busy machine admits fewer than it is allowed to), never
    past ``cap``: 2,000 refused at 2,000/s → 1 s, 10,000 refused at 1,000/s → 1–10 s.
    """

    __slots__ = ("_admitted", "_refused", "_rng", "cap", "rate")

    def __init__(
        self,
        rate: float,
        cap: int,
        span: int = 10,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.cap = max(1, cap)
        self._rng = rng if rng is not None else random.Random()
        self._refused = RateWindow(span, clock)
        self._admitted = RateWindow(span, clock)

    def admitted(self) -> None:
        """Count one upgrade accepted."""
        self._admitted.add()

    def retry_after(self) -> int:
        """Count one refusal and draw its ``Retry-After`` (whole seconds, at least 1)."""
        self._refused.add()
        refused = self._refused.total()
        admitted = self._admitted.total()
        rate = self.rate
        if admitted >= 100:  # enough to measure: over the span, or since the first
            rate = min(rate, admitted / self._admitted.seconds())
        window = min(self.cap, max(1, math.ceil(refused / rate)))
        return self._rng.randint(1, window)
