"""``tether-hub``: run a hub, manage credentials, and drive a hub from scripts.

Exit status (the command-line contract, docs/operations.md): 0 success; 1 a command that
ran and did not succeed; 2 usage or connection errors, with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

import orjson

from .protocol.client import AdminClient, AdminError, HandshakeRefused
from .protocol.constants import AGENT_ID
from .protocol.tls import TlsOptions, make_ssl_context, parse_fingerprint

__all__ = ["main"]

LIMIT = re.compile(r"^(\d+|(100|[1-9]?[0-9])%)$")
#: ``serve --retention KIND=SECONDS``: the configuration field of each kind.
RETENTION_FLAGS = {
    "outputs": "output_retention",
    "commands": "command_retention",
    "sessions": "session_retention",
    "alerts": "alert_retention",
    "audit": "audit_retention",
    "heartbeats": "heartbeat_retention",
}


class UsageError(Exception):
    """Exit 2 with this message."""


class Failed(Exception):
    """The command ran and did not succeed: exit 1."""


def _dump(value: Any, pretty: bool = False) -> str:
    option = orjson.OPT_INDENT_2 if pretty else 0
    return orjson.dumps(value, option=option).decode()


def _env_hub() -> str | None:
    value = os.environ.get("TETHER_HUB_URL")
    return value.split(",")[0].strip() if value else None


# -- parser --------------------------------------------------------------------------------


def _store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=os.environ.get("TETHER_DATA_DIR"))
    parser.add_argument("--redis", default=os.environ.get("TETHER_REDIS_URL"))
    parser.add_argument("--config", help="TOML configuration file")


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hub", default=_env_hub(), help="ws:// or wss:// base URL")
    parser.add_argument("--token", default=os.environ.get("TETHER_TOKEN"), help="admin token")
    parser.add_argument("--ca-file", help="CA bundle to verify the hub's certificate")
    parser.add_argument(
        "--hub-cert-sha256", metavar="HEX", help="pin the hub certificate's SHA-256"
    )
    parser.add_argument("--cert", help="client certificate (hubs that require one)")
    parser.add_argument("--key", help="private key of --cert")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="DANGEROUS: do not verify the hub's TLS certificate",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tether-hub", description="The Tether hub.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the hub")
    serve.add_argument("--listen", default=None, help="HOST:PORT (default 127.0.0.1:8765)")
    _store_options(serve)
    serve.add_argument("--hub-id")
    serve.add_argument("--tls-cert")
    serve.add_argument("--tls-key")
    serve.add_argument("--client-ca")
    serve.add_argument("--client-crl", help="PEM CRL of the client CA (reread when it changes)")
    serve.add_argument("--require-client-cert", action="store_true", default=None)
    serve.add_argument("--jwt-key", help="PEM public key (RS256/ES256) for agent JWTs")
    serve.add_argument("--jwt-secret-file", help="file holding the HS256 secret for agent JWTs")
    serve.add_argument("--allowed-origin", action="append", default=[], dest="allowed_origins")
    serve.add_argument("--max-agents", type=int)
    serve.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("TETHER_WORKERS", "0")) or None,
        help="run N hub processes on the one port (SO_REUSEPORT); needs --redis",
    )
    serve.add_argument("--heartbeat-interval", type=float)
    serve.add_argument(
        "--retention",
        action="append",
        default=[],
        metavar="KIND=SECONDS",
        help=f"keep a kind this long (0: forever); kinds: {', '.join(RETENTION_FLAGS)}",
    )
    serve.add_argument("--audit-export", help="append audit entries here before pruning them")
    serve.add_argument("--log-level")
    serve.add_argument("--log-json", action="store_true", default=None)

    token = commands.add_parser("token", help="manage credentials")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    create = token_commands.add_parser("create", help="create a credential; prints its secret")
    _store_options(create)
    kind = create.add_mutually_exclusive_group(required=True)
    kind.add_argument("--agent", metavar="ID", help="an agent key bound to this agent id")
    kind.add_argument("--enroll", action="store_true", help="an enrollment key")
    kind.add_argument("--admin", action="store_true", help="an admin token")
    create.add_argument("--ttl", type=float, help="expiry in seconds (enrollment keys)")
    create.add_argument("--uses", type=int, help="number of new agents it may enroll")
    create.add_argument("--pattern", help="agent id glob the enrollment key is limited to")
    create.add_argument("--role", choices=("viewer", "operator", "admin"))
    create.add_argument("--name")
    create.add_argument("--json", action="store_true")
    listing = token_commands.add_parser("list", help="list credentials (never secrets)")
    _store_options(listing)
    listing.add_argument("--json", action="store_true")
    revoke = token_commands.add_parser(
        "revoke", help="revoke a credential by id (a JWT by jwt:<jti>)"
    )
    _store_options(revoke)
    revoke.add_argument("token_id", metavar="TOKEN_ID")
    revoke.add_argument("--json", action="store_true")

    agents = commands.add_parser("agents", help="list agents")
    _client_options(agents)
    agents.add_argument("--selector", action="append", default=[], metavar="KEY=GLOB")

    send = commands.add_parser("send", help="dispatch a command")
    _client_options(send)
    send.add_argument("--agent", action="extend", nargs="+", default=[], metavar="ID")
    send.add_argument("--selector", action="extend", nargs="+", default=[], metavar="KEY=GLOB")
    send.add_argument("name", metavar="NAME", nargs="?")
    send.add_argument("--args", default="{}", help="arguments as a JSON object")
    send.add_argument("--timeout", type=float, default=60.0)
    send.add_argument("--ttl", type=float, default=600.0)
    send.add_argument("--max-concurrency", metavar="N|P%")
    send.add_argument("--max-errors", metavar="N|P%")
    send.add_argument("--wait", action="store_true", help="wait until every target finished")
    send.add_argument("--wait-timeout", type=float)

    tail = commands.add_parser("tail", help="print events as they happen")
    _client_options(tail)
    tail.add_argument(
        "--topic",
        action="append",
        default=[],
        choices=("agents", "commands", "alerts", "metrics", "audit"),
    )

    jobs = commands.add_parser("jobs", help="list jobs, newest first")
    _client_options(jobs)
    jobs.add_argument("--state")
    jobs.add_argument("--limit", type=int, default=50)

    job = commands.add_parser("job", help="one job and its commands")
    _client_options(job)
    job.add_argument("job_id", metavar="JOB_ID")

    cancel = commands.add_parser("cancel", help="cancel a job or a command")
    _client_options(cancel)
    target = cancel.add_mutually_exclusive_group(required=True)
    target.add_argument("--job", metavar="JOB_ID")
    target.add_argument("--command", metavar="COMMAND_ID", dest="command_id")

    alerts = commands.add_parser("alerts", help="list alerts")
    _client_options(alerts)
    alerts.add_argument("--state", choices=("firing", "acknowledged", "resolved", "open", "all"))
    alerts.add_argument("--limit", type=int, default=100)

    ack = commands.add_parser("ack", help="acknowledge an alert")
    _client_options(ack)
    ack.add_argument("alert_id", metavar="ALERT_ID")
    ack.add_argument("--comment")

    audit = commands.add_parser("audit", help="read the audit log (admin role)")
    _client_options(audit)
    audit.add_argument("--action")
    audit.add_argument("--subject")
    audit.add_argument("--limit", type=int, default=100)
    audit.add_argument("--before")

    _store_parser(commands)
    return parser


def _store_parser(commands: Any) -> None:
    """``store stats|backup|restore``: the embedded store's file (docs/operations.md)."""
    store = commands.add_parser("store", help="the store file: figures, backup, restore")
    store_commands = store.add_subparsers(dest="store_command", required=True)
    stats = store_commands.add_parser(
        "stats", help="sizes and row counts per kind, oldest entries, free pages"
    )
    backup = store_commands.add_parser(
        "backup", help="a consistent copy of the store, also while the hub runs"
    )
    backup.add_argument("out", metavar="OUT", help="the backup file to write")
    restore = store_commands.add_parser(
        "restore", help="put a backup in place as the store of --data-dir (hub stopped)"
    )
    restore.add_argument("backup", metavar="IN", help="a file made by `store backup`")
    restore.add_argument(
        "--force", action="store_true", help="move a store already there aside (.replaced)"
    )
    for sub in (stats, backup, restore):
        sub.add_argument("--data-dir", default=os.environ.get("TETHER_DATA_DIR"))
        sub.add_argument("--config", help="TOML configuration file (its data_dir)")
        sub.add_argument("--json", action="store_true")


