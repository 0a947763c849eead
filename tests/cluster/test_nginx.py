"""A real nginx in front of two hubs: WebSocket upgrades pass through, agents are spread,
commands reach them (the example of docs/cluster.md, tested)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from hub.protocol.client import AdminClient
from tests.support import RawAgent, job_done, wait_for

#: The site configuration docs/cluster.md shows, with the test's own ports and paths.
SITE = """
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    upstream tether_hubs {{
        server 127.0.0.1:{port_a} max_fails=1 fail_timeout=5s;
        server 127.0.0.1:{port_b} max_fails=1 fail_timeout=5s;
    }}
    server {{
        listen 127.0.0.1:{listen};
        location / {{
            proxy_pass http://tether_hubs;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            proxy_buffering off;
            proxy_next_upstream error timeout http_503;
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def nginx(tmp_path: Path) -> Any:
    binary = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if binary is None:
        pytest.fail("nginx is not installed: run ./scripts/bootstrap.sh (it installs it)")
    processes: list[subprocess.Popen[bytes]] = []

    def start(port_a: int, port_b: int) -> int:
        prefix = tmp_path / "nginx"
        prefix.mkdir(exist_ok=True)
        listen = free_port()
        conf = prefix / "nginx.conf"
        conf.write_text(SITE.format(prefix=prefix, port_a=port_a, port_b=port_b, listen=listen))
        process = subprocess.Popen(
            [binary, "-p", str(prefix), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes.append(process)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", listen), timeout=0.5).close()
                return listen
            except OSError:
                if process.poll() is not None:
                    break
                time.sleep(0.05)
        raise AssertionError(f"nginx did not start: {(prefix / 'error.log').read_text()}")

    yield start
    for process in processes:
        process.terminate()
        process.wait(10)


async def test_nginx_in_front_of_two_hubs_passes_upgrades_and_spreads_agents(
    cluster: Any, nginx: Any
) -> None:
    a, b = await cluster(2)
    port = nginx(a.hub.port, b.hub.port)
    front = f"ws://127.0.0.1:{port}"
    enroll = await a.token("enroll")
    agents = []
    try:
        for n in range(8):
            agent = await RawAgent.connect(f"{front}/ws", enroll)
            welcome = await agent.register(f"edge-{n}")
            agents.append((agent, welcome["hub_id"]))
        assert {hub_id for _, hub_id in agents} == {"hub-a", "hub-b"}
        admin = await AdminClient(front, await a.admin_token("operator")).open()
        await wait_for(lambda: _all_online(admin, 8), timeout=10)
        on_b = next(agent for agent, hub_id in agents if hub_id == "hub-b")
        index = agents.index((on_b, "hub-b"))
        data = await admin.request("dispatch", target={"agent_ids": [f"edge-{index}"]}, name="ping")
        command = await on_b.recv_type("command", timeout=10)
        await on_b.send(
            {"type": "result", "command_id": command["command_id"], "status": "succeeded"}
        )
        job = await wait_for(lambda: job_done(admin, data["job_id"]), timeout=10)
        assert job["job"]["state"] == "succeeded"
        await admin.close()
    finally:
        for agent, _ in agents:
            await agent.close()


async def _all_online(admin: AdminClient, count: int) -> bool:
    agents = (await admin.request("agents"))["agents"]
    return sum(1 for a in agents if a["state"] == "online") == count
