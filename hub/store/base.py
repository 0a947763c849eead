"""The store interface: everything the hub persists, behind one set of async methods.

The embedded SQLite store (:mod:`hub.store.sqlite`) is the only one today. A store for
cluster mode (on Redis) is to implement the same interface and pass the same conformance
suite (``tests/hub/test_store_conformance.py``); nothing above ``store/`` may know which one
runs.

Two kinds of writes exist. *Durable* writes return an awaitable that resolves once the data
is committed (the ledger awaits them before announcing a transition). *Batched* writes
(heartbeats, samples) return nothing; they reach the disk with the next group commit.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..model import AgentRecord, AlertRecord, CommandRecord, CredentialRecord, JobRecord
from .health import StoreHealth

if TYPE_CHECKING:
    from pathlib import Path

    from .retention import Retention

__all__ = ["AuditEntry", "Page", "Store", "StoreUnavailable"]


class StoreUnavailable(RuntimeError):
    """The store cannot take the request now; nothing was written."""


@dataclass(slots=True)
class AuditEntry:
    ts: float
    action: str
    actor: str | None = None
    subject: str | None = None
    source: str | None = None
    detail: dict[str, Any] | None = None
    hub_id: str | None = None


@dataclass(slots=True)
class Page:
    items: list[dict[str, Any]]
    next: str | None


class Store(abc.ABC):
    """Persistence for one hub (or, in cluster mode, for all of them)."""

    @property
    def commits(self) -> int:
        """Write transactions committed so far (each one fsync when the store is durable):
        the figure that tells whether grouping writes works, exported as a metric."""
        return 0

    #: Whether the store can write (a store that cannot tell is always healthy; Redis's
    #: outages are the cluster link's to report).
    health: StoreHealth = StoreHealth()

    # -- lifecycle -------------------------------------------------------------------

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush every pending write, then release resources."""

    @abc.abstractmethod
    async def ping(self) -> bool:
        """True when the store answers (readiness)."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """Wait until every write submitted so far is committed."""

    async def checkpoint(self) -> Any:
        """Housekeeping off the write path, called about once a second (none by default)."""
        return None

    # -- credentials -------------------------------------------------------------------

    @abc.abstractmethod
    async def add_credential(self, credential: CredentialRecord) -> None: ...

    @abc.abstractmethod
    async def credentials(self) -> list[CredentialRecord]: ...

    @abc.abstractmethod
    async def credentials_since(self, rev: int) -> tuple[int, list[CredentialRecord]]:
        """Credentials changed after ``rev``, and the newest revision."""

    @abc.abstractmethod
    async def revoke_credential(self, credential_id: str) -> CredentialRecord | None:
        """Mark revoked; returns the record, or None when unknown. ``jwt:<jti>`` is never
        unknown: JWTs are not stored, so revoking one stores the revocation."""

    @abc.abstractmethod
    async def enroll(
        self, credential_id: str, agent_id: str, issued: CredentialRecord, revoke: Sequence[str]
    ) -> bool:
        """Atomically: spend a use of an enrollment key for a new agent id (none for an id
        already enrolled through it), store the agent key issued to it and revoke the ones
        it replaces. False when the key is exhausted, expired or revoked."""

    @abc.abstractmethod
    async def purge_credentials(self, credential_ids: Sequence[str]) -> int:
        """Delete those of these credentials that are revoked (their retention is over);
        live ones stay whatever the caller thinks. How many were deleted."""

    # -- agents and sessions -----------------------------------------------------------

    @abc.abstractmethod
    async def load_agents(self) -> list[AgentRecord]: ...

    @abc.abstractmethod
    def save_agent(self, agent: AgentRecord) -> None:
        """Batched: registration fields and connection state of one agent."""

    @abc.abstractmethod
    def save_heartbeats(self, agents: Iterable[AgentRecord], samples: bool) -> None:
        """Batched: last_seen, status and metrics; with ``samples`` also history rows."""

    @abc.abstractmethod
    def open_session(
        self,
        session_id: str,
        agent_id: str,
        hub_id: str,
        peer: str,
        credential_id: str | None,
        connected_at: float,
    ) -> None: ...

    @abc.abstractmethod
    def close_session(self, session_id: str, ended_at: float, code: int, reason: str) -> None: ...

    @abc.abstractmethod
    async def agent_history(self, agent_id: str, limit: int = 100) -> dict[str, list[Any]]:
        """``heartbeats`` and ``sessions`` of one agent, newest first."""

    @abc.abstractmethod
    def prune(self, before: float) -> None:
        """Batched: drop heartbeat samples older than ``before``."""

    async def prune_expired(
        self, retention: Retention, now: float, export: Path | None = None
    ) -> dict[str, int]:
        """Delete what ``retention`` no longer keeps at ``now``, in small steps off the event
        loop (unfinished commands and running jobs never); rows deleted by kind. Audit
        entries are appended to ``export`` (JSON lines) before they are deleted.

        This default prunes heartbeat samples only: a store that keeps more says so here."""
        if retention.heartbeats:
            self.prune(now - retention.heartbeats)
        return {}

    # -- ledger ------------------------------------------------------------------------

    @abc.abstractmethod
    async def add_job(
        self,
        job: JobRecord,
        commands: Sequence[CommandRecord],
        audit: Sequence[AuditEntry] = (),
    ) -> None:
        """Durable: a job, its queued commands and their audit entries, in one transaction."""

    @abc.abstractmethod
    def save_commands(
        self,
        commands: Sequence[CommandRecord],
        audit: Sequence[AuditEntry] = (),
        jobs: Sequence[JobRecord] = (),
    ) -> Awaitable[None]:
        """Durable: the current state of these commands, their audit entries and the rows of
        jobs they finished, in one transaction (one fsync where a result ends a job).

        Returns an awaitable already under way (a future, not a coroutine): the ledger fires
        these writes and watches them without a task each."""

    @abc.abstractmethod
    def add_output(self, command_id: str, seq: int, stream: str, data: str) -> None:
        """Batched: one chunk of a command's output (the ledger applies the cap)."""

    @abc.abstractmethod
    async def unfinished(self) -> tuple[list[JobRecord], list[CommandRecord], int]:
        """Jobs still running (their counts as their commands' stored states say), commands
        not finished in the order they were accepted, and the highest command seq."""

    @abc.abstractmethod
    async def command(self, command_id: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def commands(self, filter: dict[str, Any], limit: int, before: str | None) -> Page: ...

    @abc.abstractmethod
    async def command_output(self, command_id: str) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    async def job(self, job_id: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def jobs(self, filter: dict[str, Any], limit: int, before: str | None) -> Page: ...

    # -- audit -------------------------------------------------------------------------

    @abc.abstractmethod
    def audit(self, entries: Sequence[AuditEntry]) -> Awaitable[None]:
        """Durable: append audit entries (an awaitable already under way)."""

    @abc.abstractmethod
    async def audit_entries(
        self, filter: dict[str, Any], limit: int, before: str | None
    ) -> Page: ...

    # -- alerts ------------------------------------------------------------------------

    @abc.abstractmethod
    async def save_alert(self, alert: AlertRecord) -> None: ...

    @abc.abstractmethod
    async def open_alerts(self) -> list[AlertRecord]: ...

    @abc.abstractmethod
    async def alerts(self, filter: dict[str, Any], limit: int, before: str | None) -> Page: ...
