"""Tether's benchmarks: every figure of the scale budget, beside the raw websockets floor.

    .venv/bin/python bench/run.py            # the full run (about 25 minutes)
    .venv/bin/python bench/run.py --quick    # smaller counts and a 60 s hold (about 8 min)
    .venv/bin/python bench/run.py --only memory,rtt
    .venv/bin/python bench/run.py --only flood   # a half-open flood; not in the full run

The hub runs as its own process (`tether-hub serve`, uvloop), the load in other processes
(`bench/leanfleet.py`: lean raw-socket agents, two processes or more, the same for the hub
and the floor; `bench/blaster.py` for heartbeat throughput), and the floor — a bare
`websockets` server answering the same clients (`bench/floor.py`) — runs in the same
session, so every figure is also a ratio to the floor, and the clients' own CPU is recorded
(`clients.*`) to show they did not set the pace. Each of issue 16's targets is printed as
met or not at the end. Results go to bench/out/results.json and bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import psutil
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.flood import scenario as flood
from bench.harness import (
    ROOT,
    Floor,
    Hub,
    LeanFleet,
    Proc,
    percentile,
    run,
    wait_until,
)
from bench.store_commits import store_commits
from hub.protocol.client import AdminClient

OUT = ROOT / "bench" / "results"
RESULTS = ROOT / "bench" / "RESULTS.md"


FULL = "memory,registrations,latency,throughput,hold"


class FellShort(Exception):
    """Not every agent came online in time; the figure is what did."""

    def __init__(self, online: int, seconds: float, procs: list[Proc]) -> None:
        super().__init__(f"{online} agents online after {seconds:.0f} s")
        self.online = online
        self.seconds = seconds
        self.procs = procs


class Bench:
    def __init__(self, quick: bool, workdir: Path) -> None:
        self.quick = quick
        self.workdir = workdir
        self.results: dict[str, Any] = {}
        #: Every process a scenario started, stopped after it whatever happened.
        self.started: list[Proc] = []
        self.hold_agents = 0
        self.hold_seconds = 0
        #: Agent counts for memory, registrations and latency instead of the defaults, and
        #: the storm's size (0: no storm): a full run split into runs of a few minutes.
        self.counts: list[int] = []
        self.storm_agents: int | None = None

    def note(self, key: str, value: Any) -> None:
        self.results[key] = value
        print(f"  {key}: {value}", flush=True)

    # -- helpers ----------------------------------------------------------------------

    def fresh_hub(self, name: str, config: str = "") -> Hub:
        hub = Hub(self.workdir, name=name)
        (self.workdir / f"{name}.toml").write_text(
            '[hub]\nlog_level = "WARNING"\nmax_agents = 100000\n' + config
        )
        hub.start()
        assert hub.proc is not None
        self.started.append(hub.proc)
        return hub

    def floor(self) -> Floor:
        floor = Floor(self.workdir).start()
        assert floor.proc is not None
        self.started.append(floor.proc)
        return floor

    def connect_fleet(
        self, server: Hub | Floor, count: int, tag: str, token: str = "x", rate: float = 1000
    ) -> tuple[LeanFleet, float]:
        """``count`` lean agents (bench/leanfleet.py, two processes or more) at ``rate``/s,
        until the server counts them all online."""
        fleet = LeanFleet(self.workdir, server.url, token, count, tag, rate=rate).start()
        self.started.extend(fleet.procs)
        started = time.monotonic()
        try:
            seconds = wait_until(
                lambda: fleet.online() >= count and server.online() >= count,
                timeout=count / rate + 60, interval=0.2, what=f"{count} agents online",
            )  # fmt: skip
        except TimeoutError:
            online = server.online()
            self.note(f"{type(server).__name__.lower()}.fell_short.{tag}", f"{online}/{count}")
            raise FellShort(online, time.monotonic() - started, fleet.procs) from None
        return fleet, seconds

    def server(self, kind: str, name: str, config: str = "") -> tuple[Hub | Floor, str]:
        """A fresh hub (and an enrollment key) or a floor (which takes any token)."""
        if kind.startswith("hub"):
            hub = self.fresh_hub(name, config)
            return hub, hub.token("--enroll")
        return self.floor(), "x"

    def clients(self, key: str, cpu_seconds: float, wall: float, count: int) -> None:
        """What the load cost: its CPU as a share of one core, and per agent served."""
        self.note(f"clients.cpu_share.{key}", round(cpu_seconds / wall, 3) if wall else None)
        self.note(f"clients.cpu_ms_per_agent.{key}", round(cpu_seconds * 1000 / count, 3))

    # -- memory and idle CPU ----------------------------------------------------------

    def memory(self) -> None:
        counts = self.counts or ([1_000, 5_000] if self.quick else [1_000, 5_000, 10_000, 19_000])
        for kind in ("floor", "hub"):
            for count in counts:
                print(f"memory: {kind} with {count} agents", flush=True)
                server, token = self.server(kind, f"mem{count}")
                assert server.proc is not None
                time.sleep(2)
                baseline = server.proc.rss()
                fleet, _ = self.connect_fleet(server, count, f"m{count}", token)
                time.sleep(20)  # a heartbeat round, then measure
                cpu0, t0, clients0 = server.proc.cpu(), time.monotonic(), fleet.cpu()
                time.sleep(15)
                wall = time.monotonic() - t0
                cpu = (server.proc.cpu() - cpu0) / wall
                per_agent = (server.proc.rss() - baseline) / count
                self.note(f"{kind}.memory_per_agent_kb.{count}", round(per_agent / 1024, 2))
                self.note(f"{kind}.idle_cpu_share.{count}", round(cpu, 4))
                self.clients(f"idle.{kind}.{count}", fleet.cpu() - clients0, wall, count)
                if isinstance(server, Hub):
                    metrics = server.metrics()
                    self.note(
                        f"hub.lag_max_ms.{count}",
                        round(metrics.get("tether_event_loop_lag_max_seconds", 0) * 1000, 1),
                    )
                else:
                    self.note(
                        f"floor.lag_max_ms.{count}", round(server.stats()["lag_max"] * 1000, 1)
                    )
                fleet.stop()
                server.proc.stop()

    # -- registrations and the reconnect storm ------------------------------------------

    def registrations(self) -> None:
        """Handshake + credential + register → welcome, by lean clients in two processes
        or more (bench/leanfleet.py, 200 handshakes in flight each): first with an
        enrollment key (the hub issues a key: one durable write each), then again with each
        agent's issued key; then the reconnect storms (SIGTERM, then kill -9)."""
        counts = self.counts or ([1_000, 5_000] if self.quick else [1_000, 5_000, 10_000])
        for count in counts:
            for kind in ("floor", "hub"):
                print(f"registrations: {kind}, {count} agents", flush=True)
                server, token = self.server(kind, f"reg{count}")
                assert server.proc is not None
                keys = str(self.workdir / f"keys-{kind}-{count}")
                for phase in ("enrollment", "key"):
                    cpu0 = server.proc.cpu()
                    fleet = LeanFleet(self.workdir, server.url, token, count, f"g{count}", rate=0)
                    fleet.start(once=True, keys=keys, start_at=time.time() + 2)
                    self.started.extend(fleet.procs)
                    try:
                        fleet.wait(timeout=120 + count / 100)
                    except subprocess.TimeoutExpired:
                        self.note(f"{kind}.registrations_failed.{count}", f"{fleet.online()}")
                        fleet.stop()
                        break
                    statuses = fleet.statuses()
                    began = min(s["dial_start"] for s in statuses)
                    seconds = max(s["first_done"] for s in statuses) - began
                    label = phase if kind == "hub" else {"enrollment": "first"}.get(phase, phase)
                    self.note(f"{kind}.registrations_per_s.{label}.{count}", round(count / seconds))
                    self.note(
                        f"{kind}.registration_cpu_ms.{label}.{count}",
                        round((server.proc.cpu() - cpu0) * 1000 / count, 3),
                    )
                    self.note(f"{kind}.registrations_refused.{label}.{count}",
                              int(fleet.total("refused")))  # fmt: skip
                    self.clients(f"registrations.{kind}.{label}.{count}", fleet.cpu(), seconds,
                                 count)  # fmt: skip
                    time.sleep(2)  # the closes of this phase are done with
                if isinstance(server, Hub):
                    self.note(
                        f"hub.lag_max_ms.registrations{count}",
                        round(server.metrics().get("tether_event_loop_lag_max_seconds", 0) * 1000,
                              1),
                    )  # fmt: skip
                server.proc.stop()
        storm = (
            self.storm_agents
            if self.storm_agents is not None
            else (5_000 if self.quick else 19_000)
        )
        for kind in ("floor", "hub") if storm else ():
            print(f"storm: {storm} lean agents, the {kind} restarted", flush=True)
            server, token = self.server(kind, "storm")
            fleet, _ = self.connect_fleet(server, storm, "r", token)
            time.sleep(5)
            for how in ("sigterm", "kill"):
                self.storm(server, fleet, storm, kind, how)
                time.sleep(3)
            fleet.stop()
            assert server.proc is not None
            server.proc.stop()

    def storm(self, server: Hub | Floor, fleet: LeanFleet, count: int, kind: str,
              how: str) -> None:  # fmt: skip
        """Stop the server (SIGTERM: agents are told to come back within 10 s; kill -9: no
        notice, every agent dials again at once with the protocol's backoff), restart it at
        once: seconds until the last agent was welcomed again, as its client saw it."""
        assert server.proc is not None and server.proc.process is not None
        print(f"storm: {kind} {how}", flush=True)
        welcomes0 = fleet.total("welcomes")
        failed0, refused0 = fleet.total("failed"), fleet.total("refused")
        stopped = time.monotonic()
        if how == "sigterm":
            code = server.proc.stop(timeout=60)
            self.note(f"{kind}.sigterm_exit_code", code)
            self.note(f"{kind}.sigterm_seconds", round(time.monotonic() - stopped, 2))
        else:
            server.proc.process.kill()
            server.proc.process.wait(10)
        restarted = time.time()
        clients0 = fleet.cpu()
        server.start()  # the hub returns once /readyz answers: it listens at once
        to_ready = time.time() - restarted
        wait_until(
            lambda: fleet.online() >= count and fleet.total("welcomes") >= welcomes0 + count,
            timeout=180, interval=0.2, what=f"{kind} storm back online",
        )  # fmt: skip
        all_back = max(s["last_welcome"] for s in fleet.statuses()) - restarted
        cpu = server.proc.cpu()
        self.note(f"{kind}.storm_{how}_seconds_all_back", round(all_back, 2))
        self.note(f"{kind}.storm_{how}_seconds_to_ready", round(to_ready, 2))
        self.note(f"{kind}.storm_{how}_cpu_ms_per_agent", round(cpu * 1000 / count, 3))
        # Dials of this storm that failed (refused, reset, timed out) or met a 503.
        self.note(f"{kind}.storm_{how}_client_failed_dials", int(fleet.total("failed") - failed0))
        self.note(f"{kind}.storm_{how}_client_503s", int(fleet.total("refused") - refused0))
        self.clients(f"storm_{how}.{kind}", fleet.cpu() - clients0, all_back, count)
        if isinstance(server, Hub):
            self.hub_storm_stored(server, count, restarted, how)

    def hub_storm_stored(self, hub: Hub, count: int, restarted_at: float, how: str) -> None:
        """That every session is stored, and when the last began; the refusals on the way."""
        sessions: list[Any] = []

        def stored() -> bool:
            with contextlib.closing(sqlite3.connect(hub.data / "tether.db")) as db:
                sessions[:] = db.execute(
                    "SELECT COUNT(DISTINCT agent_id), MAX(connected_at) FROM sessions "
                    "WHERE connected_at > ?",
                    (restarted_at,),
                ).fetchone()
            return bool(sessions[0] >= count)

        wait_until(stored, timeout=30, what="sessions stored")
        self.note(f"hub.storm_{how}_seconds_stored", round(sessions[1] - restarted_at, 2))
        metrics: dict[str, float] = {}

        def scraped() -> bool:
            metrics.update(hub.metrics())  # raises (and is asked again) while shed
            return True

        wait_until(scraped, timeout=30, what="metrics")
        refused = {
            name.split('"')[1]: int(value)
            for name, value in metrics.items()
            if name.startswith("tether_connections_total") and "accepted" not in name
        }
        self.note(f"hub.storm_{how}_refusals", refused)

    # -- round trips and a big job -----------------------------------------------------------

    def latency(self) -> None:
        sizes = self.counts or ([1_000, 5_000] if self.quick else [1_000, 10_000])
        samples = 200 if self.quick else 500
        # What the disk allows: with FULL, a round trip holds two fdatasyncs of the WAL.
        self.note("disk.fdatasync_us", fdatasync_us(self.workdir))
        # What the store allows: the round trip's two commits alone, no hub, no network.
        print("latency: the store's two commits alone", flush=True)
        for synchronous, figures in store_commits(self.workdir).items():
            for key, value in figures.items():
                self.note(f"store_{synchronous}.{key}", value)
        for size in sizes:
            # hub: synchronous=FULL (the default); hub_normal: synchronous=NORMAL, which
            # survives a crash of the hub but not of the machine (one fsync less per commit).
            for kind in ("floor", "hub", "hub_normal"):
                print(f"latency: {kind} with {size} agents", flush=True)
                config = 'store_synchronous = "normal"\n' if kind == "hub_normal" else ""
                server, token = self.server(kind, f"{kind}-rtt{size}", config)
                assert server.proc is not None
                fleet, _ = self.connect_fleet(server, size, f"t{size}", token)
                time.sleep(3)
                clients0 = fleet.cpu()
                if isinstance(server, Hub):
                    admin = server.token("--admin", "--role", "operator")
                    rtts, job_seconds = run(hub_latency(server.url, admin, size, samples))
                    metrics = server.metrics()
                    self.note(
                        f"{kind}.lag_max_ms.latency{size}",
                        round(metrics.get("tether_event_loop_lag_max_seconds", 0) * 1000, 1),
                    )
                else:
                    rtts, job_seconds = run(floor_latency(server.url, fleet.agent_ids(), samples))
                self.note(f"{kind}.rtt_p50_ms.{size}", round(percentile(rtts, 0.5) * 1000, 3))
                self.note(f"{kind}.rtt_p99_ms.{size}", round(percentile(rtts, 0.99) * 1000, 3))
                self.note(f"{kind}.job_all_results_s.{size}", round(job_seconds, 3))
                self.clients(f"latency.{kind}.{size}", fleet.cpu() - clients0,
                             sum(rtts) + job_seconds, size)  # fmt: skip
                fleet.stop()
                server.proc.stop()

    # -- messages per second -----------------------------------------------------------------

    def throughput(self) -> None:
        rates = [10_000, 20_000] if self.quick else [10_000, 20_000, 30_000]
        seconds = 10 if self.quick else 20
        for kind in ("floor", "hub"):
            best = 0.0
            for rate in rates:
                print(f"throughput: {kind} at {rate}/s", flush=True)
                if kind == "hub":
                    server: Hub | Floor = self.fresh_hub(
                        "tput", "agent_message_rate = 1000\nagent_message_burst = 5000\n"
                    )
                    token = server.token("--enroll")
                else:
                    server = self.floor()
                    token = "x"
                assert server.proc is not None
                blaster = Proc(
                    "blaster",
                    [sys.executable, str(ROOT / "bench" / "blaster.py"), "--url", server.url,
                     "--token", token, "--count", "400", "--rate", str(rate),
                     "--seconds", str(seconds)],
                    self.workdir / "blaster.log",
                ).start()  # fmt: skip
                blaster.wait_for_line(r'"registered"', timeout=120)
                time.sleep(1.5)
                received0 = _received(server)
                cpu0, t0 = server.proc.cpu(), time.monotonic()
                time.sleep(seconds - 3)
                received = _received(server) - received0
                elapsed = time.monotonic() - t0
                cpu = server.proc.cpu() - cpu0
                per_second = received / elapsed
                per_cpu_second = received / cpu if cpu else 0.0
                self.note(f"{kind}.messages_per_s.at{rate}", round(per_second))
                self.note(f"{kind}.messages_per_cpu_s.at{rate}", round(per_cpu_second))
                best = max(best, per_cpu_second)
                blaster.stop()
                server.proc.stop()
            self.note(f"{kind}.messages_per_cpu_s", round(best))

    # -- holding the fleet -------------------------------------------------------------------

    def hold(self) -> None:
        count = self.hold_agents or (5_000 if self.quick else 19_000)
        seconds = self.hold_seconds or (60 if self.quick else 600)
        print(f"hold: {count} agents for {seconds} s", flush=True)
        hub = self.fresh_hub("hold")
        token = hub.token("--enroll")
        assert hub.proc is not None
        fleet, _ = self.connect_fleet(hub, count, "h", token)
        started = time.monotonic()
        cpu0, clients0 = hub.proc.cpu(), fleet.cpu()
        lowest = count
        disconnects0 = _disconnects(hub)
        peak_rss = 0
        steady_lag = 0.0
        while time.monotonic() - started < seconds:
            time.sleep(5)
            lowest = min(lowest, hub.online())
            peak_rss = max(peak_rss, hub.proc.rss())
            if time.monotonic() - started > 60:  # the last minute holds no connect burst
                recent = hub.metrics().get("tether_event_loop_lag_recent_seconds", 0)
                steady_lag = max(steady_lag, recent)
        cpu = (hub.proc.cpu() - cpu0) / (time.monotonic() - started)
        self.note("hub.hold_agents", count)
        self.note("hub.hold_seconds", seconds)
        self.note("hub.hold_lowest_online", lowest)
        self.note("hub.hold_disconnects", _disconnects(hub) - disconnects0)
        self.note("hub.hold_cpu_share", round(cpu, 4))
        wall = time.monotonic() - started
        self.clients(f"hold.{count}", fleet.cpu() - clients0, wall, count)
        self.note("hub.hold_peak_rss_mb", round(peak_rss / 2**20, 1))
        self.note(f"hub.steady_lag_max_ms.hold{count}", round(steady_lag * 1000, 1))
        metrics = hub.metrics()
        self.note(
            "hub.hold_lag_max_ms",
            round(metrics.get("tether_event_loop_lag_max_seconds", 0) * 1000, 1),
        )
        fleet.stop()
        hub.proc.stop()


