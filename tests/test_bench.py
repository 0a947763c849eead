"""The benchmark's own pieces still run: a broken bench would judge nothing.

Figures are not checked here (the benchmark is the judge of speed); only that the store's
commit timer measures both settings on a real store and that a recorded run renders.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.report import merge, render
from bench.store_commits import store_commits

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def test_store_commits_times_both_settings_and_cleans_up(tmp_path: Path) -> None:
    figures = store_commits(tmp_path, prefill=300, samples=20)
    assert set(figures) == {"full", "normal"}
    for timings in figures.values():
        assert set(timings) == {"queued_us", "result_us", "both_us"}
        assert all(value > 0 for value in timings.values())
    assert list(tmp_path.iterdir()) == []  # each store is removed after its run


def test_a_recorded_full_run_renders_with_every_target() -> None:
    run = json.loads((RESULTS / "results-2026-12-05T091806Z.json").read_text())
    section = render(merge([run]))
    for row in (
        "| memory per idle registered agent, 19,000 agents | ≤ 10 KB |",
        "| registrations per second with authentication, by enrollment key |",
        "| command round trip console → hub → agent → hub → console, 10,000 agents",
        "| what the store allows FULL:",
        "| one job to 10,000 agents until every result is stored |",
        "| heartbeats per CPU-second (one core) |",
        "| longest event-loop stall at 10,000 agents, bursts included",
    ):
        assert row in section
    assert "a 5M-step Python loop in 181.7 ms" in section
