"""``tether-agent doctor``: why can this host not reach its hub? One step at a time.

The proxy (which one, chosen by what, reached, tunnel answered, authenticated), DNS, TCP, TLS
(for ``wss://``), the HTTP upgrade, the credential, and the clock. Each step prints ``ok``,
``FAIL``, ``WARN`` or ``skip`` with what it saw and, on failure, a hint in plain words; later
steps are skipped after a failure because they cannot tell anything new.

A diagnostic must not change what it diagnoses: the credential step sends ``probe`` instead of
``register`` (docs/protocol.md §4). The hub authenticates the connection exactly as a real one
and answers what ``register`` would meet (the id the credential is bound to, what an
enrollment key admits, whether this id would be accepted) without taking over the live
connection, spending an enrollment use, issuing a key or creating an agent.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO
from urllib.parse import urlsplit

import orjson
from websockets.client import ClientProtocol

from hub.protocol.codec import decode, encode
from hub.protocol.connection import Connection, HandshakeRefused, connect
from hub.protocol.constants import AGENT_SUBPROTOCOL, Close
from hub.protocol.messages import HUB_TO_AGENT, Probe, ProbeResult, ValidationError
from hub.protocol.tls import peer_fingerprint
from hub.protocol.tls_layer import TlsLayer, client_layer

from . import __version__
from .client import REFUSALS, agent_url
from .profile import AgentProfile
from .proxy import ProxyRefused, ProxyRoute, open_tunnel

__all__ = ["CLOCK_WARN_S", "DoctorOptions", "doctor", "jwt_claims"]

#: A host clock further than this from the hub's is warned about (JWT ``nbf``/``iat`` get
#: 30 s of leeway; TLS validity and log timestamps suffer too).
CLOCK_WARN_S = 30.0

TOKEN_HINT = (
    "create one with `tether-hub token create --data-dir DIR --agent ID` "  # noqa: S105
    "(or `--enroll` for an enrollment key)"
)
HINTS = {
    400: "upgrade the agent or the hub so both speak tether.agent.v1",
    401: TOKEN_HINT,
    403: "ask an admin for a new credential (`tether-hub token create …`); if the hub requires "
    "client certificates, pass --cert and --key",
    404: "use the hub's base URL, e.g. ws://HOST:PORT (the agent adds /ws)",
    426: "a proxy between here and the hub strips the WebSocket upgrade; let it pass Upgrade",
    429: "wait for the cool-off (Retry-After) and check the token: ten bad tries lock an address",
    503: "the hub is at --max-agents or overloaded; retry later or raise the limit",
}


@dataclass(frozen=True, slots=True)
class DoctorOptions:
    url: str
    #: The bearer token ``run`` would present (a saved agent key before the given token).
    token: str | None
    #: ``profile.agent_id`` '' means none was configured: the hub says what is bound.
    profile: AgentProfile
    ssl_context: ssl.SSLContext | None = None
    pin_sha256: bytes | None = None
    timeout: float = 10.0
    route: ProxyRoute | None = None
    #: How to name the credential: kind, id and where it came from (never the secret).
    credential: str = ""
    #: The region was configured (not only defaulted): have the hub check it too.
    check_region: bool = True


STEPS = ("proxy", "DNS", "TCP", "TLS", "upgrade", "credential", "clock")


class _Failed(Exception):
    """A failed step; ``answered`` is set when the upgrade got an HTTP answer that shows the
    hub is there and the credential is what it refused."""

    def __init__(self, step: str, detail: str, hint: str = "", answered: str = "") -> None:
        super().__init__(detail)
        self.step = step
        self.detail = detail
        self.hint = hint
        self.answered = answered


class _Report:
    __slots__ = ("out",)

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def line(self, verdict: str, step: str, detail: str, hint: str = "") -> None:
        text = f"  {verdict:<5} {step:<11}{detail}"
        if hint:
            text += f"\n{'':<19}hint: {hint}"
        print(text, file=self.out, flush=True)

    def note(self, text: str) -> None:
        print(f"{'':<19}note: {text}", file=self.out, flush=True)

    def failed(self, failure: _Failed) -> None:
        if failure.answered:
            self.line("ok", "upgrade", failure.answered)
        self.line("FAIL", failure.step, failure.detail, failure.hint)
        for step in STEPS[STEPS.index(failure.step) + 1 :]:
            self.line("skip", step, "(after an earlier failure)")


class _Probe(Connection):
    """Just enough of the agent channel to ask ``probe`` and read the answer."""

    __slots__ = ("answer", "ended", "probe", "sent_at")

    def __init__(self, protocol: ClientProtocol, probe: Probe) -> None:
        super().__init__(protocol)
        loop = asyncio.get_running_loop()
        self.probe = probe
        self.sent_at = 0.0
        self.answer: asyncio.Future[tuple[ProbeResult, float]] = loop.create_future()
        self.ended: asyncio.Future[tuple[int, str]] = loop.create_future()

    def on_open(self) -> None:
        self.sent_at = time.time()
        self.send_text(encode(self.probe.model_dump(exclude_none=True)))

    def on_message(self, data: bytes) -> None:
        try:
            message = HUB_TO_AGENT.validate_python(decode(data))
        except (ValueError, ValidationError):
            return
        if type(message) is ProbeResult and not self.answer.done():
            # The hub's clock was read about halfway between the probe and the answer.
            self.answer.set_result((message, (self.sent_at + time.time()) / 2))

    def on_close(self, code: int, reason: str) -> None:
        if not self.ended.done():
            self.ended.set_result((code, reason))


async def doctor(options: DoctorOptions, out: TextIO | None = None) -> bool:
    """Run every step against one hub URL; True when all passed."""
    out = out or sys.stdout
    report = _Report(out)
    url = agent_url(options.url)
    parts = urlsplit(url)
    host = parts.hostname or ""
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    agent_id = options.profile.agent_id
    who = f"as agent {agent_id!r}" if agent_id else "(no agent id configured)"
    print(f"tether-agent doctor {__version__}: {url} {who}", file=out)
    if options.credential:
        print(f"credential: {options.credential}", file=out)
    route = options.route
    proxied = route is not None and route.proxy is not None
    try:
        if route is None or route.proxy is None:
            reason = route.reason if route is not None else "direct"
            report.line("skip", "proxy", reason)
            report.line("ok", "DNS", await _dns(host, port, options))
            report.line("ok", "TCP", await _tcp(host, port, options))
        else:
            report.line("ok", "proxy", await _proxy(route, host, port, options))
            report.line("skip", "DNS", f"{host} is resolved by the proxy")
            report.line("skip", "TCP", "through the proxy's tunnel (above)")
        if secure:
            report.line("ok", "TLS", await _tls(host, port, options))
        else:
            report.line("skip", "TLS", "plain ws:// (no TLS: fine on loopback, not beyond)")
        probe = await _upgrade(url, host, port, options)
        report.line("ok", "upgrade", f"HTTP 101, subprotocol {AGENT_SUBPROTOCOL}")
        answer, read_at = await _ask(probe, options)
        detail, notes = _credential(answer, options)
        report.line("ok", "credential", detail)
        for note in notes:
            report.note(note)
        verdict, detail = _clock(answer.server_time, read_at)
        report.line(verdict, "clock", detail, _CLOCK_HINT if verdict != "ok" else "")
        if verdict != "ok":
            print("the clock check warned", file=out)
            return False
    except _Failed as failure:
        if proxied and failure.step in ("DNS", "TCP"):
            failure.step = "proxy"
        report.failed(failure)
        print("some checks failed", file=out)
        return False
    print("all checks passed", file=out)
    return True


_CLOCK_HINT = (
    "set the host's clock (NTP: `timedatectl set-ntp true`, chrony); the agent copes by "
    "judging command expiry by the hub's clock, but TLS, JWTs and logs do not"
)


def _clock(server_time: str, read_at: float) -> tuple[str, str]:
    from datetime import datetime

    try:
        hub_time = datetime.fromisoformat(server_time).timestamp()
    except ValueError:
        return "WARN", f"the hub's server_time {server_time!r} is not a time"
    offset = read_at - hub_time
    if abs(offset) < 1.0:
        # server_time may be whole seconds: below one second, no difference is measurable.
        return "ok", f"within 1 s of the hub's ({server_time})"
    side = "ahead of" if offset > 0 else "behind"
    detail = f"this host is {abs(offset):.1f} s {side} the hub ({server_time})"
    return ("WARN" if abs(offset) > CLOCK_WARN_S else "ok"), detail


async def _proxy(route: ProxyRoute, host: str, port: int, options: DoctorOptions) -> str:
    proxy = route.proxy
    assert proxy is not None
    started = time.perf_counter()
    try:
        sock = await open_tunnel(proxy, host, port, options.timeout)
    except ProxyRefused as exc:
        if exc.stage == "reach":
            hint = "check the proxy's host and port, and that this host may reach it"
        elif exc.status in (401, 407) or "authentication" in exc.reason.lower():
            hint = "put the proxy's user name and password in the URL: http://USER:PASS@HOST:PORT"
        elif exc.stage == "timeout":
            hint = "the proxy accepted the connection but did not open the tunnel in time"
        else:
            hint = "ask the proxy's admins to allow CONNECT to the hub's host and port"
        raise _Failed("proxy", f"{exc.reason} [{route.source}]", hint) from None
    elapsed = (time.perf_counter() - started) * 1000
    sock.close()
    auth = f"authenticated as {proxy.username!r}" if proxy.username else "no authentication"
    kind = "CONNECT" if proxy.scheme == "http" else "SOCKS5 CONNECT"
    return (
        f"{proxy.redacted()} chosen by {route.source}: reached, {kind} {host}:{port} "
        f"answered ({auth}) in {elapsed:.1f} ms"
    )


async def _dial(host: str, port: int, options: DoctorOptions, step: str) -> socket.socket | None:
    """A tunnel to the hub when a proxy is in the way; None to dial directly."""
    route = options.route
    if route is None or route.proxy is None:
        return None
    try:
        return await open_tunnel(route.proxy, host, port, options.timeout)
    except ProxyRefused as exc:
        raise _Failed(step, f"the proxy tunnel failed this time: {exc.reason}") from None


async def _dns(host: str, port: int, options: DoctorOptions) -> str:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(options.timeout):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError) as exc:
        raise _Failed(
            "DNS",
            f"cannot resolve {host!r}: {exc}",
            "check the host name in --hub and this machine's DNS settings",
        ) from None
    addresses = sorted({str(info[4][0]) for info in infos})
    return f"{host} → {', '.join(addresses)}"


async def _tcp(host: str, port: int, options: DoctorOptions) -> str:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(options.timeout):
            _, writer = await asyncio.open_connection(host, port)
    except ConnectionRefusedError:
        raise _Failed(
            "TCP",
            f"connection to {host}:{port} refused",
            f"nothing listens there: is the hub running (`tether-hub serve --listen "
            f"HOST:{port}`), and is this its port?",
        ) from None
    except TimeoutError:
        raise _Failed(
            "TCP",
            f"no answer from {host}:{port} within {options.timeout:g} s",
            "a firewall or security group drops the traffic, or the host is down",
        ) from None
    except OSError as exc:
        raise _Failed("TCP", f"cannot connect to {host}:{port}: {exc}", "check routing") from None
    elapsed = (time.perf_counter() - started) * 1000
    peer = writer.get_extra_info("peername")
    writer.close()
    return f"connected to {peer[0]}:{peer[1]} in {elapsed:.1f} ms"


async def _tls(host: str, port: int, options: DoctorOptions) -> str:
    context = options.ssl_context or ssl.create_default_context()
    try:
        async with asyncio.timeout(options.timeout):
            layer = await _handshake(host, port, options, context)
            ssl_object = layer.get_extra_info("ssl_object")
            session = await _ticket(ssl_object)
            layer.close()
            resumption = "the hub offers no session ticket"
            if session is not None:
                # A second handshake with the ticket, as the agent's next dial would make.
                again = await _handshake(host, port, options, context, session)
                reused = again.get_extra_info("ssl_object").session_reused
                again.close()
                resumption = "session resumed" if reused else "session not resumed"
    except ssl.SSLCertVerificationError as exc:
        raise _Failed(
            "TLS",
            f"the hub's certificate is not trusted: {exc.verify_message}",
            "pass --ca-file with the CA that signed it, or pin it with --hub-cert-sha256",
        ) from None
    except ssl.SSLError as exc:
        raise _Failed(
            "TLS",
            f"TLS handshake failed: {exc.reason or exc}",
            "is this the hub's TLS port? (a plain port answers TLS with garbage; use ws://)",
        ) from None
    except (OSError, TimeoutError) as exc:
        raise _Failed(
            "TLS",
            f"TLS handshake failed: {exc!r}",
            "the server dropped the handshake: is this the hub's TLS port, or does the hub "
            "serve plain ws:// here?",
        ) from None
    fingerprint = peer_fingerprint(ssl_object)
    if options.pin_sha256 is not None and fingerprint != options.pin_sha256:
        raise _Failed(
            "TLS",
            f"certificate SHA-256 {_hex(fingerprint)} is not the pinned one",
            "the hub's certificate changed, or something intercepts TLS; "
            "update --hub-cert-sha256 only if you trust the new certificate",
        )
    expiry = ""
    cert = ssl_object.getpeercert()
    if cert and cert.get("notAfter"):
        expiry = f", valid until {cert['notAfter']}"
    cipher = ssl_object.cipher()
    return (
        f"{ssl_object.version()} {cipher[0] if cipher else ''}, sha256 {_hex(fingerprint)}"
        f"{expiry}, {resumption}"
    )


async def _handshake(
    host: str,
    port: int,
    options: DoctorOptions,
    context: ssl.SSLContext,
    session: ssl.SSLSession | None = None,
) -> TlsLayer:
    """A TLS connection (no HTTP) made as the agent makes it: through the proxy, if any."""
    layer = client_layer(asyncio.Protocol(), context, host, session)
    loop = asyncio.get_running_loop()
    sock = await _dial(host, port, options, "TLS")
    try:
        if sock is None:
            await loop.create_connection(lambda: layer, host, port)
        else:
            await loop.create_connection(lambda: layer, sock=sock)
        await layer.handshake()
    except BaseException:
        layer.abort()
        if sock is not None:
            sock.close()
        raise
    return layer


async def _ticket(ssl_object: ssl.SSLObject, within: float = 1.0) -> ssl.SSLSession | None:
    """The session with the hub's ticket: TLS 1.3 sends it just after the handshake."""
    deadline = time.monotonic() + within
    while True:
        session = ssl_object.session
        if session is not None and session.has_ticket:
            return session
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(0.01)


