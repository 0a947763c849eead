"""The command-line contract: options, environment variables, exit codes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import pytest

from agent.cli import main, resolve_hubs

from .conftest import eventually

ROOT = Path(__file__).resolve().parents[2]


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TETHER_", "CONTROL_"))}
    env.update(extra)
    return env


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        ([], "a command is required"),
        (["bogus"], "invalid choice"),
        (["run", "--token", "t", "--agent-id", "a"], "hub URL is required"),
        (["run", "--hub", "http://h", "--token", "t", "--agent-id", "a"], "ws:// or wss://"),
        (["run", "--hub", "ws://h"], "agent id is required"),
        (["run", "--hub", "ws://h", "--agent-id", "bad/id"], "must match"),
        (["run", "--hub", "ws://h", "--agent-id", "a", "--label", "novalue"], "KEY=VALUE"),
        (["run", "--hub", "ws://h", "--agent-id", "a", "--lat", "1"], "go together"),
        (["run", "--hub", "ws://h", "--agent-id", "a", "--lat", "91", "--lon", "0"], "-90"),
        (["run", "--hub", "ws://h", "--agent-id", "a", "--max-concurrency", "0"], "at least 1"),
        (["run", "--hub", "ws://h", "--agent-id", "a", "--lat", "x"], "invalid float"),
        (["run", "--hub", "wss://h", "--agent-id", "a", "--hub-cert-sha256", "ab"], "64 hex"),
        (["run", "--hub", "wss://h", "--agent-id", "a", "--key", "k.pem"], "--key needs"),
        (["simulate", "--hub", "ws://h", "--token", "t"], "--count"),
        (["simulate", "--hub", "ws://h", "--token", "t", "--count", "0"], "--count"),
        (["simulate", "--hub", "ws://h", "--token", "t", "--count", "2", "--prefix=-"], "prefix"),
        (["simulate", "--hub", "ws://h", "--count", "2"], "enrollment key is required"),
        (
            ["simulate", "--hub", "ws://h", "--token", "t", "--count", "2", "--source", "lo"],
            "--source",
        ),
        (["doctor", "--hub", "ws://h"], "token is required"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    env = clean_env(TETHER_STATE_DIR=str(tmp_path / "state"))
    assert main(argv, env) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tether-agent")
    assert needle in err


def test_run_without_any_credential_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    env = clean_env(TETHER_HUB_URL="ws://127.0.0.1:1", TETHER_STATE_DIR=str(tmp_path))
    assert main(["run", "--agent-id", "edge-1"], env) == 2
    assert "token is required" in capsys.readouterr().err


def test_hub_urls_flag_beats_env_and_env_falls_back() -> None:
    env = {"TETHER_HUB_URL": "ws://a:1, ws://b:2", "CONTROL_PLANE_URL": "ws://c:3"}
    assert resolve_hubs(["ws://flag:9"], env) == ["ws://flag:9"]
    assert resolve_hubs(None, env) == ["ws://a:1", "ws://b:2"]
    assert resolve_hubs(None, {"CONTROL_PLANE_URL": "ws://c:3,wss://d"}) == [
        "ws://c:3",
        "wss://d",
    ]


def test_doctor_reads_env_and_flags_win(capsys: pytest.CaptureFixture[str]) -> None:
    p1, p2, p3 = closed_port(), closed_port(), closed_port()
    env = clean_env(
        TETHER_HUB_URL=f"ws://127.0.0.1:{p1},ws://127.0.0.1:{p2}",
        CONTROL_PLANE_URL=f"ws://127.0.0.1:{p3}",
        TETHER_TOKEN="tok",
        TETHER_AGENT_ID="env-agent",
    )
    assert main(["doctor", "--timeout", "3"], env) == 1  # nothing listens: TCP fails
    out = capsys.readouterr().out
    assert f"ws://127.0.0.1:{p1}/ws as agent 'env-agent'" in out
    assert f"ws://127.0.0.1:{p2}/ws" in out
    assert f":{p3}" not in out  # CONTROL_PLANE_URL is only the fallback
    assert "FAIL  TCP" in out and "refused" in out

    assert main(["doctor", "--hub", f"ws://127.0.0.1:{p3}", "--agent-id", "flag-agent"], env) == 1
    out = capsys.readouterr().out
    assert f"ws://127.0.0.1:{p3}/ws as agent 'flag-agent'" in out
    assert f":{p1}" not in out

    fallback = clean_env(CONTROL_PLANE_URL=f"ws://127.0.0.1:{p3}", TETHER_TOKEN="tok")
    assert main(["doctor"], fallback) == 1
    assert f"ws://127.0.0.1:{p3}/ws" in capsys.readouterr().out


async def test_run_uses_env_state_dir_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = clean_env(
        TETHER_HUB_URL=f"ws://127.0.0.1:{closed_port()}",
        TETHER_TOKEN="s3cr3t-T0KEN",
        TETHER_AGENT_ID="edge-env",
        TETHER_STATE_DIR=str(state),
        PYTHONPATH=str(ROOT),
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent",
        "run",
        "--label",
        "site=here",
        "tier=edge",
        env=env,
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    lines: list[str] = []

    async def read() -> None:
        assert proc.stderr is not None
        async for line in proc.stderr:
            lines.append(line.decode())

    reader = asyncio.ensure_future(read())
    try:
        await eventually(lambda: any("connect_failed" in line for line in lines), 20, "a dial")
        assert (state / "journal.sqlite3").exists()
        assert any("agent_id=edge-env" in line for line in lines)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await reader
    assert any("event=stopped" in line for line in lines)
    assert not any("s3cr3t-T0KEN" in line for line in lines)  # never log a token


async def test_second_agent_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    from agent.state import lock_state_dir, prepare_state_dir

    held = lock_state_dir(prepare_state_dir(tmp_path))
    try:
        env = clean_env(PYTHONPATH=str(ROOT))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent",
            "run",
            "--hub",
            "ws://127.0.0.1:1",
            "--token",
            "t",
            "--agent-id",
            "dup",
            "--state-dir",
            str(tmp_path),
            env=env,
            cwd=ROOT,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        held.close()
    assert proc.returncode == 2
    assert b"another tether-agent is using" in err


def test_config_file_is_below_the_environment_and_the_flags(tmp_path: Path) -> None:
    import argparse

    from agent.cli import UsageError, apply_config

    config = tmp_path / "agent.toml"
    config.write_text(
        'hub = "ws://config:1"\nagent_id = "from-config"\nregion = "cfg"\n'
        'token = "cfg-token"\nproxy = "http://p:3128"\n[labels]\nsite = "cfg"\ntier = "edge"\n'
    )

    def args(**given: object) -> argparse.Namespace:
        values: dict[str, object] = {
            "config": str(config), "hub": None, "agent_id": None, "platform": None,
            "region": None, "state_dir": None, "ca_file": None, "cert": None, "key": None,
            "hub_cert_sha256": None, "lat": None, "lon": None, "token": None,
            "token_file": None, "label": [],
        }  # fmt: skip
        values.update(given)
        return argparse.Namespace(**values)

    filled = args()
    loaded = apply_config(filled, {})
    assert filled.hub == ["ws://config:1"] and filled.agent_id == "from-config"
    assert filled.token == "cfg-token" and loaded["proxy"] == "http://p:3128"
    assert sorted(filled.label) == ["site=cfg", "tier=edge"]
    env = {"TETHER_AGENT_ID": "from-env", "TETHER_TOKEN": "env-token"}
    under_env = args(label=["site=flag"])
    apply_config(under_env, env)
    assert under_env.agent_id is None  # the environment's value is used by resolve_agent_id
    assert under_env.token is None and "site=flag" in under_env.label
    assert "site=cfg" not in under_env.label
    flagged = args(region="flag")
    apply_config(flagged, {})
    assert flagged.region == "flag"

    config.write_text('hub = "ws://x:1"\nhubs = "typo"\n')
    with pytest.raises(UsageError, match="unknown key 'hubs'"):
        apply_config(args(), {})
