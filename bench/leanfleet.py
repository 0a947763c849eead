"""A fleet of lean agents in one process: the load for every hub row and every floor row.

    python bench/leanfleet.py --url ws://127.0.0.1:8765 --token tte_… --count 9500 \\
        --prefix r0- --status /tmp/r0.json [--rate 1000] [--start-at EPOCH] [--once]

Why one client for both? A floor is only a floor if the clients cost less than the server
they measure, and if the hub and the floor are driven the same way. Each agent here is a
:class:`bench.lean.LeanClient` (prebuilt frames, no task per agent): it registers with a
simulated agent's identity (``agent.simulate.sim_profile``), heartbeats every 15 s and pings
every 30 s (as the agent does by default) from one timer per process, answers each
``command`` with an ``ack`` and a ``result``, honours ``reconnect``'s ``after_ms`` and, when
its connection is lost without one (a hub killed with -9), dials again with the protocol's
full-jitter backoff. A 503 is retried the same way.

It writes its state to ``--status`` (JSON, replaced atomically every quarter second):
``online``, ``welcomes`` (all time), ``first_done`` (when every agent had been welcomed once),
``last_welcome``, ``results`` sent, ``refused`` (503s), its own ``cpu`` seconds. With
``--once`` it exits once every agent has been welcomed, writing the agent keys the hub issued
to ``--keys-out`` (for a second run registering by key: ``--keys-in``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.simulate import sim_profile
from bench.blaster import HEARTBEAT
from bench.lean import LeanClient, Refused, frame, text, upgrade_request
from hub.protocol.constants import AGENT_SUBPROTOCOL

PING = frame(0x9, b"")
HEARTBEAT_SLOTS = 30  # one slot every 0.5 s: each agent heartbeats every 15 s
PING_SLOTS = 60  # and pings every 30 s
TICK = 0.5
BACKOFF_CAP = 60.0


def _iso(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"


class Fleet:
    """Every agent of this process and the counters the status file reports."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.loop = asyncio.get_running_loop()
        self.online = 0
        self.welcomes = 0
        self.results = 0
        self.refused = 0
        self.failed = 0
        self.first_done: float | None = None
        self.dial_start: float | None = None
        #: CPU seconds spent before dialing (imports, building frames): not load.
        self.cpu_at_dial = 0.0
        self.last_welcome = 0.0
        self.welcomed_once = 0
        self.sources = args.source or ["127.0.0.1"]
        self.host, _, port = args.url.removeprefix("ws://").partition(":")
        self.port = int(port)
        self.now_iso = _iso(time.time())
        self.agents = [Agent(self, n) for n in range(args.count)]

    def status(self) -> dict[str, object]:
        times = os.times()
        return {
            "count": self.args.count,
            "online": self.online,
            "welcomes": self.welcomes,
            "dial_start": self.dial_start,
            "cpu_at_dial": self.cpu_at_dial,
            "first_done": self.first_done,
            "last_welcome": self.last_welcome,
            "results": self.results,
            "refused": self.refused,
            "failed": self.failed,
            "cpu": times.user + times.system,
            "time": time.time(),
        }

    def write_status(self) -> None:
        path = Path(self.args.status)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(self.status()))
        tmp.replace(path)

    async def tick(self) -> None:
        slot = 0
        while True:
            await asyncio.sleep(TICK)
            slot += 1
            self.now_iso = _iso(time.time())
            for n in range(slot % HEARTBEAT_SLOTS, len(self.agents), HEARTBEAT_SLOTS):
                self.agents[n].send(HEARTBEAT)
            for n in range(slot % PING_SLOTS, len(self.agents), PING_SLOTS):
                self.agents[n].send(PING)

    async def report(self) -> None:
        while True:
            self.write_status()
            await asyncio.sleep(0.25)


class Agent:
    """One agent's identity and its current connection (if any)."""

    __slots__ = ("agent_id", "attempt", "conn", "fleet", "key", "register", "request", "source")

    def __init__(self, fleet: Fleet, n: int) -> None:
        self.fleet = fleet
        profile = sim_profile(n + 1, fleet.args.prefix)
        self.agent_id = profile.agent_id
        body = {
            "type": "register",
            "agent_id": profile.agent_id,
            "platform": profile.platform,
            "region": profile.region,
            "version": profile.version,
            "hostname": profile.hostname,
            "labels": profile.labels,
            "capabilities": ["ping", "sysinfo", "exec"],
        }
        if profile.location is not None:
            body["location"] = {"lat": profile.location[0], "lon": profile.location[1]}
        self.register = text(orjson.dumps(body))
        self.key = fleet.args.token
        self.request = self._request()
        self.source = fleet.sources[n % len(fleet.sources)]
        self.conn: Conn | None = None
        self.attempt = 0

    def _request(self) -> bytes:
        headers = [
            ("Sec-WebSocket-Protocol", AGENT_SUBPROTOCOL),
            ("Authorization", f"Bearer {self.key}"),
        ]
        return upgrade_request(self.fleet.args.url, "/ws", headers)

    def send(self, data: bytes) -> None:
        if self.conn is not None and self.conn.welcomed:
            self.conn.write(data)

    def rekey(self, key: str) -> None:
        self.key = key
        self.request = self._request()

    async def dial(self, delay: float = 0.0) -> None:
        if delay:
            await asyncio.sleep(delay)
        fleet = self.fleet
        if fleet.args.once and fleet.first_done is not None:
            return
        try:
            _transport, conn = await fleet.loop.create_connection(
                lambda: Conn(self), fleet.host, fleet.port, local_addr=(self.source, 0)
            )
            async with asyncio.timeout(60):
                await conn.opened
                conn.write(self.register)
                await conn.settled
        except Refused as exc:
            if exc.status == 503:
                fleet.refused += 1
            else:
                fleet.failed += 1
            self.retry()
        except (OSError, TimeoutError):
            fleet.failed += 1
            self.retry()

    def retry(self, after: float | None = None) -> None:
        """Full jitter: the n-th retry waits up to min(60, 2ⁿ) s, unless the hub said when."""
        if after is None:
            after = random.uniform(0, min(BACKOFF_CAP, 2.0**self.attempt))
            self.attempt += 1
        self.fleet.loop.create_task(self.dial(after))