def _received(server: Hub | Floor) -> float:
    if isinstance(server, Hub):
        return server.metrics().get('tether_messages_total{channel="agent",direction="in"}', 0)
    return float(server.stats()["messages"])


def _disconnects(hub: Hub) -> float:
    return sum(v for k, v in hub.metrics().items() if k.startswith("tether_disconnects_total"))


def fdatasync_us(directory: Path, samples: int = 200) -> float:
    """Median µs to overwrite one 4 KiB page of a file and ``fdatasync`` it: the floor of a
    commit with ``synchronous=FULL`` on this disk (a commit writes more pages, syncs once)."""
    path = directory / "fdatasync.probe"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, bytes(64 * 4096), 0)
        os.fsync(fd)
        times = []
        for n in range(samples):
            started = time.perf_counter()
            os.pwrite(fd, b"x" * 4096, n % 64 * 4096)
            os.fdatasync(fd)
            times.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return round(percentile(times, 0.5) * 1e6, 1)


async def hub_latency(
    url: str, token: str, size: int, samples: int, listing: bool = True
) -> tuple[list[float], float]:
    """Console → hub → agent → hub → console, through the ledger; then one job to all
    (``listing``: the agents are listed first, to pick round trips' targets)."""
    done: dict[str, asyncio.Future[None]] = {}
    states: dict[str, str] = {}

    def on_event(event: dict[str, Any]) -> None:
        command = event.get("command")
        if command and command["state"] in ("succeeded", "failed", "rejected"):
            states[command["command_id"]] = command["state"]
            future = done.get(command["command_id"])
            if future is not None and not future.done():
                future.set_result(None)

    client = AdminClient(url, token, on_event=on_event)
    await client.open()
    await client.request("subscribe", topics=["commands"])
    agents = []
    if listing:
        listed = await client.request("agents", limit=100_000)
        agents = [agent["agent_id"] for agent in listed["agents"]]
    loop = asyncio.get_running_loop()
    rtts = []
    for n in range(samples):
        agent_id = agents[n * 7919 % len(agents)]
        started = time.perf_counter()
        reply = await client.request("dispatch", target={"agent_ids": [agent_id]}, name="ping")
        (command_id,) = reply["command_ids"]
        if command_id not in states:
            future = done[command_id] = loop.create_future()
            await asyncio.wait_for(future, 10)
        rtts.append(time.perf_counter() - started)
    started = time.perf_counter()
    reply = await client.request(
        "dispatch", target={"selector": {"status": "online"}}, name="ping", reply_timeout=120
    )
    job_id = reply["job_id"]
    # Done when every command's final state has been announced, which the hub does only
    # once it is stored (as the floor's figure ends with the admin holding every reply);
    # the job's summary, polled every 100 ms, in case an event was coalesced away.
    ids = reply["command_ids"]
    job_seconds = 0.0
    while not job_seconds:
        for _ in range(10):
            if all(command_id in states for command_id in ids):
                job_seconds = time.perf_counter() - started
                break
            await asyncio.sleep(0.01)
        else:
            summary = await client.request("jobs", filter={"job_id": job_id})
            if summary["jobs"][0]["state"] != "running":
                job_seconds = time.perf_counter() - started
    await client.close()
    return rtts, job_seconds


