"""``tether-agent doctor``: why can this host not reach its hub? One step at a time.

DNS, TCP, TLS (for ``wss://``), the HTTP upgrade, then the credential (``register`` until
``welcome``, then close 1000). Each step prints ``ok``, ``FAIL`` or ``skip`` with what it saw
and, on failure, a hint in plain words; later steps are skipped after a failure because they
cannot tell anything new. The probe never answers commands: whatever the hub redelivers to
this id stays unfinished and goes to the real agent on its next connection.

Side effects an operator should know (printed as notes): registering takes over a live
connection of the same id (the real agent reconnects within about a minute), and an
enrollment key issues an agent key, which is saved to the agent's state dir so that
``tether-agent run`` uses it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

import orjson
from websockets.client import ClientProtocol

from hub.protocol.codec import decode, encode
from hub.protocol.connection import Connection, HandshakeRefused, connect
from hub.protocol.constants import AGENT_SUBPROTOCOL, Close
from hub.protocol.messages import HUB_TO_AGENT, Register, ValidationError, Welcome
from hub.protocol.tls import peer_fingerprint

from . import __version__
from .client import REFUSALS, agent_url
from .profile import AgentProfile
from .state import KeyFile, prepare_state_dir

__all__ = ["DoctorOptions", "doctor", "jwt_claims"]

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
    token: str | None
    profile: AgentProfile
    ssl_context: ssl.SSLContext | None = None
    pin_sha256: bytes | None = None
    #: Where an agent key issued at enrollment is saved (None: not saved).
    state_dir: Path | None = None
    timeout: float = 10.0


STEPS = ("DNS", "TCP", "TLS", "upgrade", "credential")


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
    """Just enough of the agent channel to register and see the answer; never runs commands."""

    __slots__ = ("ended", "register", "welcome")

    def __init__(self, protocol: ClientProtocol, register: Register) -> None:
        super().__init__(protocol)
        loop = asyncio.get_running_loop()
        self.register = register
        self.welcome: asyncio.Future[Welcome] = loop.create_future()
        self.ended: asyncio.Future[tuple[int, str]] = loop.create_future()

    def on_open(self) -> None:
        self.send_text(encode(self.register.model_dump()))

    def on_message(self, data: bytes) -> None:
        try:
            message = HUB_TO_AGENT.validate_python(decode(data))
        except (ValueError, ValidationError):
            return
        if type(message) is Welcome and not self.welcome.done():
            self.welcome.set_result(message)

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
    print(
        f"tether-agent doctor {__version__}: {url} as agent {options.profile.agent_id!r}", file=out
    )
    try:
        report.line("ok", "DNS", await _dns(host, port, options))
        report.line("ok", "TCP", await _tcp(host, port, options))
        if secure:
            report.line("ok", "TLS", await _tls(host, port, options))
        else:
            report.line("skip", "TLS", "plain ws:// (no TLS: fine on loopback, not beyond)")
        probe = await _upgrade(url, options)
        report.line("ok", "upgrade", f"HTTP 101, subprotocol {AGENT_SUBPROTOCOL}")
        detail, notes = await _credential(probe, options)
        report.line("ok", "credential", detail)
        for note in notes:
            report.note(note)
    except _Failed as failure:
        report.failed(failure)
        print("some checks failed", file=out)
        return False
    print("all checks passed", file=out)
    return True


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
            _, writer = await asyncio.open_connection(host, port, ssl=context, server_hostname=host)
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
    ssl_object = writer.get_extra_info("ssl_object")
    fingerprint = peer_fingerprint(ssl_object)
    writer.close()
    if options.pin_sha256 is not None and fingerprint != options.pin_sha256:
        raise _Failed(
            "TLS",
            f"certificate SHA-256 {_hex(fingerprint)} is not the pinned one",
            "the hub's certificate changed, or something intercepts TLS; "
            "update --hub-cert-sha256 only if you trust the new certificate",
        )
    expiry = ""
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if cert and cert.get("notAfter"):
        expiry = f", valid until {cert['notAfter']}"
    return f"{ssl_object.version() if ssl_object else 'TLS'}, sha256 {_hex(fingerprint)}{expiry}"


async def _upgrade(url: str, options: DoctorOptions) -> _Probe:
    headers = [("User-Agent", f"tether-agent-doctor/{__version__}")]
    if options.token:
        headers.append(("Authorization", f"Bearer {options.token}"))
    register = options.profile.register([])
    try:
        connection = await connect(
            url,
            lambda protocol: _Probe(protocol, register),
            headers=headers,
            subprotocols=[AGENT_SUBPROTOCOL],
            ssl_context=options.ssl_context,
            open_timeout=options.timeout,
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


async def _credential(probe: _Probe, options: DoctorOptions) -> tuple[str, list[str]]:
    done, _ = await asyncio.wait(
        {probe.welcome, probe.ended},
        timeout=options.timeout + 5,
        return_when=asyncio.FIRST_COMPLETED,
    )
    try:
        if probe.welcome in done:
            welcome = probe.welcome.result()
            notes = [
                "if an agent with this id was connected, the hub replaced it (close 4001); "
                "it reconnects by itself within about a minute"
            ]
            if welcome.agent_key:
                notes.append(_keep_key(welcome.agent_key, options))
            detail = (
                f"welcomed by hub {welcome.hub_id!r}, heartbeat every "
                f"{welcome.heartbeat_interval:g} s"
            )
            return detail, notes
        if probe.ended in done:
            code, reason = probe.ended.result()
            raise _Failed(
                "credential", f"closed with {code} {reason!r}".rstrip(), _close_hint(code)
            )
        raise _Failed(
            "credential",
            f"no welcome within {options.timeout + 5:g} s of register",
            "the hub accepted the upgrade but did not answer; check its logs",
        )
    finally:
        probe.close(Close.NORMAL, "doctor done")
        await asyncio.wait({probe.ended}, timeout=probe.close_timeout + 1)


def _close_hint(code: int) -> str:
    if code == Close.POLICY:
        return (
            "the hub refused this registration: an agent key bound to another id, an "
            "enrollment key used up or whose pattern does not match this id, or a JWT whose "
            "sub/region/platform claims differ; pass the right --agent-id"
        )
    if code == Close.REVOKED:
        return "the credential was revoked; " + TOKEN_HINT
    if code == Close.TRY_AGAIN_LATER:
        return "the hub is overloaded; retry later"
    return "see the hub's logs for this close code"


def _keep_key(key: str, options: DoctorOptions) -> str:
    issued = (
        "the hub issued a new agent key for this id (enrollment) and revoked the keys it "
        "issued to it before"
    )
    if options.state_dir is None:
        return f"{issued}; pass --agent-id so the doctor saves it for `tether-agent run`"
    try:
        KeyFile(prepare_state_dir(options.state_dir)).save(key)
    except OSError as exc:
        return f"{issued}, but saving it failed: {exc}"
    return f"{issued}; saved in {options.state_dir}, where `tether-agent run` picks it up"


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


def doctor_agent_id(explicit: str | None, token: str | None) -> str:
    """The id to register: given, the JWT's ``sub``, or ``doctor-<hostname>``."""
    if explicit:
        return explicit
    sub = jwt_claims(token).get("sub")
    if isinstance(sub, str) and sub:
        return sub
    name = re.sub(r"[^A-Za-z0-9._:-]", "-", socket.gethostname())[:120] or "host"
    return f"doctor-{name}"


async def doctor_all(options: Sequence[DoctorOptions], out: TextIO | None = None) -> bool:
    ok = True
    for option in options:
        ok = await doctor(option, out) and ok
    return ok
