"""Admission arithmetic: how long a busy hub tells refused agents to stay away, which
half-open connection it sheds, what it folds in the audit, whom it cools off."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from hub.admission import FailureTracker, RefusalFold, RefusalSpread, SourceShare, source_key
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


# -- the fair share of half-open connections -----------------------------------------------


def test_the_heaviest_source_and_its_oldest_item() -> None:
    share: SourceShare[str] = SourceShare()
    for n, source in enumerate(["a", "b", "a", "c", "a", "b"]):
        share.add(f"{source}{n}", source, float(n))
    assert share.heaviest() == ("a", 3)
    assert share.oldest_of("a") == ("a0", 0.0)
    assert share.oldest() == ("a0", 0.0)
    assert (share.count("b"), share.count("z")) == (2, 0)
    share.remove("a0")
    share.remove("a2")
    # a and b hold two each now: b reached two first.
    assert share.heaviest() == ("b", 2)
    assert share.oldest_of("a") == ("a4", 4.0)
    assert not share.remove("a0")
    for item in ("b1", "b5", "a4", "c3"):
        share.remove(item)
    assert share.heaviest() is None and len(share) == 0
    assert share._by_source == {} and not any(share._buckets)


@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 5), st.integers(0, 40)), min_size=1, max_size=300
    )
)
@settings(max_examples=200, deadline=None)
def test_the_share_agrees_with_counting_everything(steps: list[tuple[bool, int, int]]) -> None:
    """Random adds and removes: the heaviest count, each source's oldest item and the
    global oldest are what a full count says, and nothing is left behind."""
    share: SourceShare[int] = SourceShare()
    model: dict[int, tuple[str, float]] = {}
    clock = 0.0
    for add, source_n, item in steps:
        source = f"10.0.0.{source_n}"
        clock += 1
        if add and item not in model:
            share.add(item, source, clock)
            model[item] = (source, clock)
        elif not add and item in model:
            model.pop(item)
            assert share.remove(item)
        counts: dict[str, int] = {}
        for owner, _ in model.values():
            counts[owner] = counts.get(owner, 0) + 1
        heaviest = share.heaviest()
        if not model:
            assert heaviest is None and len(share) == 0
            continue
        assert heaviest is not None and heaviest[1] == max(counts.values())
        assert counts[heaviest[0]] == heaviest[1]
        for owner, count in counts.items():
            assert share.count(owner) == count
            oldest = min((at, i) for i, (o, at) in model.items() if o == owner)
            assert share.oldest_of(owner) == (oldest[1], oldest[0])
        assert share.oldest()[1] == min(at for _, at in model.values())
    assert share._top == max(counts.values(), default=0)
    assert not any(share._buckets[share._top + 1 :])


def test_an_ipv6_source_is_its_64() -> None:
    # One host (or one site) gets a /64: its addresses are one source for the fair share and
    # for folding. IPv4 addresses are themselves.
    assert source_key("203.0.113.7") == "203.0.113.7"
    assert source_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:2:ffff:ffff:ffff:ffff") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert source_key("fe80::1%eth0") == "fe80::/64"
    assert source_key("::1") == "::/64"
    assert source_key("not:an:address") == "not:an:address"


# -- folding refusals in the audit -----------------------------------------------------------


def test_one_entry_per_source_and_window_carrying_what_was_folded() -> None:
    clock = FakeClock()
    fold = RefusalFold(window=60, clock=clock)
    assert fold.note("10.0.0.1", "shed_half_open") == {}  # the first: written
    for _ in range(500):
        assert fold.note("10.0.0.1", "shed_half_open") is None
    assert fold.note("10.0.0.1", "handshake_timeout") is None
    assert fold.note("10.0.0.2", "overloaded") == {}  # another source: its own entry
    clock.now += 59
    assert fold.due() == []
    assert fold.note("10.0.0.1", "shed_half_open") is None
    clock.now += 1
    # The source goes on: its next refusal is written with the counts of the last window.
    assert fold.note("10.0.0.1", "overloaded") == {"shed_half_open": 501, "handshake_timeout": 1}
    # The other one went quiet with nothing folded: forgotten, no entry.
    assert fold.due() == [] and len(fold) == 1
    fold.note("10.0.0.1", "overloaded")
    clock.now += 60
    # Quiet at the end of its window: a summary, which counts as that window's entry.
    assert fold.due() == [("10.0.0.1", {"overloaded": 1})]
    assert fold.note("10.0.0.1", "overloaded") is None
    assert fold.flush() == [("10.0.0.1", {"overloaded": 1})] and len(fold) == 0


def test_a_burst_is_written_one_by_one_before_folding() -> None:
    clock = FakeClock()
    fold = RefusalFold(window=60, burst=3, clock=clock)
    assert [fold.note("10.0.0.1", "not_found") for _ in range(5)] == [{}, {}, {}, None, None]
    clock.now += 60
    assert fold.note("10.0.0.1", "not_found") == {"not_found": 2}
    assert fold.note("10.0.0.1", "not_found") == {}  # the second of the new window


def test_folding_is_bounded_by_sources_and_loses_no_count() -> None:
    clock = FakeClock()
    fold = RefusalFold(window=60, max_sources=100, clock=clock)
    for n in range(150):
        fold.note(f"10.0.{n // 256}.{n % 256}", "shed_half_open")
        fold.note(f"10.0.{n // 256}.{n % 256}", "shed_half_open")
    assert len(fold) == 100
    evicted = fold.take_evicted()  # for the caller to write at once
    assert len(evicted) == 50 and all(c == {"shed_half_open": 1} for _, c in evicted)


# -- the failed-authentication tracker -------------------------------------------------------


def test_ten_failures_within_the_window_cool_a_source_off() -> None:
    clock = FakeClock()
    tracker = FailureTracker(limit=10, window=60, cooloff=60, clock=clock)
    for _ in range(9):
        tracker.failed("10.0.0.1")
        clock.now += 7  # nine failures over 63 s: the first has left the window
    tracker.failed("10.0.0.1")
    assert tracker.cooling_down("10.0.0.1") == 0
    tracker.failed("10.0.0.1")  # ten within 60 s now (from the third on)
    assert tracker.cooling_down("10.0.0.1") == 60
    clock.now += 60
    assert tracker.cooling_down("10.0.0.1") == 0
    tracker.failed("10.0.0.1")  # the count started again
    assert tracker.cooling_down("10.0.0.1") == 0


def test_the_tracker_forgets_the_least_recently_failing_source() -> None:
    clock = FakeClock()
    tracker = FailureTracker(limit=2, window=60, cooloff=60, max_sources=3, clock=clock)
    for source in ("a", "b", "c"):
        tracker.failed(source)
    tracker.failed("a")  # a cools off (and leaves the failure records)
    for source in ("d", "e", "f"):
        tracker.failed(source)  # b and c are forgotten
    tracker.failed("b")
    assert tracker.cooling_down("b") == 0  # its first failure was forgotten
    assert tracker.cooling_down("a") == 60
    assert len(tracker._failures) == 3 and len(tracker._cooling) == 1
