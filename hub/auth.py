"""Credentials: agent keys, enrollment keys, admin tokens (and the seams for JWT and mTLS).

A token is ``<prefix><id>_<secret>``: the prefix names its kind (``tta_`` agent key,
``tte_`` enrollment key, ``ttm_`` admin token), the id finds its record without a scan, and
only the SHA-256 of the 256-bit secret is stored. A fast hash is enough for a random secret
of that size; comparison is constant-time. Records live in memory (one dict lookup per
handshake, nothing blocks the event loop) and are refreshed from the store every second so
that revocations made by ``tether-hub token revoke`` against a running hub's store take
effect on live connections within seconds.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .model import JWT_PREFIX, CredentialRecord
from .protocol.constants import ROLES
from .store.base import Store

log = logging.getLogger(__name__)

PREFIXES = {"agent": "tta_", "enroll": "tte_", "admin": "ttm_"}
KINDS = {prefix: kind for kind, prefix in PREFIXES.items()}
ID_LENGTH = 12
#: A token id the store did not know is not looked up again for this long.
MISS_TTL = 5.0
MAX_MISSES = 10_000

__all__ = [
    "AuthFailure",
    "Credentials",
    "Principal",
    "new_token",
    "role_allows",
]


@dataclass(slots=True, frozen=True)
class Principal:
    """Who is on the other end of a connection, as far as the credential says."""

    kind: str  # "agent", "enroll", "jwt", "cert" or "admin"
    credential_id: str | None
    #: The agent id the credential is bound to (agent key, JWT ``sub``, certificate).
    agent_id: str | None = None
    region: str | None = None
    platform: str | None = None
    role: str | None = None
    name: str | None = None
    pattern: str | None = None

    @property
    def is_agent(self) -> bool:
        return self.kind != "admin"

    @property
    def actor(self) -> str:
        """How audit entries name this principal (never a secret)."""
        if self.kind == "admin":
            return f"admin:{self.name or self.credential_id}"
        return f"{self.kind}:{self.credential_id or self.agent_id}"


class NotCached(Exception):
    """A well-formed token whose id this hub has not seen yet: look in the store first."""

    def __init__(self, credential_id: str) -> None:
        super().__init__(credential_id)
        self.credential_id = credential_id


class AuthFailure(Exception):
    """A refused credential. ``status`` 401 (unknown, expired, malformed) or 403."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def new_token(kind: str) -> tuple[str, str, bytes]:
    """A fresh token of ``kind``: ``(credential_id, token, secret_hash)``."""
    credential_id = secrets.token_hex(ID_LENGTH // 2)
    secret = secrets.token_urlsafe(32)
    return credential_id, f"{PREFIXES[kind]}{credential_id}_{secret}", _hash(secret)


def role_allows(role: str | None, needed: str) -> bool:
    if role not in ROLES:
        return False
    return ROLES.index(role) >= ROLES.index(needed)


class Credentials:
    """The hub's view of every credential, kept in memory and synced from the store."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self.records: dict[str, CredentialRecord] = {}
        self.rev = 0
        #: Called with the ids of credentials that became revoked since the last sync.
        self.on_revoked: Callable[[set[str]], None] | None = None
        self._misses: OrderedDict[str, float] = OrderedDict()
        self._syncing: asyncio.Future[None] | None = None

    async def load(self) -> None:
        for record in await self.store.credentials():
            self.records[record.id] = record
            self.rev = max(self.rev, record.rev)

    async def sync(self) -> None:
        """Pick up credentials created, spent or revoked by anyone writing to the store.

        Concurrent callers share one query.
        """
        if self._syncing is None:
            self._syncing = asyncio.ensure_future(self._sync())
            self._syncing.add_done_callback(self._synced)
        await asyncio.shield(self._syncing)

    def _synced(self, future: asyncio.Future[None]) -> None:
        self._syncing = None
        if not future.cancelled():
            future.exception()  # retrieved: the awaiting callers see it

    async def _sync(self) -> None:
        rev, changed = await self.store.credentials_since(self.rev)
        self.apply(changed)
        self.rev = max(self.rev, rev)

    def enrolled(
        self, enroll_id: str, issued: CredentialRecord, replaced: list[str], new_id: bool
    ) -> None:
        """Mirror in memory what :meth:`Store.enroll` just committed (sync confirms later)."""
        self.records[issued.id] = issued
        for old in replaced:
            record = self.records.get(old)
            if record is not None:
                record.revoked = True
        key = self.records.get(enroll_id)
        if key is not None and new_id and key.uses_left is not None:
            key.uses_left -= 1

    def apply(self, changed: list[CredentialRecord]) -> None:
        revoked: set[str] = set()
        for record in changed:
            before = self.records.get(record.id)
            if record.revoked and (before is None or not before.revoked):
                revoked.add(record.id)
            self.records[record.id] = record
            self.rev = max(self.rev, record.rev)
        if revoked and self.on_revoked is not None:
            self.on_revoked(revoked)

    def _may_look_up(self, credential_id: str) -> bool:
        """Unknown ids are looked up in the store at most once per ``MISS_TTL`` seconds."""
        until = self._misses.get(credential_id)
        return until is None or until <= self.clock()

    async def look_up(self, credential_id: str) -> None:
        """Sync from the store (one query for every waiting handshake), remember misses."""
        await self.sync()
        if credential_id not in self.records:
            misses = self._misses
            misses[credential_id] = self.clock() + MISS_TTL
            misses.move_to_end(credential_id)
            while len(misses) > MAX_MISSES:
                misses.popitem(last=False)

    def is_revoked(self, credential_id: str | None) -> bool:
        """A stored credential that is revoked or gone. JWTs are not stored: one counts as
        revoked only when its ``jti`` was (``jwt:<jti>`` stored as revoked)."""
        if credential_id is None:
            return False
        record = self.records.get(credential_id)
        if record is None:
            return not credential_id.startswith(JWT_PREFIX)
        return record.revoked

    def authenticate(self, token: str) -> Principal:
        """Check a bearer token; raises :class:`AuthFailure` with the protocol's status."""
        kind = KINDS.get(token[:4])
        if kind is None or len(token) < 4 + ID_LENGTH + 2 or token[4 + ID_LENGTH] != "_":
            raise AuthFailure(401, "malformed token")
        credential_id = token[4 : 4 + ID_LENGTH]
        secret = token[5 + ID_LENGTH :]
        record = self.records.get(credential_id)
        if record is None and self._may_look_up(credential_id):
            raise NotCached(credential_id)
        digest = _hash(secret)
        if record is None or record.kind != kind:
            hmac.compare_digest(digest, digest)  # same work either way
            raise AuthFailure(401, "unknown token")
        if not hmac.compare_digest(digest, record.secret_hash):
            raise AuthFailure(401, "unknown token")
        if record.expires_at is not None and record.expires_at <= self.clock():
            raise AuthFailure(401, "expired token")
        if record.revoked:
            raise AuthFailure(403, "revoked token")
        # A spent enrollment key still lets ids it enrolled back in: decided at register.
        return Principal(
            kind=kind,
            credential_id=record.id,
            agent_id=record.agent_id if kind == "agent" else None,
            role=record.role,
            name=record.name,
            pattern=record.pattern,
        )

    def check_enrollment(self, principal: Principal, agent_id: str, enrolled_by: str | None) -> str:
        """Whether ``agent_id`` may register with this enrollment key; '' when it may."""
        record = self.records.get(principal.credential_id or "")
        if record is None or record.revoked:
            return "enrollment key revoked"
        if record.pattern and not fnmatch.fnmatchcase(agent_id, record.pattern):
            return "agent id does not match the enrollment key's pattern"
        already = enrolled_by == record.id
        if not already and record.uses_left is not None and record.uses_left <= 0:
            return "enrollment key exhausted"
        return ""

    # -- creating credentials ------------------------------------------------------------

    def make(
        self,
        kind: str,
        *,
        agent_id: str | None = None,
        role: str | None = None,
        name: str | None = None,
        pattern: str | None = None,
        uses: int | None = None,
        ttl: float | None = None,
        issued_by: str | None = None,
    ) -> tuple[CredentialRecord, str]:
        """A new credential record and its token (shown once, never stored)."""
        credential_id, token, digest = new_token(kind)
        now = self.clock()
        record = CredentialRecord(
            id=credential_id,
            kind=kind,
            secret_hash=digest,
            created_at=now,
            agent_id=agent_id,
            role=role,
            name=name,
            pattern=pattern,
            uses_left=uses,
            expires_at=now + ttl if ttl else None,
            issued_by=issued_by,
        )
        return record, token

    def enrollment_keys_of(self, agent_id: str) -> list[str]:
        """Agent keys previously issued to ``agent_id`` by enrollment (replaced on re-enroll).

        A scan, but only re-enrollment calls it: an agent that lost its state dir.
        """
        return [
            r.id
            for r in self.records.values()
            if r.kind == "agent"
            and r.agent_id == agent_id
            and not r.revoked
            and (r.issued_by or "").startswith("enroll:")
        ]
