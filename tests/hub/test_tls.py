"""TLS, client certificates and JWTs, with real certificates made by trustme (§2)."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.support import RawAgent, refused_status

SECRET = "s3cret-" * 8


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_files(ca: trustme.CA, tmp_path: Path) -> dict[str, Path]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {
        "cert": tmp_path / "hub.crt",
        "key": tmp_path / "hub.key",
        "ca": tmp_path / "ca.pem",
    }
    cert.cert_chain_pems[0].write_to_path(files["cert"])
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(files["cert"], append=True)
    cert.private_key_pem.write_to_path(files["key"])
    ca.cert_pem.write_to_path(files["ca"])
    return files


def client_context(ca: trustme.CA, cert: Any = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if cert is not None:
        cert.configure_cert(context)
    return context


async def tls_hub(hub_factory: Callable[..., Any], files: dict[str, Path], **extra: Any):
    return await hub_factory(tls_cert=files["cert"], tls_key=files["key"], **extra)


def wss(hub: Any, path: str = "/ws") -> str:
    return f"wss://127.0.0.1:{hub.hub.port}{path}"


async def test_wss_with_a_verified_certificate(hub_factory, server_files, ca) -> None:
    hub = await tls_hub(hub_factory, server_files)
    token = await hub.agent_token("edge-1")
    agent = await RawAgent.connect(wss(hub), token, ssl=client_context(ca))
    assert (await agent.register("edge-1"))["type"] == "welcome"
    await agent.close()


async def test_client_refuses_an_unknown_certificate(hub_factory, server_files) -> None:
    hub = await tls_hub(hub_factory, server_files)
    with pytest.raises(ssl.SSLCertVerificationError):
        await RawAgent.connect(wss(hub), "x", ssl=ssl.create_default_context())


async def test_tls_below_1_2_is_refused(hub_factory, server_files, ca) -> None:
    hub = await tls_hub(hub_factory, server_files)
    context = client_context(ca)
    with pytest.warns(DeprecationWarning):
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    except ssl.SSLError:
        pass
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _reader, writer = await asyncio.open_connection(
            "127.0.0.1", hub.hub.port, ssl=context, server_hostname="127.0.0.1"
        )
        writer.close()


@pytest.fixture
async def mtls_hub(hub_factory, server_files, ca):
    return await tls_hub(hub_factory, server_files, client_ca=server_files["ca"])


async def test_client_certificate_authenticates_by_cn(mtls_hub, ca) -> None:
    cert = ca.issue_cert("edge-1", common_name="edge-1")
    agent = await RawAgent.connect(wss(mtls_hub), None, ssl=client_context(ca, cert))
    assert (await agent.register("edge-1"))["type"] == "welcome"
    await agent.close()


def revocation_list(ca: trustme.CA, certificates: list[Any], age_minutes: int) -> bytes:
    """A PEM CRL of ``ca`` revoking ``certificates`` (trustme makes none)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca._certificate.subject)
        .last_update(now - datetime.timedelta(minutes=age_minutes))
        .next_update(now + datetime.timedelta(hours=1))
    )
    for certificate in certificates:
        serial = x509.load_pem_x509_certificate(certificate.cert_chain_pems[0].bytes())
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial.serial_number)
            .revocation_date(now - datetime.timedelta(minutes=age_minutes))
            .build()
        )
    crl = builder.sign(ca._private_key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.PEM)


