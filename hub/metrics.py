"""Prometheus metrics and the live figures of the ``metrics`` tick.

Hot-path counters (messages, connections) are plain integers exposed by a custom
collector at scrape time: a ``prometheus_client`` counter takes a lock per increment, and
the hub counts tens of thousands of messages a second. The round-trip histogram is ours
too (:class:`_Histogram`, lock-free), exposed in the library's exposition format.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import sys
import threading
import time
import traceback
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = ["LagMonitor", "Metrics", "RateWindow", "StallReporter", "percentile"]

log = logging.getLogger(__name__)

RTT_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300,
)  # fmt: skip


class RateWindow:
    """Events in the last ``span`` seconds, in one-second buckets."""

    __slots__ = ("_buckets", "_clock", "span")

    def __init__(self, span: int = 60, clock: Callable[[], float] = time.monotonic) -> None:
        self.span = span
        self._clock = clock
        self._buckets: deque[list[int]] = deque()

    def add(self, n: int = 1) -> None:
        second = int(self._clock())
        buckets = self._buckets
        if buckets and buckets[-1][0] == second:
            buckets[-1][1] += n
        else:
            buckets.append([second, n])
            self._trim(second)

    def total(self) -> int:
        self._trim(int(self._clock()))
        return sum(count for _, count in self._buckets)

    def seconds(self) -> int:
        """Seconds the window has counted over: ``span`` once full, fewer after a start."""
        buckets = self._buckets
        return min(self.span, int(self._clock()) - buckets[0][0] + 1) if buckets else 0

    def _trim(self, second: int) -> None:
        buckets = self._buckets
        while buckets and buckets[0][0] <= second - self.span:
            buckets.popleft()


class StatsHistory:
    """The last hour of ``metrics`` ticks, one kept every ``interval`` seconds.

    A console that connects (or reconnects) draws its graphs from this at once instead of
    starting empty; a few hundred small dicts, whatever the fleet's size.
    """

    __slots__ = ("_last", "_ticks", "interval")

    def __init__(self, span: float = 3600.0, interval: float = 5.0) -> None:
        self.interval = interval
        self._ticks: deque[dict[str, Any]] = deque(maxlen=max(1, int(span / interval)))
        self._last = float("-inf")

    def __len__(self) -> int:
        return len(self._ticks)

    def due(self, at: float) -> bool:
        return at - self._last >= self.interval

    def offer(self, at: float, stats: dict[str, Any]) -> None:
        """Keep ``stats`` if ``interval`` has passed since the last one kept."""
        if self.due(at):
            self._last = at
            self._ticks.append({"at": round(at, 3), "stats": stats})

    def since(self, since: float | None = None) -> list[dict[str, Any]]:
        """Oldest first, only ticks after ``since`` (wall-clock seconds) if given."""
        if since is None:
            return list(self._ticks)
        return [tick for tick in self._ticks if tick["at"] > since]


def percentile(values: Iterable[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0 ≤ q ≤ 1) of ``values``; NaN when there are none.
    One definition for the metrics tick and the benchmarks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class _Percentiles:
    """Round trips of the last minute, for p50 and p99 in the tick (bounded sample)."""

    __slots__ = ("_samples", "limit")

    def __init__(self, limit: int = 20_000) -> None:
        self.limit = limit
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, seconds: float) -> None:
        self._samples.append((time.monotonic(), seconds))
        if len(self._samples) > self.limit:
            self._samples.popleft()

    def quantiles(self) -> tuple[float | None, float | None]:
        cutoff = time.monotonic() - 60
        samples = self._samples
        while samples and samples[0][0] < cutoff:
            samples.popleft()
        if not samples:
            return None, None
        values = [value for _, value in samples]
        return percentile(values, 0.5), percentile(values, 0.99)


class _Histogram:
    """A Prometheus histogram without locks. Only the event loop observes it and only the
    event loop exposes it; prometheus_client's takes two locks an observation, which was
    4.6 % of the event loop's time in a job to 10,000 agents (one observation per result)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = tuple(float(bound) for bound in bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: upper bounds are inclusive
        self.sum += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        labels = [*(floatToGoString(bound) for bound in self.bounds), "+Inf"]
        return HistogramMetricFamily(
            name,
            documentation,
            buckets=list(zip(labels, itertools.accumulate(self.counts), strict=True)),
            sum_value=self.sum,
        )


