"""The main window: map and agent table on the left, graphs and tabs (alerts, jobs,
topology) on the right, a search field above, the connection and live counts below.

Keys: Ctrl+F or / search, Esc clears it; Ctrl+Enter dispatch; F5 resync; Ctrl+1…6 map,
agents, graphs, topology, alerts, jobs; F11 shows only the current view (again: all);
Enter on an agent opens its detail; F in the map fits the agents.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from PySide6.QtCore import QByteArray, Qt, QTimer
from PySide6.QtGui import QAction, QCloseEvent, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QDialog,
    QLabel,
    QLineEdit,
    QMainWindow,
    QMessageBox,
    QSplitter,
    QTabWidget,
    QToolBar,
    QWidget,
)

from .client import ConnState, HubSession
from .connect import ConnectDialog
from .fleet import CONDITIONS, Changes, FleetModel
from .resources import resource_path
from .settings import ConsoleSettings, TokenStore
from .views.agents import AgentTableModel, AgentTableView
from .views.alerts import AlertsView
from .views.common import CONDITION_GLYPHS, plain_label, shortcut
from .views.detail import AgentDetail
from .views.dispatch import DispatchDialog
from .views.graphs import GraphsView
from .views.jobs import JobsView
from .views.map import MapWidget
from .views.topology import TopologyView

__all__ = ["MainWindow"]

INDICATOR = {
    ConnState.IDLE: ("○", "#9A9A9A"),
    ConnState.CONNECTING: ("◌", "#E69F00"),
    ConnState.CONNECTED: ("●", "#2fbf8f"),
    ConnState.RECONNECTING: ("◐", "#E69F00"),
    ConnState.FAILED: ("✖", "#D55E00"),
    ConnState.CLOSED: ("○", "#9A9A9A"),
}
HELP_KEYS = """Keys
  Ctrl+F or /      search agents (Esc clears, Enter goes to the table)
  Ctrl+Enter       dispatch a command to the selection
  F5               resync: subscribe again and replace everything from a snapshot
  Ctrl+1 … Ctrl+6  map, agents, graphs, topology, alerts, jobs
  F11              show only the current view / all views
  Enter            open the selected agent's detail
  Map: F fit agents, W whole world, + − zoom, arrows pan, drag, wheel,
       click selects a symbol's agents (Ctrl adds), double-click opens one agent
  Alerts: Ctrl+K acknowledge the selected alerts

