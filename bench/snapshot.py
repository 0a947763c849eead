"""How long a console waits for the snapshot of a big fleet (`subscribe` to every topic).

    .venv/bin/python bench/snapshot.py [--agents 20000]

A hub process is started on a store that already knows N agents (as after a restart: the
records come from SQLite), then an admin client connects, subscribes to agents, commands,
alerts and metrics, and the time from sending `subscribe` to the parsed reply is measured,
five times. The event-loop stall the snapshot causes is read from the hub's /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import Hub, run
from hub.model import AgentRecord
from hub.protocol.client import AdminClient
from hub.store.sqlite import SQLiteStore

CITIES = (
    ("berlin", "eu-central", 52.5, 13.4),
    ("ohio", "us-east", 40.0, -83.0),
    ("tokyo", "ap-northeast", 35.7, 139.7),
    ("sydney", "ap-oceania", -33.9, 151.2),
)


async def populate(data: Path, count: int) -> None:
    store = SQLiteStore(data)
    await store.open()
    now = time.time()
    for n in range(count):
        city, region, lat, lon = CITIES[n % len(CITIES)]
        record = AgentRecord(
            agent_id=f"edge-{n:05d}",
            platform="linux",
            region=region,
            version="1.4.0",
            hostname=f"{city}-edge-{n:05d}",
            labels={"site": city, "tier": "edge"},
            capabilities=("ping", "sysinfo", "exec"),
            location=(lat, lon),
            status="ok",
            first_seen=now,
            last_seen=now,
            metrics={"cpu_percent": 12.5, "mem_percent": 40.1, "load1": 0.3, "uptime_s": 86400},
        )
        store.save_agent(record)
    await store.flush()
    await store.close()


async def measure(url: str, token: str, rounds: int) -> list[float]:
    seconds = []
    for _ in range(rounds):
        client = await AdminClient(url, token).open()
        started = time.perf_counter()
        data = await client.request(
            "subscribe", topics=["agents", "commands", "alerts", "metrics"], reply_timeout=60
        )
        seconds.append(time.perf_counter() - started)
        assert len(data["agents"]) >= 1
        await client.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="tether-snapshot-"))
    hub = Hub(workdir)
    run(populate(hub.data, args.agents))
    token = hub.token("--admin", "--role", "viewer")
    hub.start()
    try:
        seconds = asyncio.run(measure(hub.url, token, args.rounds))
        lag = hub.metrics().get("tether_event_loop_lag_max_seconds", 0)
    finally:
        assert hub.proc is not None
        hub.proc.stop()
    print(
        f"snapshot of {args.agents:,} agents: median {statistics.median(seconds) * 1000:.0f} ms, "
        f"worst {max(seconds) * 1000:.0f} ms over {args.rounds} rounds; "
        f"longest event-loop stall {lag * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()
