"""Each alert rule raised and resolved by real connection churn of real connections (§6)."""

from __future__ import annotations

import asyncio

import pytest

from hub.protocol.client import AdminClient, AdminError
from tests.conftest import HubHandle
from tests.support import RawAgent, refused_status, wait_for


def firing(hub: HubHandle, rule: str, subject: str | None = None) -> bool:
    hub.hub.alerts.evaluate()
    return any(
        key[0] == rule and (subject is None or key[1] == subject) for key in hub.hub.alerts.open
    )


async def connect(hub: HubHandle, agent_id: str, enroll: str, **fields) -> RawAgent:
    agent = await RawAgent.connect(hub.agent_url, enroll)
    await agent.register(agent_id, **fields)
    return agent


async def test_no_agents_raised_and_resolved(hub_factory) -> None:
    hub = await hub_factory(alert_expected_agents=1)
    enroll = await hub.token("enroll")
    agent = await connect(hub, "edge-1", enroll)
    assert not firing(hub, "no_agents")
    await agent.close()
    await wait_for(lambda: firing(hub, "no_agents"), what="no_agents raised")
    agent = await connect(hub, "edge-1", enroll)
    await wait_for(lambda: not firing(hub, "no_agents"), what="no_agents resolved")
    await agent.close()


async def test_agent_offline_after_grace_then_resolved(hub_factory) -> None:
    hub = await hub_factory(alert_offline_grace=0.3, alert_expected_agents=0)
    enroll = await hub.token("enroll")
    keep = await connect(hub, "edge-0", enroll)
    agent = await connect(hub, "edge-1", enroll)
    await agent.close()
    await wait_for(lambda: firing(hub, "agent_offline", "edge-1"), what="agent_offline")
    agent = await connect(hub, "edge-1", enroll)
    await wait_for(lambda: not firing(hub, "agent_offline", "edge-1"), what="resolved")
    await agent.close()
    await keep.close()


async def test_flapping_agent(hub_factory) -> None:
    hub = await hub_factory(alert_flapping_reconnects=3, alert_expected_agents=0)
    enroll = await hub.token("enroll")
    for _ in range(4):
        agent = await connect(hub, "edge-1", enroll)
        await agent.close()
        await wait_for(lambda: "edge-1" not in hub.hub.registry.live)
    assert firing(hub, "agent_flapping", "edge-1")


async def test_mass_disconnect_is_one_alert_for_the_region(hub_factory) -> None:
    hub = await hub_factory(
        alert_offline_grace=0.2,
        alert_mass_disconnect_count=5,
        alert_mass_disconnect_share=0.3,
        alert_expected_agents=0,
    )
    enroll = await hub.token("enroll")
    berlin = [await connect(hub, f"ber-{n}", enroll, region="eu-central") for n in range(10)]
    ohio = [await connect(hub, f"ohio-{n}", enroll, region="us-east") for n in range(3)]
    for agent in berlin[:8]:
        await agent.close()
    await wait_for(lambda: firing(hub, "mass_disconnect", "eu-central"), what="mass_disconnect")
    await asyncio.sleep(0.3)  # past the per-agent grace: none of them may raise on its own
    assert not firing(hub, "agent_offline")
    rules = [key for key in hub.hub.alerts.open if key[0] == "mass_disconnect"]
    assert rules == [("mass_disconnect", "eu-central")]
    for n in range(8):
        berlin[n] = await connect(hub, f"ber-{n}", enroll, region="eu-central")
    hub.hub.config.alert_mass_disconnect_window = 0.1  # let the window pass quickly
    await wait_for(lambda: not firing(hub, "mass_disconnect", "eu-central"), what="resolved")
    for agent in berlin + ohio:
        await agent.close()


async def test_capacity(hub_factory) -> None:
    hub = await hub_factory(max_agents=4, alert_capacity_share=0.5, alert_expected_agents=0)
    enroll = await hub.token("enroll")
    first = await connect(hub, "edge-1", enroll)
    assert not firing(hub, "capacity")
    second = await connect(hub, "edge-2", enroll)
    assert firing(hub, "capacity")
    await second.close()
    await wait_for(lambda: not firing(hub, "capacity"))
    await first.close()


async def test_connection_failures(hub_factory) -> None:
    hub = await hub_factory(alert_connection_failures_per_min=3, alert_expected_agents=0)
    for _ in range(4):
        await refused_status(hub.agent_url, "tta_000000000000_wrong")
    assert firing(hub, "connection_failures")


async def test_acknowledge_with_comment_and_history(hub_factory) -> None:
    hub = await hub_factory(alert_expected_agents=1)
    enroll = await hub.token("enroll")
    agent = await connect(hub, "edge-1", enroll)
    await agent.close()
    await wait_for(lambda: firing(hub, "no_agents"))
    viewer = await AdminClient(hub.url, await hub.admin_token("viewer")).open()
    operator = await AdminClient(hub.url, await hub.admin_token("operator")).open()
    snapshot = await operator.request("subscribe", topics=["alerts"])
    await wait_for(lambda: hub.hub.alerts._writes == set())
    (alert,) = [a for a in (await operator.request("alerts"))["alerts"] if a["rule"] == "no_agents"]
    with pytest.raises(AdminError) as error:
        await viewer.request("ack_alert", alert_id=alert["alert_id"])
    assert error.value.code == "forbidden"
    acked = await operator.request("ack_alert", alert_id=alert["alert_id"], comment="on it")
    assert acked["alert"]["state"] == "acknowledged"
    assert acked["alert"]["acknowledged_by"] == "admin:test-operator"
    assert acked["alert"]["comment"] == "on it"
    agent = await connect(hub, "edge-1", enroll)
    await wait_for(lambda: not firing(hub, "no_agents"))
    # Events coalesce per alert: the latest state (resolved) keeps who acknowledged it.
    events = operator.events()
    async with asyncio.timeout(5):
        while (event := await anext(events))["kind"] != "resolved":
            pass
    assert event["alert"]["acknowledged_by"] == "admin:test-operator"
    history = (await operator.request("alerts", filter={"state": "resolved"}))["alerts"]
    assert history[0]["alert_id"] == alert["alert_id"]
    assert history[0]["comment"] == "on it"
    assert isinstance(snapshot["alerts"], list)
    await agent.close()
    await viewer.close()
    await operator.close()
