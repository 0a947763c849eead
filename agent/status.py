"""What the running agent tells a field engineer at the box: ``tether-agent status``.

The agent keeps ``status.json`` in its state dir: whether it is connected, to which hub and
since when, how the last connection ended (close code and reason in words), when it dials
next, which credential it presents (kind and id, never the secret), its version, and the last
20 commands it received. The file is replaced atomically (temp file, rename), on a state
change at most every :data:`MIN_INTERVAL` seconds (changes in between are coalesced into the
next write) and otherwise every :data:`REFRESH_INTERVAL` seconds: a few writes a minute, so
that an agent that reconnects in a loop does not wear out a flash card.

``tether-agent status`` reads the file; the agent's pid and process start time in it tell a
running agent from one that stopped (or crashed) without saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import orjson

from hub.protocol.times import format_instant

__all__ = [
    "CommandLog",
    "StatusReport",
    "close_reason",
    "credential_view",
    "read_status",
]

STATUS_FILE = "status.json"
MIN_INTERVAL = 2.0
REFRESH_INTERVAL = 20.0
MAX_COMMANDS = 20

State = Literal["connected", "connecting", "waiting", "stopped"]

#: Close codes in words (PROTOCOL §4.5), for people reading ``status``.
CLOSE_WORDS = {
    1000: "normal close",
    1001: "the hub went away or found this agent silent for too long",
    1003: "the hub refused a binary frame (an agent bug)",
    1006: "the connection was lost without a close (network or proxy cut it)",
    1007: "the hub could not read a message as JSON (an agent bug)",
    1008: "refused by the hub's policy (identity, enrollment key, invalid messages)",
    1009: "a message was too big (an agent bug)",
    1011: "internal error, or no answer to the agent's keepalive ping (the link went silent)",
    1012: "the hub is restarting",
    1013: "the hub is overloaded; try again later",
    4001: "superseded: another process connected with this agent id",
    4003: "the credential was revoked",
}


def close_reason(code: int, reason: str) -> str:
    words = CLOSE_WORDS.get(code, "closed")
    # The hub's own reason when it says more than the words do ("hub restarting" does not).
    if reason and not set(reason.lower().split()) <= set(words.lower().split()):
        return f"{words} ({reason})"
    return words


def credential_view(token: str | None, certificate: bool = False) -> dict[str, str | None]:
    """``{kind, id}`` of a bearer token, never the secret: the id is what
    ``tether-hub token list`` shows (a JWT's ``jwt:<jti>`` or its subject)."""
    if token is None:
        return {"kind": "certificate" if certificate else "none", "id": None}
    kinds = {"tta_": "agent_key", "tte_": "enrollment_key", "ttm_": "admin_token"}
    kind = kinds.get(token[:4])
    if kind is not None and len(token) > 17 and token[16] == "_":
        return {"kind": kind, "id": token[4:16]}
    if token.count(".") == 2:
        from .doctor import jwt_claims

        claims = jwt_claims(token)
        jti, sub = claims.get("jti"), claims.get("sub")
        ident = f"jwt:{jti}" if isinstance(jti, str) else (f"sub:{sub}" if sub else None)
        return {"kind": "jwt", "id": ident}
    return {"kind": "unknown", "id": None}


class CommandLog:
    """The last :data:`MAX_COMMANDS` commands received, newest first, for ``status``."""

    __slots__ = ("_entries", "on_change")

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Any]] = {}
        self.on_change: Any = None

    def received(self, command_id: str, name: str, state: str = "running") -> None:
        entries = self._entries
        entries.pop(command_id, None)
        entries[command_id] = {
            "command_id": command_id,
            "name": name,
            "state": state,
            "received_at": format_instant(time.time()),
            "finished_at": None,
        }
        while len(entries) > MAX_COMMANDS:
            del entries[next(iter(entries))]
        self._changed()

    def finished(self, command_id: str, state: str, name: str = "") -> None:
        entry = self._entries.get(command_id)
        if entry is None:
            self.received(command_id, name, state)
            entry = self._entries[command_id]
        entry["state"] = state
        entry["finished_at"] = format_instant(time.time())
        self._changed()

    def view(self) -> list[dict[str, Any]]:
        return [dict(entry) for entry in reversed(self._entries.values())]

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


