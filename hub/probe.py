"""The agent-channel probe: what would ``register`` meet, without registering?

``tether-agent doctor`` must diagnose without changing the fleet: no takeover of a live
connection, no enrollment use spent, no key issued, no agent created. So instead of
``register`` its first message is ``probe`` (docs/protocol.md §4, an additive extension).
The connection was authenticated exactly as a real one (same handshake checks, same
refusals); this module answers, from the hub's in-memory state and without writing
anything, what register would check: the binding of the credential (agent id, region,
platform), its revocation, an enrollment key's pattern and uses left, the agent limit.

Pure: it reads the credentials and the registry and returns the answer; the session audits
it (``agent.probe``), sends it and closes with 1000.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Protocol

from .auth import Credentials, Principal
from .model import AgentRecord
from .protocol.messages import Probe, ProbeCredential, ProbeResult
from .protocol.times import format_instant, format_time

__all__ = ["answer_probe", "identity_problem", "probe_audit"]

_KINDS = {"agent": "agent_key", "enroll": "enrollment_key", "jwt": "jwt", "cert": "certificate"}


def identity_problem(
    principal: Principal,
    agent_id: str,
    region: str | None,
    platform: str | None,
    credentials: Credentials,
    records: Mapping[str, AgentRecord],
) -> str:
    """Why ``register`` of ``agent_id`` would be refused (close 1008), '' when it would not.

    One definition for ``register`` (:meth:`hub.fleet.Fleet.identity_problem`) and the probe;
    ``region``/``platform`` None are not checked (a probe that did not say).
    """
    if principal.agent_id is not None and principal.agent_id != agent_id:
        return "the credential is bound to another agent id"
    if region is not None and principal.region is not None and principal.region != region:
        return "the credential is bound to another region"
    if platform is not None and principal.platform is not None and principal.platform != platform:
        return "the credential is bound to another platform"
    if credentials.is_revoked(principal.credential_id):
        return "the credential was revoked"
    if principal.kind == "enroll":
        record = records.get(agent_id)
        return credentials.check_enrollment(
            principal, agent_id, record.enrolled_by if record else None
        )
    return ""


class RegistryView(Protocol):
    """What the probe reads of the registry: every known agent, and the connected ones."""

    records: Mapping[str, AgentRecord]
    live: Mapping[str, Any]


def answer_probe(
    principal: Principal,
    probe: Probe,
    credentials: Credentials,
    registry: RegistryView,
    max_agents: int,
    hub_id: str,
    heartbeat_interval: float,
    now: float | None = None,
) -> ProbeResult:
    """The answer to ``probe`` from a connection authenticated as ``principal``."""
    records, live = registry.records, registry.live
    stored = credentials.records.get(principal.credential_id or "")
    credential = ProbeCredential(
        kind=_KINDS.get(principal.kind, "agent_key"),  # type: ignore[arg-type]
        id=principal.credential_id,
        agent_id=principal.agent_id,
        region=principal.region,
        platform=principal.platform,
        pattern=principal.pattern if principal.kind == "enroll" else None,
        uses_left=stored.uses_left if stored is not None and principal.kind == "enroll" else None,
        expires_at=(
            format_instant(stored.expires_at)
            if stored is not None and stored.expires_at is not None
            else None
        ),
    )
    agent_id = probe.agent_id or principal.agent_id
    accepted: bool | None = None
    reason = ""
    spends_use = False
    if agent_id is None:
        # An enrollment key and no id: say whether it admits any new id at all.
        if stored is not None and stored.uses_left is not None and stored.uses_left <= 0:
            reason = "enrollment key exhausted (it readmits only the ids it enrolled)"
        elif credentials.is_revoked(principal.credential_id):
            reason = "the credential was revoked"
    else:
        reason = identity_problem(
            principal, agent_id, probe.region, probe.platform, credentials, records
        )
        if not reason and agent_id not in live and len(live) >= max_agents:
            reason = "hub at its agent limit"  # register: close 1013
        accepted = not reason
        if principal.kind == "enroll":
            record = records.get(agent_id)
            spends_use = record is None or record.enrolled_by != principal.credential_id
    return ProbeResult(
        type="probe_result",
        hub_id=hub_id,
        server_time=format_time(time.time() if now is None else now),
        heartbeat_interval=heartbeat_interval,
        credential=credential,
        agent_id=agent_id,
        accepted=accepted,
        reason=reason,
        spends_use=spends_use and bool(accepted),
        connected=agent_id is not None and agent_id in live,
    )


def probe_audit(answer: ProbeResult) -> dict[str, Any]:
    """The ``agent.probe`` audit entry's fields (besides actor and source)."""
    return {"subject": answer.agent_id, "accepted": answer.accepted, "reason": answer.reason}
