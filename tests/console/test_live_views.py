"""The console against a real hub and real agents: what the hub says is what the views show."""

from __future__ import annotations

import asyncio
import time

import numpy as np
from PySide6.QtCore import QPoint, Qt

from console.views.agents import COL_REGION, COL_STATUS
from console.views.common import plain_tooltip
from tests.conftest import HubHandle

from .helpers import online_agent, wait_for

BERLIN = {"lat": 52.52, "lon": 13.40}
TOKYO = {"lat": 35.68, "lon": 139.69}


async def test_counts_rows_map_and_topology_follow_the_hub(hub: HubHandle, window_factory, qtbot):
    a1 = await online_agent(hub, "edge-berlin-1", region="eu-central", location=BERLIN)
    a2 = await online_agent(hub, "edge-berlin-2", region="eu-central", location=BERLIN)
    a3 = await online_agent(hub, "edge-tokyo-1", region="ap-northeast", location=TOKYO)
    window = await window_factory(hub, "viewer")
    fleet = window.fleet
    assert fleet.total == 3
    assert fleet.counts["online"] == 3
    assert len(window.agent_model.rows) == 3
    assert sorted(window.map.ids) == ["edge-berlin-1", "edge-berlin-2", "edge-tokyo-1"]
    assert "online 3" in window.counts_label.text()
    assert "connected" in window.indicator.text()

    # A new agent appears, one goes away: every view follows, in batches.
    a4 = await online_agent(hub, "edge-nyc-1", region="us-east")
    await a3.close()
    await wait_for(lambda: fleet.counts["offline"] == 1 and fleet.total == 4, what="events")
    await wait_for(lambda: len(window.agent_model.rows) == 4, what="table rows")
    assert len(window.map.ids) == 4
    assert window.map.rank[window.map.index["edge-tokyo-1"]] == 4  # offline is the worst rank
    row = window.agent_model.row_of["edge-tokyo-1"]
    status = window.agent_model.index(row, COL_STATUS)
    assert window.agent_model.data(status) == "offline"

    # An agent that reports degraded is shown as degraded (shape and colour).
    await a1.send({"type": "heartbeat", "status": "degraded", "metrics": {"cpu_percent": 97}})
    await wait_for(lambda: fleet.agents["edge-berlin-1"].condition == "degraded", what="degraded")

    # Topology: one hub, three regions, counts and worst state per node. Its counts follow
    # the model's batches: hand over the pending one before reading them.
    fleet.flush()
    window.topology.refresh()
    hub_item = window.topology.hub_items[hub.hub.hub_id]
    assert hub_item.text(1) == "4"
    regions = {key[1]: item for key, item in window.topology.region_items.items()}
    assert set(regions) == {"eu-central", "ap-northeast", "us-east"}
    assert regions["eu-central"].text(1) == "2"
    worst = window.topology.tree.columnCount() - 1
    assert regions["ap-northeast"].text(worst) == "offline"
    assert regions["eu-central"].text(worst) == "degraded"
    # Drill in: the node's agents are listed beside the tree.
    window.topology.tree.setCurrentItem(regions["eu-central"])
    assert sorted(window.topology.drill_model.rows) == ["edge-berlin-1", "edge-berlin-2"]

    # The map paints: worst state is what a cluster shows; painting happened.
    window.map.fit()
    window.map.repaint()
    assert window.map.paint_count > 0
    for agent in (a1, a2, a4):
        await agent.close()