Filter
  region:eu-*  status:offline  label:site=berlin  site:berlin  platform:linux
  version:1.4  hub:hub-a  cap:exec  id:edge-*  host:gw   free text
  Globs * ? [..], case-insensitive; no wildcard = prefix; =value exact.
  Same field twice = either; different fields = all; -term negates."""


class MainWindow(QMainWindow):
    def __init__(
        self,
        settings: ConsoleSettings,
        tokens: TokenStore,
        light: bool = False,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.settings = settings
        self.tokens = tokens
        self.setWindowTitle("Tether console")
        self.fleet = FleetModel(self)
        self.session: HubSession | None = None
        self.params: Any = None
        self.closed = asyncio.Event()
        self.selected: set[str] = set()
        self.details: dict[str, AgentDetail] = {}
        self.dispatch_dialog: DispatchDialog | None = None
        self.connect_dialog: ConnectDialog | None = None
        self.focus_view: str | None = None
        self.tasks: set[asyncio.Future[Any]] = set()
        self._last_rate = (time.monotonic(), 0)
        self.rate = 0.0

        # -- views
        self.map = MapWidget(self.fleet)
        self.agent_model = AgentTableModel(self.fleet, self)
        self.table = AgentTableView(self.agent_model)
        self.graphs = GraphsView(self.fleet)
        self.topology = TopologyView(self.fleet)
        self.alerts = AlertsView(self.fleet, self.request)
        self.jobs = JobsView(self.fleet, self.request)

        self.left = QSplitter(Qt.Orientation.Vertical)
        self.left.addWidget(self.map)
        self.left.addWidget(self.table)
        self.left.setStretchFactor(0, 3)
        self.left.setStretchFactor(1, 2)
        self.tabs = QTabWidget()
        self.tabs.addTab(self.alerts, "Alerts")
        self.tabs.addTab(self.jobs, "Jobs")
        self.tabs.addTab(self.topology, "Topology")
        self.right = QSplitter(Qt.Orientation.Vertical)
        self.right.addWidget(self.graphs)
        self.right.addWidget(self.tabs)
        self.right.setStretchFactor(0, 1)
        self.right.setStretchFactor(1, 1)
        self.main_split = QSplitter(Qt.Orientation.Horizontal)
        self.main_split.addWidget(self.left)
        self.main_split.addWidget(self.right)
        self.main_split.setStretchFactor(0, 3)
        self.main_split.setStretchFactor(1, 2)
        self.setCentralWidget(self.main_split)
        self.resize(1600, 1000)
        self.main_split.setSizes([960, 640])
        self.left.setSizes([560, 400])
        self.right.setSizes([480, 480])
        self.views: dict[str, QWidget] = {
            "map": self.map,
            "agents": self.table,
            "graphs": self.graphs,
            "topology": self.topology,
            "alerts": self.alerts,
            "jobs": self.jobs,
        }

        # -- toolbar: search
        toolbar = QToolBar("Search")
        toolbar.setObjectName("searchBar")
        toolbar.setMovable(False)
        self.addToolBar(toolbar)
        self.search = QLineEdit()
        self.search.setObjectName("searchField")
        self.search.setClearButtonEnabled(True)
        self.search.setPlaceholderText(
            "Filter agents (Ctrl+F or /):  region:eu-*  status:offline  label:site=berlin  text"
        )
        toolbar.addWidget(self.search)
        self.match_label = plain_label("")
        toolbar.addWidget(self.match_label)
        self._filter_timer = QTimer(self)
        self._filter_timer.setSingleShot(True)
        self._filter_timer.timeout.connect(self._apply_filter)
        self.search.textChanged.connect(lambda _t: self._filter_timer.start(120))
        self.search.returnPressed.connect(self._search_enter)

        # -- status bar
        status = self.statusBar()
        self.indicator = QLabel()
        self.indicator.setObjectName("connectionIndicator")
        self.indicator.setTextFormat(Qt.TextFormat.PlainText)
        status.addWidget(self.indicator)
        self.status_text = plain_label("")
        status.addWidget(self.status_text, 1)
        self.counts_label = plain_label("")
        status.addPermanentWidget(self.counts_label)
        self.selection_label = plain_label("")
        status.addPermanentWidget(self.selection_label)
        self.rate_label = plain_label("")
        status.addPermanentWidget(self.rate_label)
        self._set_indicator(ConnState.IDLE, "not connected")

        self._build_menus(toolbar)
        self._wire()
        self._tick = QTimer(self)
        self._tick.timeout.connect(self._every_second)
        self._tick.start(1000)
        self.apply_theme(light)

    # -- construction --------------------------------------------------------------------

    def _build_menus(self, toolbar: QToolBar) -> None:
        bar = self.menuBar()
        file_menu = bar.addMenu("&File")
        self._action(file_menu, "&Connect…", self.ask_connection, "Ctrl+O")
        self._action(file_menu, "&Reconnect now", self.reconnect_now, "Ctrl+R")
        self._action(file_menu, "&Forget the saved token", self.forget_token)
        file_menu.addSeparator()
        self._action(file_menu, "&Quit", self.close, QKeySequence.StandardKey.Quit)

        view_menu = bar.addMenu("&View")
        for number, name in enumerate(("map", "agents", "graphs", "topology", "alerts", "jobs"), 1):
            self._action(
                view_menu,
                f"&{number} {name.capitalize()}",
                lambda _checked=False, n=name: self.show_view(n),
                f"Ctrl+{number}",
            )
        view_menu.addSeparator()
        self._action(view_menu, "Only this view / &all views", self.toggle_focus, "F11")
        self._action(view_menu, "&Fit agents on the map", self.map.fit)
        self._action(view_menu, "&Whole world", self.map.show_world)
        view_menu.addSeparator()
        self.light_action = self._action(view_menu, "&Light theme", self._toggle_theme)
        self.light_action.setCheckable(True)

        fleet_menu = bar.addMenu("F&leet")
        dispatch = self._action(fleet_menu, "&Dispatch a command…", self.open_dispatch)
        dispatch.setShortcuts([QKeySequence("Ctrl+Return"), QKeySequence("Ctrl+Enter")])
        self._action(fleet_menu, "&Resync", self.resync, "F5")
        self._action(fleet_menu, "Agent &detail", self.open_current_detail)
        self._action(fleet_menu, "Select &all shown agents", self.table.selectAll)
        self._action(fleet_menu, "Clear selection", self.clear_selection)

        help_menu = bar.addMenu("&Help")
        self._action(help_menu, "&Keys and filter syntax", self.show_help, "F1")

        toolbar.addAction("Dispatch…", self.open_dispatch)
        toolbar.addAction("Resync", self.resync)

        shortcut("Ctrl+F", self, self.focus_search)
        shortcut("/", self, self.focus_search)
        shortcut(Qt.Key.Key_Escape, self.search, self._search_escape,
                 Qt.ShortcutContext.WidgetShortcut)  # fmt: skip

    def _action(self, menu: Any, text: str, slot: Any, keys: Any = None) -> QAction:
        action = menu.addAction(text)
        action.triggered.connect(slot)
        if keys is not None:
            action.setShortcut(QKeySequence(keys))
        self.addAction(action)
        return action

    def _wire(self) -> None:
        self.fleet.changed.connect(self._on_changes)
        self.table.selection_changed_ids.connect(self._table_selection)
        self.table.activated_agent.connect(self.open_detail)
        self.map.agents_clicked.connect(self._map_clicked)
        self.map.agent_activated.connect(self.open_detail)
        self.topology.filter_requested.connect(self._topology_filter)
        self.topology.agent_activated.connect(self.open_detail)
        self.alerts.status_message.connect(self.show_status)
        self.agent_model.rows_rebuilt.connect(self._update_match_label)

    # -- connection ----------------------------------------------------------------------

    async def request(self, request_type: str, /, **fields: Any) -> Any:
        if self.session is None:
            raise ConnectionError("not connected to a hub")
        return await self.session.request(request_type, **fields)

    def connect_to(self, params: Any) -> HubSession:
        from .app import ssl_context_for

        pin = getattr(params, "pin_sha256", None)
        urls = params.urls
        context = ssl_context_for(
            next((url for url in urls if url.startswith("wss://")), params.hub),
            params.ca_file,
            params.insecure,
            pin,
            getattr(params, "cert", None),
            getattr(params, "key", None),
        )
        old = self.session
        if old is not None:
            self._spawn(old.stop())
            old.snapshot_received.disconnect()
            old.history_received.disconnect()
            old.events_received.disconnect()
            old.state_changed.disconnect()
        if self.params is not None and self.params.hub != params.hub:
            self.fleet.apply_snapshot({"agents": [], "alerts": [], "commands": []})
            self.fleet.jobs.clear()
            self.fleet.history.clear()
        self.params = params
        session = HubSession(urls, params.token, ssl_context=context, pin_sha256=pin, parent=self)
        session.snapshot_received.connect(self.fleet.apply_snapshot)
        session.history_received.connect(self.fleet.apply_history)
        session.events_received.connect(self.fleet.apply_events)
        session.state_changed.connect(self._session_state)
        self.session = session
        self._title()
        session.start()
        return session

    def ask_connection(self, hub: str | None = None, ca_file: str | None = None,
                       insecure: bool = False, message: str = "") -> ConnectDialog:  # fmt: skip
        from .app import ConnectionParams, parse_hub_urls

        if not isinstance(hub, str):
            hub = ", ".join(self.params.urls) if self.params is not None else None
        dialog = ConnectDialog(
            self.settings, self.tokens, hub, ca_file, bool(insecure), message, self
        )

        def accepted() -> None:
            text, token, ca, insecure_flag = dialog.values()
            urls = parse_hub_urls(text)
            self.connect_to(
                ConnectionParams(urls[0], token, ca, insecure_flag, fallback_hubs=tuple(urls[1:]))
            )
            if getattr(dialog, "stored_in", "") == "plaintext":
                self.show_status(f"Token stored in plaintext in {self.settings.file_name}.")

        dialog.accepted.connect(accepted)
        self.connect_dialog = dialog
        dialog.open()
        return dialog

    def reconnect_now(self) -> None:
        if self.session is not None:
            self.session.reconnect_now()

    def forget_token(self) -> None:
        if self.params is not None:
            self.tokens.forget(self.params.hub)
            self.show_status("Saved token forgotten (keyring and settings).")

    def resync(self) -> None:
        if self.session is not None:
            self.show_status("Resync: subscribing again…")
            self._spawn(self.session.resync())

    def _title(self) -> None:
        """The window names the hub it is on (of several: which, and how many there are)."""
        params, session = self.params, self.session
        if params is None or session is None:
            return
        urls = session.hub_urls
        where = session.hub_url
        if len(urls) > 1:
            where += f"  (hub {urls.index(where) + 1} of {len(urls)})"
        self.setWindowTitle(
            f"Tether console — {where}" + ("  [TLS NOT VERIFIED]" if params.insecure else "")
        )

    def _session_state(self, state: str, detail: str) -> None:
        self._set_indicator(ConnState(state), detail)
        if state == ConnState.CONNECTED:
            self._title()
            if "failed over" in detail:
                self.show_status(detail[0].upper() + detail[1:] + ".")
        if state == ConnState.FAILED and not self.isHidden() and self.connect_dialog is None:
            self.show_status(detail)

    def _set_indicator(self, state: ConnState, detail: str) -> None:
        glyph, colour = INDICATOR[state]
        if state == ConnState.CONNECTED and self.session is not None:
            text = f"{glyph} connected  {self.session.hub_url}"
            on = self.fleet.this_hub
            if on:
                text += f"  ({on})"
            if len(self.session.hub_urls) > 1:
                text += f"  · {len(self.session.hub_urls)} hubs known"
        elif state == ConnState.RECONNECTING and self.session is not None:
            text = f"{glyph} reconnecting — {detail}"
        else:
            text = f"{glyph} {state.value} — {detail}" if detail else f"{glyph} {state.value}"
        self.indicator.setText(text)
        self.indicator.setStyleSheet(f"color: {colour};")
        self.indicator.setToolTip("" if state == ConnState.CONNECTED else "data shown may be stale")

    async def shutdown(self) -> None:
        for dialog in list(self.details.values()):
            dialog.close()
        if self.session is not None:
            await self.session.stop()
        for task in list(self.tasks):
            task.cancel()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- updates -------------------------------------------------------------------------

    def _on_changes(self, changes: Changes) -> None:
        counts = self.fleet.counts
        self.counts_label.setText(
            "   ".join(f"{CONDITION_GLYPHS[c]} {c} {counts.get(c, 0):,}" for c in CONDITIONS)
            + f"   total {self.fleet.total:,}"
        )
        if changes.reset:
            # agents that vanished from the fleet leave the selection
            self.selected &= set(self.fleet.agents)
            self._update_selection_label()

    def _every_second(self) -> None:
        session = self.session
        now = time.monotonic()
        total = session.messages_total if session is not None else 0
        then, before = self._last_rate
        if now > then:
            self.rate = max(0.0, (total - before) / (now - then))
        self._last_rate = (now, total)
        hubs = ", ".join(sorted(self.fleet.hubs)) or "—"
        self.rate_label.setText(f"{self.rate:,.0f} msg/s   hubs: {hubs}")
        if session is not None and session.state == ConnState.RECONNECTING and session.retry_at:
            left = max(0.0, session.retry_at - now)
            self._set_indicator(
                ConnState.RECONNECTING,
                f"{session.last_error}; next try in {left:.0f} s "
                f"(attempt {session.backoff.attempt})",
            )

    def show_status(self, text: str) -> None:
        self.status_text.setText(text)

    # -- search and selection ------------------------------------------------------------

    def focus_search(self) -> None:
        if self.focus_view not in (None, "agents", "map"):
            self.set_focus_view(None)
        self.search.setFocus()
        self.search.selectAll()

    def _search_escape(self) -> None:
        self.search.clear()
        self._apply_filter()

    def _search_enter(self) -> None:
        self._apply_filter()
        self.table.setFocus()
        if self.agent_model.rows and not self.table.currentIndex().isValid():
            self.table.setCurrentIndex(self.agent_model.index(0, 0))

    def _apply_filter(self) -> None:
        self._filter_timer.stop()
        self.agent_model.set_filter(self.search.text())
        self._update_match_label()

    def _update_match_label(self) -> None:
        if self.agent_model.filter.empty:
            self.match_label.setText("")
        else:
            self.match_label.setText(
                f"  {len(self.agent_model.rows):,} of {self.fleet.total:,} match"
            )

    def _table_selection(self, ids: set[str]) -> None:
        self.selected = set(ids)
        self.map.set_selected(self.selected)
        self._update_selection_label()

    def _map_clicked(self, ids: list[str], additive: bool) -> None:
        self.selected = (self.selected | set(ids)) if additive else set(ids)
        shown = self.table.select_ids(self.selected)
        self.map.set_selected(self.selected)
        self._update_selection_label(hidden=len(self.selected) - shown)

    def select_agents(self, ids: set[str]) -> None:
        self._map_clicked(sorted(ids), False)

    def clear_selection(self) -> None:
        self._map_clicked([], False)

    def _update_selection_label(self, hidden: int = 0) -> None:
        text = f"selected {len(self.selected):,}" if self.selected else ""
        if hidden > 0:
            text += f" ({hidden:,} hidden by the filter)"
        self.selection_label.setText(text)

    def _topology_filter(self, text: str) -> None:
        self.search.setText(text)
        self._apply_filter()
        self.show_view("agents")

    # -- views ---------------------------------------------------------------------------

    def show_view(self, name: str) -> None:
        if self.focus_view is not None and self.focus_view != name:
            self.set_focus_view(name)
        if name in ("alerts", "jobs", "topology"):
            self.tabs.setCurrentWidget(self.views[name])
        self.views[name].setFocus()

    def toggle_focus(self) -> None:
        if self.focus_view is not None:
            self.set_focus_view(None)
            return
        focused = QApplication.focusWidget()
        for name, widget in self.views.items():
            if focused is not None and (focused is widget or widget.isAncestorOf(focused)):
                self.set_focus_view(name)
                return
        self.set_focus_view("map")

    def set_focus_view(self, name: str | None) -> None:
        """Show only one view (F11, ``--view``), or all of them (None)."""
        self.focus_view = name
        if name is None:
            for widget in (self.left, self.right, self.map, self.table, self.graphs, self.tabs):
                widget.show()
            return
        on_left = name in ("map", "agents")
        self.left.setVisible(on_left)
        self.right.setVisible(not on_left)
        self.map.setVisible(name == "map")
        self.table.setVisible(name == "agents")
        self.graphs.setVisible(name == "graphs")
        self.tabs.setVisible(name in ("alerts", "jobs", "topology"))
        if name in ("alerts", "jobs", "topology"):
            self.tabs.setCurrentWidget(self.views[name])
        self.views[name].setFocus()

    async def prepare_screenshot(self, view: str | None) -> None:
        """Fetch what a view shows beyond the snapshot, then let it paint."""
        self.fleet.flush()
        if view in (None, "jobs"):
            await self.jobs.load_jobs()
            if self.jobs.job_id is not None:
                await self.jobs.load_job(self.jobs.job_id)
                if self.jobs.command_model.rows:
                    self.jobs.command_view.selectRow(0)
                    if self.jobs.command_id is not None:
                        await self.jobs.load_output(self.jobs.command_id)
        if view in (None, "alerts"):
            await self.alerts.load_history()
        if view in (None, "graphs"):
            deadline = time.monotonic() + 4.0
            while len(self.fleet.history) < 4 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        if view == "topology":
            first = self.topology.tree.topLevelItem(0)
            if first is not None:
                self.topology.tree.setCurrentItem(first)
        self.fleet.flush()
        self.graphs.redraw()
        self.topology.refresh()
        if view in (None, "map"):
            self.map.fit()
        for _ in range(4):  # let the loop deliver paints (never processEvents() in a task)
            await asyncio.sleep(0.05)

    # -- dialogs -------------------------------------------------------------------------

    def open_dispatch(self) -> DispatchDialog:
        if self.dispatch_dialog is not None and self.dispatch_dialog.isVisible():
            self.dispatch_dialog.send()
            return self.dispatch_dialog
        dialog = DispatchDialog(self.fleet, self.request, set(self.selected), self)
        dialog.dispatched.connect(self._dispatched)
        self.dispatch_dialog = dialog
        dialog.open()
        return dialog

    def _dispatched(self, reply: Any) -> None:
        if not isinstance(reply, dict) or "job_id" not in reply:
            return
        refused = reply.get("refused") or []
        sent = len(reply.get("command_ids") or [])
        text = f"Job {reply['job_id']}: {sent} command(s) queued"
        if refused:
            codes: dict[str, int] = {}
            for r in refused:
                codes[str(r.get("code"))] = codes.get(str(r.get("code")), 0) + 1
            text += ", refused " + ", ".join(f"{n} {code}" for code, n in codes.items())
        self.show_status(text)
        self.jobs.show_job(str(reply["job_id"]))
        self.show_view("jobs")

    def open_detail(self, agent_id: str) -> AgentDetail:
        dialog = self.details.get(agent_id)
        if dialog is None:
            dialog = AgentDetail(self.fleet, self.request, agent_id, self)
            self.details[agent_id] = dialog
            dialog.destroyed.connect(lambda _o=None, a=agent_id: self.details.pop(a, None))
        dialog.show()
        dialog.raise_()
        return dialog

    def open_current_detail(self) -> None:
        index = self.table.currentIndex()
        agent_id = self.agent_model.agent_at(index.row()) if index.isValid() else None
        if agent_id is None and len(self.selected) == 1:
            agent_id = next(iter(self.selected))
        if agent_id is not None:
            self.open_detail(agent_id)

    def show_help(self) -> None:
        box = QMessageBox(QMessageBox.Icon.Information, "Tether console", HELP_KEYS,
                          QMessageBox.StandardButton.Close, self)  # fmt: skip
        box.setTextFormat(Qt.TextFormat.PlainText)
        font = box.font()
        font.setFamily("DejaVu Sans Mono")
        box.setFont(font)
        box.open()

    # -- theme and layout ----------------------------------------------------------------

    def apply_theme(self, light: bool) -> None:
        name = "light" if light else "dark"
        try:
            qss = resource_path(f"console-{name}.qss").read_text(encoding="utf-8")
        except (FileNotFoundError, OSError):
            qss = ""
        self.setStyleSheet(qss)
        self.map.set_theme(name)
        self.graphs.set_theme(name)
        self.topology.set_theme(name)
        self.light_action.setChecked(light)
        self.light = light

    def _toggle_theme(self) -> None:
        self.apply_theme(not self.light)
        self.settings.light_theme = self.light

    def restore_layout(self) -> None:
        for name, widget in (("geometry", self), ("main_split", self.main_split),
                             ("left", self.left), ("right", self.right)):  # fmt: skip
            data = self.settings.geometry(name)
            if not data:
                continue
            with contextlib.suppress(Exception):
                if widget is self:
                    self.restoreGeometry(QByteArray(data))
                else:
                    widget.restoreState(QByteArray(data))  # type: ignore[attr-defined]

    def closeEvent(self, event: QCloseEvent) -> None:
        with contextlib.suppress(Exception):
            self.settings.save_geometry("geometry", bytes(self.saveGeometry().data()))
            self.settings.save_geometry("main_split", bytes(self.main_split.saveState().data()))
            self.settings.save_geometry("left", bytes(self.left.saveState().data()))
            self.settings.save_geometry("right", bytes(self.right.saveState().data()))
            self.settings.sync()
        for dialog in list(self.details.values()):
            dialog.close()
        super().closeEvent(event)
        self.closed.set()  # ends the qasync loop's run_until_complete in app._run

    def dialogs(self) -> list[QDialog]:
        return [d for d in (self.dispatch_dialog, self.connect_dialog) if d is not None]
