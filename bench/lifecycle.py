"""What the store keeps for a fleet over time, and what a day's pruning costs the event loop.

    flock -x /work/coord/bench-lock .venv/bin/python bench/lifecycle.py  # 19,000 agents, 3 days

Simulated days, not real ones: through the real :class:`SQLiteStore` (its writer thread and
group commit), each day is one job to every agent as the ledger writes it (the job with its
queued commands and their audit entries; sent, acked and succeeded with theirs, in slices of
500; the finished job), an output chunk per command, and a session per agent (connected,
closed). Times are the simulated day's; the clock is what the store is given.

Heartbeat samples (one per agent per ``heartbeat_sample_interval``, kept ``heartbeat_retention``)
would be 27 million rows a day at 19,000 agents: one simulated hour of them is written and
the bytes per sample scaled to what the retention keeps.

Figures: bytes per agent per day of each kind (the growth of each table, from ``dbstat``),
the size the store settles at with the default retention (each kind's daily bytes times the
days it is kept), and the longest event-loop stall while one day's pruning runs (every kind's
oldest day at once: a heavier pruning than any real day's), with the pages the file gives back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hub.model import AgentRecord, CommandRecord, JobRecord
from hub.store.base import AuditEntry
from hub.store.maintenance import stats
from hub.store.retention import DAY, Retention
from hub.store.sqlite import SQLiteStore

ACTOR = "admin:bench"
HUB = "hub-bench"
SLICE = 500
#: What the hub stores for a command's output when a command prints a line or two.
OUTPUT = "load average: 0.42, 0.37, 0.31\n" * 4


def _entry(ts: float, action: str, subject: str, **detail: Any) -> AuditEntry:
    return AuditEntry(ts=ts, action=action, actor=ACTOR, subject=subject, detail=detail or None,
                      hub_id=HUB)  # fmt: skip


async def one_day(store: SQLiteStore, agents: list[str], start: float, seq: int) -> int:
    """One job to every agent, as the ledger writes it, and a session each."""
    job_id = secrets.token_hex(8)
    total = len(agents)
    job = JobRecord(
        job_id=job_id, name="exec", args={"argv": ["uptime"]}, target={"selector": {}},
        total=total, created_at=start, timeout=60.0, ttl=600.0, dispatched_by=ACTOR,
        counts={"queued": total}, updated_at=start,
        spec={"max_concurrency": None, "max_errors": None, "refused": 0},
    )  # fmt: skip
    commands = []
    audit = [_entry(start, "job.dispatch", job_id, name="exec", targets=total, refused=0)]
    for agent_id in agents:
        seq += 1
        command = CommandRecord(
            command_id=secrets.token_hex(12), job_id=job_id, agent_id=agent_id, name="exec",
            args={"argv": ["uptime"]}, timeout=60.0, issued_at=start,
            expires_at=start + 600.0, seq=seq, updated_at=start, dispatched_by=ACTOR,
        )  # fmt: skip
        commands.append(command)
        audit.append(_entry(start, "command.queued", command.command_id, agent_id=agent_id))
    await store.add_job(job, commands, audit)
    for state in ("sent", "acked", "succeeded"):
        at = start + {"sent": 0.01, "acked": 0.02, "succeeded": 0.5}[state]
        for first in range(0, total, SLICE):
            part = commands[first : first + SLICE]
            entries = []
            for command in part:
                command.state, command.updated_at = state, at
                if state == "sent":
                    command.sent_at = at
                elif state == "acked":
                    command.acked_at = at
                else:
                    command.result = {"status": "succeeded", "exit_code": 0, "data": None,
                                      "error": None}  # fmt: skip
                    command.output_bytes = len(OUTPUT)
                    store.add_output(command.command_id, 1, "stdout", OUTPUT)
                detail = {"agent_id": command.agent_id, "job_id": job_id}
                entries.append(_entry(at, f"command.{state}", command.command_id, **detail))
            await store.save_commands(part, entries)
    job.state, job.updated_at, job.counts = "succeeded", start + 1.0, {"succeeded": total}
    await store.save_commands(
        [], [_entry(start + 1.0, "job.finished", job_id, state="succeeded")], [job]
    )
    for agent_id in agents:
        session = f"{agent_id}-{int(start)}"
        store.open_session(session, agent_id, HUB, "10.0.0.1:40000", None, start + 2.0)
        store.close_session(session, start + 3.0, 1001, "going away")
    await store.flush()
    return seq


def _bytes(data_dir: Path) -> dict[str, int]:
    return {kind: figures["bytes"] for kind, figures in stats(data_dir)["kinds"].items()}


async def _watch(stop: asyncio.Event, lags: list[float]) -> None:
    """The event loop's stalls: how late each 1 ms sleep wakes."""
    while not stop.is_set():
        began = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append(time.perf_counter() - began - 0.001)


def _stalls(lags: list[float]) -> dict[str, float]:
    ordered = sorted(lags) or [0.0]
    return {
        "longest_ms": round(ordered[-1] * 1000, 2),
        "p99_ms": round(ordered[int(len(ordered) * 0.99)] * 1000, 2),
        "over_20ms": sum(1 for lag in ordered if lag > 0.020),
        "over_10ms": sum(1 for lag in ordered if lag > 0.010),
    }