async def test_filter_sort_and_select_from_the_map(hub: HubHandle, window_factory, qtbot):
    agents = [
        await online_agent(hub, "edge-berlin-1", region="eu-central", platform="linux",
                           version="1.4.0", labels={"site": "berlin"}, location=BERLIN),
        await online_agent(hub, "edge-berlin-2", region="eu-central", platform="windows",
                           version="1.3.2", labels={"site": "berlin"}, location=BERLIN),
        await online_agent(hub, "edge-paris-1", region="eu-west", platform="linux",
                           version="1.4.1", labels={"site": "paris"}, hostname="paris-gw"),
        await online_agent(hub, "edge-tokyo-1", region="ap-northeast", platform="linux",
                           version="1.2.0", labels={"site": "tokyo"}, location=TOKYO),
    ]  # fmt: skip
    await agents[3].close()
    window = await window_factory(hub, "viewer")
    await wait_for(lambda: window.fleet.counts["offline"] == 1, what="tokyo offline")
    model = window.agent_model

    async def rows_for(text: str) -> list[str]:
        window.search.setText(text)
        await wait_for(lambda: model.filter.text == text.strip(), 3, what=f"filter {text!r}")
        return sorted(model.rows)

    assert await rows_for("region:eu-*") == ["edge-berlin-1", "edge-berlin-2", "edge-paris-1"]
    assert await rows_for("status:offline") == ["edge-tokyo-1"]
    assert await rows_for("label:site=berlin") == ["edge-berlin-1", "edge-berlin-2"]
    assert await rows_for("site:paris") == ["edge-paris-1"]
    assert await rows_for("platform:windows") == ["edge-berlin-2"]
    assert await rows_for("version:1.4") == ["edge-berlin-1", "edge-paris-1"]
    assert await rows_for("-region:eu-*") == ["edge-tokyo-1"]
    assert await rows_for("status:offline status:online region:eu-w*") == ["edge-paris-1"]
    assert await rows_for("paris-gw") == ["edge-paris-1"]
    assert await rows_for("region:=eu") == []
    assert "1 of 4 match" in window.match_label.text() or model.rows == []
    assert len(await rows_for("")) == 4

    # Sort: clicking a header sorts in the model itself.
    window.table.sortByColumn(COL_REGION, Qt.SortOrder.DescendingOrder)
    regions = [window.fleet.agents[i].view.region for i in model.rows]
    assert regions == sorted(regions, reverse=True)
    window.table.sortByColumn(COL_STATUS, Qt.SortOrder.DescendingOrder)
    assert model.rows[0] == "edge-tokyo-1"

    # Click the Berlin symbol on the map: both Berlin agents become the table's selection.
    window.map.setFocus()
    window.map.fit()
    index = window.map.index["edge-berlin-1"]
    sx, sy = window.map.to_screen(window.map.x[index], window.map.y[index])
    clusters, _ = window.map.clusters()
    label = clusters.labels[index]
    cx, cy = window.map.to_screen(clusters.x[label], clusters.y[label])
    qtbot.mouseClick(window.map, Qt.MouseButton.LeftButton, pos=QPoint(round(cx), round(cy)))
    assert window.table.selected_ids() == {"edge-berlin-1", "edge-berlin-2"}
    assert window.selected == {"edge-berlin-1", "edge-berlin-2"}
    assert bool(window.map.selected[index])
    assert np.isfinite(sx) and np.isfinite(sy)
    # Its tooltip text is the cluster's facts, as plain text.
    assert "2 agents" in window.map.describe(label)
    for agent in agents[:3]:
        await agent.close()


async def test_agent_strings_are_plain_text(hub: HubHandle, window_factory, qtbot):
    hostile = "<b>bold</b><img src=x onerror=alert(1)>"
    agent = await online_agent(
        hub, "edge-x", hostname=hostile, labels={"note": "<a href='x'>click</a>"}
    )
    window = await window_factory(hub, "viewer")
    model = window.agent_model
    row = model.row_of["edge-x"]
    assert model.data(model.index(row, 1)) == hostile  # shown literally by the table
    tip = plain_tooltip(window.map.describe(0))
    assert "<b>" not in tip and "&lt;b&gt;bold&lt;/b&gt;" in tip
    detail = window.open_detail("edge-x")
    await wait_for(lambda: detail.loaded.is_set(), what="agent detail")
    label = detail.fields["hostname"]
    assert label.textFormat() == Qt.TextFormat.PlainText
    assert label.text() == hostile
    assert detail.labels_table.item(0, 1).text() == "<a href='x'>click</a>"
    assert detail.sessions_table.rowCount() >= 1
    detail.close()
    await agent.close()


async def test_model_batches_at_most_ten_times_a_second(hub: HubHandle, window_factory):
    agents = [await online_agent(hub, f"edge-{i:02d}") for i in range(20)]
    window = await window_factory(hub, "viewer")
    fleet = window.fleet
    emitted: list[float] = []
    fleet.changed.connect(lambda _c: emitted.append(time.monotonic()))
    before = fleet.events_total
    started = time.monotonic()
    # Two seconds of heartbeats: every agent every 20 ms (the hub coalesces per agent).
    while time.monotonic() - started < 2.0:
        for n, agent in enumerate(agents):
            await agent.send({"type": "heartbeat", "metrics": {"cpu_percent": float(n)}})
        await asyncio.sleep(0.02)
    await wait_for(lambda: fleet.events_total - before >= 150, what="events")
    span = time.monotonic() - started
    assert fleet.events_total - before >= 150
    assert len(emitted) <= span * 10 + 2, (len(emitted), span)
    gaps = np.diff(emitted)
    assert (gaps >= 0.09).all(), gaps.min()
    for agent in agents:
        await agent.close()


async def test_graphs_open_with_the_hubs_last_hour(hub: HubHandle, window_factory):
    """A console that connects late still draws what happened before it came."""
    history = hub.hub.metrics.history
    history.interval = 0.2  # the default keeps one tick in five seconds
    agent = await online_agent(hub, "edge-early")
    await wait_for(lambda: len(history) >= 5, what="five ticks kept by the hub")
    opened = time.time()
    window = await window_factory(hub, "viewer")
    fleet = window.fleet
    await wait_for(
        lambda: (fleet.history.series("online")[0] < opened - 0.5).sum() >= 4,
        what="the hub's earlier ticks in the console's history",
    )
    t, online = fleet.history.series("online")
    assert (np.diff(t) > 0).all(), "ticks in time order, live ones after the hub's"
    assert online[-1] == 1
    window.graphs.redraw()
    xs, _ = window.graphs.curves["online"].getData()
    assert xs is not None and xs[0] < opened - 0.5
    await agent.close()
