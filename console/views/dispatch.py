"""Dispatch: choose targets (the selection or a selector), a command the targets declared,
its arguments and limits, confirm ``exec``, send.

The command list is built from the capabilities of the targets as the console knows them,
with how many targets declared each one. Known commands get a small form (``ping`` and
``sysinfo`` take no arguments, ``exec`` an argv line split like a shell would, without
running one); any other command takes its arguments as JSON. The request is checked with
the protocol's own ``Dispatch`` model before it goes out, and ``exec`` always asks first.
"""

from __future__ import annotations

import asyncio
import json
import shlex
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QButtonGroup,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPlainTextEdit,
    QRadioButton,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from console.client import AdminError
from console.fleet import Agent, FleetModel
from hub.protocol.messages import Dispatch, Selector, ValidationError, describe_validation_error
from hub.protocol.selectors import selector_matches

from .common import plain_label, shortcut

__all__ = ["DispatchDialog", "agents_matching", "parse_labels"]

Requester = Callable[..., Awaitable[Any]]
NO_ARG_COMMANDS = ("ping", "sysinfo")


def parse_labels(text: str) -> dict[str, str]:
    """``site=berlin, tier=edge`` → a dict; raises ValueError on a term without ``=``."""
    labels: dict[str, str] = {}
    for part in (p.strip() for p in text.replace(";", ",").split(",")):
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"label {part!r} needs the form key=value")
        labels[key.strip()] = value.strip()
    return labels


def agents_matching(fleet: FleetModel, selector: Selector) -> list[Agent]:
    """The agents the console knows that the hub's selector rules would match."""
    return [
        agent
        for agent in fleet.agents.values()
        if selector_matches(
            selector,
            agent_id=agent.view.agent_id,
            region=agent.view.region,
            platform=agent.view.platform,
            labels=agent.view.labels,
            state=agent.view.state,
        )
    ]


def _limit(text: str) -> int | str | None:
    text = text.strip()
    if not text:
        return None
    if text.endswith("%"):
        return text
    return int(text)


