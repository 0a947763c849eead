"""Real proxies for tests: tinyproxy (HTTP CONNECT, Basic auth) and Dante (SOCKS5).

Both are Debian packages that ``scripts/bootstrap.sh`` installs; a test that needs one and
cannot find it fails loudly (never skips). Each runs in the foreground as a child process
with its own config in a temp dir, optionally inside a network namespace
(``ip netns exec``), and is killed when the test ends.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["Dante", "Tinyproxy", "free_port", "need"]


def need(binary: str) -> str:
    """The binary's path, or a loud failure naming the package that brings it."""
    import pytest

    path = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin:/sbin")
    if path is None:
        pytest.fail(f"{binary} is missing: run ./scripts/bootstrap.sh (it installs it)")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _prefix(netns: str | None) -> list[str]:
    return ["ip", "netns", "exec", netns] if netns else []


class _Daemon:
    log: Path
    ready_text = ""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None

    def _start(self, argv: list[str], timeout: float = 10.0) -> None:
        self.process = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"{argv[0]} exited: {self.text()[-2000:]}")
            if self.ready_text in self.text():
                return
            time.sleep(0.02)
        raise AssertionError(f"{argv} did not start: {self.text()[-2000:]}")

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


class Tinyproxy(_Daemon):
    """tinyproxy listening on ``host:port``; ``auth`` (user, password) requires Basic
    credentials (407 otherwise); ``connect_ports`` limits CONNECT (403 for others)."""

    ready_text = "Accepting connections"

    def __init__(
        self,
        directory: Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        auth: tuple[str, str] | None = None,
        connect_ports: tuple[int, ...] = (),
        allow: str = "0.0.0.0/0",
        netns: str | None = None,
    ) -> None:
        super().__init__()
        self.host = host
        self.port = port or free_port(host if netns is None else "127.0.0.1")
        self.auth = auth
        directory.mkdir(parents=True, exist_ok=True)
        self.log = directory / f"tinyproxy-{self.port}.log"
        self.conf = directory / f"tinyproxy-{self.port}.conf"
        lines = [
            f"Port {self.port}",
            f"Listen {host}",
            "Timeout 600",
            "MaxClients 200",
            f"Allow {allow}",
            "LogLevel Info",
            f'LogFile "{self.log}"',
            # Tinyproxy adds Via and may add X-Tinyproxy; neither reaches a CONNECT tunnel.
            "DisableViaHeader Yes",
        ]
        if auth is not None:
            lines.append(f"BasicAuth {auth[0]} {auth[1]}")
        lines.extend(f"ConnectPort {p}" for p in connect_ports)
        self.conf.write_text("\n".join(lines) + "\n")
        self._start([*_prefix(netns), need("tinyproxy"), "-d", "-c", str(self.conf)])

    def url(self, user: str | None = None, password: str | None = None) -> str:
        if user is None and self.auth is not None:
            user, password = self.auth
        credentials = f"{user}:{password}@" if user is not None else ""
        return f"http://{credentials}{self.host}:{self.port}"

    def connects(self) -> int:
        """CONNECT requests the proxy logged (each dial through it is one)."""
        return self.text().count("Request (file descriptor")


class Dante(_Daemon):
    """Dante's ``danted``: SOCKS5 without authentication on ``host:port``, connecting out
    from ``external``; ``block`` lists ``ADDR/BITS port = N`` destinations it refuses."""

    ready_text = "running"

    def __init__(
        self,
        directory: Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        external: str = "127.0.0.1",
        block: tuple[str, ...] = (),
        hosts: dict[str, str] | None = None,
        netns: str | None = None,
    ) -> None:
        super().__init__()
        self.host = host
        self.port = port or free_port(host if netns is None else "127.0.0.1")
        directory.mkdir(parents=True, exist_ok=True)
        self.log = directory / f"danted-{self.port}.log"
        self.conf = directory / f"danted-{self.port}.conf"
        rules = [f"socks block {{ from: 0.0.0.0/0 to: {target} }}" for target in block]
        self.conf.write_text(
            "\n".join(
                [
                    f"logoutput: {self.log}",
                    f"internal: {host} port = {self.port}",
                    f"external: {external}",
                    "clientmethod: none",
                    "socksmethod: none",
                    "user.privileged: root",
                    "user.unprivileged: nobody",
                    "client pass { from: 0.0.0.0/0 to: 0.0.0.0/0 }",
                    *rules,
                    "socks pass { from: 0.0.0.0/0 to: 0.0.0.0/0 log: connect }",
                ]
            )
            + "\n"
        )
        pid = directory / f"danted-{self.port}.pid"
        argv = [need("danted"), "-f", str(self.conf), "-N", "1", "-p", str(pid)]
        if hosts:
            # Names only the proxy can resolve: its own /etc/hosts, in a mount namespace of
            # its own (the test process cannot resolve them: proof of remote DNS).
            table = directory / f"hosts-{self.port}"
            table.write_text("".join(f"{a} {n}\n" for n, a in hosts.items()))
            script = f'mount --bind {table} /etc/hosts && exec "$@"'
            argv = [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
                "sh",
                *argv,
            ]
        self._start([*_prefix(netns), *argv])

    def url(self) -> str:
        return f"socks5://{self.host}:{self.port}"

    def connects(self) -> int:
        """Tunnels the proxy opened."""
        return self.text().count("tcp/connect [")
