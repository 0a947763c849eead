"""``tether-hub serve --workers N``: N hub processes on one port, one machine's cores.

A hub process uses one core. With ``--workers N`` the parent starts N hubs, each a hub of
its own (``ID-1`` … ``ID-N``) in cluster mode on the same Redis, each listening on the same
port with SO_REUSEPORT so that the kernel spreads connections between them. The parent
holds the port (a socket of the same reuse-port group, bound and never listening, so that
port 0 becomes one port for all), restarts a worker that dies, and on SIGTERM or SIGINT
passes the signal on, waits for every worker to drain, and exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from .config import HubConfig, parse_listen

log = logging.getLogger(__name__)

__all__ = ["supervise"]

#: A worker that ran this long before dying is restarted at once; a quicker death waits.
STABLE_AFTER = 60.0
RESTART_CAP = 30.0


def _worker_argv(argv: list[str], listen: str, hub_id: str) -> list[str]:
    """The parent's own arguments, with its ``--workers`` dropped and the worker's own
    listen address and hub id last (argparse keeps the last of a repeated option)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        out.append(arg)
    return [*out, "--workers", "1", "--listen", listen, "--hub-id", hub_id]


def _die_with_parent() -> None:
    """In the worker, before exec: a supervisor killed with -9 takes its workers along
    (SIGTERM: they drain), instead of leaving hubs nobody supervises on the port."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


PR_SET_PDEATHSIG = 1


class _Worker:
    def __init__(self, index: int, argv: list[str]) -> None:
        self.index = index
        self.argv = argv
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.delay = 1.0
        self.restart_at: float | None = None

    def start(self) -> None:
        env = {**os.environ, "TETHER_REUSE_PORT": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hub", *self.argv], env=env, preexec_fn=_die_with_parent
        )
        self.started = time.monotonic()
        self.restart_at = None


def supervise(config: HubConfig, count: int, argv: list[str]) -> int:
    host, port = parse_listen(config.listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        holder.bind((host, port))
    except OSError as exc:
        print(f"tether-hub: cannot listen on {config.listen}: {exc}", file=sys.stderr)
        return 2
    port = holder.getsockname()[1]
    listen = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    workers = [
        _Worker(i, _worker_argv(argv, listen, f"{config.hub_id}-{i}")) for i in range(1, count + 1)
    ]
    stopping = False

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("starting %d hub workers on %s", count, listen)
    for worker in workers:
        worker.start()
    while not stopping:
        time.sleep(0.2)
        now = time.monotonic()
        for worker in workers:
            process = worker.process
            if process is None or stopping:
                continue
            code = process.poll()
            if code is None:
                continue
            if worker.restart_at is None:
                lived = now - worker.started
                worker.delay = 1.0 if lived >= STABLE_AFTER else min(RESTART_CAP, worker.delay * 2)
                worker.restart_at = now + (0.0 if lived >= STABLE_AFTER else worker.delay)
                print(
                    f"tether-hub: worker {worker.index} exited with {code}; restarting in "
                    f"{worker.restart_at - now:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
            elif now >= worker.restart_at:
                worker.start()
    # Again, to every worker: one started while the signal came in (its Popen had forked
    # but not yet returned) was missed by ``stop``, and would never be told to drain.
    for worker in workers:
        if worker.process is not None and worker.process.poll() is None:
            worker.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 8 * config.shutdown_timeout
    failed = False
    for worker in workers:
        process = worker.process
        if process is None:
            continue
        try:
            code = process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        failed = failed or code not in (0, -signal.SIGTERM)
    holder.close()
    return 1 if failed else 0