async def healthz_over_tls(hub: Any, context: ssl.SSLContext) -> bytes:
    """The first bytes of the answer to ``GET /healthz`` over TLS with ``context``: b"" when
    the hub ends the connection instead (with TLS 1.3 a client learns that its certificate
    was refused only when it reads)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", hub.hub.port, ssl=context, server_hostname="127.0.0.1"
    )
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        return await asyncio.wait_for(reader.readline(), 5)
    except (ssl.SSLError, ConnectionError):
        return b""
    finally:
        writer.close()


async def test_a_certificate_the_crl_revokes_fails_tls(
    hub_factory, server_files, ca, tmp_path: Path
) -> None:
    kept = ca.issue_cert("edge-1", common_name="edge-1")
    revoked = ca.issue_cert("edge-2", common_name="edge-2")
    crl = tmp_path / "agents.crl"
    crl.write_bytes(revocation_list(ca, [revoked], age_minutes=2))
    hub = await tls_hub(hub_factory, server_files, client_ca=server_files["ca"], client_crl=crl)
    agent = await RawAgent.connect(wss(hub), None, ssl=client_context(ca, kept))
    assert (await agent.register("edge-1"))["type"] == "welcome"
    assert (await healthz_over_tls(hub, client_context(ca, kept))).startswith(b"HTTP/1.1 200")
    assert await healthz_over_tls(hub, client_context(ca, revoked)) == b""
    # A renewed CRL is picked up without a restart (the hub checks the file every 30 s):
    # new handshakes of the certificate it adds fail, and its open connection is closed.
    crl.write_bytes(revocation_list(ca, [revoked, kept], age_minutes=1))
    await hub.hub.reload_crl()
    assert await healthz_over_tls(hub, client_context(ca, kept)) == b""
    assert await agent.closed(timeout=6) == 4003
    # Health probes need no certificate at all.
    assert (await healthz_over_tls(hub, client_context(ca))).startswith(b"HTTP/1.1 200")


def uri_certificate(ca: trustme.CA, uri: str, tmp_path: Path) -> ssl.SSLContext:
    """A client certificate whose SAN is a URI (trustme issues only DNS/IP/e-mail names)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone-else")]))
        .issuer_name(ca._certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        .sign(ca._private_key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "client.crt", tmp_path / "client.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = client_context(ca)
    context.load_cert_chain(cert_file, key_file)
    return context


async def test_client_certificate_by_san_uri(mtls_hub, ca, tmp_path: Path) -> None:
    context = uri_certificate(ca, "tether:agent:edge-7", tmp_path)
    agent = await RawAgent.connect(wss(mtls_hub), None, ssl=context)
    assert (await agent.register("edge-7"))["type"] == "welcome"
    await agent.close()


async def test_certificate_for_one_agent_cannot_register_as_another(mtls_hub, ca) -> None:
    cert = ca.issue_cert("edge-1", common_name="edge-1")
    agent = await RawAgent.connect(wss(mtls_hub), None, ssl=client_context(ca, cert))
    await agent.send({"type": "register", "agent_id": "edge-2"})
    assert await agent.closed() == 1008
    # Not with another agent's key either, nor with an enrollment key.
    key = await mtls_hub.agent_token("edge-2")
    status, _ = await refused_status(wss(mtls_hub), key, ssl=client_context(ca, cert))
    assert status == 403
    enroll = await mtls_hub.token("enroll")
    agent = await RawAgent.connect(wss(mtls_hub), enroll, ssl=client_context(ca, cert))
    await agent.send({"type": "register", "agent_id": "edge-2"})
    assert await agent.closed() == 1008


async def test_required_client_certificate(hub_factory, server_files, ca) -> None:
    hub = await tls_hub(
        hub_factory, server_files, client_ca=server_files["ca"], require_client_cert=True
    )
    token = await hub.agent_token("edge-1")
    status, (body, _) = await refused_status(wss(hub), token, ssl=client_context(ca))
    assert (status, body) == (403, {"error": "forbidden"})
    # Health never needs a certificate.
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", hub.hub.port, ssl=client_context(ca), server_hostname="127.0.0.1"
    )
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await reader.read()).startswith(b"HTTP/1.1 200")
    writer.close()
    cert = ca.issue_cert("edge-1", common_name="edge-1")
    agent = await RawAgent.connect(wss(hub), token, ssl=client_context(ca, cert))
    await agent.register("edge-1")
    await agent.close()


# -- JWT -------------------------------------------------------------------------------


@pytest.fixture
def hs_hub_factory(hub_factory, tmp_path: Path):
    secret = tmp_path / "jwt.secret"
    secret.write_text(f"  {SECRET}\n")

    async def make(**extra: Any):
        return await hub_factory(jwt_secret_file=secret, **extra)

    return make


def hs_token(**claims: Any) -> str:
    payload = {"sub": "edge-1", "aud": "tether-agent", "exp": int(time.time()) + 300}
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, SECRET, algorithm="HS256")