async def _upgrade(url: str, host: str, port: int, options: DoctorOptions) -> _Probe:
    headers = [("User-Agent", f"tether-agent-doctor/{__version__}")]
    if options.token:
        headers.append(("Authorization", f"Bearer {options.token}"))
    profile = options.profile
    probe = Probe(
        type="probe",
        agent_id=profile.agent_id or None,
        platform=profile.platform or None,
        region=profile.region if options.check_region else None,
    )
    try:
        sock = await _dial(host, port, options, "upgrade")
        connection = await connect(
            url,
            lambda protocol: _Probe(protocol, probe),
            headers=headers,
            subprotocols=[AGENT_SUBPROTOCOL],
            ssl_context=options.ssl_context,
            open_timeout=options.timeout,
            sock=sock,
        )
    except HandshakeRefused as exc:
        status = exc.status
        reason = f"HTTP {status}: {REFUSALS.get(status, 'unexpected answer')}"
        if exc.retry_after is not None:
            reason += f" (Retry-After {exc.retry_after:g} s)"
        if status in (401, 403, 429):
            # The hub answered as a Tether hub; the credential is what it refused.
            raise _Failed(
                "credential", reason, HINTS[status], answered=f"the hub answered (HTTP {status})"
            ) from None
        raise _Failed("upgrade", reason, HINTS.get(status, "")) from None
    except TimeoutError:
        raise _Failed(
            "upgrade",
            f"no handshake answer within {options.timeout:g} s",
            "the port accepts connections but does not answer HTTP: is it the hub?",
        ) from None
    except (OSError, ssl.SSLError) as exc:
        raise _Failed(
            "upgrade",
            f"the server did not complete a WebSocket handshake: {exc}",
            "wrong port, a TLS port addressed with ws:// (or the reverse), or a proxy",
        ) from None
    assert isinstance(connection, _Probe)
    return connection


