"""Admission control before any WebSocket exists: failed-auth cool-off, handshake rate,
the fair share of half-open connections by source, and folding refusals in the audit.

All are bounded maps and counters: a flood of sources cannot grow them without limit.
A valid credential is never refused because of its source address (many agents share one
NAT address); the cool-off only turns a failing source's 401 into a 429.
"""

from __future__ import annotations

import ipaddress
import math
import random
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from .metrics import RateWindow

__all__ = [
    "FailureTracker",
    "RefusalFold",
    "RefusalSpread",
    "SourceShare",
    "TokenBucket",
    "source_key",
]

T = TypeVar("T")


class FailureTracker:
    """Failed authentications per source address, with a cool-off once over the limit.

    Bounded: at most ``max_sources`` sources with recent failures and as many in a cool-off,
    the least recently failing forgotten first (an attacker spraying from more addresses than
    that evicts older records, which only shortens cool-offs). Compact, because an address
    costs an attacker nothing on IPv6: a source with one failure is one float, with more an
    ``array`` of at most ``limit`` floats — about 175 and 335 bytes a source with its key
    (measured), 100,000 sources ≤ 34 MB, plus ≤ 18 MB for as many cool-offs.
    """

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
        #: The times of a source's last failures (up to ``limit``), oldest first.
        self._failures: OrderedDict[str, float | array[float]] = OrderedDict()
        self._cooling: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        """Sources remembered (failing or cooling off)."""
        return len(self._failures) + len(self._cooling)

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
        failures = self._failures.pop(source, None)
        if failures is None:
            times: float | array[float] = now
            count, first = 1, now
        else:
            if isinstance(failures, float):
                failures = array("d", (failures,))
            failures.append(now)
            if len(failures) > self.limit:
                del failures[0]
            times, count, first = failures, len(failures), failures[0]
        if count >= self.limit and now - first <= self.window:
            self._cooling.pop(source, None)
            self._cooling[source] = now + self.cooloff
            if len(self._cooling) > self.max_sources:
                self._cooling.popitem(last=False)
            return  # the count starts again after the cool-off
        self._failures[source] = times  # (re)inserted last: the most recent
        if len(self._failures) > self.max_sources:
            self._failures.popitem(last=False)


def source_key(peer: str) -> str:
    """Who a peer address counts as, for fair shares and folding: an IPv4 address itself,
    an IPv6 address its /64 — one host or one site's network gets a /64 to itself, and
    addresses within it cost an attacker nothing."""
    if ":" not in peer:
        return peer
    try:
        return str(ipaddress.IPv6Network((peer.partition("%")[0], 64), strict=False))
    except ValueError:
        return peer


class SourceShare(Generic[T]):
    """Items (half-open connections) by source: the oldest item, and the oldest item of the
    source that holds the most, each in O(1).

    Each source's items are kept oldest first; sources are bucketed by how many items they
    hold, and since a count changes by one at a time the largest non-empty bucket moves by at
    most one a change. Within a bucket, sources are in the order they reached that count.
    Buckets are kept once made (one per count ever reached, so at most the pending cap), so
    that the usual case — a handful pending, each from its own address — allocates little.
    """

    __slots__ = ("_all", "_buckets", "_by_source", "_top")

    def __init__(self) -> None:
        #: Every item, when it arrived and its source, oldest first.
        self._all: OrderedDict[T, tuple[float, str]] = OrderedDict()
        self._by_source: dict[str, OrderedDict[T, None]] = {}
        #: Sources by the number of items they hold (the index; 0 is unused).
        self._buckets: list[OrderedDict[str, None]] = [OrderedDict(), OrderedDict()]
        self._top = 0

    def __len__(self) -> int:
        return len(self._all)

    def __contains__(self, item: object) -> bool:
        return item in self._all

    def count(self, source: str) -> int:
        items = self._by_source.get(source)
        return len(items) if items is not None else 0

    def add(self, item: T, source: str, arrived: float) -> None:
        self._all[item] = (arrived, source)
        items = self._by_source.get(source)
        buckets = self._buckets
        if items is None:
            self._by_source[source] = OrderedDict(((item, None),))
            buckets[1][source] = None
            if not self._top:
                self._top = 1
            return
        items[item] = None
        held = len(items)
        del buckets[held - 1][source]
        if held == len(buckets):
            buckets.append(OrderedDict())
        buckets[held][source] = None
        if held > self._top:
            self._top = held

    def remove(self, item: T) -> bool:
        """Forget ``item``; False if it was not there."""
        entry = self._all.pop(item, None)
        if entry is None:
            return False
        source = entry[1]
        items = self._by_source[source]
        del items[item]
        held = len(items)
        buckets = self._buckets
        bucket = buckets[held + 1]
        del bucket[source]
        if held:
            buckets[held][source] = None
        else:
            del self._by_source[source]
        if not bucket and self._top == held + 1:
            self._top = held  # the source itself is in the bucket below (or gone)
        return True

    def oldest(self) -> tuple[T, float]:
        """The item that arrived first, and when (the share must not be empty)."""
        item, (arrived, _) = next(iter(self._all.items()))
        return item, arrived

    def source_of(self, item: T) -> str:
        return self._all[item][1]

    def heaviest(self) -> tuple[str, int] | None:
        """A source holding the most items (the first to reach that count), and how many."""
        if not self._top:
            return None
        return next(iter(self._buckets[self._top])), self._top

    def oldest_of(self, source: str) -> tuple[T, float]:
        """The oldest item of ``source`` (which must hold one), and when it arrived."""
        item = next(iter(self._by_source[source]))
        return item, self._all[item][0]


