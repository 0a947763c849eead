"""Proxies: which one the agent chooses, and real dials through tinyproxy and Dante."""

from __future__ import annotations

import asyncio
import io
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.client import AgentClient, ClientSettings
from agent.doctor import DoctorOptions, doctor
from agent.executor import Executor
from agent.handlers import default_registry
from agent.journal import MemoryJournal
from agent.metrics import HostMetrics
from agent.profile import AgentProfile
from agent.proxy import ProxySettings, bypassed, parse_proxy_url
from agent.state import Credentials
from hub.protocol.client import AdminClient
from hub.protocol.tls import TlsOptions, make_ssl_context
from tests.conftest import HubHandle
from tests.support import job_done, wait_for

from .proxies import Dante, Tinyproxy
from .test_tls import _tls_hub

# -- choosing a proxy (pure) ------------------------------------------------------------------


def test_proxy_urls_parse_with_defaults_and_never_show_the_password() -> None:
    spec = parse_proxy_url("http://alice:s%3Acret@proxy.corp:3128")
    assert (spec.scheme, spec.host, spec.port, spec.username, spec.password) == (
        "http",
        "proxy.corp",
        3128,
        "alice",
        "s:cret",
    )
    assert spec.redacted() == "http://alice:***@proxy.corp:3128"
    assert "cret" not in repr(spec) and "cret" not in str(spec)
    assert parse_proxy_url("proxy.corp").port == 80  # no scheme: HTTP, as curl reads it
    assert parse_proxy_url("socks5h://gw").scheme == "socks5"
    assert parse_proxy_url("socks5://gw").port == 1080
    for bad, needle in [
        ("https://p:443", "TLS to the proxy"),
        ("socks4://p:1", "unsupported"),
        ("http://:3128", "no host"),
        ("http://p:99999", "not a proxy URL"),
    ]:
        with pytest.raises(ValueError, match=needle):
            parse_proxy_url(bad, "HTTPS_PROXY")


@pytest.mark.parametrize(
    ("host", "port", "no_proxy", "entry"),
    [
        ("hub.corp.example", 443, "corp.example", "corp.example"),
        ("hub.corp.example", 443, ".corp.example", ".corp.example"),
        ("hub.corp.example", 443, "*.corp.example", "*.corp.example"),
        ("corp.example", 443, ".corp.example", ".corp.example"),
        ("HUB.Corp.Example", 443, "corp.EXAMPLE", "corp.EXAMPLE"),
        ("notcorp.example", 443, "corp.example", None),
        ("10.1.2.3", 443, "localhost, 10.0.0.0/8", "10.0.0.0/8"),
        ("10.1.2.3", 443, "10.1.2.3", "10.1.2.3"),
        ("192.168.1.1", 443, "10.0.0.0/8", None),
        ("fd00::5", 443, "fd00::/8", "fd00::/8"),
        ("[fd00::5]", 443, "[fd00::5]:443", "[fd00::5]:443"),
        ("hub.corp", 443, "hub.corp:8443", None),
        ("hub.corp", 8443, "hub.corp:8443", "hub.corp:8443"),
        ("anything", 1, "*", "*"),
        ("hub", 443, "", None),
        ("hub.corp", 443, "10.0.0.0/8", None),  # names are not resolved for CIDR entries
    ],
)
def test_no_proxy_matches_hosts_suffixes_and_cidr(
    host: str, port: int, no_proxy: str, entry: str | None
) -> None:
    assert bypassed(host, port, no_proxy) == entry


def test_environment_precedence() -> None:
    env = {
        "HTTPS_PROXY": "http://upper:1",
        "https_proxy": "http://lower:2",
        "HTTP_PROXY": "http://plain:3",
        "ALL_PROXY": "socks5://all:4",
        "NO_PROXY": ".internal,10.0.0.0/8",
    }
    settings = ProxySettings.resolve(None, False, env)
    route = settings.route("wss://hub.example/ws")
    assert route.proxy is not None and route.proxy.host == "lower"  # lowercase wins
    assert route.source == "https_proxy"
    assert settings.route("ws://hub.example/ws").source == "HTTP_PROXY"
    only_all = ProxySettings.resolve(None, False, {"ALL_PROXY": "socks5://all:4"})
    assert only_all.route("wss://hub.example/ws").source == "ALL_PROXY"
    direct = settings.route("wss://hub.internal/ws")
    assert direct.proxy is None and "NO_PROXY entry '.internal'" in direct.reason
    assert settings.route("wss://10.9.8.7:8443/ws").proxy is None
    explicit = ProxySettings.resolve("socks5://mine:9", False, env)
    assert explicit.route("wss://hub.internal/ws").source == "--proxy"  # explicit: no NO_PROXY
    off = ProxySettings.resolve(None, True, env, "http://config:5")
    assert off.route("wss://hub.example/ws").proxy is None
    config = ProxySettings.resolve(None, False, {}, "http://config:5", "hub.example")
    assert config.route("wss://other/ws").source == "config proxy"
    assert config.route("wss://hub.example/ws").proxy is None
    # The environment beats the config file, as for every option.
    both = ProxySettings.resolve(None, False, {"https_proxy": "http://env:6"}, "http://config:5")
    assert both.route("wss://x/ws").source == "https_proxy"
    with pytest.raises(ValueError, match="HTTPS_PROXY"):
        ProxySettings.resolve(None, False, {"HTTPS_PROXY": "https://tls-proxy:443"})


