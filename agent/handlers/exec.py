"""``exec``: run one program, without a shell, and stream what it prints.

Args: ``{"argv": [program, arg, ...], "cwd"?: str, "env"?: {name: value}}``. ``env`` is laid
over the agent's own environment, minus the agent's secrets (``TETHER_TOKEN``). The program is
looked up on the *agent's* ``PATH``, so a command cannot dodge the allow-list by sending its
own ``PATH``.

The child runs in a new session (its own process group). On cancel or timeout the whole tree
is stopped: the processes found under the child *before* signalling (children that left the
group are still caught), plus the group itself; SIGTERM first, SIGKILL after a short grace.
Output goes out in chunks of at most 16 KiB, gathered for up to 0.1 s (so a chatty program
does not exceed the hub's message rate), decoded as UTF-8 with replacement (an incremental
decoder, so a character split between two reads survives); after ``max_output`` bytes the
rest is read and dropped, and the result says ``truncated``.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import psutil

from . import CommandContext, HandlerResult, Rejected, Stream

__all__ = ["ExecHandler", "ExecPolicy", "terminate_tree"]

CHUNK = 16 * 1024
#: Output that arrives within this many seconds goes out as one message.
COALESCE = 0.1
#: Environment variables a command never inherits from the agent.
SECRET_ENV = frozenset({"TETHER_TOKEN"})
#: How long to keep reading pipes after the program exited (a daemonised grandchild may
#: hold them open forever).
DRAIN_AFTER_EXIT = 1.0


@dataclass(frozen=True, slots=True)
class ExecPolicy:
    """Which programs ``exec`` may run: ``programs=None`` means any."""

    programs: frozenset[str] | None = None
    grace: float = 3.0
    max_output: int = 4 * 1024 * 1024

    def allows(self, program: str) -> bool:
        """``argv[0]`` as given or its basename must be listed (``--allow-exec``'s contract)."""
        if self.programs is None:
            return True
        return program in self.programs or os.path.basename(program) in self.programs


class ExecHandler:
    """The ``exec`` handler, bound to its policy."""

    __slots__ = ("policy",)

    def __init__(self, policy: ExecPolicy) -> None:
        self.policy = policy

    async def __call__(self, ctx: CommandContext) -> HandlerResult:
        argv, cwd, env = _parse_args(ctx.args)
        if not self.policy.allows(argv[0]):
            raise Rejected(f"program {argv[0]!r} is not in this agent's --allow-exec list")
        executable = _resolve(argv[0])
        if executable is None:
            return HandlerResult(status="failed", error=f"program not found: {argv[0]}")
        child_env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
        child_env.update(env)
        try:
            proc = await asyncio.create_subprocess_exec(
                executable,
                *argv[1:],
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=cwd,
                env=child_env,
                start_new_session=True,
            )
        except OSError as exc:
            return HandlerResult(status="failed", error=f"cannot start {argv[0]}: {exc}")
        output = _OutputBudget(self.policy.max_output)
        readers = [
            asyncio.ensure_future(_pump(proc.stdout, "stdout", ctx, output)),
            asyncio.ensure_future(_pump(proc.stderr, "stderr", ctx, output)),
        ]
        try:
            code = await proc.wait()
            _, pending = await asyncio.wait(readers, timeout=DRAIN_AFTER_EXIT)
            for reader in pending:
                reader.cancel()
        except asyncio.CancelledError:
            for reader in readers:
                reader.cancel()
            await asyncio.shield(_stop(proc, self.policy.grace))
            raise
        for reader in readers:
            if reader.done() and not reader.cancelled() and reader.exception() is not None:
                raise reader.exception()  # type: ignore[misc]
        data = {"output_bytes": output.total, "truncated": output.truncated}
        if code == 0:
            return HandlerResult(exit_code=0, data=data)
        return HandlerResult(status="failed", exit_code=code, data=data, error=_describe(code))


def _parse_args(args: dict[str, object]) -> tuple[list[str], str | None, dict[str, str]]:
    argv = args.get("argv")
    if (
        not isinstance(argv, list)
        or not argv
        or not all(isinstance(a, str) and "\0" not in a for a in argv)
        or not argv[0]
    ):
        raise Rejected("args.argv must be a non-empty list of strings")
    cwd = args.get("cwd")
    if cwd is not None and (not isinstance(cwd, str) or not cwd or "\0" in cwd):
        raise Rejected("args.cwd must be a non-empty string")
    env = args.get("env", {})
    if not isinstance(env, dict) or not all(
        isinstance(k, str)
        and isinstance(v, str)
        and k
        and "=" not in k
        and "\0" not in k
        and "\0" not in v
        for k, v in env.items()
    ):
        raise Rejected("args.env must map variable names to strings")
    return argv, cwd, env


def _resolve(program: str) -> str | None:
    if os.sep in program or (os.altsep and os.altsep in program):
        return program
    return shutil.which(program)


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class _OutputBudget:
    __slots__ = ("limit", "total", "truncated")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self.truncated = False


async def _pump(
    pipe: asyncio.StreamReader | None,
    stream: Stream,
    ctx: CommandContext,
    budget: _OutputBudget,
) -> None:
    """Forward one pipe as output chunks, in order, until EOF."""
    if pipe is None:
        return
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    async with contextlib.aclosing(_coalesced(pipe)) as blocks:
        async for block in blocks:
            final = not block
            if budget.total >= budget.limit:
                if not final:
                    budget.truncated = True
                    continue
                return
            if len(block) > budget.limit - budget.total:
                block = block[: budget.limit - budget.total]
                budget.truncated = True
            budget.total += len(block)
            text = decoder.decode(block, final=final)
            if text:
                await ctx.emit(stream, text)
            if final:
                return


async def _coalesced(pipe: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """Blocks of at most :data:`CHUNK` bytes, then ``b""`` at EOF.

    A block holds what arrived within :data:`COALESCE` seconds of its first byte, so a program
    that prints a line every millisecond makes about ten messages a second, not a thousand:
    the hub limits each connection's message rate (and closes 1008 beyond it).
    """
    loop = asyncio.get_running_loop()
    pending = bytearray()
    flush_at = 0.0
    while True:
        if not pending:
            chunk = await pipe.read(CHUNK)
            flush_at = loop.time() + COALESCE
        else:
            try:
                async with asyncio.timeout(max(0.0, flush_at - loop.time())):
                    chunk = await pipe.read(CHUNK - len(pending))
            except TimeoutError:
                yield bytes(pending)
                pending.clear()
                continue
        if not chunk:
            if pending:
                yield bytes(pending)
            yield b""
            return
        pending += chunk
        if len(pending) >= CHUNK:
            yield bytes(pending)
            pending.clear()


async def _stop(proc: asyncio.subprocess.Process, grace: float) -> None:
    await terminate_tree(proc.pid, grace)
    await proc.wait()


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _signal(processes: Iterable[psutil.Process], pgid: int, sig: signal.Signals) -> None:
    if hasattr(os, "killpg"):
        with contextlib.suppress(OSError):
            os.killpg(pgid, sig)
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.send_signal(sig)


def _alive(processes: Iterable[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for process in processes:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.Error:
            pass
    return alive


async def terminate_tree(pid: int, grace: float) -> None:
    """SIGTERM the process ``pid`` (a session leader), its group and its descendants; SIGKILL
    whatever is left after ``grace`` seconds.

    The tree is listed before any signal: once a parent dies its children are re-parented
    and can no longer be found from it; the process group catches those that were forked
    after the listing.
    """
    processes = _tree(pid)
    _signal(processes, pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    alive = _alive(processes)
    while alive and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        alive = _alive(alive)
    if alive:
        _signal(alive, pid, signal.SIGKILL)
