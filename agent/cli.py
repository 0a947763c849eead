"""``tether-agent run | simulate | doctor | status`` (the command-line contract of docs/agent.md).

Options and environment variables are part of the contract and tested from outside, so
they are spelled exactly as there. Flags beat the environment, which beats the config file
(agent/config.py); ``TETHER_HUB_URL`` holds several URLs separated by commas and falls back
to ``CONTROL_PLANE_URL``. Usage errors exit 2 with one line on stderr; ``doctor`` exits 1
when a check fails; ``status`` exits 0 connected, 1 not, 2 without agent state.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from hub.protocol.constants import AGENT_ID, AGENT_ID_PATTERN
from hub.protocol.messages import Location, ValidationError
from hub.protocol.tls import TlsOptions, make_ssl_context, parse_fingerprint

from . import __version__
from .client import AgentClient, ClientSettings, agent_url
from .config import ConfigError, load_config
from .proxy import ProxySettings

__all__ = ["main"]

log = logging.getLogger("tether.agent")


class UsageError(Exception):
    """A bad option or a missing one: exit 2 with this one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tether-agent", description="The Tether fleet agent.")
    parser.add_argument("--version", action="version", version=f"tether-agent {__version__}")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    commands = parser.add_subparsers(dest="command", metavar="run|simulate|doctor|status")

    def config_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config",
            metavar="FILE",
            help="TOML settings (env TETHER_AGENT_CONFIG; default /etc/tether/agent.toml)",
        )

    def hub_options(p: argparse.ArgumentParser) -> None:
        config_option(p)
        proxy = p.add_mutually_exclusive_group()
        proxy.add_argument(
            "--proxy", metavar="URL", help="http://[user:pass@]host:port or socks5://host:port"
        )
        proxy.add_argument(
            "--no-proxy",
            action="store_true",
            help="dial the hub directly, ignoring HTTPS_PROXY, HTTP_PROXY and ALL_PROXY",
        )
        p.add_argument("--hub", action="append", metavar="URL", help="ws:// or wss:// base URL")
        p.add_argument("--token", help="agent key, enrollment key or JWT (env TETHER_TOKEN)")
        p.add_argument("--token-file", metavar="FILE", help="read the token from a file")
        p.add_argument("--ca-file", metavar="FILE", help="CA bundle to verify the hub with")
        p.add_argument("--insecure", action="store_true", help="do not verify the hub (unsafe)")
        p.add_argument("--cert", metavar="FILE", help="client certificate (mTLS)")
        p.add_argument("--key", metavar="FILE", help="private key of --cert")
        p.add_argument("--hub-cert-sha256", metavar="HEX", help="pin the hub certificate's SHA-256")

    def log_level(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--log-level",
            default=argparse.SUPPRESS,
            choices=["debug", "info", "warning", "error"],
        )

    run = commands.add_parser("run", help="run this host's agent")
    hub_options(run)
    run.add_argument("--agent-id", metavar="ID")
    run.add_argument("--platform")
    run.add_argument("--region")
    run.add_argument("--label", action="extend", nargs="+", default=[], metavar="K=V")
    run.add_argument("--lat", type=float)
    run.add_argument("--lon", type=float)
    run.add_argument("--state-dir", metavar="DIR")
    run.add_argument("--allow-exec", nargs="*", metavar="PROGRAM")
    run.add_argument("--max-concurrency", type=int, default=4, metavar="N")
    # Tuning for links that need it (and for tests that scale time down): the agent pings
    # the hub every --keepalive-interval s and gives up on it after --keepalive-timeout s
    # without a pong (PROTOCOL §4.2: 30 and 20); retries wait at most --backoff-cap s (60).
    run.add_argument("--keepalive-interval", type=float, default=30.0, metavar="S")
    run.add_argument("--keepalive-timeout", type=float, default=20.0, metavar="S")
    run.add_argument("--backoff-cap", type=float, default=60.0, metavar="S")
    log_level(run)

    sim = commands.add_parser("simulate", help="run many simulated agents in one process")
    hub_options(sim)
    sim.add_argument("--count", type=int, required=True, metavar="N")
    sim.add_argument("--prefix", default="sim-")
    sim.add_argument("--rate", type=float, default=200.0, help="new connections per second")
    sim.add_argument("--churn", type=float, default=0.0, help="fraction dropped per minute")
    sim.add_argument(
        "--degraded", type=float, default=0.0, help="fraction reporting status degraded"
    )
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument(
        "--source",
        action="extend",
        nargs="+",
        default=[],
        metavar="ADDR",
        help="local addresses to dial from, agents spread over them (e.g. 127.0.0.2)",
    )
    log_level(sim)

    doctor = commands.add_parser("doctor", help="check the way to the hub, step by step")
    hub_options(doctor)
    doctor.add_argument("--agent-id", metavar="ID")
    doctor.add_argument("--platform")
    doctor.add_argument("--region")
    doctor.add_argument("--state-dir", metavar="DIR")
    doctor.add_argument("--timeout", type=float, default=10.0)
    log_level(doctor)

    status = commands.add_parser("status", help="what the agent on this host is doing")
    config_option(status)
    where = status.add_mutually_exclusive_group()
    where.add_argument("--agent-id", metavar="ID")
    where.add_argument("--state-dir", metavar="DIR")
    status.add_argument("--json", action="store_true", help="one JSON object")
    log_level(status)
    return parser


