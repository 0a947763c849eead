"""Re-enrollment at scale (issue 20): what a fleet of stateless agents costs the hub.

(a) ``--part cost``: 20,000 agents register with an enrollment key, then re-enroll (come back
    with the enrollment key, as an agent without a state dir does) twice. The hub's CPU per
    agent is printed per thousand, so that a cost growing with the number of agents or
    credentials shows as a slope (each re-enrollment round also leaves 20,000 replaced keys
    behind). Agents close after their welcome: the figure is the registration's, not idle
    connections'.

(b) ``--part storm``: 19,000 agents registered, the server ``kill -9``ed and restarted at
    once on the same port, every agent coming back on its own with the agent's backoff
    (full jitter, capped at 5 s, ``Retry-After`` honoured, 10 s to open): the floor
    (bench/floor.py), then the hub with the agents presenting (i) the agent key it issued
    them and (ii) the enrollment key again. Printed: seconds until everyone is back, the
    server's CPU per re-registration, upgrades that timed out, refusals, and whether the hub
    met the target (within 1.5x the floor's time).

    flock -x /work/coord/bench-lock .venv/bin/python bench/reenroll.py --part cost
    flock -x /work/coord/bench-lock .venv/bin/python bench/reenroll.py --part storm

The load runs in processes of its own (``bench/reenroll.py load …``), lean clients
(bench/lean.py) at most ``PER_PROCESS`` per process, each from its own loopback addresses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.blaster import Quiet, open_one
from bench.harness import (
    PER_PROCESS,
    PYTHON,
    ROOT,
    Floor,
    Hub,
    Proc,
    running,
    sources,
    wait_until,
)
from bench.lean import LeanClient, Refused, upgrade_request
from hub.protocol.backoff import Backoff, Hint
from hub.protocol.constants import AGENT_SUBPROTOCOL

#: The agent's own defaults where the issue's storm set them: open timeout, backoff cap.
OPEN_TIMEOUT = 10.0
BACKOFF_CAP = 5.0
#: The issue's target: everyone back within this multiple of the floor's time.
TARGET = 1.5
CHUNK = 1_000


# -- (a) the cost of a registration, per thousand ------------------------------------------


async def register_chunk(url: str, token: str, ids: list[str], concurrency: int) -> int:
    """Register ``ids`` (``concurrency`` in flight), close each after its welcome; 503s
    retried as an agent would (after Retry-After). Returns the refusals."""
    semaphore = asyncio.Semaphore(concurrency)
    refused = 0

    async def one(agent_id: str) -> None:
        nonlocal refused
        for _attempt in range(50):
            async with semaphore:
                try:
                    conn: Quiet = await open_one(url, token, agent_id)
                    await asyncio.wait_for(conn.welcomed, 60)
                    conn.close()
                    return
                except Refused as exc:
                    if exc.status != 503:
                        raise
                    refused += 1
                    wait = exc.retry_after or 1.0
            await asyncio.sleep(wait + random.uniform(0, 1))
        raise ConnectionError(f"{agent_id}: refused 50 times")

    await asyncio.gather(*(one(agent_id) for agent_id in ids))
    return refused


async def cost_load(args: argparse.Namespace) -> None:
    """Rounds of ``--count`` registrations in chunks of a thousand, the hub's CPU (user +
    system, its threads included) read around each chunk."""
    hub = psutil.Process(args.hub_pid)

    def cpu() -> float:
        times = hub.cpu_times()
        return times.user + times.system

    ids = [f"{args.prefix}{n:05d}" for n in range(args.count)]
    for round_ in range(args.rounds):
        per_chunk = []
        refused = 0
        for start in range(0, args.count, CHUNK):
            before, began = cpu(), time.monotonic()
            refused += await register_chunk(
                args.url, args.token, ids[start : start + CHUNK], args.concurrency
            )
            per_chunk.append(
                {
                    "cpu_ms_per_agent": (cpu() - before) * 1000 / CHUNK,
                    "wall_s": time.monotonic() - began,
                }
            )
        line = {"round": round_, "refused": refused, "chunks": per_chunk}
        print(orjson.dumps(line).decode(), flush=True)
        await asyncio.sleep(1.0)  # the last closes handled before the next round


def part_cost(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    hub = Hub(workdir, name="cost")
    (workdir / "cost.toml").write_text('[hub]\nlog_level = "WARNING"\nmax_agents = 100000\n')
    hub.start()
    assert hub.proc is not None
    token = hub.token("--enroll")
    load = Proc(
        "cost-load",
        [PYTHON, str(Path(__file__)), "cost-load", "--url", hub.url, "--token", token,
         "--count", str(args.count), "--rounds", str(args.rounds), "--hub-pid",
         str(hub.proc.pid), "--prefix", "c-", "--concurrency", "200"],
        workdir / "cost-load.log",
    ).start()  # fmt: skip
    results: dict[str, Any] = {"count": args.count, "rounds": []}
    with running(hub, load):
        assert load.process is not None
        load.process.wait(timeout=args.timeout)
        lines = [
            json.loads(line)
            for line in load.log.read_text().splitlines()
            if line.startswith('{"round"')
        ]
        if len(lines) < args.rounds:
            raise RuntimeError(f"load failed: {load.log.read_text()[-2000:]}")
        for line in lines:
            chunks = [c["cpu_ms_per_agent"] for c in line["chunks"]]
            label = "first registration" if line["round"] == 0 else f"re-enroll {line['round']}"
            first, last = chunks[0], chunks[-1]
            middle = sorted(chunks)[len(chunks) // 2]
            results["rounds"].append(
                {
                    "round": label,
                    "cpu_ms_per_agent_by_thousand": [round(c, 3) for c in chunks],
                    "first_thousand": round(first, 3),
                    "median": round(middle, 3),
                    "last_thousand": round(last, 3),
                    "last_over_first": round(last / first, 2),
                    "refused": line["refused"],
                    "seconds": round(sum(c["wall_s"] for c in line["chunks"]), 1),
                }
            )
            print(
                f"{label}: hub CPU ms per agent, by thousand: "
                + " ".join(f"{c:.2f}" for c in chunks)
                + f"  (last/first {last / first:.2f}, refused {line['refused']})",
                flush=True,
            )
        results["hub_rss_mb"] = round(hub.proc.rss() / 2**20, 1)
    return results


# -- (b) the kill -9 storm ----------------------------------------------------------------


class StormAgent(LeanClient):
    """An agent's connection: registers once open, keeps the key a welcome carries."""

    def __init__(self, request: bytes, register: bytes, agent: Agent) -> None:
        super().__init__(request)
        self.register = register
        self.agent = agent
        self.welcomed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        was = self.upgraded
        super().data_received(data)
        if self.upgraded and not was:
            self.send_text(self.register)

    def on_message(self, data: bytes) -> None:
        if not self.welcomed.done() and data.startswith(b'{"type":"welcome"'):
            key = orjson.loads(data).get("agent_key")
            if key:
                self.agent.issued = key
            self.welcomed.set_result(None)

    def on_close(self, reason: str) -> None:
        if not self.welcomed.done():
            self.welcomed.set_exception(ConnectionError(reason))