class DispatchDialog(QDialog):
    """Non-modal; emits :attr:`dispatched` with the hub's reply once a job is accepted."""

    dispatched = Signal(object)  # the dispatch reply's data: {job_id, command_ids, refused}

    def __init__(
        self,
        fleet: FleetModel,
        request: Requester,
        selected: set[str],
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.setWindowTitle("Dispatch a command")
        self.fleet = fleet
        self.request = request
        self.selected = sorted(selected)
        self.confirm_box: QMessageBox | None = None
        self.tasks: set[asyncio.Future[Any]] = set()
        layout = QVBoxLayout(self)

        # -- target
        target_box = QGroupBox("Target")
        target_layout = QVBoxLayout(target_box)
        self.use_selection = QRadioButton(f"Selected agents ({len(self.selected):,})")
        self.use_selector = QRadioButton("Selector (shell-style globs, case-sensitive)")
        group = QButtonGroup(self)
        group.addButton(self.use_selection)
        group.addButton(self.use_selector)
        target_layout.addWidget(self.use_selection)
        target_layout.addWidget(self.use_selector)
        selector_form = QFormLayout()
        self.sel_agent = QLineEdit()
        self.sel_agent.setPlaceholderText("e.g. edge-berlin-*")
        self.sel_region = QLineEdit()
        self.sel_region.setPlaceholderText("e.g. eu-*")
        self.sel_platform = QLineEdit()
        self.sel_labels = QLineEdit()
        self.sel_labels.setPlaceholderText("site=berlin, tier=edge")
        self.sel_status = QComboBox()
        self.sel_status.addItems(["any", "online", "offline"])
        selector_form.addRow("Agent id", self.sel_agent)
        selector_form.addRow("Region", self.sel_region)
        selector_form.addRow("Platform", self.sel_platform)
        selector_form.addRow("Labels", self.sel_labels)
        selector_form.addRow("Status", self.sel_status)
        self.selector_widget = QWidget()
        self.selector_widget.setLayout(selector_form)
        target_layout.addWidget(self.selector_widget)
        self.target_summary = plain_label("")
        target_layout.addWidget(self.target_summary)
        layout.addWidget(target_box)

        # -- command and arguments
        command_box = QGroupBox("Command")
        command_form = QFormLayout(command_box)
        self.command = QComboBox()
        command_form.addRow("Command", self.command)
        self.args_stack = QStackedWidget()
        self.no_args = QLabel("This command takes no arguments.")
        self.exec_argv = QLineEdit()
        self.exec_argv.setPlaceholderText("program and arguments, e.g.  uptime  or  df -h /")
        exec_page = QWidget()
        exec_form = QFormLayout(exec_page)
        exec_form.setContentsMargins(0, 0, 0, 0)
        exec_form.addRow("argv", self.exec_argv)
        self.exec_cwd = QLineEdit()
        self.exec_cwd.setPlaceholderText("optional working directory")
        exec_form.addRow("cwd", self.exec_cwd)
        self.json_args = QPlainTextEdit("{}")
        self.json_args.setTabChangesFocus(True)
        self.json_args.setMaximumHeight(90)
        self.args_stack.addWidget(self.no_args)
        self.args_stack.addWidget(exec_page)
        self.args_stack.addWidget(self.json_args)
        command_form.addRow("Arguments", self.args_stack)
        layout.addWidget(command_box)

        # -- limits
        limits = QGroupBox("Limits")
        limits_form = QFormLayout(limits)
        self.timeout = QDoubleSpinBox()
        self.timeout.setRange(1, 86_400)
        self.timeout.setValue(60)
        self.timeout.setSuffix(" s")
        self.ttl = QDoubleSpinBox()
        self.ttl.setRange(1, 30 * 86_400)
        self.ttl.setValue(600)
        self.ttl.setSuffix(" s")
        self.max_concurrency = QLineEdit()
        self.max_concurrency.setPlaceholderText("unlimited, or N, or P%")
        self.max_errors = QLineEdit()
        self.max_errors.setPlaceholderText("unlimited, or N, or P%")
        row = QHBoxLayout()
        row.addWidget(QLabel("timeout"))
        row.addWidget(self.timeout)
        row.addWidget(QLabel("ttl (queued offline targets wait this long)"))
        row.addWidget(self.ttl)
        limits_form.addRow(row)
        limits_form.addRow("Max concurrency", self.max_concurrency)
        limits_form.addRow("Max errors", self.max_errors)
        layout.addWidget(limits)

        self.error = plain_label("")
        self.error.setObjectName("inlineError")
        self.error.setWordWrap(True)
        layout.addWidget(self.error)
        self.buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel
        )
        self.send_button = self.buttons.button(QDialogButtonBox.StandardButton.Ok)
        self.send_button.setText("Send (Ctrl+Enter)")
        self.buttons.accepted.connect(self.send)
        self.buttons.rejected.connect(self.reject)
        layout.addWidget(self.buttons)
        for keys in ("Ctrl+Return", "Ctrl+Enter"):
            shortcut(keys, self, self.send)

        for widget in (self.sel_agent, self.sel_region, self.sel_platform, self.sel_labels):
            widget.textChanged.connect(self.update_targets)
        self.sel_status.currentIndexChanged.connect(self.update_targets)
        self.use_selection.toggled.connect(self.update_targets)
        self.command.currentIndexChanged.connect(self._command_changed)
        if self.selected:
            self.use_selection.setChecked(True)
        else:
            self.use_selection.setEnabled(False)
            self.use_selector.setChecked(True)
        self.update_targets()
        self.resize(560, 560)

    # -- target --------------------------------------------------------------------------

    def selector(self) -> Selector:
        def glob(edit: QLineEdit) -> str | None:
            return edit.text().strip() or None

        return Selector.model_validate(
            {
                "agent_id": glob(self.sel_agent),
                "region": glob(self.sel_region),
                "platform": glob(self.sel_platform),
                "labels": parse_labels(self.sel_labels.text()),
                "status": self.sel_status.currentText(),
            }
        )

    def target(self) -> dict[str, Any]:
        if self.use_selection.isChecked():
            return {"agent_ids": list(self.selected)}
        return {"selector": self.selector().model_dump(exclude_none=True, exclude_defaults=True)}

    def target_agents(self) -> list[Agent]:
        if self.use_selection.isChecked():
            agents = self.fleet.agents
            return [agents[i] for i in self.selected if i in agents]
        try:
            return agents_matching(self.fleet, self.selector())
        except (ValueError, ValidationError):
            return []

    def update_targets(self) -> None:
        self.selector_widget.setEnabled(self.use_selector.isChecked())
        agents = self.target_agents()
        offline = sum(1 for a in agents if a.view.state not in ("online", "stale"))
        text = f"{len(agents):,} agents"
        if offline:
            text += f" ({offline:,} offline: queued until the ttl)"
        if self.use_selector.isChecked():
            text += " as the console knows them; the hub resolves the selector"
        self.target_summary.setText(text)
        capabilities: Counter[str] = Counter()
        for agent in agents:
            capabilities.update(set(agent.view.capabilities))
        current = self.command.currentData()
        self.command.blockSignals(True)
        self.command.clear()
        for name, count in sorted(capabilities.items(), key=lambda kv: (-kv[1], kv[0])):
            label = name if count == len(agents) else f"{name}  ({count:,} of {len(agents):,})"
            self.command.addItem(label, name)
        if current is not None:
            index = self.command.findData(current)
            if index >= 0:
                self.command.setCurrentIndex(index)
        self.command.blockSignals(False)
        self._command_changed()

    def _command_changed(self) -> None:
        name = self.command.currentData()
        if name in NO_ARG_COMMANDS:
            self.args_stack.setCurrentWidget(self.no_args)
        elif name == "exec":
            self.args_stack.setCurrentIndex(1)
        else:
            self.args_stack.setCurrentWidget(self.json_args)
        self.send_button.setEnabled(name is not None)

    # -- building and sending ------------------------------------------------------------

    def args(self) -> dict[str, Any]:
        name = self.command.currentData()
        if name in NO_ARG_COMMANDS:
            return {}
        if name == "exec":
            try:
                argv = shlex.split(self.exec_argv.text())
            except ValueError as exc:
                raise ValueError(f"argv: {exc}") from None
            if not argv:
                raise ValueError("exec needs a program to run")
            args: dict[str, Any] = {"argv": argv}
            if self.exec_cwd.text().strip():
                args["cwd"] = self.exec_cwd.text().strip()
            return args
        text = self.json_args.toPlainText().strip() or "{}"
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"arguments are not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError("arguments must be a JSON object")
        return value

    def build(self) -> dict[str, Any]:
        """The dispatch request's fields, checked with the protocol model."""
        name = self.command.currentData()
        if not name:
            raise ValueError("no command: the targets declared none")
        try:
            fields = {
                "target": self.target(),
                "name": name,
                "args": self.args(),
                "timeout": float(self.timeout.value()),
                "ttl": float(self.ttl.value()),
            }
            for key, edit in (
                ("max_concurrency", self.max_concurrency),
                ("max_errors", self.max_errors),
            ):
                value = _limit(edit.text())
                if value is not None:
                    fields[key] = value
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        try:
            Dispatch.model_validate({"type": "dispatch", "id": 0, **fields})
        except ValidationError as exc:
            raise ValueError(describe_validation_error(exc)) from None
        return fields

    def send(self) -> None:
        try:
            fields = self.build()
        except ValueError as exc:
            self.error.setText(str(exc))
            return
        self.error.setText("")
        if fields["name"] == "exec":
            count = len(self.target_agents())
            argv = " ".join(shlex.quote(a) for a in fields["args"]["argv"])
            box = QMessageBox(
                QMessageBox.Icon.Warning,
                "Run a program on agents?",
                f"Run this program on {count:,} agent{'s' if count != 1 else ''}?",
                QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.Cancel,
                self,
            )
            box.setTextFormat(Qt.TextFormat.PlainText)
            box.setInformativeText(argv)
            box.setDefaultButton(QMessageBox.StandardButton.Cancel)
            box.button(QMessageBox.StandardButton.Yes).setText("Run")
            box.finished.connect(
                lambda result: (
                    self._confirmed(fields) if result == QMessageBox.StandardButton.Yes else None
                )
            )
            self.confirm_box = box
            box.open()
            return
        self._spawn(self.dispatch(fields))

    def _confirmed(self, fields: dict[str, Any]) -> None:
        self.confirm_box = None
        self._spawn(self.dispatch(fields))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def dispatch(self, fields: dict[str, Any]) -> dict[str, Any] | None:
        self.send_button.setEnabled(False)
        try:
            reply = await self.request("dispatch", **fields)
        except AdminError as exc:
            if exc.code == "forbidden":
                self.error.setText(
                    "This console's token is a viewer token: dispatching needs the operator role."
                )
            else:
                self.error.setText(f"The hub refused the job ({exc.code}): {exc.message}")
            self.send_button.setEnabled(True)
            return None
        except (ConnectionError, TimeoutError) as exc:
            self.error.setText(f"Not sent: {exc}")
            self.send_button.setEnabled(True)
            return None
        self.dispatched.emit(reply)
        self.accept()
        return reply