async def _idle(seconds: float) -> dict[str, float]:
    """The same watch over a loop with nothing to do: the machine's own noise (other
    processes on its cores), to read the pruning's figure against."""
    stop, lags = asyncio.Event(), []
    watcher = asyncio.ensure_future(_watch(stop, lags))
    await asyncio.sleep(seconds)
    stop.set()
    await watcher
    return _stalls(lags)


async def lifecycle(directory: Path, agents: int, days: int, sample_hours: float) -> dict[str, Any]:
    data_dir = directory / "store"
    names = [f"agent-{n:05d}" for n in range(agents)]
    retention = Retention()
    t0 = 1_800_000_000.0
    store = SQLiteStore(data_dir, synchronous="normal")
    await store.open()
    for name in names:
        store.save_agent(AgentRecord(agent_id=name, platform="linux", region="eu-central",
                                     capabilities=["exec", "ping"], first_seen=t0))  # fmt: skip
    await store.flush()
    before = _bytes(data_dir)
    seq = 0
    generate = time.perf_counter()
    for day in range(days):
        seq = await one_day(store, names, t0 + day * DAY, seq)
    generate = time.perf_counter() - generate
    await store.checkpoint()
    after = _bytes(data_dir)
    per_day = {kind: (after[kind] - before[kind]) / days for kind in after}
    # Heartbeat samples: one simulated hour (or the given fraction of one).
    samples_before = _bytes(data_dir)["heartbeats"]
    minutes = max(1, int(sample_hours * 60))
    records = [AgentRecord(agent_id=name, status="ok", metrics={"cpu": 12.5, "mem": 41.0})
               for name in names]  # fmt: skip
    for minute in range(minutes):
        for record in records:
            record.last_seen = t0 + minute * 60.0
        store.save_heartbeats(records, samples=True)
        await store.flush()  # the rows are made in the writer from the records as they are
    await store.close()
    sample_bytes = (_bytes(data_dir)["heartbeats"] - samples_before) / (minutes * agents)
    kept_days = {
        "outputs": retention.outputs / DAY,
        "commands": retention.commands / DAY,
        "jobs": retention.commands / DAY,
        "sessions": retention.sessions / DAY,
        "audit": retention.audit / DAY,
    }
    steady = {kind: per_day[kind] * kept_days.get(kind, 0) for kind in per_day}
    steady["heartbeats"] = sample_bytes * agents * (retention.heartbeats / 60.0)
    steady["agents"] = after["agents"]

    # One day's pruning, every kind's oldest day at once, on a durable store (one fsync per
    # step), while the event loop is watched.
    store = SQLiteStore(data_dir, synchronous="full")
    await store.open()
    await store.checkpoint()
    size_before = (data_dir / "tether.db").stat().st_size
    pages_before = stats(data_dir)["pages"]
    # The oldest day of every kind is past its retention, the next day is not; the samples
    # (one hour's, what one hourly pruning deletes at steady state) all are. One kind after
    # the other, as one pruning runs them, each watched on its own (the last call, with every
    # kind kept, is the vacuum alone: each call vacuums what it freed).
    now = t0 + retention.audit + 0.5 * DAY
    keep = retention.audit
    pruned: dict[str, int] = {}
    by_kind: dict[str, dict[str, float]] = {}
    lags: list[float] = []
    began = time.perf_counter()
    for kind in ("outputs", "commands", "sessions", "audit", "heartbeats", "vacuum"):
        only = Retention(outputs=0, commands=0, sessions=0, alerts=0, audit=0, heartbeats=0)
        if kind != "vacuum":
            only = replace(only, **{kind: keep})
        stop, kind_lags = asyncio.Event(), []
        watcher = asyncio.ensure_future(_watch(stop, kind_lags))
        started = time.perf_counter()
        pruned.update(await store.prune_expired(only, now, export=directory / "audit.jsonl"))
        stop.set()
        await watcher
        by_kind[kind] = {**_stalls(kind_lags), "seconds": round(time.perf_counter() - started, 2)}
        lags += kind_lags
    prune_seconds = time.perf_counter() - began
    idle = await _idle(min(prune_seconds, 20.0))
    await store.checkpoint()
    await store.close()
    after_prune = stats(data_dir)
    return {
        "agents": agents,
        "days": days,
        "generate_s": round(generate, 1),
        "bytes_per_agent_per_day": {k: round(v / agents, 1) for k, v in per_day.items() if v},
        "heartbeat_sample_bytes": round(sample_bytes, 1),
        "steady_state_bytes": {k: int(v) for k, v in steady.items() if v},
        "steady_state_total_bytes": int(sum(steady.values())),
        "steady_state_bytes_per_agent": int(sum(steady.values()) / agents),
        "prune": {
            "rows": pruned,
            "seconds": round(prune_seconds, 2),
            "stalls": _stalls(lags),
            "by_kind": by_kind,
            "idle_loop_stalls": idle,
            "file_bytes_before": size_before,
            "file_bytes_after": after_prune["file_bytes"],
            "pages_before": pages_before,
            "pages_after": after_prune["pages"],
        },
        "load": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=19_000)
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--sample-hours", type=float, default=1.0,
                        help="heartbeat samples written, in simulated hours")  # fmt: skip
    parser.add_argument("--dir", type=Path, help="work here (default: a temporary directory)")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="tether-lifecycle-", dir=args.dir))
    try:
        result = asyncio.run(lifecycle(directory, args.agents, args.days, args.sample_hours))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
