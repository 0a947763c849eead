"""``sysinfo``: what the host is and how much of it is used.

Collected on a worker thread: ``disk_usage`` on a hung network mount can block for a long
time, and the event loop must keep heartbeating meanwhile.
"""

from __future__ import annotations

import asyncio
import platform
import socket
import time
from typing import Any

import psutil

from . import CommandContext, HandlerResult


async def handle(ctx: CommandContext) -> HandlerResult:
    return HandlerResult(data=await asyncio.to_thread(collect))


def collect() -> dict[str, Any]:
    memory = psutil.virtual_memory()
    boot = psutil.boot_time()
    return {
        "hostname": socket.gethostname(),
        "platform": {
            "system": platform.system(),
            "release": platform.release(),
            "version": platform.version(),
            "machine": platform.machine(),
            "python": platform.python_version(),
        },
        "cpu": {
            "logical": psutil.cpu_count(logical=True),
            "physical": psutil.cpu_count(logical=False),
        },
        "memory": {
            "total": memory.total,
            "available": memory.available,
            "percent": memory.percent,
        },
        "disks": _disks(),
        "boot_time": boot,
        "uptime_s": round(time.time() - boot, 1),
    }


def _disks() -> list[dict[str, Any]]:
    disks = []
    for part in psutil.disk_partitions(all=False):
        try:
            usage = psutil.disk_usage(part.mountpoint)
        except OSError:
            continue
        disks.append(
            {
                "mountpoint": part.mountpoint,
                "device": part.device,
                "fstype": part.fstype,
                "total": usage.total,
                "used": usage.used,
                "free": usage.free,
                "percent": usage.percent,
            }
        )
    return disks