async def _ask(probe: _Probe, options: DoctorOptions) -> tuple[ProbeResult, float]:
    done, _ = await asyncio.wait(
        {probe.answer, probe.ended},
        timeout=options.timeout + 5,
        return_when=asyncio.FIRST_COMPLETED,
    )
    try:
        if probe.answer in done:
            return probe.answer.result()
        if probe.ended in done:
            code, reason = probe.ended.result()
            if code == Close.POLICY and "must be register" in reason:
                raise _Failed(
                    "credential",
                    "the hub accepted the credential at the upgrade, but does not answer probe",
                    "this hub is older than the agent: upgrade it to check the agent id "
                    "without registering (the agent itself can still connect)",
                )
            raise _Failed(
                "credential", f"closed with {code} {reason!r}".rstrip(), _close_hint(code)
            )
        raise _Failed(
            "credential",
            f"no answer within {options.timeout + 5:g} s of the probe",
            "the hub accepted the upgrade but did not answer; check its logs",
        )
    finally:
        probe.close(Close.NORMAL, "doctor done")
        await asyncio.wait({probe.ended}, timeout=probe.close_timeout + 1)


def _credential(answer: ProbeResult, options: DoctorOptions) -> tuple[str, list[str]]:
    """What the hub said about the credential, as a verdict line and notes."""
    credential = answer.credential
    agent_id = options.profile.agent_id
    notes: list[str] = []
    if credential.kind == "enrollment_key":
        uses = (
            "no use limit" if credential.uses_left is None else f"{credential.uses_left} uses left"
        )
        admits = f"ids matching {credential.pattern!r}" if credential.pattern else "any id"
        what = f"enrollment key {credential.id}: admits {admits}, {uses}"
    elif credential.agent_id:
        what = f"{credential.kind.replace('_', ' ')} bound to {credential.agent_id!r}"
    else:
        what = credential.kind.replace("_", " ")
    if credential.expires_at:
        what += f", expires {credential.expires_at}"
    if answer.accepted is False:
        hint = _refusal_hint(answer.reason, credential.agent_id, agent_id)
        raise _Failed(
            "credential", f"{what}; register as {answer.agent_id!r}: {answer.reason}", hint
        )
    if answer.accepted is None:
        if answer.reason:
            raise _Failed("credential", f"{what}; {answer.reason}", TOKEN_HINT)
        notes.append("no agent id configured: pass --agent-id to check the one `run` would use")
        return f"{what} (hub {answer.hub_id!r})", notes
    detail = f"{what}; register as {answer.agent_id!r} would be accepted by hub {answer.hub_id!r}"
    if answer.spends_use:
        notes.append(
            f"{answer.agent_id!r} is new to this enrollment key: its first registration "
            "spends a use and the hub issues it an agent key"
        )
    if answer.connected:
        notes.append(
            f"{answer.agent_id!r} is connected to the hub now (the running agent?); the doctor "
            "did not disturb it"
        )
    return detail, notes