def main(argv: list[str] | None = None) -> NoReturn:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            code = _serve(args)
        elif args.command == "token":
            code = _run(_token(args))
        elif args.command == "store":
            code = _store(args)
        else:
            code = _run(_client_command(args))
    except UsageError as exc:
        print(f"tether-hub: {exc}", file=sys.stderr)
        code = 2
    except Failed as exc:
        if str(exc):
            print(f"tether-hub: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        # Output piped into `head` and the like: the reader had enough. Python would print a
        # traceback at exit flushing stdout again; point it at /dev/null instead.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141
    sys.exit(code)


def _run(coroutine: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop

        return uvloop.run(coroutine)
    except ImportError:
        return asyncio.run(coroutine)


# -- serve ---------------------------------------------------------------------------------


def _config_from(args: argparse.Namespace) -> Any:
    from .config import load_config

    flags = {
        name: getattr(args, name, None)
        for name in (
            "listen",
            "hub_id",
            "tls_cert",
            "tls_key",
            "client_ca",
            "client_crl",
            "require_client_cert",
            "jwt_key",
            "jwt_secret_file",
            "allowed_origins",
            "max_agents",
            "heartbeat_interval",
            "log_level",
            "log_json",
        )
    }
    flags["data_dir"] = args.data_dir
    flags["redis_url"] = args.redis
    flags["audit_export"] = getattr(args, "audit_export", None)
    for item in getattr(args, "retention", None) or ():
        kind, _, seconds = item.partition("=")
        field = RETENTION_FLAGS.get(kind.strip())
        if field is None or not seconds:
            raise UsageError(f"--retention {item!r}: expected KIND=SECONDS, KIND one of "
                             f"{', '.join(RETENTION_FLAGS)}")  # fmt: skip
        flags[field] = seconds.strip()
    try:
        return load_config(args.config, flags)
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc).splitlines()[0] if str(exc) else repr(exc)) from None


