"""``tether-console``: the desktop console (PySide6 on a qasync event loop).

::

    tether-console [--hub URL ...] [--token T] [--ca-file F] [--insecure] [--light]
    tether-console --hub URL --token T --screenshot PNG
                   [--view map|agents|graphs|topology|alerts|jobs]

``--hub`` may be given several times, or hold several URLs separated by commas (hubs of one
cluster): the console connects to the first and fails over to the next when its hub dies.
``--hub`` and ``--token`` fall back to ``TETHER_HUB_URL`` (comma-separated, like the agent's)
and ``TETHER_TOKEN``; without them a connect dialog asks. ``--screenshot`` connects,
waits for the snapshot, renders the chosen view of the main window into the PNG and exits
0; it exits 2 when it cannot connect within 30 s (at once when the hub refuses the token).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("QT_API", "pyside6")  # before qasync (or pyqtgraph) is imported

__all__ = ["VIEWS", "main", "parse_args", "parse_hub_urls"]

VIEWS = ("map", "agents", "graphs", "topology", "alerts", "jobs")
CONNECT_TIMEOUT = 30.0
#: Tests may shorten the screenshot's connect deadline; the contract's value is 30 s.
CONNECT_TIMEOUT_ENV = "TETHER_CONSOLE_CONNECT_TIMEOUT"
#: Documentation screenshots may let the graphs gather this many seconds of ticks first.
SETTLE_ENV = "TETHER_CONSOLE_SCREENSHOT_SETTLE"
SCREENSHOT_SIZE = (1600, 1000)


def parse_hub_urls(values: Sequence[str] | str | None) -> list[str]:
    """Hub URLs from repeated options and comma-separated lists, in order, without repeats."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    urls: list[str] = []
    for value in values:
        for part in value.split(","):
            url = part.strip()
            if url and url not in urls:
                urls.append(url)
    return urls


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tether-console",
        description="Tether desktop console: watch and drive the fleet live.",
    )
    parser.add_argument(
        "--hub",
        action="append",
        metavar="URL",
        help="hub base URL, ws:// or wss://; repeat it (or separate with commas) for the hubs "
        "of a cluster, tried in turn when one dies (env TETHER_HUB_URL)",
    )
    parser.add_argument("--token", help="admin token (env TETHER_TOKEN)")
    parser.add_argument("--ca-file", help="CA bundle that signed the hub's certificate")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="DANGEROUS: do not verify the hub's TLS certificate",
    )
    parser.add_argument(
        "--hub-cert-sha256", metavar="HEX", help="pin the hub certificate's SHA-256"
    )
    parser.add_argument("--cert", help="client certificate (hubs that require one)")
    parser.add_argument("--key", help="private key of --cert")
    parser.add_argument("--screenshot", metavar="PNG", help="save one view as PNG and exit")
    parser.add_argument("--view", choices=VIEWS, help="the view to show (with --screenshot)")
    parser.add_argument("--light", action="store_true", help="light theme")
    parser.add_argument("--settings", help=argparse.SUPPRESS)  # an INI file instead of QSettings
    args = parser.parse_args(argv)
    args.hubs = parse_hub_urls(args.hub) or parse_hub_urls(os.environ.get("TETHER_HUB_URL"))
    if args.token is None:
        args.token = os.environ.get("TETHER_TOKEN") or None
    for url in args.hubs:
        if not url.startswith(("ws://", "wss://")):
            parser.error(f"--hub needs a ws:// or wss:// URL, got {url!r}")
    args.hub = args.hubs[0] if args.hubs else None
    args.pin_sha256 = None
    if args.hub_cert_sha256:
        from hub.protocol.tls import parse_fingerprint

        try:
            args.pin_sha256 = parse_fingerprint(args.hub_cert_sha256)
        except ValueError as exc:
            parser.error(f"--hub-cert-sha256: {exc}")
    if args.screenshot and (not args.hub or not args.token):
        parser.error("--screenshot needs --hub and --token (or TETHER_HUB_URL and TETHER_TOKEN)")
    return args


def ssl_context_for(
    hub: str,
    ca_file: str | None,
    insecure: bool,
    pin: bytes | None = None,
    cert: str | None = None,
    key: str | None = None,
) -> ssl.SSLContext | None:
    if not hub.startswith("wss://"):
        return None
    from hub.protocol.tls import TlsOptions, make_ssl_context

    return make_ssl_context(
        TlsOptions(ca_file=ca_file, insecure=insecure, cert=cert, key=key, pin_sha256=pin)
    )


