"""Dispatch from the console reaches real agents and the job view shows their results;
alerts raised by the hub are acknowledged from the console (and politely refused to viewers).
"""

from __future__ import annotations

from PySide6.QtWidgets import QDialogButtonBox, QMessageBox

from console.views.dispatch import DispatchDialog
from tests.conftest import HubHandle

from .helpers import Responder, online_agent, wait_for


async def _fleet(hub: HubHandle, n: int = 3) -> list[Responder]:
    out = []
    for i in range(n):
        agent_id = f"edge-{i}"
        agent = await online_agent(hub, agent_id, region="eu-central", labels={"site": "berlin"})
        out.append(Responder(agent, agent_id))
    return out


def _choose(dialog: DispatchDialog, name: str) -> None:
    index = dialog.command.findData(name)
    assert index >= 0, [dialog.command.itemData(i) for i in range(dialog.command.count())]
    dialog.command.setCurrentIndex(index)


async def test_dispatch_ping_to_the_selection_and_see_results(hub: HubHandle, window_factory):
    agents = await _fleet(hub)
    window = await window_factory(hub, "operator")
    window.select_agents({"edge-0", "edge-1", "edge-2"})
    assert window.table.selected_ids() == {"edge-0", "edge-1", "edge-2"}
    dialog = window.open_dispatch()
    assert dialog.use_selection.isChecked()
    commands = {dialog.command.itemData(i) for i in range(dialog.command.count())}
    assert commands == {"ping", "sysinfo", "exec", "sleep"}  # what the targets declared
    _choose(dialog, "ping")
    dialog.send()
    await wait_for(lambda: window.jobs.job_id is not None, what="the job")
    jobs = window.jobs
    await wait_for(
        lambda: [c.state for c in jobs.command_model.rows] == ["succeeded"] * 3,
        what="three succeeded commands in the job view",
    )
    assert all(len(a.received) == 1 and a.received[0]["name"] == "ping" for a in agents)
    # The rows follow command events; the job itself comes with the next job-list load.
    await wait_for(
        lambda: jobs.progress.value() == 3 and jobs.progress.maximum() == 3, what="progress 3/3"
    )
    await wait_for(lambda: window.fleet.jobs[jobs.job_id].state == "succeeded", what="job state")
    assert "pong" in jobs.command_model.data(jobs.command_model.index(0, 3))
    for agent in agents:
        await agent.close()


async def test_exec_asks_first_then_output_is_shown(hub: HubHandle, window_factory, qtbot):
    agents = await _fleet(hub, 2)
    window = await window_factory(hub, "operator")
    dialog = window.open_dispatch()  # nothing selected: a selector
    assert dialog.use_selector.isChecked()
    dialog.sel_labels.setText("site=berlin")
    dialog.sel_agent.setText("edge-*")
    assert "2 agents" in dialog.target_summary.text()
    _choose(dialog, "exec")
    dialog.exec_argv.setText("uptime -p")
    dialog.send()
    box = dialog.confirm_box
    assert isinstance(box, QMessageBox) and box.isVisible()
    assert "uptime -p" in box.informativeText()
    assert all(not a.received for a in agents)  # nothing is sent before the confirmation
    qtbot.mouseClick(box.button(QMessageBox.StandardButton.Yes), qtbot_left())
    await wait_for(lambda: all(a.received for a in agents), what="exec reaches the agents")
    assert agents[0].received[0]["args"] == {"argv": ["uptime", "-p"]}
    jobs = window.jobs
    await wait_for(
        lambda: [c.state for c in jobs.command_model.rows] == ["succeeded"] * 2,
        what="results in the job view",
    )
    jobs.command_view.selectRow(0)
    await wait_for(lambda: "ran uptime -p" in jobs.output.toPlainText(), what="output")
    # stderr from the agent is shown literally, not as markup
    await wait_for(lambda: "<b>not bold</b>" in jobs.output.toPlainText(), what="stderr")
    for agent in agents:
        await agent.close()


async def test_cancel_a_running_job(hub: HubHandle, window_factory):
    agents = await _fleet(hub, 2)
    window = await window_factory(hub, "operator")
    window.select_agents({"edge-0", "edge-1"})
    dialog = window.open_dispatch()
    _choose(dialog, "sleep")
    dialog.json_args.setPlainText('{"seconds": 300}')
    dialog.max_concurrency.setText("1")
    dialog.send()
    jobs = window.jobs
    await wait_for(lambda: jobs.job_id is not None and jobs.cancel_button.isEnabled(), what="job")
    await wait_for(lambda: any(a.received for a in agents), what="one command running")
    jobs.cancel_button.click()
    await wait_for(
        lambda: sorted(c.state for c in jobs.command_model.rows) == ["cancelled"] * 2,
        what="both cancelled",
    )
    await wait_for(lambda: window.fleet.jobs[jobs.job_id].state == "cancelled", what="job state")
    for agent in agents:
        await agent.close()


async def test_viewer_cannot_dispatch_and_is_told_why(hub: HubHandle, window_factory):
    agents = await _fleet(hub, 1)
    window = await window_factory(hub, "viewer")
    window.select_agents({"edge-0"})
    dialog = window.open_dispatch()
    _choose(dialog, "ping")
    dialog.send()
    await wait_for(lambda: "operator role" in dialog.error.text(), what="polite refusal")
    assert not agents[0].received
    for agent in agents:
        await agent.close()


async def test_acknowledge_an_alert(hub_factory, window_factory, qtbot):
    hub = await hub_factory(alert_expected_agents=1)
    agent = await online_agent(hub, "edge-only")
    await agent.close()  # no agent connected while one is expected: no_agents fires
    viewer = await window_factory(hub, "viewer")
    operator = await window_factory(hub, "operator")
    for window in (viewer, operator):
        await wait_for(
            lambda w=window: any(a.rule == "no_agents" for a in w.fleet.open_alerts.values()),
            what="the no_agents alert in the console",
        )
        await wait_for(lambda w=window: w.alerts.open_model.rowCount() == 1, what="alert row")

    # A viewer is told, calmly, why it cannot acknowledge.
    viewer.alerts.open_view.selectRow(0)
    dialog = viewer.alerts.acknowledge_selected()
    assert dialog is not None
    dialog.comment.setPlainText("looking")
    qtbot.mouseClick(dialog.buttons.button(QDialogButtonBox.StandardButton.Ok), qtbot_left())
    await wait_for(lambda: "operator role" in viewer.alerts.message.text(), what="forbidden")

    # An operator acknowledges with a comment; every console sees it.
    operator.alerts.open_view.selectRow(0)
    dialog = operator.alerts.acknowledge_selected()
    dialog.comment.setPlainText("ISP outage, ticket NOC-1")
    qtbot.mouseClick(dialog.buttons.button(QDialogButtonBox.StandardButton.Ok), qtbot_left())
    for window in (operator, viewer):
        await wait_for(
            lambda w=window: (
                [(a.state, a.comment) for a in w.fleet.open_alerts.values()]
                == [("acknowledged", "ISP outage, ticket NOC-1")]
            ),
            what="acknowledged with the comment",
        )
    model = viewer.alerts.open_model
    await wait_for(lambda: model.data(model.index(0, 1)) == "acknowledged", what="row updated")

    # The condition clears: the alert moves to the resolved history.
    again = await online_agent(hub, "edge-only")
    await wait_for(lambda: not operator.fleet.open_alerts, what="resolved")
    await wait_for(lambda: operator.alerts.resolved_model.rowCount() >= 1, what="history")
    await again.close()


def qtbot_left():
    from PySide6.QtCore import Qt

    return Qt.MouseButton.LeftButton
