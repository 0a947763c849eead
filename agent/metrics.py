"""Heartbeat metrics (PROTOCOL §4.2): a flat map of numbers, cheap to sample."""

from __future__ import annotations

import time
from typing import Protocol

import psutil

__all__ = ["HostMetrics", "MetricsSource"]


class MetricsSource(Protocol):
    def sample(self) -> dict[str, float]: ...


class HostMetrics:
    """This host, via psutil. ``cpu_percent`` is non-blocking: the share since the last
    sample, so the first heartbeat after start reports the share since construction."""

    __slots__ = ("_boot",)

    def __init__(self) -> None:
        self._boot = psutil.boot_time()
        psutil.cpu_percent(interval=None)

    def sample(self) -> dict[str, float]:
        load1 = psutil.getloadavg()[0]
        return {
            "cpu_percent": psutil.cpu_percent(interval=None),
            "mem_percent": psutil.virtual_memory().percent,
            "load1": round(load1, 2),
            "uptime_s": round(time.time() - self._boot),
        }
