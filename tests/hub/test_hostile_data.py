"""Hostile strings as data, log lines that stay lines, and a hub process's memory under floods.

Strings from the network (hostnames, labels, errors, header values) are data: stored and
returned exactly as sent, never interpreted, and escaped wherever they could reach a log
line. The process tests run ``tether-hub serve`` for real and read what it writes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from pathlib import Path

import psutil

from hub.logs import _JsonFormatter, _SafeFormatter, escape
from tests.conftest import HubHandle
from tests.hub.wire import (
    CLOSE,
    CONT,
    PING,
    TEXT,
    Wire,
    audit,
    close_payload,
    deflate,
    dropped,
    frame,
    http_get,
    refused,
    text,
    upgrade_request,
)
from tests.support import HubProcess, RawAgent, run_cli, wait_for

MiB = 1024 * 1024

#: Terminal escapes, forged log lines, every kind of line break, markup, bidi override.
NASTY = (
    "\x1b[2J\x1b[31mred\x1b[0m\r\n2026-01-01T00:00:00.000Z INFO    hub.server: forged"
    "\x0b\x0c\x1c\x85\u2028\u2029<script>alert(1)</script>\x00\x07\x7f\u202egnp.exe"
)


async def test_hostile_strings_are_stored_and_returned_verbatim(hub: HubHandle) -> None:
    wire = await Wire.upgrade(hub.hub.port, "/ws", await hub.agent_token("edge-1"))
    labels = {"<img src=x onerror=alert(1)>": NASTY[:120], "sql": "' OR 1=1; --"}
    await wire.register(
        "edge-1",
        hostname=NASTY[:128],
        version="<b>1.0</b>",
        region="eu\u2028central",
        labels=labels,
    )
    admin = await RawAgent.connect(hub.admin_url, await hub.admin_token("operator"))
    await admin.send({"type": "agent", "id": 1, "agent_id": "edge-1"})
    agent = (await admin.recv_type("reply"))["data"]["agent"]
    assert (agent["hostname"], agent["version"], agent["region"]) == (
        NASTY[:128],
        "<b>1.0</b>",
        "eu\u2028central",
    )
    assert agent["labels"] == labels
    # A command's output and error come back byte for byte too.
    await admin.send(
        {"type": "dispatch", "id": 2, "target": {"agent_ids": ["edge-1"]}, "name": "exec"}
    )
    command_id = (await admin.recv_type("reply"))["data"]["command_ids"][0]
    await wire.recv_type("command")
    for message in (
        {"type": "output", "command_id": command_id, "seq": 0, "stream": "stdout", "data": NASTY},
        {"type": "result", "command_id": command_id, "status": "failed", "error": NASTY},
    ):
        await wire.send(text(message))
    await wait_for(lambda: command_id not in hub.hub.ledger.commands)
    await admin.send({"type": "output", "id": 3, "command_id": command_id})
    data = (await admin.recv_type("reply"))["data"]
    assert data["command"]["result"]["error"] == NASTY
    assert "".join(chunk["data"] for chunk in data["chunks"]) == NASTY
    # And the hub's own frames stay valid JSON on the wire: control characters escaped.
    await wire.send(text({"type": "warp", "id": NASTY[:100]}))
    error = await wire.recv_type("error")
    assert error["ref"] == NASTY[:100]
    await admin.close()
    wire.abort()


async def test_hostile_header_values_are_audited_as_data(hub_factory) -> None:
    hub = await hub_factory(allowed_origins=["https://console.example"])
    token = await hub.admin_token()
    origin = "https://x\x85\xe2\x80\xa8\xff".encode("latin-1").decode("latin-1")
    await refused(hub.hub.port, upgrade_request("/admin", token, extra=f"Origin: {origin}\r\n"))
    entry = (await audit(hub, "connection.refused"))[0]
    assert entry["detail"]["reason"] == f"origin {origin!r}"
    assert "\n" not in entry["detail"]["reason"]


def test_log_escaping_keeps_every_record_on_one_line() -> None:
    escaped = escape(NASTY)
    assert not any((ord(c) < 0x20 and c != "\t") or 0x7F <= ord(c) < 0xA0 for c in escaped)
    assert "\u2028" not in escaped and "\u2029" not in escaped
    assert escaped.splitlines() == [escaped]
    # Bidi controls are shown, not obeyed: "\u202egnp.exe" must not display as "exe.png".
    for bidi in "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069":
        assert escape(f"a{bidi}b") == f"a\\u{ord(bidi):04x}b"
        record = logging.LogRecord(
            "hub.server", logging.WARNING, __file__, 1, f"a{bidi}b", (), None
        )
        assert bidi not in _JsonFormatter().format(record)
        assert bidi not in _SafeFormatter().format(record)
    record = logging.LogRecord(
        "hub.server", logging.WARNING, __file__, 1, "peer %s", (NASTY,), None
    )
    line = _SafeFormatter().format(record)
    assert line.splitlines() == [line]
    # The forged record stays inside the real one, its line break visible as text.
    assert "red\\x1b[0m\\x0d\\x0a2026-01-01T00:00:00.000Z INFO    hub.server: forged" in line
    as_json = _JsonFormatter().format(record)
    assert as_json.splitlines() == [as_json]
    assert json.loads(as_json)["message"] == f"peer {NASTY}"


# -- the hub as a process ----------------------------------------------------------------

LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) +[\w.]+: "
    r"[^\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]*$"
)


def token(data_dir: Path, *args: str) -> str:
    done = run_cli("token", "create", "--data-dir", str(data_dir), *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def drain_output(hub: HubProcess) -> threading.Thread:
    """Keep reading the hub's output so that it never blocks on a full pipe."""
    assert hub.process is not None and hub.process.stdout is not None
    stdout = hub.process.stdout

    def pump() -> None:
        for line in stdout:
            hub.log.append(line)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


