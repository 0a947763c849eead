"""Outbound proxies for the agent's hub connection: which one, and a tunnel through it.

Many corporate networks let nothing out but an HTTP proxy (``CONNECT``, perhaps with a
username and password) or a SOCKS5 proxy. This module decides, per hub URL, whether to go
through one and which (``--proxy``, the usual environment variables, ``NO_PROXY``), and opens
the tunnel with python-socks; the WebSocket (and its TLS, end to end to the hub: certificate
checks, pinning and client certificates unchanged) then runs over the tunnelled socket.

Precedence, as for every agent option (flags beat the environment, which beats the config
file): ``--no-proxy`` (direct, whatever else is set), ``--proxy URL``, the environment
(``https_proxy``/``HTTPS_PROXY`` for ``wss://``, ``http_proxy``/``HTTP_PROXY`` for ``ws://``,
then ``all_proxy``/``ALL_PROXY``; the lowercase name wins when both are set, as in Python's
``urllib``), then ``proxy`` in the config file. ``NO_PROXY`` (or the config's ``no_proxy``)
exempts hubs from a proxy chosen by the environment or the config; ``--proxy`` is explicit
and always applies.

Credentials in a proxy URL never reach a log line or ``doctor``'s output: only
:meth:`ProxySpec.redacted` is shown.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import unquote, urlsplit

__all__ = [
    "ProxyRefused",
    "ProxyRoute",
    "ProxySettings",
    "ProxySpec",
    "bypassed",
    "open_tunnel",
    "parse_proxy_url",
]

Scheme = Literal["http", "socks5"]
DEFAULT_PORTS: dict[str, int] = {"http": 80, "socks5": 1080}
#: What a refusing HTTP proxy means, in words an operator can act on.
HTTP_REFUSALS = {
    401: "the proxy refused the credentials in the proxy URL",
    403: "the proxy forbids CONNECT to this host or port (its ACL or allowed ports)",
    407: "the proxy wants credentials, or refused the ones in the proxy URL",
    500: "the proxy could not connect to the hub (wrong host or port, or the hub is down)",
    502: "the proxy could not reach the hub (check the hub's name and port from the proxy)",
    503: "the proxy could not reach the hub or is overloaded",
    504: "the proxy timed out reaching the hub",
}


class ProxyRefused(OSError):
    """The proxy could not be reached or would not open the tunnel; ``reason`` is one line.

    An ``OSError``, so that every dial path treats it as a failed dial (the normal backoff).
    """

    def __init__(self, reason: str, *, stage: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        #: ``reach`` (DNS/TCP to the proxy), ``connect`` (the tunnel request), ``timeout``.
        self.stage = stage
        #: The HTTP status or SOCKS reply code of a refusal, when there was one.
        self.status = status


@dataclass(frozen=True, slots=True)
class ProxySpec:
    """One proxy: where it is and how to authenticate (the password is never shown)."""

    scheme: Scheme
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def redacted(self) -> str:
        """The URL to show: the user name, never the password."""
        user = f"{self.username}:***@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{user}{host}:{self.port}"

    def __str__(self) -> str:
        return self.redacted()


def parse_proxy_url(url: str, what: str = "proxy") -> ProxySpec:
    """``http://[user:pass@]host[:port]`` or ``socks5://…`` (``socks5h://`` is the same:
    SOCKS5 always resolves the hub's name at the proxy). A URL without a scheme is HTTP,
    as curl reads it. Raises ValueError naming ``what`` (never echoing a password)."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(f"{what}: not a proxy URL (want http://HOST:PORT or socks5://…)") from None
    scheme = parts.scheme.lower()
    if scheme == "socks5h":
        scheme = "socks5"
    if scheme not in DEFAULT_PORTS:
        hint = ""
        if scheme == "https":
            hint = " (TLS to the proxy itself is not supported; use http://)"
        raise ValueError(f"{what}: unsupported proxy scheme {scheme!r}{hint}")
    if not parts.hostname:
        raise ValueError(f"{what}: the proxy URL has no host")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if username is not None and ":" in username:
        raise ValueError(f"{what}: a user name may not contain ':'")
    return ProxySpec(
        scheme=scheme,  # type: ignore[arg-type]
        host=parts.hostname,
        port=port or DEFAULT_PORTS[scheme],
        username=username,
        password=password if username else None,
    )


# -- NO_PROXY -----------------------------------------------------------------------------


def _normal_host(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


def bypassed(host: str, port: int, no_proxy: str) -> str | None:
    """The ``NO_PROXY`` entry that exempts ``host:port``, or None.

    Entries (comma- or space-separated, case-insensitive): ``*`` (everything), a host name
    (itself and every name under it: ``corp.example`` and ``.corp.example`` both match
    ``hub.corp.example``; ``*.corp.example`` too), an IP address, or a CIDR block
    (``10.0.0.0/8``, ``fd00::/8``), each optionally with ``:PORT``. Names are not resolved
    to match a CIDR block (as curl and Go do): list the hub's name, or dial it by address.
    """
    name = _normal_host(host)
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(name)
    except ValueError:
        address = None
    for raw in no_proxy.replace(",", " ").split():
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return raw
        entry_port: int | None = None
        if entry.startswith("["):  # [v6]:port
            inside, _, rest = entry[1:].partition("]")
            entry = inside
            if rest.startswith(":") and rest[1:].isdigit():
                entry_port = int(rest[1:])
        elif entry.count(":") == 1:  # name:port or v4:port (a bare v6 address has several)
            entry, _, maybe_port = entry.partition(":")
            if maybe_port.isdigit():
                entry_port = int(maybe_port)
        if entry_port is not None and entry_port != port:
            continue
        if "/" in entry:
            try:
                network = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                continue
            if address is not None and address.version == network.version and address in network:
                return raw
            continue
        try:
            entry_address = ipaddress.ip_address(entry)
        except ValueError:
            entry_address = None
        if entry_address is not None:
            if address is not None and address == entry_address:
                return raw
            continue
        suffix = entry.removeprefix("*").lstrip(".").rstrip(".")
        if suffix and (name == suffix or name.endswith("." + suffix)):
            return raw
    return None


# -- the choice -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProxyRoute:
    """How one hub URL is dialed: through ``proxy`` (None: directly) and why, in words."""

    proxy: ProxySpec | None
    #: Where the choice came from: ``--proxy``, ``HTTPS_PROXY``, ``config proxy``, …
    source: str
    #: One line for logs and ``doctor``: ``"via http://proxy:3128 (HTTPS_PROXY)"``.
    reason: str


def _env(env: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """The lowercase variable, else the uppercase one: (name used, value)."""
    for candidate in (name.lower(), name.upper()):
        value = env.get(candidate, "").strip()
        if value:
            return candidate, value
    return None


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """Everything the agent was told about proxies; :meth:`route` decides per hub URL.

    Made once at startup by :meth:`resolve`, which validates every proxy URL it may use, so
    that a typo is a usage error at start rather than a dial failure every minute.
    """

    explicit: ProxySpec | None = None
    disabled: bool = False
    #: Proxies from the environment, by variable name actually set (``https_proxy``, …).
    from_env: Mapping[str, ProxySpec] = field(default_factory=dict)
    config: ProxySpec | None = None
    no_proxy: str = ""
    #: Which variable (or ``config no_proxy``) ``no_proxy`` came from.
    no_proxy_source: str = ""

    @classmethod
    def resolve(
        cls,
        flag: str | None,
        disabled: bool,
        env: Mapping[str, str],
        config_proxy: str | None = None,
        config_no_proxy: str | None = None,
    ) -> ProxySettings:
        if disabled:
            return cls(disabled=True)
        explicit = parse_proxy_url(flag, "--proxy") if flag else None
        from_env: dict[str, ProxySpec] = {}
        for name in ("https_proxy", "http_proxy", "all_proxy"):
            found = _env(env, name)
            if found is not None:
                from_env[found[0]] = parse_proxy_url(found[1], found[0])
        config = parse_proxy_url(config_proxy, "config proxy") if config_proxy else None
        no_proxy = _env(env, "no_proxy")
        if no_proxy is not None:
            exempt, exempt_source = no_proxy[1], no_proxy[0]
        elif config_no_proxy:
            exempt, exempt_source = config_no_proxy, "config no_proxy"
        else:
            exempt, exempt_source = "", ""
        return cls(explicit, False, from_env, config, exempt, exempt_source)

    def route(self, url: str) -> ProxyRoute:
        """How to dial the hub at ``url`` (a ``ws://`` or ``wss://`` URL)."""
        if self.disabled:
            return ProxyRoute(None, "--no-proxy", "direct (--no-proxy)")
        if self.explicit is not None:
            return ProxyRoute(self.explicit, "--proxy", f"via {self.explicit} (--proxy)")
        parts = urlsplit(url)
        secure = parts.scheme == "wss"
        host = parts.hostname or ""
        port = parts.port or (443 if secure else 80)
        chosen: tuple[str, ProxySpec] | None = None
        for name in ("https_proxy" if secure else "http_proxy", "all_proxy"):
            for candidate in (name, name.upper()):
                spec = self.from_env.get(candidate)
                if spec is not None:
                    chosen = (candidate, spec)
                    break
            if chosen is not None:
                break
        if chosen is None and self.config is not None:
            chosen = ("config proxy", self.config)
        if chosen is None:
            names = "HTTPS_PROXY" if secure else "HTTP_PROXY"
            return ProxyRoute(None, "", f"direct (no proxy set: --proxy, {names}, ALL_PROXY)")
        entry = bypassed(host, port, self.no_proxy) if self.no_proxy else None
        if entry is not None:
            return ProxyRoute(
                None,
                self.no_proxy_source,
                f"direct ({host} matches {self.no_proxy_source} entry {entry!r}; "
                f"{chosen[0]} not used)",
            )
        source, spec = chosen
        return ProxyRoute(spec, source, f"via {spec} ({source})")


# -- the tunnel -----------------------------------------------------------------------------


async def open_tunnel(proxy: ProxySpec, host: str, port: int, timeout: float) -> socket.socket:
    """A socket connected through ``proxy`` to ``host:port``, ready for TLS or plain bytes.

    The hub's name goes to the proxy unresolved (HTTP ``CONNECT host:port``; SOCKS5 with
    remote DNS): inside such networks only the proxy can resolve outside names. Raises
    :class:`ProxyRefused` with a one-line reason.
    """
    from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError, ProxyType
    from python_socks.async_.asyncio import Proxy

    kind = ProxyType.HTTP if proxy.scheme == "http" else ProxyType.SOCKS5
    client = Proxy(
        kind,
        proxy.host,
        proxy.port,
        username=proxy.username,
        password=proxy.password if proxy.username else None,
        rdns=True,
        loop=asyncio.get_running_loop(),
    )
    shown = proxy.redacted()
    try:
        sock = await client.connect(dest_host=host, dest_port=port, timeout=timeout)
    except ProxyTimeoutError:
        raise ProxyRefused(
            f"proxy {shown} did not open a tunnel to {host}:{port} within {timeout:g} s",
            stage="timeout",
        ) from None
    except ProxyConnectionError as exc:
        detail = exc.strerror or str(exc)
        raise ProxyRefused(f"proxy {shown} unreachable: {detail}", stage="reach") from None
    except ProxyError as exc:
        code = exc.error_code if isinstance(exc.error_code, int) else None
        raise ProxyRefused(
            _refusal_text(proxy, shown, str(exc), code, host, port), stage="connect", status=code
        ) from None
    except OSError as exc:  # DNS of the proxy's own name, routing
        raise ProxyRefused(f"proxy {shown} unreachable: {exc}", stage="reach") from None
    sock.setblocking(False)
    # python-socks makes its socket with proto 0, so asyncio's transport does not set
    # TCP_NODELAY on it as it does on the sockets it dials itself (it checks for
    # IPPROTO_TCP). Without it a command's ack and result, written a few milliseconds
    # apart, meet Nagle's algorithm and the hub's delayed ACK: +40 ms a command
    # (bench/agent_footprint.py measured it through tinyproxy and Dante alike).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _refusal_text(
    proxy: ProxySpec, shown: str, text: str, code: int | None, host: str, port: int
) -> str:
    if proxy.scheme == "http":
        meaning = HTTP_REFUSALS.get(code or 0, "")
        line = f"proxy {shown} refused CONNECT {host}:{port}: {text}"
        return f"{line} — {meaning}" if meaning else line
    if "authentication" in text.lower():
        text += " (check the user name and password in the proxy URL)"
    return f"SOCKS5 proxy {shown} refused {host}:{port}: {text}"