# -- the config file, under the environment ----------------------------------------------

#: (attribute, environment variables that beat the config, config key)
_CONFIG_FALLBACKS = (
    ("hub", ("TETHER_HUB_URL", "CONTROL_PLANE_URL"), "hub"),
    ("agent_id", ("TETHER_AGENT_ID",), "agent_id"),
    ("platform", ("TETHER_PLATFORM",), "platform"),
    ("region", ("TETHER_REGION",), "region"),
    ("state_dir", ("TETHER_STATE_DIR",), "state_dir"),
    ("ca_file", (), "ca_file"),
    ("cert", (), "cert"),
    ("key", (), "key"),
    ("hub_cert_sha256", (), "hub_cert_sha256"),
    ("lat", (), "lat"),
    ("lon", (), "lon"),
)


def apply_config(args: argparse.Namespace, env: Mapping[str, str]) -> dict[str, Any]:
    """Fill options that neither a flag nor the environment set from the config file.

    Returns the config (for the settings that have no flag of the same shape: ``proxy`` and
    ``no_proxy`` come after the environment's proxy variables, see agent/proxy.py).
    """
    try:
        config = load_config(getattr(args, "config", None), env)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    for attribute, variables, key in _CONFIG_FALLBACKS:
        if key not in config or not hasattr(args, attribute):
            continue
        if getattr(args, attribute) is not None or any(env.get(name) for name in variables):
            continue
        value = config[key]
        setattr(
            args, attribute, [value] if attribute == "hub" and isinstance(value, str) else value
        )
    token_unset = getattr(args, "token", "") is None and args.token_file is None
    if token_unset and not env.get("TETHER_TOKEN"):
        args.token = config.get("token")
        args.token_file = config.get("token_file")
    if hasattr(args, "label"):
        flagged = dict(item.partition("=")[::2] for item in args.label if "=" in item)
        labels = {**config.get("labels", {}), **flagged}
        args.label = [*(f"{k}={v}" for k, v in labels.items() if k not in flagged), *args.label]
    return config


