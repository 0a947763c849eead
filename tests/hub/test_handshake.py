"""Authentication and admission before the upgrade (PROTOCOL §2)."""

from __future__ import annotations

import asyncio

from hub.protocol.constants import ADMIN_SUBPROTOCOL, AGENT_SUBPROTOCOL
from tests.conftest import HubHandle
from tests.support import RawAgent, online_agent, refused_status, wait_for


async def audit_actions(hub: HubHandle) -> list[dict]:
    await hub.hub.auditor.drain()
    page = await hub.hub.store.audit_entries({}, 1000, None)
    return page.items


async def test_no_credential_is_401_with_bearer_challenge(hub: HubHandle) -> None:
    status, (body, headers) = await refused_status(hub.agent_url, None)
    assert status == 401
    assert body == {"error": "unauthorized"}
    assert headers["WWW-Authenticate"] == "Bearer"


async def test_unknown_and_malformed_tokens_are_401(hub: HubHandle) -> None:
    for token in ("nonsense", "tta_000000000000_" + "x" * 43, "ttm_abc", "Bearer"):
        status, (body, _) = await refused_status(hub.agent_url, token)
        assert (status, body) == (401, {"error": "unauthorized"}), token


async def test_refusals_are_audited_and_counted(hub: HubHandle) -> None:
    await refused_status(hub.agent_url, "tta_000000000000_nope")
    entries = await audit_actions(hub)
    refused = [e for e in entries if e["action"] == "connection.refused"]
    assert refused and refused[0]["source"] == "127.0.0.1"
    assert refused[0]["detail"]["error"] == "unauthorized"
    assert "nope" not in str(refused[0])  # never the secret
    assert hub.hub.metrics.connections["unauthorized"] == 1


async def test_agent_key_on_admin_channel_is_403(hub: HubHandle) -> None:
    token = await hub.agent_token("edge-1")
    status, (body, _) = await refused_status(hub.admin_url, token)
    assert (status, body) == (403, {"error": "forbidden"})


async def test_admin_token_on_agent_channel_is_403(hub: HubHandle) -> None:
    token = await hub.admin_token()
    status, (body, _) = await refused_status(hub.agent_url, token)
    assert (status, body) == (403, {"error": "forbidden"})


async def test_revoked_token_is_403(hub: HubHandle) -> None:
    token = await hub.agent_token("edge-1")
    credential_id = token[4:16]
    await hub.hub.store.revoke_credential(credential_id)
    await hub.hub.credentials.sync()
    status, (body, _) = await refused_status(hub.agent_url, token)
    assert (status, body) == (403, {"error": "forbidden"})


async def test_expired_enrollment_key_is_401(hub: HubHandle) -> None:
    token = await hub.token("enroll", ttl=0.05)
    await asyncio.sleep(0.1)  # let the key's own expiry pass (the behaviour under test)
    status, (body, _) = await refused_status(hub.agent_url, token)
    assert (status, body) == (401, {"error": "unauthorized"})


async def test_unknown_only_subprotocols_are_400(hub: HubHandle) -> None:
    token = await hub.agent_token("edge-1")
    status, (body, _) = await refused_status(hub.agent_url, token, subprotocols=["tether.agent.v9"])
    assert (status, body) == (400, {"error": "unsupported_subprotocol"})


async def test_subprotocol_negotiated_or_absent(hub: HubHandle) -> None:
    token = await hub.agent_token("edge-1")
    agent = await RawAgent.connect(hub.agent_url, token, subprotocols=["x", AGENT_SUBPROTOCOL])
    assert agent.ws.subprotocol == AGENT_SUBPROTOCOL
    await agent.close()
    agent = await RawAgent.connect(hub.agent_url, token)
    assert agent.ws.subprotocol is None
    await agent.register("edge-1")
    await agent.close()
    admin = await RawAgent.connect(
        hub.admin_url, await hub.admin_token(), subprotocols=[ADMIN_SUBPROTOCOL]
    )
    assert admin.ws.subprotocol == ADMIN_SUBPROTOCOL
    await admin.close()


async def test_origin_refused_unless_allowed(hub_factory) -> None:
    hub = await hub_factory(allowed_origins=["https://console.example"])
    token = await hub.admin_token()
    status, (body, _) = await refused_status(
        hub.admin_url, token, headers={"Origin": "https://evil.example"}
    )
    assert (status, body) == (403, {"error": "origin_not_allowed"})
    admin = await RawAgent.connect(
        hub.admin_url, token, headers={"Origin": "https://console.example"}
    )
    await admin.close()
    # No Origin at all is fine: desktop and CLI clients send none.
    admin = await RawAgent.connect(hub.admin_url, token)
    await admin.close()


