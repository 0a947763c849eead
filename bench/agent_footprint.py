"""The agent on the box: what one idle agent costs, and what a CONNECT proxy adds.

Three figures (issue 15), each printed beside its floor measured in the same run:

* resident memory of one idle ``tether-agent run`` process, registered to a real hub
  (target <= 30 MB); floor: a bare ``websockets`` client process holding one connection;
* CPU of that idle agent over ``--idle-seconds`` (600 by default; target <= 0.1 % of one
  core); floor: the same bare client over the same seconds (it pings every 20 s, as
  websockets does by default);
* the command round trip added by an HTTP CONNECT proxy (tinyproxy) on loopback: ``ping``
  commands dispatched one after the other to an agent dialing directly and to one dialing
  through the proxy (tinyproxy, HTTP CONNECT; and Dante, SOCKS5), medians and p99 (floor: a
  TCP echo through the same HTTP proxy).

    /work/coord/bench-lock .venv/bin/python bench/agent_footprint.py [--idle-seconds 600]

Prints one JSON object (and keeps it under bench/results/ with ``--save``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hub.protocol.client import AdminClient  # noqa: E402

FLOOR_CLIENT = """
import asyncio, sys
from websockets.asyncio.client import connect
async def main():
    async with connect(sys.argv[1], additional_headers={"Authorization": "Bearer " + sys.argv[2]},
                       subprotocols=["tether.agent.v1"]) as ws:
        await ws.send('{"type":"register","agent_id":"floor-1"}')
        await ws.recv()
        print("ready", flush=True)
        await asyncio.Future()
