"""The agent's TLS trust options against the real hub serving wss:// (trustme certificates)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.client import AgentClient, ClientSettings
from agent.doctor import DoctorOptions, doctor
from agent.executor import Executor
from agent.handlers import default_registry
from agent.journal import MemoryJournal
from agent.metrics import HostMetrics
from agent.profile import AgentProfile
from agent.state import Credentials
from hub.protocol.tls import TlsOptions, make_ssl_context, parse_fingerprint

from .conftest import eventually

trustme = pytest.importorskip("trustme")


class TlsHub:
    def __init__(self, handle: Any, ca: Any, cert_der: bytes, ca_file: Path) -> None:
        self.handle = handle
        self.ca = ca
        self.fingerprint = hashlib.sha256(cert_der).digest()
        self.ca_file = ca_file

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.handle.hub.port}"


@pytest.fixture
async def tls_hub(hub_factory: Callable[..., Any], tmp_path: Path) -> TlsHub:
    return await _tls_hub(hub_factory, tmp_path)


async def _tls_hub(hub_factory: Callable[..., Any], tmp_path: Path, **config: Any) -> TlsHub:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file, ca_file = tmp_path / "hub.pem", tmp_path / "hub.key", tmp_path / "ca.pem"
    server.cert_chain_pems[0].write_to_path(cert_file)
    server.private_key_pem.write_to_path(key_file)
    ca.cert_pem.write_to_path(ca_file)
    if config.pop("client_ca", False):
        config["client_ca"] = ca_file
    handle = await hub_factory(tls_cert=cert_file, tls_key=key_file, **config)
    der = ssl.PEM_cert_to_DER_cert(server.cert_chain_pems[0].bytes().decode())
    return TlsHub(handle, ca, der, ca_file)


@pytest.fixture
async def start() -> AsyncIterator[Callable[..., Any]]:
    running: list[tuple[AgentClient, asyncio.Task[None]]] = []

    async def make(
        tls: TlsHub, options: TlsOptions, agent_id: str = "tls-1", token: bool = True
    ) -> AgentClient:
        profile = AgentProfile(agent_id=agent_id)
        client = AgentClient(
            profile,
            ClientSettings(
                urls=[tls.url],
                ssl_context=make_ssl_context(options),
                pin_sha256=options.pin_sha256,
            ),
            Credentials(await tls.handle.agent_token(agent_id) if token else None),
            Executor(profile, default_registry(), MemoryJournal()),
            HostMetrics(),
        )
        running.append((client, asyncio.ensure_future(client.run())))
        return client

    yield make
    for client, task in running:
        await client.shutdown()
        await asyncio.wait_for(task, 10)


async def test_ca_file_verifies_the_hub(tls_hub: TlsHub, start: Callable[..., Any]) -> None:
    client = await start(tls_hub, TlsOptions(ca_file=str(tls_hub.ca_file)))
    await eventually(lambda: client.registered, message="registered over wss")


async def test_unknown_ca_is_refused_by_default(tls_hub: TlsHub, start: Callable[..., Any]) -> None:
    client = await start(tls_hub, TlsOptions())
    await eventually(lambda: client.last_error, message="a failed dial")
    assert "SSLCertVerificationError" in client.last_error
    assert not client.registered


async def test_pin_alone_trusts_a_hub_and_a_wrong_pin_refuses_it(
    tls_hub: TlsHub, start: Callable[..., Any]
) -> None:
    pinned = await start(tls_hub, TlsOptions(pin_sha256=tls_hub.fingerprint), "tls-pin")
    await eventually(lambda: pinned.registered, message="registered with a pin")
    wrong = await start(tls_hub, TlsOptions(pin_sha256=b"\x00" * 32), "tls-wrong")
    await eventually(lambda: wrong.last_error == "certificate pin mismatch", message="refused")
    assert "tls-wrong" not in tls_hub.handle.hub.registry.live


async def test_insecure_connects_without_verification(
    tls_hub: TlsHub, start: Callable[..., Any]
) -> None:
    client = await start(tls_hub, TlsOptions(insecure=True))
    await eventually(lambda: client.registered)


async def test_client_certificate_authenticates_without_a_token(
    hub_factory: Callable[..., Any], tmp_path: Path, start: Callable[..., Any]
) -> None:
    tls = await _tls_hub(hub_factory, tmp_path, client_ca=True, require_client_cert=True)
    cert = tls.ca.issue_cert("mtls-1", common_name="mtls-1")
    cert_file, key_file = tmp_path / "agent.pem", tmp_path / "agent.key"
    cert.cert_chain_pems[0].write_to_path(cert_file)
    cert.private_key_pem.write_to_path(key_file)
    options = TlsOptions(ca_file=str(tls.ca_file), cert=str(cert_file), key=str(key_file))
    client = await start(tls, options, "mtls-1", token=False)
    await eventually(lambda: client.registered, message="registered by certificate")
    assert tls.handle.hub.registry.live["mtls-1"].principal.kind == "cert"


async def test_doctor_reports_tls(tls_hub: TlsHub) -> None:
    token = await tls_hub.handle.agent_token("doc-tls")
    profile = AgentProfile(agent_id="doc-tls")
    context = make_ssl_context(TlsOptions(ca_file=str(tls_hub.ca_file)))
    out = io.StringIO()
    options = DoctorOptions(url=tls_hub.url, token=token, profile=profile, ssl_context=context)
    assert await doctor(options, out)
    assert "ok    TLS        TLSv1." in out.getvalue()
    assert tls_hub.fingerprint.hex(":").upper() in out.getvalue()

    out = io.StringIO()
    options = DoctorOptions(url=tls_hub.url, token=token, profile=profile)
    assert not await doctor(options, out)
    assert "FAIL  TLS" in out.getvalue() and "--ca-file" in out.getvalue()


def test_fingerprint_parsing() -> None:
    raw = bytes(range(32))
    assert parse_fingerprint(raw.hex()) == raw
    assert parse_fingerprint(raw.hex(":").upper()) == raw
    with pytest.raises(ValueError):
        parse_fingerprint("abcd")
    with pytest.raises(ValueError):
        parse_fingerprint("zz" * 32)
