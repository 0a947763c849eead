"""Helpers for console tests: real agents on the agent channel, a console window on a hub."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from tests.conftest import HubHandle
from tests.support import RawAgent, online_agent, wait_for

__all__ = ["Responder", "online_agent", "open_window", "wait_for"]


async def open_window(
    hub: HubHandle, role: str, settings_path: Path, *, show: bool = True, token: str | None = None
) -> Any:
    from console.app import ConnectionParams
    from console.settings import ConsoleSettings, TokenStore
    from console.window import MainWindow

    settings = ConsoleSettings(str(settings_path))
    window = MainWindow(settings, TokenStore(settings))
    window.resize(1400, 900)
    if show:
        window.show()
    token = token or await hub.admin_token(role)
    window.connect_to(ConnectionParams(hub.url, token))
    await wait_for(lambda: window.fleet.snapshot_count > 0, 10, what="the first snapshot")
    window.fleet.flush()
    return window


class Responder:
    """Answers the commands a RawAgent receives, the way PROTOCOL §4.3 says an agent does."""

    def __init__(self, agent: RawAgent, agent_id: str) -> None:
        self.agent = agent
        self.agent_id = agent_id
        self.received: list[dict[str, Any]] = []
        self.cancels: list[str] = []
        self.task = asyncio.ensure_future(self._run())
        self._sleeping: dict[str, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Future[Any]] = set()

    async def _run(self) -> None:
        with contextlib.suppress(Exception):
            while True:
                message = await self.agent.recv(timeout=3600)
                if message.get("type") == "command":
                    self.received.append(message)
                    task = asyncio.ensure_future(self._answer(message))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                elif message.get("type") == "cancel":
                    self.cancels.append(message["command_id"])
                    waiter = self._sleeping.get(message["command_id"])
                    if waiter is not None and not waiter.done():
                        waiter.set_result(None)

    async def _answer(self, command: dict[str, Any]) -> None:
        command_id = command["command_id"]
        send = self.agent.send
        await send({"type": "ack", "command_id": command_id})
        name = command["name"]
        if name == "ping":
            await send({"type": "result", "command_id": command_id, "status": "succeeded",
                        "exit_code": None, "data": {"pong": True}})  # fmt: skip
        elif name == "exec":
            argv = command["args"]["argv"]
            text = f"{self.agent_id} ran {' '.join(argv)}\n"
            await send({"type": "output", "command_id": command_id, "seq": 0,
                        "stream": "stdout", "data": text})  # fmt: skip
            await send({"type": "output", "command_id": command_id, "seq": 1,
                        "stream": "stderr", "data": "<b>not bold</b>\n"})  # fmt: skip
            await send({"type": "result", "command_id": command_id, "status": "succeeded",
                        "exit_code": 0})  # fmt: skip
        elif name == "sleep":
            waiter = asyncio.get_running_loop().create_future()
            self._sleeping[command_id] = waiter
            await waiter
            await send({"type": "result", "command_id": command_id, "status": "cancelled"})
        else:
            await send({"type": "result", "command_id": command_id, "status": "rejected",
                        "error": f"unknown command {name}"})  # fmt: skip

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task
        await self.agent.close()
