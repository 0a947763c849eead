"""Who an agent says it is: the fields of its ``register`` message (PROTOCOL §4.1)."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hub.protocol.messages import Location, Register

from . import __version__

__all__ = ["AgentProfile", "detect_platform"]


@dataclass(frozen=True, slots=True)
class AgentProfile:
    """Static identity of one agent; shared, never copied, per connection attempt."""

    agent_id: str
    platform: str = ""
    region: str = ""
    version: str = __version__
    hostname: str = field(default_factory=socket.gethostname)
    labels: Mapping[str, str] = field(default_factory=dict)
    location: tuple[float, float] | None = None

    def register(self, capabilities: Sequence[str]) -> Register:
        location = self.location
        return Register(
            type="register",
            agent_id=self.agent_id,
            platform=self.platform,
            region=self.region,
            version=self.version,
            hostname=self.hostname[:128],
            labels=dict(self.labels),
            capabilities=list(capabilities),
            location=Location(lat=location[0], lon=location[1]) if location else None,
        )


def detect_platform(env: Mapping[str, str] | None = None) -> str:
    """``k8s``, ``docker``, or the OS family: what an operator filters the fleet by."""
    env = os.environ if env is None else env
    if env.get("KUBERNETES_SERVICE_HOST"):
        return "k8s"
    if Path("/.dockerenv").exists():
        return "docker"
    if sys.platform.startswith("linux"):
        return "linux"
    if sys.platform == "win32":
        return "windows"
    return sys.platform