async def test_jwt_hs256_secret_file_stripped(hs_hub_factory) -> None:
    hub = await hs_hub_factory()
    agent = await RawAgent.connect(hub.agent_url, hs_token())
    assert (await agent.register("edge-1"))["type"] == "welcome"
    await agent.close()


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": -120},
        {"aud": "someone-else"},
        {"aud": None},
        {"exp": None},
        {"sub": None},
        {"sub": "../etc"},
        {"nbf": 600},
    ],
)
async def test_jwt_claims_are_enforced(hs_hub_factory, claims: dict) -> None:
    """Times are offsets from now, taken when the test runs (not when it was collected:
    a slow suite reached this test more than 600 s after collection)."""
    hub = await hs_hub_factory()
    now = int(time.time())
    claims = {k: now + v if k in ("exp", "nbf") and v is not None else v for k, v in claims.items()}
    status, (body, _) = await refused_status(hub.agent_url, hs_token(**claims))
    assert (status, body) == (401, {"error": "unauthorized"})


async def test_jwt_leeway_and_bound_claims(hs_hub_factory) -> None:
    hub = await hs_hub_factory()
    token = hs_token(nbf=int(time.time()) + 10, region="eu-central", platform="linux")
    agent = await RawAgent.connect(hub.agent_url, token)
    assert (await agent.register("edge-1", region="eu-central", platform="linux"))[
        "type"
    ] == "welcome"
    await agent.close()
    agent = await RawAgent.connect(hub.agent_url, token)
    await agent.send(
        {"type": "register", "agent_id": "edge-1", "region": "us-east", "platform": "linux"}
    )
    assert await agent.closed() == 1008
    agent = await RawAgent.connect(hub.agent_url, token)
    await agent.send(
        {"type": "register", "agent_id": "edge-2", "region": "eu-central", "platform": "linux"}
    )
    assert await agent.closed() == 1008


async def test_a_revoked_jti_is_refused_and_its_connection_closed(hs_hub_factory) -> None:
    hub = await hs_hub_factory()
    token = hs_token(jti="batch-7")
    agent = await RawAgent.connect(hub.agent_url, token)
    assert (await agent.register("edge-1"))["type"] == "welcome"
    other = await RawAgent.connect(hub.agent_url, hs_token(sub="edge-2", jti="batch-8"))
    assert (await other.register("edge-2"))["type"] == "welcome"
    # JWTs are not stored: revoking one (`tether-hub token revoke jwt:batch-7`, another
    # process writing the store) stores its revocation, which every hub picks up.
    record = await hub.hub.store.revoke_credential("jwt:batch-7")
    assert record is not None and (record.kind, record.revoked) == ("jwt", True)
    assert await agent.closed(timeout=6) == 4003
    status, (body, _) = await refused_status(hub.agent_url, token)
    assert (status, body) == (403, {"error": "forbidden"})
    # Other tokens of the same key are untouched; a token without a jti cannot be revoked
    # one by one (rotate the key).
    assert "edge-2" in hub.hub.registry.live
    plain = await RawAgent.connect(hub.agent_url, hs_token(sub="edge-3"))
    assert (await plain.register("edge-3"))["type"] == "welcome"
    again = await hub.hub.store.revoke_credential("jwt:batch-7")
    assert again is not None and again.rev == record.rev  # revoking twice changes nothing
    assert await hub.hub.store.revoke_credential("000000000000") is None
    await other.close()
    await plain.close()


async def test_jwt_alg_none_is_refused(hs_hub_factory) -> None:
    hub = await hs_hub_factory()
    token = jwt.encode(
        {"sub": "edge-1", "aud": "tether-agent", "exp": int(time.time()) + 60},
        None,
        algorithm="none",
    )
    status, _ = await refused_status(hub.agent_url, token)
    assert status == 401


