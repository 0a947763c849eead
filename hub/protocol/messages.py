"""Every message of the Tether wire protocol, version 1 — the single definition.

The hub, the agent, the CLI and the console all import these models; nothing else describes
a message. Validation is strict (no coercion: ``"12"`` is not a number, ``true`` is not 1)
and unknown fields are ignored so either side can add fields without a new version.
Size and shape limits of PROTOCOL §3–5 live here as field constraints.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from .constants import AGENT_ID_PATTERN

__all__ = [
    "ADMIN_REQUEST",
    "AGENT_MESSAGE",
    "HUB_TO_ADMIN",
    "HUB_TO_AGENT",
    "Ack",
    "AckAlert",
    "AgentId",
    "AgentRequest",
    "AgentView",
    "AgentsRequest",
    "AlertView",
    "AlertsRequest",
    "AuditRequest",
    "Batch",
    "Cancel",
    "CancelRequest",
    "Command",
    "CommandResult",
    "CommandView",
    "CommandsRequest",
    "Dispatch",
    "ErrorMessage",
    "Event",
    "Heartbeat",
    "JobRequest",
    "JobView",
    "JobsRequest",
    "Location",
    "MetricsHistoryRequest",
    "Output",
    "OutputRequest",
    "PagedRequest",
    "Probe",
    "ProbeCredential",
    "ProbeResult",
    "Reconnect",
    "Register",
    "Reply",
    "Result",
    "Resync",
    "Selector",
    "Snapshot",
    "Subscribe",
    "Target",
    "ValidationError",
    "Welcome",
    "describe_validation_error",
    "fast_reply",
]

# -- Field types ------------------------------------------------------------------------

AgentId = Annotated[str, StringConstraints(pattern=AGENT_ID_PATTERN)]
Ident = Annotated[str, StringConstraints(min_length=1, max_length=128)]
ShortStr = Annotated[str, StringConstraints(max_length=128)]
LabelValue = Annotated[str, StringConstraints(max_length=256)]
Glob = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Timestamp = Annotated[str, StringConstraints(max_length=64)]
Text = Annotated[str, StringConstraints(max_length=8192)]
Percentage = Annotated[str, StringConstraints(pattern=r"^(100|[1-9]?[0-9])%$")]

AgentStatus = Literal["ok", "degraded", "draining"]
AgentState = Literal["online", "stale", "offline", "unknown"]
CommandState = Literal[
    "queued",
    "sent",
    "acked",
    "succeeded",
    "failed",
    "rejected",
    "cancelled",
    "timed_out",
    "expired",
]
ResultStatus = Literal["succeeded", "failed", "rejected", "cancelled", "timed_out"]
JobState = Literal["running", "succeeded", "failed", "cancelled", "partial"]
Severity = Literal["info", "warning", "critical"]
AlertState = Literal["firing", "acknowledged", "resolved"]
Topic = Literal["agents", "commands", "alerts", "metrics", "audit"]

#: Longest accepted ``timeout`` (one day) and ``ttl`` (thirty days) of a dispatch, in seconds.
MAX_TIMEOUT = 86_400.0
MAX_TTL = 30 * 86_400.0


class _Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=False)


# -- Agent channel: agent to hub ----------------------------------------------------------


class Location(_Message):
    lat: Annotated[float, Field(ge=-90, le=90)]
    lon: Annotated[float, Field(ge=-180, le=180)]


class Register(_Message):
    type: Literal["register"]
    agent_id: AgentId
    platform: ShortStr = ""
    region: ShortStr = ""
    version: ShortStr = ""
    hostname: ShortStr = ""
    labels: Annotated[dict[ShortStr, LabelValue], Field(max_length=64)] = {}
    capabilities: Annotated[list[ShortStr], Field(max_length=64)] = []
    location: Location | None = None


class Heartbeat(_Message):
    type: Literal["heartbeat"]
    metrics: Annotated[dict[ShortStr, float], Field(max_length=64)] = {}
    status: AgentStatus = "ok"


class Ack(_Message):
    type: Literal["ack"]
    command_id: Ident


class Output(_Message):
    type: Literal["output"]
    command_id: Ident
    seq: Annotated[int, Field(ge=0)]
    stream: Literal["stdout", "stderr"]
    data: str


class Result(_Message):
    type: Literal["result"]
    command_id: Ident
    status: ResultStatus
    exit_code: int | None = None
    data: Any = None
    error: Text | None = None
    started_at: Timestamp | None = None
    finished_at: Timestamp | None = None


class Probe(_Message):
    """Extension (docs/protocol.md §4): instead of ``register``, ask what register would
    meet, changing nothing. ``agent_id`` None asks what the credential admits; ``platform``
    and ``region`` None are not checked."""

    type: Literal["probe"]
    agent_id: AgentId | None = None
    platform: ShortStr | None = None
    region: ShortStr | None = None


AGENT_MESSAGE: TypeAdapter[Register | Heartbeat | Ack | Output | Result] = TypeAdapter(
    Annotated[Register | Heartbeat | Ack | Output | Result, Field(discriminator="type")]
)

_RESULT_STATUSES = frozenset(ResultStatus.__args__)  # type: ignore[attr-defined]


def _ident(value: object) -> bool:
    return type(value) is str and 0 < len(value) <= 128


def _optional_str(value: object, limit: int) -> bool:
    return value is None or (type(value) is str and len(value) <= limit)


def fast_reply(obj: dict[str, Any]) -> Ack | Result | None:
    """An ``ack`` or ``result`` as :data:`AGENT_MESSAGE` would validate it, checked by hand
    (a fleet's replies to one job are tens of thousands of messages a second), or None
    when the plain check does not vouch for it: then the full validation decides, and
    words its error. It accepts nothing the models refuse (tests/hub/test_codec.py)."""
    kind = obj.get("type")
    command_id = obj.get("command_id")
    if not _ident(command_id):
        return None
    if kind == "ack":
        return Ack.model_construct(type="ack", command_id=command_id)
    if kind != "result":
        return None
    status = obj.get("status")
    exit_code = obj.get("exit_code")
    error = obj.get("error")
    started_at = obj.get("started_at")
    finished_at = obj.get("finished_at")
    if (
        type(status) is not str
        or status not in _RESULT_STATUSES
        or not (exit_code is None or type(exit_code) is int)
        or not _optional_str(error, 8192)
        or not _optional_str(started_at, 64)
        or not _optional_str(finished_at, 64)
    ):
        return None
    return Result.model_construct(
        type="result",
        command_id=command_id,
        status=status,
        exit_code=exit_code,
        data=obj.get("data"),
        error=error,
        started_at=started_at,
        finished_at=finished_at,
    )


# -- Agent channel: hub to agent ----------------------------------------------------------


class Welcome(_Message):
    type: Literal["welcome"]
    hub_id: ShortStr
    session_id: Ident
    heartbeat_interval: Annotated[float, Field(gt=0)]
    server_time: Timestamp
    agent_key: str | None = None


class Command(_Message):
    type: Literal["command"]
    command_id: Ident
    name: ShortStr
    args: dict[str, Any] = {}
    timeout: Annotated[float, Field(gt=0, le=MAX_TIMEOUT)] = 60
    issued_at: Timestamp
    expires_at: Timestamp


class Cancel(_Message):
    type: Literal["cancel"]
    command_id: Ident


class Reconnect(_Message):
    type: Literal["reconnect"]
    after_ms: Annotated[int, Field(ge=0)] = 0
    reason: ShortStr = ""


class ErrorMessage(_Message):
    type: Literal["error"]
    code: ShortStr
    ref: Any = None
    message: str = ""


class ProbeCredential(_Message):
    """What the hub knows of the credential a probe presented (never its secret)."""

    kind: Literal["agent_key", "enrollment_key", "jwt", "certificate"]
    id: ShortStr | None = None
    #: The agent id it is bound to (agent key, JWT ``sub``, certificate).
    agent_id: ShortStr | None = None
    region: ShortStr | None = None
    platform: ShortStr | None = None
    #: Enrollment key: the ids it admits (a glob; None: any) and the uses left (None: no limit).
    pattern: ShortStr | None = None
    uses_left: int | None = None
    expires_at: Timestamp | None = None


class ProbeResult(_Message):
    """The hub's answer to :class:`Probe`; the hub then closes with 1000."""

    type: Literal["probe_result"]
    hub_id: ShortStr
    server_time: Timestamp
    heartbeat_interval: Annotated[float, Field(gt=0)]
    credential: ProbeCredential
    #: The id checked: the probe's, else the one the credential is bound to.
    agent_id: ShortStr | None = None
    #: Whether ``register`` with that id would be accepted now (None: no id to check).
    accepted: bool | None = None
    #: Why not, in the words the hub's refusal would use ('' when accepted).
    reason: Text = ""
    #: Registering would spend a use of the enrollment key (a new id for it).
    spends_use: bool = False
    #: The id has a live connection now: a ``register`` would supersede it (4001).
    connected: bool = False


HubToAgent = Welcome | Command | Cancel | Reconnect | ErrorMessage | ProbeResult
HUB_TO_AGENT: TypeAdapter[HubToAgent] = TypeAdapter(
    Annotated[HubToAgent, Field(discriminator="type")]
)

# -- Admin channel: requests --------------------------------------------------------------


class Selector(_Message):
    """Shell-style globs over registered agents; ``labels`` values may be globs too."""

    agent_id: Glob | None = None
    region: Glob | None = None
    platform: Glob | None = None
    labels: Annotated[dict[ShortStr, Glob], Field(max_length=64)] = {}
    status: Literal["online", "offline", "any"] = "any"


class Target(_Message):
    agent_ids: Annotated[list[AgentId], Field(min_length=1, max_length=100_000)] | None = None
    selector: Selector | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Target:
        if (self.agent_ids is None) == (self.selector is None):
            raise ValueError("target needs exactly one of agent_ids or selector")
        return self


class _Request(_Message):
    id: Ident | int


Limit = Annotated[int, Field(ge=1, le=1000)]
Filter = Annotated[dict[ShortStr, Any], Field(max_length=32)]


class Subscribe(_Request):
    type: Literal["subscribe"]
    topics: Annotated[list[Topic], Field(min_length=1, max_length=5)]


class PagedRequest(_Request):
    """A request for one page of stored objects, newest first (PROTOCOL §5)."""

    filter: Filter = {}
    limit: Limit = 100
    #: The opaque ``next`` cursor of an earlier page.
    before: Annotated[str, StringConstraints(max_length=256)] | None = None


class AgentsRequest(_Request):
    type: Literal["agents"]
    selector: Selector | None = None
    limit: Annotated[int, Field(ge=1, le=100_000)] | None = None


class AgentRequest(_Request):
    type: Literal["agent"]
    agent_id: AgentId


class Dispatch(_Request):
    type: Literal["dispatch"]
    target: Target
    name: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    args: dict[str, Any] = {}
    timeout: Annotated[float, Field(gt=0, le=MAX_TIMEOUT)] = 60
    ttl: Annotated[float, Field(gt=0, le=MAX_TTL)] = 600
    max_concurrency: Annotated[int, Field(ge=1)] | Percentage | None = None
    max_errors: Annotated[int, Field(ge=0)] | Percentage | None = None


class CancelRequest(_Request):
    type: Literal["cancel"]
    job_id: Ident | None = None
    command_id: Ident | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> CancelRequest:
        if (self.job_id is None) == (self.command_id is None):
            raise ValueError("cancel needs exactly one of job_id or command_id")
        return self


class JobRequest(_Request):
    type: Literal["job"]
    job_id: Ident


class CommandsRequest(PagedRequest):
    type: Literal["commands"]


class JobsRequest(PagedRequest):
    type: Literal["jobs"]


class OutputRequest(_Request):
    """Tether extension: the stored output chunks of one command."""

    type: Literal["output"]
    command_id: Ident


class AlertsRequest(PagedRequest):
    type: Literal["alerts"]


class AckAlert(_Request):
    type: Literal["ack_alert"]
    alert_id: Ident
    comment: Annotated[str, StringConstraints(max_length=1024)] | None = None


class MetricsHistoryRequest(_Request):
    """Extension (docs/protocol.md): the last hour of ticks, so graphs need not start empty."""

    type: Literal["metrics_history"]
    since: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None


class AuditRequest(PagedRequest):
    type: Literal["audit"]


AdminRequestType = (
    Subscribe
    | AgentsRequest
    | AgentRequest
    | Dispatch
    | CancelRequest
    | JobRequest
    | CommandsRequest
    | JobsRequest
    | OutputRequest
    | AlertsRequest
    | AckAlert
    | AuditRequest
    | MetricsHistoryRequest
)
ADMIN_REQUEST: TypeAdapter[AdminRequestType] = TypeAdapter(
    Annotated[AdminRequestType, Field(discriminator="type")]
)

# -- Admin channel: objects the hub reports -------------------------------------------------


class AgentView(_Message):
    agent_id: str
    platform: str = ""
    region: str = ""
    version: str = ""
    hostname: str = ""
    labels: dict[str, str] = {}
    capabilities: list[str] = []
    location: Location | None = None
    state: AgentState = "unknown"
    status: AgentStatus | None = None
    hub_id: str | None = None
    connected_at: str | None = None
    last_seen: str | None = None
    metrics: dict[str, float] = {}


class CommandResult(_Message):
    status: ResultStatus | Literal["expired"]
    exit_code: int | None = None
    data: Any = None
    error: str | None = None


class CommandView(_Message):
    command_id: str
    job_id: str
    agent_id: str
    name: str
    args: dict[str, Any] = {}
    state: CommandState
    issued_at: str
    expires_at: str
    updated_at: str
    dispatched_by: str | None = None
    result: CommandResult | None = None
    output_bytes: int = 0
    truncated: bool = False


class JobView(_Message):
    job_id: str
    name: str
    target: dict[str, Any]
    state: JobState
    counts: dict[str, int]
    total: int
    created_at: str
    dispatched_by: str | None = None


class AlertView(_Message):
    alert_id: str
    rule: str
    severity: Severity
    subject: str
    state: AlertState
    first_seen: str
    last_seen: str
    message: str
    acknowledged_by: str | None = None
    comment: str | None = None


# -- Admin channel: hub to admin ----------------------------------------------------------


class ReplyError(_Message):
    code: str
    message: str = ""


class Reply(_Message):
    type: Literal["reply"]
    id: Any = None
    ok: bool
    data: Any = None
    error: ReplyError | None = None


class Event(_Message):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["event"]
    topic: Topic
    kind: str


class Batch(_Message):
    type: Literal["batch"]
    events: list[Event]


class Resync(_Message):
    type: Literal["resync"]


class Snapshot(_Message):
    type: Literal["snapshot"]
    data: dict[str, Any]


HUB_TO_ADMIN: TypeAdapter[Reply | Event | Batch | Resync | Snapshot | ErrorMessage] = TypeAdapter(
    Annotated[Reply | Event | Batch | Resync | Snapshot | ErrorMessage, Field(discriminator="type")]
)


def describe_validation_error(exc: ValidationError, limit: int = 3) -> str:
    """A short, safe summary: field paths and reasons, never the offending input."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:limit]:
        location = ".".join(str(part) for part in error["loc"]) or "message"
        parts.append(f"{location}: {error['msg']}")
    more = len(exc.errors()) - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)
