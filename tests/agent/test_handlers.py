"""Handlers against real processes: exec output, exit codes, whole-tree kills, allow-lists."""

from __future__ import annotations

import asyncio
import shutil
import sys
import textwrap

import psutil
import pytest

from agent.handlers import Rejected, default_registry
from agent.handlers import ping as ping_handler
from agent.handlers import sysinfo as sysinfo_handler
from agent.handlers.exec import CHUNK, ExecHandler, ExecPolicy
from agent.profile import AgentProfile

from .conftest import Collector, context, eventually, gone

PY = sys.executable
ANY = ExecHandler(ExecPolicy())


def py(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


async def test_exec_success_streams_stdout_and_reports_exit_zero(
    profile: AgentProfile, collector: Collector
) -> None:
    result = await ANY(context(profile, collector, {"argv": py("print('hello')")}))
    assert result.status == "succeeded"
    assert result.exit_code == 0
    assert result.error is None
    assert collector.text("stdout") == "hello\n"
    assert result.data == {"output_bytes": 6, "truncated": False}


async def test_exec_failure_reports_exit_code_and_stderr(
    profile: AgentProfile, collector: Collector
) -> None:
    code = "import sys; sys.stderr.write('boom'); sys.exit(3)"
    result = await ANY(context(profile, collector, {"argv": py(code)}))
    assert result.status == "failed"
    assert result.exit_code == 3
    assert result.error == "exit code 3"
    assert collector.text("stderr") == "boom"


async def test_exec_streams_large_output_in_order(
    profile: AgentProfile, collector: Collector
) -> None:
    code = """
        import sys
        for i in range(20000):
            sys.stdout.write(f"line {i}\\n")
            if i % 5000 == 0:
                sys.stderr.write(f"mark {i}\\n")
    """
    result = await ANY(context(profile, collector, {"argv": py(code)}))
    assert result.status == "succeeded"
    expected = "".join(f"line {i}\n" for i in range(20000))
    assert collector.text("stdout") == expected
    assert collector.text("stderr") == "".join(f"mark {i}\n" for i in range(0, 20000, 5000))
    assert len(collector.chunks) > 2  # really streamed, not one blob at the end
    assert all(len(data.encode()) <= CHUNK for _, data in collector.chunks)


async def test_exec_coalesces_a_trickle_of_small_writes(
    profile: AgentProfile, collector: Collector
) -> None:
    code = """
        import sys, time
        for i in range(300):
            sys.stdout.write(f"{i}\\n")
            sys.stdout.flush()
            time.sleep(0.002)
    """
    started = asyncio.get_running_loop().time()
    result = await ANY(context(profile, collector, {"argv": py(code)}))
    elapsed = asyncio.get_running_loop().time() - started
    assert result.status == "succeeded"
    assert collector.text("stdout") == "".join(f"{i}\n" for i in range(300))
    # One message per 0.1 s at most (plus the last), instead of one per write.
    assert len(collector.chunks) <= elapsed / 0.1 + 2


async def test_exec_decodes_utf8_across_chunks_and_replaces_bad_bytes(
    profile: AgentProfile, collector: Collector
) -> None:
    code = f"""
        import sys
        sys.stdout.buffer.write(b"a" * {CHUNK - 1} + "é€".encode() * 100 + b"\\xff!")
    """
    result = await ANY(context(profile, collector, {"argv": py(code)}))
    assert result.status == "succeeded"
    assert collector.text("stdout") == "a" * (CHUNK - 1) + "é€" * 100 + "\ufffd!"


async def test_exec_output_beyond_the_budget_is_dropped_and_flagged(
    profile: AgentProfile, collector: Collector
) -> None:
    handler = ExecHandler(ExecPolicy(max_output=1000))
    result = await handler(context(profile, collector, {"argv": py("print('x' * 50000)")}))
    assert result.status == "succeeded"
    assert collector.text("stdout") == "x" * 1000
    assert result.data == {"output_bytes": 1000, "truncated": True}


async def test_exec_passes_cwd_and_env_but_never_the_agent_token(
    profile: AgentProfile, collector: Collector, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TETHER_TOKEN", "s3cret")
    code = (
        "import os; print(os.getcwd(), os.environ.get('GREETING'), os.environ.get('TETHER_TOKEN'))"
    )
    args = {"argv": py(code), "cwd": str(tmp_path), "env": {"GREETING": "hi"}}
    result = await ANY(context(profile, collector, args))
    assert result.status == "succeeded"
    assert collector.text("stdout") == f"{tmp_path} hi None\n"


async def test_exec_runs_without_a_shell(profile: AgentProfile, collector: Collector) -> None:
    result = await ANY(context(profile, collector, {"argv": ["echo", "$HOME", "; ls", "|", "x"]}))
    assert result.status == "succeeded"
    assert collector.text("stdout") == "$HOME ; ls | x\n"


async def test_exec_missing_program_fails(profile: AgentProfile, collector: Collector) -> None:
    result = await ANY(context(profile, collector, {"argv": ["no-such-program-xyz"]}))
    assert result.status == "failed"
    assert "not found" in (result.error or "")


@pytest.mark.parametrize(
    "args",
    [
        {},
        {"argv": []},
        {"argv": "ls -l"},
        {"argv": ["ls", 3]},
        {"argv": [""]},
        {"argv": ["ls"], "cwd": 5},
        {"argv": ["ls"], "env": {"A": 1}},
        {"argv": ["ls"], "env": ["A=1"]},
        {"argv": ["ls"], "env": {"A=B": "1"}},
    ],
)
async def test_exec_rejects_invalid_args(
    profile: AgentProfile, collector: Collector, args: dict
) -> None:
    with pytest.raises(Rejected):
        await ANY(context(profile, collector, args))


async def test_allow_list_matches_argv0_or_its_basename(
    profile: AgentProfile, collector: Collector
) -> None:
    handler = ExecHandler(ExecPolicy(programs=frozenset({"echo"})))
    ok = await handler(context(profile, collector, {"argv": ["echo", "a"]}))
    assert ok.status == "succeeded"
    echo = shutil.which("echo")
    assert echo is not None
    ok_path = await handler(context(profile, collector, {"argv": [echo, "b"]}))
    assert ok_path.status == "succeeded"
    assert collector.text("stdout") == "a\nb\n"
    with pytest.raises(Rejected, match="allow-exec"):
        await handler(context(profile, collector, {"argv": ["ls"]}))


async def test_allow_list_of_full_paths_does_not_match_other_paths(
    profile: AgentProfile, collector: Collector
) -> None:
    handler = ExecHandler(ExecPolicy(programs=frozenset({"/opt/tools/echo"})))
    with pytest.raises(Rejected):
        await handler(context(profile, collector, {"argv": ["echo"]}))


async def test_command_path_cannot_redirect_an_allowed_name(
    profile: AgentProfile, collector: Collector, tmp_path
) -> None:
    fake = tmp_path / "echo"
    fake.write_text("#!/bin/sh\necho EVIL\n")
    fake.chmod(0o755)
    handler = ExecHandler(ExecPolicy(programs=frozenset({"echo"})))
    args = {"argv": ["echo", "real"], "env": {"PATH": str(tmp_path)}}
    result = await handler(context(profile, collector, args))
    assert result.status == "succeeded"
    assert collector.text("stdout") == "real\n"


TREE = """
    import os, signal, subprocess, sys, time
    kind = sys.argv[1]
    if kind == "stubborn":
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    else:
        child = subprocess.Popen(["sleep", "600"], start_new_session=(kind == "escaped"))
    print(child.pid, flush=True)
    time.sleep(600)
"""


async def _start_tree(kind: str, profile: AgentProfile, collector: Collector, timeout: float):
    handler = ExecHandler(ExecPolicy(grace=0.5))
    ctx = context(profile, collector, {"argv": [*py(TREE), kind]}, timeout=timeout)
    task = asyncio.ensure_future(handler(ctx))
    line = await eventually(lambda: collector.text("stdout").strip(), message="grandchild pid")
    grandchild = int(line)
    child = psutil.Process(grandchild).ppid()
    assert not gone(child) and not gone(grandchild)
    return task, child, grandchild


@pytest.mark.parametrize("kind", ["plain", "escaped", "stubborn"])
async def test_cancel_kills_the_whole_tree(
    profile: AgentProfile, collector: Collector, kind: str
) -> None:
    task, child, grandchild = await _start_tree(kind, profile, collector, 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: gone(child) and gone(grandchild), message="tree gone")


async def test_timeout_kills_the_whole_tree(profile: AgentProfile, collector: Collector) -> None:
    handler = ExecHandler(ExecPolicy(grace=0.5))
    ctx = context(profile, collector, {"argv": [*py(TREE), "plain"]})
    pids: list[int] = []

    async def run() -> None:
        async with asyncio.timeout(1.0):
            await handler(ctx)

    task = asyncio.ensure_future(run())
    line = await eventually(lambda: collector.text("stdout").strip(), message="grandchild pid")
    pids.append(int(line))
    pids.append(psutil.Process(pids[0]).ppid())
    with pytest.raises(TimeoutError):
        await task
    await eventually(lambda: all(gone(pid) for pid in pids), message="tree gone")


async def test_ping_and_sysinfo(profile: AgentProfile, collector: Collector) -> None:
    pong = await ping_handler.handle(context(profile, collector, {}, name="ping"))
    assert pong.status == "succeeded"
    assert pong.data["pong"] is True and pong.data["time"].endswith("Z")
    info = await sysinfo_handler.handle(context(profile, collector, {}, name="sysinfo"))
    assert info.status == "succeeded"
    assert info.data["cpu"]["logical"] >= 1
    assert info.data["memory"]["total"] > 0
    assert info.data["uptime_s"] > 0
    assert {"hostname", "platform", "disks"} <= set(info.data)


def test_registry_declares_exec_only_when_allowed() -> None:
    plain = default_registry()
    assert plain.capabilities == ["ping", "sysinfo"]
    refusal = plain.lookup("exec")
    assert isinstance(refusal, str) and "--allow-exec" in refusal
    assert plain.lookup("reboot") == "unknown command 'reboot'"
    allowed = default_registry(ExecPolicy())
    assert allowed.capabilities == ["exec", "ping", "sysinfo"]
    assert callable(allowed.lookup("exec"))
