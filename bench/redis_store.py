"""What the Redis store costs Redis: memory per idle agent, commands a second of an idle
fleet, and the two commits of a command round trip, each beside its floor.

    .venv/bin/python bench/redis_store.py                # everything (about two minutes)
    .venv/bin/python bench/redis_store.py --only memory  # or: idle, commits

Every figure runs against a ``redis-server`` this script starts on a free port (never the
machine's Redis), through the real :class:`RedisStore`:

- **memory** — 1,000 and 19,000 idle agents as hubs leave them: each registered (its row and
  last heartbeat), with its open session, its kept heartbeat samples and, as agents that
  enrolled have, its own agent key. ``INFO memory`` deltas per agent, the marginal cost
  between the two sizes, and ``MEMORY USAGE`` of each key; the floor is the bytes of the
  stored values themselves (what any store must keep).
- **idle** — two hubs of 9,500 agents each, heartbeats every 15 s, as the hub's periodic
  work drives the store (heartbeat batches every 5 s, samples every 60 s, credential sync
  and checkpoint every second, readiness every 5 s), over ``--idle-seconds`` of hub time run
  back to back: Redis's ``total_commands_processed`` delta per second of hub time. The floor
  is a write per heartbeat (19,000 / 15 s).
- **commits** — a round trip's two durable writes (the job with its queued command, then the
  result with its transitions and the finished job) timed alone on a ledger of 20,000
  finished round trips, like ``bench/store_commits.py``, with ``appendfsync always`` and
  ``everysec``; the floor is two bare ``SET`` round trips to the same Redis, and the SQLite
  store's figures are measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as aioredis

from bench.store_commits import _finished, _round_trip, store_commits
from hub.model import AgentRecord, CredentialRecord
from hub.store.redis import RedisStore
from tests.redis_server import RedisServer

HEARTBEAT = 15.0
FLUSH = 5.0
SAMPLES = 60.0


def runner() -> Any:
    try:
        import uvloop  # the hub's loop when it is installed

        return uvloop.run
    except ImportError:
        return asyncio.run


def idle_agent(n: int, hub_id: str, now: float) -> AgentRecord:
    """An agent as ``tether-agent simulate`` registers one (bench and tests alike)."""
    return AgentRecord(
        agent_id=f"sim-{n:05d}",
        platform="linux",
        region="eu-west",
        version="1.4.0",
        hostname=f"paris-edge-{n % 100:02d}",
        labels={"site": "paris", "tier": "edge", "simulated": "true"},
        capabilities=("exec", "ping", "sysinfo", "sleep"),
        location=(48.8566, 2.3522),
        status="ok",
        hub_id=hub_id,
        first_seen=now,
        connected_at=now,
        last_seen=now,
        metrics={"cpu_percent": 12.5, "mem_percent": 45.1, "load1": 0.52, "uptime_s": 1234567.0},
    )


def agent_key(n: int, agent_id: str, now: float) -> CredentialRecord:
    return CredentialRecord(
        id=f"{n:012x}", kind="agent", secret_hash=bytes(32), created_at=now, agent_id=agent_id,
        issued_by="5e1f0c2a9b7d",
    )  # fmt: skip


def used_memory(server: RedisServer) -> int:
    return int(server.info("memory")["used_memory"])


# -- memory ----------------------------------------------------------------------------


async def _add_idle(store: RedisStore, first: int, count: int, samples: int, keys: bool) -> None:
    now = time.time()
    agents = [idle_agent(n, "hub-a", now) for n in range(first, first + count)]
    for start in range(0, count if keys else 0, 1000):
        await asyncio.gather(
            *(store.add_credential(agent_key(n, f"sim-{n:05d}", now))
              for n in range(first + start, first + min(count, start + 1000)))
        )  # fmt: skip
    for agent in agents:
        store.save_agent(agent)
        store.open_session(f"3f2a9c1b{agent.agent_id}", agent.agent_id, "hub-a",
                           "10.1.2.3:54321", None, now)  # fmt: skip
    for _ in range(samples):
        for agent in agents:
            agent.last_seen = (agent.last_seen or now) + SAMPLES
        store.save_heartbeats(agents, samples=True)
        await store.flush()


async def _memory(sizes: list[int], keys: bool) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    with RedisServer() as server:
        store = RedisStore.from_url(server.url)
        await store.open()
        try:
            base = used_memory(server)
            done = 0
            for size in sizes:
                await _add_idle(store, done, size - done, store.samples_kept + 1, keys)
                done = size
                total = used_memory(server) - base
                usage = {}
                payload = 0
                for name in ("agents", "hb", "hist", "cred", "cred:log", "profiles", "mnames"):
                    key = f"tether:{name}"
                    answer = server.call("MEMORY", "USAGE", key, "SAMPLES", "0")
                    usage[name] = int(answer[1:]) if answer.startswith(b":") else 0
                client = aioredis.Redis.from_url(server.url)
                for name in ("agents", "hb", "hist", "cred"):
                    async for field, value in client.hscan_iter(f"tether:{name}", count=5000):
                        payload += len(field) + len(value)
                await client.aclose()
                figures[size] = {
                    "used_per_agent": total / size,
                    "keys_per_agent": {k: v / size for k, v in usage.items()},
                    "payload_per_agent": payload / size,
                    "total": total,
                }
        finally:
            await store.close()
    small, big = sizes[0], sizes[-1]
    figures["marginal"] = (figures[big]["total"] - figures[small]["total"]) / (big - small)
    return figures


# -- idle fleet ------------------------------------------------------------------------


async def _idle(agents_total: int, seconds: int) -> dict[str, Any]:
    with RedisServer() as server:
        hubs = [RedisStore.from_url(server.url) for _ in range(2)]
        for hub in hubs:
            await hub.open()
        try:
            now = time.time()
            fleets: list[list[AgentRecord]] = [[], []]
            for n in range(agents_total):
                fleets[n % 2].append(idle_agent(n, f"hub-{n % 2}", now))
            for hub, fleet in zip(hubs, fleets, strict=True):
                for agent in fleet:
                    hub.save_agent(agent)
                await hub.flush()
            revs = [(await hub.credentials_since(0))[0] for hub in hubs]
            before = int(server.info("stats")["total_commands_processed"])
            cpu_before = _redis_cpu(server)
            last_sample = [-SAMPLES] * 2
            for second in range(seconds):
                t = now + second
                for index, (hub, fleet) in enumerate(zip(hubs, fleets, strict=True)):
                    # Heartbeats arrive all along: agent k beats when t ≡ k (mod 15).
                    for k, agent in enumerate(fleet):
                        if (second - k) % HEARTBEAT == 0:
                            agent.last_seen = t
                            agent.metrics = {**agent.metrics, "cpu_percent": float(second % 100)}
                            agent.dirty = True
                    if second % FLUSH == 0:
                        samples = second - last_sample[index] >= SAMPLES
                        if samples:
                            last_sample[index] = second
                        dirty = [a for a in fleet if a.dirty]
                        for agent in dirty:
                            agent.dirty = False
                        hub.save_heartbeats(dirty, samples)
                    revs[index], _ = await hub.credentials_since(revs[index])
                    await hub.checkpoint()
                    if second % 5 == 0:
                        await hub.ping()
                await asyncio.gather(*(hub.flush() for hub in hubs))
            # The INFO that reads the count is one command; nothing else talks to Redis.
            spent = int(server.info("stats")["total_commands_processed"]) - before - 1
            cpu = _redis_cpu(server) - cpu_before
            commits = sum(hub.commits for hub in hubs)
        finally:
            for hub in hubs:
                await hub.close()
    return {
        "agents": agents_total,
        "seconds": seconds,
        "commands_per_second": spent / seconds,
        "round_trips_per_second": commits / seconds,
        "redis_cpu_ms_per_second": cpu * 1000 / seconds,
        "floor_per_second": agents_total / HEARTBEAT,
    }


def _redis_cpu(server: RedisServer) -> float:
    info = server.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


# -- commits -------------------------------------------------------------------------


async def _commits(appendfsync: str, prefill: int, samples: int) -> dict[str, float]:
    with RedisServer(appendfsync=appendfsync) as server:
        store = RedisStore.from_url(server.url)
        await store.open()
        client = aioredis.Redis.from_url(server.url)
        try:
            for start in range(0, prefill, 1000):
                writes = []
                for seq in range(start, min(prefill, start + 1000)):
                    job, command, entries = _round_trip(seq)
                    writes.append(store.add_job(job, [command], entries))
                    writes.append(store.save_commands([command], _finished(job, command), [job]))
                await asyncio.gather(*writes)
            queued, result, floor = [], [], []
            for seq in range(prefill, prefill + samples):
                job, command, entries = _round_trip(seq)
                started = time.perf_counter()
                await store.add_job(job, [command], entries)
                stored = time.perf_counter()
                await store.save_commands([command], _finished(job, command), [job])
                done = time.perf_counter()
                await client.set("bench:floor", seq)
                await client.set("bench:floor", seq + 1)
                queued.append(stored - started)
                result.append(done - stored)
                floor.append(time.perf_counter() - done)
        finally:
            await client.aclose()
            await store.close()
    return {
        "queued_us": statistics.median(queued) * 1e6,
        "result_us": statistics.median(result) * 1e6,
        "both_us": statistics.median([q + r for q, r in zip(queued, result, strict=True)]) * 1e6,
        "floor_us": statistics.median(floor) * 1e6,
    }


# -- report ----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("memory", "idle", "commits"))
    parser.add_argument("--agents", type=int, default=19_000)
    parser.add_argument("--idle-seconds", type=int, default=120, help="hub time, run back to back")
    parser.add_argument("--prefill", type=int, default=20_000)
    parser.add_argument("--samples", type=int, default=500)
    args = parser.parse_args()
    run = runner()
    if args.only in (None, "memory"):
        for keys in (False, True):
            memory = run(_memory([1_000, args.agents], keys))
            what = "with its agent key" if keys else "no credential"
            for size in (1_000, args.agents):
                figures = memory[size]
                usage = ", ".join(
                    f"{k} {v:.0f}" for k, v in figures["keys_per_agent"].items() if v >= 0.5
                )
                print(
                    f"memory, {size:>6,} idle agents, {what}: {figures['used_per_agent']:4.0f} "
                    f"B/agent (INFO used_memory delta; MEMORY USAGE: {usage}); floor, the "
                    f"stored values' bytes: {figures['payload_per_agent']:.0f} B/agent, "
                    f"{figures['used_per_agent'] / figures['payload_per_agent']:.2f}x"
                )
            print(f"memory, {what}, the marginal agent from 1,000 to {args.agents:,}: "
                  f"{memory['marginal']:.0f} B/agent (target <= 1,024)")  # fmt: skip
    if args.only in (None, "idle"):
        idle = run(_idle(args.agents, args.idle_seconds))
        print(
            f"idle fleet, {idle['agents']:,} agents on 2 hubs, {idle['seconds']} s of hub time: "
            f"{idle['commands_per_second']:.1f} Redis commands/s (target <= 300 for the whole "
            f"cluster; floor, a write per heartbeat: {idle['floor_per_second']:.0f}/s, "
            f"{idle['commands_per_second'] / idle['floor_per_second']:.3f}x), "
            f"{idle['round_trips_per_second']:.1f} write round trips/s, Redis CPU "
            f"{idle['redis_cpu_ms_per_second']:.1f} ms per second of hub time"
        )
    if args.only in (None, "commits"):
        for appendfsync in ("always", "everysec"):
            c = run(_commits(appendfsync, args.prefill, args.samples))
            print(
                f"commits, appendfsync {appendfsync:8}: queued {c['queued_us']:6.0f} µs, result "
                f"{c['result_us']:6.0f} µs, both {c['both_us']:6.0f} µs (medians); floor, two "
                f"SET round trips: {c['floor_us']:.0f} µs, {c['both_us'] / c['floor_us']:.2f}x"
            )
        with tempfile.TemporaryDirectory() as workdir:
            for synchronous, f in store_commits(Path(workdir), args.prefill, args.samples).items():
                print(
                    f"commits, SQLite {synchronous:6} (same run): queued {f['queued_us']:6.0f} µs, "
                    f"result {f['result_us']:6.0f} µs, both {f['both_us']:6.0f} µs (medians)"
                )


if __name__ == "__main__":
    main()