# -- real proxies -------------------------------------------------------------------------------


@pytest.fixture
def daemons() -> Iterator[list[Any]]:
    started: list[Any] = []
    yield started
    for daemon in started:
        daemon.stop()


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., Any]]:
    running: list[tuple[AgentClient, asyncio.Task[None]]] = []

    async def start(urls: list[str], token: str, agent_id: str, **settings: Any) -> AgentClient:
        profile = AgentProfile(agent_id=agent_id, platform="linux")
        client = AgentClient(
            profile,
            ClientSettings(urls=urls, shutdown_grace=0.2, **settings),
            Credentials(token),
            Executor(profile, default_registry(), MemoryJournal()),
            HostMetrics(),
        )
        running.append((client, asyncio.ensure_future(client.run())))
        return client

    yield start
    for client, task in running:
        await client.shutdown()
        await asyncio.wait_for(task, 10)


async def round_trip(hub: HubHandle, agent_id: str) -> None:
    admin = AdminClient(hub.url, await hub.admin_token("operator"))
    await admin.open()
    try:
        reply = await admin.request("dispatch", target={"agent_ids": [agent_id]}, name="ping")
        detail = await wait_for(lambda: job_done(admin, reply["job_id"]), 15, what="job done")
        assert [c["state"] for c in detail["commands"]] == ["succeeded"]
    finally:
        await admin.close()