asyncio.run(main())
"""


def env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    return {**clean, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Hub:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hub", "serve", "--listen", "127.0.0.1:0",
             "--data-dir", str(directory)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd=ROOT,
        )  # fmt: skip
        assert self.process.stdout is not None
        for line in self.process.stdout:
            found = re.search(r"listening on [\d.]+:(\d+)", line)
            if found:
                self.port = int(found.group(1))
                break
        else:
            raise RuntimeError("the hub did not start")
        self.url = f"ws://127.0.0.1:{self.port}"

    def token(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "hub", "token", "create", "--data-dir", str(self.directory),
             *args],
            capture_output=True, text=True, env=env(), cwd=ROOT, check=True,
        )  # fmt: skip
        return result.stdout.strip()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(20)


def start_agent(
    hub: Hub, agent_id: str, state: Path, *extra: str, **more: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--hub", hub.url, "--token",
         hub.token("--agent", agent_id), "--agent-id", agent_id, "--state-dir", str(state),
         *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
        env={**env(), **more}, cwd=ROOT,
    )  # fmt: skip


def wait_connected(state: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads((state / "status.json").read_text())["state"] == "connected":
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"agent in {state} did not connect")


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def idle_figures(hub: Hub, work: Path, idle_seconds: float) -> dict[str, Any]:
    agent = start_agent(hub, "idle-1", work / "idle-1")
    floor = subprocess.Popen(
        [sys.executable, "-c", FLOOR_CLIENT, hub.url + "/ws", hub.token("--agent", "floor-1")],
        stdout=subprocess.PIPE, text=True, env=env(),
    )  # fmt: skip
    try:
        wait_connected(work / "idle-1")
        assert floor.stdout is not None and floor.stdout.readline().strip() == "ready"
        time.sleep(20)  # settle: imports done, first heartbeats sent
        processes = {"agent": psutil.Process(agent.pid), "floor": psutil.Process(floor.pid)}
        rss = {k: p.memory_info().rss for k, p in processes.items()}
        uss = {k: p.memory_full_info().uss for k, p in processes.items()}
        before = {k: cpu_seconds(p) for k, p in processes.items()}
        started = time.monotonic()
        time.sleep(idle_seconds)
        elapsed = time.monotonic() - started
        cpu = {k: (cpu_seconds(p) - before[k]) / elapsed * 100 for k, p in processes.items()}
        rss_after = {k: p.memory_info().rss for k, p in processes.items()}
    finally:
        for process in (agent, floor):
            process.terminate()
            process.wait(20)
    return {
        "idle_seconds": round(elapsed, 1),
        "agent_rss_mb": round(rss["agent"] / 2**20, 1),
        "agent_rss_after_mb": round(rss_after["agent"] / 2**20, 1),
        "agent_uss_mb": round(uss["agent"] / 2**20, 1),
        "floor_rss_mb": round(rss["floor"] / 2**20, 1),
        "floor_uss_mb": round(uss["floor"] / 2**20, 1),
        "rss_ratio": round(rss["agent"] / rss["floor"], 2),
        "agent_cpu_percent": round(cpu["agent"], 4),
        "floor_cpu_percent": round(cpu["floor"], 4),
    }


async def round_trips(hub: Hub, agent_id: str, count: int) -> list[float]:
    admin = AdminClient(hub.url, hub.token("--admin", "--role", "operator"))
    await admin.open()
    samples = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            reply = await admin.request(
                "dispatch", target={"agent_ids": [agent_id]}, name="ping", timeout=10
            )
            while True:
                detail = await admin.request("job", job_id=reply["job_id"])
                if detail["job"]["state"] != "running":
                    break
                await asyncio.sleep(0.0005)
            samples.append(time.perf_counter() - started)
    finally:
        await admin.close()
    return samples


async def echo_round_trips(proxy_port: int | None, count: int) -> list[float]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(100):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    if proxy_port is None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    else:
        from agent.proxy import open_tunnel, parse_proxy_url

        sock = await open_tunnel(parse_proxy_url(f"http://127.0.0.1:{proxy_port}"),
                                 "127.0.0.1", port, 5)  # fmt: skip
        reader, writer = await asyncio.open_connection(sock=sock)
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        writer.write(b"x" * 64)
        await reader.readexactly(64)
        samples.append(time.perf_counter() - started)
    writer.close()
    server.close()
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))] * 1000, 3),
    }


def proxy_figures(hub: Hub, work: Path, count: int) -> dict[str, Any]:
    port = free_port()
    conf = work / "tinyproxy.conf"
    conf.write_text(f"Port {port}\nListen 127.0.0.1\nAllow 127.0.0.1\nLogLevel Warning\n"
                    f'LogFile "{work / "tinyproxy.log"}"\nMaxClients 50\n')  # fmt: skip
    proxy = subprocess.Popen(["tinyproxy", "-d", "-c", str(conf)])
    socks_port = free_port()
    dante_conf = work / "danted.conf"
    dante_conf.write_text(
        f"logoutput: {work / 'danted.log'}\ninternal: 127.0.0.1 port = {socks_port}\n"
        "external: 127.0.0.1\nclientmethod: none\nsocksmethod: none\n"
        "user.privileged: root\nuser.unprivileged: nobody\n"
        "client pass { from: 0.0.0.0/0 to: 0.0.0.0/0 }\n"
        "socks pass { from: 0.0.0.0/0 to: 0.0.0.0/0 }\n"
    )
    dante = subprocess.Popen(
        ["danted", "-f", str(dante_conf), "-N", "1", "-p", str(work / "danted.pid")]
    )
    time.sleep(1.0)
    direct = start_agent(hub, "direct-1", work / "direct-1")
    proxied = start_agent(
        hub, "proxied-1", work / "proxied-1", "--proxy", f"http://127.0.0.1:{port}"
    )
    socksed = start_agent(
        hub, "socks-1", work / "socks-1", "--proxy", f"socks5://127.0.0.1:{socks_port}"
    )
    try:
        wait_connected(work / "direct-1")
        wait_connected(work / "proxied-1")
        wait_connected(work / "socks-1")

        async def measure() -> dict[str, Any]:
            await round_trips(hub, "direct-1", 20)  # warm up both paths
            await round_trips(hub, "proxied-1", 20)
            await round_trips(hub, "socks-1", 20)
            a: list[float] = []
            b: list[float] = []
            c: list[float] = []
            for _ in range(count // 50):  # interleaved blocks: all see the same machine
                a += await round_trips(hub, "direct-1", 50)
                b += await round_trips(hub, "proxied-1", 50)
                c += await round_trips(hub, "socks-1", 50)
            echo_direct = await echo_round_trips(None, 500)
            echo_proxy = await echo_round_trips(port, 500)
            return {
                "commands": count,
                "direct": summary(a),
                "through_proxy": summary(b),
                "added_median_ms": round((statistics.median(b) - statistics.median(a)) * 1000, 3),
                "through_socks5_dante": summary(c),
                "socks5_added_median_ms": round(
                    (statistics.median(c) - statistics.median(a)) * 1000, 3
                ),
                "floor_tcp_echo_direct": summary(echo_direct),
                "floor_tcp_echo_through_proxy": summary(echo_proxy),
                "floor_added_median_ms": round(
                    (statistics.median(echo_proxy) - statistics.median(echo_direct)) * 1000, 3
                ),
            }

        return asyncio.run(measure())
    finally:
        for process in (direct, proxied, socksed, proxy, dante):
            process.terminate()
            process.wait(20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idle-seconds", type=float, default=600.0)
    parser.add_argument("--commands", type=int, default=500)
    parser.add_argument("--save", action="store_true", help="keep the JSON in bench/results/")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tether-footprint-") as tmp:
        work = Path(tmp)
        hub = Hub(work / "hub")
        try:
            result = {
                "bench": "agent_footprint",
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "host": {"cpus": os.cpu_count(), "kernel": os.uname().release},
                "proxy": proxy_figures(hub, work, args.commands),
                "idle": idle_figures(hub, work, args.idle_seconds),
            }
        finally:
            hub.stop()
    text = json.dumps(result, indent=2)
    print(text)
    if args.save:
        out = ROOT / "bench" / "results" / f"agent-footprint-{result['at'].replace(':', '')}.json"
        out.write_text(text + "\n")


if __name__ == "__main__":
    main()
