"""The handshake gate: who may open a WebSocket on this hub, decided before one exists.

One entry, :meth:`Gate.check`: a parsed upgrade request and its connection in, the
:class:`~hub.auth.Principal` it proved or the HTTP refusal to send out, in the order of
PROTOCOL §2: method and form, Origin, client certificate, credential (with the
failed-authentication cool-off), revocation and channel, admission (agent limit, handshake
rate, admin connection limits), subprotocol. Every check reads memory only, so a handshake
never waits on the store (an unknown but well-formed token id raises
:class:`~hub.auth.NotCached`: :meth:`Gate.look_up` it, then check again).

The gate also owns what a peer can hold before it has proved anything — the pending
handshakes (:meth:`Gate.arrive`), shed by source address at their cap and timed out sooner
under pressure, and the refusals written to the audit, folded per source — the server's TLS
context and client CRL, and closing live connections whose credential or certificate was
revoked.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import logging
import random
import socket
import ssl
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from .admission import (
    FailureTracker,
    RefusalFold,
    RefusalSpread,
    SourceShare,
    TokenBucket,
    source_key,
)
from .audit import Auditor
from .auth import PREFIXES, AuthFailure, Credentials, Principal
from .config import HubConfig
from .identity import JwtVerifier, certificate_agent_id, revoked_by_crl
from .metrics import Metrics
from .protocol.codec import encode
from .protocol.constants import ADMIN_SUBPROTOCOL, AGENT_PATH, AGENT_SUBPROTOCOL, Close
from .registry import Registry

log = logging.getLogger(__name__)

__all__ = [
    "SHED_BUSY",
    "Gate",
    "Guest",
    "Pending",
    "Shedding",
    "json_response",
    "offered_subprotocols",
    "plain_response",
]

#: What :meth:`Gate.arrive` says of a new connection: pending (0); refused, to be answered
#: 503 from its first bytes, because the hub's pending handshakes are at their cap and none
#: could make room (1) or because its own address holds ``max_pending_per_source`` (2); or
#: to be closed at once, unanswered, because as many refusals are still waiting for their
#: first bytes (3): refusals in flight are bounded by the cap too, the oldest answered one
#: closed to make room.
ADMITTED, SHED_FULL, SHED_SOURCE, SHED_NOW = 0, 1, 2, 3
#: ...or refused, answered 503 from its first bytes, because the hub is behind: it waited
#: in the kernel's accept queue longer than ``max_queue_delay`` (or the loop runs that late).
SHED_BUSY = 4

#: At the cap, a newcomer takes the place of a half-open connection. When the source (an
#: IPv4 address, an IPv6 /64) holding the most holds more than twice what the newcomer's
#: would, its oldest, whatever its age (fair share: a heavy source pays for the others).
#: Otherwise — no source stands out, or the newcomer's own is among the heaviest, as in a
#: reconnect storm from a few NATs — the oldest half-open connection of all, if it has been
#: half-open this long and its source holds more than two (else the heaviest source's
#: oldest, if that is this old): younger ones are most likely agents whose request is on
#: its way, and then the newcomer is refused (503 + Retry-After) instead.
SWAP_AGE = 1.0
#: How often half-open connections are checked against the open timeout.
SWEEP_INTERVAL = 0.25
#: A shedding episode (for the ``handshake_flood`` alert) ends after this long without a shed.
SHED_QUIET = 10.0
#: One audit entry per source address and this many seconds for the refusals of a flood
#: (shed, timed out, refused at the pending cap, in a failed-authentication cool-off)...
FOLD_WINDOW = 60.0
#: ...and at most this many in that time for any other refusal before the upgrade (a flood
#: of complete bad requests must not become an audit-log flood either).
REFUSALS_PER_WINDOW = 60


class Guest(Protocol):
    """What the gate reads of a connection that asks to come in."""

    peer: str
    early_data: bool

    @property
    def transport(self) -> asyncio.BaseTransport | None: ...


class Pending(Guest, Protocol):
    """A connection the gate counts among the pending handshakes until its request arrives."""

    def drop(self, answer: bytes | None) -> None:
        """The gate gave up on it (shed, or timed out): write ``answer`` if the socket takes
        it at once, and close. It is no longer pending."""
        ...


class Shedding(NamedTuple):
    """An episode of shedding at the pending cap, for the ``handshake_flood`` alert."""

    seconds: float
    shed: int
    refused: int
    #: The source holding the most half-open handshakes now, and how many.
    heaviest: tuple[str, int] | None


class Closable(Protocol):
    """A live session the gate may close when its credential is revoked."""

    principal: Principal

    @property
    def actor(self) -> str: ...

    @property
    def conn(self) -> Guest: ...

    def close(self, code: int, reason: str = "") -> None: ...


def plain_response(
    status: int, body: bytes, content_type: str, extra: list[tuple[str, str]] | None = None
) -> Response:
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("Connection", "close"),
        ]
    )
    for name, value in extra or ():
        headers[name] = value
    return Response(status, http.HTTPStatus(status).phrase, headers, body)


def json_response(status: int, body: Any, headers: list[tuple[str, str]] | None = None) -> Response:
    return plain_response(status, encode(body), "application/json", headers)


def offered_subprotocols(headers: Headers) -> list[str]:
    return [
        p.strip()
        for value in headers.get_all("Sec-WebSocket-Protocol")
        for p in value.split(",")
        if p.strip()
    ]


def server_ssl_context(config: HubConfig) -> ssl.SSLContext | None:
    """TLS 1.2+ with the hub's certificate; client certificates optional at this layer."""
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
            # A presented certificate that the CRL revokes fails the handshake (a changed
            # CRL is loaded into a fresh context: Gate.reload_crl).
            context.load_verify_locations(config.client_crl)
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    # TLS 1.3 session tickets (stateless: the hub keeps nothing per ticket) let a returning
    # agent skip the certificate exchange and signature. One per handshake: an agent holds
    # one connection, and every resumed handshake brings a fresh ticket.
    context.num_tickets = 1
    return context


