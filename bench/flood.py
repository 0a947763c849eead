"""A half-open upgrade flood, and how long an agent takes to register through it.

    python bench/run.py --only flood                     # the figures (bench/RESULTS.md)
    python bench/flood.py hold --port P --sources 16 --count 4000 --rate 2000 --seconds 30

``hold`` is the attacker of issue 17: TCP connections from loopback source addresses
127.0.0.2 onwards that send ``GET /ws HTTP/1.1`` and one header, then nothing. It keeps
``--count`` of them open, reopening the ones the hub closes at up to ``--rate`` a second (the
first ``--count`` at once), reads whatever the hub answers, and prints one JSON line when the
first ``--count`` are open and one when it stops. The tests (``tests/hub/test_handshake_flood.py``)
run the same process.

:func:`register` is the agent measured through it: a raw upgrade with a credential and a
``register`` from a chosen source address, honouring ``Retry-After`` on a 503, until
``welcome`` — the bytes an agent sends, none of the agent's own work.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import errno
import json
import os
import resource
import selectors
import signal
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: What the attacker sends on each connection, and never finishes.
HALF_OPEN = b"GET /ws HTTP/1.1\r\nHost: x\r\n"
#: One key for every upgrade (legal: the server cannot tell).
KEY = base64.b64encode(b"tether-flood-key").decode()
MASK = b"\x01\x02\x03\x04"


def sources(count: int, first: int = 2) -> list[str]:
    """``count`` loopback addresses from 127.0.0.<first> (127.0.0.1 is the agents')."""
    return [f"127.0.{(n + first) // 256}.{(n + first) % 256}" for n in range(count)]


def raise_file_limit() -> int:
    """The soft open-file limit raised to the hard one; the limit now."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# -- the attacker ---------------------------------------------------------------------------


@dataclass
class Flood:
    """Holds ``count`` half-open requests from ``addresses`` (round robin) to ``port``."""

    port: int
    addresses: Sequence[str]
    count: int
    rate: float
    host: str = "127.0.0.1"
    opened: int = 0
    failed: int = 0
    closed_by_hub: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    _open: dict[int, tuple[socket.socket, bool]] = field(default_factory=dict)
    _next: int = 0

    @property
    def held(self) -> int:
        """Connections open on our side (the hub may have answered some)."""
        return len(self._open)

    def run(self, seconds: float, ready: Any = None) -> None:
        """Flood for ``seconds`` (or until SIGTERM/SIGINT); call ``ready()`` once the first
        ``count`` are open."""
        selector = selectors.DefaultSelector()
        stopping = False

        def stop(*_: Any) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        deadline = time.monotonic() + seconds
        tokens = float(self.count)  # the first `count` at once, then `rate` a second
        last = time.monotonic()
        announced = False
        try:
            while not stopping and time.monotonic() < deadline:
                now = time.monotonic()
                cap = self.rate if announced else float(self.count)
                tokens = min(cap, tokens + (now - last) * self.rate)
                last = now
                while len(self._open) < self.count and tokens >= 1:
                    tokens -= 1
                    self._connect(selector)
                if not announced and len(self._open) >= self.count:
                    announced = True
                    if ready is not None:
                        ready()
                for key, mask in selector.select(timeout=0.01):
                    self._event(selector, key.fileobj, mask)  # type: ignore[arg-type]
        finally:
            for sock, _ in self._open.values():
                with contextlib.suppress(Exception):
                    selector.unregister(sock)
                sock.close()
            self._open.clear()
            selector.close()

    def summary(self) -> dict[str, Any]:
        return {
            "opened": self.opened,
            "failed": self.failed,
            "closed_by_hub": self.closed_by_hub,
            "answers": dict(self.answers),
        }

    def _connect(self, selector: selectors.BaseSelector) -> None:
        address = self.addresses[self._next % len(self.addresses)]
        self._next += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24), 1)
            sock.bind((address, 0))
            code = sock.connect_ex((self.host, self.port))
        except OSError:
            sock.close()
            self.failed += 1
            return
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self.failed += 1
            return
        self.opened += 1
        self._open[sock.fileno()] = (sock, False)
        selector.register(sock, selectors.EVENT_WRITE)

    def _event(self, selector: selectors.BaseSelector, sock: socket.socket, mask: int) -> None:
        fd = sock.fileno()
        _, connected = self._open[fd]
        if not connected:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self.failed += 1
                self._close(selector, fd, sock)
                return
            try:
                sock.send(HALF_OPEN)
            except OSError:
                self._lost(selector, fd, sock)
                return
            self._open[fd] = (sock, True)
            selector.modify(sock, selectors.EVENT_READ)
            return
        try:
            data = sock.recv(4096)
        except OSError:
            self._lost(selector, fd, sock)
            return
        if not data:
            self._lost(selector, fd, sock)
        elif data.startswith(b"HTTP/1.1 "):
            self.answers[data[9:12].decode(errors="replace")] += 1

    def _lost(self, selector: selectors.BaseSelector, fd: int, sock: socket.socket) -> None:
        self.closed_by_hub += 1
        self._close(selector, fd, sock)

    def _close(self, selector: selectors.BaseSelector, fd: int, sock: socket.socket) -> None:
        selector.unregister(sock)
        del self._open[fd]
        sock.close()


def hold(args: argparse.Namespace) -> None:
    limit = raise_file_limit()
    if limit < args.count + 100:
        sys.exit(f"the open-file limit ({limit}) is below {args.count} connections")
    flood = Flood(args.port, sources(args.sources), args.count, args.rate)
    started = time.monotonic()

    def ready() -> None:
        print(json.dumps({"ready": flood.held, "seconds": round(time.monotonic() - started, 3)}))
        sys.stdout.flush()

    flood.run(args.seconds, ready)
    print(json.dumps({"done": flood.summary()}), flush=True)


# -- the agent ------------------------------------------------------------------------------


class Refused(ConnectionError):
    def __init__(self, status: int, retry_after: float | None) -> None:
        super().__init__(f"refused with {status}")
        self.status = status
        self.retry_after = retry_after


class _Agent(asyncio.Protocol):
    """One upgrade and register; ``done`` resolves with the welcome (or fails)."""

    def __init__(self, request: bytes, register: bytes) -> None:
        self.request = request
        self.register = register
        self.buffer = b""
        self.upgraded = False
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buffer = self.buffer[:end].decode("latin-1"), self.buffer[end + 4 :]
            lines = head.split("\r\n")
            status = int(lines[0].split(" ")[1])
            if status != 101:
                retry = None
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "retry-after":
                        retry = float(value.strip())
                self._fail(Refused(status, retry))
                return
            self.upgraded = True
            assert self.transport is not None
            self.transport.write(self.register)
        while len(self.buffer) >= 2:
            length = self.buffer[1] & 0x7F
            start = 2
            if length == 126:
                if len(self.buffer) < 4:
                    return
                (length,) = struct.unpack_from("!H", self.buffer, 2)
                start = 4
            elif length == 127:
                if len(self.buffer) < 10:
                    return
                (length,) = struct.unpack_from("!Q", self.buffer, 2)
                start = 10
            if len(self.buffer) < start + length:
                return
            opcode = self.buffer[0] & 0x0F
            payload = self.buffer[start : start + length]
            self.buffer = self.buffer[start + length :]
            if opcode == 0x1:
                message = json.loads(payload)
                if message.get("type") == "welcome" and not self.done.done():
                    self.done.set_result(message)
            elif opcode == 0x8:
                self._fail(ConnectionError(f"closed: {payload[2:]!r}"))
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"connection lost: {exc}"))

    def _fail(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_frame(0x8, struct.pack("!H", 1000)))
            self.transport.close()


def _frame(opcode: int, payload: bytes) -> bytes:
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
    else:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
    masked = bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))
    return head + MASK + masked


@dataclass
class Registration:
    seconds: float
    #: Attempts refused before the one that registered (each followed by its Retry-After).
    retries: int
    #: The agent key issued at enrollment, if any.
    agent_key: str | None


async def register(
    port: int,
    token: str,
    agent_id: str,
    source: str | None = None,
    *,
    max_retries: int = 10,
    close: bool = True,
) -> Registration:
    """Upgrade and register ``agent_id`` from ``source``; after a 503 or 429, wait its
    ``Retry-After`` and dial again (at most ``max_retries`` times)."""
    request = (
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: tether.agent.v1\r\nAuthorization: Bearer {token}\r\n\r\n"
    ).encode()
    message = {
        "type": "register",
        "agent_id": agent_id,
        "platform": "linux",
        "region": "bench",
        "version": "1.0.0",
        "hostname": agent_id,
        "capabilities": ["ping"],
    }
    frame = _frame(0x1, json.dumps(message).encode())
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    retries = 0
    while True:
        try:
            _, agent = await loop.create_connection(
                lambda: _Agent(request, frame),
                "127.0.0.1",
                port,
                local_addr=(source, 0) if source else None,
            )
            welcome = await agent.done
        except Refused as refused:
            if refused.status not in (429, 503) or retries >= max_retries:
                raise
            retries += 1
            await asyncio.sleep(refused.retry_after or 1.0)
            continue
        if close:
            agent.close()
        return Registration(time.monotonic() - started, retries, welcome.get("agent_key"))


# -- the bench scenario ---------------------------------------------------------------------


def scenario(bench: Any) -> None:
    """Registration time and hub CPU with no flood, then with 4,000 half-open requests from
    one address and from 16, and 16,000 from 16, each flood reopening at 2,000/s what the
    hub closes (ten times the rate that kept every agent out before issue 17).

    For each: one registration started the moment the flood's connections are open (its
    burst of connects overflows the kernel's accept queue: a dropped SYN is retried after
    1 s, then 3 s), then, 5 s later, ``samples`` registrations 0.1 s apart from 127.0.0.1,
    each a new agent enrolling; the hub's CPU over those.
    """
    from bench.harness import ROOT, Proc, percentile, run, wait_until

    hub = bench.fresh_hub("flood")
    enroll = hub.token("--enroll")
    samples = 20 if bench.quick else 50
    rate = 2_000.0
    phases: list[tuple[str, int, int]] = [("none", 0, 0), ("4000x1", 4_000, 1)]
    phases += [("4000x16", 4_000, 16), ("16000x16", 16_000, 16)]
    for name, count, spread in phases:
        print(f"flood: {name}", flush=True)
        attacker: Proc | None = None
        if count:
            attacker = Proc(
                "flood",
                [sys.executable, str(ROOT / "bench" / "flood.py"), "hold", "--port",
                 str(hub.port), "--sources", str(spread), "--count", str(count),
                 "--rate", str(rate), "--seconds", "600"],
                bench.workdir / f"flood-{name}.log",
            ).start()  # fmt: skip
            bench.started.append(attacker)
            attacker.wait_for_line(r'"ready"', 120)
            first = run(register(hub.port, enroll, f"{name}-first", "127.0.0.1"))
            bench.note(f"flood.register_ms_onset.{name}", round(first.seconds * 1000, 1))
            # At the cap: every pending place taken.
            wait_until(
                lambda: hub.metrics().get("tether_pending_handshakes", 0) >= 1_900,
                timeout=30,
                what="the hub at its pending cap",
            )
            time.sleep(5)
        assert hub.proc is not None
        cpu0, t0 = hub.proc.cpu(), time.monotonic()
        before = hub.metrics()
        figures = run(_samples(hub.port, enroll, f"{name}-", samples))
        elapsed = time.monotonic() - t0
        cpu = (hub.proc.cpu() - cpu0) / elapsed
        after = hub.metrics()
        seconds = [f.seconds for f in figures]
        bench.note(f"flood.register_ms_p50.{name}", round(percentile(seconds, 0.5) * 1000, 1))
        bench.note(f"flood.register_ms_p99.{name}", round(percentile(seconds, 0.99) * 1000, 1))
        bench.note(f"flood.register_ms_max.{name}", round(max(seconds) * 1000, 1))
        bench.note(f"flood.register_retries.{name}", sum(f.retries for f in figures))
        bench.note(f"flood.hub_cpu_share.{name}", round(cpu, 3))
        bench.note(f"flood.hub_rss_mb.{name}", round(hub.proc.rss() / 2**20, 1))
        bench.note(f"flood.pending.{name}", after.get("tether_pending_handshakes", 0))
        for result in ("shed_half_open", "overloaded", "handshake_timeout"):
            key = f'tether_connections_total{{result="{result}"}}'
            per_s = (after.get(key, 0) - before.get(key, 0)) / elapsed
            bench.note(f"flood.{result}_per_s.{name}", round(per_s))
        if attacker is not None:
            attacker.stop()
            wait_until(
                lambda: hub.metrics().get("tether_pending_handshakes", 1) == 0,
                timeout=30,
                what="pending handshakes drained",
            )
    assert hub.proc is not None
    hub.proc.stop()


async def _samples(port: int, token: str, prefix: str, count: int) -> list[Registration]:
    """``count`` registrations 0.1 s apart from 127.0.0.1, each a new agent."""
    out = []
    for n in range(count):
        out.append(await register(port, token, f"{prefix}{n:04d}", "127.0.0.1"))
        await asyncio.sleep(0.1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    flood = commands.add_parser("hold", help="hold half-open upgrade requests")
    flood.add_argument("--port", type=int, required=True)
    flood.add_argument("--sources", type=int, default=1, help="source addresses, 127.0.0.2 on")
    flood.add_argument("--count", type=int, default=4_000)
    flood.add_argument("--rate", type=float, default=2_000.0, help="reopened a second")
    flood.add_argument("--seconds", type=float, default=60.0)
    hold(parser.parse_args())


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
