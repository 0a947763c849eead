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
import dataclasses
import fnmatch
import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
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
#: How long a revoked or replaced key is still answered 403 ("revoked") rather than 401
#: ("unknown") once this hub learned of its revocation. Refused either way; only the answer
#: (and so the agent's backoff) differs.
REVOKED_RETENTION = 30 * 86400.0
#: Revocations are forgotten a bucket at a time: this many buckets span the retention.
REVOKED_BUCKETS = 30
#: The bytes of a revoked key's secret hash kept to tell its holder (403) from a guesser (401).
REVOKED_DIGEST = 16

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

    def __init__(
        self,
        store: Store,
        clock: Callable[[], float] = time.time,
        revoked_retention: float = REVOKED_RETENTION,
    ) -> None:
        self.store = store
        self.clock = clock
        #: Credentials that may still authenticate (and revoked JWT ids, which are the
        #: revocation itself). Revoked keys leave it for :attr:`revoked`.
        self.records: dict[str, CredentialRecord] = {}
        #: Revoked keys, compactly: id -> a prefix of its secret's hash, in buckets by when
        #: this hub learned of the revocation (newest last), dropped after the retention.
        self.revoked = Revocations(revoked_retention, clock)
        #: Agent id -> ids of the unrevoked agent keys enrollment issued to it (usually
        #: one): what a re-enrollment replaces, found without a scan.
        self.enrolled_keys: dict[str, tuple[str, ...]] = {}
        self.rev = 0
        #: Called with the ids of credentials that became revoked since the last sync.
        self.on_revoked: Callable[[set[str]], None] | None = None
        self._misses: OrderedDict[str, float] = OrderedDict()
        self._syncing: asyncio.Future[None] | None = None

    async def load(self) -> None:
        self.apply(await self.store.credentials(), announce=False)

    # -- the in-memory view: every change goes through _put ---------------------------------

    def _put(self, record: CredentialRecord) -> bool:
        """Install ``record`` as the current state of its id; True when that revoked it."""
        credential_id = record.id
        before = self.records.get(credential_id)
        if before is not None:
            self._unindex(before)
        if not record.revoked or record.kind == "jwt":
            # A revoked JWT id is kept whole: it is the revocation (and there are few).
            self.records[credential_id] = record
            self._index(record)
            if not record.revoked and self.revoked:
                self.revoked.discard(credential_id)  # a stale read: the next sync revokes again
            return record.revoked and (before is None or not before.revoked)
        if before is not None:
            del self.records[credential_id]
        elif credential_id in self.revoked:
            return False
        self.revoked.add(credential_id, record.secret_hash)
        return before is None or not before.revoked

    def _index(self, record: CredentialRecord) -> None:
        if _enrollment_issued(record):
            agent_id = record.agent_id or ""
            keys = self.enrolled_keys.get(agent_id, ())
            if record.id not in keys:
                self.enrolled_keys[agent_id] = (*keys, record.id)

    def _unindex(self, record: CredentialRecord) -> None:
        if _enrollment_issued(record, revoked_too=True):
            agent_id = record.agent_id or ""
            keys = tuple(k for k in self.enrolled_keys.get(agent_id, ()) if k != record.id)
            if keys:
                self.enrolled_keys[agent_id] = keys
            else:
                self.enrolled_keys.pop(agent_id, None)

    def _revoke(self, credential_id: str) -> None:
        record = self.records.get(credential_id)
        if record is not None and not record.revoked:
            self._put(dataclasses.replace(record, revoked=True))

    def forget(self, credential_ids: Iterable[str]) -> None:
        """Drop credentials the store no longer holds (its retention removed them)."""
        for credential_id in credential_ids:
            record = self.records.pop(credential_id, None)
            if record is not None:
                self._unindex(record)
            self.revoked.discard(credential_id)

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
        self.revoked.expire()

    def enrolled(
        self, enroll_id: str, issued: CredentialRecord, replaced: list[str], new_id: bool
    ) -> None:
        """Mirror in memory what :meth:`Store.enroll` just committed (sync confirms later)."""
        # The replaced keys' connections need no closing: this registration supersedes them.
        for old in replaced:
            self._revoke(old)
        self._put(issued)
        key = self.records.get(enroll_id)
        if key is not None and new_id and key.uses_left is not None:
            key.uses_left -= 1

    def apply(self, changed: Iterable[CredentialRecord], announce: bool = True) -> None:
        """Install records read from the store (newer states of the same id win)."""
        revoked: set[str] = set()
        for record in changed:
            if self._put(record):
                revoked.add(record.id)
            self.rev = max(self.rev, record.rev)
        if announce and revoked and self.on_revoked is not None:
            self.on_revoked(revoked)

    def _may_look_up(self, credential_id: str) -> bool:
        """Unknown ids are looked up in the store at most once per ``MISS_TTL`` seconds."""
        until = self._misses.get(credential_id)
        return until is None or until <= self.clock()

    async def look_up(self, credential_id: str) -> None:
        """Sync from the store (one query for every waiting handshake), remember misses."""
        await self.sync()
        if credential_id not in self.records and credential_id not in self.revoked:
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
            return credential_id in self.revoked or not credential_id.startswith(JWT_PREFIX)
        return record.revoked

    def authenticate(self, token: str) -> Principal:
        """Check a bearer token; raises :class:`AuthFailure` with the protocol's status."""
        kind = KINDS.get(token[:4])
        if kind is None or len(token) < 4 + ID_LENGTH + 2 or token[4 + ID_LENGTH] != "_":
            raise AuthFailure(401, "malformed token")
        credential_id = token[4 : 4 + ID_LENGTH]
        secret = token[5 + ID_LENGTH :]
        record = self.records.get(credential_id)
        if record is None:
            if credential_id in self.revoked:
                if self.revoked.holds(credential_id, _hash(secret)):
                    raise AuthFailure(403, "revoked token")
                raise AuthFailure(401, "unknown token")
            if self._may_look_up(credential_id):
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
        """Unrevoked agent keys issued to ``agent_id`` by enrollment: what a re-enrollment
        replaces. An index lookup: for a fleet of stateless agents every start is one."""
        return list(self.enrolled_keys.get(agent_id, ()))


