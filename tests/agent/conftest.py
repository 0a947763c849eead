"""Shared helpers for the agent tests: polling with a deadline, output collectors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psutil
import pytest

from agent.handlers import CommandContext, Stream
from agent.profile import AgentProfile
from tests.support import wait_for


async def eventually(
    condition: Callable[[], Any], timeout: float = 10.0, message: str = "condition"
) -> Any:
    """Poll ``condition`` until it is truthy; fail after ``timeout`` seconds."""
    return await wait_for(condition, timeout, interval=0.02, what=message)


def gone(pid: int) -> bool:
    """The process no longer runs (reaped, or a zombie waiting for a parent that never
    reaps: in a container, pid 1 may not)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class Collector:
    """Stands in for the hub side of ``emit``: records chunks in arrival order."""

    def __init__(self) -> None:
        self.chunks: list[tuple[Stream, str]] = []

    async def emit(self, stream: Stream, data: str) -> None:
        self.chunks.append((stream, data))

    def text(self, stream: Stream) -> str:
        return "".join(data for s, data in self.chunks if s == stream)


@pytest.fixture
def profile() -> AgentProfile:
    return AgentProfile(agent_id="test-agent", platform="linux", region="test", hostname="h")


@pytest.fixture
def collector() -> Collector:
    return Collector()


def context(
    profile: AgentProfile,
    collector: Collector,
    args: dict[str, Any],
    name: str = "exec",
    timeout: float = 30.0,
) -> CommandContext:
    return CommandContext(
        command_id="cmd-1",
        name=name,
        args=args,
        timeout=timeout,
        emit=collector.emit,
        agent=profile,
    )
