"""A glob means the same agents in the console's filter, its dispatch preview and the hub's
selectors (PROTOCOL §5: shell-style, case-sensitive, whole values). Asked of a real hub."""

from __future__ import annotations

import pytest

from console.fleet import Agent, FleetModel
from console.views.agents import AgentFilter
from console.views.dispatch import agents_matching
from hub.protocol.client import AdminClient
from hub.protocol.messages import AgentView, Selector
from tests.conftest import HubHandle
from tests.support import RawAgent

FLEET = {
    "edge-berlin-1": {"region": "eu-central", "labels": {"site": "berlin"}},
    "edge-berlin-2": {"region": "eu-central-2", "labels": {"site": "Berlin"}},
    "edge-paris-1": {"region": "EU-west", "labels": {"site": "paris"}},
    "edge-x": {"region": "xeu-1", "labels": {}},
    "edge-bare": {"region": "eu-", "labels": {"site": "ber"}},
    "Core-1": {"region": "", "labels": {}},
}
CASES = [
    ("region:eu-*", {"region": "eu-*"}),
    ("region:*eu*", {"region": "*eu*"}),
    ("region:eu-central*", {"region": "eu-central*"}),
    ("region:EU-*", {"region": "EU-*"}),
    ("region:eu-?", {"region": "eu-?"}),
    ("id:edge-*", {"agent_id": "edge-*"}),
    ("id:[Cc]ore-*", {"agent_id": "[Cc]ore-*"}),
    ("site:ber*", {"labels": {"site": "ber*"}}),
    ("site:[Bb]erlin", {"labels": {"site": "[Bb]erlin"}}),
    ("region:eu-* site:ber*", {"region": "eu-*", "labels": {"site": "ber*"}}),
]


@pytest.mark.parametrize(("console", "selector"), CASES)
async def test_a_glob_selects_the_same_agents_in_the_console_and_the_hub(
    hub: HubHandle, console: str, selector: dict
) -> None:
    enroll = await hub.token("enroll")
    agents = []
    for agent_id, fields in FLEET.items():
        agent = await RawAgent.connect(hub.agent_url, enroll)
        await agent.register(agent_id, **fields)
        agents.append(agent)
    admin = await AdminClient(hub.url, await hub.admin_token("viewer")).open()
    try:
        everyone = (await admin.request("agents"))["agents"]
        chosen = (await admin.request("agents", selector=selector))["agents"]
    finally:
        await admin.close()
        for agent in agents:
            await agent.close()
    by_hub = {a["agent_id"] for a in chosen}
    console_agents = [Agent(AgentView.model_validate(view)) for view in everyone]
    by_filter = {a.agent_id for a in console_agents if AgentFilter(console)(a)}
    assert by_filter == by_hub

    model = FleetModel()
    model.apply_snapshot({"agents": everyone})
    preview = {a.agent_id for a in agents_matching(model, Selector.model_validate(selector))}
    assert preview == by_hub
