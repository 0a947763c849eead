"""The floor: a bare ``websockets`` server that speaks just enough Tether for the same clients.

It accepts any upgrade (no authentication, no store, no audit), answers ``register`` with a
``welcome``, relays ``command`` messages from an admin connection to an agent and results
back, and broadcasts to every agent. Whatever the hub costs beyond this is the price of
Tether itself; every hub figure in ``bench/`` is printed beside this one.

    python bench/floor.py --listen 127.0.0.1:9000

On SIGTERM it sends each agent ``reconnect`` with a random ``after_ms`` below 10 s and
closes with 1012, as the hub does, then exits.

``GET /stats`` answers ``{"agents": n, "messages": n, "lag_max": s}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http
import random
import resource
import signal
import ssl
import time
from typing import Any

import orjson
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

AGENTS: dict[str, ServerConnection] = {}
ADMINS: set[ServerConnection] = set()
STATS = {"messages": 0, "lag_max": 0.0}
WELCOME = {"type": "welcome", "hub_id": "floor", "heartbeat_interval": 15}


def stats(connection: ServerConnection, request: Request) -> Response | None:
    if request.path != "/stats":
        return None
    body = orjson.dumps({"agents": len(AGENTS), **STATS})
    headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return Response(http.HTTPStatus.OK, "OK", headers, body)


async def handler(ws: ServerConnection) -> None:
    if ws.request is not None and ws.request.path == "/admin":
        await admin(ws)
    else:
        await agent(ws)


async def agent(ws: ServerConnection) -> None:
    agent_id = None
    try:
        async for raw in ws:
            STATS["messages"] += 1
            message = orjson.loads(raw)
            kind = message.get("type")
            if kind == "register":
                agent_id = message["agent_id"]
                AGENTS[agent_id] = ws
                await ws.send(
                    orjson.dumps(
                        {**WELCOME, "session_id": agent_id, "server_time": _now()}
                    ).decode()
                )
            elif kind == "result":
                data = orjson.dumps(message).decode()
                for admin_ws in ADMINS:
                    await admin_ws.send(data)
    finally:
        if agent_id is not None and AGENTS.get(agent_id) is ws:
            del AGENTS[agent_id]


async def admin(ws: ServerConnection) -> None:
    ADMINS.add(ws)
    try:
        async for raw in ws:
            message = orjson.loads(raw)
            command = _command(message)
            if message.get("type") == "dispatch":
                target = AGENTS.get(message["agent_id"])
                if target is not None:
                    await target.send(command)
            elif message.get("type") == "broadcast":
                broadcast(list(AGENTS.values()), command)
    finally:
        ADMINS.discard(ws)


def _command(message: dict[str, Any]) -> str:
    return orjson.dumps(
        {
            "type": "command",
            "command_id": message["command_id"],
            "name": message.get("name", "ping"),
            "args": {},
            "timeout": 60,
            "issued_at": _now(),
            "expires_at": "2099-01-01T00:00:00Z",
        }
    ).decode()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


async def watch_lag() -> None:
    loop = asyncio.get_running_loop()
    while True:
        expected = loop.time() + 0.05
        await asyncio.sleep(0.05)
        STATS["lag_max"] = max(STATS["lag_max"], loop.time() - expected)


def restart(agent_ws: ServerConnection) -> None:
    """What the hub does to each agent on SIGTERM: come back after a random 0–10 s. Written
    and closed without waiting for the closing handshake, as the hub's writes are."""
    after_ms = random.randrange(10_000)
    with contextlib.suppress(Exception):
        broadcast([agent_ws], orjson.dumps({"type": "reconnect", "after_ms": after_ms}).decode())
        agent_ws.transport.close()


async def main(host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
    async with serve(
        handler,
        host,
        port,
        compression=None,
        process_request=stats,
        max_size=2**20,
        backlog=4096,  # the hub's (hub.app.LISTEN_BACKLOG): a storm waits, is not dropped
        ssl=tls,
    ) as server:
        print(f"floor listening on {server.sockets[0].getsockname()[1]}", flush=True)
        lag = asyncio.ensure_future(watch_lag())
        stopping = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set_result, None)
        await stopping
        server.close(close_connections=False)
        for ws in list(AGENTS.values()):
            restart(ws)
        await asyncio.sleep(0.5)  # the transports flush what they hold
        lag.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", default="127.0.0.1:0")
    # The TLS floor (bench/tls.py): websockets terminating TLS with the event loop's SSL.
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--asyncio", action="store_true", help="asyncio's loop, not uvloop")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tls = None
    if args.tls_cert:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    try:
        if args.asyncio:
            raise ImportError
        import uvloop

        uvloop.run(main(host, int(port), tls))
    except ImportError:
        asyncio.run(main(host, int(port), tls))
