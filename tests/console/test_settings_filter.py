"""Settings (the token never lands in plain settings unless asked) and the filter language."""

from __future__ import annotations

from pathlib import Path

import keyring
import pytest
from keyring.backend import KeyringBackend
from keyring.backends import fail

from console.connect import ConnectDialog
from console.fleet import Agent
from console.settings import ConsoleSettings, TokenStore
from console.views.agents import AgentFilter, parse_filter
from hub.protocol.messages import AgentView

SECRET = "ttm_secret_value_123"


class MemoryKeyring(KeyringBackend):
    """An OS keyring stand-in that lives in memory (the machine has no Secret Service)."""

    priority = 10  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.store: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.store.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.store[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        self.store.pop((service, username), None)


@pytest.fixture
def no_keyring():
    """The machine's situation: no OS keyring (keyring's own 'fail' backend)."""
    old = keyring.get_keyring()
    keyring.set_keyring(fail.Keyring())
    yield
    keyring.set_keyring(old)


@pytest.fixture
def memory_keyring():
    old = keyring.get_keyring()
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    yield backend
    keyring.set_keyring(old)


def test_without_a_keyring_the_token_stays_in_the_session(tmp_path: Path, no_keyring):
    settings = ConsoleSettings(str(tmp_path / "s.ini"))
    tokens = TokenStore(settings)
    assert not tokens.keyring_available
    assert tokens.save("ws://h:1", SECRET, remember=True) == "session"
    settings.hub_url = "ws://h:1"
    settings.sync()
    assert SECRET not in (tmp_path / "s.ini").read_text()
    assert tokens.load("ws://h:1").source == "session"
    assert TokenStore(ConsoleSettings(str(tmp_path / "s.ini"))).load("ws://h:1").token is None


def test_plaintext_only_when_the_user_opts_in(tmp_path: Path, no_keyring):
    settings = ConsoleSettings(str(tmp_path / "s.ini"))
    tokens = TokenStore(settings)
    assert tokens.save("ws://h:1", SECRET, remember=True, plaintext_ok=True) == "plaintext"
    assert SECRET in (tmp_path / "s.ini").read_text()
    found = TokenStore(ConsoleSettings(str(tmp_path / "s.ini"))).load("ws://h:1")
    assert (found.token, found.source) == (SECRET, "settings (plaintext)")
    tokens.forget("ws://h:1")
    assert SECRET not in (tmp_path / "s.ini").read_text()


def test_with_a_keyring_the_token_goes_there(tmp_path: Path, memory_keyring: MemoryKeyring):
    settings = ConsoleSettings(str(tmp_path / "s.ini"))
    tokens = TokenStore(settings)
    assert tokens.keyring_available
    assert tokens.save("ws://h:1", SECRET, remember=True, plaintext_ok=True) == "keyring"
    settings.hub_url = "ws://h:1"
    settings.sync()
    assert SECRET not in (tmp_path / "s.ini").read_text()
    assert memory_keyring.store == {("tether-console", "ws://h:1"): SECRET}
    found = TokenStore(ConsoleSettings(str(tmp_path / "s.ini"))).load("ws://h:1")
    assert (found.token, found.source) == (SECRET, "keyring")
    tokens.forget("ws://h:1")
    assert not memory_keyring.store


def test_connect_dialog_says_where_and_that_it_is_plaintext(tmp_path: Path, qtbot, no_keyring):
    settings = ConsoleSettings(str(tmp_path / "s.ini"))
    dialog = ConnectDialog(settings, TokenStore(settings), "ws://127.0.0.1:1")
    qtbot.addWidget(dialog)
    assert "PLAINTEXT" in dialog.plaintext.text()
    assert str(tmp_path / "s.ini") in dialog.plaintext.text()
    assert not dialog.plaintext.isEnabled()  # only once "remember" is ticked
    dialog.remember.setChecked(True)
    assert dialog.plaintext.isEnabled()
    dialog.token.setText(SECRET)
    dialog.accept()  # remember without the plaintext opt-in: session only
    assert dialog.stored_in == "session"
    assert SECRET not in (tmp_path / "s.ini").read_text()
    assert settings.hub_url == "ws://127.0.0.1:1"


def _agent(agent_id: str, **fields) -> Agent:
    return Agent(AgentView.model_validate({"agent_id": agent_id, **fields}))


AGENTS = [
    _agent("edge-berlin-1", region="eu-central", platform="linux", version="1.4.0",
           hostname="berlin-gw", labels={"site": "berlin", "tier": "edge"}, state="online",
           status="ok", capabilities=["ping", "exec"], hub_id="hub-a"),
    _agent("edge-paris-1", region="eu-west", platform="Windows", version="1.3.2",
           hostname="paris-gw", labels={"site": "paris"}, state="offline", hub_id="hub-b"),
    _agent("core-tokyo-1", region="ap-northeast", platform="linux", version="1.10.0",
           hostname="tokyo-core", labels={"tier": "core"}, state="online", status="degraded",
           capabilities=["ping"], hub_id="hub-a"),
    _agent("lost-1", region="", state="stale"),
]  # fmt: skip


def _ids(text: str) -> list[str]:
    flt = AgentFilter(text)
    return [a.agent_id for a in AGENTS if flt(a)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ["edge-berlin-1", "edge-paris-1", "core-tokyo-1", "lost-1"]),
        ("region:eu-*", ["edge-berlin-1", "edge-paris-1"]),
        ("region:eu", ["edge-berlin-1", "edge-paris-1"]),  # no wildcard: prefix
        ("region:=eu", []),  # =: exact
        ("region:=", ["lost-1"]),
        ("status:offline", ["edge-paris-1"]),
        ("status:degraded", ["core-tokyo-1"]),
        ("status:online", ["edge-berlin-1", "core-tokyo-1"]),  # the hub's state counts too
        ("status:stale status:offline", ["edge-paris-1", "lost-1"]),  # same field: either
        ("label:site=berlin", ["edge-berlin-1"]),
        ("label:tier", ["edge-berlin-1", "core-tokyo-1"]),
        ("tier:core", ["core-tokyo-1"]),  # unknown field = label key
        ("platform:windows", ["edge-paris-1"]),  # case-insensitive
        ("version:1.4", ["edge-berlin-1"]),
        ("hub:hub-a -status:degraded", ["edge-berlin-1"]),
        ("cap:exec", ["edge-berlin-1"]),
        ("gw", ["edge-berlin-1", "edge-paris-1"]),  # free text: hostnames
        ("BERLIN", ["edge-berlin-1"]),
        ("site=paris", ["edge-paris-1"]),  # free text finds labels
        ('id:"edge-*" region:eu-c*', ["edge-berlin-1"]),
        ("id:edge-[bp]*", ["edge-berlin-1", "edge-paris-1"]),
        ('"unclosed', []),
    ],
)
def test_filter_language(text: str, expected: list[str]):
    assert _ids(text) == expected


def test_filter_parse_is_forgiving():
    assert [t.field for t in parse_filter("a:b:c x -y: 'z w'")] == [
        "label",
        "text",
        "label",
        "text",
    ]
