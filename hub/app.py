"""The hub process: wires store, credentials, registry, ledger, alerts and server together,
runs the periodic work, and shuts down cleanly on SIGTERM.
"""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import os
import random
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from .admin import AdminSession
from .agent_session import AgentSession
from .alerts import Alerts
from .audit import Auditor
from .auth import Credentials, Principal
from .budget import ReadBudget
from .bus import Bus
from .channel import Session
from .config import HubConfig, parse_listen
from .fleet import Fleet
from .gate import Gate
from .ledger import Ledger
from .metrics import Metrics, StallReporter
from .protocol.codec import encode
from .protocol.constants import Close
from .protocol.listening import LISTEN_BACKLOG
from .queries import AdminQueries
from .registry import Registry
from .server import HubConnection, accept, listen_now
from .store.base import Store, StoreUnavailable
from .store.retention import Retention
from .store.sqlite import SQLiteStore

log = logging.getLogger(__name__)

__all__ = ["Hub"]

#: How often the client CRL file is checked for a newer version (seconds).
CRL_RELOAD_INTERVAL = 30.0


def _exit_watchdog(seconds: float, loop: asyncio.AbstractEventLoop) -> threading.Timer:
    """A stop that has not finished after ``seconds`` logs every thread's stack and exits.

    Every step of :meth:`Hub.stop` is bounded, so this should never fire; if it does, an
    operator gets the stacks to report and the process still ends (what SQLite committed
    is safe; systemd would otherwise kill it at TimeoutStopSec without a word).
    """

    def fire() -> None:
        stacks = "".join(
            f"\n-- thread {ident}\n" + "".join(traceback.format_stack(frame))
            for ident, frame in sys._current_frames().items()
        )
        # Where each coroutine waits: a stuck stop is an await, not a running frame.
        # Read from this thread without the loop's help; good enough for a dying process.
        try:
            tasks = list(asyncio.all_tasks(loop))
        except RuntimeError:
            tasks = []
        for task in tasks[:100]:
            out = io.StringIO()
            task.print_stack(limit=12, file=out)
            stacks += f"\n-- task {task.get_name()}\n{out.getvalue()}"
        log.critical("shutdown did not finish in %.0f s; exiting. Stacks:%s", seconds, stacks)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(seconds, fire)
    timer.name = "tether-exit-watchdog"
    timer.daemon = True
    timer.start()
    return timer