def _refusal_hint(reason: str, bound: str | None, configured: str) -> str:
    if "another agent id" in reason and bound:
        return f"this credential belongs to {bound!r}: run the agent as --agent-id {bound}"
    if "pattern" in reason:
        return "choose an agent id the enrollment key's pattern admits, or ask for another key"
    if "exhausted" in reason:
        return "ask an admin for a new enrollment key (`tether-hub token create --enroll`)"
    if "region" in reason or "platform" in reason:
        return "the credential binds region/platform: run the agent with the bound values"
    if "agent limit" in reason:
        return "the hub is at --max-agents; raise it or retire agents"
    return TOKEN_HINT


def _close_hint(code: int) -> str:
    if code == Close.POLICY:
        return "the hub refused the probe; see its audit log (agent.register_refused)"
    if code == Close.REVOKED:
        return "the credential was revoked; " + TOKEN_HINT
    if code == Close.TRY_AGAIN_LATER:
        return "the hub is overloaded; retry later"
    return "see the hub's logs for this close code"


def _hex(raw: bytes | None) -> str:
    return raw.hex(":").upper() if raw else "?"


def jwt_claims(token: str | None) -> dict[str, object]:
    """The payload of a JWT, unverified (only to pick the agent id it binds); {} otherwise."""
    if not token or token.count(".") != 2:
        return {}
    payload = token.split(".")[1]
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (binascii.Error, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


async def doctor_all(options: Sequence[DoctorOptions], out: TextIO | None = None) -> bool:
    ok = True
    for option in options:
        ok = await doctor(option, out) and ok
    return ok
