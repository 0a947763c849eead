"""A small protocol-level fleet for demos, console screenshots and the console benchmark.

It speaks the agent channel of PROTOCOL §4 on Tether's lean connection (no task per agent):
registers N agents with an enrollment key, heartbeats them evenly spread over the period,
answers ``ping``, ``sysinfo``, ``exec`` (simulated: it prints, never runs anything) and
``sleep``, and makes the picture realistic: a share of agents reports ``degraded``, a share
goes away after registering (offline), a share stops heartbeating (stale, then offline).

This stands in until ``tether-agent simulate`` is on main; the console and its tests do not
depend on it.

    python tools/fleet.py --hub ws://127.0.0.1:8765 --token ENROLL --count 300
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import sys
import time
import zlib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hub.protocol.codec import decode, encode
from hub.protocol.connection import Connection, connect
from hub.protocol.constants import AGENT_SUBPROTOCOL

CITIES = (
    ("berlin", "eu-central", 52.52, 13.40),
    ("frankfurt", "eu-central", 50.11, 8.68),
    ("warsaw", "eu-central", 52.23, 21.01),
    ("london", "eu-west", 51.51, -0.13),
    ("paris", "eu-west", 48.86, 2.35),
    ("madrid", "eu-west", 40.42, -3.70),
    ("milan", "eu-south", 45.46, 9.19),
    ("stockholm", "eu-north", 59.33, 18.07),
    ("newyork", "us-east", 40.71, -74.01),
    ("atlanta", "us-east", 33.75, -84.39),
    ("chicago", "us-central", 41.88, -87.63),
    ("dallas", "us-central", 32.78, -96.80),
    ("seattle", "us-west", 47.61, -122.33),
    ("sanjose", "us-west", 37.34, -121.89),
    ("toronto", "ca-central", 43.65, -79.38),
    ("mexico", "mx-central", 19.43, -99.13),
    ("saopaulo", "sa-east", -23.55, -46.63),
    ("bogota", "sa-north", 4.71, -74.07),
    ("lagos", "af-west", 6.52, 3.38),
    ("nairobi", "af-east", -1.29, 36.82),
    ("johannesburg", "af-south", -26.20, 28.05),
    ("dubai", "me-central", 25.20, 55.27),
    ("mumbai", "ap-south", 19.08, 72.88),
    ("singapore", "ap-southeast", 1.35, 103.82),
    ("jakarta", "ap-southeast", -6.21, 106.85),
    ("tokyo", "ap-northeast", 35.68, 139.69),
    ("seoul", "ap-northeast", 37.57, 126.98),
    ("hongkong", "ap-east", 22.32, 114.17),
    ("sydney", "ap-oceania", -33.87, 151.21),
    ("auckland", "ap-oceania", -36.85, 174.76),
)
PLATFORMS = ("linux", "linux", "linux", "docker", "docker", "windows", "darwin")
VERSIONS = ("1.4.0", "1.4.0", "1.4.0", "1.3.2", "1.3.2", "1.2.9")


def profile(prefix: str, n: int, seed: int) -> dict[str, Any]:
    rng = random.Random(zlib.crc32(f"{seed}:{n}".encode()))
    city, region, lat, lon = CITIES[rng.randrange(len(CITIES))]
    agent_id = f"{prefix}{n:05d}"
    message: dict[str, Any] = {
        "type": "register",
        "agent_id": agent_id,
        "platform": rng.choice(PLATFORMS),
        "region": region,
        "version": rng.choice(VERSIONS),
        "hostname": f"{city}-gw{n:05d}",
        "labels": {"site": city, "tier": rng.choice(("edge", "edge", "edge", "core"))},
        "capabilities": ["ping", "sysinfo", "exec", "sleep"],
    }
    if rng.random() < 0.85:  # some agents report no location: the map places them by region
        message["location"] = {
            "lat": round(lat + rng.uniform(-1.5, 1.5), 4),
            "lon": round(lon + rng.uniform(-1.5, 1.5), 4),
        }
    return message


class Agent(Connection):
    __slots__ = ("cpu", "degraded", "driver", "message", "number", "registered", "silent")

    def __init__(self, protocol: Any, driver: Fleet, number: int, message: dict[str, Any]):
        super().__init__(protocol, max_buffer=256 * 1024)
        self.driver = driver
        self.number = number
        self.message = message
        self.registered = False
        self.degraded = False
        self.silent = False
        self.cpu = random.uniform(5, 60)

    def on_message(self, data: bytes) -> None:
        try:
            message = decode(data)
        except Exception:
            return
        kind = message.get("type")
        if kind == "welcome":
            self.registered = True
            self.driver.registered += 1
        elif kind == "command":
            self.driver._spawn(self.driver.run_command(self, message))
        elif kind == "reconnect":
            self.driver.reconnect_after[self.number] = message.get("after_ms", 0) / 1000.0

    def on_close(self, code: int, reason: str) -> None:
        if self.registered:
            self.driver.registered -= 1
        self.registered = False
        self.driver.closed(self)

    def heartbeat(self) -> None:
        if not self.registered or self.silent:
            return
        self.cpu = min(100.0, max(0.0, self.cpu + random.uniform(-4, 4)))
        self.send_text(
            encode(
                {
                    "type": "heartbeat",
                    "status": "degraded" if self.degraded else "ok",
                    "metrics": {
                        "cpu_percent": round(self.cpu, 1),
                        "mem_percent": round(30 + self.cpu / 3, 1),
                        "load1": round(self.cpu / 25, 2),
                        "uptime_s": int(time.time()) % 1_000_000,
                    },
                }
            )
        )


class Fleet:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.agents: dict[int, Agent] = {}
        self.registered = 0
        self.heartbeats = 0
        self.stopping = False
        self.reconnect_after: dict[int, float] = {}
        self.rng = random.Random(args.seed)
        self.tasks: set[asyncio.Future[Any]] = set()

    async def dial(self, number: int) -> None:
        args = self.args
        message = profile(args.prefix, number, args.seed)
        delay = 0.5
        while not self.stopping:
            try:
                agent = await connect(
                    args.hub.rstrip("/") + "/ws",
                    lambda protocol, m=message: Agent(protocol, self, number, m),
                    headers=[("Authorization", f"Bearer {args.token}")],
                    subprotocols=[AGENT_SUBPROTOCOL],
                    open_timeout=20,
                )
            except Exception:
                await asyncio.sleep(self.rng.uniform(0, delay))
                delay = min(30.0, delay * 2)
                continue
            assert isinstance(agent, Agent)
            r = random.Random(zlib.crc32(f"role:{args.seed}:{number}".encode())).random()
            agent.degraded = r < args.degraded_share
            self.agents[number] = agent
            agent.send_text(encode(message))
            if args.degraded_share <= r < args.degraded_share + args.offline_share:
                self._later(self.rng.uniform(1.0, 3.0), agent.close, 1000, "demo: going away")
            elif (
                args.degraded_share + args.offline_share
                <= r
                < args.degraded_share + args.offline_share + args.stale_share
            ):
                agent.silent = True  # registered, then silent: stale, later offline
            return

    def _later(self, delay: float, fn: Any, *args: Any) -> None:
        asyncio.get_running_loop().call_later(delay, fn, *args)

    def closed(self, agent: Agent) -> None:
        if self.agents.get(agent.number) is agent:
            del self.agents[agent.number]
        if self.stopping or agent.silent:
            return
        wait = self.reconnect_after.pop(agent.number, None)
        if agent.protocol.close_rcvd is not None and agent.protocol.close_rcvd.code == 1000:
            return  # went away on purpose (offline share)
        delay = wait if wait is not None else self.rng.uniform(0.5, 3.0)

        async def again() -> None:
            await asyncio.sleep(delay)
            await self.dial(agent.number)

        self._spawn(again())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run_command(self, agent: Agent, message: dict[str, Any]) -> None:
        command_id = message.get("command_id")
        name = message.get("name")
        args = message.get("args") or {}
        agent.send_text(encode({"type": "ack", "command_id": command_id}))
        started = _now()
        status, data, error, exit_code = "succeeded", None, None, None
        if name == "ping":
            data = {"pong": True, "time": started}
        elif name == "sysinfo":
            m = agent.message
            data = {"hostname": m["hostname"], "platform": m["platform"], "cpus": 4,
                    "mem_total": 8 * 1024**3, "version": m["version"]}  # fmt: skip
        elif name == "exec":
            argv = args.get("argv") or []
            await asyncio.sleep(self.rng.uniform(0.05, 0.4))
            text = f"[simulated on {agent.message['hostname']}] $ {' '.join(map(str, argv))}\n"
            text += f"up {agent.number % 97} days, load average: {agent.cpu / 25:.2f}\n"
            agent.send_text(encode({"type": "output", "command_id": command_id, "seq": 0,
                                    "stream": "stdout", "data": text}))  # fmt: skip
            exit_code = 0
            if agent.number % 17 == 3:
                warning = "warning: disk 91% full\n"
                agent.send_text(encode({"type": "output", "command_id": command_id, "seq": 1,
                                        "stream": "stderr", "data": warning}))  # fmt: skip
                status, exit_code = "failed", 1
        elif name == "sleep":
            await asyncio.sleep(min(float(args.get("seconds", 1)), 600))
        else:
            status, error = "rejected", f"unknown command {name!r}"
        agent.send_text(
            encode(
                {
                    "type": "result",
                    "command_id": command_id,
                    "status": status,
                    "exit_code": exit_code,
                    "data": data,
                    "error": error,
                    "started_at": started,
                    "finished_at": _now(),
                }
            )
        )

    async def heartbeat_loop(self) -> None:
        period = self.args.period
        tick = 0.1
        slots = max(1, round(period / tick))
        next_at = time.monotonic()
        k = 0
        while not self.stopping:
            next_at += tick
            slot = k % slots
            for number, agent in list(self.agents.items()):
                if number % slots == slot:
                    agent.heartbeat()
                    self.heartbeats += 1
            k += 1
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def churn_loop(self) -> None:
        """Drop a few random agents every few seconds; they reconnect (graphs move)."""
        while not self.stopping:
            await asyncio.sleep(2.0)
            live = [a for a in self.agents.values() if a.registered and not a.silent]
            for agent in self.rng.sample(live, min(len(live), self.args.churn)):
                agent.abort()

    async def run(self) -> None:
        args = self.args
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        beats = asyncio.ensure_future(self.heartbeat_loop())
        churn = asyncio.ensure_future(self.churn_loop()) if args.churn else None
        started = time.monotonic()
        for number in range(1, args.count + 1):
            self._spawn(self.dial(number))
            if number % max(1, int(args.rate / 10)) == 0:
                await asyncio.sleep(0.1)
        target = args.count - int(args.count * args.offline_share)
        while self.registered < target * 0.98 and time.monotonic() - started < 120:
            await asyncio.sleep(0.1)
        print(f"fleet: {self.registered} agents registered", flush=True)
        if args.ready_file:
            await asyncio.to_thread(Path(args.ready_file).write_text, str(self.registered))
        deadline = started + args.duration if args.duration else None
        while not stop.is_set():
            if deadline is not None and time.monotonic() > deadline:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await stop.wait()
        self.stopping = True
        beats.cancel()
        if churn is not None:
            churn.cancel()
        for agent in list(self.agents.values()):
            agent.close(1000, "fleet stopping")
        await asyncio.sleep(0.5)


def _now() -> str:
    from hub.protocol.times import now_rfc3339

    return now_rfc3339()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hub", required=True)
    parser.add_argument("--token", required=True, help="an enrollment key")
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--prefix", default="demo-")
    parser.add_argument("--period", type=float, default=10.0, help="heartbeat period, s")
    parser.add_argument("--rate", type=float, default=1000.0, help="connects per second")
    parser.add_argument("--degraded-share", type=float, default=0.05)
    parser.add_argument("--offline-share", type=float, default=0.04)
    parser.add_argument("--stale-share", type=float, default=0.0)
    parser.add_argument("--churn", type=int, default=0, help="agents dropped every 2 s")
    parser.add_argument("--duration", type=float, default=0.0, help="stop after S seconds")
    parser.add_argument("--ready-file", help="written with the count once registered")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(Fleet(args).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
