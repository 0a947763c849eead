"""Rows and records: each table's columns named once, records read back by column name, and
the one paged listing every admin query uses.

A :class:`Table` derives its ``SELECT`` list, its ``INSERT`` statement and the values of a
row from one tuple of column names, so a column added or moved cannot shift the others.
Reading goes through ``sqlite3.Row`` (the connections' row factory): ``row["state"]``, never
``row[5]``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson

from ..model import AgentRecord, AlertRecord, CommandRecord, CredentialRecord, JobRecord
from ..protocol.times import format_time
from .base import AuditEntry, Page

__all__ = [
    "AGENTS",
    "ALERTS",
    "ALERT_LIST",
    "AUDIT",
    "AUDIT_LIST",
    "COMMANDS",
    "COMMAND_LIST",
    "CREDENTIALS",
    "JOBS",
    "JOB_LIST",
    "Listing",
    "Table",
    "dumps",
    "loads",
]

R = TypeVar("R")


def dumps(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def loads(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)


class Table(Generic[R]):
    """One record type stored as one row of ``name``.

    ``columns`` (comma-separated) are the record's attributes of the same names;
    ``record`` builds a record back from a row, by column name.
    """

    def __init__(
        self,
        name: str,
        columns: str,
        record: Callable[[sqlite3.Row], R],
        stored: dict[str, Callable[[Any], Any]] | None = None,
        derived: dict[str, Callable[[R], Any]] | None = None,
    ) -> None:
        self.name = name
        self.columns = tuple(column.strip() for column in columns.split(","))
        self.select = ", ".join(self.columns)
        self.record = record
        self.row: Callable[[R], tuple[Any, ...]] = self._compile(stored or {}, derived or {})

    def _compile(
        self, stored: dict[str, Callable[[Any], Any]], derived: dict[str, Callable[[R], Any]]
    ) -> Callable[[R], tuple[Any, ...]]:
        """``row(record)``: the values of its row in :attr:`columns` order, ``stored(value)``
        for a column stored otherwise than as its attribute (JSON, a flag as 0 or 1),
        ``derived(record)`` for one made of several attributes.

        Compiled once from the names, the way :mod:`dataclasses` compiles ``__init__``: a
        job to the whole fleet builds ten thousand command rows, and a generic loop over
        the columns costs 2.4 times a written-out tuple (1.5 instead of 0.6 µs a row).
        """
        if not all(column.isidentifier() for column in self.columns):
            raise ValueError(f"{self.name}: column names must be identifiers")
        unknown = (set(stored) | set(derived)) - set(self.columns)
        if unknown:
            raise ValueError(f"{self.name}: no such columns {sorted(unknown)}")
        names: dict[str, Any] = {}
        values = []
        for column in self.columns:
            if column in derived:
                names[f"derive_{column}"] = derived[column]
                values.append(f"derive_{column}(record)")
            elif column in stored:
                names[f"store_{column}"] = stored[column]
                values.append(f"store_{column}(record.{column})")
            else:
                values.append(f"record.{column}")
        source = f"def row(record):\n    return ({', '.join(values)},)\n"
        exec(compile(source, f"<{self.name} row>", "exec"), names)  # noqa: S102
        return names["row"]  # type: ignore[no-any-return]

    def insert(self, conflict: str = "") -> str:
        """``INSERT [OR conflict]`` of a whole row."""
        verb = f"INSERT OR {conflict}" if conflict else "INSERT"
        marks = ", ".join("?" * len(self.columns))
        return f"{verb} INTO {self.name} ({self.select}) VALUES ({marks})"

    def upsert(self) -> str:
        """INSERT that updates in place on a conflict of the first column (the key), keeping
        the rowid that paging relies on (``OR REPLACE`` would give the row a new one)."""
        key, *rest = self.columns
        updates = ", ".join(f"{name} = excluded.{name}" for name in rest)
        return f"{self.insert()} ON CONFLICT({key}) DO UPDATE SET {updates}"


# -- the tables ------------------------------------------------------------------------


def _credential(row: sqlite3.Row) -> CredentialRecord:
    return CredentialRecord(
        id=row["id"],
        kind=row["kind"],
        secret_hash=bytes(row["secret_hash"]),
        agent_id=row["agent_id"],
        role=row["role"],
        name=row["name"],
        pattern=row["pattern"],
        uses_left=row["uses_left"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked=bool(row["revoked"]),
        issued_by=row["issued_by"],
        rev=row["rev"],
    )


CREDENTIALS: Table[CredentialRecord] = Table(
    "credentials",
    "id, kind, secret_hash, agent_id, role, name, pattern, uses_left, created_at, "
    "expires_at, revoked, issued_by, rev",
    _credential,
    stored={"revoked": int},
)


def _agent(row: sqlite3.Row) -> AgentRecord:
    location = loads(row["location"])
    return AgentRecord(
        agent_id=row["agent_id"],
        platform=row["platform"] or "",
        region=row["region"] or "",
        version=row["version"] or "",
        hostname=row["hostname"] or "",
        labels=loads(row["labels"]) or {},
        capabilities=tuple(loads(row["capabilities"]) or ()),
        location=tuple(location) if location else None,  # type: ignore[arg-type]
        status=row["status"],
        metrics=loads(row["metrics"]) or {},
        hub_id=row["hub_id"],
        enrolled_by=row["enrolled_by"],
        first_seen=row["first_seen"] or 0.0,
        connected_at=row["connected_at"],
        last_seen=row["last_seen"],
    )


AGENTS: Table[AgentRecord] = Table(
    "agents",
    "agent_id, platform, region, version, hostname, labels, capabilities, location, "
    "status, metrics, hub_id, enrolled_by, first_seen, connected_at, last_seen",
    _agent,
    stored={
        "labels": dumps,
        "capabilities": lambda capabilities: dumps(list(capabilities)),
        "location": lambda location: dumps(list(location) if location else None),
        "metrics": dumps,
    },
)


def _command(row: sqlite3.Row) -> CommandRecord:
    return CommandRecord(
        command_id=row["command_id"],
        job_id=row["job_id"],
        agent_id=row["agent_id"],
        name=row["name"],
        args=loads(row["args"]) or {},
        state=row["state"],
        timeout=row["timeout"],
        issued_at=row["issued_at"],
        expires_at=row["expires_at"],
        updated_at=row["updated_at"] or row["issued_at"],
        sent_at=row["sent_at"],
        acked_at=row["acked_at"],
        dispatched_by=row["dispatched_by"],
        result=loads(row["result"]),
        output_bytes=row["output_bytes"] or 0,
        truncated=bool(row["truncated"]),
        seq=row["seq"],
    )


COMMANDS: Table[CommandRecord] = Table(
    "commands",
    "command_id, job_id, agent_id, name, args, state, timeout, issued_at, expires_at, "
    "updated_at, sent_at, acked_at, dispatched_by, result, output_bytes, truncated, seq",
    _command,
    stored={"args": dumps, "result": dumps, "truncated": int},
)


def _job(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        job_id=row["job_id"],
        name=row["name"],
        args=loads(row["args"]) or {},
        target=loads(row["target"]) or {},
        state=row["state"],
        total=row["total"],
        counts=loads(row["counts"]) or {},
        created_at=row["created_at"],
        updated_at=row["updated_at"] or row["created_at"],
        dispatched_by=row["dispatched_by"],
        timeout=row["timeout"],
        ttl=row["ttl"],
        max_concurrency=row["max_concurrency"],
        max_errors=row["max_errors"],
        spec=loads(row["spec"]) or {},
    )


JOBS: Table[JobRecord] = Table(
    "jobs",
    "job_id, name, args, target, state, total, counts, created_at, updated_at, "
    "dispatched_by, timeout, ttl, max_concurrency, max_errors, spec",
    _job,
    stored={"args": dumps, "target": dumps, "counts": dumps, "spec": dumps},
    derived={"updated_at": lambda job: job.updated_at or job.created_at},
)


def _alert(row: sqlite3.Row) -> AlertRecord:
    return AlertRecord(
        alert_id=row["alert_id"],
        rule=row["rule"],
        severity=row["severity"],
        subject=row["subject"],
        state=row["state"],
        first_seen=row["first_seen"],
        last_seen=row["last_seen"],
        message=row["message"],
        acknowledged_by=row["acknowledged_by"],
        acknowledged_at=row["acknowledged_at"],
        comment=row["comment"],
        resolved_at=row["resolved_at"],
    )


ALERTS: Table[AlertRecord] = Table(
    "alerts",
    "alert_id, rule, severity, subject, state, first_seen, last_seen, message, "
    "acknowledged_by, acknowledged_at, comment, resolved_at",
    _alert,
)


def _audit(row: sqlite3.Row) -> AuditEntry:
    return AuditEntry(
        ts=row["ts"],
        action=row["action"],
        actor=row["actor"],
        subject=row["subject"],
        source=row["source"],
        detail=loads(row["detail"]),
        hub_id=row["hub_id"],
    )


#: Audit rows get their ``id`` from SQLite: it is the listing's cursor, not a record field.
AUDIT: Table[AuditEntry] = Table(
    "audit",
    "ts, hub_id, action, actor, subject, source, detail",
    _audit,
    stored={"detail": dumps},
)


def audit_view(row: sqlite3.Row) -> dict[str, Any]:
    """One audit entry as the admin channel lists it (PROTOCOL §5)."""
    return {
        "id": str(row["id"]),
        "time": format_time(row["ts"]),
        "hub_id": row["hub_id"],
        "action": row["action"],
        "actor": row["actor"],
        "subject": row["subject"],
        "source": row["source"],
        "detail": loads(row["detail"]),
    }


# -- paged listings ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Listing:
    """Newest first, a page at a time, filtered by equality on named columns.

    The cursor is the ``key`` column (``rowid``, or ``id`` where the table has its own
    integer key) of the last item of a page, as a string; the next page starts below it.
    """

    table: str
    columns: str
    filters: frozenset[str]
    item: Callable[[sqlite3.Row], dict[str, Any]]
    key: str = "rowid"

    def query(
        self, filter: dict[str, Any], limit: int, before: str | None
    ) -> Callable[[sqlite3.Connection], Page]:
        """The read that answers one request. A bad filter or cursor raises ValueError
        here, before anything is queued."""
        where, params = self._where(filter, before)
        sql = (
            f"SELECT {self.key} AS cursor_, {self.columns} FROM {self.table} {where} "
            f"ORDER BY {self.key} DESC LIMIT ?"
        )
        params.append(limit + 1)
        item = self.item

        def op(conn: sqlite3.Connection) -> Page:
            rows = conn.execute(sql, params).fetchall()
            cursor = str(rows[limit - 1]["cursor_"]) if len(rows) > limit else None
            return Page([item(row) for row in rows[:limit]], cursor)

        return op

    def _where(self, filter: dict[str, Any], before: str | None) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        for key, value in filter.items():
            if key not in self.filters:
                raise ValueError(f"unknown filter key {key!r}")
            if isinstance(value, list):
                if not value or not all(isinstance(v, str | int) for v in value):
                    raise ValueError(f"filter {key!r} needs strings")
                clauses.append(f"{key} IN ({', '.join('?' * len(value))})")
                params.extend(value)
            elif isinstance(value, str | int) and not isinstance(value, bool):
                clauses.append(f"{key} = ?")
                params.append(value)
            else:
                raise ValueError(f"filter {key!r} needs a string or a list of strings")
        if before is not None:
            try:
                cursor = int(before)
            except ValueError:
                raise ValueError("invalid cursor") from None
            clauses.append(f"{self.key} < ?")
            params.append(cursor)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        return where, params


COMMAND_LIST = Listing(
    "commands",
    COMMANDS.select,
    frozenset({"command_id", "job_id", "agent_id", "name", "state", "dispatched_by"}),
    lambda row: _command(row).view(),
)
JOB_LIST = Listing(
    "jobs",
    JOBS.select,
    frozenset({"job_id", "name", "state", "dispatched_by"}),
    lambda row: _job(row).view(),
)
ALERT_LIST = Listing(
    "alerts",
    ALERTS.select,
    frozenset({"alert_id", "rule", "severity", "subject", "state"}),
    lambda row: _alert(row).view(),
)
AUDIT_LIST = Listing(
    "audit",
    f"id, {AUDIT.select}",
    frozenset({"action", "actor", "subject", "source", "hub_id"}),
    audit_view,
    key="id",
)
