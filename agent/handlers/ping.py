"""``ping``: the cheapest proof that the agent receives, runs and answers commands."""

from __future__ import annotations

from ..journal import utc_now
from . import CommandContext, HandlerResult


async def handle(ctx: CommandContext) -> HandlerResult:
    return HandlerResult(data={"pong": True, "time": utc_now()})
