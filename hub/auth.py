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
from .store.base import Store, StoreUnavailable

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
#: At most this many revocations are kept (about 19 MB), whatever the retention: a hundred
#: re-enrollment storms of a big fleet within it would otherwise hold millions. Past it the
#: oldest bucket goes early (its keys answered 401 from then on: still refused).
REVOKED_MAX = 200_000
#: The bytes of a revoked key's secret hash kept to tell its holder (403) from a guesser (401):
#: finding a secret that matches them takes 2^64 hashes, and earns a 403 instead of a 401.
REVOKED_DIGEST = 8

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
                # A stale read: the next sync revokes it again.
                self.revoked.discard(credential_id, record.secret_hash)
            return record.revoked and (before is None or not before.revoked)
        if before is not None:
            del self.records[credential_id]
        elif self.revoked.holds(credential_id, record.secret_hash):
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
        """Drop credentials the store no longer holds (removed by another hub's retention).
        Rare, so a revocation is looked for in every bucket."""
        ids = set(credential_ids)
        for credential_id in ids:
            record = self.records.pop(credential_id, None)
            if record is not None:
                self._unindex(record)
        self.revoked.forget(ids)

    async def expire(self) -> int:
        """Forget the revocations older than the retention, here and in the store (a hub
        that restarted relearns them with a fresh retention: the store keeps them longer,
        never shorter). How many were forgotten."""
        expired = self.revoked.expire()
        if expired:
            try:
                await self.store.purge_credentials(expired)
            except StoreUnavailable:
                log.warning("%d expired revocations stay in the store for now", len(expired))
        return len(expired)

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
        if self.revoked.due():
            await self.expire()

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
        digest = _hash(secret)
        if record is None:
            if self.revoked and self.revoked.holds(credential_id, digest):
                raise AuthFailure(403, "revoked token")
            if self._may_look_up(credential_id):
                raise NotCached(credential_id)
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
    """Revoked keys as a hub still answers them (403, not 401): each one ``bytes`` of its id
    and 8 bytes of its secret's hash (about 80 bytes in memory, a fifth of a record), in
    buckets by when the hub learned of it, dropped a bucket at a time after the retention,
    so that re-enrollment storms cost memory for the retention only, not forever."""

    __slots__ = ("_buckets", "_clock", "_count", "_dropped", "_span", "limit", "retention")

    def __init__(
        self, retention: float, clock: Callable[[], float], limit: int = REVOKED_MAX
    ) -> None:
        self.retention = retention
        self.limit = limit
        self._clock = clock
        self._span = retention / REVOKED_BUCKETS
        #: (start of the bucket, entries), oldest first.
        self._buckets: deque[tuple[float, set[bytes]]] = deque()
        self._count = 0
        #: Entries dropped early (past ``limit``), handed out by the next :meth:`expire`.
        self._dropped: list[bytes] = []

    @staticmethod
    def _entry(credential_id: str, secret_hash: bytes) -> bytes:
        return credential_id.encode() + secret_hash[:REVOKED_DIGEST]

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return bool(self._buckets)

    def add(self, credential_id: str, secret_hash: bytes) -> None:
        now = self._clock()
        buckets = self._buckets
        if not buckets or now >= buckets[-1][0] + self._span:
            buckets.append((now, set()))
        entries = buckets[-1][1]
        before = len(entries)
        entries.add(self._entry(credential_id, secret_hash))
        self._count += len(entries) - before
        while self._count > self.limit and len(buckets) > 1:
            dropped = buckets.popleft()[1]
            self._count -= len(dropped)
            self._dropped.extend(dropped)

    def holds(self, credential_id: str, secret_hash: bytes) -> bool:
        """Whether the key with this id and secret hash was revoked (a set lookup per
        bucket: the entry is the secret's proof, like the record's hash comparison)."""
        entry = self._entry(credential_id, secret_hash)
        return any(entry in entries for _, entries in self._buckets)

    def discard(self, credential_id: str, secret_hash: bytes) -> None:
        entry = self._entry(credential_id, secret_hash)
        for _, entries in self._buckets:
            if entry in entries:
                entries.discard(entry)
                self._count -= 1

    def forget(self, credential_ids: set[str]) -> None:
        """Drop every revocation of these ids (a scan: only for purges made elsewhere)."""
        cut = -REVOKED_DIGEST
        for _, entries in self._buckets:
            gone = [entry for entry in entries if entry[:cut].decode() in credential_ids]
            entries.difference_update(gone)
            self._count -= len(gone)

    def due(self) -> bool:
        buckets = self._buckets
        return bool(self._dropped) or (
            bool(buckets) and buckets[0][0] + self._span <= self._clock() - self.retention
        )

    def expire(self) -> list[str]:
        """Drop the buckets older than the retention; the ids dropped (with those dropped
        early since the last call)."""
        cut = -REVOKED_DIGEST
        expired = [entry[:cut].decode() for entry in self._dropped]
        self._dropped = []
        buckets = self._buckets
        while buckets and buckets[0][0] + self._span <= self._clock() - self.retention:
            entries = buckets.popleft()[1]
            self._count -= len(entries)
            expired.extend(entry[:cut].decode() for entry in entries)
        return expired

    def ids(self) -> set[str]:
        cut = -REVOKED_DIGEST
        return {entry[:cut].decode() for _, entries in self._buckets for entry in entries}