async def test_hub_process_output_stays_well_formed_under_hostile_input(tmp_path: Path) -> None:
    data = tmp_path / "data"
    agent_key = token(data, "--agent", "edge-1")
    config = tmp_path / "hub.toml"
    config.write_text('[hub]\nallowed_origins = ["https://console.example"]\n')
    hub = HubProcess(data, "--config", str(config), "--log-level", "DEBUG").start()
    pump = drain_output(hub)
    try:
        port = hub.port
        await dropped(port, b"HELLO\x1b[31m\r\n\r\n")
        await dropped(port, upgrade_request("/ws", agent_key, extra="X-A: a\x00\x1b[2J\r\n"))
        await refused(port, upgrade_request("/ws", agent_key, extra="Origin: \x85\xe2\x80\xa8\r\n"))
        await refused(port, upgrade_request("/%0a%1b[31m", agent_key))
        await refused(port, upgrade_request("/ws", "tta_" + "\xe2\x80\xa8" * 30))
        wire = await Wire.upgrade(port, "/ws", agent_key)
        await wire.register("edge-1", hostname=NASTY[:128], labels={NASTY[:100]: NASTY[:100]})
        await wire.send(text({"type": "warp", "why": NASTY}))
        await wire.recv_type("error")
        await wire.send(frame(TEXT, b'{"type":"heartbeat","x":"\n\xff"}'))
        assert await wire.closed_code() == 1007
        assert (await http_get(port)).status == 200
        code = await asyncio.to_thread(hub.terminate, 15)
        assert code == 0
    finally:
        hub.stop()
        pump.join(5)
    lines = "".join(hub.log).split("\n")
    assert lines[-1] == ""
    bad = [line for line in lines[:-1] if not LOG_LINE.match(line)]
    assert not bad, bad
    assert any("stopped" in line for line in lines)