def resolve_proxy(
    args: argparse.Namespace, env: Mapping[str, str], config: Mapping[str, Any]
) -> ProxySettings:
    try:
        return ProxySettings.resolve(
            args.proxy, args.no_proxy, env, config.get("proxy"), config.get("no_proxy")
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


# -- option resolution (pure: takes the environment as a mapping) ------------------------


def resolve_hubs(flag: Sequence[str] | None, env: Mapping[str, str]) -> list[str]:
    if flag:
        raw = list(flag)
    else:
        source = env.get("TETHER_HUB_URL") or env.get("CONTROL_PLANE_URL") or ""
        raw = [part for part in source.split(",")]
    urls = [url.strip() for url in raw if url.strip()]
    if not urls:
        raise UsageError("a hub URL is required (--hub or TETHER_HUB_URL)")
    for url in urls:
        try:
            agent_url(url)
        except ValueError as exc:
            raise UsageError(f"--hub: {exc}") from None
    return urls


def resolve_token(args: argparse.Namespace, env: Mapping[str, str]) -> str | None:
    if args.token:
        return str(args.token)
    if args.token_file:
        try:
            return Path(args.token_file).read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            raise UsageError(f"--token-file: {exc.strerror}: {args.token_file}") from None
    return env.get("TETHER_TOKEN") or None


def resolve_tls(args: argparse.Namespace) -> tuple[TlsOptions, Any]:
    pin = None
    if args.hub_cert_sha256:
        try:
            pin = parse_fingerprint(args.hub_cert_sha256)
        except ValueError as exc:
            raise UsageError(f"--hub-cert-sha256: {exc}") from None
    if args.key and not args.cert:
        raise UsageError("--key needs --cert")
    options = TlsOptions(
        ca_file=args.ca_file, insecure=args.insecure, cert=args.cert, key=args.key, pin_sha256=pin
    )
    try:
        context = make_ssl_context(options)
    except (OSError, ValueError) as exc:
        raise UsageError(f"TLS options: {exc}") from None
    return options, context


def resolve_labels(items: Sequence[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--label wants KEY=VALUE, got {item!r}")
        labels[key] = value
    if len(labels) > 64:
        raise UsageError("at most 64 labels")
    return labels


def resolve_location(lat: float | None, lon: float | None) -> tuple[float, float] | None:
    if lat is None and lon is None:
        return None
    if lat is None or lon is None:
        raise UsageError("--lat and --lon go together")
    try:
        Location(lat=lat, lon=lon)
    except ValidationError:
        raise UsageError("--lat must be within -90…90 and --lon within -180…180") from None
    return lat, lon


def resolve_agent_id(flag: str | None, env: Mapping[str, str], required: bool = True) -> str:
    agent_id = flag or env.get("TETHER_AGENT_ID") or ""
    if not agent_id:
        if required:
            raise UsageError("an agent id is required (--agent-id or TETHER_AGENT_ID)")
        return ""
    if not AGENT_ID.match(agent_id):
        raise UsageError(f"agent id {agent_id!r} must match {AGENT_ID_PATTERN}")
    return agent_id


def resolve_state_dir(flag: str | None, agent_id: str, env: Mapping[str, str]) -> Path:
    from .state import default_state_dir

    given = flag or env.get("TETHER_STATE_DIR")
    return Path(given).expanduser() if given else default_state_dir(agent_id, env)


# -- commands ------------------------------------------------------------------------------


def _settings(
    args: argparse.Namespace, env: Mapping[str, str], config: Mapping[str, Any]
) -> ClientSettings:
    urls = resolve_hubs(args.hub, env)
    tls, context = resolve_tls(args)
    needs_tls = any(url.startswith("wss:") for url in urls)
    return ClientSettings(
        urls=urls,
        ssl_context=context if needs_tls else None,
        pin_sha256=tls.pin_sha256,
        proxy=resolve_proxy(args, env, config),
        has_certificate=bool(args.cert),
    )


async def _run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from hub.protocol.backoff import Backoff

    from .executor import Executor
    from .handlers import default_registry
    from .handlers.exec import ExecPolicy
    from .journal import SqliteJournal
    from .metrics import HostMetrics
    from .profile import AgentProfile, detect_platform
    from .state import Credentials, KeyFile, StateDirBusy, lock_state_dir, prepare_state_dir
    from .status import CommandLog, StatusReport

    config = apply_config(args, env)
    settings = _settings(args, env, config)
    agent_id = resolve_agent_id(args.agent_id, env)
    token = resolve_token(args, env)
    if args.max_concurrency < 1:
        raise UsageError("--max-concurrency must be at least 1")
    if min(args.keepalive_interval, args.keepalive_timeout, args.backoff_cap) <= 0:
        raise UsageError("--keepalive-interval, --keepalive-timeout and --backoff-cap are > 0")
    profile = AgentProfile(
        agent_id=agent_id,
        platform=args.platform or env.get("TETHER_PLATFORM") or detect_platform(env),
        region=args.region or env.get("TETHER_REGION") or "",
        labels=resolve_labels(args.label),
        location=resolve_location(args.lat, args.lon),
    )
    try:
        profile.register([])
    except ValidationError as exc:
        raise UsageError(f"invalid identity: {exc.errors()[0]['msg']}") from None
    state_dir = resolve_state_dir(args.state_dir, agent_id, env)
    try:
        prepare_state_dir(state_dir)
        lock = lock_state_dir(state_dir)
    except StateDirBusy as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"state dir {state_dir}: {exc.strerror}") from None
    credentials = Credentials.from_state(token, KeyFile(state_dir))
    if credentials.current() is None and not args.cert:
        lock.close()
        raise UsageError("a token is required (--token, --token-file or TETHER_TOKEN)")
    policy = None
    if args.allow_exec is not None:
        policy = ExecPolicy(programs=frozenset(args.allow_exec) if args.allow_exec else None)
    try:
        journal = await SqliteJournal.open(state_dir / "journal.sqlite3")
    except (OSError, sqlite3.Error) as exc:
        lock.close()
        raise UsageError(f"cannot open the command journal in {state_dir}: {exc}") from None
    for command_id in journal.interrupted:
        log.warning("event=command_interrupted command_id=%s status=failed", command_id)
    executor = Executor(
        profile, default_registry(policy), journal, max_concurrency=args.max_concurrency
    )
    report = StatusReport(state_dir, agent_id, __version__, CommandLog())
    executor.tracker = report.commands
    settings.keepalive_interval = args.keepalive_interval
    settings.keepalive_timeout = args.keepalive_timeout
    client = AgentClient(
        profile,
        settings,
        credentials,
        executor,
        HostMetrics(),
        report=report,
        backoff=Backoff(cap=args.backoff_cap),
    )
    assert settings.proxy is not None
    log.info(
        "event=starting agent_id=%s version=%s hubs=%s state_dir=%s credential=%s "
        "capabilities=%s proxy=%r",
        agent_id,
        __version__,
        ",".join(settings.urls),
        state_dir,
        credentials.kind,
        ",".join(executor.registry.capabilities),
        "; ".join(settings.proxy.route(agent_url(url)).reason for url in settings.urls),
    )
    try:
        await _until_signal(client.run(), client.shutdown)
    finally:
        await journal.close()
        lock.close()
    log.info("event=stopped agent_id=%s", agent_id)
    return 0


async def _simulate(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .simulate import Simulation, SimulationOptions

    config = apply_config(args, env)
    settings = _settings(args, env, config)
    token = resolve_token(args, env)
    if not token:
        raise UsageError("an enrollment key is required (--token or TETHER_TOKEN)")
    if args.count < 1 or args.count > 99_999:
        raise UsageError("--count must be within 1…99999")
    if not AGENT_ID.match(f"{args.prefix}00001"):
        raise UsageError(f"--prefix {args.prefix!r} does not make valid agent ids")
    if args.rate <= 0:
        raise UsageError("--rate must be positive")
    if not 0 <= args.churn <= 1:
        raise UsageError("--churn is a fraction within 0…1")
    for source in args.source:
        try:
            ipaddress.ip_address(source)
        except ValueError:
            raise UsageError(f"--source wants an IP address of this host, got {source!r}") from None
    if args.log_level != "debug":
        # Ten thousand agents must not log one line each per event: the summary says it.
        logging.getLogger("tether.agent.client").setLevel(logging.CRITICAL)
        logging.getLogger("tether.agent.executor").setLevel(logging.WARNING)
    simulation = Simulation(
        SimulationOptions(
            count=args.count,
            token=token,
            prefix=args.prefix,
            rate=args.rate,
            churn=args.churn,
            degraded=args.degraded,
            seed=args.seed,
            sources=tuple(args.source),
        ),
        settings,
    )
    log.info(
        "event=simulate_starting count=%d prefix=%s hubs=%s", args.count, args.prefix, settings.urls
    )
    await _until_signal(simulation.run(), simulation.shutdown)
    log.info("event=simulate_stopped %s", simulation.summary())
    return 0


async def _doctor(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .doctor import DoctorOptions, doctor_all, jwt_claims
    from .profile import AgentProfile, detect_platform
    from .state import KeyFile
    from .status import credential_view, read_status, status_dirs

    config = apply_config(args, env)
    agent_id = resolve_agent_id(args.agent_id, env, required=False)
    state_dir: Path | None = None
    if args.state_dir or env.get("TETHER_STATE_DIR") or agent_id:
        state_dir = resolve_state_dir(args.state_dir, agent_id, env)
    else:
        found = status_dirs(env)
        if len(found) == 1:  # the one agent installed here
            state_dir = found[0]
    try:
        status = read_status(state_dir) if state_dir is not None else None
    except PermissionError:
        raise UsageError(f"cannot read {state_dir}: permission denied") from None
    if status is not None and not agent_id and isinstance(status.get("agent_id"), str):
        agent_id = status["agent_id"]
    hub_configured = args.hub or env.get("TETHER_HUB_URL") or env.get("CONTROL_PLANE_URL")
    if not hub_configured and status is not None and isinstance(status.get("hub_url"), str):
        args.hub = [status["hub_url"]]  # the hub the installed agent last dialed
    settings = _settings(args, env, config)
    assert settings.proxy is not None
    token = resolve_token(args, env)
    try:
        saved = KeyFile(state_dir).load() if state_dir is not None else None
    except PermissionError:
        raise UsageError(
            f"cannot read the agent key in {state_dir}: permission denied "
            "(run as the agent's user or root)"
        ) from None
    # What `run` would present: the saved agent key wins over the token.
    presented = saved or token
    if not presented and not args.cert:
        raise UsageError("a token is required (--token, --token-file or TETHER_TOKEN)")
    if saved:
        source = f"the agent key saved in {state_dir}"
    elif args.token or args.token_file:
        source = "--token" if args.token else f"--token-file {args.token_file}"
    elif token:
        source = "TETHER_TOKEN" if env.get("TETHER_TOKEN") else "the config file"
    else:
        source = "the client certificate"
    claims = jwt_claims(presented)
    profile = AgentProfile(
        agent_id=agent_id or "",
        platform=str(args.platform or env.get("TETHER_PLATFORM") or claims.get("platform") or "")
        or detect_platform(env),
        region=str(args.region or env.get("TETHER_REGION") or claims.get("region") or ""),
    )
    view = credential_view(presented, bool(args.cert))
    options = [
        DoctorOptions(
            url=url,
            token=presented,
            profile=profile,
            ssl_context=settings.ssl_context,
            pin_sha256=settings.pin_sha256,
            timeout=args.timeout,
            route=settings.proxy.route(agent_url(url)),
            credential=f"{view['kind']} {view['id'] or ''}".rstrip() + f" (from {source})",
            check_region=bool(args.region or env.get("TETHER_REGION")),
        )
        for url in settings.urls
    ]
    return 0 if await doctor_all(options) else 1


def _status(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    import json

    from .status import read_status, render, status_dirs

    config = apply_config(args, env)
    if args.state_dir:
        candidates = [Path(args.state_dir).expanduser()]
    elif args.agent_id or env.get("TETHER_STATE_DIR") or env.get("TETHER_AGENT_ID"):
        agent_id = resolve_agent_id(args.agent_id, env, required=False)
        candidates = [resolve_state_dir(None, agent_id, env)]
    elif config.get("state_dir") or config.get("agent_id"):
        given = config.get("state_dir")
        candidates = [Path(given) if given else resolve_state_dir(None, config["agent_id"], env)]
    else:
        candidates = status_dirs(env)
        if len(candidates) > 1:
            names = ", ".join(str(path) for path in candidates)
            raise UsageError(f"several agents have state here ({names}): pick one with --state-dir")
    try:
        status = read_status(candidates[0]) if candidates else None
    except PermissionError:
        raise UsageError(
            f"cannot read {candidates[0]}: permission denied (run as the agent's user or root)"
        ) from None
    if status is None:
        where = candidates[0] if candidates else "the usual places"
        print(f"tether-agent status: no agent state found in {where}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(render(status))
    return 0 if status["state"] == "connected" else 1


async def _until_signal(
    work: Awaitable[None], stop: Callable[[], Awaitable[None]], grace: float = 15.0
) -> None:
    """Run ``work`` until it ends or SIGINT/SIGTERM asks for ``stop()``."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stopping.set)
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            log.info("event=signal action=shutdown")
            await stop()
            done, _ = await asyncio.wait({task}, timeout=grace)
            if not done:
                task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        waiter.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


# -- entry point -------------------------------------------------------------------------


class _UtcFormatter(logging.Formatter):
    converter = time.gmtime

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(record.created)) + (
            f".{int(record.msecs):03d}Z"
        )


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not when configured."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _configure_logging(level: str) -> None:
    handler = _StderrHandler()
    handler.setFormatter(_UtcFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _event_loop_runner(command: str) -> asyncio.Runner:
    """uvloop for ``simulate``, when it is installed: cheaper per connection, which ten
    thousand simulated agents feel. Not for one real agent: it would gain nothing there and
    costs about 9 MB of resident memory (bench/agent_footprint.py)."""
    if command != "simulate":
        return asyncio.Runner()
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


COMMANDS = {"run": _run, "simulate": _simulate, "doctor": _doctor}


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Console-script entry point; returns the exit status."""
    env = os.environ if env is None else env
    try:
        args = _build_parser().parse_args(argv)
    except UsageError as exc:
        print(f"tether-agent: {exc}", file=sys.stderr)
        return 2
    if args.command is None:
        print(
            "tether-agent: a command is required: run, simulate, doctor or status", file=sys.stderr
        )
        return 2
    _configure_logging(args.log_level)
    try:
        if args.command == "status":
            return _status(args, env)
        with _event_loop_runner(args.command) as runner:
            return runner.run(COMMANDS[args.command](args, env))
    except UsageError as exc:
        print(f"tether-agent {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