#: Linux's TCP_INFO (``struct tcp_info``): ``tcpi_last_data_recv``, milliseconds since the
#: connection last received data — for one just accepted, since its request arrived (or,
#: before any data, since its TCP handshake): how long it waited in the accept queue.
_TCP_INFO = getattr(socket, "TCP_INFO", None)
_TCP_INFO_SIZE = 104
_LAST_DATA_RECV = struct.Struct("=I")
_LAST_DATA_RECV_OFFSET = 52


def queued_for(conn: Guest) -> float:
    """Seconds a connection just accepted had waited in the kernel's queue (0 where the
    platform cannot say)."""
    transport = conn.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or _TCP_INFO is None:
        return 0.0
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_SIZE)
    except (OSError, AttributeError, TypeError):
        return 0.0
    if len(info) < _LAST_DATA_RECV_OFFSET + 4:
        return 0.0
    return float(_LAST_DATA_RECV.unpack_from(info, _LAST_DATA_RECV_OFFSET)[0]) / 1000


def _peer_certificate(conn: Guest, binary: bool = False) -> Any:
    transport = conn.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    return ssl_object.getpeercert(binary_form=binary)


class Gate:
    def __init__(
        self,
        config: HubConfig,
        credentials: Credentials,
        registry: Registry,
        admins: set[Any],
        metrics: Metrics,
        auditor: Auditor,
    ) -> None:
        self.config = config
        self.credentials = credentials
        self.registry = registry
        #: Open admin sessions, counted against the admin connection limits.
        self.admins = admins
        self.metrics = metrics
        self.auditor = auditor
        self.jwt = (
            JwtVerifier(
                config.jwt_secret_file, config.jwt_key, config.jwt_algorithms, config.jwt_leeway
            )
            if config.jwt_secret_file is not None or config.jwt_key is not None
            else None
        )
        self.failures = FailureTracker(
            config.auth_failure_limit, config.auth_failure_window, config.auth_cooloff
        )
        self.handshake_rate = TokenBucket(
            config.max_handshakes_per_second, config.max_handshakes_per_second
        )
        self.busy_refusals = RefusalSpread(
            config.max_handshakes_per_second, 2 * config.overload_retry_after
        )
        #: Connections that have not had their request handled yet: the half-open ones and
        #: those whose request waits for the read budget (hub/budget.py).
        self.pending_handshakes = 0
        #: The pending connections whose request has not arrived yet, by source (an IPv4
        #: address, an IPv6 /64: ``source_key``).
        self.half_open: SourceShare[Pending] = SourceShare()
        #: Pending handshakes by source, kept only with ``max_pending_per_source``.
        self.pending_by_source: dict[str, int] = {}
        #: Newcomers refused at arrival whose answer is still being written (bounded too)...
        self.refusing = 0
        #: ...and of those, the ones answered already, oldest first.
        self._answered: OrderedDict[Pending, None] = OrderedDict()
        self.clock: Callable[[], float] = time.monotonic
        self._sweeper: asyncio.TimerHandle | None = None
        self.folds = RefusalFold(FOLD_WINDOW)
        self.refusal_folds = RefusalFold(FOLD_WINDOW, burst=REFUSALS_PER_WINDOW)
        self._fold_timer: asyncio.TimerHandle | None = None
        self._shedding_since = 0.0
        self._last_shed = float("-inf")
        self._episode = [0, 0]  # shed, refused
        metrics.extra_gauges["tether_pending_handshakes"] = lambda: self.pending_handshakes
        metrics.extra_gauges["tether_half_open_handshakes"] = lambda: len(self.half_open)
        # The CRL's time is read before it is loaded, so that a change meanwhile is seen.
        crl = config.client_crl if config.client_ca is not None else None
        self._crl_mtime = crl.stat().st_mtime_ns if crl is not None else 0
        self.tls = server_ssl_context(config)

    # -- before the request: pending handshakes ------------------------------------------

    def arrive(self, conn: Pending) -> int:
        """A new connection: counted as pending and half-open (``ADMITTED``), or refused.

        At ``max_pending_handshakes`` a newcomer is admitted in the place of a half-open
        connection shed by fair share (:data:`SWAP_AGE`): a flood from a few addresses never
        keeps out an agent dialing from another, and a source holding one or two handshakes
        is never shed while another holds many. Refused newcomers are answered 503 from
        their first bytes (health probes get their usual answer), at most as many at once as
        the cap; past that they are closed unanswered.
        """
        config = self.config
        peer = conn.peer
        behind = config.max_queue_delay and self.behind(conn)
        if behind:
            return self._refusing(SHED_BUSY, peer)
        source = source_key(peer)
        per_source = config.max_pending_per_source
        if per_source and self.pending_by_source.get(source, 0) >= per_source:
            return self._refusing(SHED_SOURCE, peer)
        if self.pending_handshakes >= config.max_pending_handshakes and not self._make_room(source):
            return self._refusing(SHED_FULL, peer)
        self.pending_handshakes += 1
        if per_source:
            self.pending_by_source[source] = self.pending_by_source.get(source, 0) + 1
        self.half_open.add(conn, source, self.clock())
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP_INTERVAL, self._sweep)
        return ADMITTED

    def behind(self, conn: Guest) -> float:
        """How far behind the hub is by ``conn``'s measure, when past ``max_queue_delay``
        (else 0): the time it waited to be accepted, or the event loop's lateness.

        A saturated hub accepts connections late: each waited in the kernel's queue while
        the agent's open timeout (10 s by default) ran. Handshaking it anyway spends the
        hub's scarce time on an agent likely gone by the answer, and makes every later one
        wait longer still; a 503 now costs a few microseconds and tells the agent when to
        come back (the spread Retry-After of every busy refusal).
        """
        limit = self.config.max_queue_delay
        late = max(queued_for(conn), self.metrics.lag.current())
        return late if late > limit else 0.0

    def arrived(self, conn: Pending) -> None:
        """Its request head is in (waiting for the read budget): no longer half-open, so
        neither shed nor timed out, but still pending until the request is handled."""
        self.half_open.remove(conn)

    def progressed(self, conn: Pending) -> None:
        """A half-open connection's TLS handshake moved on (the hub answered its ClientHello,
        or the handshake is done): its clock starts again, so that each step — ClientHello,
        the client's Finished, the request — gets the open timeout of the moment, and a
        handshake the hub has paid for goes to the back of the shedding order. At most
        twice per connection (TLS bounds its flights)."""
        share = self.half_open
        if share.remove(conn):
            share.add(conn, source_key(conn.peer), self.clock())

    def depart(self, conn: Pending) -> None:
        """A pending handshake ended: its request was handled, or it closed."""
        self._forget(conn)

    def refusal_ended(self, conn: Pending) -> None:
        """A newcomer refused by :meth:`arrive` is gone."""
        self.refusing -= 1
        self._answered.pop(conn, None)

    def open_timeout(self) -> float:
        """How long a connection may take to send its request, now: ``open_timeout`` while at
        most half the pending places are taken, then shorter as they fill, down to
        ``open_timeout_min`` at the cap — a slow request costs an attacker more than it
        costs the hub."""
        config = self.config
        full = config.open_timeout
        floor = min(config.open_timeout_min, full)
        load = self.pending_handshakes / config.max_pending_handshakes
        if load <= 0.5:
            return full
        return max(floor, full - (full - floor) * (load - 0.5) * 2)

    def shed_answer(self, kind: int, conn: Pending) -> bytes:
        """The 503 a refused newcomer gets, with a Retry-After that spreads the retries."""
        if kind == SHED_SOURCE:
            self._flood(conn.peer, "source_overloaded", 503, "pending handshakes of this source")
        elif kind == SHED_BUSY:
            self._flood(conn.peer, "overloaded", 503, "hub behind: accepted late")
        else:
            self._flood(conn.peer, "overloaded", 503, "pending handshakes at their cap")
        self._episode[1] += 1
        self._answered[conn] = None
        return _OVERLOADED % self.busy_refusals.retry_after()

    def shedding(self) -> Shedding | None:
        """The shedding going on (None when nothing was shed for :data:`SHED_QUIET`)."""
        now = self.clock()
        if now - self._last_shed > SHED_QUIET:
            return None
        shed, refused = self._episode
        return Shedding(now - self._shedding_since, shed, refused, self.half_open.heaviest())

    def close(self) -> None:
        """The hub stops: timers off, and what the audit folded written out."""
        for timer in (self._sweeper, self._fold_timer):
            if timer is not None:
                timer.cancel()
        self._sweeper = self._fold_timer = None
        for folds in (self.folds, self.refusal_folds):
            self._write_folded(folds.flush())

    def _make_room(self, newcomer: str) -> bool:
        """Shed a half-open connection for a newcomer from source ``newcomer``, if fair (see
        :data:`SWAP_AGE`): a source holding one or two is never shed while another holds
        more."""
        share = self.half_open
        heaviest = share.heaviest()
        if heaviest is None:
            return False  # every pending request is in, waiting to be read: nothing to shed
        source, most = heaviest
        if most > 2 * (share.count(newcomer) + 1):
            victim, _ = share.oldest_of(source)
        else:
            now = self.clock()
            victim, arrived = share.oldest()
            if now - arrived < SWAP_AGE:
                return False
            if share.count(share.source_of(victim)) <= 2 < most:
                victim, arrived = share.oldest_of(source)
                if now - arrived < SWAP_AGE:
                    return False
        self._forget(victim)
        self._flood(
            victim.peer, "shed_half_open", 503, f"half-open; the most from a source: {most}"
        )
        self._episode[0] += 1
        victim.drop(_OVERLOADED % self.busy_refusals.retry_after(count=False))
        return True

    def _refusing(self, kind: int, peer: str) -> int:
        if self.refusing >= self.config.max_pending_handshakes and self._answered:
            # The oldest refusal already answered makes room: its 503 is on its way.
            answered, _ = self._answered.popitem(last=False)
            self.refusing -= 1
            answered.drop(None)
        if self.refusing >= self.config.max_pending_handshakes:
            result = "source_overloaded" if kind == SHED_SOURCE else "overloaded"
            self._flood(peer, result, None, "too many refusals in flight: closed unanswered")
            self._episode[1] += 1
            return SHED_NOW
        self.refusing += 1
        return kind

    def _forget(self, conn: Pending) -> None:
        self.half_open.remove(conn)
        self.pending_handshakes -= 1
        if self.config.max_pending_per_source:
            source = source_key(conn.peer)
            left = self.pending_by_source.get(source, 0) - 1
            if left > 0:
                self.pending_by_source[source] = left
            else:
                self.pending_by_source.pop(source, None)

    def _sweep(self) -> None:
        """Drop the half-open connections older than the open timeout of the moment: without
        a word at the full ``open_timeout`` (a slowloris deserves none), with 503 +
        Retry-After under pressure — a request not in after 2 s may be an agent's on a slow
        link, or one its own busy host had not sent yet, and it should come back later
        rather than back off as from a broken hub."""
        self._sweeper = None
        share = self.half_open
        now = self.clock()
        limit = self.open_timeout()
        pressed = limit < self.config.open_timeout
        while share:
            conn, arrived = share.oldest()
            if now - arrived < limit:
                break
            self._forget(conn)
            reason = f"no request within {limit:.3g} s"
            self._flood(conn.peer, "handshake_timeout", 503 if pressed else None, reason)
            answer = _OVERLOADED % self.busy_refusals.retry_after(count=False) if pressed else None
            conn.drop(answer)
        if share:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP_INTERVAL, self._sweep)

    # -- counted, and audited folded -----------------------------------------------------

    def _flood(
        self, source: str, result: str, status: int | None, reason: str, path: str | None = None
    ) -> None:
        """Count a refusal (or a shed, or a timeout) and audit it folded: the first of a
        minute per source is written, the others counted into that source's next entry."""
        self.metrics.connection(result)
        if result != "handshake_timeout" and result != "rate_limited":
            now = self.clock()
            if now - self._last_shed > SHED_QUIET:
                self._shedding_since = now
                self._episode = [0, 0]
            self._last_shed = now
        self._audit_folded(self.folds, source, status, result, reason, path)

    def _audit_folded(
        self,
        folds: RefusalFold,
        source: str,
        status: int | None,
        error: str,
        reason: str,
        path: str | None,
    ) -> None:
        folded = folds.note(source_key(source), error)
        if folds.evicted:
            self._write_folded(folds.take_evicted())
        if folded is not None:
            extra = {"folded": folded} if folded else {}
            self.auditor.record(
                "connection.refused",
                source=source,
                status=status,
                error=error,
                reason=reason,
                path=path[:200] if path is not None else None,
                **extra,
            )
        if self._fold_timer is None:
            self._arm_folds()

    def _arm_folds(self) -> None:
        delays = [
            due - folds.clock()
            for folds in (self.folds, self.refusal_folds)
            if (due := folds.next_due()) is not None
        ]
        if delays:
            loop = asyncio.get_running_loop()
            self._fold_timer = loop.call_later(max(0.0, min(delays)), self._folds_due)

    def _folds_due(self) -> None:
        self._fold_timer = None
        for folds in (self.folds, self.refusal_folds):
            self._write_folded(folds.due())
        self._arm_folds()

    def _write_folded(self, folded: list[tuple[str, dict[str, int]]]) -> None:
        """Counts of a source (an address, or an IPv6 /64) not written one by one."""
        for source, counts in folded:
            self.auditor.record("connection.folded", source=source, folded=counts)

    # -- the request ---------------------------------------------------------------------

    def check(self, request: Request, path: str, conn: Guest) -> Principal | Response:
        """PROTOCOL §2's checks of an upgrade on ``/ws`` or ``/admin``, in order."""
        config = self.config
        headers = request.headers
        if request.method != "GET":
            return self.refuse(
                conn, 405, "method_not_allowed", f"method {request.method[:20]}", path,
                [("Allow", "GET")],
            )  # fmt: skip
        # Headers.get raises on a repeated name. Origin and Authorization are singletons
        # (RFC 6454 §7.3, RFC 9110 §11.6.2): two of them are a malformed request, and a
        # way to smuggle an origin past a check that reads only one of them.
        for name in ("Origin", "Authorization"):
            if len(headers.get_all(name)) > 1:
                return self.refuse(conn, 400, "bad_request", f"repeated {name} header", path)
        if conn.early_data:
            # Whether the credential was cached or looked up: frames pipelined behind the
            # request never reach a session.
            return self.refuse(conn, 400, "bad_request", "frames sent before the handshake", path)
        if "websocket" not in ", ".join(headers.get_all("Upgrade")).lower():
            return self.refuse(
                conn, 426, "upgrade_required", "no websocket upgrade", path,
                [("Upgrade", "websocket")],
            )  # fmt: skip

        origin = headers.get("Origin")
        if origin is not None and origin not in config.allowed_origins:
            return self.refuse(conn, 403, "origin_not_allowed", f"origin {origin[:200]!r}", path)

        if config.require_client_cert and not _peer_certificate(conn):
            return self.refuse(conn, 403, "forbidden", "no client certificate", path)

        try:
            principal = self._authenticate(headers, conn)
        except AuthFailure as failure:
            if failure.status != 401:
                return self.refuse(conn, 403, "forbidden", failure.reason, path)
            retry = self.failures.cooling_down(conn.peer)
            self.failures.failed(conn.peer)
            if retry:
                # A source in its cool-off is audited folded, one entry a minute: a
                # credential-guessing flood must not become an audit-log flood.
                self._flood(conn.peer, "rate_limited", 429, failure.reason, path)
                return json_response(429, {"error": "rate_limited"}, [("Retry-After", str(retry))])
            return self.refuse(
                conn, 401, "unauthorized", failure.reason, path,
                [("WWW-Authenticate", "Bearer")],
            )  # fmt: skip

        agent_channel = path == AGENT_PATH
        if principal.is_agent != agent_channel:
            return self.refuse(
                conn, 403, "forbidden", f"{principal.kind} credential on {path}", path
            )

        if agent_channel:
            takeover = principal.agent_id is not None and principal.agent_id in self.registry.live
            if self.registry.connected >= config.max_agents and not takeover:
                return self._refuse_full(conn, "agent limit", path)
            if not self.handshake_rate.take():
                retry = self.busy_refusals.retry_after()
                return self.refuse(
                    conn, 503, "overloaded", "handshake rate", path,
                    [("Retry-After", str(retry))],
                )  # fmt: skip
        else:
            limit = self._admin_limit_reached(principal)
            if limit is not None:
                return self._refuse_full(conn, limit, path)

        offered = offered_subprotocols(headers)
        channel = AGENT_SUBPROTOCOL if agent_channel else ADMIN_SUBPROTOCOL
        if offered and channel not in offered:
            return self.refuse(conn, 400, "unsupported_subprotocol", f"offered {offered[:5]}", path)
        return principal

    async def look_up(self, credential_id: str) -> None:
        """Fetch a credential this hub has not seen yet (one store query for every waiting
        handshake); an id the store does not know either is remembered as unknown."""
        await self.credentials.look_up(credential_id)

    def accepted(self, agent_channel: bool) -> None:
        self.metrics.connection("accepted")
        if agent_channel:
            self.busy_refusals.admitted()

    # -- refusals ------------------------------------------------------------------------

    def refuse(
        self,
        conn: Guest,
        status: int,
        error: str,
        reason: str,
        path: str | None,
        headers: list[tuple[str, str]] | None = None,
    ) -> Response:
        """A refusal, counted and audited with its source (PROTOCOL §2)."""
        self.record_refusal(conn, status, error, reason, path)
        return json_response(status, {"error": error}, headers)

    def record_refusal(
        self, conn: Guest, status: int | None, error: str, reason: str, path: str | None
    ) -> None:
        """Count and audit a refusal; ``status`` is None for a request dropped unanswered.
        Past :data:`REFUSALS_PER_WINDOW` from one source in a minute, audited folded."""
        self.metrics.connection(error)
        self._audit_folded(self.refusal_folds, conn.peer, status, error, reason, path)

    def _refuse_full(self, conn: Guest, reason: str, path: str) -> Response:
        """503 at a connection limit. Full, not busy: the Retry-After is drawn from 1 s up to
        twice the setting, so refused clients come back spread out instead of in one wave
        that is refused again."""
        retry = random.randint(1, 2 * self.config.overload_retry_after)
        return self.refuse(conn, 503, "overloaded", reason, path, [("Retry-After", str(retry))])

    def _admin_limit_reached(self, principal: Principal) -> str | None:
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

    # -- credentials and identities ------------------------------------------------------

    def _authenticate(self, headers: Headers, conn: Guest) -> Principal:
        authorization = headers.get("Authorization")
        if authorization is None:
            agent_id = self.certificate_agent(conn)
            if agent_id is not None:
                return Principal(kind="cert", credential_id=None, agent_id=agent_id)
            raise AuthFailure(401, "no credential")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthFailure(401, "malformed authorization header")
        return self.authenticate(token.strip(), conn)

    def authenticate(self, token: str, conn: Guest) -> Principal:
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

    def certificate_agent(self, conn: Guest) -> str | None:
        """The agent id a verified client certificate names, if the hub has a client CA."""
        if self.config.client_ca is None:
            return None
        certificate = _peer_certificate(conn)
        return certificate_agent_id(certificate) if certificate is not None else None

    # -- revocation on live connections --------------------------------------------------

    def close_revoked(self, credential_ids: set[str], sessions: Iterable[Closable]) -> None:
        """Close (4003) the live connections authenticated by a credential just revoked."""
        for session in sessions:
            credential_id = session.principal.credential_id
            if credential_id not in credential_ids:
                continue
            self.auditor.record("connection.revoked", subject=credential_id, actor=session.actor)
            session.close(Close.REVOKED, "credential revoked")

    async def reload_crl(self, sessions: Callable[[], Iterable[Closable]]) -> None:
        """Pick up a renewed CRL (and with it newly revoked certificates) without a restart,
        and close the connections whose certificate it now revokes: TLS checks a
        certificate only at the handshake."""
        path = self.config.client_crl
        if path is None or self.tls is None or self.config.client_ca is None:
            return
        try:
            mtime = (await asyncio.to_thread(path.stat)).st_mtime_ns
            if mtime == self._crl_mtime:
                return
            # A fresh context, not the CRL added to this one: its new session-ticket keys
            # make every agent's ticket void, so that no session resumed from a ticket
            # skips the new CRL (a resumed TLS session checks no certificate).
            fresh = await asyncio.to_thread(server_ssl_context, self.config)
        except (OSError, ssl.SSLError) as exc:
            log.error("cannot reload the client CRL %s: %s", path, exc)
            return
        self.tls = fresh
        self._crl_mtime = mtime
        self.auditor.record("tls.crl_reloaded", subject=str(path))
        log.info("client CRL %s reloaded", path)
        await self._close_revoked_certificates(path, sessions())

    async def _close_revoked_certificates(self, path: Path, sessions: Iterable[Closable]) -> None:
        certified = []
        for session in sessions:
            der = _peer_certificate(session.conn, binary=True)
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


_OVERLOADED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Content-Length: 22\r\nRetry-After: %d\r\nCache-Control: no-store\r\n"
    b"Connection: close\r\n\r\n"
    b'{"error":"overloaded"}'
)
