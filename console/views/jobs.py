"""Jobs: the list of jobs, and for the chosen one its progress, each agent's command and its
output, and a cancel button.

The list comes from ``jobs`` requests; a job's commands from a ``job`` request, then live
from ``commands`` events (the progress bar moves with them at once). The hub's word on the
job's own state is fetched again at most once a second while its commands change. Output
of the chosen command comes from an ``output`` request and then from ``commands/output``
events; it is shown as plain text (stderr in a different colour), never interpreted.
"""

from __future__ import annotations

import asyncio
import json
import operator
import time
from collections.abc import Awaitable, Callable
from typing import Any

from PySide6.QtCore import QModelIndex, Qt, QTimer
from PySide6.QtGui import QColor, QTextCharFormat, QTextCursor
from PySide6.QtWidgets import (
    QHBoxLayout,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from console.client import AdminError
from console.fleet import Changes, FleetModel
from hub.protocol.messages import CommandView, JobView
from hub.protocol.states import ERROR_STATES, TERMINAL_STATES

from .common import monospace_font, plain_label
from .tables import Index, ListTableModel, make_table, short_time

__all__ = ["CommandTableModel", "JobTableModel", "JobsView"]

Requester = Callable[..., Awaitable[Any]]

STATE_COLOURS = {
    "succeeded": QColor("#009E73"),
    "failed": QColor("#D55E00"),
    "rejected": QColor("#D55E00"),
    "timed_out": QColor("#D55E00"),
    "cancelled": QColor("#9A9A9A"),
    "expired": QColor("#9A9A9A"),
    "partial": QColor("#E69F00"),
    "running": QColor("#56B4E9"),
}
JOB_COLUMNS = ["Created", "Command", "State", "Progress", "OK", "Failed", "By"]
COMMAND_COLUMNS = ["Agent", "State", "Exit", "Result", "Updated"]


def _finished(counts: dict[str, int]) -> int:
    return sum(n for state, n in counts.items() if state in TERMINAL_STATES)


def _failed(counts: dict[str, int]) -> int:
    return sum(n for state, n in counts.items() if state in ERROR_STATES)


def result_summary(command: CommandView, limit: int = 160) -> str:
    result = command.result
    if result is None:
        return ""
    if result.error:
        text = result.error
    elif result.data is None or result.data == {}:
        text = result.status
    else:
        text = json.dumps(result.data, ensure_ascii=False, separators=(",", ":"), default=str)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class JobTableModel(ListTableModel[JobView]):
    columns = JOB_COLUMNS

    def data(self, index: Index, role: int = 0) -> Any:
        job = self.row_at(index)
        if job is None:
            return None
        column = index.column()
        if role == Qt.ItemDataRole.DisplayRole:
            counts = job.counts
            return [
                short_time(job.created_at),
                job.name,
                job.state,
                f"{_finished(counts)}/{job.total}",
                str(counts.get("succeeded", 0)),
                str(_failed(counts)),
                job.dispatched_by or "",
            ][column]
        if role == Qt.ItemDataRole.ForegroundRole and column == 2:
            return STATE_COLOURS.get(job.state)
        if role == Qt.ItemDataRole.UserRole:
            return job.job_id
        return None


class CommandTableModel(ListTableModel[CommandView]):
    columns = COMMAND_COLUMNS
    row_key = operator.attrgetter("command_id")

    def data(self, index: Index, role: int = 0) -> Any:
        command = self.row_at(index)
        if command is None:
            return None
        column = index.column()
        if role == Qt.ItemDataRole.DisplayRole:
            exit_code = command.result.exit_code if command.result is not None else None
            return [
                command.agent_id,
                command.state,
                "" if exit_code is None else str(exit_code),
                result_summary(command),
                short_time(command.updated_at),
            ][column]
        if role == Qt.ItemDataRole.ForegroundRole and column == 1:
            return STATE_COLOURS.get(command.state)
        if role == Qt.ItemDataRole.UserRole:
            return command.command_id
        return None


class JobsView(QWidget):
    def __init__(
        self, fleet: FleetModel, request: Requester, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.setObjectName("jobs")
        self.fleet = fleet
        self.request = request
        self.job_id: str | None = None
        self.command_id: str | None = None
        self.tasks: set[asyncio.Future[Any]] = set()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        splitter = QSplitter(Qt.Orientation.Vertical)
        layout.addWidget(splitter)

        self.job_model = JobTableModel(self)
        self.job_view = make_table(self.job_model, (130, 80, 70, 70, 40, 50))
        self.job_view.selectionModel().currentRowChanged.connect(self._job_row_changed)
        splitter.addWidget(self.job_view)

        detail = QWidget()
        detail_layout = QVBoxLayout(detail)
        detail_layout.setContentsMargins(0, 0, 0, 0)
        detail_layout.setSpacing(2)
        head = QHBoxLayout()
        self.title = plain_label("No job selected. Dispatch with Ctrl+Enter.")
        head.addWidget(self.title, 1)
        self.progress = QProgressBar()
        self.progress.setMaximumWidth(180)
        self.progress.setFormat("%v / %m")
        head.addWidget(self.progress)
        self.cancel_button = QPushButton("Cancel job")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(lambda: self._spawn(self.cancel_job()))
        head.addWidget(self.cancel_button)
        detail_layout.addLayout(head)
        self.counts_label = plain_label("")
        detail_layout.addWidget(self.counts_label)
        self.message = plain_label("")
        self.message.setObjectName("inlineMessage")
        self.message.setWordWrap(True)
        self.message.hide()
        detail_layout.addWidget(self.message)
        inner = QSplitter(Qt.Orientation.Vertical)
        self.command_model = CommandTableModel(self)
        self.command_view = make_table(self.command_model, (130, 80, 40, 260))
        self.command_view.selectionModel().currentRowChanged.connect(self._command_row_changed)
        inner.addWidget(self.command_view)
        self.output = QPlainTextEdit()
        self.output.setReadOnly(True)
        self.output.setFont(monospace_font())
        self.output.setPlaceholderText("Output of the selected command")
        self.output.setMaximumBlockCount(20_000)
        inner.addWidget(self.output)
        inner.setSizes([220, 120])
        detail_layout.addWidget(inner)
        splitter.addWidget(detail)
        splitter.setSizes([120, 380])

        self._job_refresh = QTimer(self)
        self._job_refresh.setSingleShot(True)
        self._job_refresh.timeout.connect(lambda: self._spawn(self.load_job(self.job_id)))
        self._list_refresh = QTimer(self)
        self._list_refresh.setSingleShot(True)
        self._list_refresh.timeout.connect(lambda: self._spawn(self.load_jobs()))
        self._last_job_load = 0.0
        fleet.changed.connect(self.on_changes)

    # -- tasks ---------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def show_message(self, text: str) -> None:
        self.message.setText(text)
        self.message.setVisible(bool(text))

    # -- loading -------------------------------------------------------------------------

    async def load_jobs(self, limit: int = 100) -> None:
        try:
            reply = await self.request("jobs", limit=limit)
        except (AdminError, ConnectionError, TimeoutError) as exc:
            self.show_message(f"Could not list jobs: {exc}")
            return
        jobs = reply.get("jobs") if isinstance(reply, dict) else None
        if isinstance(jobs, list):
            self.fleet.set_jobs(jobs)
            # Show the list now, from the model; the fleet's batch still goes out at its own
            # pace (flushing it here would hand every other view an early, extra batch).
            self._refresh_list()
            if self.job_id is None and self.job_model.rows:
                self.select_job(self.job_model.rows[0].job_id)

    async def load_job(self, job_id: str | None) -> None:
        if job_id is None:
            return
        self._last_job_load = time.monotonic()
        try:
            reply = await self.request("job", job_id=job_id)
        except (AdminError, ConnectionError, TimeoutError) as exc:
            self.show_message(f"Could not load job {job_id}: {exc}")
            return
        if isinstance(reply, dict) and isinstance(reply.get("job"), dict):
            self.fleet.set_job(reply["job"], reply.get("commands") or [])
            self._refresh_list()
            if job_id == self.job_id:
                self._refresh_detail()

    async def load_output(self, command_id: str) -> None:
        try:
            reply = await self.request("output", command_id=command_id)
        except (AdminError, ConnectionError, TimeoutError) as exc:
            self.show_message(f"Could not load output: {exc}")
            return
        chunks = reply.get("chunks") if isinstance(reply, dict) else None
        if isinstance(chunks, list):
            self.fleet.set_output(command_id, chunks)
            if command_id == self.command_id:
                self._render_output()

    async def cancel_job(self) -> None:
        job_id = self.job_id
        if job_id is None:
            return
        try:
            reply = await self.request("cancel", job_id=job_id)
        except AdminError as exc:
            if exc.code == "forbidden":
                self.show_message("Cancelling needs the operator role; this token is a viewer.")
            else:
                self.show_message(f"The hub did not cancel the job: {exc.message}")
            return
        except (ConnectionError, TimeoutError) as exc:
            self.show_message(f"Not cancelled: {exc}")
            return
        cancelled = len(reply.get("cancelled") or []) if isinstance(reply, dict) else 0
        requested = len(reply.get("requested") or []) if isinstance(reply, dict) else 0
        self.show_message(
            f"Cancelled {cancelled} queued command(s); asked {requested} running one(s) to stop."
        )
        await self.load_job(job_id)

    # -- selection -----------------------------------------------------------------------

    def show_job(self, job_id: str) -> None:
        """A job was just dispatched: fetch it, list it first and select it."""
        self.job_id = job_id
        self._spawn(self._show_job(job_id))

    async def _show_job(self, job_id: str) -> None:
        await self.load_job(job_id)
        self.select_job(job_id)

    def select_job(self, job_id: str) -> None:
        self._refresh_list()
        for row, job in enumerate(self.job_model.rows):
            if job.job_id == job_id:
                self.job_view.selectRow(row)
                break
        self.job_id = job_id
        self._refresh_detail()

    def _job_row_changed(self, current: QModelIndex, _previous: QModelIndex) -> None:
        jobs = self.job_model.rows
        if not current.isValid() or current.row() >= len(jobs):
            return
        job_id = jobs[current.row()].job_id
        if job_id != self.job_id:
            self.job_id = job_id
            self.command_id = None
            self.output.clear()
            self._refresh_detail()
            self._spawn(self.load_job(job_id))

    def _command_row_changed(self, current: QModelIndex, _previous: QModelIndex) -> None:
        commands = self.command_model.rows
        if not current.isValid() or current.row() >= len(commands):
            return
        command_id = commands[current.row()].command_id
        if command_id != self.command_id:
            self.command_id = command_id
            self._render_output()
            self._spawn(self.load_output(command_id))

    # -- updates -------------------------------------------------------------------------

    def on_changes(self, changes: Changes) -> None:
        if changes.reset and not self.fleet.jobs:
            self._list_refresh.start(0)
        if changes.jobs:
            self._refresh_list()
            if self.job_id in changes.jobs:
                self._refresh_detail()
                job = self.fleet.jobs.get(self.job_id)
                if job is not None and not self._job_refresh.isActive():
                    wait = self._last_job_load + 1.0 - time.monotonic()
                    self._job_refresh.start(max(0, int(wait * 1000)))
            unknown = [j for j in changes.jobs if j not in self.fleet.jobs]
            if unknown and not self._list_refresh.isActive():
                self._list_refresh.start(1000)
        if changes.outputs and self.command_id is not None:
            mine = [o for o in changes.outputs if o["command_id"] == self.command_id]
            if mine:
                self._append_output(mine)

    def _refresh_list(self) -> None:
        jobs = sorted(self.fleet.jobs.values(), key=lambda j: j.created_at, reverse=True)
        current = self.job_id
        self.job_view.selectionModel().blockSignals(True)
        self.job_model.set_rows(jobs)
        for row, job in enumerate(jobs):
            if job.job_id == current:
                self.job_view.selectRow(row)
                break
        self.job_view.selectionModel().blockSignals(False)

    def job_commands(self) -> list[CommandView]:
        if self.job_id is None:
            return []
        return sorted(self.fleet.commands_of_job(self.job_id), key=lambda c: c.agent_id)

    def local_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for command in self.job_commands():
            counts[command.state] = counts.get(command.state, 0) + 1
        return counts

    def _refresh_detail(self) -> None:
        job = self.fleet.jobs.get(self.job_id) if self.job_id else None
        commands = self.job_commands()
        self.command_model.set_rows(commands)
        if job is None:
            self.title.setText("No job selected. Dispatch with Ctrl+Enter.")
            self.cancel_button.setEnabled(False)
            self.progress.setRange(0, 1)
            self.progress.setValue(0)
            self.counts_label.setText("")
            return
        # Commands seen live are newer than the job's last counts: use them when complete.
        counts = self.local_counts() if len(commands) >= job.total else job.counts
        finished = _finished(counts)
        self.title.setText(f"{job.name} · job {job.job_id} · {job.state}")
        self.progress.setRange(0, max(1, job.total))
        self.progress.setValue(finished)
        self.counts_label.setText(
            ", ".join(f"{state} {n}" for state, n in sorted(counts.items()) if n)
            + f"  ·  target {json.dumps(job.target, separators=(',', ':'))[:120]}"
        )
        self.cancel_button.setEnabled(finished < job.total)

    def _render_output(self) -> None:
        self.output.clear()
        if self.command_id is None:
            return
        self._append_output(self.fleet.outputs.get(self.command_id, []))
        command = self.fleet.commands.get(self.command_id)
        if command is not None and command.truncated:
            self._append_output([{"stream": "note", "data": "\n[output truncated by the hub]\n"}])

    def _append_output(self, chunks: list[dict[str, Any]]) -> None:
        cursor = self.output.textCursor()
        cursor.movePosition(QTextCursor.MoveOperation.End)
        normal = QTextCharFormat()
        err = QTextCharFormat()
        err.setForeground(QColor("#E69F00"))
        note = QTextCharFormat()
        note.setForeground(QColor("#9A9A9A"))
        for chunk in chunks:
            stream = chunk.get("stream")
            fmt = err if stream == "stderr" else note if stream == "note" else normal
            cursor.insertText(str(chunk.get("data", "")), fmt)  # plain text, never parsed
        self.output.setTextCursor(cursor)