class RefusalFold:
    """At most ``burst`` audit entries per source address and ``window``: the first refusals
    of a window are written, the others of that window are counted by result, and the
    counts go out with the source's next entry — the first of its next window, or a summary
    once its window ended quietly (:meth:`due`). With a burst of one, an attack that sheds
    thousands of connections a second writes one entry per attacking address a minute,
    never one per connection.

    Bounded by ``max_sources``: past it the source whose window began first is forgotten,
    its counts left in :attr:`evicted` for the caller to write at once.
    """

    __slots__ = ("_sources", "burst", "clock", "evicted", "max_sources", "window")

    def __init__(
        self,
        window: float = 60.0,
        burst: int = 1,
        max_sources: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.burst = burst
        self.max_sources = max_sources
        self.clock = clock
        #: Per source: [when its window began, entries written in it, counts folded since
        #: its last entry], oldest window first.
        self._sources: OrderedDict[str, list[Any]] = OrderedDict()
        #: Counts of sources forgotten to make room, not written yet.
        self.evicted: list[tuple[str, dict[str, int]]] = []

    def __len__(self) -> int:
        return len(self._sources)

    def note(self, source: str, result: str) -> dict[str, int] | None:
        """One refusal of ``source``. None: folded (counted, not written). Else write an
        entry now, carrying the returned counts (refusals not written since the last one)."""
        now = self.clock()
        state = self._sources.get(source)
        if state is None:
            self._sources[source] = [now, 1, {}]
            if len(self._sources) > self.max_sources:
                old, (_, _, counts) = self._sources.popitem(last=False)
                if counts:
                    self.evicted.append((old, counts))
            return {}
        if now - state[0] < self.window:
            if state[1] < self.burst:
                state[1] += 1
                return {}
            counts = state[2]
            counts[result] = counts.get(result, 0) + 1
            return None
        folded = state[2]
        state[0], state[1], state[2] = now, 1, {}
        self._sources.move_to_end(source)
        return folded

    def take_evicted(self) -> list[tuple[str, dict[str, int]]]:
        out, self.evicted = self.evicted, []
        return out

    def next_due(self) -> float | None:
        """When the earliest window ends (on :attr:`clock`), or None when none is open."""
        for state in self._sources.values():
            return float(state[0] + self.window)
        return None

    def due(self) -> list[tuple[str, dict[str, int]]]:
        """Sources whose window ended with refusals folded: their counts, each starting a
        new window (the summary is that window's first entry). Quiet ones are forgotten."""
        out = self.take_evicted()
        now = self.clock()
        sources = self._sources
        while sources:
            source, state = next(iter(sources.items()))
            if now - state[0] < self.window:
                break
            if state[2]:
                out.append((source, state[2]))
                state[0], state[1], state[2] = now, 1, {}
                sources.move_to_end(source)
            else:
                del sources[source]
        return out

    def flush(self) -> list[tuple[str, dict[str, int]]]:
        """Every count not written yet (the hub stops); forgets everything."""
        out = self.take_evicted()
        out.extend((source, state[2]) for source, state in self._sources.items() if state[2])
        self._sources.clear()
        return out


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

    def retry_after(self, count: bool = True) -> int:
        """Count one refusal and draw its ``Retry-After`` (whole seconds, at least 1).
        ``count=False`` draws without counting: for a connection shed at the pending cap,
        most likely a flood's, which must not send the agents refused meanwhile away for
        longer."""
        if count:
            self._refused.add()
        refused = self._refused.total()
        admitted = self._admitted.total()
        rate = self.rate
        if admitted >= 100:  # enough to measure: over the span, or since the first
            rate = min(rate, admitted / self._admitted.seconds())
        window = min(self.cap, max(1, math.ceil(refused / rate)))
        return self._rng.randint(1, window)