async def floor_latency(url: str, agents: list[str], samples: int) -> tuple[list[float], float]:
    """The same paths on the floor: relay to one agent and back; broadcast to all."""
    size = len(agents)
    async with websockets.connect(url + "/admin", compression=None, max_size=None) as ws:
        rtts = []
        for n in range(samples):
            command_id = secrets.token_hex(12)
            agent_id = agents[n * 7919 % size]
            started = time.perf_counter()
            message = {"type": "dispatch", "agent_id": agent_id, "command_id": command_id}
            await ws.send(orjson.dumps(message).decode())
            async with asyncio.timeout(10):  # an agent that never answers ends the run
                while orjson.loads(await ws.recv()).get("command_id") != command_id:
                    pass
            rtts.append(time.perf_counter() - started)
        started = time.perf_counter()
        command_id = secrets.token_hex(12)
        await ws.send(orjson.dumps({"type": "broadcast", "command_id": command_id}).decode())
        got = 0
        async with asyncio.timeout(120):
            while got < size:
                if orjson.loads(await ws.recv()).get("command_id") == command_id:
                    got += 1
        return rtts, time.perf_counter() - started


# -- report ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu_model() or platform.processor() or platform.machine(),
        "python_loop_ms": python_loop_ms(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "websockets": websockets.__version__,
        "kernel": platform.release(),
    }


def cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return None


def python_loop_ms(count: int = 5_000_000) -> float:
    """How fast one core runs Python here (best of three): figures from two virtual machines
    of the same size differ by as much as their cores do, and this tells them apart."""
    seconds = timeit.repeat(f"for n in range({count}): total += n", "total = 0", repeat=3, number=1)
    return round(min(seconds) * 1000, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default=FULL, help="comma-separated scenarios")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    parser.add_argument("--hold-agents", type=int, default=0, help="agents held (hold scenario)")
    parser.add_argument("--hold-seconds", type=int, default=0, help="how long (hold scenario)")
    parser.add_argument("--counts", default="", help="agent counts, e.g. 1000,10000")
    parser.add_argument("--storm", type=int, default=None, help="storm size (0: none)")
    parser.add_argument(
        "--hub-cpu", type=int, default=None, help="run every hub on this CPU only (taskset)"
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="tether-bench-"))
    bench = Bench(args.quick, workdir)
    bench.hold_agents = args.hold_agents
    bench.hold_seconds = args.hold_seconds
    bench.counts = [int(n) for n in args.counts.split(",") if n]
    bench.storm_agents = args.storm
    Hub.cpu = args.hub_cpu
    started = time.time()
    scenarios: dict[str, Callable[[], None]] = {
        "memory": bench.memory,
        "registrations": bench.registrations,
        "latency": bench.latency,
        "throughput": bench.throughput,
        "hold": bench.hold,
        "flood": lambda: flood(bench),
    }
    try:
        for name in args.only.split(","):
            try:
                scenarios[name.strip()]()
            except Exception as exc:  # keep the other scenarios' figures
                bench.note(f"error.{name.strip()}", f"{type(exc).__name__}: {exc}")
            finally:
                for proc in reversed(bench.started):
                    proc.stop()
                bench.started.clear()
            save(bench, args, started)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    path = save(bench, args, started)
    print(f"wrote {path}")
    from bench.report import targets

    for what, target, figures, ok in targets(bench.results):
        verdict = {True: "met", False: "NOT MET", None: "-"}[ok]
        print(f"  {verdict:8} {what}: {figures} (target {target})")
    if not args.quick and args.only == FULL:
        from bench.report import merge, render, write

        write(render(merge([json.loads(path.read_text())])))
        print("updated bench/RESULTS.md")


def save(bench: Bench, args: argparse.Namespace, started: float) -> Path:
    """Write what was measured so far (a long run must not lose it to a late failure)."""
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started),
        "quick": args.quick,
        "command": "python bench/run.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "results": bench.results,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"results-{report['when'].replace(':', '')}.json"
    path.write_text(json.dumps(report, indent=2))
    return path


if __name__ == "__main__":
    # The bench itself drives hundreds of sockets; give it room.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    main()
