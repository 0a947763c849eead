"""The hub's in-memory records and their wire views.

Records use ``__slots__``: the hub keeps one :class:`AgentRecord` for every agent that ever
registered and one :class:`CommandRecord` for every unfinished command, so their size is the
hub's memory per agent. Views turn records into the objects of PROTOCOL §5.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .protocol.times import format_time


def _time(ts: float | None) -> str | None:
    return format_time(ts) if ts is not None else None


#: A JWT's credential id is this prefix and its ``jti``: how a session names it, and the id
#: under which its revocation is stored (``tether-hub token revoke jwt:<jti>``).
JWT_PREFIX = "jwt:"


@dataclass(slots=True, eq=False)
class AgentRecord:
    """What the hub knows about one agent, connected or not."""

    agent_id: str
    platform: str = ""
    region: str = ""
    version: str = ""
    hostname: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    capabilities: tuple[str, ...] = ()
    location: tuple[float, float] | None = None
    #: ``online``, ``stale``, ``offline`` or ``unknown`` (PROTOCOL §5).
    state: str = "offline"
    #: The agent's own status from its heartbeats: ``ok``, ``degraded``, ``draining``.
    status: str | None = None
    hub_id: str | None = None
    first_seen: float = 0.0
    connected_at: float | None = None
    last_seen: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    #: Enrollment key this id enrolled through, if any (a re-registration spends no use).
    enrolled_by: str | None = None
    #: Cluster mode: the generation of the connection the record describes (0 on one hub).
    generation: int = 0
    #: True when the heartbeat fields changed since the last batch reached the store.
    dirty: bool = False

    def view(self) -> dict[str, Any]:
        location = self.location
        return {
            "agent_id": self.agent_id,
            "platform": self.platform,
            "region": self.region,
            "version": self.version,
            "hostname": self.hostname,
            "labels": self.labels,
            "capabilities": list(self.capabilities),
            "location": {"lat": location[0], "lon": location[1]} if location else None,
            "state": self.state,
            "status": self.status,
            "hub_id": self.hub_id,
            "connected_at": _time(self.connected_at),
            "last_seen": _time(self.last_seen),
            "metrics": self.metrics,
        }


@dataclass(slots=True, eq=False)
class CredentialRecord:
    """A credential as stored: only the hash of its secret, never the secret."""

    id: str
    kind: str  # "agent", "enroll", "admin", or "jwt" (a revoked JWT's jti)
    secret_hash: bytes
    created_at: float
    agent_id: str | None = None
    role: str | None = None
    name: str | None = None
    pattern: str | None = None
    uses_left: int | None = None
    expires_at: float | None = None
    revoked: bool = False
    issued_by: str | None = None
    rev: int = 0

    def listing(self) -> dict[str, Any]:
        """The shape of ``token list --json``: everything but the secret."""
        return {
            "id": self.id,
            "kind": self.kind,
            "agent_id": self.agent_id,
            "role": self.role,
            "name": self.name,
            "pattern": self.pattern,
            "created_at": format_time(self.created_at),
            "expires_at": _time(self.expires_at),
            "uses_left": self.uses_left,
            "revoked": self.revoked,
        }


@dataclass(slots=True, eq=False)
class CommandRecord:
    """One command to one agent, as the ledger tracks it."""

    command_id: str
    job_id: str
    agent_id: str
    name: str
    args: dict[str, Any]
    timeout: float
    issued_at: float
    expires_at: float
    seq: int
    state: str = "queued"
    updated_at: float = 0.0
    sent_at: float | None = None
    acked_at: float | None = None
    dispatched_by: str | None = None
    result: dict[str, Any] | None = None
    output_bytes: int = 0
    output_seq: int = 0
    truncated: bool = False
    cancel_requested: bool = False

    def view(self) -> dict[str, Any]:
        return {
            "command_id": self.command_id,
            "job_id": self.job_id,
            "agent_id": self.agent_id,
            "name": self.name,
            "args": self.args,
            "state": self.state,
            "issued_at": format_time(self.issued_at),
            "expires_at": format_time(self.expires_at),
            "updated_at": format_time(self.updated_at),
            "dispatched_by": self.dispatched_by,
            "result": self.result,
            "output_bytes": self.output_bytes,
            "truncated": self.truncated,
        }

    def wire(self) -> dict[str, Any]:
        """The ``command`` message that delivers it to the agent (PROTOCOL §4.3)."""
        timeout = self.timeout
        return {
            "type": "command",
            "command_id": self.command_id,
            "name": self.name,
            "args": self.args,
            "timeout": int(timeout) if timeout == int(timeout) else timeout,
            "issued_at": format_time(self.issued_at),
            "expires_at": format_time(self.expires_at),
        }


@dataclass(slots=True, eq=False)
class JobRecord:
    """One dispatch: a command per target and the job's rate control."""

    job_id: str
    name: str
    args: dict[str, Any]
    target: dict[str, Any]
    total: int
    created_at: float
    timeout: float
    ttl: float
    dispatched_by: str | None = None
    max_concurrency: int | None = None
    max_errors: int | None = None
    state: str = "running"
    counts: dict[str, int] = field(default_factory=dict)
    updated_at: float = 0.0
    spec: dict[str, Any] = field(default_factory=dict)

    def view(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "name": self.name,
            "args": self.args,
            "target": self.target,
            "state": self.state,
            "counts": dict(self.counts),
            "total": self.total,
            "created_at": format_time(self.created_at),
            "updated_at": format_time(self.updated_at or self.created_at),
            "dispatched_by": self.dispatched_by,
            "max_concurrency": self.spec.get("max_concurrency"),
            "max_errors": self.spec.get("max_errors"),
        }


@dataclass(slots=True, eq=False)
class AlertRecord:
    """One alert: a rule firing about one subject, until resolved."""

    alert_id: str
    rule: str
    severity: str
    subject: str
    first_seen: float
    last_seen: float
    message: str
    state: str = "firing"
    acknowledged_by: str | None = None
    acknowledged_at: float | None = None
    comment: str | None = None
    resolved_at: float | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.rule, self.subject)

    def view(self) -> dict[str, Any]:
        return {
            "alert_id": self.alert_id,
            "rule": self.rule,
            "severity": self.severity,
            "subject": self.subject,
            "state": self.state,
            "first_seen": format_time(self.first_seen),
            "last_seen": format_time(self.last_seen),
            "message": self.message,
            "acknowledged_by": self.acknowledged_by,
            "comment": self.comment,
            "resolved_at": _time(self.resolved_at),
        }
