"""The hub's own lock-free histogram against prometheus_client's, line for line."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from hub.metrics import RTT_BUCKETS, Metrics


def _series(text: str, family: str) -> list[str]:
    return [
        line
        for line in text.splitlines()
        if line.startswith(family) and not line.startswith(f"{family}_created")
    ]


def test_round_trip_histogram_exposes_what_prometheus_client_would() -> None:
    rng = random.Random(7)
    values = [rng.expovariate(500) for _ in range(2_000)]
    values += [*RTT_BUCKETS, 0.0, 1e6]  # the bounds themselves (inclusive) and beyond the last
    metrics = Metrics()
    registry = CollectorRegistry()
    reference = Histogram(
        "tether_command_round_trip_seconds",
        "Time from dispatch to a command's terminal result.",
        buckets=RTT_BUCKETS,
        registry=registry,
    )
    for value in values:
        metrics.command_round_trip(value)
        reference.observe(value)
    family = "tether_command_round_trip_seconds"
    ours = _series(metrics.exposition().decode(), family)
    theirs = _series(generate_latest(registry).decode(), family)
    # The sum is the same float added in the same order; every bucket and the count match.
    assert ours == theirs
    assert f"# TYPE {family} histogram" in metrics.exposition().decode()
