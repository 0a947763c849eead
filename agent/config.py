"""The agent's configuration file: the same settings as the flags, for hosts set up once.

TOML, found at ``--config FILE``, else ``$TETHER_AGENT_CONFIG``, else
``/etc/tether/agent.toml`` when that exists. ``run``, ``doctor`` and ``status`` all read it,
so that a field engineer's ``tether-agent doctor`` in a shell sees what the service sees.
Flags beat the environment, which beats this file (DESIGN.md). Keys are the long flags'
names with ``_`` for ``-``::

    hub = ["wss://hub.example:443"]      # or one string
    token_file = "/etc/tether/token"
    agent_id = "edge-berlin-01"
    region = "eu-central"
    state_dir = "/var/lib/tether-agent"
    proxy = "http://proxy.corp:3128"
    no_proxy = "localhost,.corp,10.0.0.0/8"
    [labels]
    site = "berlin"

An unknown key is a usage error: a typo must not silently leave a setting at its default.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_CONFIG", "KEYS", "load_config"]

DEFAULT_CONFIG = Path("/etc/tether/agent.toml")

#: Accepted keys and the type each must have.
KEYS: dict[str, type | tuple[type, ...]] = {
    "hub": (str, list),
    "token": str,
    "token_file": str,
    "agent_id": str,
    "platform": str,
    "region": str,
    "labels": dict,
    "lat": (int, float),
    "lon": (int, float),
    "state_dir": str,
    "ca_file": str,
    "cert": str,
    "key": str,
    "hub_cert_sha256": str,
    "proxy": str,
    "no_proxy": str,
}


class ConfigError(ValueError):
    """The file cannot be read or holds something it should not: one line."""


def config_path(flag: str | None, env: Mapping[str, str]) -> Path | None:
    """The file to read, or None when none is given and the default does not exist."""
    given = flag or env.get("TETHER_AGENT_CONFIG")
    if given:
        return Path(given).expanduser()
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def load_config(flag: str | None, env: Mapping[str, str]) -> dict[str, Any]:
    """The settings of the configuration file (empty without one)."""
    path = config_path(flag, env)
    if path is None:
        return {}
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: not TOML: {exc}") from None
    for key, value in data.items():
        wanted = KEYS.get(key)
        if wanted is None:
            raise ConfigError(f"config {path}: unknown key {key!r} (known: {', '.join(KEYS)})")
        if not isinstance(value, wanted) or isinstance(value, bool):
            raise ConfigError(f"config {path}: {key} has the wrong type")
    hubs = data.get("hub")
    if isinstance(hubs, list) and not all(isinstance(url, str) for url in hubs):
        raise ConfigError(f"config {path}: hub is a URL or a list of URLs")
    labels = data.get("labels", {})
    if not all(isinstance(value, str) for value in labels.values()):
        raise ConfigError(f"config {path}: label values are strings")
    return data
