"""A TCP relay that delays every chunk by a random 250–350 ms, keeping their order.

This kernel has no netem, so the 300 ± 50 ms link is made here: run in the router namespace,
the relay accepts the agents' connections on the agent side and opens one to the hub for
each, and holds every chunk of bytes, each direction, for ``uniform(lo, hi)`` seconds after
it arrived (never before the chunk ahead of it: TCP keeps order). Unlike netem it delays
chunks as they are read, not single packets, and the two TCP legs each see half the path's
packet loss and recover it themselves; the WebSocket above sees what it would see on a
300 ms link: every message ~300 ms late each way.

Usage: python delay_relay.py LISTEN_HOST LISTEN_PORT HUB_HOST HUB_PORT [LO_MS HI_MS]
Prints "ready" once listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys


async def pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, lo: float, hi: float
) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
    last = 0.0

    async def deliver() -> None:
        while True:
            release, data = await queue.get()
            if not data:
                break
            wait = release - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()

    sender = asyncio.ensure_future(deliver())
    try:
        while True:
            data = await reader.read(65536)
            last = max(last, loop.time() + random.uniform(lo, hi))
            queue.put_nowait((last, data))
            if not data:
                break
        await sender
    except (OSError, asyncio.IncompleteReadError):
        sender.cancel()
    finally:
        writer.close()


async def main() -> None:
    host, port, hub_host, hub_port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    lo, hi = (
        (float(sys.argv[5]) / 1000, float(sys.argv[6]) / 1000)
        if len(sys.argv) > 6
        else (0.25, 0.35)
    )

    async def handle(
        agent_reader: asyncio.StreamReader, agent_writer: asyncio.StreamWriter
    ) -> None:
        try:
            hub_reader, hub_writer = await asyncio.open_connection(hub_host, hub_port)
        except OSError:
            agent_writer.close()
            return
        await asyncio.gather(
            pump(agent_reader, hub_writer, lo, hi),
            pump(hub_reader, agent_writer, lo, hi),
            return_exceptions=True,
        )

    server = await asyncio.start_server(handle, host, port, backlog=512)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
