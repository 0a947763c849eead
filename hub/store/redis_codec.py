"""How the Redis store writes records as bytes, and reads them back.

Values are JSON arrays by position, not objects: a field name repeated in every one of
100,000 agents is memory Redis keeps for nothing. Floats go through orjson, whose shortest
round-trip form reads back exactly. Metrics are the exception to plain JSON: their names
are interned (:class:`MetricNames`), since every agent repeats the same few names in its
last heartbeat and in each kept sample, and so are the parts of a registration that many
agents share (their profile).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from typing import Any

import orjson

from ..model import AgentRecord, AlertRecord, CommandRecord, CredentialRecord, JobRecord
from ..protocol.states import CommandState
from ..protocol.times import format_time
from .base import AuditEntry

__all__ = [
    "Dictionary",
    "MetricNames",
    "decode_agent",
    "decode_alert",
    "decode_audit",
    "decode_command",
    "decode_credential",
    "decode_job",
    "encode_agent",
    "encode_alert",
    "encode_audit",
    "encode_command",
    "encode_credential",
    "encode_job",
]

dumps = orjson.dumps
loads = orjson.loads

#: What an open session's line ends with; closing it replaces this tail (see redis_lua).
SESSION_OPEN_TAIL = b",null,null,null]"

#: Commands in these states are kept in the index of unfinished ones (``P:cmds:open``).
UNFINISHED = frozenset({CommandState.QUEUED, CommandState.SENT, CommandState.ACKED})
#: An alert is open (``P:alerts:open``) until resolved, as ``open_alerts`` says.
RESOLVED = "resolved"


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def number(value: float | None) -> bytes:
    """A float as exact text for a script's header (``repr`` round-trips), or empty."""
    return b"" if value is None else repr(float(value)).encode()


# -- interned fragments ------------------------------------------------------------


class Dictionary:
    """Repeated JSON fragments kept once in a Redis hash, rows holding their id instead.

    An id is a hash of the fragment, so every hub computes the same one without asking;
    the batch that writes a row also writes the fragments it uses (one HSET, a few
    fields), so a Redis that lost its data gets them back with the next writes. At most
    ``limit`` fragments are interned by one store: past that (agents inventing metric
    names or labels), rows hold the fragment itself, and nothing grows without bound.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._by_blob: dict[bytes, str] = {}
        self._blobs: dict[str, bytes] = {}
        self._values: dict[str, Any] = {}

    def ref(self, blob: bytes) -> str | None:
        """The id of a fragment (interned now if new), or None past the limit."""
        ident = self._by_blob.get(blob)
        if ident is None:
            if len(self._by_blob) >= self.limit:
                return None
            ident = hashlib.blake2b(blob, digest_size=5).hexdigest()
            self._by_blob[blob] = ident
            self._blobs[ident] = blob
            self._values[ident] = loads(blob)
        return ident

    def blob(self, ident: str) -> bytes:
        return self._blobs[ident]

    def value(self, ident: str) -> Any:
        return self._values.get(ident)

    def knows(self, ident: str) -> bool:
        return ident in self._values

    def learn(self, ident: str, blob: bytes | None) -> None:
        """A fragment interned by another store, read back from Redis."""
        if blob is not None and ident not in self._values and len(self._values) < 16 * self.limit:
            self._values[ident] = loads(blob)


class MetricNames(Dictionary):
    """Metric name lists: a heartbeat is stored as ``[..., id, value, ...]``."""

    def __init__(self, limit: int = 1000) -> None:
        super().__init__(limit)
        self._by_names: dict[tuple[str, ...], str] = {}

    def encode(self, metrics: dict[str, float]) -> list[Any]:
        if not metrics:
            return []
        names = tuple(metrics)
        ident = self._by_names.get(names)
        if ident is None:
            ident = self.ref(dumps(names))
            if ident is None:
                return [metrics]
            self._by_names[names] = ident
        return [ident, *metrics.values()]

    def decode(self, parts: Sequence[Any]) -> dict[str, float]:
        if not parts:
            return {}
        head = parts[0]
        if isinstance(head, dict):
            return head
        names = self.value(head)
        if names is None:
            return {}  # interned by a store whose fragment was lost: nothing to show
        return dict(zip(names, parts[1:], strict=False))


def interned_id(parts: Sequence[Any]) -> str | None:
    """The fragment id a row's part starts with, if it is one."""
    return parts[0] if parts and isinstance(parts[0], str) else None


# -- agents ------------------------------------------------------------------------


