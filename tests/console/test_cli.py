"""``tether-console`` from outside, as the contract says: screenshot mode and its exit codes."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support import ROOT, HubProcess, run_cli

pytestmark = pytest.mark.slow


def _console(*args: str, env: dict[str, str] | None = None, timeout: float = 90):
    return subprocess.run(
        [sys.executable, "-m", "console", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT), "QT_QPA_PLATFORM": "offscreen", **(env or {})},
        check=False,
    )


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def running_hub(tmp_path_factory: pytest.TempPathFactory):
    tmp_path = tmp_path_factory.mktemp("hub")
    hub = HubProcess(tmp_path / "data").start()
    fleet = None
    try:
        enroll = run_cli("token", "create", "--data-dir", str(hub.data_dir), "--enroll").stdout
        viewer = run_cli(
            "token", "create", "--data-dir", str(hub.data_dir), "--admin", "--role", "viewer"
        ).stdout.strip()
        fleet = subprocess.Popen(
            [sys.executable, "-m", "agent", "simulate", "--hub", hub.url, "--token",
             enroll.strip(), "--count", "40", "--rate", "200", "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        metrics = hub.url.replace("ws://", "http://") + "/metrics"
        deadline = time.monotonic() + 60
        online = 0
        while online < 40 and time.monotonic() < deadline:
            with urllib.request.urlopen(metrics, timeout=5) as response:  # noqa: S310
                for line in response.read().decode().splitlines():
                    if line.startswith('tether_agents{state="online"}'):
                        online = int(float(line.split()[-1]))
            time.sleep(0.1)
        assert online >= 40, "the simulated fleet did not register"
        yield hub, viewer
    finally:
        if fleet is not None:
            fleet.terminate()
            fleet.wait(20)
        hub.stop()


@pytest.mark.parametrize("view", ["map", "agents", "graphs", "topology", "alerts", "jobs"])
def test_screenshot_of_each_view(running_hub, tmp_path: Path, view: str):
    hub, token = running_hub
    out = tmp_path / f"{view}.png"
    result = _console("--hub", hub.url, "--token", token, "--screenshot", str(out), "--view", view,
                      "--settings", str(tmp_path / "s.ini"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert _png_size(out) == (1600, 1000)
    assert out.stat().st_size > 20_000  # a rendered window, not a blank image


def test_screenshot_reads_the_environment(running_hub, tmp_path: Path):
    hub, token = running_hub
    out = tmp_path / "env.png"
    result = _console("--screenshot", str(out), "--settings", str(tmp_path / "s.ini"),
                      env={"TETHER_HUB_URL": hub.url, "TETHER_TOKEN": token})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert out.exists()


def test_a_refused_token_exits_2_at_once(running_hub, tmp_path: Path):
    hub, _token = running_hub
    started = time.monotonic()
    out = tmp_path / "no.png"
    result = _console("--hub", hub.url, "--token", "wrong", "--screenshot", str(out))
    assert result.returncode == 2
    assert "401" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert time.monotonic() - started < 20
    assert not out.exists()


def test_an_unreachable_hub_exits_2(tmp_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    quick = {"TETHER_CONSOLE_CONNECT_TIMEOUT": "2"}
    result = _console("--hub", f"ws://127.0.0.1:{port}", "--token", "t", "--screenshot",
                      str(tmp_path / "x.png"), env=quick)  # fmt: skip
    assert result.returncode == 2
    assert "could not connect" in result.stderr


def test_usage_errors_exit_2(tmp_path: Path):
    assert _console("--screenshot", str(tmp_path / "x.png"), env={"TETHER_HUB_URL": "",
                    "TETHER_TOKEN": ""}).returncode == 2  # fmt: skip
    assert _console("--hub", "http://x", "--token", "t").returncode == 2
    assert _console("--view", "nope").returncode == 2