class StatusReport:
    """The running agent's status, written to ``<state dir>/status.json`` (rate-limited)."""

    def __init__(
        self,
        state_dir: Path,
        agent_id: str,
        version: str,
        commands: CommandLog | None = None,
    ) -> None:
        self.path = state_dir / STATUS_FILE
        self.agent_id = agent_id
        self.version = version
        self.commands = commands if commands is not None else CommandLog()
        self.commands.on_change = self.changed
        self.state: State = "connecting"
        self.since = time.time()
        self.hub_url: str | None = None
        self.hub_id: str | None = None
        self.last_disconnect: dict[str, Any] | None = None
        self.next_attempt_at: float | None = None
        self.credential: dict[str, str | None] = {"kind": "none", "id": None}
        self.proxy: str | None = None
        self._pid = os.getpid()
        self._started = _process_start(self._pid)
        self._last_write = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._refresh: asyncio.TimerHandle | None = None
        #: Writes done (for tests and the footprint bench).
        self.writes = 0

    # -- transitions (called by the client) -----------------------------------------------

    def connecting(self, url: str, credential: dict[str, str | None], proxy: str | None) -> None:
        self.credential = credential
        self.proxy = proxy
        self._enter("connecting", hub_url=url)

    def connected(self, hub_id: str) -> None:
        self.hub_id = hub_id
        self._enter("connected")

    def ended(self, code: int | None, reason: str) -> None:
        self.last_disconnect = {"at": format_instant(time.time()), "code": code, "reason": reason}
        self.changed()

    def waiting(self, delay: float) -> None:
        self.next_attempt_at = time.time() + delay
        self._enter("waiting")

    def stopped(self) -> None:
        self._enter("stopped")
        self.flush()
        self.close()

    def _enter(self, state: State, hub_url: str | None = None) -> None:
        if hub_url is not None:
            self.hub_url = hub_url
        if state != "waiting":
            self.next_attempt_at = None
        if state != self.state:
            self.state = state
            self.since = time.time()
        self.changed()

    # -- writing ---------------------------------------------------------------------------

    def changed(self) -> None:
        """Write soon: now if the last write is old enough, else once the interval passed."""
        if self._timer is not None:
            return
        wait = self._last_write + MIN_INTERVAL - time.monotonic()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if wait <= 0:
            self.flush()
        else:
            self._timer = loop.call_later(wait, self._timed_flush)

    def _timed_flush(self) -> None:
        self._timer = None
        self.flush()

    def document(self) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "state": self.state,
            "hub_url": self.hub_url,
            "hub_id": self.hub_id if self.state == "connected" else None,
            "since": format_instant(self.since),
            "last_disconnect": self.last_disconnect,
            "next_attempt_at": (
                format_instant(self.next_attempt_at) if self.next_attempt_at else None
            ),
            "credential": self.credential,
            "version": self.version,
            "commands": self.commands.view(),
            "proxy": self.proxy,
            "pid": self._pid,
            "process_started": self._started,
            "updated_at": format_instant(time.time()),
        }

    def flush(self) -> None:
        """Replace the file now (temp file, rename); a failure is not the agent's problem."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._last_write = time.monotonic()
        tmp = self.path.with_name(f".{STATUS_FILE}.{self._pid}.tmp")
        try:
            tmp.write_bytes(orjson.dumps(self.document(), option=orjson.OPT_INDENT_2))
            os.replace(tmp, self.path)
            self.writes += 1
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._schedule_refresh()

    def _schedule_refresh(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            self._refresh = None
        if self.state == "stopped":
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._refresh = loop.call_later(REFRESH_INTERVAL, self.flush)

    def close(self) -> None:
        for handle in (self._timer, self._refresh):
            if handle is not None:
                handle.cancel()
        self._timer = self._refresh = None


def _process_start(pid: int) -> float | None:
    try:
        import psutil

        return round(psutil.Process(pid).create_time(), 2)
    except Exception:
        return None


def _alive(pid: Any, started: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        import psutil

        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return not isinstance(started, int | float) or abs(process.create_time() - started) < 1.0
    except Exception:
        return False


# -- reading (tether-agent status) ---------------------------------------------------------


def read_status(state_dir: Path, now: float | None = None) -> dict[str, Any] | None:
    """The status object of DESIGN.md's contract, or None when no agent state is there.

    ``state`` is ``stopped`` when the process that wrote the file is gone, whatever the file
    says; ``next_attempt_in_s`` is counted from now.
    """
    try:
        raw = orjson.loads((state_dir / STATUS_FILE).read_bytes())
    except PermissionError:
        raise  # "no state" would mislead: the caller says whose it is
    except (OSError, orjson.JSONDecodeError):
        return None
    if not isinstance(raw, dict):
        return None
    now = time.time() if now is None else now
    state = raw.get("state")
    if state not in ("connected", "connecting", "waiting", "stopped"):
        state = "stopped"
    if state != "stopped" and not _alive(raw.get("pid"), raw.get("process_started")):
        state = "stopped"
    next_in: float | None = None
    if state == "waiting" and isinstance(raw.get("next_attempt_at"), str):
        with contextlib.suppress(ValueError):
            from datetime import datetime

            at = datetime.fromisoformat(raw["next_attempt_at"]).timestamp()
            next_in = round(max(0.0, at - now), 1)
    return {
        "agent_id": raw.get("agent_id"),
        "state": state,
        "hub_url": raw.get("hub_url"),
        "hub_id": raw.get("hub_id") if state == "connected" else None,
        "since": raw.get("since") if state == raw.get("state") else raw.get("updated_at"),
        "last_disconnect": raw.get("last_disconnect"),
        "next_attempt_in_s": next_in,
        "credential": raw.get("credential"),
        "version": raw.get("version"),
        "commands": raw.get("commands") or [],
    }


def status_dirs(env: Mapping[str, str]) -> list[Path]:
    """State dirs with a status file in the usual places: the default base's agent dirs
    and the systemd unit's ``/var/lib/tether-agent``."""
    from .state import default_state_dir

    base = default_state_dir("x", env).parent
    found = []
    with contextlib.suppress(OSError):
        found = sorted(p for p in base.iterdir() if (p / STATUS_FILE).is_file())
    system = Path("/var/lib/tether-agent")
    if (system / STATUS_FILE).is_file():
        found.append(system)
    return found