def encode_agent(a: AgentRecord, profiles: Dictionary) -> list[Any]:
    """Registration fields and connection state (``P:agents``); heartbeats are apart.
    What many agents share (platform, region, version, labels, capabilities) is one
    interned profile."""
    profile = dumps([a.platform, a.region, a.version, a.labels, list(a.capabilities)])
    ident = profiles.ref(profile)
    return [
        ident if ident is not None else loads(profile), a.hostname,
        list(a.location) if a.location else None, a.hub_id, a.enrolled_by, a.first_seen,
        a.connected_at,
    ]  # fmt: skip


def encode_heartbeat(a: AgentRecord, names: MetricNames) -> list[Any]:
    """The last heartbeat (``P:hb``): ``[last_seen, status, metrics...]``."""
    return [a.last_seen, a.status, *names.encode(a.metrics)]


def millis(ts: float) -> int:
    """Milliseconds as :func:`format_time` truncates them, so a sample shows the same."""
    whole = int(ts)
    return whole * 1000 + int((ts - whole) * 1000)


def format_millis(ms: int) -> str:
    return f"{format_time(float(ms // 1000))[:-4]}{ms % 1000:03d}Z"


def encode_sample(a: AgentRecord, names: MetricNames) -> list[Any]:
    """One history sample (in ``P:hist``): ``[ms, status, metrics...]``."""
    assert a.last_seen is not None
    return [millis(a.last_seen), a.status, *names.encode(a.metrics)]


def decode_agent(
    agent_id: str,
    row: list[Any],
    heartbeat: list[Any] | None,
    profiles: Dictionary,
    names: MetricNames,
) -> AgentRecord:
    profile, hostname, location, hub_id, enrolled_by, first_seen, connected_at = row
    if isinstance(profile, str):
        profile = profiles.value(profile) or ["", "", "", {}, []]
    platform, region, version, labels, capabilities = profile
    record = AgentRecord(
        agent_id=agent_id,
        platform=platform or "",
        region=region or "",
        version=version or "",
        hostname=hostname or "",
        labels=labels or {},
        capabilities=tuple(capabilities or ()),
        location=tuple(location) if location else None,  # type: ignore[arg-type]
        hub_id=hub_id,
        enrolled_by=enrolled_by,
        first_seen=first_seen or 0.0,
        connected_at=connected_at,
    )
    if heartbeat is not None:
        record.last_seen, record.status = heartbeat[0], heartbeat[1]
        record.metrics = names.decode(heartbeat[2:])
    return record


def encode_session_open(
    session_id: str, hub_id: str, peer: str, credential_id: str | None, connected_at: float
) -> tuple[bytes, bytes]:
    """The line prefix that finds a session again, and its open line. The credential is
    not kept: nothing reads it back (``agent_history`` does not show it), and the line is
    memory every agent costs Redis."""
    line = dumps([session_id, hub_id, peer, connected_at, None, None, None])
    return dumps([session_id])[:-1] + b",", line


def encode_session_close(
    session_id: str, ended_at: float, code: int, reason: str
) -> tuple[bytes, bytes]:
    return dumps([session_id])[:-1] + b",", b"," + dumps([ended_at, code, reason])[1:]


def split_history(value: bytes | None) -> tuple[list[bytes], list[bytes]]:
    """Sample lines and session lines of a ``P:hist`` value."""
    if not value:
        return [], []
    samples, _, sessions = value.partition(b"\x1e")
    return (samples.split(b"\n") if samples else []), (sessions.split(b"\n") if sessions else [])


def decode_session(line: bytes) -> dict[str, Any]:
    session_id, hub_id, peer, connected_at, ended_at, code, reason = loads(line)
    return {
        "session_id": session_id,
        "hub_id": hub_id,
        "peer": peer,
        "connected_at": format_time(connected_at),
        "ended_at": format_time(ended_at) if ended_at is not None else None,
        "close_code": code,
        "close_reason": reason,
    }


# -- credentials -----------------------------------------------------------------------


def encode_credential(c: CredentialRecord) -> tuple[bytes, bytes, bytes, bytes]:
    """What a script needs of a new credential: uses left, revoked, expiry and the body
    (the fields often empty last, and trailing nulls left out: one per agent key)."""
    body = [
        c.kind, base64.b64encode(c.secret_hash).decode(), c.created_at, c.agent_id,
        c.issued_by, c.role, c.name, c.pattern,
    ]  # fmt: skip
    while body[-1] is None:
        body.pop()
    uses = b"" if c.uses_left is None else str(int(c.uses_left)).encode()
    return uses, b"1" if c.revoked else b"0", number(c.expires_at), dumps(body)


