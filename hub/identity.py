"""Agent identities that do not live in the credentials table: JWTs and client certificates.

JWT: the accepted algorithms come from configuration, never from the token. An HS256
secret and a PEM public key may both be configured; each token is checked only with the
key of its own algorithm family, so an HS256 token "signed" with the public key is refused
(the classic key-confusion attack), as is ``alg: none``.

Client certificates: the TLS layer has already verified the chain against the configured
CA; the agent id is the SAN URI ``tether:agent:<id>`` when present, else the subject CN.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .auth import AuthFailure, Principal
from .model import JWT_PREFIX
from .protocol.constants import AGENT_ID

__all__ = ["JwtVerifier", "certificate_agent_id"]

AUDIENCE = "tether-agent"
SAN_PREFIX = "tether:agent:"
HMAC_ALGORITHMS = {"HS256"}
ASYMMETRIC_ALGORITHMS = {"RS256", "ES256"}


class JwtVerifier:
    """Verifies agent JWTs against the configured keys."""

    def __init__(
        self,
        secret_file: Path | None = None,
        public_key_file: Path | None = None,
        algorithms: list[str] | None = None,
        leeway: float = 30.0,
    ) -> None:
        self.leeway = leeway
        self.secret: bytes | None = None
        self.public_key: Any = None
        allowed: set[str] = set()
        if secret_file is not None:
            self.secret = Path(secret_file).read_bytes().strip()
            if len(self.secret) < 32:
                raise ValueError("the JWT secret must be at least 32 bytes")
            allowed.add("HS256")
        if public_key_file is not None:
            key = load_pem_public_key(Path(public_key_file).read_bytes())
            if isinstance(key, rsa.RSAPublicKey):
                allowed.add("RS256")
            elif isinstance(key, ec.EllipticCurvePublicKey):
                allowed.add("ES256")
            else:
                raise ValueError("the JWT public key must be RSA or EC (P-256)")
            self.public_key = key
        if algorithms is not None:
            unknown = set(algorithms) - HMAC_ALGORITHMS - ASYMMETRIC_ALGORITHMS
            if unknown:
                raise ValueError(f"unsupported JWT algorithms: {sorted(unknown)}")
            allowed &= set(algorithms)
        if not allowed:
            raise ValueError("no JWT algorithm is usable with the configured keys")
        self.algorithms = allowed

    def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthFailure(401, "malformed JWT") from None
        algorithm = header.get("alg")
        if algorithm not in self.algorithms:
            raise AuthFailure(401, "JWT algorithm not accepted")
        key = self.secret if algorithm in HMAC_ALGORITHMS else self.public_key
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=AUDIENCE,
                leeway=self.leeway,
                options={"require": ["exp", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthFailure(401, "JWT expired") from None
        except jwt.PyJWTError as exc:
            raise AuthFailure(401, f"invalid JWT: {type(exc).__name__}") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not AGENT_ID.match(subject):
            raise AuthFailure(401, "JWT subject is not an agent id")
        region = claims.get("region")
        platform = claims.get("platform")
        jti = claims.get("jti")
        return Principal(
            kind="jwt",
            credential_id=f"{JWT_PREFIX}{jti}" if isinstance(jti, str) else None,
            agent_id=subject,
            region=region if isinstance(region, str) else None,
            platform=platform if isinstance(platform, str) else None,
        )


def certificate_agent_id(peercert: dict[str, Any] | None) -> str | None:
    """The agent id a verified client certificate names, or None."""
    if not peercert:
        return None
    for kind, value in peercert.get("subjectAltName", ()):
        if kind == "URI" and value.startswith(SAN_PREFIX):
            candidate = value[len(SAN_PREFIX) :]
            return candidate if AGENT_ID.match(candidate) else None
    for rdn in peercert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName" and AGENT_ID.match(value):
                return value
    return None


_CRL_BLOCK = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)


def revoked_by_crl(crl_pem: bytes, certificates: Sequence[bytes]) -> list[int]:
    """Indices of the DER ``certificates`` that the CRLs in ``crl_pem`` revoke (same issuer,
    listed serial). TLS checks a certificate only at the handshake; this finds the
    connections opened before their certificate was revoked. Raises ValueError for a
    malformed CRL."""
    revoked = set()
    for block in _CRL_BLOCK.findall(crl_pem):
        crl = x509.load_pem_x509_crl(block)
        revoked.update((crl.issuer, entry.serial_number) for entry in crl)
    hits = []
    for index, der in enumerate(certificates):
        try:
            certificate = x509.load_der_x509_certificate(der)
        except ValueError:
            continue
        if (certificate.issuer, certificate.serial_number) in revoked:
            hits.append(index)
    return hits