async def test_agent_registers_through_tinyproxy_with_basic_auth(
    hub: HubHandle,
    tmp_path: Path,
    daemons: list[Any],
    clients: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    proxy = Tinyproxy(tmp_path, auth=("alice", "pa55-w0rd"), connect_ports=(hub.hub.port,))
    daemons.append(proxy)
    settings = ProxySettings.resolve(None, False, {"http_proxy": proxy.url()})
    client = await clients([hub.url], await hub.agent_token("px-1"), "px-1", proxy=settings)
    await wait_for(lambda: client.registered, 15, what="registered through the proxy")
    assert proxy.connects() == 1
    # Small messages leave at once through the tunnel too (no Nagle delay on ack + result).
    sock = client.connection.transport.get_extra_info("socket")  # type: ignore[union-attr]
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    await round_trip(hub, "px-1")
    assert "pa55-w0rd" not in caplog.text  # the proxy password is never logged


@pytest.mark.parametrize(
    ("proxy_auth", "url_auth", "connect_ports", "needle"),
    [
        # tinyproxy answers 401 (not 407) to wrong credentials: both read as such.
        (("alice", "right"), ("alice", "wrong"), (), "refused the credentials"),
        (("alice", "right"), None, (), "407 Proxy Authentication Required"),
        (None, None, (443,), "403"),
    ],
)
async def test_proxy_refusals_are_one_line_and_back_off(
    hub: HubHandle,
    tmp_path: Path,
    daemons: list[Any],
    clients: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
    proxy_auth: tuple[str, str] | None,
    url_auth: tuple[str, str] | None,
    connect_ports: tuple[int, ...],
    needle: str,
) -> None:
    proxy = Tinyproxy(tmp_path, auth=proxy_auth, connect_ports=connect_ports)
    daemons.append(proxy)
    url = proxy.url(*url_auth) if url_auth else f"http://{proxy.host}:{proxy.port}"
    settings = ProxySettings.resolve(url, False, {})
    client = await clients([hub.url], await hub.agent_token("px-2"), "px-2", proxy=settings)
    await wait_for(lambda: client.last_delay is not None, 15, what="a refused dial")
    lines = [r.getMessage() for r in caplog.records if "event=proxy_failed" in r.getMessage()]
    assert lines and needle in lines[0] and "\n" not in lines[0]
    assert "wrong" not in caplog.text and "right" not in caplog.text
    assert client.last_error == "proxy: connect"
    assert not client.registered and "px-2" not in hub.hub.registry.records
    assert client.backoff.attempt >= 1  # the normal backoff, not a tight loop


async def test_agent_registers_through_dante_socks5_with_remote_dns(
    hub: HubHandle, tmp_path: Path, daemons: list[Any], clients: Callable[..., Any]
) -> None:
    name = "hub.only-the-proxy-knows.test"
    socks = Dante(
        tmp_path, block=(f"127.0.0.2/32 port = {hub.hub.port}",), hosts={name: "127.0.0.1"}
    )
    daemons.append(socks)
    with pytest.raises(OSError):  # this host cannot resolve it; only the proxy can
        await asyncio.get_running_loop().getaddrinfo(name, hub.hub.port)
    settings = ProxySettings.resolve(None, False, {"ALL_PROXY": socks.url()})
    url = f"ws://{name}:{hub.hub.port}"
    client = await clients([url], await hub.agent_token("sx-1"), "sx-1", proxy=settings)
    await wait_for(lambda: client.registered, 15, what="registered through SOCKS5")
    await round_trip(hub, "sx-1")
    assert socks.connects() >= 1

    refused = await clients(
        [f"ws://127.0.0.2:{hub.hub.port}"], await hub.agent_token("sx-2"), "sx-2", proxy=settings
    )
    await wait_for(lambda: refused.last_delay is not None, 15, what="a refused dial")
    assert refused.last_error == "proxy: connect" and not refused.registered


async def test_wss_runs_end_to_end_through_the_proxy(
    hub_factory: Callable[..., Any],
    tmp_path: Path,
    daemons: list[Any],
    clients: Callable[..., Any],
) -> None:
    tls = await _tls_hub(hub_factory, tmp_path)
    proxy = Tinyproxy(tmp_path / "p", auth=("bob", "hunter2"))
    daemons.append(proxy)
    settings = ProxySettings.resolve(None, False, {"HTTPS_PROXY": proxy.url()})
    options = TlsOptions(ca_file=str(tls.ca_file), pin_sha256=tls.fingerprint)
    client = await clients(
        [tls.url],
        await tls.handle.agent_token("tls-px"),
        "tls-px",
        proxy=settings,
        ssl_context=make_ssl_context(options),
        pin_sha256=tls.fingerprint,
    )
    await wait_for(lambda: client.registered, 15, what="wss through the proxy")
    assert proxy.connects() >= 1
    # A wrong pin still fails through the tunnel: TLS is end to end, not the proxy's.
    bad = await clients(
        [tls.url],
        await tls.handle.agent_token("tls-bad"),
        "tls-bad",
        proxy=settings,
        ssl_context=make_ssl_context(TlsOptions(ca_file=str(tls.ca_file))),
        pin_sha256=b"\0" * 32,
    )
    await wait_for(lambda: bad.last_delay is not None, 15, what="pin refused")
    assert not bad.registered

    out = io.StringIO()
    route = settings.route(tls.url + "/ws")
    ok = await doctor(
        DoctorOptions(
            url=tls.url,
            token=await tls.handle.agent_token("tls-doc"),
            profile=AgentProfile(agent_id="tls-doc"),
            ssl_context=make_ssl_context(options),
            pin_sha256=tls.fingerprint,
            route=route,
        ),
        out,
    )
    text = out.getvalue()
    assert ok, text
    assert "ok    proxy      http://bob:***@127.0.0.1" in text
    assert "chosen by HTTPS_PROXY" in text and "authenticated as 'bob'" in text
    assert "hunter2" not in text
    assert "ok    TLS" in text and "skip  DNS" in text


async def test_doctor_names_a_proxy_refusal(
    hub: HubHandle, tmp_path: Path, daemons: list[Any]
) -> None:
    proxy = Tinyproxy(tmp_path, auth=("alice", "right"))
    daemons.append(proxy)
    settings = ProxySettings.resolve(None, False, {"http_proxy": proxy.url("alice", "nope")})
    out = io.StringIO()
    options = DoctorOptions(
        url=hub.url,
        token=await hub.agent_token("d-1"),
        profile=AgentProfile(agent_id="d-1"),
        route=settings.route(hub.agent_url),
    )
    assert not await doctor(options, out)
    text = out.getvalue()
    assert "FAIL  proxy" in text and "credentials" in text and "[http_proxy]" in text
    assert "USER:PASS@" in text and "nope" not in text