class Agent:
    __slots__ = ("agent_id", "issued", "source")

    def __init__(self, agent_id: str, source: str) -> None:
        self.agent_id = agent_id
        self.source = source
        self.issued: str | None = None


class Storm:
    """One load process's agents and its counters, written to a status file."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        parts = urlsplit(args.url)
        self.host, self.port = parts.hostname, parts.port
        addresses = args.source
        self.agents = [
            Agent(f"{args.prefix}{n:05d}", addresses[n % len(addresses)]) for n in range(args.count)
        ]
        self.online = 0
        self.full_at: float | None = None
        self.counts: dict[str, int] = {}
        self.initial = asyncio.Semaphore(200)
        self.settled = False

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def token(self, agent: Agent) -> str:
        if self.args.mode == "key" and agent.issued is not None:
            return agent.issued
        return self.args.token

    async def attempt(self, agent: Agent) -> tuple[StormAgent | None, Hint | None]:
        request = upgrade_request(
            self.args.url,
            "/ws",
            [("Sec-WebSocket-Protocol", AGENT_SUBPROTOCOL),
             ("Authorization", f"Bearer {self.token(agent)}")],
        )  # fmt: skip
        register = orjson.dumps(
            {"type": "register", "agent_id": agent.agent_id, "platform": "linux",
             "region": "bench", "capabilities": ["ping"]}
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        self.count("attempts")
        conn: StormAgent | None = None
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                _, conn = await loop.create_connection(
                    lambda: StormAgent(request, register, agent),
                    self.host,
                    self.port,
                    local_addr=(agent.source, 0),
                )
                await conn.opened
        except TimeoutError:
            self.count("timed_out")
            if conn is not None:
                conn.close()
            return None, None
        except Refused as exc:
            self.count(f"refused_{exc.status}")
            return None, Hint(retry_after=exc.retry_after)
        except ConnectionRefusedError:
            self.count("tcp_refused")
            return None, Hint(refused=True)
        except OSError:
            self.count("tcp_error")
            return None, None
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                await conn.welcomed
        except (TimeoutError, ConnectionError) as exc:
            self.count("no_welcome_" + type(exc).__name__)
            conn.close()
            return None, None
        return conn, None

    async def live(self, agent: Agent) -> None:
        backoff = Backoff(cap=BACKOFF_CAP)
        first = True
        while True:
            if first:
                async with self.initial:
                    conn, hint = await self.attempt(agent)
            else:
                conn, hint = await self.attempt(agent)
            if conn is not None:
                first = False
                backoff.registered()
                self.online += 1
                if self.online == len(self.agents):
                    self.full_at = time.time()
                await conn.closed
                self.online -= 1
                hint = None
            await asyncio.sleep(backoff.next_delay(hint))

    def write_status(self) -> None:
        status = {"online": self.online, "full_at": self.full_at, **self.counts}
        path = Path(self.args.status)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(status))
        os.replace(tmp, path)

    async def run(self) -> None:
        tasks = [asyncio.ensure_future(self.live(agent)) for agent in self.agents]
        try:
            while True:
                self.write_status()
                await asyncio.sleep(0.25)
        finally:
            for task in tasks:
                task.cancel()


class LoadSet:
    """The storm's load processes, read through their status files."""

    def __init__(self, workdir: Path, url: str, token: str, count: int, mode: str, tag: str):
        self.procs: list[Proc] = []
        self.status: list[Path] = []
        start = 0
        index = 0
        while start < count:
            n = min(PER_PROCESS, count - start)
            status = workdir / f"{tag}{index}.status"
            status.unlink(missing_ok=True)
            self.status.append(status)
            self.procs.append(
                Proc(
                    f"{tag}{index}",
                    [PYTHON, str(Path(__file__)), "storm-load", "--url", url, "--token", token,
                     "--count", str(n), "--prefix", f"{tag}{index}-", "--mode", mode,
                     "--status", str(status), "--source", *sources(index)],
                    workdir / f"{tag}{index}.log",
                ).start()
            )  # fmt: skip
            start += n
            index += 1

    def read(self) -> list[dict[str, Any]]:
        out = []
        for path in self.status:
            try:
                out.append(json.loads(path.read_bytes()))
            except (OSError, ValueError):
                out.append({"online": 0})
        return out

    def online(self) -> int:
        return sum(s["online"] for s in self.read())

    def totals(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for status in self.read():
            for key, value in status.items():
                if isinstance(value, int) and key != "online":
                    total[key] = total.get(key, 0) + value
        return total

    def back_since(self, since: float) -> float | None:
        """Seconds from ``since`` until every process had all its agents back, or None."""
        statuses = self.read()
        if any(s.get("full_at") is None or s["full_at"] <= since for s in statuses):
            return None
        return max(s["full_at"] for s in statuses) - since

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()


def listen_drops() -> int:
    """The kernel's ``ListenDrops`` (TcpExt, /proc/net/netstat): connections dropped at a
    full accept queue, which no server sees (machine-wide: read under the bench lock)."""
    lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()]
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names[0] == "TcpExt:":
            return int(values[names.index("ListenDrops")])
    return 0