class Hub:
    """One hub process: builds its parts, starts and stops them, runs the periodic work.

    Who owns what (docs/architecture.md): the gate decides who comes in, the fleet what a
    registration means, the ledger what happens to commands, the alerts what is wrong, the
    admin queries what operators read; the store keeps it and the bus announces it. The
    hub holds them together and is what sessions and connections see through the narrow
    protocols they declare (``ServerHost``, ``AgentHost``, ``AdminHost``).
    """

    def __init__(self, config: HubConfig, store: Store | None = None) -> None:
        self.config = config
        self.hub_id = config.hub_id
        self.store: Store = store or self._make_store()
        self.bus: Bus = self._make_bus()
        self.metrics = Metrics()
        self.auditor = Auditor(self.store, self.bus, self.hub_id)
        self.credentials = Credentials(self.store)
        self.registry = Registry(self.hub_id)
        self.admins: set[AdminSession] = set()
        self.alerts = Alerts(
            config, self.hub_id, self.registry, self.metrics, self.store, self.bus, self.auditor
        )
        self.registry.on_state = self.alerts.agent_state_changed
        self.ledger: Any = self._make_ledger()
        self.fleet: Fleet = self._make_fleet()
        self.gate = Gate(
            config, self.credentials, self.registry, self.admins, self.metrics, self.auditor
        )
        self.alerts.shedding = self.gate.shedding
        self.credentials.on_revoked = self._revoked
        self.queries = AdminQueries(
            self.registry,
            self.ledger,
            self.alerts,
            self.store,
            self.auditor,
            self.metrics,
            self.stats,
        )
        self.read_budget = ReadBudget(config.read_budget_ms / 1000)
        self.tasks: set[asyncio.Future[Any]] = set()
        #: Wall-clock time for retention (tests give one of their own).
        self.clock: Callable[[], float] = time.time
        self.store_ready = False
        self.stopping = False
        self.servers: list[asyncio.Server] = []
        self.port = 0
        self._loops: list[asyncio.Task[None]] = []
        self._stall_reporter: StallReporter | None = None
        self._last_full_gc = time.monotonic()
        self.metrics.agent_states = self.registry.state_counts
        self.metrics.admin_clients = lambda: len(self.admins)
        self.metrics.commands_in_flight = lambda: self.ledger.in_flight
        self.metrics.store_commits = lambda: self.store.commits
        # A full disk on a dashboard before it is an outage (docs/operations.md).
        health = self.store.health
        self.metrics.extra_gauges["tether_store_writable"] = lambda: float(not health.reason)
        self.metrics.extra_gauges["tether_store_writes_kept"] = lambda: health.retained

    # The parts that cluster mode replaces (hub/cluster_hub.py).

    def _make_store(self) -> Store:
        return SQLiteStore(self.config.data_dir, synchronous=self.config.store_synchronous)

    def _make_bus(self) -> Bus:
        return Bus()

    def _make_ledger(self, send: Callable[[str, bytes], bool] | None = None) -> Any:
        return Ledger(
            self.config,
            self.store,
            self.registry,
            self.bus,
            self.metrics,
            self.auditor,
            send or self._send,
        )

    def _make_fleet(self) -> Fleet:
        return Fleet(
            self.config,
            self.hub_id,
            self.registry,
            self.store,
            self.bus,
            self.auditor,
            self.metrics,
            self.credentials,
            self.ledger,
            on_takeover=self.alerts.takeover,
        )

    # -- start and stop ------------------------------------------------------------------

    async def start(self) -> None:
        config = self.config
        host, port = parse_listen(config.listen)
        # Listening first: a fleet reconnecting while the state loads waits, not refused.
        # Workers of one `serve --workers N` share the port, the kernel spreading connections.
        sockets = listen_now(host, port, LISTEN_BACKLOG, reuse_port=config.reuse_port)
        self.port = sockets[0].getsockname()[1]
        try:
            await self._load()
            loop = asyncio.get_running_loop()
            for sock in sockets:
                server = await loop.create_server(
                    # TLS runs inside the connection (hub/protocol/tls_layer.py): the gate
                    # counts and times a TLS handshake like any half-open connection.
                    lambda: accept(self),
                    sock=sock,
                    backlog=LISTEN_BACKLOG,
                )
                self.servers.append(server)
        except BaseException:
            for server in self.servers:
                server.close()
            for sock in sockets:
                sock.close()
            raise
        self._loops = self._periodic_work()
        if config.gc_freeze_interval:
            self._loops.append(self._every(config.gc_freeze_interval, self._gc, "gc"))
            gc.collect()
            gc.freeze()
        self.metrics.lag.start()
        self.metrics.gc.install()
        if config.stall_report_ms:
            self._stall_reporter = StallReporter(self.metrics.lag, config.stall_report_ms / 1000)
            self._stall_reporter.start()
        self.auditor.record("hub.start", subject=self.hub_id, listen=config.listen)
        log.info("hub %s listening on %s:%d", self.hub_id, host, self.port)

    async def _load(self) -> None:
        """Open the store and read the state back (after a restart or a crash)."""
        await self.store.open()
        self.store_ready = True
        await self.credentials.load()
        self.registry.load(await self.store.load_agents())
        await self.ledger.load()
        await self.alerts.load()

    def _periodic_work(self) -> list[asyncio.Task[None]]:
        config = self.config
        return [
            self._every(min(1.0, config.heartbeat_interval / 4), self._sweep, "sweep"),
            self._every(config.heartbeat_flush_interval, self.fleet.flush_heartbeats, "heartbeats"),
            self._every(config.credential_sync_interval, self.credentials.sync, "credentials"),
            self._every(1.0, self._tick, "tick"),
            self._every(5.0, self._check_store, "readiness"),
            self._every(CRL_RELOAD_INTERVAL, self.reload_crl, "crl"),
            self._every(1.0, self.store.checkpoint, "checkpoint"),
            self._every(config.prune_interval, self.prune, "prune"),
        ]

    async def stop(self) -> None:
        """Drain: stop accepting, send agents elsewhere with a spread, save, close."""
        if self.stopping:
            return
        self.stopping = True
        config = self.config
        for server in self.servers:
            server.close()
        spread = config.reconnect_spread_ms
        began = time.monotonic()
        agents = len(self.registry.live)
        for session in list(self.registry.live.values()):
            after = random.randint(0, spread) if spread else 0
            reconnect = encode({"type": "reconnect", "after_ms": after, "reason": "draining"})
            session.close(Close.SERVICE_RESTART, "hub restarting", farewell=reconnect)  # type: ignore[call-arg]
        for admin in list(self.admins):
            admin.close(Close.GOING_AWAY, "hub going away")
        deadline = time.monotonic() + config.shutdown_timeout
        while (self.registry.live or self.admins) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        drained = time.monotonic()
        for session in list(self.registry.live.values()):
            session.conn.abort()  # type: ignore[attr-defined]
        for admin in list(self.admins):
            admin.conn.abort()
        await asyncio.sleep(0)
        self.metrics.lag.stop()
        self.metrics.gc.uninstall()
        if self._stall_reporter is not None:
            self._stall_reporter.stopping.set()
        for task in self._loops:
            task.cancel()
        if self._loops:
            # Bounded like every other step: a loop that swallowed its cancel must not hold
            # the stop (it happened, through wait_for on Python 3.11).
            _, stuck = await asyncio.wait(self._loops, timeout=config.shutdown_timeout)
            for task in stuck:
                log.error("periodic task %s did not stop when cancelled", task.get_name())
        self.fleet.flush_heartbeats(force=True)
        self.gate.close()
        self.auditor.record("hub.stop", subject=self.hub_id)
        for task in list(self.tasks):
            task.cancel()
        # Every step is bounded: a stuck write must not keep the process from exiting.
        for step in self._last_steps():
            try:
                async with asyncio.timeout(config.shutdown_timeout):
                    await step()
            except (TimeoutError, StoreUnavailable) as exc:
                log.error("shutdown step %s did not complete: %r", step.__qualname__, exc)
        log.info(
            "hub %s stopped: %d agents sent away in %.2f s, stopped %.2f s after",
            self.hub_id,
            agents,
            drained - began,
            time.monotonic() - drained,
        )

    def _last_steps(self) -> list[Callable[[], Any]]:
        """Saving the state, in order, at the end of a stop."""
        return [self.ledger.drain, self.auditor.drain, self.store.flush, self.store.close]

    async def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then drain and return."""
        await self.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("signal received: draining")
        # Only the process that owns the hub may end itself: a library user (a test, an
        # embedding) gets a stop that returns, never an os._exit from a timer.
        watchdog = _exit_watchdog(8 * self.config.shutdown_timeout, loop)
        try:
            await self.stop()
        finally:
            watchdog.cancel()

    # -- periodic work -------------------------------------------------------------------

    def _every(self, interval: float, work: Callable[[], Any], name: str) -> asyncio.Task[None]:
        return asyncio.create_task(self._repeat(interval, work), name=name)

    async def _repeat(self, interval: float, work: Callable[[], Any]) -> None:
        name = getattr(work, "__name__", repr(work))
        while True:
            await asyncio.sleep(interval)
            try:
                result = work()
                if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                    await result
            except asyncio.CancelledError:
                raise
            except StoreUnavailable as exc:
                log.warning("%s: store unavailable: %s", name, exc)
            except Exception:
                log.exception("periodic %s failed", name)
            # A library that swallowed our cancel (redis-py 8.0-8.2 did) returns normally:
            # the task still knows it was cancelled, so the loop ends here all the same.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError

    def _sweep(self) -> None:
        self.fleet.sweep()
        self.ledger.tick()

    def _tick(self) -> None:
        history = self.metrics.history
        now = time.time()
        wanted = self.bus.wanted("metrics")
        if wanted or history.due(now):
            stats = self.stats()
            history.offer(now, stats)
            if wanted:
                self.bus.publish("metrics", "tick", "tick", stats=stats)
        self.alerts.evaluate()

    async def _check_store(self) -> None:
        self.store_ready = await self.store.ping()

    async def reload_crl(self) -> None:
        await self.gate.reload_crl(self._sessions)

    def _gc(self) -> None:
        """Freeze survivors; now and then collect everything once (and say how long)."""
        interval = self.config.gc_full_interval
        if interval and time.monotonic() - self._last_full_gc >= interval:
            self._last_full_gc = time.monotonic()
            started = time.perf_counter()
            gc.unfreeze()
            found = gc.collect()
            gc.freeze()
            log.info(
                "full garbage collection: %d objects in %.0f ms",
                found,
                (time.perf_counter() - started) * 1000,
            )
        else:
            gc.freeze()

    def retention(self) -> Retention:
        config = self.config
        return Retention(
            outputs=config.output_retention,
            commands=config.command_retention,
            sessions=config.session_retention,
            alerts=config.alert_retention,
            audit=config.audit_retention,
            heartbeats=config.heartbeat_retention,
        )

    async def prune(self) -> dict[str, int]:
        """Delete what the retention settings no longer keep (at :attr:`clock`'s time)."""
        started = time.monotonic()
        pruned = await self.store.prune_expired(
            self.retention(), self.clock(), self.config.audit_export
        )
        if any(pruned.values()):
            log.info(
                "pruned %s in %.1f s",
                ", ".join(f"{n} {kind}" for kind, n in pruned.items() if n),
                time.monotonic() - started,
            )
        return pruned

    # -- what connections and sessions see -----------------------------------------------

    def not_ready_reason(self) -> str:
        if self.stopping:
            return "draining"
        if not self.store_ready:
            return "store unavailable"
        if cannot_write := self.store.health.reason:
            return f"store: {cannot_write}"
        return ""

    def readiness_warnings(self) -> list[str]:
        return []

    def open_session(self, conn: HubConnection, principal: Principal, agent: bool) -> Session:
        if agent:
            return AgentSession(self, conn, principal)
        return AdminSession(self, conn, principal)

    def spawn(self, coroutine: Any) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def stats(self) -> dict[str, Any]:
        return self.metrics.stats({self.hub_id: self.registry.connected})

    def _send(self, agent_id: str, data: bytes) -> bool:
        session = self.registry.live.get(agent_id)
        return session is not None and session.send(data)

    def _sessions(self) -> list[Any]:
        return [*self.registry.live.values(), *self.admins]

    def _revoked(self, credential_ids: set[str]) -> None:
        self.gate.close_revoked(credential_ids, self._sessions())
