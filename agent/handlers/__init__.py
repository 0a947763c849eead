"""Command handlers: one module per family, and the registry the agent declares from.

A handler is ``async def handle(ctx: CommandContext) -> HandlerResult``. It reads its
``args``, may stream output with ``await ctx.emit(stream, text)``, and is stopped by task
cancellation (the executor cancels it on ``cancel`` and at its deadline), so a handler that
starts anything outside the event loop must clean up on :class:`asyncio.CancelledError`.
Invalid arguments raise :class:`Rejected`, which the executor reports as ``rejected``.

The registry's names are the agent's ``capabilities``; a name it refuses (such as ``exec``
without ``--allow-exec``) is not declared and is rejected with the reason given.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ..profile import AgentProfile
    from .exec import ExecPolicy

__all__ = [
    "CommandContext",
    "Handler",
    "HandlerRegistry",
    "HandlerResult",
    "Rejected",
    "default_registry",
]

Stream = Literal["stdout", "stderr"]
Status = Literal["succeeded", "failed", "rejected", "cancelled", "timed_out"]


class Rejected(Exception):
    """The command cannot be run as asked (bad arguments, not allowed); nothing started."""


@dataclass(slots=True)
class CommandContext:
    command_id: str
    name: str
    args: dict[str, Any]
    #: Seconds the executor allows; it enforces them, handlers may use them as a hint.
    timeout: float
    #: Send one output chunk; waits while the hub connection is congested.
    emit: Callable[[Stream, str], Awaitable[None]]
    agent: AgentProfile


@dataclass(slots=True)
class HandlerResult:
    status: Status = "succeeded"
    exit_code: int | None = None
    data: Any = None
    error: str | None = None


Handler = Callable[[CommandContext], Awaitable[HandlerResult]]


class HandlerRegistry:
    """Names to handlers, plus names known but refused (with the reason to report)."""

    __slots__ = ("_handlers", "_refused")

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._refused: dict[str, str] = {}

    def add(self, name: str, handler: Handler) -> None:
        self._handlers[name] = handler
        self._refused.pop(name, None)

    def refuse(self, name: str, reason: str) -> None:
        self._handlers.pop(name, None)
        self._refused[name] = reason

    def lookup(self, name: str) -> Handler | str:
        """The handler, or the reason the command is rejected."""
        handler = self._handlers.get(name)
        if handler is not None:
            return handler
        return self._refused.get(name) or f"unknown command {name!r}"

    @property
    def capabilities(self) -> list[str]:
        return sorted(self._handlers)


def default_registry(exec_policy: ExecPolicy | None = None) -> HandlerRegistry:
    """The real agent's handlers; ``exec`` only when a policy allows it."""
    from . import ping, sysinfo
    from .exec import ExecHandler

    registry = HandlerRegistry()
    registry.add("ping", ping.handle)
    registry.add("sysinfo", sysinfo.handle)
    if exec_policy is not None:
        registry.add("exec", ExecHandler(exec_policy))
    else:
        registry.refuse("exec", "exec is not allowed on this agent (start it with --allow-exec)")
    return registry