@dataclass
class ConnectionParams:
    hub: str
    token: str
    ca_file: str | None = None
    insecure: bool = False
    #: SHA-256 of the hub's certificate, when pinned (--hub-cert-sha256).
    pin_sha256: bytes | None = None
    #: Client certificate and key, for hubs that require one.
    cert: str | None = None
    key: str | None = None
    #: More hubs of the same cluster, tried in turn when the one connected to dies.
    fallback_hubs: tuple[str, ...] = ()

    @property
    def urls(self) -> list[str]:
        return parse_hub_urls([self.hub, *self.fallback_hubs])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.insecure:
        print(
            "WARNING: --insecure: the hub's TLS certificate is NOT verified; anyone on the "
            "path can read and change this session, including the admin token.",
            file=sys.stderr,
        )
    if (
        args.screenshot
        and not os.environ.get("QT_QPA_PLATFORM")
        and not os.environ.get("DISPLAY")
        and not os.environ.get("WAYLAND_DISPLAY")
    ):
        os.environ["QT_QPA_PLATFORM"] = "offscreen"  # a screenshot needs no screen

    import qasync
    from PySide6.QtCore import qInstallMessageHandler
    from PySide6.QtWidgets import QApplication

    qInstallMessageHandler(_qt_message)

    app = QApplication.instance() or QApplication([sys.argv[0] if sys.argv else "tether-console"])
    app.setApplicationName("Tether console")
    app.setOrganizationName("Tether")
    loop = qasync.QEventLoop(app)
    asyncio.set_event_loop(loop)
    try:
        with loop:
            return loop.run_until_complete(_run(args))
    finally:
        asyncio.set_event_loop(None)


#: Qt messages that say nothing to an operator (offscreen and Xvfb platforms).
_QUIET = ("propagateSizeHints", "QXcbConnection: XCB error", "XDG_RUNTIME_DIR")


def _qt_message(_kind: Any, _context: Any, message: str) -> None:
    if not any(part in message for part in _QUIET):
        print(message, file=sys.stderr)


async def _run(args: argparse.Namespace) -> int:
    from .settings import ConsoleSettings, TokenStore
    from .window import MainWindow

    settings = ConsoleSettings(args.settings)
    tokens = TokenStore(settings)
    light = bool(args.light or (not args.screenshot and settings.light_theme))
    window = MainWindow(settings, tokens, light=light)
    if args.screenshot:
        return await _screenshot(window, args)
    params: ConnectionParams | None = None
    if args.hub and args.token:
        params = _params(args)
    window.restore_layout()
    window.show()
    if params is not None:
        window.connect_to(params)
    else:
        window.ask_connection(", ".join(args.hubs) or None, args.ca_file, args.insecure)
    await window.closed.wait()
    await window.shutdown()
    return 0


def _params(args: argparse.Namespace) -> ConnectionParams:
    return ConnectionParams(
        args.hub,
        args.token,
        args.ca_file,
        args.insecure,
        args.pin_sha256,
        args.cert,
        args.key,
        tuple(args.hubs[1:]),
    )


async def _screenshot(window: Any, args: argparse.Namespace) -> int:
    from .client import ConnState

    timeout = CONNECT_TIMEOUT
    with contextlib.suppress(ValueError):
        timeout = float(os.environ.get(CONNECT_TIMEOUT_ENV, CONNECT_TIMEOUT))
    window.resize(*SCREENSHOT_SIZE)
    window.set_focus_view(args.view)
    window.show()
    params = _params(args)
    try:
        session = window.connect_to(params)
    except (ssl.SSLError, OSError) as exc:
        print(f"tether-console: cannot use the TLS settings: {exc}", file=sys.stderr)
        return 2
    deadline = time.monotonic() + timeout
    fleet = window.fleet
    while fleet.snapshot_count == 0:
        if session.state == ConnState.FAILED:
            print(f"tether-console: {session.last_error}", file=sys.stderr)
            await window.shutdown()
            return 2
        if time.monotonic() > deadline:
            reason = session.last_error or "no answer"
            print(
                f"tether-console: could not connect to {', '.join(args.hubs)} "
                f"within {timeout:g} s: {reason}",
                file=sys.stderr,
            )
            await window.shutdown()
            return 2
        await asyncio.sleep(0.05)
    settle = 0.0
    with contextlib.suppress(ValueError):
        settle = min(600.0, float(os.environ.get(SETTLE_ENV, "0")))
    if settle > 0:
        await asyncio.sleep(settle)
    try:
        await window.prepare_screenshot(args.view)
        pixmap = window.grab()
        if not pixmap.save(args.screenshot, "PNG"):
            print(f"tether-console: could not write {args.screenshot}", file=sys.stderr)
            return 2
    finally:
        await window.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