async def test_origin_checked_before_credentials(hub: HubHandle) -> None:
    status, (body, _) = await refused_status(
        hub.agent_url, None, headers={"Origin": "https://evil.example"}
    )
    assert (status, body) == (403, {"error": "origin_not_allowed"})


async def test_failed_auth_cooloff_is_429_for_that_source_only(hub_factory) -> None:
    hub = await hub_factory(auth_failure_limit=3, auth_cooloff=30)
    for _ in range(3):
        status, _ = await refused_status(hub.agent_url, "tta_000000000000_bad")
        assert status == 401
    status, (body, headers) = await refused_status(hub.agent_url, "tta_000000000000_bad")
    assert (status, body) == (429, {"error": "rate_limited"})
    assert 1 <= int(headers["Retry-After"]) <= 30
    # A valid credential from the same address is never refused for its address.
    token = await hub.agent_token("edge-1")
    agent = await RawAgent.connect(hub.agent_url, token)
    await agent.register("edge-1")
    await agent.close()
    # Another source address is not cooled off.
    status, _ = await refused_status(
        hub.agent_url, "tta_000000000000_bad", local_addr=("127.0.0.2", 0)
    )
    assert status == 401


async def test_agent_limit_is_503_with_retry_after(hub_factory) -> None:
    hub = await hub_factory(max_agents=1)
    first = await online_agent(hub, "edge-1")
    status, (body, headers) = await refused_status(hub.agent_url, await hub.agent_token("edge-2"))
    assert (status, body) == (503, {"error": "overloaded"})
    assert int(headers["Retry-After"]) >= 1
    # A takeover of a connected id is allowed at the limit.
    token = await hub.agent_token("edge-1")
    second = await RawAgent.connect(hub.agent_url, token)
    await second.register("edge-1")
    assert await first.closed() == 4001
    await second.close()


async def test_admin_connections_are_limited_in_all_and_per_token(hub_factory) -> None:
    hub = await hub_factory(max_admin_connections=3, max_admin_per_credential=2)
    viewer = await hub.admin_token("viewer")
    held = [await RawAgent.connect(hub.admin_url, viewer) for _ in range(2)]
    await wait_for(lambda: len(hub.hub.admins) == 2)
    # A third connection of one token is refused as an admission refusal...
    before = hub.hub.metrics.connections["overloaded"]
    status, (body, headers) = await refused_status(hub.admin_url, viewer)
    assert (status, body) == (503, {"error": "overloaded"})
    assert 1 <= int(headers["Retry-After"]) <= 10
    assert hub.hub.metrics.connections["overloaded"] == before + 1
    # ...while another token gets in, up to the hub's own limit.
    other = await RawAgent.connect(hub.admin_url, await hub.admin_token("operator"))
    status, (body, _) = await refused_status(hub.admin_url, await hub.admin_token("admin"))
    assert (status, body) == (503, {"error": "overloaded"})
    reasons = [
        e["detail"]["reason"]
        for e in await audit_actions(hub)
        if e["action"] == "connection.refused"
    ]
    assert sorted(reasons) == [
        "admin connection limit",
        "admin connection limit of this credential",
    ]
    # Agents do not count against it; a closed admin connection frees its place.
    agent = await online_agent(hub, "edge-1")
    await held[0].close()
    await wait_for(lambda: len(hub.hub.admins) == 2)
    again = await RawAgent.connect(hub.admin_url, viewer)
    await wait_for(lambda: len(hub.hub.admins) == 3)
    for conn in (held[1], other, again, agent):
        await conn.close()


async def test_token_created_by_the_cli_while_running_works_at_once(hub: HubHandle) -> None:
    # Written straight to the store, as `tether-hub token create` in another process does.
    record, token = hub.hub.credentials.make("agent", agent_id="edge-9")
    await hub.hub.store.add_credential(record)
    agent = await RawAgent.connect(hub.agent_url, token)
    welcome = await agent.register("edge-9")
    assert welcome["type"] == "welcome"
    await agent.close()


async def test_revocation_closes_live_connections_with_4003(hub: HubHandle) -> None:
    token = await hub.agent_token("edge-1")
    agent = await RawAgent.connect(hub.agent_url, token)
    await agent.register("edge-1")
    admin_token = await hub.admin_token("viewer")
    admin = await RawAgent.connect(hub.admin_url, admin_token)
    # Revoked through the store, as `tether-hub token revoke` does from another process.
    await hub.hub.store.revoke_credential(token[4:16])
    await hub.hub.store.revoke_credential(admin_token[4:16])
    assert await agent.closed(timeout=6) == 4003
    assert await admin.closed(timeout=6) == 4003
    await wait_for(lambda: not hub.hub.registry.live, what="agent gone")