def _serve(args: argparse.Namespace) -> int:
    if args.listen and (args.workers or 1) == 1:
        # Before the imports below (a second or more): a fleet dialing a restarted hub
        # waits in the backlog rather than being refused and backing off.
        from .protocol.listening import listen_early

        listen_early(args.listen, reuse_port=bool(os.environ.get("TETHER_REUSE_PORT")))
    from .cluster_hub import make_hub
    from .logs import configure_logging
    from .store.base import StoreUnavailable

    config = _config_from(args)
    no_store = args.data_dir is None and config.redis_url is None and args.config is None
    if no_store and "TETHER_DATA_DIR" not in os.environ:
        raise UsageError("serve needs --data-dir (or TETHER_DATA_DIR)")
    configure_logging(config.log_level, config.log_json)
    if (config.tls_cert is None) != (config.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    if config.require_client_cert and config.client_ca is None:
        raise UsageError("--require-client-cert needs --client-ca")
    if config.client_crl is not None and config.client_ca is None:
        raise UsageError("--client-crl needs --client-ca")

    workers = args.workers or 1
    if workers > 1:
        if config.redis_url is None:
            raise UsageError(
                "--workers needs --redis: the worker processes share one fleet through Redis "
                "(each is a hub of its own; without a shared store they would split the fleet)"
            )
        from .workers import supervise

        return supervise(config, workers, argv=sys.argv[1:])

    try:
        hub = make_hub(config)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot start: {exc}") from None

    async def serve() -> int:
        try:
            await hub.serve_forever()
        except OSError as exc:
            print(f"tether-hub: cannot listen on {config.listen}: {exc}", file=sys.stderr)
            return 2
        except StoreUnavailable as exc:
            print(f"tether-hub: cannot start: {exc}", file=sys.stderr)
            return 2
        return 0

    code = _run(serve())
    # The hub's state is saved (every shutdown step is bounded). Leave now: a worker thread
    # still finishing a timed-out step must not keep a stopping hub from exiting.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# -- store ---------------------------------------------------------------------------------


def _store(args: argparse.Namespace) -> int:
    import sqlite3
    from pathlib import Path

    from .store import maintenance

    data_dir = args.data_dir
    if data_dir is None and args.config:
        from .config import load_config

        try:
            data_dir = str(load_config(args.config).data_dir)
        except (OSError, ValueError) as exc:
            raise UsageError(str(exc).splitlines()[0]) from None
    if data_dir is None:
        raise UsageError("store commands need --data-dir (or TETHER_DATA_DIR)")
    action = args.store_command
    try:
        if action == "stats":
            result = maintenance.stats(Path(data_dir))
        elif action == "backup":
            result = maintenance.backup(Path(data_dir), Path(args.out))
        else:
            result = maintenance.restore(Path(args.backup), Path(data_dir), force=args.force)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    except maintenance.RestoreError as exc:
        raise Failed(str(exc)) from None
    except (OSError, sqlite3.Error) as exc:
        raise Failed(f"store {action} failed: {exc}") from None
    if args.json:
        print(_dump(result))
    elif action == "stats":
        _print_stats(result)
    else:
        print(" ".join(f"{key}={value}" for key, value in result.items()))
    return 0


def _print_stats(stats: dict[str, Any]) -> None:
    mib = 1024 * 1024
    print(
        f"{stats['path']}: {stats['file_bytes'] / mib:.1f} MiB (+ WAL "
        f"{stats['wal_bytes'] / mib:.1f} MiB), schema {stats['schema']}, {stats['pages']} "
        f"pages of {stats['page_size']} B, {stats['free_pages']} free, auto_vacuum "
        f"{stats['auto_vacuum']}"
    )
    print(f"{'KIND':<12} {'ROWS':>10} {'MIB':>9}  OLDEST")
    for kind, figures in stats["kinds"].items():
        print(
            f"{kind:<12} {figures['rows']:>10} {figures['bytes'] / mib:>9.2f}  "
            f"{figures['oldest'] or '-'}"
        )


# -- token ---------------------------------------------------------------------------------


def _redacted(url: str) -> str:
    """A Redis URL fit for a message: without its password."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" if parts.username else f":***@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return parts._replace(netloc=netloc).geturl()


async def _token(args: argparse.Namespace) -> int:
    from .auth import Credentials
    from .config import load_config
    from .store.base import Store, StoreUnavailable

    redis_url, data_dir, prefix = args.redis, args.data_dir, "tether"
    if args.config:
        config = load_config(args.config)
        prefix = config.redis_prefix
        if redis_url is None and data_dir is None:
            redis_url, data_dir = config.redis_url, str(config.data_dir)
    store: Store
    if redis_url:
        # Cluster mode: the credentials every hub syncs from, each within a second.
        from .store.redis import RedisStore

        store = RedisStore.from_url(redis_url, prefix=prefix)
        where = f"Redis at {_redacted(redis_url)}"
    elif data_dir is not None:
        from .store.sqlite import SQLiteStore

        store, where = SQLiteStore(data_dir, readers=1), data_dir
    else:
        raise UsageError("token commands need --data-dir (or TETHER_DATA_DIR) or --redis URL")
    try:
        await store.open()
    except Exception as exc:
        raise UsageError(f"cannot open the store in {where}: {exc}") from None
    try:
        return await _token_action(args, Credentials(store), store)
    except StoreUnavailable as exc:
        raise Failed(f"the store cannot take the change now: {exc}") from None
    finally:
        await store.close()


async def _token_action(args: argparse.Namespace, credentials: Any, store: Any) -> int:
    """create, list or revoke: the store is open."""
    action = args.token_command
    if action == "create":
        return await _token_create(args, credentials, store)
    if action == "list":
        records = await store.credentials()
        listing = [r.listing() for r in records]
        if args.json:
            print(_dump(listing))
        else:
            print(f"{'ID':<14}{'KIND':<8}{'AGENT/ROLE':<28}{'USES':<6}{'EXPIRES':<26}REVOKED")
            for item in listing:
                who = item["agent_id"] or item["role"] or item["pattern"] or ""
                uses = "" if item["uses_left"] is None else str(item["uses_left"])
                print(
                    f"{item['id']:<14}{item['kind']:<8}{who[:27]:<28}{uses:<6}"
                    f"{item['expires_at'] or '':<26}{'yes' if item['revoked'] else 'no'}"
                )
        return 0
    record = await store.revoke_credential(args.token_id)
    if record is None:
        raise Failed(f"no credential with id {args.token_id}")
    from .audit import Auditor
    from .bus import Bus

    auditor = Auditor(store, Bus(), "cli")
    await store.audit([auditor.entry("credential.revoked", actor="cli", subject=record.id)])
    if args.json:
        print(_dump(record.listing()))
    else:
        print(f"revoked {record.id}")
    return 0


async def _token_create(args: argparse.Namespace, credentials: Any, store: Any) -> int:
    from .audit import Auditor
    from .bus import Bus

    if args.agent is not None:
        if not AGENT_ID.match(args.agent):
            raise UsageError(f"invalid agent id {args.agent!r}")
        record, token = credentials.make("agent", agent_id=args.agent, name=args.name)
    elif args.enroll:
        if args.uses is not None and args.uses < 1:
            raise UsageError("--uses must be at least 1")
        if args.ttl is not None and args.ttl <= 0:
            raise UsageError("--ttl must be positive")
        record, token = credentials.make(
            "enroll", uses=args.uses, ttl=args.ttl, pattern=args.pattern, name=args.name
        )
    else:
        if args.role is None:
            raise UsageError("--admin needs --role viewer|operator|admin")
        record, token = credentials.make("admin", role=args.role, name=args.name)
    await store.add_credential(record)
    auditor = Auditor(store, Bus(), "cli")
    await store.audit(
        [auditor.entry("credential.created", actor="cli", subject=record.id, kind=record.kind)]
    )
    if args.json:
        print(_dump({"id": record.id, "token": token}))
    else:
        print(token)
    return 0


# -- client commands ------------------------------------------------------------------------


def _selector(pairs: list[str]) -> dict[str, Any]:
    selector: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise UsageError(f"--selector needs KEY=GLOB, got {pair!r}")
        if key in ("agent_id", "region", "platform", "status"):
            selector[key] = value
        else:
            labels[key] = value
    if labels:
        selector["labels"] = labels
    return selector


def _limit(value: str | None, option: str) -> int | str | None:
    if value is None:
        return None
    if not LIMIT.match(value):
        raise UsageError(f"{option} needs a count or a percentage, got {value!r}")
    return value if value.endswith("%") else int(value)


async def _client_command(args: argparse.Namespace) -> int:
    if not args.hub:
        raise UsageError("--hub is required (or TETHER_HUB_URL)")
    if not args.token:
        raise UsageError("--token is required (or TETHER_TOKEN)")
    if not args.hub.startswith(("ws://", "wss://")):
        raise UsageError(f"--hub needs a ws:// or wss:// URL, got {args.hub!r}")
    handler: Callable[[AdminClient, argparse.Namespace], Coroutine[Any, Any, int]] = {
        "agents": _agents,
        "send": _send,
        "tail": _tail,
        "jobs": _jobs,
        "job": _job,
        "cancel": _cancel,
        "alerts": _alerts,
        "ack": _ack,
        "audit": _audit,
    }[args.command]
    if args.command == "send":
        _check_send(args)
    context = None
    pin = None
    if args.hub_cert_sha256:
        try:
            pin = parse_fingerprint(args.hub_cert_sha256)
        except ValueError as exc:
            raise UsageError(f"--hub-cert-sha256: {exc}") from None
    if args.hub.startswith("wss://"):
        try:
            context = make_ssl_context(
                TlsOptions(args.ca_file, args.insecure, args.cert, args.key, pin_sha256=pin)
            )
        except OSError as exc:
            raise UsageError(f"cannot read --ca-file or --cert/--key: {exc}") from None
        if args.insecure:
            print("tether-hub: WARNING: TLS verification is off (--insecure)", file=sys.stderr)
    client = AdminClient(args.hub, args.token, ssl_context=context, pin_sha256=pin)
    try:
        await client.open()
    except HandshakeRefused as exc:
        reason = exc.error or "refused"
        raise UsageError(f"the hub refused the connection: HTTP {exc.status} {reason}") from None
    except (OSError, TimeoutError, ConnectionError) as exc:
        raise UsageError(f"cannot connect to {args.hub}: {exc or type(exc).__name__}") from None
    try:
        return await handler(client, args)
    except AdminError as exc:
        if exc.code in ("forbidden", "unavailable", "invalid_message"):
            raise UsageError(f"{exc.code}: {exc.message}") from None
        raise Failed(f"{exc.code}: {exc.message}") from None
    except ConnectionError as exc:
        raise UsageError(str(exc)) from None
    finally:
        await client.close()


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(v)) for v in column) for column in zip(header, *rows, strict=False)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False)))
    for row in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=False)))


async def _agents(client: AdminClient, args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {}
    if args.selector:
        fields["selector"] = _selector(args.selector)
    data = await client.request("agents", **fields)
    agents = data["agents"]
    if args.json:
        print(_dump(agents))
        return 0
    _table(
        [
            [a["agent_id"], a["state"], a.get("status") or "", a["region"], a["platform"],
             a["version"], a.get("last_seen") or ""]
            for a in agents
        ],
        ["AGENT", "STATE", "STATUS", "REGION", "PLATFORM", "VERSION", "LAST SEEN"],
    )  # fmt: skip
    return 0


def _check_send(args: argparse.Namespace) -> None:
    if args.name is None:
        # "--agent a b NAME" style: the last value belongs to NAME.
        if args.agent and not args.selector:
            args.name = args.agent.pop()
        elif args.selector and "=" not in args.selector[-1]:
            args.name = args.selector.pop()
    if args.name is None:
        raise UsageError("send needs a command NAME")
    if bool(args.agent) == bool(args.selector):
        raise UsageError("send needs --agent ID ... or --selector KEY=GLOB ... (not both)")
    try:
        parsed = orjson.loads(args.args)
    except orjson.JSONDecodeError as exc:
        raise UsageError(f"--args is not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise UsageError("--args must be a JSON object")
    args.args_value = parsed
    for agent_id in args.agent:
        if not AGENT_ID.match(agent_id):
            raise UsageError(f"invalid agent id {agent_id!r}")
    args.concurrency_value = _limit(args.max_concurrency, "--max-concurrency")
    args.errors_value = _limit(args.max_errors, "--max-errors")


async def _send(client: AdminClient, args: argparse.Namespace) -> int:
    target: dict[str, Any] = (
        {"agent_ids": args.agent} if args.agent else {"selector": _selector(args.selector)}
    )
    request: dict[str, Any] = {
        "target": target,
        "name": args.name,
        "args": args.args_value,
        "timeout": args.timeout,
        "ttl": args.ttl,
    }
    if args.concurrency_value is not None:
        request["max_concurrency"] = args.concurrency_value
    if args.errors_value is not None:
        request["max_errors"] = args.errors_value
    if args.wait:
        # Subscribe first so no state change slips between dispatch and waiting.
        await client.request("subscribe", topics=["commands"])
    try:
        data = await client.request("dispatch", **request)
    except AdminError as exc:
        if exc.code in ("not_found", "unsupported"):
            if args.json:
                print(_dump({"ok": False, "error": {"code": exc.code, "message": exc.message}}))
            raise Failed(f"the hub refused the dispatch: {exc.code}: {exc.message}") from None
        raise
    if not args.wait:
        print(_dump(data, pretty=not args.json))
        return 1 if data.get("refused") else 0
    deadline = time.monotonic() + (args.wait_timeout or (args.ttl + args.timeout + 10))
    # --json: one object at the end. Otherwise a progress bar on a terminal, or JSON lines
    # (one per finished command, then the job) when the output goes to a pipe or a file.
    lines = not args.json and not sys.stdout.isatty()
    bar = not args.json and not lines and sys.stderr.isatty()
    result = await _wait_job(
        client, data["job_id"], len(data["command_ids"]), deadline, lines=lines, bar=bar
    )
    if args.json:
        result["refused"] = data.get("refused", [])
        print(_dump(result))
    elif lines:
        print(_dump({"type": "job", "job": result["job"], "refused": data.get("refused", [])}))
    else:
        _print_job(result, data.get("refused", []))
    commands = result["commands"]
    ok = (
        not data.get("refused")
        and result["job"]["state"] == "succeeded"
        and all(c["state"] == "succeeded" for c in commands)
    )
    return 0 if ok else 1


TERMINAL = frozenset({"succeeded", "failed", "rejected", "cancelled", "timed_out", "expired"})


async def _wait_job(
    client: AdminClient, job_id: str, total: int, deadline: float, lines: bool, bar: bool
) -> dict[str, Any]:
    """Follow a job through its ``commands`` events until it finishes (or the deadline).

    Progress comes from the events (a bar on a terminal, a JSON line per finished command
    when ``lines``); the job's state is confirmed with a cheap ``jobs`` query, and the full
    job is read once at the end.
    """
    finished: dict[str, dict[str, Any]] = {}
    last_check = 0.0
    while True:
        now = time.monotonic()
        if len(finished) >= total or now - last_check >= 2.0:
            last_check = now
            summary = (await client.request("jobs", filter={"job_id": job_id}, limit=1))["jobs"]
            if summary and summary[0]["state"] != "running":
                break
        if now >= deadline:
            break
        event = await client.next_event(timeout=min(0.5, deadline - now))
        if event is None:
            continue
        command = event.get("command") or {}
        if command.get("job_id") != job_id or command.get("state") not in TERMINAL:
            continue
        if command["command_id"] in finished:
            continue
        finished[command["command_id"]] = command
        if lines:
            print(_dump({"type": "progress", "done": len(finished), "total": total,
                         "command": command}), flush=True)  # fmt: skip
        if bar:
            width = 30
            filled = int(width * len(finished) / max(1, total))
            states: dict[str, int] = {}
            for item in finished.values():
                states[item["state"]] = states.get(item["state"], 0) + 1
            print(
                f"\r[{'#' * filled}{'.' * (width - filled)}] {len(finished)}/{total} "
                + " ".join(f"{k}={v}" for k, v in sorted(states.items())),
                end="",
                file=sys.stderr,
                flush=True,
            )
    if bar:
        print(file=sys.stderr)
    return await client.request("job", job_id=job_id, reply_timeout=120)


def _print_job(detail: dict[str, Any], refused: list[dict[str, str]]) -> None:
    job = detail["job"]
    print(f"job {job['job_id']} {job['name']}: {job['state']} ({job['total']} targets)")
    rows = []
    for command in detail["commands"]:
        result = command.get("result") or {}
        summary = result.get("error") or ""
        if not summary and result.get("data") is not None:
            summary = _dump(result["data"])[:80]
        exit_code = result.get("exit_code")
        rows.append(
            [command["agent_id"], command["state"], "" if exit_code is None else exit_code, summary]
        )
    for item in refused:
        rows.append([item["agent_id"], f"refused ({item['code']})", "", ""])
    _table(rows, ["AGENT", "STATE", "EXIT", "RESULT"])


async def _tail(client: AdminClient, args: argparse.Namespace) -> int:
    topics = args.topic or ["agents", "commands", "alerts"]
    await client.request("subscribe", topics=topics)
    async for event in client.events():
        if args.json:
            print(_dump(event), flush=True)
            continue
        kind = event.get("type")
        if kind != "event":
            print(f"-- {kind}", flush=True)
            continue
        topic = event.get("topic")
        if topic == "agents":
            agent = event.get("agent") or {}
            line = f"{agent.get('agent_id')} {agent.get('state')}"
        elif topic == "commands":
            command = event.get("command") or {}
            if event.get("kind") == "output":
                line = f"{event.get('command_id')} {event.get('stream')}: {event.get('data')!r}"
            else:
                line = (
                    f"{command.get('command_id')} {command.get('agent_id')} {command.get('state')}"
                )
        elif topic == "alerts":
            alert = event.get("alert") or {}
            line = " ".join(str(alert.get(k)) for k in ("severity", "rule", "subject"))
            line += f": {alert.get('message')}"
        elif topic == "metrics":
            line = _dump(event.get("stats"))
        else:
            line = _dump(event.get("entry"))
        print(f"{time.strftime('%H:%M:%S')} {topic}/{event.get('kind')} {line}", flush=True)
    return 0


async def _jobs(client: AdminClient, args: argparse.Namespace) -> int:
    filter_ = {"state": args.state} if args.state else {}
    data = await client.request("jobs", filter=filter_, limit=min(args.limit, 1000))
    if args.json:
        print(_dump(data["jobs"]))
        return 0
    _table(
        [
            [j["job_id"], j["name"], j["state"], j["total"],
             " ".join(f"{k}={v}" for k, v in sorted(j["counts"].items())), j["created_at"]]
            for j in data["jobs"]
        ],
        ["JOB", "NAME", "STATE", "TOTAL", "COUNTS", "CREATED"],
    )  # fmt: skip
    return 0


async def _job(client: AdminClient, args: argparse.Namespace) -> int:
    detail = await client.request("job", job_id=args.job_id)
    if args.json:
        print(_dump(detail))
    else:
        _print_job(detail, [])
    return 0


async def _cancel(client: AdminClient, args: argparse.Namespace) -> int:
    fields = {"job_id": args.job} if args.job else {"command_id": args.command_id}
    data = await client.request("cancel", **fields)
    print(_dump(data, pretty=not args.json))
    return 0


async def _alerts(client: AdminClient, args: argparse.Namespace) -> int:
    state = args.state or "open"
    filter_: dict[str, Any] = {}
    if state == "open":
        filter_["state"] = ["firing", "acknowledged"]
    elif state != "all":
        filter_["state"] = state
    data = await client.request("alerts", filter=filter_, limit=min(args.limit, 1000))
    if args.json:
        print(_dump(data["alerts"]))
        return 0
    _table(
        [
            [a["alert_id"], a["severity"], a["state"], a["rule"], a["subject"], a["message"][:60]]
            for a in data["alerts"]
        ],
        ["ALERT", "SEVERITY", "STATE", "RULE", "SUBJECT", "MESSAGE"],
    )
    return 0


async def _ack(client: AdminClient, args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {"alert_id": args.alert_id}
    if args.comment:
        fields["comment"] = args.comment
    data = await client.request("ack_alert", **fields)
    print(_dump(data["alert"], pretty=not args.json))
    return 0


async def _audit(client: AdminClient, args: argparse.Namespace) -> int:
    filter_ = {k: v for k, v in (("action", args.action), ("subject", args.subject)) if v}
    fields: dict[str, Any] = {"filter": filter_, "limit": min(args.limit, 1000)}
    if args.before:
        fields["before"] = args.before
    data = await client.request("audit", **fields)
    if args.json:
        print(_dump(data))
        return 0
    for entry in data["entries"]:
        print(
            f"{entry['time']} {entry['action']} actor={entry['actor']} "
            f"subject={entry['subject']} source={entry['source']} {_dump(entry['detail'])}"
        )
    if data.get("next"):
        print(f"-- more: --before {data['next']}")
    return 0
