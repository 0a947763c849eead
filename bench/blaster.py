"""Load for the message-throughput figure: a few hundred lean connections that register
once, then send heartbeats at a fixed total rate for a bounded time.

    python bench/blaster.py --url ws://127.0.0.1:8765 --token tte_… --count 400 \\
        --rate 20000 --seconds 20

Prints one JSON line when registered and one when done: ``{"sent": n, "seconds": s}``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.lean import LeanClient, Refused, lean_connect, text, upgrade_request
from hub.protocol.constants import AGENT_SUBPROTOCOL

HEARTBEAT = text(
    orjson.dumps(
        {
            "type": "heartbeat",
            "status": "ok",
            "metrics": {"cpu_percent": 12.5, "mem_percent": 40.1, "load1": 0.3, "uptime_s": 86400},
        }
    )
)


class Quiet(LeanClient):
    """Keeps only what the benchmark needs: whether welcome came, and the key it carried."""

    def __init__(self, request: bytes) -> None:
        super().__init__(request)
        self.agent_key: str | None = None
        self.welcomed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_message(self, data: bytes) -> None:
        if not self.welcomed.done() and data.startswith(b'{"type":"welcome"'):
            self.agent_key = orjson.loads(data).get("agent_key")
            self.welcomed.set_result(None)

    def on_close(self, reason: str) -> None:
        if not self.welcomed.done():
            self.welcomed.set_exception(ConnectionError(reason))


async def open_one(url: str, token: str, agent_id: str) -> Quiet:
    """Connect and send ``register``; the connection's ``welcomed`` resolves on welcome."""
    request = upgrade_request(
        url,
        "/ws",
        [("Sec-WebSocket-Protocol", AGENT_SUBPROTOCOL), ("Authorization", f"Bearer {token}")],
    )
    conn = await lean_connect(url, Quiet, request)
    assert isinstance(conn, Quiet)
    conn.send_text(
        orjson.dumps(
            {
                "type": "register",
                "agent_id": agent_id,
                "platform": "linux",
                "region": "bench",
                "capabilities": ["ping"],
            }
        )
    )
    return conn


async def register_all(
    args: argparse.Namespace, tokens: list[str], concurrency: int = 200
) -> tuple[list[Quiet], float, int]:
    """Open and register every agent (``concurrency`` handshakes in flight): the
    connections, wall seconds, and how many upgrades were refused with a 503.

    A 503 (admission: the hub's handshake rate or pending cap) is retried after a second or
    so, as an agent would; anything else ends the run.
    """
    semaphore = asyncio.Semaphore(concurrency)
    refused = 0

    async def one(n: int) -> Quiet:
        nonlocal refused
        for _attempt in range(30):
            async with semaphore:
                try:
                    conn = await open_one(args.url, tokens[n], f"{args.prefix}{n:05d}")
                    await asyncio.wait_for(conn.welcomed, 60)
                    return conn
                except Refused as exc:
                    if exc.status != 503:
                        raise
                    refused += 1
            await asyncio.sleep(random.uniform(0.5, 1.5))
        raise ConnectionError(f"agent {n}: refused 30 times")

    started = time.monotonic()
    conns = await asyncio.gather(*(one(n) for n in range(args.count)))
    return list(conns), time.monotonic() - started, refused


async def main(args: argparse.Namespace) -> None:
    conns, seconds, refused = await register_all(args, [args.token] * args.count)
    print(
        orjson.dumps(
            {"registered": len(conns), "seconds": seconds, "per_s": len(conns) / seconds,
             "refused": refused}
        ).decode(),
        flush=True,
    )  # fmt: skip
    if args.rekey:
        # Again, each agent with the key the hub issued it: registration by agent key.
        keys = [c.agent_key or args.token for c in conns]
        for conn in conns:
            conn.close()
        await asyncio.sleep(2.0)
        conns, seconds, again = await register_all(args, keys)
        refused += again
        print(
            orjson.dumps(
                {"reregistered": len(conns), "seconds": seconds, "per_s": len(conns) / seconds,
                 "refused": refused}
            ).decode(),
            flush=True,
        )  # fmt: skip
    await asyncio.sleep(1.0)  # let the welcomes arrive
    started = time.monotonic()
    sent = 0
    deadline = started + args.seconds
    while (now := time.monotonic()) < deadline:
        due = int(args.rate * (now - started)) - sent
        for n in range(max(0, due)):
            conn = conns[(sent + n) % len(conns)]
            conn.write(HEARTBEAT)
        sent += max(0, due)
        await asyncio.sleep(0.005)
    print(orjson.dumps({"sent": sent, "seconds": time.monotonic() - started}).decode(), flush=True)
    for conn in conns:
        conn.close(1000)
    await asyncio.sleep(0.5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", default="x")
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--rate", type=float, default=20_000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--prefix", default="blast-")
    parser.add_argument(
        "--rekey", action="store_true", help="then reconnect all with their issued agent keys"
    )
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    import uvloop

    uvloop.run(main(args))