def storm(server: Hub | Floor, workdir: Path, token: str, count: int, mode: str, tag: str,
          timeout: float) -> dict[str, Any]:  # fmt: skip
    """Connect ``count`` agents, kill -9 the server, restart it, wait until all are back."""
    load = LoadSet(workdir, server.url, token, count, mode, tag)
    try:
        connect = wait_until(lambda: load.online() >= count, timeout=count / 100 + 60,
                             interval=0.5, what=f"{tag}: {count} online")  # fmt: skip
        time.sleep(3.0)  # every welcome's writes committed (an issued key is durable first)
        before = load.totals()
        drops = listen_drops()
        assert server.proc is not None and server.proc.process is not None
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.process.wait()
        killed = time.time()
        try:
            server.start()  # returns once /readyz answers...
        except TimeoutError:
            pass  # ...which a probe queued behind a storm may not get in 30 s: go on
        listening = time.time() - killed
        cpu_ready = server.proc.cpu()
        try:
            wait_until(lambda: load.back_since(killed) is not None, timeout=timeout,
                       interval=0.25, what=f"{tag}: all back")  # fmt: skip
            back = load.back_since(killed)
        except TimeoutError:
            back = None
        cpu = server.proc.cpu()
        drops = listen_drops() - drops
        after = load.totals()
        online = load.online()
    finally:
        load.stop()
    diff = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    result = {
        "agents": count,
        "connect_seconds": round(connect, 1),
        "restart_listening_seconds": round(listening, 2),
        "all_back_seconds": round(back, 2) if back is not None else None,
        "back_at_end": online,
        "server_cpu_seconds": round(cpu, 2),
        "server_cpu_seconds_until_ready": round(cpu_ready, 2),
        "cpu_ms_per_reregistration": round(cpu * 1000 / max(1, online), 3),
        "attempts": diff.get("attempts", 0),
        "timed_out": diff.get("timed_out", 0),
        "refusals": {k: v for k, v in diff.items() if k.startswith(("refused", "no_welcome"))},
        "tcp_refused": diff.get("tcp_refused", 0),
        "tcp_errors": diff.get("tcp_error", 0),
        "kernel_listen_drops": drops,
    }
    print(f"{tag}: {json.dumps(result)}", flush=True)
    return result


