"""Admission arithmetic: how long a busy hub tells refused agents to stay away."""

from __future__ import annotations

import random

from hub.admission import RefusalSpread
from tests.support import FakeClock


def draws(spread: RefusalSpread, n: int) -> list[int]:
    return [spread.retry_after() for _ in range(n)]


def test_a_few_refusals_are_asked_back_within_a_second() -> None:
    spread = RefusalSpread(rate=2000, cap=10, rng=random.Random(1), clock=FakeClock())
    assert set(draws(spread, 2000)) == {1}


def test_the_window_grows_with_the_refusals_of_the_last_ten_seconds() -> None:
    clock = FakeClock()
    spread = RefusalSpread(rate=2000, cap=10, rng=random.Random(2), clock=clock)
    draws(spread, 6000)  # 6,000 refused at 2,000/s: three seconds to admit them all
    tail = draws(spread, 3000)
    assert max(tail) <= 5 and set(tail) >= {1, 2, 3, 4}
    clock.now += 11  # all of them are old news now
    assert draws(spread, 100) == [1] * 100


def test_a_sustained_flood_is_capped() -> None:
    spread = RefusalSpread(rate=100, cap=10, rng=random.Random(3), clock=FakeClock())
    values = draws(spread, 20_000)
    assert max(values) == 10 and min(values) == 1


def test_the_count_is_bounded_by_the_span_not_by_the_refusals() -> None:
    clock = FakeClock()
    spread = RefusalSpread(rate=100, cap=10, clock=clock)
    for _ in range(100):
        clock.now += 0.5
        draws(spread, 50)
    assert len(spread._refused._buckets) <= spread._refused.span


def test_the_window_follows_the_rate_the_hub_actually_admits() -> None:
    """Allowed 2,000/s, a busy machine admits 500/s: 2,000 refused need four seconds."""
    clock = FakeClock()
    spread = RefusalSpread(rate=2000, cap=10, rng=random.Random(4), clock=clock)
    for _ in range(10):
        clock.now += 1
        for _ in range(500):
            spread.admitted()
    values = draws(spread, 2000)
    assert max(values) == 4 and min(values) == 1
    # Admitting faster than allowed never shortens it below the configured rate.
    fast = RefusalSpread(rate=100, cap=10, rng=random.Random(5), clock=clock)
    for _ in range(5000):
        fast.admitted()
    assert max(draws(fast, 300)) == 3