def _enrollment_issued(record: CredentialRecord, revoked_too: bool = False) -> bool:
    return (
        record.kind == "agent"
        and (revoked_too or not record.revoked)
        and (record.issued_by or "").startswith("enroll:")
    )


class Revocations:
    """Revoked keys as a hub still answers them (403, not 401): an id and 16 bytes of its
    secret's hash each, bucketed by when the hub learned of them, so that a hundred
    re-enrollment storms cost memory only for the retention, not forever."""

    __slots__ = ("_buckets", "_clock", "_span", "retention")

    def __init__(self, retention: float, clock: Callable[[], float]) -> None:
        self.retention = retention
        self._clock = clock
        self._span = retention / REVOKED_BUCKETS
        #: (start of the bucket, id -> digest prefix), oldest first.
        self._buckets: deque[tuple[float, dict[str, bytes]]] = deque()

    def __contains__(self, credential_id: object) -> bool:
        return any(credential_id in ids for _, ids in self._buckets)

    def __len__(self) -> int:
        return sum(len(ids) for _, ids in self._buckets)

    def __bool__(self) -> bool:
        return bool(self._buckets)

    def add(self, credential_id: str, secret_hash: bytes) -> None:
        now = self._clock()
        buckets = self._buckets
        if not buckets or now >= buckets[-1][0] + self._span:
            buckets.append((now, {}))
        buckets[-1][1][credential_id] = secret_hash[:REVOKED_DIGEST]

    def discard(self, credential_id: str) -> None:
        for _, ids in self._buckets:
            ids.pop(credential_id, None)

    def holds(self, credential_id: str, secret_hash: bytes) -> bool:
        """Whether ``secret_hash`` is the revoked key's own (constant time)."""
        for _, ids in self._buckets:
            kept = ids.get(credential_id)
            if kept is not None:
                return hmac.compare_digest(kept, secret_hash[:REVOKED_DIGEST])
        return False

    def expire(self) -> int:
        """Drop the buckets older than the retention."""
        horizon = self._clock() - self.retention
        dropped = 0
        buckets = self._buckets
        while buckets and buckets[0][0] + self._span <= horizon:
            dropped += len(buckets.popleft()[1])
        return dropped

    def ids(self) -> set[str]:
        return {credential_id for _, ids in self._buckets for credential_id in ids}
