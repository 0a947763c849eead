"""An agent behind a real NAT, and behind a corporate network whose only way out is a proxy.

Real namespaces, veth links and nftables (tests/edge/netns.py); the hub runs in the test
process on the hub side; agents are real ``tether-agent`` processes in the agent namespace;
the proxies (tinyproxy with Basic auth, Dante SOCKS5) run on the router.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from hub.protocol.client import AdminClient
from tests.agent.proxies import Dante, Tinyproxy
from tests.conftest import HubHandle
from tests.support import job_done, wait_for

from .conftest import run_in
from .netns import Topology


async def ping(hub: HubHandle, agent_id: str) -> None:
    """A command round trip through the admin channel, on the address the hub listens on."""
    host, port = hub.hub.config.listen.rsplit(":", 1)[0], hub.hub.port
    scheme = "wss" if hub.hub.config.tls_cert else "ws"
    context = None
    if scheme == "wss":
        context = ssl.create_default_context(cafile=str(hub.hub.config.tls_cert.parent / "ca.pem"))
    admin = AdminClient(
        f"{scheme}://{host}:{port}", await hub.admin_token("operator"), ssl_context=context
    )
    await admin.open()
    try:
        reply = await admin.request("dispatch", target={"agent_ids": [agent_id]}, name="ping")
        detail = await wait_for(lambda: job_done(admin, reply["job_id"]), 20, what="ping done")
        assert [c["state"] for c in detail["commands"]] == ["succeeded"]
    finally:
        await admin.close()


async def test_agent_behind_nat_dials_out_and_nothing_dials_in(
    network: Topology, hub_factory: Callable[..., Any], agent_processes: Any, tmp_path: Path
) -> None:
    hub = await hub_factory(listen=f"{network.hub_ip}:0")
    url = f"ws://{network.hub_ip}:{hub.hub.port}"
    agent_processes(
        network, "run", "--hub", url, "--token", await hub.token("enroll"),
        "--agent-id", "nat-1", "--state-dir", str(tmp_path / "nat-1"),
    )  # fmt: skip
    await wait_for(lambda: "nat-1" in hub.hub.registry.live, 30, what="registered through NAT")
    session = hub.hub.registry.live["nat-1"]
    assert session.conn.peer == network.router_hub_ip  # the hub sees the NAT's address
    await ping(hub, "nat-1")

    # Something listens on the agent's host, and still the hub's side cannot reach it.
    listener = subprocess.Popen(
        [*network.prefix(network.agent), sys.executable, "-c",
         "import socket,time; s=socket.create_server(('0.0.0.0', 2222)); time.sleep(30)"],
    )  # fmt: skip
    try:
        with pytest.raises(OSError), socket.create_connection((network.agent_ip, 2222), 2):
            pass
    finally:
        listener.kill()
        listener.wait()


def _tls_files(tmp_path: Path, host: str) -> tuple[Path, Path, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert(host)
    files = (tmp_path / "hub.pem", tmp_path / "hub.key", tmp_path / "ca.pem")
    cert.cert_chain_pems[0].write_to_path(files[0])
    cert.private_key_pem.write_to_path(files[1])
    ca.cert_pem.write_to_path(files[2])
    return files


async def test_only_a_proxy_gets_out_ws_and_wss_http_connect_and_socks5(
    closed_network: Topology,
    hub_factory: Callable[..., Any],
    agent_processes: Any,
    tmp_path: Path,
) -> None:
    network = closed_network
    plain = await hub_factory(listen=f"{network.hub_ip}:0")
    cert, key, ca = _tls_files(tmp_path, network.hub_ip)
    secure = await hub_factory(listen=f"{network.hub_ip}:0", tls_cert=cert, tls_key=key)
    ws_url = f"ws://{network.hub_ip}:{plain.hub.port}"
    wss_url = f"wss://{network.hub_ip}:{secure.hub.port}"
    http = Tinyproxy(
        tmp_path / "tinyproxy", network.router_agent_ip, 3128,
        auth=("field", "Eng1-neer"), netns=network.router,
    )  # fmt: skip
    socks = Dante(
        tmp_path / "dante", network.router_agent_ip, 1080,
        external=network.router_hub_ip, netns=network.router,
    )  # fmt: skip
    try:
        # Without the proxy nothing gets out: doctor fails at TCP.
        direct = await run_in(
            network, "doctor", "--hub", ws_url, "--token", "t", "--timeout", "2", "--no-proxy"
        )
        assert direct.returncode == 1 and "FAIL  TCP" in direct.stdout, direct.stdout

        # ws:// through HTTP CONNECT with Basic credentials, chosen by HTTP_PROXY.
        http_env = {"HTTP_PROXY": http.url(), "NO_PROXY": "localhost,127.0.0.0/8"}
        token = await plain.token("enroll")
        first = agent_processes(
            network, "run", "--hub", ws_url, "--token", token, "--agent-id", "px-ws",
            "--state-dir", str(tmp_path / "px-ws"), env=http_env,
        )  # fmt: skip
        await wait_for(lambda: "px-ws" in plain.hub.registry.live, 30, what="ws via CONNECT")
        await ping(plain, "px-ws")
        assert "Eng1-neer" not in first.text()
        doctor = await run_in(network, "doctor", "--state-dir", str(tmp_path / "px-ws"),
                        "--hub", ws_url, env=http_env)  # fmt: skip
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert "chosen by HTTP_PROXY" in doctor.stdout
        assert "authenticated as 'field'" in doctor.stdout and "Eng1-neer" not in doctor.stdout

        # wss:// through SOCKS5, chosen by ALL_PROXY; TLS verified end to end with --ca-file.
        socks_env = {"ALL_PROXY": socks.url()}
        agent_processes(
            network, "run", "--hub", wss_url, "--token", await secure.token("enroll"),
            "--agent-id", "px-wss", "--ca-file", str(ca),
            "--state-dir", str(tmp_path / "px-wss"), env=socks_env,
        )  # fmt: skip
        await wait_for(lambda: "px-wss" in secure.hub.registry.live, 30, what="wss via SOCKS5")
        await ping(secure, "px-wss")
        assert secure.hub.registry.live["px-wss"].conn.transport.get_extra_info("ssl_object")

        # wss:// through CONNECT too (HTTPS_PROXY), and a wrong password: refused, one line.
        wrong = {"HTTPS_PROXY": http.url("field", "guess")}
        refused = agent_processes(
            network, "run", "--hub", wss_url, "--token", await secure.token("enroll"),
            "--agent-id", "px-bad", "--ca-file", str(ca),
            "--state-dir", str(tmp_path / "px-bad"), env=wrong,
        )  # fmt: skip
        await wait_for(lambda: "event=proxy_failed" in refused.text(), 30, what="refusal")
        line = next(x for x in refused.text().splitlines() if "event=proxy_failed" in x)
        assert "credentials" in line and "guess" not in refused.text()
        doctor = await run_in(network, "doctor", "--hub", wss_url, "--ca-file", str(ca),
                        "--token", "t", env=wrong)  # fmt: skip
        assert doctor.returncode == 1 and "FAIL  proxy" in doctor.stdout
        assert "[HTTPS_PROXY]" in doctor.stdout and "guess" not in doctor.stdout
        assert "px-bad" not in secure.hub.registry.records
    finally:
        http.stop()
        socks.stop()
