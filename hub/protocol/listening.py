"""Listening sockets, bound as early as the hub can.

A hub restarted after a crash has its whole fleet dialing again at once. Every agent that
finds the port closed backs off (doubling, with jitter), so each second the port stays
closed while Python imports the hub's modules and loads its state costs agents several
seconds later. Binding is cheap and needs nothing of the hub: ``tether-hub serve`` binds
before it imports anything heavy (:func:`listen_early`), and the hub takes those sockets
(:func:`listen_now`) once it is ready to load; meanwhile connections wait in the kernel's
backlog instead of being refused.
"""

from __future__ import annotations

import socket

__all__ = ["LISTEN_BACKLOG", "listen_early", "listen_now", "parse_listen"]

#: Connections the kernel holds for a hub that is still loading (a storm's first second).
LISTEN_BACKLOG = 4096

#: Sockets bound by :func:`listen_early`, by (host, port, reuse_port), until taken.
_early: dict[tuple[str, int, bool], list[socket.socket]] = {}


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) into a host and a port."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen needs HOST:PORT, got {listen!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def listen_early(listen: str, reuse_port: bool = False) -> None:
    """Bind ``listen`` now, to be taken by :func:`listen_now`; any error is left for the
    hub's own attempt to report, as it always has."""
    try:
        host, port = parse_listen(listen)
        _early[(host, port, reuse_port)] = _bind(host, port, LISTEN_BACKLOG, reuse_port)
    except (OSError, ValueError):
        pass


def listen_now(host: str, port: int, backlog: int, reuse_port: bool = False) -> list[socket.socket]:
    """Bound, listening sockets for ``host:port``, one per address, to be served later.

    A hub listens before it loads its state: while it reads tens of thousands of agents
    back in, connections of a fleet that was just sent away wait in the kernel's backlog
    instead of being refused (a refusal means a retry later; a wait is answered as soon as
    the hub serves). The sockets :func:`listen_early` bound for the same address are
    these; any bound for another are closed first.
    """
    early = _early.pop((host, port, reuse_port), None)
    for others in _early.values():
        for sock in others:
            sock.close()
    _early.clear()
    if early is not None:
        return early
    return _bind(host, port, backlog, reuse_port)


def _bind(host: str, port: int, backlog: int, reuse_port: bool) -> list[socket.socket]:
    """``socket.create_server`` makes each as ``create_server`` would: ``SO_REUSEADDR``,
    IPv6 sockets IPv6-only."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, address in dict.fromkeys((info[0], info[4]) for info in infos):
            sock = socket.create_server(
                address, family=family, backlog=backlog, reuse_port=reuse_port
            )
            sockets.append(sock)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