async def test_hub_process_memory_stays_bounded_under_floods(tmp_path: Path) -> None:
    data = tmp_path / "data"
    agent_key = token(data, "--agent", "edge-1")
    viewer = token(data, "--admin", "--role", "viewer")
    config = tmp_path / "hub.toml"
    config.write_text(
        "[hub]\nagent_write_buffer = 65536\nmax_pending_handshakes = 300\nopen_timeout = 1.0\n"
        # Frame budgets out of the way: this measures what the floods cost when allowed.
        "frame_rate = 1e9\nframe_burst = 1e9\n"
    )
    hub = HubProcess(data, "--config", str(config)).start()
    pump = drain_output(hub)
    assert hub.process is not None
    process = psutil.Process(hub.process.pid)
    try:
        port = hub.port
        # Warm up the paths once, then take the baseline.
        warm = await Wire.upgrade(port, "/ws", agent_key)
        await warm.register("edge-1")
        await warm.send(frame(CLOSE, close_payload(1000)))
        await warm.closed_code()
        baseline = process.memory_info().rss
        peaks: dict[str, int] = {}

        async def ping_flood() -> None:
            wire = await Wire.upgrade(port, "/ws", agent_key, rcvbuf=4096)
            chunk = frame(PING, b"p" * 125) * 2000
            sent = 0
            try:
                while sent < 128 * MiB:
                    await wire.send(chunk)
                    sent += len(chunk)
            except ConnectionError:
                pass
            assert sent < 64 * MiB, "the hub never cut off a peer that reads nothing"

        async def tiny_fragments() -> None:
            wire = await Wire.upgrade(port, "/ws", agent_key)
            await wire.send(frame(TEXT, b'{"type":"heartbeat","pad":"', fin=False))
            one = frame(CONT, b"a", fin=False)
            for _ in range(3):
                await wire.send(one * 50_000 + frame(CONT, b"", fin=False) * 50_000)
            await wire.send(frame(PING, b"sync"))
            while (await wire.read_frame(timeout=30)).payload != b"sync":
                pass
            peaks["fragments"] = process.memory_info().rss
            wire.abort()

        async def bombs() -> None:
            bomb = deflate(b"0" * (64 * MiB))
            for _ in range(4):
                wire = await Wire.upgrade(
                    port, "/admin", viewer, extra="Sec-WebSocket-Extensions: permessage-deflate\r\n"
                )
                await wire.send(frame(TEXT, bomb, rsv=4))
                assert await wire.closed_code(timeout=15) == 1009

        async def huge_lengths() -> None:
            for _ in range(20):
                wire = await Wire.upgrade(port, "/ws", agent_key)
                await wire.send(frame(TEXT, b"", length=2**62, length_form=127))
                assert await wire.closed_code() == 1009

        async def half_open() -> None:
            held = []
            for _ in range(250):
                wire = await Wire.open(port)
                await wire.send(b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 4000)
                held.append(wire)
            peaks["half_open"] = process.memory_info().rss
            for wire in held:
                assert await wire.eof(timeout=10) == b""

        for name, flood in (
            ("ping_flood", ping_flood),
            ("tiny_fragments", tiny_fragments),
            ("bombs", bombs),
            ("huge_lengths", huge_lengths),
            ("half_open", half_open),
        ):
            await flood()
            peaks[name] = max(peaks.get(name, 0), process.memory_info().rss)
        growth = {name: (rss - baseline) / MiB for name, rss in peaks.items()}
        # Measured on a 2-core dev box: at most about 13 MiB (the deflate bombs). Before the
        # write bound covered pongs, the 128 MiB ping flood alone grew the hub by 188 MiB.
        assert max(growth.values()) < 48, growth
        # And it still serves.
        assert (await http_get(port)).status == 200
        wire = await Wire.upgrade(port, "/ws", agent_key)
        assert (await wire.register("edge-1"))["type"] == "welcome"
        wire.abort()
    finally:
        hub.stop()
        pump.join(5)