class LagMonitor:
    """How late the event loop runs a timer: the longest stall is what every peer waits.

    A timer every ``interval`` seconds records how much later than asked it ran; the worst
    since start and the worst of the last minute are exposed.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.max_ever = 0.0
        self._recent: deque[tuple[float, float]] = deque(maxlen=1200)
        #: time.monotonic() of the last tick, read by the stall reporter's thread.
        self.last_tick = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._expected = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._expected = loop.time() + self.interval
        self._handle = loop.call_at(self._expected, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        now = loop.time()
        lag = max(0.0, now - self._expected)
        if lag > self.max_ever:
            self.max_ever = lag
        self._recent.append((now, lag))
        self.last_tick = time.monotonic()
        self._expected = now + self.interval
        self._handle = loop.call_at(self._expected, self._tick)

    def current(self) -> float:
        """How late the loop runs now: how far past its time the pending tick is (0 when
        it is not due yet: a stall that is over is not lateness now)."""
        loop = self._loop
        if loop is None:
            return 0.0
        return max(0.0, loop.time() - self._expected)

    def recent_max(self, window: float = 60.0) -> float:
        if not self._recent:
            return 0.0
        cutoff = self._recent[-1][0] - window
        return max((lag for when, lag in self._recent if when >= cutoff), default=0.0)


class StallReporter(threading.Thread):
    """Logs what the event loop is doing when it stalls longer than ``threshold`` seconds.

    A diagnostic for operators (``stall_report_ms``): a thread samples the loop thread's
    stack whenever the lag monitor has not ticked for too long, once per stall.
    """

    def __init__(self, lag: LagMonitor, threshold: float) -> None:
        super().__init__(name="tether-stall-reporter", daemon=True)
        self.lag = lag
        self.threshold = threshold
        self.loop_thread = threading.get_ident()
        self.stopping = threading.Event()

    def run(self) -> None:
        reported_at = 0.0
        while not self.stopping.wait(self.threshold / 4):
            last = self.lag.last_tick
            if not last:
                continue
            # The loop owes a tick every `interval`: a stall is time past the one it owes.
            stalled = time.monotonic() - last - self.lag.interval
            if stalled > self.threshold and last != reported_at:
                reported_at = last
                frame = sys._current_frames().get(self.loop_thread)
                if frame is not None:
                    stack = "".join(traceback.format_stack(frame, limit=12))
                    log.warning("event loop stalled %.0f ms in:\n%s", stalled * 1000, stack)


class GcMonitor:
    """How long the garbage collector stops the process, per generation."""

    def __init__(self) -> None:
        self.max_pause = [0.0, 0.0, 0.0]
        self.collections = [0, 0, 0]
        self._started = 0.0

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            generation = info.get("generation", 2)
            pause = time.perf_counter() - self._started
            self.collections[generation] += 1
            if pause > self.max_pause[generation]:
                self.max_pause[generation] = pause


class Metrics(Collector):
    """All of the hub's counters; one instance per hub, with its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.connections: Counter[str] = Counter()
        self.disconnects: Counter[int] = Counter()
        self.reconnects = 0
        self.commands: Counter[str] = Counter()
        self.messages: Counter[tuple[str, str]] = Counter()
        self.invalid_messages: Counter[str] = Counter()
        self.agent_states: Callable[[], dict[str, int]] = dict
        self.admin_clients: Callable[[], int] = lambda: 0
        self.commands_in_flight: Callable[[], int] = lambda: 0
        self.store_commits: Callable[[], int] = lambda: 0
        self.extra_gauges: dict[str, Callable[[], float]] = {}
        self.connects_window = RateWindow()
        self.disconnects_window = RateWindow()
        self.auth_failures_window = RateWindow()
        self.refusals_window = RateWindow()
        self.round_trips = _Percentiles()
        self.history = StatsHistory()
        self.lag = LagMonitor()
        self.gc = GcMonitor()
        self.round_trip = _Histogram(RTT_BUCKETS)
        self.registry.register(self)
        # The figures Prometheus users expect of any service (process_resident_memory_bytes,
        # process_open_fds, process_max_fds, process_cpu_seconds_total,
        # process_start_time_seconds), read from /proc at scrape time: alert rules watch
        # memory and file descriptors against their limits (resources/prometheus/).
        ProcessCollector(registry=self.registry)

    # -- recording -----------------------------------------------------------------------

    def connection(self, result: str) -> None:
        self.connections[result] += 1
        if result != "accepted":
            self.refusals_window.add()
            if result == "unauthorized" or result == "rate_limited":
                self.auth_failures_window.add()

    def connected(self) -> None:
        self.connects_window.add()

    def disconnected(self, code: int) -> None:
        self.disconnects[code] += 1
        self.disconnects_window.add()

    def command_state(self, state: str) -> None:
        self.commands[state] += 1

    def command_round_trip(self, seconds: float) -> None:
        self.round_trip.observe(seconds)
        self.round_trips.add(seconds)

    # -- exposition ----------------------------------------------------------------------

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        agents = GaugeMetricFamily("tether_agents", "Agents by live state.", labels=["state"])
        states = {"online": 0, "stale": 0, "offline": 0, "unknown": 0}
        states.update(self.agent_states())
        for state, count in states.items():
            agents.add_metric([state], count)
        yield agents

        connections = CounterMetricFamily(
            "tether_connections",
            "Upgrade requests on /ws and /admin, accepted or refused by code.",
            labels=["result"],
        )
        for result, count in sorted(self.connections.items()):
            connections.add_metric([result], count)
        yield connections

        disconnects = CounterMetricFamily(
            "tether_disconnects", "Closed WebSocket connections by close code.", labels=["code"]
        )
        for code, count in sorted(self.disconnects.items()):
            disconnects.add_metric([str(code)], count)
        yield disconnects

        yield CounterMetricFamily(
            "tether_reconnects",
            "Registrations of agents that had registered before.",
            value=self.reconnects,
        )

        commands = CounterMetricFamily(
            "tether_commands", "Command transitions, by the state entered.", labels=["state"]
        )
        for state, count in sorted(self.commands.items()):
            commands.add_metric([state], count)
        yield commands

        messages = CounterMetricFamily(
            "tether_messages", "WebSocket messages.", labels=["channel", "direction"]
        )
        for (channel, direction), count in sorted(self.messages.items()):
            messages.add_metric([channel, direction], count)
        yield messages

        invalid = CounterMetricFamily(
            "tether_invalid_messages",
            "Messages refused as invalid, by channel.",
            labels=["channel"],
        )
        for channel, count in sorted(self.invalid_messages.items()):
            invalid.add_metric([channel], count)
        yield invalid

        yield CounterMetricFamily(
            "tether_store_commits",
            "Write transactions committed by the store (one fsync each when durable).",
            value=self.store_commits(),
        )
        yield GaugeMetricFamily(
            "tether_admin_clients", "Connected admin clients.", value=self.admin_clients()
        )
        yield GaugeMetricFamily(
            "tether_commands_in_flight",
            "Commands sent or acknowledged and not yet finished.",
            value=self.commands_in_flight(),
        )
        yield GaugeMetricFamily(
            "tether_event_loop_lag_max_seconds",
            "Longest delay of the event loop since the hub started.",
            value=self.lag.max_ever,
        )
        yield GaugeMetricFamily(
            "tether_event_loop_lag_recent_seconds",
            "Longest delay of the event loop in the last minute.",
            value=self.lag.recent_max(),
        )
        pauses = GaugeMetricFamily(
            "tether_gc_pause_max_seconds",
            "Longest garbage-collection pause since start, by generation.",
            labels=["generation"],
        )
        for generation, pause in enumerate(self.gc.max_pause):
            pauses.add_metric([str(generation)], pause)
        yield pauses
        yield self.round_trip.family(
            "tether_command_round_trip_seconds",
            "Time from dispatch to a command's terminal result.",
        )
        for name, read in self.extra_gauges.items():
            yield GaugeMetricFamily(name, name.replace("_", " "), value=read())

    def stats(self, hubs: dict[str, int]) -> dict[str, Any]:
        """The figures of a ``metrics`` tick (PROTOCOL §5)."""
        p50, p99 = self.round_trips.quantiles()
        return {
            "agents": {
                "online": 0,
                "stale": 0,
                "offline": 0,
                "unknown": 0,
                **self.agent_states(),
            },
            "connects_per_min": self.connects_window.total(),
            "disconnects_per_min": self.disconnects_window.total(),
            "auth_failures_per_min": self.auth_failures_window.total(),
            "commands_in_flight": self.commands_in_flight(),
            "rtt_p50_ms": round(p50 * 1000, 3) if p50 is not None else None,
            "rtt_p99_ms": round(p99 * 1000, 3) if p99 is not None else None,
            "hubs": hubs,
        }
