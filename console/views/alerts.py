"""Alerts: open ones on top (severity colours, minimum-severity filter), resolved history below.

Acknowledging needs the operator role. The comment dialog is opened non-modally; the
request goes out when it is accepted, and a ``forbidden`` answer (a viewer token) is shown
as a calm sentence in the view, not as an error box.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from console.client import AdminError
from console.fleet import Changes, FleetModel
from hub.protocol.messages import AlertView

from .common import SEVERITY_COLOURS, SEVERITY_RANK, plain_label
from .tables import Index, ListTableModel, make_table, short_time

__all__ = ["AckDialog", "AlertTableModel", "AlertsView"]

Requester = Callable[..., Awaitable[Any]]

COLUMNS = [
    "Severity",
    "State",
    "Rule",
    "Subject",
    "Message",
    "First seen",
    "Last seen",
    "By",
    "Comment",
]
ALERT_WIDTHS = (86, 96, 130, 120, 300, 130, 130, 90)
EXTENDED = QAbstractItemView.SelectionMode.ExtendedSelection
SEVERITY_GLYPHS = {"info": "ℹ", "warning": "⚠", "critical": "✖"}


class AlertTableModel(ListTableModel[AlertView]):
    columns = COLUMNS

    def data(self, index: Index, role: int = 0) -> Any:
        alert = self.row_at(index)
        if alert is None:
            return None
        column = index.column()
        if role == Qt.ItemDataRole.DisplayRole:
            return [
                f"{SEVERITY_GLYPHS.get(alert.severity, '')} {alert.severity}",
                alert.state,
                alert.rule,
                alert.subject,
                alert.message,
                short_time(alert.first_seen),
                short_time(alert.last_seen),
                alert.acknowledged_by or "",
                alert.comment or "",
            ][column]
        if role == Qt.ItemDataRole.ForegroundRole:
            if column == 0:
                return SEVERITY_COLOURS.get(alert.severity)
            if alert.state != "firing":
                return QColor(150, 150, 150)
        if role == Qt.ItemDataRole.UserRole:
            return alert.alert_id
        return None


class AckDialog(QDialog):
    """Acknowledge one or more alerts with a comment."""

    def __init__(self, alerts: list[AlertView], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Acknowledge alert" if len(alerts) == 1 else "Acknowledge alerts")
        layout = QVBoxLayout(self)
        summary = "\n".join(f"{a.severity}: {a.rule} — {a.subject}" for a in alerts[:8])
        if len(alerts) > 8:
            summary += f"\n… and {len(alerts) - 8} more"
        layout.addWidget(plain_label(summary))
        layout.addWidget(QLabel("Comment (who is on it, what is being done):"))
        self.comment = QPlainTextEdit()
        self.comment.setTabChangesFocus(True)
        self.comment.setPlaceholderText("e.g. ISP outage in Berlin, ticket NOC-1234")
        layout.addWidget(self.comment)
        buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel
        )
        buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Acknowledge")
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout.addWidget(buttons)
        self.buttons = buttons
        self.resize(460, 240)

    def text(self) -> str:
        return self.comment.toPlainText().strip()[:1024]


class AlertsView(QWidget):
    status_message = Signal(str)

    def __init__(
        self, fleet: FleetModel, request: Requester, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.setObjectName("alerts")
        self.fleet = fleet
        self.request = request
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        bar = QHBoxLayout()
        bar.addWidget(QLabel("Minimum severity:"))
        self.min_severity = QComboBox()
        self.min_severity.addItems(["info", "warning", "critical"])
        self.min_severity.currentIndexChanged.connect(self.refresh)
        bar.addWidget(self.min_severity)
        self.ack_button = QPushButton("Acknowledge…")
        self.ack_button.setToolTip("Acknowledge the selected alerts with a comment (Ctrl+K)")
        self.ack_button.setShortcut("Ctrl+K")
        self.ack_button.clicked.connect(self.acknowledge_selected)
        bar.addWidget(self.ack_button)
        self.history_button = QPushButton("Load resolved history")
        self.history_button.clicked.connect(lambda: asyncio.ensure_future(self.load_history()))
        bar.addWidget(self.history_button)
        bar.addStretch(1)
        self.summary = plain_label("")
        bar.addWidget(self.summary)
        layout.addLayout(bar)
        self.message = plain_label("")
        self.message.setObjectName("inlineMessage")
        self.message.setWordWrap(True)
        self.message.hide()
        layout.addWidget(self.message)
        splitter = QSplitter(Qt.Orientation.Vertical)
        self.open_model = AlertTableModel(self)
        self.open_view = make_table(self.open_model, ALERT_WIDTHS, EXTENDED)
        self.open_view.doubleClicked.connect(lambda _i: self.acknowledge_selected())
        splitter.addWidget(self.open_view)
        history = QWidget()
        history_layout = QVBoxLayout(history)
        history_layout.setContentsMargins(0, 0, 0, 0)
        history_layout.setSpacing(0)
        history_layout.addWidget(QLabel("Resolved"))
        self.resolved_model = AlertTableModel(self)
        self.resolved_view = make_table(self.resolved_model, ALERT_WIDTHS, EXTENDED)
        history_layout.addWidget(self.resolved_view)
        splitter.addWidget(history)
        splitter.setSizes([300, 150])
        layout.addWidget(splitter)
        self.dialog: AckDialog | None = None
        self.tasks: set[asyncio.Future[Any]] = set()
        fleet.changed.connect(self.on_changes)

    def on_changes(self, changes: Changes) -> None:
        if changes.alerts or changes.reset:
            self.refresh()

    def refresh(self) -> None:
        minimum = self.min_severity.currentIndex()

        def key(a: AlertView) -> tuple[int, bool, str]:
            return (-SEVERITY_RANK.get(a.severity, 0), a.state != "firing", a.first_seen)

        open_alerts = sorted(
            (
                a
                for a in self.fleet.open_alerts.values()
                if SEVERITY_RANK.get(a.severity, 0) >= minimum
            ),
            key=key,
        )
        selected = self.selected_ids()
        self.open_model.set_rows(open_alerts)
        for row, alert in enumerate(open_alerts):
            if alert.alert_id in selected:
                self.open_view.selectionModel().select(
                    self.open_model.index(row, 0),
                    self.open_view.selectionModel().SelectionFlag.Select
                    | self.open_view.selectionModel().SelectionFlag.Rows,
                )
        resolved = [
            a for a in self.fleet.resolved_alerts if SEVERITY_RANK.get(a.severity, 0) >= minimum
        ]
        self.resolved_model.set_rows(resolved)
        firing = sum(1 for a in self.fleet.open_alerts.values() if a.state == "firing")
        critical = sum(
            1
            for a in self.fleet.open_alerts.values()
            if a.state == "firing" and a.severity == "critical"
        )
        self.summary.setText(f"{firing} firing ({critical} critical), {len(resolved)} resolved")

    def selected_ids(self) -> set[str]:
        alerts = self.open_model.rows
        return {
            alerts[i.row()].alert_id
            for i in self.open_view.selectionModel().selectedRows()
            if i.row() < len(alerts)
        }

    def show_message(self, text: str) -> None:
        self.message.setText(text)
        self.message.setVisible(bool(text))
        if text:
            self.status_message.emit(text)

    def acknowledge_selected(self) -> AckDialog | None:
        ids = self.selected_ids()
        alerts = [a for a in self.open_model.rows if a.alert_id in ids and a.state == "firing"]
        if not alerts:
            self.show_message("Select one or more firing alerts to acknowledge.")
            return None
        dialog = AckDialog(alerts, self)
        dialog.accepted.connect(
            lambda: self._spawn(self.acknowledge([a.alert_id for a in alerts], dialog.text()))
        )
        self.dialog = dialog
        dialog.open()
        return dialog

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def acknowledge(self, alert_ids: list[str], comment: str) -> int:
        """Acknowledge each alert; how many the hub accepted. Errors become a message."""
        done = 0
        for alert_id in alert_ids:
            try:
                reply = await self.request("ack_alert", alert_id=alert_id, comment=comment or None)
            except AdminError as exc:
                if exc.code == "forbidden":
                    self.show_message(
                        "This console is signed in with a viewer token: acknowledging alerts "
                        "needs the operator role. Ask an operator, or reconnect with an "
                        "operator token (File → Connect…)."
                    )
                elif exc.code == "not_found":
                    self.show_message("That alert is no longer open (it was resolved meanwhile).")
                else:
                    self.show_message(f"The hub did not acknowledge the alert: {exc.message}")
                return done
            except (ConnectionError, TimeoutError) as exc:
                self.show_message(f"Not acknowledged: {exc}")
                return done
            if isinstance(reply, dict) and isinstance(reply.get("alert"), dict):
                self.fleet.set_alert(reply["alert"])
            done += 1
        self.show_message(f"Acknowledged {done} alert{'s' if done != 1 else ''}.")
        return done

    async def load_history(self, limit: int = 200) -> None:
        try:
            reply = await self.request("alerts", filter={"state": "resolved"}, limit=limit)
        except (AdminError, ConnectionError, TimeoutError) as exc:
            self.show_message(f"Could not load the resolved alerts: {exc}")
            return
        alerts = reply.get("alerts") if isinstance(reply, dict) else None
        if isinstance(alerts, list):
            self.fleet.set_resolved_alerts(alerts)
