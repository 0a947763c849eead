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
import ssl
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from .admin import RequestError
from .admission import FailureTracker, RefusalSpread, TokenBucket
from .alerts import Alerts
from .audit import Auditor
from .auth import PREFIXES, AuthFailure, Credentials, Principal
from .budget import ReadBudget
from .bus import Bus
from .config import HubConfig, parse_listen
from .identity import JwtVerifier, certificate_agent_id, revoked_by_crl
from .ledger import Ledger
from .metrics import Metrics, StallReporter
from .model import AgentRecord
from .protocol.codec import encode
from .protocol.constants import Close
from .protocol.messages import CancelRequest
from .registry import Registry
from .server import HubConnection, listen_now
from .store.base import Store, StoreUnavailable
from .store.sqlite import SQLiteStore

log = logging.getLogger(__name__)

__all__ = ["Events", "Hub"]

#: Agents a snapshot or listing turns into views per turn of the event loop.
VIEW_CHUNK = 2_000
#: Connections the kernel queues until the hub accepts them (capped by net.core.somaxconn).
LISTEN_BACKLOG = 4096
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


class Events:
    """Announcements about agents, coalesced per agent id in subscriber queues."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    def agent(self, record: AgentRecord, kind: str, **extra: Any) -> None:
        if self.bus.wanted("agents"):
            self.bus.publish("agents", kind, record.agent_id, agent=record.view(), **extra)


class Hub:
    def __init__(self, config: HubConfig, store: Store | None = None) -> None:
        self.config = config
        self.hub_id = config.hub_id
        self.store: Store = store or SQLiteStore(
            config.data_dir, synchronous=config.store_synchronous
        )
        self.bus = Bus()
        self.events = Events(self.bus)
        self.metrics = Metrics()
        self.auditor = Auditor(self.store, self.bus, self.hub_id)
        self.credentials = Credentials(self.store)
        self.credentials.on_revoked = self._revoked
        self.jwt = (
            JwtVerifier(
                config.jwt_secret_file, config.jwt_key, config.jwt_algorithms, config.jwt_leeway
            )
            if config.jwt_secret_file is not None or config.jwt_key is not None
            else None
        )
        self.registry = Registry(self.hub_id)
        self.ledger = Ledger(
            config, self.store, self.registry, self.bus, self.metrics, self.auditor, self._send
        )
        self.alerts = Alerts(self)
        self.failures = FailureTracker(
            config.auth_failure_limit, config.auth_failure_window, config.auth_cooloff
        )
        self.read_budget = ReadBudget(config.read_budget_ms / 1000)
        self.handshake_rate = TokenBucket(
            config.max_handshakes_per_second, config.max_handshakes_per_second
        )
        self.busy_refusals = RefusalSpread(
            config.max_handshakes_per_second, 2 * config.overload_retry_after
        )
        self._crl_mtime = 0
        self.tls = self.ssl_context()
        self.admins: set[Any] = set()
        self.tasks: set[asyncio.Future[Any]] = set()
        self.pending_handshakes = 0
        #: Pending handshakes by source address, kept only with ``max_pending_per_source``.
        self.pending_by_source: dict[str, int] = {}
        self.started_at = time.time()
        self.store_ready = False
        self.stopping = False
        self.servers: list[asyncio.Server] = []
        self.port = 0
        self._takeovers: dict[str, deque[float]] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._stall_reporter: StallReporter | None = None
        interval = config.heartbeat_interval
        self.heartbeat_interval_wire: float = (
            int(interval) if interval == int(interval) else interval
        )
        self.metrics.agent_states = self.registry.state_counts
        self.metrics.admin_clients = lambda: len(self.admins)
        self.metrics.commands_in_flight = lambda: self.ledger.in_flight
        self.metrics.store_commits = lambda: self.store.commits

    # -- start and stop ------------------------------------------------------------------

    async def start(self) -> None:
        config = self.config
        host, port = parse_listen(config.listen)
        # Listening first: a fleet reconnecting while the state loads waits, not refused.
        sockets = listen_now(host, port, LISTEN_BACKLOG)
        self.port = sockets[0].getsockname()[1]
        try:
            await self.store.open()
            self.store_ready = True
            await self.credentials.load()
            self.registry.load(await self.store.load_agents())
            await self.ledger.load()
            await self.alerts.load()
            loop = asyncio.get_running_loop()
            for sock in sockets:
                server = await loop.create_server(
                    lambda: HubConnection(self), sock=sock, ssl=self.tls, backlog=LISTEN_BACKLOG
                )
                self.servers.append(server)
        except BaseException:
            for server in self.servers:
                server.close()
            for sock in sockets:
                sock.close()
            raise
        self._loops = [
            asyncio.create_task(
                self._every(min(1.0, config.heartbeat_interval / 4), self._sweep), name="sweep"
            ),
            asyncio.create_task(
                self._every(config.heartbeat_flush_interval, self._flush_heartbeats),
                name="heartbeats",
            ),
            asyncio.create_task(
                self._every(config.credential_sync_interval, self._sync_credentials),
                name="credentials",
            ),
            asyncio.create_task(self._every(1.0, self._tick), name="tick"),
            asyncio.create_task(self._every(5.0, self._check_store), name="readiness"),
            asyncio.create_task(self._every(CRL_RELOAD_INTERVAL, self.reload_crl), name="crl"),
            asyncio.create_task(self._every(1.0, self.store.checkpoint), name="checkpoint"),
            asyncio.create_task(self._every(3600.0, self._prune), name="prune"),
        ]
        if config.gc_freeze_interval:
            self._loops.append(
                asyncio.create_task(self._every(config.gc_freeze_interval, self._gc), name="gc")
            )
            gc.collect()
            gc.freeze()
        self.metrics.lag.start()
        self.metrics.gc.install()
        if config.stall_report_ms:
            self._stall_reporter = StallReporter(self.metrics.lag, config.stall_report_ms / 1000)
            self._stall_reporter.start()
        self.auditor.record("hub.start", subject=self.hub_id, listen=config.listen)
        log.info("hub %s listening on %s:%d", self.hub_id, host, self.port)

    def ssl_context(self) -> ssl.SSLContext | None:
        config = self.config
        if config.tls_cert is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(config.tls_cert, config.tls_key)
        if config.client_ca is not None:
            context.load_verify_locations(config.client_ca)
            # Optional at the TLS layer: /healthz and friends never need a certificate;
            # /ws and /admin enforce --require-client-cert after the handshake.
            context.verify_mode = ssl.CERT_OPTIONAL
            if config.client_crl is not None:
                # A presented certificate that the CRL revokes fails the handshake. OpenSSL
                # keeps every CRL loaded and uses the newest: reloading one adds it. (Its
                # time is read first, so that a change while it loads is not missed.)
                self._crl_mtime = config.client_crl.stat().st_mtime_ns
                context.load_verify_locations(config.client_crl)
                context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        return context

    async def reload_crl(self) -> None:
        """Pick up a renewed CRL (and with it newly revoked certificates) without a restart."""
        path, context = self.config.client_crl, self.tls
        if path is None or context is None:
            return
        try:
            mtime = (await asyncio.to_thread(path.stat)).st_mtime_ns
            if mtime == self._crl_mtime:
                return
            await asyncio.to_thread(context.load_verify_locations, path)
        except (OSError, ssl.SSLError) as exc:
            log.error("cannot reload the client CRL %s: %s", path, exc)
            return
        self._crl_mtime = mtime
        self.auditor.record("tls.crl_reloaded", subject=str(path))
        log.info("client CRL %s reloaded", path)
        await self._close_revoked_certificates(path)

    async def _close_revoked_certificates(self, path: Path) -> None:
        """Close (4003) the connections whose client certificate the CRL now revokes."""
        certified = []
        for session in [*self.registry.live.values(), *self.admins]:
            transport = session.conn.transport
            ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            if der:
                certified.append((session, der))
        if not certified:
            return
        try:
            data = await asyncio.to_thread(path.read_bytes)
            hits = await asyncio.to_thread(revoked_by_crl, data, [der for _, der in certified])
        except (OSError, ValueError) as exc:
            log.error("cannot read the client CRL %s: %s", path, exc)
            return
        for index in hits:
            session = certified[index][0]
            self.auditor.record("connection.revoked", subject="certificate", actor=session.actor)
            session.close(Close.REVOKED, "certificate revoked")

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
            session.close(Close.SERVICE_RESTART, "hub restarting", farewell=reconnect)
        for admin in list(self.admins):
            admin.close(Close.GOING_AWAY, "hub going away")
        deadline = time.monotonic() + config.shutdown_timeout
        while (self.registry.live or self.admins) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        drained = time.monotonic()
        for session in list(self.registry.live.values()):
            session.conn.abort()
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
        self._flush_heartbeats(force=True)
        self.auditor.record("hub.stop", subject=self.hub_id)
        for task in list(self.tasks):
            task.cancel()
        # Every step is bounded: a stuck write must not keep the process from exiting.
        for step in (self.ledger.drain, self.auditor.drain, self.store.flush, self.store.close):
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

    async def _every(self, interval: float, work: Any) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                result = work()
                if asyncio.iscoroutine(result):
                    await result
            except asyncio.CancelledError:
                raise
            except StoreUnavailable as exc:
                log.warning("%s: store unavailable: %s", getattr(work, "__name__", work), exc)
            except Exception:
                log.exception("periodic %s failed", getattr(work, "__name__", work))

    def _sweep(self) -> None:
        now = time.time()
        interval = self.config.heartbeat_interval
        for session in list(self.registry.live.values()):
            session.check_liveness(now, interval)  # type: ignore[attr-defined]
        self.ledger.tick()
        if now - self.started_at > max(60.0, 3 * interval + self.config.reconnect_spread_ms / 1000):
            for record in self.registry.records.values():
                if record.state == "unknown":
                    record.connected_at = None
                    self.registry.set_state(record, "offline")
                    self.events.agent(record, "updated")

    _last_sample = 0.0

    def _flush_heartbeats(self, force: bool = False) -> None:
        now = time.time()
        samples = now - self._last_sample >= self.config.heartbeat_sample_interval
        dirty = [r for r in self.registry.records.values() if r.dirty]
        if not dirty and not force:
            return
        for record in dirty:
            record.dirty = False
        if samples:
            self._last_sample = now
        self.store.save_heartbeats(dirty, samples)

    async def _sync_credentials(self) -> None:
        await self.credentials.sync()

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

    _last_full_gc = time.monotonic()

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

    def _prune(self) -> None:
        self.store.prune(time.time() - self.config.heartbeat_retention)

    # -- hooks for sessions --------------------------------------------------------------

    def not_ready_reason(self) -> str:
        if self.stopping:
            return "draining"
        if not self.store_ready:
            return "store unavailable"
        return ""

    def admin_limit_reached(self, principal: Principal) -> str | None:
        """Which admin connection limit a new connection of ``principal`` would pass."""
        config = self.config
        admins = self.admins
        if len(admins) >= config.max_admin_connections:
            return "admin connection limit"
        credential = principal.credential_id
        held = sum(1 for admin in admins if admin.principal.credential_id == credential)
        if held >= config.max_admin_per_credential:
            return "admin connection limit of this credential"
        return None

    def authenticate(self, token: str, conn: HubConnection) -> Principal:
        """A bearer token (ours or a JWT), checked against the client certificate if any."""
        if token[:4] in PREFIXES.values() or self.jwt is None or token.count(".") != 2:
            principal = self.credentials.authenticate(token)
        else:
            principal = self.jwt.verify(token)
            if self.credentials.is_revoked(principal.credential_id):
                raise AuthFailure(403, "revoked token")
        certified = self.certificate_agent(conn)
        if certified is not None and principal.is_agent:
            # A certificate for one agent can never register as another.
            if principal.agent_id is not None and principal.agent_id != certified:
                raise AuthFailure(403, "the client certificate names another agent")
            principal = replace(principal, agent_id=certified)
        return principal

    def certificate_agent(self, conn: HubConnection) -> str | None:
        transport = conn.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if ssl_object is None or self.config.client_ca is None:
            return None
        return certificate_agent_id(ssl_object.getpeercert())

    def has_client_certificate(self, conn: HubConnection) -> bool:
        transport = conn.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        return bool(ssl_object is not None and ssl_object.getpeercert())

    def certificate_identity(self, conn: HubConnection) -> Principal | None:
        """Authentication by client certificate alone (no bearer token)."""
        agent_id = self.certificate_agent(conn)
        if agent_id is None:
            return None
        return Principal(kind="cert", credential_id=None, agent_id=agent_id)

    def _send(self, agent_id: str, data: bytes) -> bool:
        session = self.registry.live.get(agent_id)
        return session is not None and session.send(data)

    def on_takeover(self, agent_id: str, peer: str) -> None:
        now = time.monotonic()
        window = self.config.alert_conflict_window
        takeovers = self._takeovers.setdefault(agent_id, deque(maxlen=32))
        takeovers.append(now)
        while takeovers and takeovers[0] < now - window:
            takeovers.popleft()
        self.auditor.record("agent.takeover", subject=agent_id, source=peer, recent=len(takeovers))
        self.alerts.takeover(agent_id, len(takeovers))
        if len(self._takeovers) > 10_000:
            for key in [k for k, v in self._takeovers.items() if not v or v[-1] < now - window]:
                del self._takeovers[key]

    def _revoked(self, credential_ids: set[str]) -> None:
        sessions: list[Any] = [*self.registry.live.values(), *self.admins]
        for session in sessions:
            credential_id = session.principal.credential_id
            if credential_id not in credential_ids:
                continue
            self.auditor.record("connection.revoked", subject=credential_id, actor=session.actor)
            session.close(Close.REVOKED, "credential revoked")

    # -- views for the admin channel -----------------------------------------------------

    async def views(self, records: Iterable[AgentRecord]) -> list[dict[str, Any]]:
        """Agent views, yielding to the event loop between chunks (big fleets)."""
        views = []
        for index, record in enumerate(records, 1):
            views.append(record.view())
            if index % VIEW_CHUNK == 0:
                await asyncio.sleep(0)
        return views

    def stats(self) -> dict[str, Any]:
        return self.metrics.stats({self.hub_id: self.registry.connected})

    async def snapshot(self, topics: frozenset[str]) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if "agents" in topics:
            data["agents"] = await self.views(self.registry.records.values())
        if "commands" in topics:
            page = await self.store.commands({}, 100, None)
            data["commands"] = page.items
        if "alerts" in topics:
            data["alerts"] = self.alerts.open_views()
        if "metrics" in topics:
            data["metrics"] = self.stats()
        if "audit" in topics:
            page = await self.store.audit_entries({}, 100, None)
            data["audit"] = page.items
        return data

    async def agent_detail(self, agent_id: str) -> dict[str, Any]:
        record = self.registry.records.get(agent_id)
        if record is None:
            raise RequestError("not_found", "no such agent")
        history = await self.store.agent_history(agent_id)
        page = await self.store.commands({"agent_id": agent_id}, 100, None)
        return {
            "agent": record.view(),
            "heartbeats": history["heartbeats"],
            "sessions": history["sessions"],
            "commands": page.items,
        }

    async def job_detail(self, job_id: str) -> dict[str, Any]:
        stored = await self.store.job(job_id)
        if stored is None:
            raise RequestError("not_found", "no such job")
        live = self.ledger.job_view(job_id)
        if live is not None:
            stored["job"] = live
        unfinished = self.ledger.unfinished_of_job(job_id)
        if unfinished:
            stored["commands"] = [
                unfinished[c["command_id"]].view() if c["command_id"] in unfinished else c
                for c in stored["commands"]
            ]
        return stored

    def overlay_jobs(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [self.ledger.job_view(item["job_id"]) or item for item in items]

    async def cancel(self, request: CancelRequest, actor: str) -> dict[str, Any]:
        self.auditor.record(
            "admin.cancel", actor=actor, subject=request.job_id or request.command_id
        )
        if request.job_id is not None:
            outcome = self.ledger.cancel_job(request.job_id, actor)
            if outcome is None:
                if await self.store.job(request.job_id) is None:
                    raise RequestError("not_found", "no such job")
                return {"cancelled": [], "requested": [], "finished": True}
            return {**outcome, "finished": False}
        assert request.command_id is not None
        result = self.ledger.cancel_command(request.command_id, actor)
        if result == "finished" and await self.store.command(request.command_id) is None:
            raise RequestError("not_found", "no such command")
        return {
            "cancelled": [request.command_id] if result == "cancelled" else [],
            "requested": [request.command_id] if result == "requested" else [],
            "finished": result == "finished",
        }
