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

    __slots__ = ("_admitted", "_clock", "_refused", "_rng", "cap", "rate", "span")

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
        self.span = span
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self._refused: deque[list[int]] = deque()  # [second, count]
        self._admitted: deque[list[int]] = deque()

    def admitted(self) -> None:
        """Count one upgrade accepted."""
        self._count(self._admitted)

    def retry_after(self) -> int:
        """Count one refusal and draw its ``Retry-After`` (whole seconds, at least 1)."""
        refused = self._count(self._refused)
        admitted = sum(count for _, count in self._admitted)
        # Seconds the admissions were counted over: the whole span, or since the first.
        seconds = min(self.span, int(self._clock()) - self._admitted[0][0] + 1) if admitted else 0
        rate = min(self.rate, admitted / seconds) if seconds and admitted >= 100 else self.rate
        window = min(self.cap, max(1, math.ceil(refused / rate)))
        return self._rng.randint(1, window)

    def _count(self, buckets: deque[list[int]]) -> int:
        """Add one to this second's bucket, forget old ones; the total of the span."""
        second = int(self._clock())
        if buckets and buckets[-1][0] == second:
            buckets[-1][1] += 1
        else:
            buckets.append([second, 1])
        self._trim(buckets, second)
        self._trim(self._admitted, second)
        return sum(count for _, count in buckets)

    def _trim(self, buckets: deque[list[int]], second: int) -> None:
        while buckets and buckets[0][0] <= second - self.span:
            buckets.popleft()