def decode_credential(credential_id: bytes | str, value: bytes) -> tuple[CredentialRecord, int]:
    """The record and its creation order (the revision it was created with)."""
    header, _, body = value.partition(b";")
    rev, revoked, uses, order, expires = header.split(b",")
    fields = loads(body)
    kind, secret, created_at, agent_id, issued_by, role, name, pattern = (
        *fields,
        *(None,) * (8 - len(fields)),
    )
    record = CredentialRecord(
        id=text(credential_id),
        kind=kind,
        secret_hash=base64.b64decode(secret),
        created_at=created_at,
        agent_id=agent_id,
        role=role,
        name=name,
        pattern=pattern,
        uses_left=int(uses) if uses else None,
        expires_at=float(expires) if expires else None,
        revoked=revoked == b"1",
        issued_by=issued_by,
        rev=int(rev),
    )
    return record, int(order or rev)


# -- ledger ------------------------------------------------------------------------


def encode_command(c: CommandRecord) -> bytes:
    return dumps(
        [
            c.job_id, c.agent_id, c.name, c.args, c.state, c.timeout, c.issued_at, c.expires_at,
            c.updated_at, c.sent_at, c.acked_at, c.dispatched_by, c.result, c.output_bytes,
            int(c.truncated), c.seq,
        ]
    )  # fmt: skip


def decode_command(command_id: bytes | str, value: bytes) -> CommandRecord:
    (job_id, agent_id, name, args, state, timeout, issued_at, expires_at, updated_at, sent_at,
     acked_at, dispatched_by, result, output_bytes, truncated, seq) = loads(value)  # fmt: skip
    return CommandRecord(
        command_id=text(command_id),
        job_id=job_id,
        agent_id=agent_id,
        name=name,
        args=args or {},
        state=state,
        timeout=timeout,
        issued_at=issued_at,
        expires_at=expires_at,
        updated_at=updated_at or issued_at,
        sent_at=sent_at,
        acked_at=acked_at,
        dispatched_by=dispatched_by,
        result=result,
        output_bytes=output_bytes or 0,
        truncated=bool(truncated),
        seq=seq,
    )


def encode_job(j: JobRecord) -> bytes:
    return dumps(
        [
            j.name, j.args, j.target, j.state, j.total, j.counts, j.created_at,
            j.updated_at or j.created_at, j.dispatched_by, j.timeout, j.ttl, j.max_concurrency,
            j.max_errors, j.spec,
        ]
    )  # fmt: skip


def decode_job(job_id: bytes | str, value: bytes) -> JobRecord:
    (name, args, target, state, total, counts, created_at, updated_at, dispatched_by, timeout,
     ttl, max_concurrency, max_errors, spec) = loads(value)  # fmt: skip
    return JobRecord(
        job_id=text(job_id),
        name=name,
        args=args or {},
        target=target or {},
        state=state,
        total=total,
        counts=counts or {},
        created_at=created_at,
        updated_at=updated_at or created_at,
        dispatched_by=dispatched_by,
        timeout=timeout,
        ttl=ttl,
        max_concurrency=max_concurrency,
        max_errors=max_errors,
        spec=spec or {},
    )


# -- audit and alerts --------------------------------------------------------------


def encode_audit(e: AuditEntry) -> bytes:
    return dumps([e.ts, e.hub_id, e.action, e.actor, e.subject, e.source, e.detail])


def decode_audit(entry_id: bytes | str, value: bytes) -> dict[str, Any]:
    ts, hub_id, action, actor, subject, source, detail = loads(value)
    return {
        "id": text(entry_id),
        "time": format_time(ts),
        "hub_id": hub_id,
        "action": action,
        "actor": actor,
        "subject": subject,
        "source": source,
        "detail": detail,
    }


def encode_alert(a: AlertRecord) -> bytes:
    return dumps(
        [
            a.rule, a.severity, a.subject, a.state, a.first_seen, a.last_seen, a.message,
            a.acknowledged_by, a.acknowledged_at, a.comment, a.resolved_at,
        ]
    )  # fmt: skip


def decode_alert(alert_id: bytes | str, value: bytes) -> AlertRecord:
    (rule, severity, subject, state, first_seen, last_seen, message, acknowledged_by,
     acknowledged_at, comment, resolved_at) = loads(value)  # fmt: skip
    return AlertRecord(
        alert_id=text(alert_id),
        rule=rule,
        severity=severity,
        subject=subject,
        state=state,
        first_seen=first_seen,
        last_seen=last_seen,
        message=message,
        acknowledged_by=acknowledged_by,
        acknowledged_at=acknowledged_at,
        comment=comment,
        resolved_at=resolved_at,
    )
