"""Fixtures for the edge tests: a namespaced network, agent processes inside it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT

from .netns import Topology


@pytest.fixture
def network() -> Iterator[Topology]:
    topology = Topology()
    try:
        yield topology
    finally:
        topology.close()
        assert topology.leftovers() == []


@pytest.fixture
def closed_network() -> Iterator[Topology]:
    """A network whose router forwards nothing: the proxy on it is the only way out."""
    topology = Topology(forward=False)
    try:
        yield topology
    finally:
        topology.close()
        assert topology.leftovers() == []


class AgentProcess:
    """``tether-agent …`` as a real process in the agent namespace, its log in a file."""

    def __init__(
        self,
        network: Topology,
        log: Path,
        *args: str,
        env: dict[str, str] | None = None,
        wrapper: tuple[str, ...] = (),
    ) -> None:
        self.log = log
        clean = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        clean = {k: v for k, v in clean.items() if not k.startswith("TETHER_")}
        self.env = {**clean, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
        self.argv = [*network.prefix(network.agent), *wrapper, sys.executable, "-m", "agent", *args]
        self._log = log.open("ab")
        self.process = subprocess.Popen(
            self.argv, stdout=self._log, stderr=self._log, env=self.env, cwd=ROOT
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


@pytest.fixture
def agent_processes(tmp_path: Path) -> Iterator[Any]:
    started: list[AgentProcess] = []

    def start(network: Topology, *args: str, **kwargs: Any) -> AgentProcess:
        log = tmp_path / f"agent-{len(started)}.log"
        process = AgentProcess(network, log, *args, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


async def run_in(network: Topology, *args: str, env: dict[str, str] | None = None,
                 timeout: float = 60, wrapper: tuple[str, ...] = ()
                 ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """``tether-agent ARGS`` to completion, in the agent namespace (in a thread: the hub
    runs on this process's event loop and must keep answering)."""
    clean = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    clean = {k: v for k, v in clean.items() if not k.startswith("TETHER_")}
    return await asyncio.to_thread(
        subprocess.run,
        [*network.prefix(network.agent), *wrapper, sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**clean, "PYTHONPATH": str(ROOT), **(env or {})},
        cwd=ROOT,
        check=False,
    )
