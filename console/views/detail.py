"""Agent detail: registration, labels, heartbeat metrics as sparklines, connection history and
command history, from the hub's ``agent`` request, then kept live from the fleet model.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QAbstractItemView,
    QDialog,
    QFormLayout,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from console.client import AdminError
from console.fleet import Changes, FleetModel
from hub.protocol.messages import AgentView, CommandView, ValidationError
from hub.protocol.times import parse_time

from .common import format_age, plain_label, symbol_pixmap
from .jobs import result_summary

__all__ = ["AgentDetail"]

Requester = Callable[..., Awaitable[Any]]
SPARK_POINTS = 240


def _table(headers: list[str]) -> QTableWidget:
    table = QTableWidget(0, len(headers))
    table.setHorizontalHeaderLabels(headers)
    table.verticalHeader().setVisible(False)
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    table.setWordWrap(False)
    table.setShowGrid(False)
    table.horizontalHeader().setStretchLastSection(True)
    table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
    table.verticalHeader().setDefaultSectionSize(table.fontMetrics().height() + 4)
    return table


def _fill(table: QTableWidget, rows: list[list[str]]) -> None:
    table.setRowCount(len(rows))
    for r, row in enumerate(rows):
        for c, text in enumerate(row):
            table.setItem(r, c, QTableWidgetItem(text))  # items show plain text


def _short(text: str | None) -> str:
    return text.replace("T", " ")[:19] if text else ""


class AgentDetail(QDialog):
    """A non-modal window about one agent; several may be open at once."""

    def __init__(
        self, fleet: FleetModel, request: Requester, agent_id: str, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        self.fleet = fleet
        self.request = request
        self.agent_id = agent_id
        self.setWindowTitle(f"Agent {agent_id}")
        self.tasks: set[asyncio.Future[Any]] = set()
        self.series: dict[str, tuple[list[float], list[float]]] = {}
        self.loaded = asyncio.Event()
        layout = QVBoxLayout(self)
        head = QHBoxLayout()
        self.icon = QLabel()
        head.addWidget(self.icon)
        self.headline = plain_label(agent_id)
        font = self.headline.font()
        font.setPointSizeF(font.pointSizeF() * 1.3)
        font.setBold(True)
        self.headline.setFont(font)
        head.addWidget(self.headline, 1)
        refresh = QPushButton("Refresh (F5)")
        refresh.setShortcut("F5")
        refresh.clicked.connect(self.reload)
        head.addWidget(refresh)
        layout.addLayout(head)
        self.message = plain_label("")
        self.message.hide()
        layout.addWidget(self.message)

        tabs = QTabWidget()
        layout.addWidget(tabs)
        overview = QWidget()
        overview_layout = QHBoxLayout(overview)
        self.form = QFormLayout()
        self.fields: dict[str, QLabel] = {}
        for name in (
            "agent_id", "hostname", "state", "status", "region", "platform", "version",
            "hub_id", "connected_at", "last_seen", "location", "capabilities",
        ):  # fmt: skip
            label = plain_label("")
            label.setWordWrap(True)
            self.fields[name] = label
            self.form.addRow(name.replace("_", " "), label)
        left = QWidget()
        left.setLayout(self.form)
        overview_layout.addWidget(left, 1)
        right = QVBoxLayout()
        right.addWidget(QLabel("Labels"))
        self.labels_table = _table(["key", "value"])
        right.addWidget(self.labels_table)
        overview_layout.addLayout(right, 1)
        tabs.addTab(overview, "Registration")

        metrics_page = QWidget()
        self.metrics_grid = QGridLayout(metrics_page)
        self.metrics_grid.setColumnStretch(2, 1)
        self.sparklines: dict[str, tuple[QLabel, pg.PlotWidget, pg.PlotDataItem]] = {}
        tabs.addTab(metrics_page, "Metrics")

        self.sessions_table = _table(["connected", "ended", "close code", "reason", "hub", "peer"])
        tabs.addTab(self.sessions_table, "Connections")
        self.commands_table = _table(["issued", "command", "state", "exit", "result", "job"])
        tabs.addTab(self.commands_table, "Commands")
        self.tabs = tabs
        self.resize(760, 520)
        self.show_agent()
        fleet.changed.connect(self.on_changes)
        self.reload()

    # -- data ----------------------------------------------------------------------------

    def reload(self) -> None:
        task = asyncio.ensure_future(self.load())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def load(self) -> None:
        try:
            reply = await self.request("agent", agent_id=self.agent_id)
        except AdminError as exc:
            self._message(f"The hub has no details for this agent: {exc.message}")
            return
        except (ConnectionError, TimeoutError) as exc:
            self._message(f"Not loaded: {exc}")
            return
        if not isinstance(reply, dict):
            return
        try:
            agent = AgentView.model_validate(reply.get("agent"))
        except ValidationError:
            agent = None
        if agent is not None:
            self.show_agent(agent)
        self.series = {}
        for beat in reversed(reply.get("heartbeats") or []):
            self._add_sample(beat.get("time"), beat.get("metrics"))
        if agent is not None:
            self._add_sample(agent.last_seen, agent.metrics)
        self._draw_sparklines()
        _fill(
            self.sessions_table,
            [
                [
                    _short(s.get("connected_at")),
                    _short(s.get("ended_at")) or "connected",
                    "" if s.get("close_code") is None else str(s.get("close_code")),
                    str(s.get("close_reason") or ""),
                    str(s.get("hub_id") or ""),
                    str(s.get("peer") or ""),
                ]
                for s in reply.get("sessions") or []
                if isinstance(s, dict)
            ],
        )
        commands = []
        for raw in reply.get("commands") or []:
            try:
                commands.append(CommandView.model_validate(raw))
            except ValidationError:
                continue
        _fill(
            self.commands_table,
            [
                [
                    _short(c.issued_at),
                    c.name,
                    c.state,
                    ""
                    if c.result is None or c.result.exit_code is None
                    else str(c.result.exit_code),
                    result_summary(c),
                    c.job_id,
                ]
                for c in commands
            ],
        )
        self.message.hide()
        self.loaded.set()

    def _message(self, text: str) -> None:
        self.message.setText(text)
        self.message.show()

    def _add_sample(self, when: Any, metrics: Any) -> None:
        if not isinstance(when, str) or not isinstance(metrics, dict):
            return
        try:
            t = parse_time(when)
        except ValueError:
            return
        for name, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                ts, vs = self.series.setdefault(str(name), ([], []))
                if ts and t <= ts[-1]:
                    continue
                ts.append(t)
                vs.append(float(value))
                del ts[:-SPARK_POINTS], vs[:-SPARK_POINTS]

    def _draw_sparklines(self) -> None:
        for row, name in enumerate(sorted(self.series)):
            ts, vs = self.series[name]
            entry = self.sparklines.get(name)
            if entry is None:
                title = plain_label(name)
                value = plain_label("")
                value.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                plot = pg.PlotWidget()
                plot.setFixedHeight(34)
                plot.hideAxis("left")
                plot.hideAxis("bottom")
                plot.setMouseEnabled(x=False, y=False)
                plot.setMenuEnabled(False)
                plot.hideButtons()
                plot.setBackground(None)
                pen = pg.mkPen("#56B4E9", width=1)
                pen.setCosmetic(True)
                curve = plot.plot([], [], pen=pen)
                self.metrics_grid.addWidget(title, row, 0)
                self.metrics_grid.addWidget(value, row, 1)
                self.metrics_grid.addWidget(plot, row, 2)
                entry = self.sparklines[name] = (value, plot, curve)
            value, _plot, curve = entry
            value.setText(f"{vs[-1]:g}" if vs else "")
            curve.setData(np.asarray(ts), np.asarray(vs))

    def show_agent(self, view: AgentView | None = None) -> None:
        agent = self.fleet.agents.get(self.agent_id)
        if view is None:
            if agent is None:
                return
            view = agent.view
        condition = agent.condition if agent is not None else view.state
        self.icon.setPixmap(symbol_pixmap(condition, 16))
        self.headline.setText(
            f"{view.agent_id}  ·  {view.hostname}" if view.hostname else view.agent_id
        )
        values = {
            "agent_id": view.agent_id,
            "hostname": view.hostname,
            "state": view.state,
            "status": view.status or "",
            "region": view.region,
            "platform": view.platform,
            "version": view.version,
            "hub_id": self._hub(view.hub_id),
            "connected_at": _short(view.connected_at),
            "last_seen": (
                f"{_short(view.last_seen)}  ({format_age(agent.last_seen)} ago)"
                if view.last_seen and agent is not None
                else _short(view.last_seen)
            ),
            "location": f"{view.location.lat:.4f}, {view.location.lon:.4f}"
            if view.location
            else "",
            "capabilities": ", ".join(view.capabilities),
        }
        for name, text in values.items():
            self.fields[name].setText(text)
        _fill(self.labels_table, [[k, v] for k, v in sorted(view.labels.items())])

    def _hub(self, hub_id: str | None) -> str:
        """The agent's hub, and in a cluster that hub's lease (a dead hub says so)."""
        if not hub_id:
            return ""
        info = self.fleet.hub_infos().get(hub_id)
        if info is None:
            return hub_id
        if info.state == "down":
            return f"{hub_id} — DOWN (lease lapsed: unknown until it registers elsewhere)"
        return f"{hub_id} — up{', leader' if info.leader else ''}"

    def on_changes(self, changes: Changes) -> None:
        if self.agent_id in changes.agents or changes.reset:
            agent = self.fleet.agents.get(self.agent_id)
            if agent is not None:
                self.show_agent()
                self._add_sample(agent.view.last_seen, agent.view.metrics)
                self._draw_sparklines()
        elif changes.metrics and self.fleet.is_cluster:  # a tick may bring its hub's lease
            agent = self.fleet.agents.get(self.agent_id)
            if agent is not None:
                self.fields["hub_id"].setText(self._hub(agent.view.hub_id))
