"""The two store writes a command round trip waits for, timed on their own.

    .venv/bin/python bench/store_commits.py            # FULL and NORMAL, 500 round trips each

A round trip holds two durable commits: the job with its ``queued`` command (before delivery)
and the result with its transitions and the finished job (before it is announced). Timed here
through the real :class:`SQLiteStore` (its writer thread, the hand-offs to and from the event
loop) on a ledger already holding finished round trips, with no hub and no network, they say
how close to the floor any hub on this store and this disk can get.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hub.model import CommandRecord, JobRecord
from hub.store.base import AuditEntry
from hub.store.sqlite import SQLiteStore

ACTOR = "admin:bench"


def _round_trip(seq: int) -> tuple[JobRecord, CommandRecord, list[AuditEntry]]:
    """A job of one ``exec`` as the ledger makes it, with the audit of its dispatch."""
    now = time.time()
    job_id = secrets.token_hex(8)
    job = JobRecord(
        job_id=job_id,
        name="exec",
        args={"argv": ["uptime"]},
        target={"agents": [f"agent-{seq % 1000:05d}"]},
        total=1,
        created_at=now,
        timeout=60.0,
        ttl=600.0,
        dispatched_by=ACTOR,
        counts={"queued": 1},
        updated_at=now,
        spec={"max_concurrency": None, "max_errors": None, "refused": 0},
    )
    command = CommandRecord(
        command_id=secrets.token_hex(12),
        job_id=job_id,
        agent_id=f"agent-{seq % 1000:05d}",
        name="exec",
        args={"argv": ["uptime"]},
        timeout=60.0,
        issued_at=now,
        expires_at=now + 600.0,
        seq=seq,
        updated_at=now,
        dispatched_by=ACTOR,
    )
    entries = [
        AuditEntry(now, "admin.dispatch", ACTOR, job_id, "127.0.0.1", {"name": "exec"}),
        AuditEntry(now, "job.dispatch", ACTOR, job_id, None, {"targets": 1, "refused": 0}),
        AuditEntry(now, "command.queued", ACTOR, command.command_id, None, {"agent_id": "a"}),
    ]
    return job, command, entries


def _finished(job: JobRecord, command: CommandRecord) -> list[AuditEntry]:
    """Mark the round trip done as the ledger does; the audit entries of its result's commit."""
    now = time.time()
    command.state = "succeeded"
    command.sent_at = command.acked_at = command.updated_at = now
    command.result = {"status": "succeeded", "exit_code": 0, "data": {}, "error": None}
    job.state = "succeeded"
    job.counts = {"succeeded": 1}
    job.updated_at = now
    detail = {"agent_id": command.agent_id, "job_id": job.job_id}
    return [
        *(
            AuditEntry(now, f"command.{state}", ACTOR, command.command_id, None, detail)
            for state in ("sent", "acked", "succeeded")
        ),
        AuditEntry(now, "job.finished", None, job.job_id, None, {"state": "succeeded"}),
    ]


async def _measure(directory: Path, synchronous: str, prefill: int, samples: int) -> dict:
    store = SQLiteStore(directory, synchronous=synchronous)
    await store.open()
    try:
        # A ledger with history: B-trees of realistic depth, pages not all in one leaf.
        for start in range(0, prefill, 1_000):
            writes = []
            for seq in range(start, min(prefill, start + 1_000)):
                job, command, entries = _round_trip(seq)
                writes.append(store.add_job(job, [command], entries))
                writes.append(store.save_commands([command], _finished(job, command), [job]))
            await asyncio.gather(*writes)
        await store.checkpoint()
        queued, result = [], []
        for seq in range(prefill, prefill + samples):
            job, command, entries = _round_trip(seq)
            started = time.perf_counter()
            await store.add_job(job, [command], entries)
            stored = time.perf_counter()
            await store.save_commands([command], _finished(job, command), [job])
            queued.append(stored - started)
            result.append(time.perf_counter() - stored)
            if seq % 200 == 0:
                await store.checkpoint()  # as the hub does every second
    finally:
        await store.close()
    return {
        "queued_us": round(statistics.median(queued) * 1e6, 1),
        "result_us": round(statistics.median(result) * 1e6, 1),
        "both_us": round(
            statistics.median([q + r for q, r in zip(queued, result, strict=True)]) * 1e6, 1
        ),
    }


def store_commits(workdir: Path, prefill: int = 20_000, samples: int = 500) -> dict[str, dict]:
    """Median µs of each commit, per ``synchronous`` setting, on a store under ``workdir``."""
    try:
        import uvloop  # the hub's loop when it is installed

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    figures = {}
    for synchronous in ("full", "normal"):
        directory = Path(tempfile.mkdtemp(prefix=f"commits-{synchronous}-", dir=workdir))
        try:
            figures[synchronous] = runner(_measure(directory, synchronous, prefill, samples))
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill", type=int, default=20_000, help="finished round trips first")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--dir", type=Path, default=None, help="where the store goes (a disk)")
    args = parser.parse_args()
    workdir = args.dir or Path(tempfile.gettempdir())
    for synchronous, figures in store_commits(workdir, args.prefill, args.samples).items():
        print(
            f"{synchronous:6}: queued {figures['queued_us']:7.1f} µs, result "
            f"{figures['result_us']:7.1f} µs, both {figures['both_us']:7.1f} µs (medians)"
        )


if __name__ == "__main__":
    main()
