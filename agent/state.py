"""The agent's state directory and the credential it presents to the hub.

An agent enrolled with a shared enrollment key receives its own agent key in ``welcome``
(PROTOCOL §2). It must survive restarts, or the shared secret could never be retired, so it
is written atomically (temp file, fsync, rename) with mode 0600 into the state directory.
:class:`Credentials` decides which token to present and what a refusal means for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Literal

__all__ = [
    "Credentials",
    "KeyFile",
    "StateDirBusy",
    "default_state_dir",
    "lock_state_dir",
    "prepare_state_dir",
]

log = logging.getLogger("tether.agent.state")

KEY_FILE = "agent_key"
LOCK_FILE = "lock"


def default_state_dir(agent_id: str, env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME/tether-agent/<id>``, falling back to ``~/.local/state``."""
    env = os.environ if env is None else env
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tether-agent" / agent_id


def prepare_state_dir(path: Path) -> Path:
    """Create the directory (0700: it holds a secret) and return it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


class StateDirBusy(RuntimeError):
    """Another agent process holds this state directory."""


def lock_state_dir(path: Path) -> IO[bytes]:
    """Hold an exclusive lock on the state dir for the life of the process.

    Two processes sharing one id and one journal would both run the same commands and fight
    over the hub connection (close 4001); refusing to start is kinder.
    """
    handle = open(path / LOCK_FILE, "a+b")  # noqa: SIM115 - held until the process exits
    if sys.platform != "win32":
        import fcntl

        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StateDirBusy(f"another tether-agent is using {path}") from None
    return handle


class KeyFile:
    """The stored agent key: one line in ``<state dir>/agent_key``, mode 0600."""

    __slots__ = ("path",)

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / KEY_FILE

    def load(self) -> str | None:
        try:
            text = self.path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return text or None

    def save(self, key: str) -> None:
        """Replace the key atomically: a crash leaves the old key or the new, never half."""
        directory = self.path.parent
        tmp = directory / f".{KEY_FILE}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, key.encode("utf-8") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        _fsync_dir(directory)

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        _fsync_dir(self.path.parent)


def _fsync_dir(directory: Path) -> None:
    if sys.platform == "win32":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


CredentialKind = Literal["agent_key", "token", "none"]


class Credentials:
    """Which bearer token to present next, and how refusals change that choice.

    The stored agent key wins over the configured token (usually an enrollment key). When the
    hub revokes the agent key (close 4003 or HTTP 403) it is dropped for good and the token is
    tried again; when it says the key is unknown (HTTP 401, e.g. a hub whose store was reset)
    the two are tried in turn and the key stays on disk. Tokens never reach a
    log line: callers log :attr:`kind` only.
    """

    __slots__ = ("_prefer_token", "agent_key", "store", "token")

    def __init__(
        self,
        token: str | None,
        *,
        agent_key: str | None = None,
        store: KeyFile | None = None,
    ) -> None:
        self.token = token or None
        self.agent_key = agent_key
        self.store = store
        self._prefer_token = False

    @classmethod
    def from_state(cls, token: str | None, store: KeyFile) -> Credentials:
        return cls(token, agent_key=store.load(), store=store)

    def current(self) -> str | None:
        if self.agent_key is not None and not (self._prefer_token and self.token):
            return self.agent_key
        return self.token

    @property
    def kind(self) -> CredentialKind:
        current = self.current()
        if current is None:
            return "none"
        return "agent_key" if current == self.agent_key else "token"

    async def issued(self, key: str) -> None:
        """``welcome`` carried our own agent key: use it from now on and keep it on disk."""
        if key == self.agent_key and not self._prefer_token:
            return
        self.agent_key = key
        self._prefer_token = False
        if self.store is not None:
            try:
                await asyncio.to_thread(self.store.save, key)
            except OSError as exc:
                log.error(
                    "event=agent_key_not_saved path=%s error=%r "
                    "hint='the key works until this process exits; fix the state dir'",
                    self.store.path,
                    exc,
                )

    async def revoked(self, presented: str | None) -> bool:
        """The hub revoked ``presented``: never present it again if we have another.

        Returns True when a different agent key was found in the state dir (an operator or
        ``doctor`` provisioned one): that is a fresh credential, not a retry of the revoked
        one, so the caller need not wait out the long revocation backoff.
        """
        if presented is None or presented != self.agent_key:
            return False
        self.agent_key = None
        self._prefer_token = False
        if self.store is None:
            return False
        try:
            on_disk = await asyncio.to_thread(self.store.load)
            if on_disk is not None and on_disk != presented:
                self.agent_key = on_disk
                return True
            await asyncio.to_thread(self.store.discard)
        except OSError as exc:
            log.error("event=agent_key_not_removed error=%r", exc)
        return False

    def refused(self, presented: str | None) -> None:
        """HTTP 401 for ``presented``: try the other credential next time, if there is one."""
        if presented is None or self.agent_key is None or self.token is None:
            return
        if presented == self.agent_key:
            self._prefer_token = True
        elif presented == self.token:
            self._prefer_token = False
