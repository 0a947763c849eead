"""The listening socket a restarted hub binds before it imports and loads anything."""

from __future__ import annotations

import socket

from hub.protocol import listening
from hub.protocol.listening import LISTEN_BACKLOG, listen_early, listen_now


def test_the_hub_takes_the_sockets_bound_early_and_a_dial_waits_in_the_backlog() -> None:
    listen_early("127.0.0.1:0")
    sockets = listen_now("127.0.0.1", 0, LISTEN_BACKLOG)
    try:
        (sock,) = sockets
        port = sock.getsockname()[1]
        # Not yet served, already accepting into the backlog: the dial is not refused.
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        # Taken once: the next hub in this process binds its own.
        again = listen_now("127.0.0.1", 0, LISTEN_BACKLOG)
        assert again[0].getsockname()[1] != port
        again[0].close()
    finally:
        for sock in sockets:
            sock.close()


def test_sockets_bound_for_another_address_are_closed_not_kept() -> None:
    listen_early("127.0.0.1:0", reuse_port=True)
    (early,) = listening._early[("127.0.0.1", 0, True)]
    sockets = listen_now("127.0.0.1", 0, LISTEN_BACKLOG, reuse_port=False)
    try:
        assert early.fileno() == -1  # closed
        assert sockets[0] is not early
        assert listening._early == {}
    finally:
        for sock in sockets:
            sock.close()


def test_an_address_that_cannot_be_bound_early_is_left_to_the_hub_to_report() -> None:
    listen_early("no-port-here")  # nothing raised: the hub's own attempt reports it
    listen_early("127.0.0.1:1")  # a privileged port is fine as root; any error is swallowed
    sockets = listen_now("127.0.0.1", 0, LISTEN_BACKLOG)
    for sock in sockets:
        sock.close()
