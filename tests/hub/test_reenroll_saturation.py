"""A hub that cannot keep up refuses early and cheaply (issue 20).

A saturated hub accepts connections late: each waited in the kernel's accept queue while
the agent's open timeout ran. Such a connection is answered at once with PROTOCOL §2's
``503`` + ``Retry-After`` (``overloaded``) instead of a handshake the agent may have given
up on, and the agent comes back after the Retry-After with its jitter. Real sockets: the
hub is made late by blocking its event loop (in process) or stopping its process
(SIGSTOP), while the clients' connections wait in the kernel's queue.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
from pathlib import Path

from agent.client import AgentClient, ClientSettings
from agent.executor import Executor
from agent.handlers import default_registry
from agent.journal import MemoryJournal
from agent.metrics import HostMetrics
from agent.profile import AgentProfile
from agent.state import Credentials, KeyFile, prepare_state_dir
from hub.protocol.constants import AGENT_SUBPROTOCOL
from tests.conftest import HubHandle
from tests.support import HubProcess, run_cli, wait_for

DELAY = 0.3


def upgrade(port: int, token: str) -> bytes:
    return (
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {AGENT_SUBPROTOCOL}\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    ).encode()


def accept_queue(port: int) -> int:
    """Connections waiting in the kernel's accept queue of the socket listening on ``port``
    (``rx_queue`` of its LISTEN line in /proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
            return int(fields[4].split(":")[1], 16)
    return 0


class QueuedClient(threading.Thread):
    """A raw client in a thread of its own: connects and sends its upgrade while the hub's
    loop is blocked (the kernel accepts it into the queue), then reads the answer."""

    def __init__(self, port: int, token: str) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.token = token
        self.sent = threading.Event()
        self.answer = b""

    def run(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            sock.sendall(upgrade(self.port, self.token))
            self.sent.set()
            while b"\r\n\r\n" not in self.answer:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                self.answer += chunk
            if self.answer.startswith(b"HTTP/1.1 503"):
                while chunk := sock.recv(4096):
                    self.answer += chunk


def queued_while_blocked(port: int, token: str, hold: float) -> QueuedClient:
    """Block the running event loop (the in-process hub's) until a client's request has
    waited ``hold`` seconds in the kernel: the hub is that far behind when it accepts."""
    client = QueuedClient(port, token)
    client.start()
    assert client.sent.wait(10), "the client could not connect"
    sent = time.monotonic()
    while time.monotonic() - sent < hold:
        time.sleep(0.01)  # the hub's loop is busy: this is the saturation under test
    return client


async def answered(client: QueuedClient) -> bytes:
    await wait_for(lambda: not client.is_alive(), 10, what="the client's answer")
    return client.answer


async def test_a_connection_accepted_late_is_refused_503_with_retry_after(
    hub_factory,
) -> None:
    hub: HubHandle = await hub_factory(max_queue_delay=DELAY)
    token = await hub.agent_token("edge-1")
    client = queued_while_blocked(hub.hub.port, token, 3 * DELAY)
    answer = await answered(client)
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 503 Service Unavailable"
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert int(headers["Retry-After"]) >= 1
    assert json.loads(body) == {"error": "overloaded"}
    assert hub.hub.metrics.connections["overloaded"] == 1
    await hub.hub.auditor.drain()
    page = await hub.hub.store.audit_entries({"action": "connection.refused"}, 10, None)
    assert [e["detail"]["reason"] for e in page.items] == ["hub behind: accepted late"]
    # Caught up, the hub admits the next connection as usual.
    again = QueuedClient(hub.hub.port, token)
    again.start()
    assert (await answered(again)).startswith(b"HTTP/1.1 101")


async def test_a_hub_that_keeps_up_admits_a_connection_accepted_a_little_late(
    hub_factory,
) -> None:
    """Within the bound (and with the check off), a late connection is served: the bound
    is about a hub behind, not a slow turn."""
    for delay, hold in ((10.0, DELAY), (0.0, 3 * DELAY)):
        hub: HubHandle = await hub_factory(max_queue_delay=delay)
        token = await hub.agent_token("edge-1")
        client = queued_while_blocked(hub.hub.port, token, hold)
        assert (await answered(client)).startswith(b"HTTP/1.1 101"), (delay, hold)
        assert "overloaded" not in hub.hub.metrics.connections


async def test_the_agent_comes_back_after_the_retry_after(tmp_path: Path) -> None:
    """A real agent dials a hub process that is stopped (SIGSTOP): its connection waits in
    the kernel's queue. Resumed, the hub answers 503 + Retry-After at once; the agent waits
    at least the Retry-After (its plain first backoff would be under a second), then
    registers."""
    config = tmp_path / "hub.toml"
    config.write_text(f"[hub]\nmax_queue_delay = {DELAY}\n")
    token = run_cli("token", "create", "--data-dir", str(tmp_path / "hub"), "--enroll")
    token.check_returncode()
    hub = HubProcess(tmp_path / "hub", "--config", str(config)).start()
    client: AgentClient | None = None
    task: asyncio.Task[None] | None = None
    try:
        state = prepare_state_dir(tmp_path / "agent")
        profile = AgentProfile(agent_id="edge-1", platform="linux", region="eu-central")
        client = AgentClient(
            profile,
            ClientSettings(urls=[hub.url], shutdown_grace=0.5),
            Credentials.from_state(token.stdout.strip(), KeyFile(state)),
            Executor(profile, default_registry(None), MemoryJournal()),
            HostMetrics(),
        )
        assert hub.process is not None
        hub.process.send_signal(signal.SIGSTOP)
        try:
            task = asyncio.ensure_future(client.run())
            await wait_for(lambda: accept_queue(hub.port) >= 1, 10, what="queued")
            await asyncio.sleep(3 * DELAY)  # the hub stays stopped: it falls behind
        finally:
            hub.process.send_signal(signal.SIGCONT)
        await wait_for(lambda: client.last_error == "HTTP 503", 10, what="refused 503")
        assert client.last_delay is not None and client.last_delay >= 1.0
        await wait_for(lambda: client.registered, 20, what="registered after the wait")
        assert client.attempts == 2
    finally:
        if client is not None and task is not None:
            await client.shutdown()
            await asyncio.wait_for(task, 10)
        hub.stop()
