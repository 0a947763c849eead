"""A real ``redis-server`` of the test's own: a free TCP port, a temporary directory.

Never the machine's Redis, never port 6379: each :class:`RedisServer` starts its own
process on a port found free on 127.0.0.1, with its data (the AOF directory) in its own
directory, and can be stopped, killed with SIGKILL and started again on the same port,
with its data or without. ``redis-server`` missing is a failure that says how to get it
(``./scripts/bootstrap.sh`` installs it), never a skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["RedisServer", "redis_server_binary"]

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        pytest.fail(
            "redis-server is not installed: run ./scripts/bootstrap.sh (it installs it), "
            "the Redis store's tests need a real one",
            pytrace=False,
        )
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process. Persistence by default: an AOF fsynced every second
    (``appendfsync="always"`` for durable-on-answer), no RDB snapshots."""

    def __init__(
        self,
        directory: Path | None = None,
        *,
        appendonly: bool = True,
        appendfsync: str = "everysec",
        options: dict[str, str] | None = None,
    ) -> None:
        self._own_dir = directory is None
        self.dir = (
            Path(tempfile.mkdtemp(prefix="tether-redis-")) if directory is None else directory
        )
        self.dir.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.options = dict(options or {})
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.dir / "redis.log"

    def _command(self) -> list[str]:
        args = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--logfile", str(self.log),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--daemonize", "no",
        ]  # fmt: skip
        for key, value in self.options.items():
            args += [f"--{key}", value]
        return args

    def start(self) -> None:
        """Start on the port used before, or on a free one (another if that one was
        taken in the meantime)."""
        if self.process is not None:
            raise RuntimeError("redis-server already running")
        attempts = 1 if self.port else 5
        for _ in range(attempts):
            if not self.port or attempts > 1:
                self.port = _free_port()
            self.process = subprocess.Popen(
                self._command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            if self._wait_ready():
                return
            self._reap(signal.SIGKILL)
        raise RuntimeError(f"redis-server did not start on {self.port}: {self._log_tail()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as conn,
            ):
                conn.sendall(b"PING\r\n")
                if conn.recv(64).startswith(b"+PONG"):
                    return True
            time.sleep(0.02)
        return False

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def _reap(self, sig: signal.Signals) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """A clean shutdown (SIGTERM): Redis writes out its AOF and exits."""
        self._reap(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: what the AOF had reached the disk is all that is left."""
        self._reap(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: Redis holds its connections and answers nothing (a hung server)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def wipe(self) -> None:
        """Delete the data files (the AOF directory and any RDB), as a lost disk would."""
        if self.running:
            raise RuntimeError("stop redis-server before wiping its data")
        for path in self.dir.iterdir():
            if path.name == self.log.name:
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()

    def restart(self, *, keep_data: bool = True, kill: bool = False) -> None:
        """Stop (or kill) and start again on the same port, with its data or without."""
        if kill:
            self.kill()
        else:
            self.stop()
        if not keep_data:
            self.wipe()
        self.start()

    def info(self, section: str) -> dict[str, str]:
        """``INFO section`` over a plain socket (no client library between)."""
        reply = self.call("INFO", section)
        fields = {}
        for line in reply.decode().splitlines():
            key, sep, value = line.partition(":")
            if sep and not key.startswith("#"):
                fields[key] = value
        return fields

    def call(self, *args: str) -> bytes:
        """One command over a plain socket; the bulk reply's payload, or the line."""
        payload = f"*{len(args)}\r\n".encode()
        for arg in args:
            data = arg.encode()
            payload += b"$%d\r\n%s\r\n" % (len(data), data)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5.0) as conn:
            conn.sendall(payload)
            buffer = b""
            while b"\r\n" not in buffer:
                buffer += conn.recv(65536)
            head, _, rest = buffer.partition(b"\r\n")
            if head[:1] != b"$":
                return head
            size = int(head[1:])
            if size < 0:
                return b""
            while len(rest) < size + 2:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                rest += chunk
            return rest[:size]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.process is not None and self.process.poll() is None:
                with contextlib.suppress(OSError):
                    os.kill(self.process.pid, signal.SIGCONT)
            self.kill()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def redis_server(**options: object) -> Iterator[RedisServer]:
    server = RedisServer(**options)  # type: ignore[arg-type]
    try:
        server.start()
        yield server
    finally:
        server.close()