class Conn(LeanClient):
    def __init__(self, agent: Agent) -> None:
        super().__init__(agent.request)
        self.agent = agent
        self.welcomed = False
        self.after_ms: int | None = None
        #: Resolved on welcome or close: a first dial holds its slot until then.
        self.settled: asyncio.Future[None] = self.opened.get_loop().create_future()

    def on_message(self, data: bytes) -> None:
        if data.startswith(b'{"type":"command"'):
            command_id = orjson.loads(data)["command_id"]
            now = self.agent.fleet.now_iso
            self.write(
                text(b'{"type":"ack","command_id":"%s"}' % command_id.encode())
                + text(
                    b'{"type":"result","command_id":"%s","status":"succeeded","exit_code":0,'
                    b'"data":{"pong":true},"started_at":"%s","finished_at":"%s"}'
                    % (command_id.encode(), now.encode(), now.encode())
                )
            )
            self.agent.fleet.results += 1
        elif not self.welcomed and data.startswith(b'{"type":"welcome"'):
            self.welcomed = True
            agent = self.agent
            fleet = agent.fleet
            agent.conn = self
            agent.attempt = 0
            key = orjson.loads(data).get("agent_key")
            if key:
                agent.rekey(key)
            if not self.settled.done():
                self.settled.set_result(None)
            fleet.online += 1
            fleet.welcomes += 1
            fleet.last_welcome = time.time()
            if fleet.first_done is None:
                fleet.welcomed_once += 1
                if fleet.welcomed_once == len(fleet.agents):
                    fleet.first_done = fleet.last_welcome
        elif data.startswith(b'{"type":"reconnect"'):
            self.after_ms = int(orjson.loads(data).get("after_ms", 0))

    def on_close(self, reason: str) -> None:
        agent = self.agent
        if not self.settled.done():
            self.settled.set_result(None)
        if not self.welcomed and self.upgraded:  # closed before welcome (1013, 1008): again
            agent.fleet.failed += 1
            agent.retry()
        elif self.welcomed:
            agent.fleet.online -= 1
            agent.conn = None
            if agent.fleet.args.once:
                return
            if self.after_ms is not None:
                agent.retry(self.after_ms / 1000)
            else:
                agent.retry()


async def main(args: argparse.Namespace) -> None:
    fleet = Fleet(args)
    if args.keys_in:
        keys = json.loads(await asyncio.to_thread(Path(args.keys_in).read_text))
        for agent in fleet.agents:
            agent.rekey(keys.get(agent.agent_id, args.token))
    fleet.loop.create_task(fleet.report())
    fleet.loop.create_task(fleet.tick())
    if args.start_at:
        await asyncio.sleep(max(0.0, args.start_at - time.time()))
    # Dial at ``rate`` a second with at most ``concurrency`` handshakes in flight.
    semaphore = asyncio.Semaphore(args.concurrency)
    started = time.monotonic()
    fleet.dial_start = time.time()
    times = os.times()
    fleet.cpu_at_dial = times.user + times.system

    async def first(n: int, agent: Agent) -> None:
        if args.rate:
            await asyncio.sleep(max(0.0, started + n / args.rate - time.monotonic()))
        async with semaphore:
            await agent.dial()
            if agent.conn is None:  # refused: the retry is on its way; hold the slot a bit
                await asyncio.sleep(0.01)

    await asyncio.gather(*(first(n, agent) for n, agent in enumerate(fleet.agents)))
    if args.once:
        while fleet.first_done is None:
            await asyncio.sleep(0.01)
        fleet.write_status()
        if args.keys_out:
            keys = {agent.agent_id: agent.key for agent in fleet.agents}
            await asyncio.to_thread(Path(args.keys_out).write_text, json.dumps(keys))
        for agent in fleet.agents:
            if agent.conn is not None:
                agent.conn.close()
        await asyncio.sleep(0.5)
        fleet.write_status()
        return
    await asyncio.Event().wait()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", default="x")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--prefix", default="lean-")
    parser.add_argument("--status", required=True)
    parser.add_argument("--rate", type=float, default=0, help="dials a second (0: no limit)")
    parser.add_argument("--concurrency", type=int, default=200, help="handshakes in flight")
    parser.add_argument("--start-at", type=float, default=0, help="epoch time to start dialing")
    parser.add_argument("--source", nargs="*", help="loopback addresses to dial from")
    parser.add_argument("--once", action="store_true", help="exit once all are welcomed")
    parser.add_argument("--keys-out", help="with --once: write the issued agent keys here")
    parser.add_argument("--keys-in", help="register with these agent keys")
    return parser.parse_args(argv)


if __name__ == "__main__":
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    import uvloop

    uvloop.run(main(parse()))
