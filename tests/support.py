"""Helpers for tests: a raw agent on an independent WebSocket client, waits with deadlines,
hub processes. Nothing here stands in for Tether's own parts; it drives them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

if TYPE_CHECKING:
    from hub.protocol.client import AdminClient
    from tests.conftest import HubHandle

ROOT = Path(__file__).resolve().parent.parent


async def wait_for(
    condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01, what: str = ""
) -> Any:
    """Poll ``condition`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        await asyncio.sleep(interval)


class FakeClock:
    """A clock the test moves by hand (``clock.now += 5``), for code that takes ``clock=``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def job_done(admin: AdminClient, job_id: str) -> dict[str, Any] | None:
    """The job and its commands once it has finished, else None: a ``wait_for`` condition."""
    detail = await admin.request("job", job_id=job_id)
    return detail if detail["job"]["state"] != "running" else None


class RawAgent:
    """An agent spoken by hand through the ``websockets`` library's own client.

    Protocol tests use it to send exactly the bytes they mean (good or bad) and to read
    exactly what the hub answers, independently of Tether's own connection code.
    """

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    @classmethod
    async def connect(
        cls,
        url: str,
        token: str | None,
        *,
        subprotocols: list[str] | None = None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> RawAgent:
        extra = dict(headers or {})
        if token is not None:
            extra["Authorization"] = f"Bearer {token}"
        ws = await connect(
            url,
            additional_headers=extra,
            subprotocols=subprotocols,  # type: ignore[arg-type]
            open_timeout=5,
            ping_interval=None,
            max_size=None,
            **kwargs,
        )
        return cls(ws)

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        if isinstance(message, dict):
            message = json.dumps(message)
        await self.ws.send(message)

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            data = await self.ws.recv()
        return json.loads(data)

    async def recv_type(self, kind: str, timeout: float = 5.0) -> dict[str, Any]:
        """The next message of type ``kind``, skipping others."""
        deadline = time.monotonic() + timeout
        while True:
            message = await self.recv(max(0.01, deadline - time.monotonic()))
            if message.get("type") == kind:
                return message

    async def register(self, agent_id: str, **fields: Any) -> dict[str, Any]:
        message = {
            "type": "register",
            "agent_id": agent_id,
            "platform": "linux",
            "region": "eu-central",
            "version": "1.0.0",
            "hostname": agent_id,
            "capabilities": ["ping", "sysinfo", "exec", "sleep"],
        }
        message.update(fields)
        await self.send(message)
        return await self.recv_type("welcome")

    async def closed(self, timeout: float = 5.0) -> int | None:
        """Wait for the hub to close; the close code it sent."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await self.ws.recv()
        except ConnectionClosed:
            pass
        rcvd = self.ws.protocol.close_rcvd
        return rcvd.code if rcvd is not None else None

    async def close(self) -> None:
        await self.ws.close()


async def fleet(hub: HubHandle, count: int, **fields: Any) -> list[RawAgent]:
    """``count`` registered raw agents, ``edge-00`` onwards, enrolled with one shared key."""
    enroll = await hub.token("enroll")
    agents = []
    for n in range(count):
        agent = await RawAgent.connect(hub.agent_url, enroll)
        await agent.register(f"edge-{n:02d}", **fields)
        agents.append(agent)
    return agents


async def online_agent(hub: HubHandle, agent_id: str = "edge-1", **fields: Any) -> RawAgent:
    """A registered raw agent with a fresh key of its own."""
    agent = await RawAgent.connect(hub.agent_url, await hub.agent_token(agent_id))
    await agent.register(agent_id, **fields)
    return agent


async def refused_status(url: str, token: str | None = None, **kwargs: Any) -> tuple[int, Any]:
    """Attempt an upgrade that should be refused: (HTTP status, parsed JSON body)."""
    try:
        agent = await RawAgent.connect(url, token, **kwargs)
    except InvalidStatus as exc:
        response = exc.response
        body = json.loads(response.body) if response.body else None
        return response.status_code, (body, response.headers)
    await agent.close()
    raise AssertionError("the upgrade was accepted")


class HubProcess:
    """``tether-hub serve`` as a real child process (for kill -9 and SIGTERM tests)."""

    def __init__(self, data_dir: Path, *extra: str, port: int = 0) -> None:
        self.data_dir = data_dir
        self.extra = extra
        self.port = port
        self.process: subprocess.Popen[str] | None = None
        self.log: list[str] = []
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> HubProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hub", "serve", "--listen", f"127.0.0.1:{self.port}",
             "--data-dir", str(self.data_dir), *self.extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise AssertionError(f"hub exited early: {''.join(self.log)}")
            self.log.append(line)
            found = re.search(r"listening on [\d.]+:(\d+)", line)
            if found:
                self.port = int(found.group(1))
                # Keep reading: a hub (or its workers) writing to a pipe nobody reads
                # blocks once the pipe is full, and then cannot even stop.
                self._reader = threading.Thread(target=self._drain, daemon=True)
                self._reader.start()
                return self
        raise AssertionError("hub did not start in time")

    def _drain(self) -> None:
        process = self.process
        assert process is not None and process.stdout is not None
        for line in process.stdout:
            self.log.append(line)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self, timeout: float = 15.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            tail = "".join(self.log[-60:])
            raise AssertionError(f"still draining after {timeout} s; its log:\n{tail}") from None
        if self._reader is not None:
            self._reader.join(5)
        return code

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def run_cli(
    *args: str, timeout: float = 60.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m hub ARGS`` (or ``-m agent`` when args[0] == 'agent')."""
    module = "hub"
    if args and args[0] in ("agent", "console"):
        module, args = args[0], args[1:]
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        check=False,
    )


async def run_cli_async(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_cli, *args, timeout=timeout)


Waiter = Callable[[], Awaitable[Any]]
