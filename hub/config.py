"""Hub configuration: documented defaults, a TOML file, environment variables, flags.

Precedence is flags > environment > file > defaults. Every field below is a key of the
TOML file (``[hub]`` table or top level) and is documented in ``docs/operations.md``.
"""

from __future__ import annotations

import os
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .protocol.listening import parse_listen as parse_listen

__all__ = ["ENVIRONMENT", "HubConfig", "load_config", "parse_listen"]


class HubConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Where and who
    listen: str = "127.0.0.1:8765"
    data_dir: Path = Path("./tether-data")
    hub_id: str = Field(default_factory=lambda: f"hub-{socket.gethostname()}"[:128])
    redis_url: str | None = None
    #: Cluster mode: the prefix of every Redis key (several clusters may share a Redis).
    redis_prefix: str = Field(default="tether", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    #: Longest any Redis call may take before Redis counts as down.
    redis_timeout: float = Field(default=1.0, gt=0)
    #: A hub's lease (and the leadership) lapse this long after the last renewal; each is
    #: renewed every ``cluster_lease_interval``.
    cluster_lease_ttl: float = Field(default=5.0, gt=0)
    cluster_lease_interval: float = Field(default=1.0, gt=0)
    #: Listen with SO_REUSEPORT (set for the worker processes of ``serve --workers N``).
    reuse_port: bool = False

    # TLS and credentials
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    #: PEM certificate revocation list(s) of the client CA: a revoked certificate fails TLS.
    client_crl: Path | None = None
    require_client_cert: bool = False
    jwt_key: Path | None = None
    jwt_secret_file: Path | None = None
    jwt_algorithms: list[str] | None = None
    jwt_leeway: float = 30.0
    allowed_origins: list[str] = []

    # Admission control
    max_agents: int = Field(default=50_000, ge=0)
    max_handshakes_per_second: float = Field(default=2_000.0, gt=0)
    #: Connections that have not had their HTTP request handled. At the cap a newcomer takes
    #: the place of the oldest half-open connection of the source holding the most (hub/gate.py).
    max_pending_handshakes: int = Field(default=2_000, ge=1)
    #: Of those, how many one source address may hold; 0: no limit of its own (the fair
    #: share at the cap already keeps a few addresses from holding the door).
    max_pending_per_source: int = Field(default=0, ge=0)
    #: Time to send the HTTP request while at most half the pending places are taken (and
    #: the bound of a TLS handshake, which asyncio completes before the gate sees it)...
    open_timeout: float = Field(default=10.0, gt=0)
    #: ...shrinking to this at the cap.
    open_timeout_min: float = Field(default=2.0, gt=0)
    auth_failure_limit: int = Field(default=10, ge=1)
    auth_failure_window: float = Field(default=60.0, gt=0)
    auth_cooloff: float = Field(default=60.0, gt=0)
    overload_retry_after: int = Field(default=5, ge=1)
    #: A hub behind by more than this — a new connection waited this long in the kernel's
    #: accept queue, or the event loop runs this late — answers it 503 + Retry-After at once
    #: instead of a handshake the agent gives up on (hub/gate.py): the agent's open timeout
    #: (10 s) less the time a hub takes to answer once it reads a request. Lower refuses
    #: agents that would have made it (2 s doubled a 19,000-agent storm); 0: never.
    max_queue_delay: float = Field(default=8.0, ge=0)

    # Agents
    heartbeat_interval: float = Field(default=15.0, gt=0)
    register_timeout: float = Field(default=10.0, gt=0)
    agent_message_rate: float = Field(default=200.0, gt=0)
    agent_message_burst: float = Field(default=2_000.0, gt=0)
    #: Control frames and fragments a second per connection (agents and admins), with a
    #: burst; past it the connection is closed 1008 (a legitimate peer pings every ~20 s).
    frame_rate: float = Field(default=50.0, gt=0)
    frame_burst: float = Field(default=500.0, ge=1)
    agent_write_buffer: int = Field(default=4 * 1024 * 1024, ge=64 * 1024)
    reconnect_spread_ms: int = Field(default=10_000, ge=0)

    # Admin clients
    admin_ping_interval: float = Field(default=20.0, ge=0)
    admin_ping_timeout: float = Field(default=20.0, gt=0)
    admin_write_buffer: int = Field(default=64 * 1024 * 1024, ge=1024 * 1024)
    subscriber_max_events: int = Field(default=10_000, ge=10)
    subscriber_max_bytes: int = Field(default=8 * 1024 * 1024, ge=64 * 1024)
    admin_compression: bool = True
    #: Admin connections open at once, in all and per admin token: each may hold megabytes
    #: of queued events and snapshots, so a leaked viewer token must not open thousands.
    max_admin_connections: int = Field(default=256, ge=1)
    max_admin_per_credential: int = Field(default=32, ge=1)

    # Store: "full" fsyncs every commit (survives power loss); "normal" survives a crash of
    # the hub process (kill -9) but not of the machine, and commits ~10x faster.
    store_synchronous: Literal["full", "normal"] = "full"

    # Ledger
    default_timeout: float = 60.0
    default_ttl: float = 600.0
    output_cap: int = Field(default=1024 * 1024, ge=0)
    timeout_grace: float = 5.0

    # Housekeeping
    heartbeat_flush_interval: float = Field(default=5.0, gt=0)
    heartbeat_sample_interval: float = Field(default=60.0, gt=0)
    heartbeat_retention: float = Field(default=24 * 3600.0, gt=0)
    # Retention (seconds; 0 keeps forever), enforced every ``prune_interval`` in small
    # batches on the store's writer thread (docs/operations.md, "Retention").
    #: Output of commands of finished jobs, from the job's end.
    output_retention: float = Field(default=7 * 86400.0, ge=0)
    #: Finished jobs and their commands, from the job's end.
    command_retention: float = Field(default=30 * 86400.0, ge=0)
    #: Ended agent sessions.
    session_retention: float = Field(default=30 * 86400.0, ge=0)
    #: Resolved alerts.
    alert_retention: float = Field(default=90 * 86400.0, ge=0)
    audit_retention: float = Field(default=365 * 86400.0, ge=0)
    #: Audit entries are appended to this file as JSON lines before they are pruned.
    audit_export: Path | None = None
    prune_interval: float = Field(default=3600.0, gt=0)
    credential_sync_interval: float = Field(default=1.0, gt=0)
    shutdown_timeout: float = Field(default=5.0, gt=0)
    #: Long-lived objects move out of the garbage collector's sight this often (0: never),
    #: so that a full collection does not stall the loop for every agent's objects.
    gc_freeze_interval: float = Field(default=1.0, ge=0)
    #: A full collection of everything, to reclaim cycles that were frozen (0: never).
    gc_full_interval: float = Field(default=3600.0, ge=0)

    # Alerts (PROTOCOL §6)
    alert_interval: float = Field(default=1.0, gt=0)
    alert_expected_agents: int = Field(default=1, ge=0)
    alert_connection_failures_per_min: int = Field(default=60, ge=1)
    alert_offline_grace: float = Field(default=120.0, ge=0)
    alert_flapping_reconnects: int = Field(default=5, ge=2)
    alert_flapping_window: float = Field(default=600.0, gt=0)
    alert_conflict_takeovers: int = Field(default=3, ge=2)
    alert_conflict_window: float = Field(default=600.0, gt=0)
    alert_mass_disconnect_count: int = Field(default=10, ge=2)
    alert_mass_disconnect_share: float = Field(default=0.3, gt=0, le=1)
    alert_mass_disconnect_window: float = Field(default=60.0, gt=0)
    alert_capacity_share: float = Field(default=0.9, gt=0, le=1)
    alert_hub_down_after: float = Field(default=30.0, gt=0)
    #: ``handshake_flood``: the gate has been shedding at its pending cap this long.
    alert_handshake_flood_after: float = Field(default=60.0, gt=0)

    #: Time one turn of the event loop spends on incoming bytes before the rest waits for
    #: the next turn (0: no bound). Keeps timers on time when thousands answer at once.
    read_budget_ms: float = Field(default=10.0, ge=0)

    # Logging
    #: Log the event loop's stack when it stalls longer than this (0: off; a diagnostic).
    stall_report_ms: float = Field(default=0.0, ge=0)
    log_level: str = "INFO"
    log_json: bool = False


#: Environment variables and the fields they set.
ENVIRONMENT = {
    "TETHER_LISTEN": "listen",
    "TETHER_DATA_DIR": "data_dir",
    "TETHER_REDIS_URL": "redis_url",
    "TETHER_HUB_ID": "hub_id",
    "TETHER_TLS_CERT": "tls_cert",
    "TETHER_TLS_KEY": "tls_key",
    "TETHER_CLIENT_CA": "client_ca",
    "TETHER_CLIENT_CRL": "client_crl",
    "TETHER_JWT_KEY": "jwt_key",
    "TETHER_JWT_SECRET_FILE": "jwt_secret_file",
    "TETHER_ALLOWED_ORIGINS": "allowed_origins",
    "TETHER_MAX_AGENTS": "max_agents",
    "TETHER_LOG_LEVEL": "log_level",
    "TETHER_REUSE_PORT": "reuse_port",
}


def load_config(
    file: str | os.PathLike[str] | None = None,
    flags: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> HubConfig:
    """Merge defaults, the TOML file, the environment and flags (``None`` flags are unset)."""
    values: dict[str, Any] = {}
    if file is not None:
        with open(file, "rb") as handle:
            document = tomllib.load(handle)
        values.update(document.get("hub", document))
    environ = os.environ if environ is None else environ
    for variable, name in ENVIRONMENT.items():
        raw = environ.get(variable)
        if raw:
            values[name] = (
                [v.strip() for v in raw.split(",") if v.strip()]
                if (name == "allowed_origins")
                else raw
            )
    for name, value in (flags or {}).items():
        if value is not None and value != []:
            values[name] = value
    return HubConfig(**values)
