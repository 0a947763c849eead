"""The agent table: one QAbstractTableModel over the whole fleet, sorting and filtering itself.

A ``QSortFilterProxyModel`` in Python takes seconds over 10,000 rows, so this model keeps
its own row list (agent ids, filtered and sorted) and rebuilds it in one Python sort. When
a batch of changes moves no row (the sort key and the filter verdict of every changed agent
stayed the same, the common case for heartbeats) the rows stay put and only
``dataChanged`` is emitted; otherwise the rows are rebuilt, at most twice a second, with
persistent indexes (the selection) carried over.

Filter syntax (see docs/console.md): whitespace-separated terms, all of which must match.
``field:value`` terms test one field (``id``, ``host``, ``region``, ``platform``,
``status``, ``version``, ``hub``, ``cap``, ``label:key=value``; any other field name is a
label key, so ``site:berlin`` is ``label:site=berlin``); values are shell-style globs
with the hub's selector semantics (case-sensitive, the whole value: ``hub.protocol.selectors``)
and without a wildcard match the start of the field, ignoring case; ``=value`` matches
exactly (``region:=`` finds agents without a region). Several terms of
the same field are alternatives (``status:offline status:stale``). A leading ``-`` negates
a term. Anything else is free text searched in id, hostname, region, platform, version,
hub and labels.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from PySide6.QtCore import (
    QAbstractTableModel,
    QItemSelection,
    QItemSelectionModel,
    QModelIndex,
    QPersistentModelIndex,
    QSize,
    Qt,
    QTimer,
    Signal,
)
from PySide6.QtGui import QColor
from PySide6.QtWidgets import QAbstractItemView, QHeaderView, QTableView, QWidget

from console.fleet import Agent, Changes, FleetModel
from hub.protocol.selectors import glob_match, is_glob

from .common import CONDITION_COLOURS, format_age, shortcut, symbol_pixmap

__all__ = ["COLUMNS", "AgentFilter", "AgentTableModel", "AgentTableView", "parse_filter"]

_Index = QModelIndex | QPersistentModelIndex

FIELD_ALIASES = {
    "id": "id",
    "agent": "id",
    "agent_id": "id",
    "host": "hostname",
    "hostname": "hostname",
    "region": "region",
    "platform": "platform",
    "os": "platform",
    "status": "status",
    "state": "status",
    "version": "version",
    "ver": "version",
    "hub": "hub",
    "hub_id": "hub",
    "cap": "cap",
    "capability": "cap",
    "label": "label",
}


def _matcher(pattern: str) -> Callable[[str], bool]:
    """A glob means what it means in the hub's selectors (case-sensitive, whole value:
    ``region:eu-*`` finds the agents a dispatch to ``region=eu-*`` reaches); without a
    wildcard a term is a search as you type, a case-insensitive prefix; ``=value`` is
    exact."""
    if pattern.startswith("="):
        exact = pattern[1:]
        return lambda value: value == exact
    if is_glob(pattern):
        return lambda value: glob_match(value, pattern)
    prefix = pattern.casefold()
    return lambda value: value.casefold().startswith(prefix)


@dataclass(frozen=True)
class Term:
    field: str  # one of FIELD_ALIASES' values, "text", or "label"
    value: str
    negate: bool = False
    key: str | None = None  # label key for label terms


def _field_value(agent: Agent, field: str) -> Iterable[str]:
    v = agent.view
    if field == "id":
        return (v.agent_id,)
    if field == "hostname":
        return (v.hostname,)
    if field == "region":
        return (v.region,)
    if field == "platform":
        return (v.platform,)
    if field == "version":
        return (v.version,)
    if field == "hub":
        return (v.hub_id or "",)
    if field == "status":
        return (agent.condition, v.state, v.status or "")
    if field == "cap":
        return v.capabilities
    return ()


def _term_predicate(term: Term) -> Callable[[Agent], bool]:
    if term.field == "text":
        needle = term.value.casefold()
        return lambda agent: needle in agent.search_text
    if term.field == "label":
        key_match = _matcher(term.key or "*") if term.key else (lambda _k: True)
        if term.key and not is_glob(term.key):
            exact_key = term.key

            def key_match(k: str, _e: str = exact_key) -> bool:
                return k == _e

        value_match = _matcher(term.value) if term.value else None

        def label_predicate(agent: Agent) -> bool:
            for k, val in agent.view.labels.items():
                if key_match(k) and (value_match is None or value_match(val)):
                    return True
            return False

        return label_predicate
    match = _matcher(term.value)
    field = term.field
    return lambda agent: any(match(value) for value in _field_value(agent, field))


def parse_filter(text: str) -> list[Term]:
    try:
        words = shlex.split(text, posix=True)
    except ValueError:  # an unclosed quote while typing: split on spaces
        words = text.split()
    terms = []
    for word in words:
        negate = False
        if word[:1] in ("-", "!") and len(word) > 1:
            negate, word = True, word[1:]
        name, sep, value = word.partition(":")
        if sep and name and re.fullmatch(r"[A-Za-z_][\w.-]*", name):
            field = FIELD_ALIASES.get(name.casefold())
            if field == "label":
                key, eq, val = value.partition("=")
                terms.append(Term("label", val if eq else "", negate, key or None))
            elif field is not None:
                terms.append(Term(field, value, negate))
            else:  # an unknown field name is a label key (as the CLI's --selector does)
                terms.append(Term("label", value, negate, name))
        elif word:
            terms.append(Term("text", word, negate))
    return terms


class AgentFilter:
    """A compiled filter: terms of one field are alternatives, fields are all required."""

    def __init__(self, text: str = "") -> None:
        self.text = text.strip()
        self.terms = parse_filter(self.text)
        groups: dict[tuple[str, str | None, bool], list[Callable[[Agent], bool]]] = {}
        singles: list[tuple[Callable[[Agent], bool], bool]] = []
        for term in self.terms:
            predicate = _term_predicate(term)
            if term.field == "text" or term.negate:
                singles.append((predicate, term.negate))
            else:
                groups.setdefault((term.field, term.key, False), []).append(predicate)
        self._groups = list(groups.values())
        self._singles = singles

    @property
    def empty(self) -> bool:
        return not self.terms

    def __call__(self, agent: Agent) -> bool:
        for predicate, negate in self._singles:
            if predicate(agent) == negate:
                return False
        return all(any(p(agent) for p in alternatives) for alternatives in self._groups)


def _version_key(version: str) -> tuple[Any, ...]:
    return tuple(
        (0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.\-+]", version)
    )


def _metric(agent: Agent, *names: str) -> float | None:
    metrics = agent.view.metrics
    for name in names:
        value = metrics.get(name)
        if value is not None:
            return value
    return None


# (title, sort key, width) — keys must never raise and must be comparable within a column.
COLUMNS: list[tuple[str, Callable[[Agent, Any], Any], int]] = [
    ("Agent ID", lambda a, m: a.view.agent_id, 130),
    ("Hostname", lambda a, m: (a.view.hostname.casefold(), a.view.agent_id), 150),
    ("Region", lambda a, m: (a.view.region, a.view.agent_id), 100),
    ("Platform", lambda a, m: (a.view.platform, a.view.agent_id), 70),
    ("Status", lambda a, m: (a.rank, a.view.agent_id), 90),
    ("Hub", lambda a, m: (a.view.hub_id or "", a.view.agent_id), 80),
    ("Version", lambda a, m: (_version_key(a.view.version), a.view.agent_id), 64),
    ("Last seen", lambda a, m: (-(a.last_seen or 0.0), a.view.agent_id), 76),
    ("RTT ms", lambda a, m: (_rtt(a, m) if _rtt(a, m) is not None else 1e18, a.view.agent_id), 60),
    ("CPU %", lambda a, m: (_metric(a, "cpu_percent", "cpu") or -1.0, a.view.agent_id), 56),
]
(
    COL_ID,
    COL_HOST,
    COL_REGION,
    COL_PLATFORM,
    COL_STATUS,
    COL_HUB,
    COL_VERSION,
    COL_SEEN,
    COL_RTT,
    COL_CPU,
) = range(len(COLUMNS))
NUMERIC_COLUMNS = {COL_SEEN, COL_RTT, COL_CPU}
#: Rebuilding the rows (filter + sort) happens at most this often for live updates.
REBUILD_INTERVAL = 0.5
#: Values that move no row are repainted at most this often.
VALUES_INTERVAL = 0.5


def _rtt(agent: Agent, model: Any) -> float | None:
    value = _metric(agent, "rtt_ms", "latency_ms", "ping_ms")
    if value is None and model is not None:
        value = model.fleet.last_rtt_ms.get(agent.view.agent_id)
    return value


class AgentTableModel(QAbstractTableModel):
    """Rows are agent ids of the fleet model, filtered and sorted here."""

    rows_rebuilt = Signal()

    def __init__(self, fleet: FleetModel, parent: Any = None) -> None:
        super().__init__(parent)
        self.fleet = fleet
        self.rows: list[str] = []
        self.row_of: dict[str, int] = {}
        self.filter = AgentFilter()
        self.sort_column = COL_ID
        self.sort_order = Qt.SortOrder.AscendingOrder
        self._keys: dict[str, Any] = {}
        self._last_rebuild = 0.0
        self._rebuild_timer = QTimer(self)
        self._rebuild_timer.setSingleShot(True)
        self._rebuild_timer.timeout.connect(self.rebuild)
        self._now = time.time()
        self._values_dirty = False
        self._dirty_rows: tuple[int, int] | None = None
        self._values_timer = QTimer(self)
        self._values_timer.setSingleShot(True)
        self._values_timer.timeout.connect(self._flush_values)
        fleet.changed.connect(self.on_changes)

    # -- Qt model API --------------------------------------------------------------------

    def rowCount(self, parent: _Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self.rows)

    def columnCount(self, parent: _Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(COLUMNS)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = 0) -> Any:
        if orientation == Qt.Orientation.Horizontal:
            if role == Qt.ItemDataRole.DisplayRole:
                return COLUMNS[section][0]
            if role == Qt.ItemDataRole.TextAlignmentRole and section in NUMERIC_COLUMNS:
                return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None

    def data(self, index: _Index, role: int = 0) -> Any:
        row = index.row()
        if not index.isValid() or row >= len(self.rows):
            return None
        agent = self.fleet.agents.get(self.rows[row])
        if agent is None:
            return None
        column = index.column()
        if role == Qt.ItemDataRole.DisplayRole:
            return self._display(agent, column)
        if role == Qt.ItemDataRole.DecorationRole and column == COL_STATUS:
            return symbol_pixmap(agent.condition, 12)
        if role == Qt.ItemDataRole.TextAlignmentRole and column in NUMERIC_COLUMNS:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        if role == Qt.ItemDataRole.ForegroundRole:
            if column == COL_STATUS:
                return CONDITION_COLOURS[agent.condition]
            if agent.condition == "offline":
                return QColor(150, 150, 150)
        if role == Qt.ItemDataRole.UserRole:
            return agent.view.agent_id
        return None

    def _display(self, agent: Agent, column: int) -> str:
        v = agent.view
        if column == COL_ID:
            return v.agent_id
        if column == COL_HOST:
            return v.hostname
        if column == COL_REGION:
            return v.region
        if column == COL_PLATFORM:
            return v.platform
        if column == COL_STATUS:
            if agent.condition == "degraded":
                return f"{v.status}"
            return agent.condition
        if column == COL_HUB:
            return v.hub_id or ""
        if column == COL_VERSION:
            return v.version
        if column == COL_SEEN:
            return format_age(agent.last_seen, self._now)
        if column == COL_RTT:
            rtt = _rtt(agent, self)
            return "" if rtt is None else f"{rtt:.1f}"
        if column == COL_CPU:
            cpu = _metric(agent, "cpu_percent", "cpu")
            return "" if cpu is None else f"{cpu:.0f}"
        return ""

    def sort(self, column: int, order: Qt.SortOrder = Qt.SortOrder.AscendingOrder) -> None:
        if not 0 <= column < len(COLUMNS):
            return
        self.sort_column = column
        self.sort_order = order
        self.rebuild()

    # -- filtering -----------------------------------------------------------------------

    def set_filter(self, text: str) -> None:
        if text.strip() == self.filter.text:
            return
        self.filter = AgentFilter(text)
        self.rebuild()

    def agent_at(self, row: int) -> str | None:
        return self.rows[row] if 0 <= row < len(self.rows) else None

    # -- updates -------------------------------------------------------------------------

    def _key(self, agent: Agent) -> Any:
        return COLUMNS[self.sort_column][1](agent, self)

    def rebuild(self) -> None:
        """Filter and sort every agent again; keeps persistent indexes on their agents."""
        self._rebuild_timer.stop()
        self._last_rebuild = time.monotonic()
        self._now = time.time()
        agents = self.fleet.agents
        flt = self.filter
        matching = list(agents.values()) if flt.empty else [a for a in agents.values() if flt(a)]
        key_of = COLUMNS[self.sort_column][1]
        keys = {a.view.agent_id: key_of(a, self) for a in matching}
        rows = sorted(
            keys,
            key=keys.__getitem__,
            reverse=self.sort_order == Qt.SortOrder.DescendingOrder,
        )
        self.layoutAboutToBeChanged.emit()
        persistent = self.persistentIndexList()
        old_ids = [
            (self.rows[i.row()] if 0 <= i.row() < len(self.rows) else None, i.column())
            for i in persistent
        ]
        self.rows = rows
        self.row_of = {agent_id: i for i, agent_id in enumerate(rows)}
        self._keys = keys
        if persistent:
            new = []
            for agent_id, column in old_ids:
                row = self.row_of.get(agent_id) if agent_id is not None else None
                new.append(self.index(row, column) if row is not None else QModelIndex())
            self.changePersistentIndexList(persistent, new)
        self.layoutChanged.emit()
        self._dirty_rows = None
        self.rows_rebuilt.emit()

    def on_changes(self, changes: Changes) -> None:
        if changes.reset:
            self.rebuild()
            return
        if not changes.agents and not changes.commands:
            return
        self._now = time.time()
        agents = self.fleet.agents
        flt = self.filter
        moved = False
        touched: list[int] = []
        for agent_id in changes.agents:
            agent = agents.get(agent_id)
            row = self.row_of.get(agent_id)
            visible = agent is not None and (flt.empty or flt(agent))
            if visible != (row is not None):
                moved = True
                break
            if row is None or agent is None:
                continue
            if self._key(agent) != self._keys.get(agent_id):
                moved = True
                break
            touched.append(row)
        if moved:
            wait = self._last_rebuild + REBUILD_INTERVAL - time.monotonic()
            if wait <= 0:
                self.rebuild()
            elif not self._rebuild_timer.isActive():
                self._rebuild_timer.start(int(wait * 1000) + 1)
            return
        if changes.commands:
            self._values_dirty = True  # RTT comes from ping results
            self._dirty_rows = (0, len(self.rows) - 1)
        if touched:
            self._values_dirty = True
            lo, hi = min(touched), max(touched)
            if self._dirty_rows is not None:
                lo, hi = min(lo, self._dirty_rows[0]), max(hi, self._dirty_rows[1])
            self._dirty_rows = (lo, hi)
        if self._values_dirty and not self._values_timer.isActive():
            # Values that move no row (heartbeats) repaint at most twice a second: calm, and
            # a repaint of the visible rows is the table's main cost at 1,000 updates/s.
            self._values_timer.start(int(VALUES_INTERVAL * 1000))

    def _flush_values(self) -> None:
        rows = self._dirty_rows
        self._values_dirty = False
        self._dirty_rows = None
        if rows is None or not self.rows:
            return
        first, last = rows[0], min(rows[1], len(self.rows) - 1)
        self._now = time.time()
        if first <= last:
            self.dataChanged.emit(self.index(first, 0), self.index(last, len(COLUMNS) - 1))

    def refresh_ages(self) -> None:
        """Ages ("5 s") move with the clock: repaint that column."""
        self._now = time.time()
        if self.rows:
            self.dataChanged.emit(self.index(0, COL_SEEN), self.index(len(self.rows) - 1, COL_SEEN))


class AgentTableView(QTableView):
    """The table widget: dense rows, header sort, selection by agent id."""

    selection_changed_ids = Signal(object)  # set[str]
    activated_agent = Signal(str)

    def __init__(self, model: AgentTableModel, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("agentTable")
        self.agent_model = model
        self.setModel(model)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.setSortingEnabled(True)
        self.horizontalHeader().setSortIndicator(COL_ID, Qt.SortOrder.AscendingOrder)
        self.setWordWrap(False)
        self.setShowGrid(False)
        self.setAlternatingRowColors(True)
        self.setIconSize(QSize(12, 12))
        vh = self.verticalHeader()
        vh.setVisible(False)
        vh.setSectionResizeMode(QHeaderView.ResizeMode.Fixed)
        vh.setDefaultSectionSize(self.fontMetrics().height() + 4)
        header = self.horizontalHeader()
        header.setHighlightSections(False)
        header.setStretchLastSection(False)
        for column, (_title, _key, width) in enumerate(COLUMNS):
            header.resizeSection(column, width)
        header.setSectionResizeMode(COL_HOST, QHeaderView.ResizeMode.Stretch)
        self.setHorizontalScrollMode(QAbstractItemView.ScrollMode.ScrollPerPixel)
        self.setVerticalScrollMode(QAbstractItemView.ScrollMode.ScrollPerItem)
        self.selectionModel().selectionChanged.connect(self._selection_changed)
        self.doubleClicked.connect(self._activated)
        shortcut(Qt.Key.Key_Return, self, self._activate_current, Qt.ShortcutContext.WidgetShortcut)
        self._ages = QTimer(self)
        self._ages.timeout.connect(model.refresh_ages)
        self._ages.start(2000)
        self._muted = False

    def selected_ids(self) -> set[str]:
        rows = self.agent_model.rows
        out = set()
        for selection_range in self.selectionModel().selection():
            out.update(rows[selection_range.top() : selection_range.bottom() + 1])
        return out

    def select_ids(self, ids: Iterable[str], scroll: bool = True) -> int:
        """Select the rows of these agents (those the filter shows); how many were shown."""
        row_of = self.agent_model.row_of
        rows = sorted(row_of[i] for i in ids if i in row_of)
        selection = QItemSelection()
        last_col = len(COLUMNS) - 1
        start = prev = None
        for row in rows:
            if start is None:
                start = prev = row
            elif row == prev + 1:
                prev = row
            else:
                selection.select(
                    self.agent_model.index(start, 0), self.agent_model.index(prev, last_col)
                )
                start = prev = row
        if start is not None:
            selection.select(
                self.agent_model.index(start, 0), self.agent_model.index(prev, last_col)
            )
        self._muted = True
        try:
            self.selectionModel().select(
                selection, QItemSelectionModel.SelectionFlag.ClearAndSelect
            )
        finally:
            self._muted = False
        if rows and scroll:
            self.scrollTo(self.agent_model.index(rows[0], 0))
        return len(rows)

    def _selection_changed(self, *_args: Any) -> None:
        if not self._muted:
            self.selection_changed_ids.emit(self.selected_ids())

    def _activated(self, index: QModelIndex) -> None:
        agent_id = self.agent_model.agent_at(index.row())
        if agent_id is not None:
            self.activated_agent.emit(agent_id)

    def _activate_current(self) -> None:
        index = self.currentIndex()
        if index.isValid():
            self._activated(index)
