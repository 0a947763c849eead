"""Backoff: bounds of the full-jitter draw, the reset rule, and the hub's hints."""

from __future__ import annotations

import random

import pytest

from hub.protocol.backoff import Backoff, Hint
from hub.protocol.constants import Close
from tests.support import FakeClock


def draws(backoff: Backoff, n: int) -> list[float]:
    return [backoff.next_delay() for _ in range(n)]


def test_ceiling_doubles_from_one_second_up_to_sixty() -> None:
    backoff = Backoff(rng=random.Random(1))
    ceilings = []
    for _ in range(9):
        ceilings.append(backoff.ceiling())
        backoff.next_delay()
    assert ceilings == [1, 2, 4, 8, 16, 32, 60, 60, 60]


@pytest.mark.parametrize("attempt", [0, 1, 3, 5, 6, 20, 200])
def test_draws_are_uniform_over_the_whole_window(attempt: int) -> None:
    upper = min(60.0, 2.0**attempt)
    samples = []
    for seed in range(2000):
        backoff = Backoff(rng=random.Random(seed))
        backoff.attempt = attempt
        samples.append(backoff.next_delay())
    assert all(0.0 <= s <= upper for s in samples)
    # Full jitter: the draws reach both ends of the window and average half of it.
    assert min(samples) < 0.02 * upper
    assert max(samples) > 0.98 * upper
    assert abs(sum(samples) / len(samples) - upper / 2) < 0.05 * upper


def test_counter_resets_after_thirty_seconds_registered() -> None:
    clock = FakeClock()
    backoff = Backoff(rng=random.Random(2), clock=clock)
    draws(backoff, 6)
    assert backoff.attempt == 6
    backoff.registered()
    clock.now += 30.0
    backoff.next_delay()
    assert backoff.attempt == 1  # drawn from the first window again


def test_short_session_does_not_reset_and_reset_is_not_sticky() -> None:
    clock = FakeClock()
    backoff = Backoff(rng=random.Random(3), clock=clock)
    draws(backoff, 4)
    backoff.registered()
    clock.now += 29.9
    assert backoff.next_delay() <= 16.0
    assert backoff.attempt == 5
    # The registration was consumed: later failures keep growing even if time passes.
    clock.now += 100
    backoff.next_delay()
    assert backoff.attempt == 6


def test_retry_after_is_a_floor_with_jitter_as_wide_as_itself() -> None:
    delays = []
    for seed in range(200):
        backoff = Backoff(rng=random.Random(seed))
        backoff.attempt = 8  # many refusals already: the wait must not grow with them
        delays.append(backoff.next_delay(Hint(retry_after=10.0)))
    assert all(10.0 <= d <= 20.0 for d in delays)
    assert max(delays) - min(delays) > 7.0
    short = Backoff(rng=random.Random(1)).next_delay(Hint(retry_after=0.0))
    assert 0.0 <= short <= 1.0


def test_after_ms_is_used_as_given() -> None:
    backoff = Backoff(rng=random.Random(4))
    backoff.attempt = 5
    assert backoff.next_delay(Hint(close_code=Close.SERVICE_RESTART, after_ms=3500)) == 3.5
    assert backoff.next_delay(Hint(after_ms=0)) == 0.0


def test_a_drain_is_not_a_failure_so_a_refused_dial_after_it_retries_within_a_second() -> None:
    # A hub restarting sends everyone away with after_ms; whoever comes back before it listens
    # again must retry fast, not from a doubled window.
    for seed in range(200):
        backoff = Backoff(rng=random.Random(seed))
        assert backoff.next_delay(Hint(close_code=Close.SERVICE_RESTART, after_ms=800)) == 0.8
        assert backoff.attempt == 0
        assert 0.0 <= backoff.next_delay() <= 1.0
        assert backoff.ceiling() == 2.0


def test_refused_dials_while_the_hub_restarts_keep_retrying_within_a_second() -> None:
    """Nothing listens between the old hub process and the new one: those refusals cost the
    hub nothing, so they do not double the wait (an agent refused four times would otherwise
    stay away up to 16 s after the hub is back)."""
    clock = FakeClock()
    backoff = Backoff(rng=random.Random(7), clock=clock)
    backoff.next_delay(Hint(close_code=Close.SERVICE_RESTART, after_ms=2000))
    for _ in range(20):
        clock.now += 1.0
        assert 0.0 <= backoff.next_delay(Hint(refused=True)) <= 1.0
    assert backoff.attempt == 0
    # Other failures during the restart back off as always.
    backoff.next_delay()
    assert backoff.attempt == 1


def test_the_restart_grace_ends_and_refusals_back_off_again() -> None:
    clock = FakeClock()
    backoff = Backoff(rng=random.Random(8), clock=clock, restart_grace=30.0)
    backoff.next_delay(Hint(close_code=Close.SERVICE_RESTART, after_ms=5000))
    clock.now += 5.0 + 30.0 + 0.1
    backoff.next_delay(Hint(refused=True))
    backoff.next_delay(Hint(refused=True))
    assert backoff.attempt == 2
    # A welcome ends it too: a later refusal is an ordinary failure.
    backoff = Backoff(rng=random.Random(9), clock=clock)
    backoff.next_delay(Hint(close_code=Close.SERVICE_RESTART, after_ms=0))
    backoff.registered()
    backoff.next_delay(Hint(refused=True))
    assert backoff.attempt == 1


def test_refusals_without_a_restart_announced_back_off() -> None:
    backoff = Backoff(rng=random.Random(10))
    for _ in range(5):
        backoff.next_delay(Hint(refused=True))
    assert backoff.attempt == 5


def test_superseded_waits_thirty_seconds_plus_jitter() -> None:
    delays = [
        Backoff(rng=random.Random(seed)).next_delay(Hint(close_code=Close.SUPERSEDED))
        for seed in range(200)
    ]
    assert all(30.0 <= d <= 60.0 for d in delays)
    assert max(delays) - min(delays) > 10.0


def test_revoked_waits_at_least_ten_minutes() -> None:
    delays = [
        Backoff(rng=random.Random(seed)).next_delay(Hint(close_code=Close.REVOKED))
        for seed in range(200)
    ]
    assert all(600.0 <= d <= 900.0 for d in delays)


def test_try_again_later_has_a_floor_unless_the_hub_hinted() -> None:
    backoff = Backoff(rng=random.Random(5))
    assert 5.0 <= backoff.next_delay(Hint(close_code=Close.TRY_AGAIN_LATER)) <= 6.0
    hinted = backoff.next_delay(Hint(close_code=Close.TRY_AGAIN_LATER, after_ms=1200))
    assert hinted == 1.2


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1006, 1007, 1008, 1009, 1011, 1012])
def test_other_close_codes_use_the_plain_backoff(code: int) -> None:
    backoff = Backoff(rng=random.Random(6))
    backoff.attempt = 3
    assert 0.0 <= backoff.next_delay(Hint(close_code=code)) <= 8.0
    assert backoff.attempt == 4