def part_storm(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    count = args.storm
    results: dict[str, Any] = {"agents": count}
    floor = Floor(workdir)
    floor.start()
    with running(floor):
        results["floor"] = storm(floor, workdir, "x", count, "enroll", "f", args.storm_timeout)
    for mode in args.modes:
        hub = Hub(workdir, name=f"storm-{mode}")
        (workdir / f"storm-{mode}.toml").write_text(
            '[hub]\nlog_level = "WARNING"\nmax_agents = 100000\n'
        )
        hub.start()
        token = hub.token("--enroll")
        with running(hub):
            results[f"hub_{mode}"] = storm(
                hub, workdir, token, count, mode, f"h{mode[0]}", args.storm_timeout
            )
            metrics: dict[str, float] = {}

            def scraped(hub: Hub = hub, metrics: dict[str, float] = metrics) -> bool:
                metrics.update(hub.metrics())  # raises (and is asked again) while refusing
                return True

            try:
                wait_until(scraped, timeout=30, what="metrics")
            except TimeoutError:
                pass
            results[f"hub_{mode}"]["hub_refusals"] = {
                name.split('"')[1]: int(value)
                for name, value in metrics.items()
                if name.startswith("tether_connections_total") and "accepted" not in name
            }
    floor_back = results["floor"]["all_back_seconds"]
    for mode in args.modes:
        hub_back = results[f"hub_{mode}"]["all_back_seconds"]
        met = hub_back is not None and floor_back is not None and hub_back <= TARGET * floor_back
        results[f"hub_{mode}"]["target_met"] = met
        print(
            f"storm of {count}, {'agent key' if mode == 'key' else 'enrollment key'}: "
            f"hub {hub_back} s vs floor {floor_back} s "
            f"(target <= {TARGET}x: {'met' if met else 'NOT met'}); "
            f"hub CPU {results[f'hub_{mode}']['cpu_ms_per_reregistration']} ms per "
            f"re-registration vs floor {results['floor']['cpu_ms_per_reregistration']}; "
            f"timed out: hub {results[f'hub_{mode}']['timed_out']}, "
            f"floor {results['floor']['timed_out']}",
            flush=True,
        )
    return results


# -- entry points ---------------------------------------------------------------------------


def _raise_file_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    cost = sub.add_parser("cost-load")
    cost.add_argument("--url", required=True)
    cost.add_argument("--token", required=True)
    cost.add_argument("--count", type=int, required=True)
    cost.add_argument("--rounds", type=int, default=3)
    cost.add_argument("--hub-pid", type=int, required=True)
    cost.add_argument("--prefix", default="c-")
    cost.add_argument("--concurrency", type=int, default=200)
    load = sub.add_parser("storm-load")
    load.add_argument("--url", required=True)
    load.add_argument("--token", required=True)
    load.add_argument("--count", type=int, required=True)
    load.add_argument("--prefix", required=True)
    load.add_argument("--mode", choices=["key", "enroll"], required=True)
    load.add_argument("--status", required=True)
    load.add_argument("--source", nargs="+", default=["127.0.0.1"])
    parser.add_argument("--part", choices=["cost", "storm", "all"], default="all")
    parser.add_argument("--count", type=int, default=20_000, help="agents of the cost part")
    parser.add_argument("--rounds", type=int, default=3, help="registration + re-enrollments")
    parser.add_argument("--storm", type=int, default=19_000, help="agents of the storm part")
    parser.add_argument("--modes", nargs="+", default=["key", "enroll"])
    parser.add_argument("--storm-timeout", type=float, default=120.0)
    parser.add_argument("--timeout", type=float, default=280.0)
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    _raise_file_limit()
    if args.command in ("cost-load", "storm-load"):
        import uvloop

        if args.command == "cost-load":
            uvloop.run(cost_load(args))
        else:
            uvloop.run(Storm(args).run())
        return
    started = time.time()
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "load_before": os.getloadavg(),
        "commit": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip(),
    }
    with tempfile.TemporaryDirectory(prefix="reenroll-") as tmp:
        workdir = Path(tmp)
        if args.part in ("cost", "all"):
            results["cost"] = part_cost(args, workdir)
        if args.part in ("storm", "all"):
            results["storm"] = part_storm(args, workdir)
    results["load_after"] = os.getloadavg()
    results["seconds"] = round(time.time() - started, 1)
    print(json.dumps(results, indent=1), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
