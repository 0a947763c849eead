"""Processes and measurements shared by the benchmarks.

The hub, the floor server and every load generator run as their own processes, so that
the figures measure what a deployment would: one hub process, load from elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import psutil

# One definition of a percentile, the hub's, for every bench figure.
from hub.metrics import percentile as percentile

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
#: Agents per load process: the open-file limit here is 20,000 per process.
PER_PROCESS = 9_500


def raise_file_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Proc:
    """A child process whose output goes to a log file."""

    name: str
    args: list[str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    #: Append to the log (a restarted hub keeps its earlier stacks) instead of starting it
    #: afresh; only for processes whose log lines nobody waits for.
    append: bool = False

    def start(self) -> Proc:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab" if self.append else "wb") as out:
            self.process = subprocess.Popen(
                self.args, stdout=out, stderr=subprocess.STDOUT, env=ENV,
                preexec_fn=raise_file_limit,
            )  # fmt: skip
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def wait_for_line(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log.read_text(errors="replace"))
            if found:
                return found
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.name}: no line matching {pattern!r}")

    def rss(self) -> int:
        return psutil.Process(self.pid).memory_info().rss

    def cpu(self) -> float:
        times = psutil.Process(self.pid).cpu_times()
        return times.user + times.system

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


@dataclass
class Hub:
    """A ``tether-hub serve`` process with its own data directory."""

    workdir: Path
    name: str = "hub"
    extra: list[str] = field(default_factory=list)
    port: int = 0
    proc: Proc | None = None
    #: Every hub of a run on this CPU (``bench/run.py --hub-cpu``), its threads included.
    cpu: ClassVar[int | None] = None
    #: Called with each hub process's pid as soon as it is spawned (a profiler attaches).
    spawned: ClassVar[Callable[[int], None] | None] = None

    @property
    def data(self) -> Path:
        return self.workdir / self.name

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def token(self, *args: str) -> str:
        done = subprocess.run(
            [PYTHON, "-m", "hub", "token", "create", "--data-dir", str(self.data), *args],
            capture_output=True, text=True, env=ENV, check=True,
        )  # fmt: skip
        return done.stdout.strip()

    def start(self) -> Hub:
        config = self.workdir / f"{self.name}.toml"
        if not config.exists():
            config.write_text('[hub]\nlog_level = "WARNING"\nmax_agents = 100000\n')
        pin = ["taskset", "-c", str(self.cpu)] if self.cpu is not None else []
        self.proc = Proc(
            self.name,
            [*pin, PYTHON, "-m", "hub", "serve", "--listen", f"127.0.0.1:{self.port}",
             "--data-dir", str(self.data), "--config", str(config), *self.extra],
            self.workdir / f"{self.name}.log",
            append=True,
        ).start()  # fmt: skip
        if Hub.spawned is not None:
            Hub.spawned(self.proc.pid)
        # The listening line is logged at INFO; find the port from the process instead.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ports = [
                c.laddr.port
                for c in psutil.Process(self.proc.pid).net_connections("tcp")
                if c.status == psutil.CONN_LISTEN
            ]
            if ports:
                self.port = ports[0]
                break
            time.sleep(0.05)
        else:
            raise TimeoutError("the hub did not listen")
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        wait_http(f"http://127.0.0.1:{self.port}/readyz")

    def metrics(self) -> dict[str, float]:
        return scrape(f"http://127.0.0.1:{self.port}/metrics")

    def online(self) -> int:
        return int(self.metrics().get('tether_agents{state="online"}', 0))


@dataclass
class Floor:
    workdir: Path
    port: int = 0
    proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> Floor:
        self.proc = Proc(
            "floor",
            [PYTHON, str(ROOT / "bench" / "floor.py"), "--listen", f"127.0.0.1:{self.port}"],
            self.workdir / "floor.log",
        ).start()
        self.port = int(self.proc.wait_for_line(r"floor listening on (\d+)").group(1))
        return self

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=30) as r:
            return json.loads(r.read())

    def online(self) -> int:
        return int(self.stats()["agents"])


#: Loopback source addresses per load process: ~2,400 agents each, far from one address's
#: 28,000 ephemeral ports even with a storm's TIME_WAITs on top.
SOURCES_PER_PROCESS = 4


def sources(process: int) -> list[str]:
    """The loopback addresses load process ``process`` dials from (127.0.1.x onwards)."""
    first = process * SOURCES_PER_PROCESS
    numbers = range(first, first + SOURCES_PER_PROCESS)
    return [f"127.0.{1 + n // 250}.{1 + n % 250}" for n in numbers]


def simulators(workdir: Path, url: str, token: str, count: int, prefix: str,
               rate: float = 1_000, tag: str = "sim",
               extra: tuple[str, ...] = ()) -> list[Proc]:  # fmt: skip
    """``tether-agent simulate`` processes, at most PER_PROCESS agents each (``extra``: more
    options of each, e.g. ``--ca-file`` for wss://)."""
    procs = []
    start = 0
    index = 0
    while start < count:
        n = min(PER_PROCESS, count - start)
        # Each process numbers its agents from 1; distinct prefixes keep the ids unique.
        procs.append(
            Proc(
                f"{tag}{index}",
                [PYTHON, "-m", "agent", "simulate", "--hub", url, "--token", token,
                 "--count", str(n), "--prefix", f"{prefix}{index}-", "--rate", str(rate),
                 "--log-level", "warning", "--source", *sources(index), *extra],
                workdir / f"{tag}{index}.log",
            ).start()
        )  # fmt: skip
        start += n
        index += 1
    return procs


@dataclass
class LeanFleet:
    """Lean agents (``bench/leanfleet.py``) split over processes: the load of every row.

    At least two processes, at most PER_PROCESS agents each, so that no client's event loop
    sets the pace; each reports through its status file, read here.
    """

    workdir: Path
    url: str
    token: str
    count: int
    tag: str
    rate: float = 1_000
    procs: list[Proc] = field(default_factory=list)

    def sizes(self) -> list[int]:
        """Agents per process: at least two processes, at most PER_PROCESS agents each."""
        parts = max(2, -(-self.count // PER_PROCESS))
        return [self.count // parts + (1 if n < self.count % parts else 0) for n in range(parts)]

    def agent_ids(self) -> list[str]:
        """Every agent's id (``sim_profile``'s: the prefix, then a number from 1)."""
        return [
            f"{self.tag}{index}-{n:05d}"
            for index, size in enumerate(self.sizes())
            for n in range(1, size + 1)
        ]

    def start(self, once: bool = False, keys: str = "", start_at: float = 0.0,
              concurrency: int = 200) -> LeanFleet:  # fmt: skip
        sizes = self.sizes()
        parts = len(sizes)
        self.procs = []
        for index, size in enumerate(sizes):
            args = [PYTHON, str(ROOT / "bench" / "leanfleet.py"), "--url", self.url,
                    "--token", self.token, "--count", str(size),
                    "--prefix", f"{self.tag}{index}-", "--status", str(self.status_path(index)),
                    "--rate", str(self.rate / parts), "--concurrency", str(concurrency),
                    "--start-at", str(start_at), "--source", *sources(index)]  # fmt: skip
            if once:
                args.append("--once")
            if keys:
                # The first run writes the keys the hub issued; a later one registers by them.
                written = Path(f"{keys}.{index}").exists()
                args += ["--keys-in" if written else "--keys-out", f"{keys}.{index}"]
            self.status_path(index).unlink(missing_ok=True)
            self.procs.append(
                Proc(f"{self.tag}{index}", args, self.workdir / f"{self.tag}{index}.log").start()
            )
        return self

    def status_path(self, index: int) -> Path:
        return self.workdir / f"{self.tag}{index}.status.json"

    def statuses(self) -> list[dict[str, Any]]:
        found = []
        for index in range(len(self.procs)):
            with contextlib.suppress(OSError, ValueError):
                found.append(json.loads(self.status_path(index).read_text()))
        return found

    def total(self, key: str) -> float:
        return sum(status[key] or 0 for status in self.statuses())

    def online(self) -> int:
        return int(self.total("online"))

    def cpu(self) -> float:
        """CPU seconds the client processes used dialing and serving so far (each reports its
        own, exited too; what they spent starting up is left out)."""
        return sum(s["cpu"] - s.get("cpu_at_dial", 0.0) for s in self.statuses())

    def cpus(self) -> list[float]:
        return [status["cpu"] for status in self.statuses()]

    def wait(self, timeout: float | None = None) -> None:
        for proc in self.procs:
            assert proc.process is not None
            proc.process.wait(timeout)

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(url)


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                values[name] = float(value)
    return values


def wait_until(condition: Any, timeout: float, interval: float = 0.1, what: str = "") -> float:
    """Poll until true; returns the seconds it took. Raises TimeoutError."""
    started = time.monotonic()
    while True:
        try:
            if condition():
                return time.monotonic() - started
        except OSError:
            pass  # a server busy accepting thousands of agents may answer late: ask again
        if time.monotonic() - started > timeout:
            raise TimeoutError(what or str(condition))
        time.sleep(interval)


@contextlib.contextmanager
def running(*procs: Any) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in reversed(procs):
            for item in proc if isinstance(proc, list) else [proc]:
                inner = getattr(item, "proc", item)
                if inner is not None:
                    inner.stop()


def run(coroutine: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coroutine)
    except ImportError:
        return asyncio.run(coroutine)
