"""Topology: hubs → regions → agents, each with counts per condition and its worst state.

In cluster mode (the hub's ticks carry ``stats.cluster``) a graph sits above the tree:
Redis in the middle, each hub a node with its lease, agent count and load, its agents and
regions beneath (:class:`~console.views.cluster_graph.ClusterGraph`); a hub that died is a
red node over grey ``unknown`` agents. On a single hub the graph stays hidden.

The tree holds hubs and regions (a few dozen rows, updated in place at most twice a second
so expansion and selection survive); clicking a node drills in: the agent list beside it
shows that node's agents (a second :class:`AgentTableModel` over the same fleet with a
``hub:… region:…`` filter). Double-click applies that filter to the main agent table.
"""

from __future__ import annotations

import shlex
import time
from typing import Any

from PySide6.QtCore import QSize, Qt, QTimer, Signal
from PySide6.QtGui import QBrush
from PySide6.QtWidgets import (
    QHeaderView,
    QSplitter,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from console.fleet import CONDITIONS, Changes, FleetModel, HubInfo

from .agents import AgentTableModel, AgentTableView
from .cluster_graph import ClusterGraph
from .common import CONDITION_COLOURS, plain_label, symbol_pixmap

__all__ = ["NO_HUB", "TopologyView"]

NO_HUB = "(no hub)"
NO_REGION = "(no region)"
COLUMNS = ["Hub / region", "Agents", *CONDITIONS, "Worst"]
REFRESH_INTERVAL = 0.5
ROLE_FILTER = Qt.ItemDataRole.UserRole + 1


def _quote(value: str) -> str:
    return shlex.quote(value)


def _real(value: str, placeholder: str) -> str:
    return "" if value == placeholder else value


class TopologyView(QWidget):
    filter_requested = Signal(str)  # apply to the main agent table
    agent_activated = Signal(str)

    def __init__(self, fleet: FleetModel, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("topology")
        self.fleet = fleet
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        splitter = QSplitter(Qt.Orientation.Vertical)
        layout.addWidget(splitter)
        self.splitter = splitter
        self.graph = ClusterGraph()
        self.graph.hide()
        self.graph.hub_clicked.connect(self.select_hub)
        splitter.addWidget(self.graph)
        self.tree = QTreeWidget()
        self.tree.setColumnCount(len(COLUMNS))
        self.tree.setHeaderLabels(COLUMNS)
        self.tree.setUniformRowHeights(True)
        self.tree.setIconSize(QSize(12, 12))
        self.tree.setRootIsDecorated(True)
        header = self.tree.header()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        header.setStretchLastSection(False)
        for column in range(1, len(COLUMNS)):
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.ResizeToContents)
        splitter.addWidget(self.tree)
        lower = QWidget()
        lower_layout = QVBoxLayout(lower)
        lower_layout.setContentsMargins(0, 0, 0, 0)
        lower_layout.setSpacing(2)
        self.drill_label = plain_label("Select a hub or region to list its agents.")
        lower_layout.addWidget(self.drill_label)
        self.drill_model = AgentTableModel(fleet, self)
        self.drill_model.set_filter("id:__none__")
        self.drill_view = AgentTableView(self.drill_model)
        self.drill_view.activated_agent.connect(self.agent_activated)
        lower_layout.addWidget(self.drill_view)
        splitter.addWidget(lower)
        splitter.setSizes([0, 200, 200])
        self.hub_items: dict[str, QTreeWidgetItem] = {}
        self.region_items: dict[tuple[str, str], QTreeWidgetItem] = {}
        self.counts: dict[tuple[str, str], dict[str, int]] = {}
        self._place: dict[str, tuple[tuple[str, str], str]] = {}
        self.tree.currentItemChanged.connect(self._current_changed)
        self.tree.itemDoubleClicked.connect(self._double_clicked)
        self._last = 0.0
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self.refresh)
        fleet.changed.connect(self.on_changes)

    def set_theme(self, name: str) -> None:
        self.graph.set_theme(name)

    def on_changes(self, changes: Changes) -> None:
        if not (changes.reset or changes.agents or changes.metrics or changes.alerts):
            return
        if changes.reset:
            self._place = {}
            self.counts = {}
            self.refresh()
            return
        if not self._apply(changes.agents) and not (changes.metrics or changes.alerts):
            return  # heartbeats that moved no agent between nodes or conditions
        if not self._timer.isActive():
            wait = self._last + REFRESH_INTERVAL - time.monotonic()
            self._timer.start(max(0, int(wait * 1000)))

    def aggregate(self) -> dict[tuple[str, str], dict[str, int]]:
        """Counts per (hub, region) from scratch, and where each agent is counted."""
        counts: dict[tuple[str, str], dict[str, int]] = {}
        place: dict[str, tuple[tuple[str, str], str]] = {}
        for agent_id, agent in self.fleet.agents.items():
            v = agent.view
            key = (v.hub_id or NO_HUB, v.region or NO_REGION)
            per = counts.get(key)
            if per is None:
                per = counts[key] = dict.fromkeys(CONDITIONS, 0)
            per[agent.condition] += 1
            place[agent_id] = (key, agent.condition)
        self._place = place
        return counts

    def _apply(self, agent_ids: set[str]) -> bool:
        """Move changed agents between counts; whether any count changed."""
        if not self._place and self.fleet.agents:
            return True  # never aggregated: the next refresh does it from scratch
        counts = self.counts
        moved = False
        for agent_id in agent_ids:
            agent = self.fleet.agents.get(agent_id)
            if agent is None:
                continue
            v = agent.view
            now = ((v.hub_id or NO_HUB, v.region or NO_REGION), agent.condition)
            before = self._place.get(agent_id)
            if before == now:
                continue
            moved = True
            if before is not None:
                counts[before[0]][before[1]] -= 1
                if not any(counts[before[0]].values()):
                    del counts[before[0]]
            counts.setdefault(now[0], dict.fromkeys(CONDITIONS, 0))[now[1]] += 1
            self._place[agent_id] = now
        return moved

    def refresh(self) -> None:
        self._last = time.monotonic()
        if not self._place or len(self._place) != len(self.fleet.agents):
            self.counts = self.aggregate()
        counts = self.counts
        hubs: dict[str, dict[str, int]] = {}
        for (hub, _region), per in counts.items():
            total = hubs.setdefault(hub, dict.fromkeys(CONDITIONS, 0))
            for condition, n in per.items():
                total[condition] += n
        for hub in self.fleet.hubs:  # hubs that report but own no agent yet
            hubs.setdefault(hub, dict.fromkeys(CONDITIONS, 0))
        infos = self.fleet.hub_infos()
        for hub in infos:
            hubs.setdefault(hub, dict.fromkeys(CONDITIONS, 0))
        self._show_graph(infos, counts)
        self.tree.setUpdatesEnabled(False)
        try:
            for hub in sorted(hubs):
                item = self.hub_items.get(hub)
                if item is None:
                    item = self.hub_items[hub] = QTreeWidgetItem(self.tree)
                    item.setData(0, ROLE_FILTER, f"hub:{_quote('=' + _real(hub, NO_HUB))}")
                    item.setExpanded(True)
                self._fill(item, hub, hubs[hub])
                info = infos.get(hub)
                if info is not None:
                    self._mark_hub(item, info)
            for hub in [h for h in self.hub_items if h not in hubs]:
                item = self.hub_items.pop(hub)
                self.tree.takeTopLevelItem(self.tree.indexOfTopLevelItem(item))
            for key in sorted(counts):
                hub, region = key
                item = self.region_items.get(key)
                if item is None:
                    item = self.region_items[key] = QTreeWidgetItem(self.hub_items[hub])
                    item.setData(
                        0,
                        ROLE_FILTER,
                        f"hub:{_quote('=' + _real(hub, NO_HUB))} "
                        f"region:{_quote('=' + _real(region, NO_REGION))}",
                    )
                self._fill(item, region, counts[key])
            for key in [k for k in self.region_items if k not in counts]:
                item = self.region_items.pop(key)
                parent = item.parent()
                if parent is not None:
                    parent.removeChild(item)
        finally:
            self.tree.setUpdatesEnabled(True)

    @staticmethod
    def _fill(item: QTreeWidgetItem, name: str, per: dict[str, int]) -> None:
        total = sum(per.values())
        item.setText(0, name)
        item.setText(1, f"{total:,}")
        for column, condition in enumerate(CONDITIONS, start=2):
            item.setText(column, f"{per[condition]:,}" if per[condition] else "")
            item.setTextAlignment(column, Qt.AlignmentFlag.AlignRight)
        item.setTextAlignment(1, Qt.AlignmentFlag.AlignRight)
        worst = max((c for c in CONDITIONS if per[c]), key=CONDITIONS.index, default=None)
        last = len(COLUMNS) - 1
        item.setText(last, worst or "")
        if worst is not None:
            item.setIcon(last, symbol_pixmap(worst, 12))
            item.setIcon(0, symbol_pixmap(worst, 12))

    def _show_graph(self, infos: dict[str, HubInfo],
                    counts: dict[tuple[str, str], dict[str, int]]) -> None:  # fmt: skip
        shown = self.graph.isVisibleTo(self)
        if not infos:
            if shown:
                self.graph.hide()
            return
        fleet = self.fleet
        self.graph.set_data(fleet.redis_state, list(infos.values()), counts, fleet.this_hub)
        if not shown:
            self.graph.show()
            sizes = self.splitter.sizes()
            total = sum(sizes) or 600
            self.splitter.setSizes([int(total * 0.45), int(total * 0.3), int(total * 0.25)])

    @staticmethod
    def _mark_hub(item: QTreeWidgetItem, info: HubInfo) -> None:
        """A cluster hub's lease in its row: down in red with the offline symbol."""
        if info.state == "down":
            item.setText(0, f"{info.hub_id} — DOWN (lease lapsed)")
            item.setIcon(0, symbol_pixmap("offline", 12))
            item.setForeground(0, QBrush(CONDITION_COLOURS["offline"]))
        else:
            item.setText(0, f"{info.hub_id}{' — leader' if info.leader else ''}")
            item.setData(0, Qt.ItemDataRole.ForegroundRole, None)

    def select_hub(self, hub_id: str) -> None:
        """Drill into a hub (a click on its node in the graph)."""
        item = self.hub_items.get(hub_id)
        if item is not None:
            self.tree.setCurrentItem(item)

    def node_filter(self, item: QTreeWidgetItem | None) -> str | None:
        if item is None:
            return None
        value: Any = item.data(0, ROLE_FILTER)
        return str(value) if value is not None else None

    def drill(self, item: QTreeWidgetItem | None) -> None:
        flt = self.node_filter(item)
        if flt is None or item is None:
            return
        path = (
            item.text(0) if item.parent() is None else f"{item.parent().text(0)} / {item.text(0)}"
        )
        self.drill_model.set_filter(flt or "")
        self.drill_label.setText(
            f"{path}: {len(self.drill_model.rows):,} agents "
            "(double-click the node to filter the agent table)"
        )

    def _current_changed(self, current: QTreeWidgetItem | None, _previous: Any) -> None:
        self.drill(current)

    def _double_clicked(self, item: QTreeWidgetItem, _column: int) -> None:
        flt = self.node_filter(item)
        if flt is not None:
            self.filter_requested.emit(flt)