def render(status: Mapping[str, Any], now: float | None = None) -> str:
    """The status for people: a few aligned lines."""
    lines = [f"agent     {status['agent_id']}  (tether-agent {status['version']})"]
    state = status["state"]
    head = f"state     {state} since {status['since']}"
    if state == "connected":
        head += f" to {status['hub_id']} at {status['hub_url']}"
    elif status.get("hub_url"):
        head += f" (hub {status['hub_url']})"
    lines.append(head)
    if status.get("next_attempt_in_s") is not None:
        lines.append(f"next try  in {status['next_attempt_in_s']:g} s")
    last = status.get("last_disconnect")
    if last:
        code = f"{last['code']} " if last.get("code") is not None else ""
        lines.append(f"last end  {last['at']}: {code}{last['reason']}")
    credential = status.get("credential") or {}
    lines.append(f"credential {credential.get('kind')} {credential.get('id') or ''}".rstrip())
    commands = status.get("commands") or []
    lines.append(f"commands  {len(commands)} recent" + (":" if commands else ""))
    for command in commands:
        finished = command.get("finished_at") or "-"
        lines.append(
            f"  {command['received_at']}  {command['state']:<10} {command['name']:<12} "
            f"{command['command_id']}  finished {finished}"
        )
    return "\n".join(lines)
