"""The plain HTTP paths of the hub's one port (PROTOCOL §1)."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from hub.app import Hub
from hub.config import HubConfig
from tests.conftest import HubHandle
from tests.hub.wire import Wire
from tests.support import wait_for


async def http_get(port: int, path: str, headers: str = "") -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    await writer.drain()
    async with asyncio.timeout(5):
        raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return status, fields, body


async def test_healthz(hub: HubHandle) -> None:
    status, headers, body = await http_get(hub.hub.port, "/healthz")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert body == b'{"status":"ok"}'


async def test_readyz_ready_then_not_ready_when_draining(hub: HubHandle) -> None:
    status, _, body = await http_get(hub.hub.port, "/readyz")
    assert (status, body) == (200, b'{"status":"ready"}')
    hub.hub.store_ready = False
    status, _, body = await http_get(hub.hub.port, "/readyz")
    assert status == 503
    assert body == b'{"status":"not_ready","reason":"store unavailable"}'


async def test_metrics_families(hub: HubHandle) -> None:
    status, headers, body = await http_get(hub.hub.port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    text = body.decode()
    for family in (
        "tether_agents",
        "tether_connections_total",
        "tether_disconnects_total",
        "tether_reconnects_total",
        "tether_commands_total",
        "tether_command_round_trip_seconds",
        "tether_admin_clients",
        "tether_messages_total",
    ):
        assert f"# TYPE {family.removesuffix('_total')} " in text or f"# TYPE {family} " in text
    assert 'tether_agents{state="online"} 0.0' in text


@pytest.mark.parametrize("path", ["/", "/nope", "/ws/extra", "/admin2", "/healthz/x"])
async def test_unknown_path_is_404(hub: HubHandle, path: str) -> None:
    status, _, body = await http_get(hub.hub.port, path)
    assert (status, body) == (404, b'{"error":"not_found"}')


@pytest.mark.parametrize("path", ["/ws", "/admin"])
async def test_plain_get_of_a_channel_is_426(hub: HubHandle, path: str) -> None:
    status, headers, _ = await http_get(hub.hub.port, path)
    assert status == 426
    assert headers["upgrade"] == "websocket"


async def test_health_needs_no_credential_even_with_a_query(hub: HubHandle) -> None:
    status, _, _ = await http_get(hub.hub.port, "/healthz?probe=1")
    assert status == 200


async def test_a_connection_made_while_the_hub_loads_waits_and_is_served(
    hub_factory, tmp_path
) -> None:
    """The hub listens before it reads its state back: a fleet reconnecting during a
    restart queues in the kernel's backlog instead of being refused."""
    data_dir = tmp_path / "slow"
    first = await hub_factory(data_dir=data_dir)
    await first.hub.stop()
    # Another process holds the database: the next hub's store waits for it (busy_timeout).
    holder = sqlite3.connect(data_dir / "tether.db", isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("UPDATE meta SET value = value")
    hub = Hub(HubConfig(listen="127.0.0.1:0", data_dir=data_dir, gc_freeze_interval=0))
    starting = asyncio.ensure_future(hub.start())
    try:
        await wait_for(lambda: hub.port != 0, what="listening")
        # Connected (the kernel accepted it for the hub) and the request written, while
        # the hub is still loading.
        probe = await Wire.open(hub.port)
        await probe.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert not starting.done()
        holder.execute("COMMIT")
        holder.close()
        response = await probe.read_response()
        assert (response.status, response.body) == (200, b'{"status":"ok"}')
        await starting
    finally:
        holder.close()
        if not starting.done():
            starting.cancel()
        await hub.stop()
