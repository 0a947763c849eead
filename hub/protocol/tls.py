"""How a client (agent, CLI, console) trusts the hub: system CAs, a CA file, a pin, or nothing.

Verification is on unless ``--insecure`` says otherwise, loudly. A pin (``--hub-cert-sha256``,
the SHA-256 of the hub's DER certificate) is checked on every connection after the TLS
handshake and before a byte of HTTP is sent; with a pin and no CA file, the pin alone is
the trust anchor (the usual way to trust a self-signed hub). A client certificate
(``--cert``/``--key``) authenticates the agent by mTLS (PROTOCOL §2).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import ssl
from dataclasses import dataclass

__all__ = [
    "TlsOptions",
    "make_ssl_context",
    "parse_fingerprint",
    "peer_fingerprint",
    "pin_matches",
]

log = logging.getLogger("tether.tls")


@dataclass(frozen=True, slots=True)
class TlsOptions:
    ca_file: str | None = None
    insecure: bool = False
    cert: str | None = None
    key: str | None = None
    #: Expected SHA-256 of the hub's certificate (32 bytes), or None.
    pin_sha256: bytes | None = None


def parse_fingerprint(text: str) -> bytes:
    """``AB:CD:…`` or ``abcd…`` (64 hex digits) to bytes; ValueError otherwise."""
    digits = text.replace(":", "").strip()
    raw = bytes.fromhex(digits)
    if len(raw) != 32:
        raise ValueError("a SHA-256 fingerprint has 64 hex digits")
    return raw


def make_ssl_context(options: TlsOptions) -> ssl.SSLContext:
    """One context, shared by every connection (and every simulated agent)."""
    context = ssl.create_default_context(cafile=options.ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if options.insecure or (options.pin_sha256 is not None and options.ca_file is None):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        if options.pin_sha256 is None:
            log.warning(
                "event=tls_verification_disabled "
                "hint='--insecure trusts any hub certificate; use --ca-file or --hub-cert-sha256'"
            )
    if options.cert:
        context.load_cert_chain(options.cert, options.key)
    return context


def peer_fingerprint(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> bytes | None:
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return hashlib.sha256(der).digest() if der else None


def pin_matches(ssl_object: ssl.SSLObject | ssl.SSLSocket | None, expected: bytes) -> bool:
    actual = peer_fingerprint(ssl_object)
    return actual is not None and hmac.compare_digest(actual, expected)
