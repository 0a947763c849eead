"""What the console remembers between runs, and where the admin token goes.

The hub URL, the CA file, the theme and the window layout live in ``QSettings`` (plain
text: an INI file on Linux). The **token never does** unless the user explicitly opts in:

* when an OS keyring is available (``keyring`` with a real backend: Secret Service,
  macOS Keychain, Windows Credential Locker), a remembered token is stored there, keyed by
  hub URL;
* without one, the token is kept only for the session; the connect dialog offers to store
  it in the settings file, says which file, and says that it is plaintext.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from PySide6.QtCore import QSettings

log = logging.getLogger(__name__)

__all__ = ["KEYRING_SERVICE", "ConsoleSettings", "TokenStore", "keyring_backend_name"]

KEYRING_SERVICE = "tether-console"
ORGANIZATION = "Tether"
APPLICATION = "console"


def _keyring():  # type: ignore[no-untyped-def]
    try:
        import keyring
        from keyring.backends import fail
    except Exception:  # keyring missing or broken: behave as "no keyring"
        return None
    try:
        backend = keyring.get_keyring()
    except Exception:
        return None
    if isinstance(backend, fail.Keyring) or getattr(backend, "priority", 0) <= 0:
        return None
    return keyring


def keyring_backend_name() -> str | None:
    """A readable name of the OS keyring in use, or None when there is none."""
    kr = _keyring()
    if kr is None:
        return None
    backend = kr.get_keyring()
    return getattr(backend, "name", None) or type(backend).__name__


@dataclass
class TokenLookup:
    token: str | None
    source: str  # "keyring", "settings (plaintext)", or "" when none was found


class TokenStore:
    """Remembers admin tokens per hub URL: OS keyring, or plaintext only when opted in."""

    def __init__(self, settings: ConsoleSettings) -> None:
        self.settings = settings
        self.session_tokens: dict[str, str] = {}

    @property
    def keyring_available(self) -> bool:
        return _keyring() is not None

    def load(self, hub_url: str) -> TokenLookup:
        if hub_url in self.session_tokens:
            return TokenLookup(self.session_tokens[hub_url], "session")
        kr = _keyring()
        if kr is not None:
            try:
                token = kr.get_password(KEYRING_SERVICE, hub_url)
            except Exception as exc:
                log.warning("keyring read failed: %s", exc)
                token = None
            if token:
                return TokenLookup(token, "keyring")
        plain = self.settings.plaintext_token(hub_url)
        if plain:
            return TokenLookup(plain, "settings (plaintext)")
        return TokenLookup(None, "")

    def save(self, hub_url: str, token: str, *, remember: bool, plaintext_ok: bool = False) -> str:
        """Keep ``token``; returns where it went: "keyring", "plaintext", or "session"."""
        self.session_tokens[hub_url] = token
        if not remember:
            self.forget(hub_url, session=False)
            return "session"
        kr = _keyring()
        if kr is not None:
            try:
                kr.set_password(KEYRING_SERVICE, hub_url, token)
                self.settings.set_plaintext_token(hub_url, None)
                return "keyring"
            except Exception as exc:
                log.warning("keyring write failed: %s", exc)
        if plaintext_ok:
            self.settings.set_plaintext_token(hub_url, token)
            return "plaintext"
        return "session"

    def forget(self, hub_url: str, *, session: bool = True) -> None:
        if session:
            self.session_tokens.pop(hub_url, None)
        kr = _keyring()
        if kr is not None:
            try:
                kr.delete_password(KEYRING_SERVICE, hub_url)
            except Exception as exc:  # nothing stored there is fine
                log.debug("keyring delete: %s", exc)
        self.settings.set_plaintext_token(hub_url, None)


class ConsoleSettings:
    """Typed access to the console's QSettings (``path`` for tests and portable installs)."""

    def __init__(self, path: str | None = None) -> None:
        if path is not None:
            self.qsettings = QSettings(path, QSettings.Format.IniFormat)
        else:
            self.qsettings = QSettings(
                QSettings.Format.IniFormat, QSettings.Scope.UserScope, ORGANIZATION, APPLICATION
            )

    @property
    def file_name(self) -> str:
        return self.qsettings.fileName()

    def _str(self, key: str) -> str | None:
        value = self.qsettings.value(key)
        return str(value) if value not in (None, "") else None

    @property
    def hub_url(self) -> str | None:
        return self._str("connection/hub_url")

    @hub_url.setter
    def hub_url(self, value: str | None) -> None:
        self.qsettings.setValue("connection/hub_url", value or "")

    @property
    def ca_file(self) -> str | None:
        return self._str("connection/ca_file")

    @ca_file.setter
    def ca_file(self, value: str | None) -> None:
        self.qsettings.setValue("connection/ca_file", value or "")

    @property
    def light_theme(self) -> bool:
        return str(self.qsettings.value("ui/light_theme", "false")).lower() == "true"

    @light_theme.setter
    def light_theme(self, value: bool) -> None:
        self.qsettings.setValue("ui/light_theme", "true" if value else "false")

    def plaintext_token(self, hub_url: str) -> str | None:
        tokens = self.qsettings.value("plaintext_tokens/" + _key(hub_url))
        return str(tokens) if tokens else None

    def set_plaintext_token(self, hub_url: str, token: str | None) -> None:
        key = "plaintext_tokens/" + _key(hub_url)
        if token:
            self.qsettings.setValue(key, token)
        else:
            self.qsettings.remove(key)
        self.qsettings.sync()

    def save_geometry(self, name: str, data: bytes) -> None:
        self.qsettings.setValue(f"ui/{name}", data)

    def geometry(self, name: str) -> bytes | None:
        value = self.qsettings.value(f"ui/{name}")
        return bytes(value) if value else None

    def sync(self) -> None:
        self.qsettings.sync()


def _key(hub_url: str) -> str:
    # QSettings treats "/" as a group separator; keep the URL in one key.
    return hub_url.replace("/", "|").replace("\\", "|")
