"""The connect dialog: hub URL, admin token, CA file, and where the token may be kept.

The hub field may list several URLs separated by commas (the hubs of one cluster: the
console fails over from one to the next); the token is remembered under the first.
"""

from __future__ import annotations

from PySide6.QtWidgets import (
    QCheckBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from .settings import ConsoleSettings, TokenStore, keyring_backend_name
from .views.common import plain_label

__all__ = ["ConnectDialog"]


class ConnectDialog(QDialog):
    def __init__(
        self,
        settings: ConsoleSettings,
        tokens: TokenStore,
        hub: str | None = None,
        ca_file: str | None = None,
        insecure: bool = False,
        message: str = "",
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.settings = settings
        self.tokens = tokens
        self.setWindowTitle("Connect to a Tether hub")
        layout = QVBoxLayout(self)
        if message:
            note = plain_label(message)
            note.setObjectName("inlineMessage")
            note.setWordWrap(True)
            layout.addWidget(note)
        form = QFormLayout()
        self.hub = QLineEdit(hub or settings.hub_url or "ws://127.0.0.1:8765")
        self.hub.setPlaceholderText("ws://host:port or wss://host:port (several: a, b, c)")
        form.addRow("Hub URL", self.hub)
        self.token = QLineEdit()
        self.token.setEchoMode(QLineEdit.EchoMode.Password)
        self.token.setPlaceholderText("admin token (viewer, operator or admin)")
        form.addRow("Admin token", self.token)
        ca_row = QHBoxLayout()
        self.ca_file = QLineEdit(ca_file or settings.ca_file or "")
        self.ca_file.setPlaceholderText("system CAs")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        ca_row.addWidget(self.ca_file)
        ca_row.addWidget(browse)
        form.addRow("CA file", ca_row)
        self.insecure = QCheckBox("Do not verify the hub's certificate (dangerous: testing only)")
        self.insecure.setChecked(insecure)
        form.addRow("", self.insecure)
        layout.addLayout(form)

        backend = keyring_backend_name()
        self.remember = QCheckBox()
        self.plaintext = QCheckBox()
        self.plaintext.setObjectName("plaintextWarning")
        if backend is not None:
            self.remember.setText(f"Remember the token in the OS keyring ({backend})")
            self.plaintext.hide()
        else:
            self.remember.setText("Remember the token")
            self.plaintext.setText(
                f"No OS keyring found. Store the token in PLAINTEXT in {settings.file_name} "
                "(anyone who can read that file can use it)"
            )
            self.plaintext.setEnabled(False)
            self.remember.toggled.connect(self.plaintext.setEnabled)
        layout.addWidget(self.remember)
        layout.addWidget(self.plaintext)
        self.where = plain_label(
            "Without this the token is kept for this session only."
            if backend is None
            else "Without this the token is kept for this session only; it is never written "
            "to the settings file."
        )
        self.where.setWordWrap(True)
        layout.addWidget(self.where)
        buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel
        )
        buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Connect")
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout.addWidget(buttons)
        self.hub.textChanged.connect(self._lookup_token)
        self._lookup_token()
        self.resize(520, 0)

    def _browse(self) -> None:
        name, _ = QFileDialog.getOpenFileName(self, "CA bundle", "", "PEM (*.pem *.crt);;All (*)")
        if name:
            self.ca_file.setText(name)

    def _first_url(self) -> str:
        from .app import parse_hub_urls

        urls = parse_hub_urls(self.hub.text())
        return urls[0] if urls else ""

    def _lookup_token(self) -> None:
        found = self.tokens.load(self._first_url())
        if found.token and not self.token.text():
            self.token.setText(found.token)
            self.remember.setChecked(found.source in ("keyring", "settings (plaintext)"))
            if found.source == "settings (plaintext)":
                self.plaintext.setChecked(True)

    def accept(self) -> None:
        from .app import parse_hub_urls

        urls = parse_hub_urls(self.hub.text())
        hub = urls[0] if urls else ""
        if (
            not urls
            or not all(u.startswith(("ws://", "wss://")) for u in urls)
            or not self.token.text().strip()
        ):
            self.where.setText("Enter a ws:// or wss:// hub URL and an admin token.")
            return
        token = self.token.text().strip()
        where = self.tokens.save(
            hub,
            token,
            remember=self.remember.isChecked(),
            plaintext_ok=self.plaintext.isChecked(),
        )
        self.stored_in = where
        self.settings.hub_url = ", ".join(urls)
        self.settings.ca_file = self.ca_file.text().strip() or None
        self.settings.sync()
        super().accept()

    def values(self) -> tuple[str, str, str | None, bool]:
        return (
            self.hub.text().strip(),
            self.token.text().strip(),
            self.ca_file.text().strip() or None,
            self.insecure.isChecked(),
        )