@pytest.mark.parametrize("kind", ["rsa", "ec"])
async def test_jwt_public_key_and_key_confusion(hub_factory, tmp_path: Path, kind: str) -> None:
    if kind == "rsa":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        algorithm = "RS256"
    else:
        private = ec.generate_private_key(ec.SECP256R1())
        algorithm = "ES256"
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_file = tmp_path / "jwt.pub"
    key_file.write_bytes(public_pem)
    hub = await hub_factory(jwt_key=key_file)
    claims = {"sub": "edge-1", "aud": "tether-agent", "exp": int(time.time()) + 60}
    good = jwt.encode(claims, private, algorithm=algorithm)
    agent = await RawAgent.connect(hub.agent_url, good)
    assert (await agent.register("edge-1"))["type"] == "welcome"
    await agent.close()
    # HS256 "signed" with the public key: the algorithm comes from configuration.
    import base64
    import hashlib
    import hmac
    import json

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    signature = hmac.new(public_pem, f"{header}.{body}".encode(), hashlib.sha256).digest()
    forged = f"{header}.{body}.{b64(signature)}"
    status, _ = await refused_status(hub.agent_url, forged)
    assert status == 401


# -- admin clients: verification and pinning -----------------------------------------


async def test_admin_client_pins_the_hub_certificate(hub_factory, server_files, ca) -> None:
    import hashlib

    from cryptography import x509

    from hub.protocol.client import AdminClient
    from tests.support import run_cli_async

    hub = await tls_hub(hub_factory, server_files)
    token = await hub.admin_token("viewer")
    pem = server_files["cert"].read_bytes()
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    good = hashlib.sha256(der).digest()
    url = f"wss://127.0.0.1:{hub.hub.port}"
    client = await AdminClient(url, token, ssl_context=client_context(ca), pin_sha256=good).open()
    assert (await client.request("agents"))["agents"] == []
    await client.close()
    with pytest.raises(ssl.SSLCertVerificationError):
        await AdminClient(url, token, ssl_context=client_context(ca), pin_sha256=b"\0" * 32).open()
    # The CLI: a pin alone is enough to trust a certificate no CA vouches for here.
    done = await run_cli_async(
        "agents", "--hub", url, "--token", token, "--hub-cert-sha256", good.hex(), "--json"
    )
    assert done.returncode == 0, done.stderr
    done = await run_cli_async(
        "agents", "--hub", url, "--token", token, "--hub-cert-sha256", "00" * 32
    )
    assert done.returncode == 2 and "pinned" in done.stderr
    done = await run_cli_async("agents", "--hub", url, "--token", token)
    assert done.returncode == 2 and "certificate" in done.stderr.lower()


async def test_admin_cli_presents_a_client_certificate(
    hub_factory, server_files, ca, tmp_path: Path
) -> None:
    from tests.support import run_cli_async

    hub = await tls_hub(
        hub_factory, server_files, client_ca=server_files["ca"], require_client_cert=True
    )
    token = await hub.admin_token("viewer")
    cert = ca.issue_cert("noc-laptop", common_name="noc-laptop")
    cert_file, key_file = tmp_path / "noc.crt", tmp_path / "noc.key"
    cert.cert_chain_pems[0].write_to_path(cert_file)
    cert.private_key_pem.write_to_path(key_file)
    url = f"wss://127.0.0.1:{hub.hub.port}"
    base = ("agents", "--hub", url, "--token", token, "--ca-file", str(server_files["ca"]))
    refused = await run_cli_async(*base)
    assert refused.returncode == 2 and "403" in refused.stderr
    done = await run_cli_async(*base, "--cert", str(cert_file), "--key", str(key_file), "--json")
    assert done.returncode == 0, done.stderr


def test_a_crl_revokes_only_its_own_issuers_serials(ca) -> None:
    from cryptography import x509

    from hub.identity import revoked_by_crl

    other_ca = trustme.CA()
    mine = ca.issue_cert("edge-1", common_name="edge-1")
    theirs = other_ca.issue_cert("edge-2", common_name="edge-2")
    der = [
        x509.load_pem_x509_certificate(c.cert_chain_pems[0].bytes()).public_bytes(
            serialization.Encoding.DER
        )
        for c in (mine, theirs)
    ]
    # Two CRLs in one file, as a CA bundle may carry; each revokes only what its CA issued.
    both = revocation_list(ca, [mine], 1) + revocation_list(other_ca, [], 1)
    assert revoked_by_crl(both, der) == [0]
    # The same serial under another issuer is another certificate.
    forged = revocation_list(other_ca, [mine], 1)
    assert revoked_by_crl(forged, der) == []
    assert revoked_by_crl(b"", der) == []
    with pytest.raises(ValueError):
        revoked_by_crl(b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n", der)
