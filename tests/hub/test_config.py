"""Configuration precedence: flags > environment > file > defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from hub.config import HubConfig, load_config, parse_listen


def test_defaults() -> None:
    config = HubConfig()
    assert (config.listen, config.heartbeat_interval, config.max_agents) == (
        "127.0.0.1:8765", 15.0, 50_000,
    )  # fmt: skip


def test_precedence(tmp_path: Path) -> None:
    file = tmp_path / "hub.toml"
    file.write_text('[hub]\nlisten = "0.0.0.0:1"\nmax_agents = 5\nhub_id = "from-file"\n')
    config = load_config(file, {}, {})
    assert (config.listen, config.max_agents, config.hub_id) == ("0.0.0.0:1", 5, "from-file")
    config = load_config(file, {}, {"TETHER_LISTEN": "127.0.0.1:2", "TETHER_MAX_AGENTS": "6"})
    assert (config.listen, config.max_agents) == ("127.0.0.1:2", 6)
    config = load_config(
        file, {"listen": "127.0.0.1:3", "max_agents": None}, {"TETHER_LISTEN": "127.0.0.1:2"}
    )
    assert (config.listen, config.max_agents) == ("127.0.0.1:3", 5)


def test_top_level_keys_and_origins_from_env(tmp_path: Path) -> None:
    file = tmp_path / "hub.toml"
    file.write_text("heartbeat_interval = 5\n")
    config = load_config(file, {}, {"TETHER_ALLOWED_ORIGINS": "https://a, https://b"})
    assert config.heartbeat_interval == 5
    assert config.allowed_origins == ["https://a", "https://b"]


def test_unknown_or_invalid_keys_are_refused(tmp_path: Path) -> None:
    file = tmp_path / "hub.toml"
    file.write_text("heartbeat_intervall = 5\n")
    with pytest.raises(ValueError):
        load_config(file, {}, {})
    with pytest.raises(ValueError):
        load_config(None, {"max_agents": -1}, {})


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:80", ("127.0.0.1", 80)), ("[::1]:9", ("::1", 9)), (":7", ("0.0.0.0", 7))],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


def test_parse_listen_refuses_garbage() -> None:
    with pytest.raises(ValueError):
        parse_listen("localhost")
