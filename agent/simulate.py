"""``tether-agent simulate``: thousands of agents in one process, for demos and load tests.

Each simulated agent is a real :class:`~agent.client.AgentClient` (same dialing, register,
heartbeat, backoff, executor and credential handling as a real agent); only what it reports
is synthetic. It enrolls with the shared enrollment key, keeps the agent key the hub issues
in memory and uses it on every reconnect, answers ``ping`` and a synthetic ``sysinfo``, and
keeps an in-memory journal.

Cheapness is the point, so everything that can be shared is: one settings object, one SSL
context, one handler registry, one RNG. Per agent there are a handful of slotted objects and
one sleeping task; profiles are derived from the agent's number and the seed, metrics from
the clock (no psutil), and connects are spread out at ``--rate`` per second so the hub is
not hit by ten thousand handshakes at once.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import random
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hub.protocol.backoff import Backoff

from .client import AgentClient, ClientSettings
from .executor import Executor
from .handlers import CommandContext, HandlerRegistry, HandlerResult
from .handlers import ping as ping_handler
from .journal import MemoryJournal
from .profile import AgentProfile
from .state import Credentials

__all__ = ["SimMetrics", "Simulation", "SimulationOptions", "sim_profile", "sim_registry"]

log = logging.getLogger("tether.agent.simulate")

# (city, region, lat, lon): real places; agents are jittered around them.
CITIES: tuple[tuple[str, str, float, float], ...] = (
    ("berlin", "eu-central", 52.52, 13.40),
    ("frankfurt", "eu-central", 50.11, 8.68),
    ("munich", "eu-central", 48.14, 11.58),
    ("vienna", "eu-central", 48.21, 16.37),
    ("zurich", "eu-central", 47.37, 8.54),
    ("warsaw", "eu-central", 52.23, 21.01),
    ("prague", "eu-central", 50.08, 14.44),
    ("london", "eu-west", 51.51, -0.13),
    ("paris", "eu-west", 48.86, 2.35),
    ("amsterdam", "eu-west", 52.37, 4.90),
    ("dublin", "eu-west", 53.35, -6.26),
    ("madrid", "eu-west", 40.42, -3.70),
    ("lisbon", "eu-west", 38.72, -9.14),
    ("milan", "eu-south", 45.46, 9.19),
    ("stockholm", "eu-north", 59.33, 18.07),
    ("oslo", "eu-north", 59.91, 10.75),
    ("helsinki", "eu-north", 60.17, 24.94),
    ("copenhagen", "eu-north", 55.68, 12.57),
    ("new-york", "us-east", 40.71, -74.01),
    ("boston", "us-east", 42.36, -71.06),
    ("washington", "us-east", 38.91, -77.04),
    ("atlanta", "us-east", 33.75, -84.39),
    ("miami", "us-east", 25.76, -80.19),
    ("toronto", "ca-central", 43.65, -79.38),
    ("chicago", "us-central", 41.88, -87.63),
    ("dallas", "us-central", 32.78, -96.80),
    ("denver", "us-central", 39.74, -104.99),
    ("san-francisco", "us-west", 37.77, -122.42),
    ("los-angeles", "us-west", 34.05, -118.24),
    ("seattle", "us-west", 47.61, -122.33),
    ("vancouver", "ca-west", 49.28, -123.12),
    ("mexico-city", "mx-central", 19.43, -99.13),
    ("sao-paulo", "sa-east", -23.55, -46.63),
    ("buenos-aires", "sa-east", -34.60, -58.38),
    ("santiago", "sa-west", -33.45, -70.67),
    ("bogota", "sa-north", 4.71, -74.07),
    ("singapore", "ap-southeast", 1.35, 103.82),
    ("jakarta", "ap-southeast", -6.21, 106.85),
    ("bangkok", "ap-southeast", 13.76, 100.50),
    ("kuala-lumpur", "ap-southeast", 3.14, 101.69),
    ("manila", "ap-southeast", 14.60, 120.98),
    ("sydney", "au-east", -33.87, 151.21),
    ("melbourne", "au-east", -37.81, 144.96),
    ("auckland", "au-east", -36.85, 174.76),
    ("tokyo", "ap-northeast", 35.68, 139.69),
    ("osaka", "ap-northeast", 34.69, 135.50),
    ("seoul", "ap-northeast", 37.57, 126.98),
    ("hong-kong", "ap-east", 22.32, 114.17),
    ("mumbai", "ap-south", 19.08, 72.88),
    ("delhi", "ap-south", 28.70, 77.10),
    ("bangalore", "ap-south", 12.97, 77.59),
    ("dubai", "me-central", 25.20, 55.27),
    ("riyadh", "me-central", 24.71, 46.68),
    ("johannesburg", "af-south", -26.20, 28.05),
    ("cape-town", "af-south", -33.92, 18.42),
    ("lagos", "af-west", 6.52, 3.38),
    ("nairobi", "af-east", -1.29, 36.82),
)
PLATFORMS = (("linux", 40), ("docker", 25), ("k8s", 15), ("windows", 12), ("darwin", 3))
VERSIONS = (("1.4.0", 50), ("1.4.1", 25), ("1.3.9", 15), ("1.5.0-rc1", 10))
TIERS = (("edge", 50), ("store", 25), ("branch", 15), ("core", 10))
#: Results a simulated agent remembers: enough for redeliveries after a reconnect, small
#: enough that ten thousand agents answering many ``sysinfo`` calls stay cheap.
SIM_JOURNAL_ENTRIES = 16


def _weighted(rng: random.Random, table: Sequence[tuple[str, int]]) -> str:
    return rng.choices([name for name, _ in table], [weight for _, weight in table])[0]


def _agent_rng(agent_id: str, seed: int) -> random.Random:
    return random.Random(zlib.crc32(agent_id.encode()) ^ (seed * 0x9E3779B1))


def sim_profile(index: int, prefix: str = "sim-", seed: int = 0) -> AgentProfile:
    """The identity of simulated agent ``index`` (from 1): the same for the same seed."""
    agent_id = f"{prefix}{index:05d}"
    rng = _agent_rng(agent_id, seed)
    city, region, lat, lon = rng.choice(CITIES)
    platform = _weighted(rng, PLATFORMS)
    tier = _weighted(rng, TIERS)
    number = rng.randrange(1, 100)
    if platform == "k8s":
        hostname = f"{tier}-agent-{rng.getrandbits(20):05x}-{rng.getrandbits(20):05x}"
    elif platform == "windows":
        hostname = f"{city[:3].upper()}-{tier.upper()}-{number:04d}"
    else:
        hostname = f"{city}-{tier}-{number:02d}"
    return AgentProfile(
        agent_id=agent_id,
        platform=platform,
        region=region,
        version=_weighted(rng, VERSIONS),
        hostname=hostname,
        labels={"site": city, "tier": tier, "simulated": "true"},
        location=(
            round(max(-90.0, min(90.0, lat + rng.uniform(-0.25, 0.25))), 4),
            round(((lon + rng.uniform(-0.35, 0.35) + 180.0) % 360.0) - 180.0, 4),
        ),
    )


class SimMetrics:
    """Plausible heartbeat numbers from the clock: a slow wave per agent plus noise."""

    __slots__ = ("_boot", "_cores", "_cpu", "_mem", "_phase")

    _rng = random.Random()

    def __init__(self, rng: random.Random) -> None:
        self._cpu = rng.uniform(5.0, 60.0)
        self._mem = rng.uniform(20.0, 80.0)
        self._phase = rng.uniform(0.0, 2 * math.pi)
        self._cores = float(rng.choice((2, 4, 8, 16)))
        self._boot = time.time() - rng.uniform(3_600.0, 90 * 86_400.0)

    def sample(self) -> dict[str, float]:
        now = time.time()
        wave = math.sin(now / 600.0 + self._phase)
        noise = self._rng.uniform(-5.0, 5.0)
        cpu = min(100.0, max(0.0, self._cpu + 25.0 * wave + noise))
        return {
            "cpu_percent": round(cpu, 1),
            "mem_percent": round(min(99.0, max(1.0, self._mem + 5.0 * wave)), 1),
            "load1": round(cpu / 100.0 * self._cores, 2),
            "uptime_s": round(now - self._boot),
        }


async def _sim_sysinfo(ctx: CommandContext) -> HandlerResult:
    """A synthetic ``sysinfo`` in the real one's shape, derived from the agent's identity."""
    agent = ctx.agent
    rng = _agent_rng(agent.agent_id, 1)
    system = {"windows": "Windows", "darwin": "Darwin"}.get(agent.platform, "Linux")
    total = rng.choice((4, 8, 16, 32, 64)) * 1024**3
    used = rng.uniform(0.2, 0.85)
    disk = rng.choice((64, 128, 256, 512)) * 1024**3
    disk_used = rng.uniform(0.1, 0.9)
    boot = time.time() - rng.uniform(3_600.0, 90 * 86_400.0)
    cores = rng.choice((2, 4, 8, 16))
    return HandlerResult(
        data={
            "hostname": agent.hostname,
            "platform": {
                "system": system,
                "release": rng.choice(("6.1.0", "5.15.0", "6.8.0"))
                if system == "Linux"
                else "10.0",
                "version": agent.version,
                "machine": rng.choice(("x86_64", "x86_64", "aarch64")),
                "python": "3.11.7",
            },
            "cpu": {"logical": cores, "physical": max(1, cores // 2)},
            "memory": {
                "total": total,
                "available": int(total * (1 - used)),
                "percent": round(used * 100, 1),
            },
            "disks": [
                {
                    "mountpoint": "C:\\" if system == "Windows" else "/",
                    "device": "disk0",
                    "fstype": "ntfs" if system == "Windows" else "ext4",
                    "total": disk,
                    "used": int(disk * disk_used),
                    "free": int(disk * (1 - disk_used)),
                    "percent": round(disk_used * 100, 1),
                }
            ],
            "boot_time": boot,
            "uptime_s": round(time.time() - boot, 1),
            "simulated": True,
        }
    )


async def _sim_exec(ctx: CommandContext) -> HandlerResult:
    """``exec`` pretended, never run: plausible output and an exit code, for demos.

    About one agent in twenty "fails" (exit 1), chosen by its id, so job views have
    something to show; the output says plainly that nothing ran.
    """
    argv = ctx.args.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        return HandlerResult(status="rejected", error="args.argv must be a list of strings")
    agent = ctx.agent
    rng = _agent_rng(agent.agent_id + " ".join(argv), 3)
    await ctx.emit("stdout", f"[simulated on {agent.hostname}] $ {' '.join(argv)}\n")
    await ctx.emit(
        "stdout", f"up {rng.randint(1, 90)} days, load average: {rng.uniform(0, 4):.2f}\n"
    )
    failed = _agent_rng(agent.agent_id, 4).random() < 0.05
    if failed:
        await ctx.emit("stderr", "error: simulated failure\n")
    return HandlerResult(
        status="failed" if failed else "succeeded",
        exit_code=1 if failed else 0,
        data={"simulated": True},
    )


def sim_registry() -> HandlerRegistry:
    registry = HandlerRegistry()
    registry.add("ping", ping_handler.handle)
    registry.add("sysinfo", _sim_sysinfo)
    registry.add("exec", _sim_exec)
    return registry


class _SimClient(AgentClient):
    """A simulated agent that may report itself ``degraded`` (chosen at creation)."""

    __slots__ = ("degraded",)

    @property
    def status(self) -> Any:
        status = super().status
        return "degraded" if status == "ok" and self.degraded else status


@dataclass(frozen=True, slots=True)
class SimulationOptions:
    count: int
    token: str
    prefix: str = "sim-"
    #: New connections per second while ramping up.
    rate: float = 200.0
    #: Fraction of registered agents dropped (then reconnecting) per minute.
    churn: float = 0.0
    #: Fraction of agents whose heartbeats report ``degraded``.
    degraded: float = 0.0
    seed: int = 0
    #: Seconds between summary lines; 0 for none.
    report_every: float = 10.0
    #: Local addresses to dial from, agents spread over them in turn (empty: the system's
    #: choice). One address has ~28,000 ephemeral ports for all its connections to one hub
    #: and TIME_WAITs; past half of that the kernel's port search costs more than the
    #: handshake, which would make a reconnect storm measure the load generator.
    sources: tuple[str, ...] = ()


class Simulation:
    """N simulated agents sharing one event loop."""

    def __init__(self, options: SimulationOptions, settings: ClientSettings) -> None:
        self.options = options
        self.settings = settings
        self.registry = sim_registry()
        self.rng = random.Random(options.seed)
        self.clients: list[AgentClient] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    def _make(self, index: int) -> AgentClient:
        profile = sim_profile(index, self.options.prefix, self.options.seed)
        executor = Executor(profile, self.registry, MemoryJournal(max_entries=SIM_JOURNAL_ENTRIES))
        client = _SimClient(
            profile,
            self.settings,
            Credentials(self.options.token),
            executor,
            SimMetrics(_agent_rng(profile.agent_id, self.options.seed + 7)),
            backoff=Backoff(rng=self.rng),
            source=self.options.sources[index % len(self.options.sources)]
            if self.options.sources
            else None,
        )
        client.degraded = (
            _agent_rng(profile.agent_id, self.options.seed + 11).random() < self.options.degraded
        )
        return client

    async def run(self) -> None:
        """Ramp up, then churn and report until :meth:`shutdown`."""
        _raise_fd_limit(self.options.count + 256)
        extra = [asyncio.ensure_future(self._report()), asyncio.ensure_future(self._gc())]
        if self.options.churn > 0:
            extra.append(asyncio.ensure_future(self._churn()))
        try:
            await self._ramp()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            for task in extra:
                task.cancel()

    async def _ramp(self) -> None:
        step = 0.05
        per_step = max(1, round(self.options.rate * step))
        loop = asyncio.get_running_loop()
        start = loop.time()
        for index in range(1, self.options.count + 1):
            if self._stopping:
                return
            client = self._make(index)
            self.clients.append(client)
            self._tasks.append(loop.create_task(client.run()))
            if index % per_step == 0:
                # Sleep to the schedule, not by a fixed step, so the rate holds under load.
                await asyncio.sleep(max(0.0, start + index / self.options.rate - loop.time()))

    async def _gc(self, every: float = 1.0, full_every: float = 300.0) -> None:
        """Keep ten thousand agents' long-lived objects out of the collector's scans.

        Measured in a reconnect storm of 19,000 agents: without this, 40 % of a simulator's
        CPU went to garbage collections that walked every agent's objects, each time a
        handshake's short-lived garbage tripped a collection. Survivors are frozen every
        second; now and then everything is collected once, so that cycles frozen by
        mistake do not pile up over a long simulation.
        """
        last_full = time.monotonic()
        while True:
            await asyncio.sleep(every)
            if time.monotonic() - last_full >= full_every:
                last_full = time.monotonic()
                gc.unfreeze()
                gc.collect()
            gc.freeze()

    async def _churn(self) -> None:
        """Drop random registered agents' connections, as flaky networks do."""
        owed = 0.0
        while True:
            await asyncio.sleep(1.0)
            owed += len(self.clients) * self.options.churn / 60.0
            victims = int(owed)
            owed -= victims
            online = [c for c in self.clients if c.registered]
            for client in self.rng.sample(online, min(victims, len(online))):
                connection = client.connection
                if connection is not None:
                    connection.abort()

    def summary(self) -> dict[str, Any]:
        registered = connected = 0
        errors: Counter[str] = Counter()
        for client in self.clients:
            if client.registered:
                registered += 1
            elif client.connection is not None:
                connected += 1
            elif client.last_error:
                errors[client.last_error] += 1
        return {
            "agents": len(self.clients),
            "registered": registered,
            "handshaking": connected,
            "waiting": len(self.clients) - registered - connected,
            "errors": dict(errors.most_common(5)),
        }

    async def _report(self) -> None:
        every = self.options.report_every
        if every <= 0:
            return
        while True:
            await asyncio.sleep(every)
            s = self.summary()
            log.info(
                "event=sim_status agents=%d registered=%d handshaking=%d waiting=%d errors=%s",
                s["agents"],
                s["registered"],
                s["handshaking"],
                s["waiting"],
                s["errors"],
            )

    async def shutdown(self) -> None:
        """Close every agent with 1000, all at once."""
        self._stopping = True
        await asyncio.gather(*(client.shutdown() for client in self.clients))


def _raise_fd_limit(wanted: int) -> None:
    """Ten thousand sockets need more than the usual soft limit of 1024 descriptors."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        log.warning("event=fd_limit_unchanged wanted=%d", wanted)
