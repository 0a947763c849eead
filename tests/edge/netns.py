"""A small real network on one machine: the hub's host, a NAT router, the agent's host.

::

    root namespace (test, hub)     router namespace (NAT)             agent namespace
    th<r> 10.A.B.130 ──veth── rh<r> 10.A.B.129 │ ra<r> 10.A.B.1 ──veth── aa<r> 10.A.B.2

The router masquerades what the agent side sends to the hub side (nftables) and drops every
connection the hub side tries to open towards the agent side: the agent can dial out, nothing
can dial in, as behind any home or corporate NAT. With ``forward=False`` it forwards nothing
at all, so that only a proxy running on the router can reach the hub (a corporate network
whose one way out is its proxy).

Links are degraded with nftables (this kernel has no netem): ``lose(percent)`` drops that
share of packets at random in the router, both directions (``numgen random mod 100 < N``);
``cut()`` drops every packet *on arrival* at both ends (the hub's and the agent's
interfaces), so that neither side gets an error or a reset: the link dies silently;
``throttle(rate)`` shapes the router's agent-side link with ``tc ... tbf``.

Names carry a random suffix (parallel runs do not collide) and everything is removed by
:meth:`close`, which the fixtures always call. Needs root (which the test machines are).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import secrets
import shutil
import subprocess

import pytest

__all__ = ["Topology"]


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        pytest.fail(f"{name} is missing: run ./scripts/bootstrap.sh (it installs it)")
    return path


def _run(*argv: str, stdin: str | None = None, check: bool = True) -> str:
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {result.stderr.strip()}")
    return result.stdout


def _free_subnet() -> tuple[int, int]:
    """10.A.B.0/24 that no route or address of this host touches."""
    used = _run(_tool("ip"), "-4", "route", "show", "table", "all") + _run(
        _tool("ip"), "-4", "addr"
    )
    nets = []
    for word in used.split():
        with contextlib.suppress(ValueError):
            nets.append(ipaddress.ip_network(word, strict=False))
    for _ in range(100):
        a, b = random.randint(64, 250), random.randint(0, 255)
        candidate = ipaddress.ip_network(f"10.{a}.{b}.0/24")
        if not any(candidate.overlaps(net) for net in nets if net.prefixlen > 0):
            return a, b
    raise AssertionError("no free 10.x.y.0/24 for the test network")


class Topology:
    """The three hosts above; ``close()`` removes every trace."""

    def __init__(self, *, forward: bool = True) -> None:
        if os.geteuid() != 0:
            pytest.fail("tests/edge need root (network namespaces); the test machines have it")
        self.ip = _tool("ip")
        self.nft = _tool("nft")
        self.tc = _tool("tc")
        suffix = secrets.token_hex(3)
        self.router = f"tether-r-{suffix}"
        self.agent = f"tether-a-{suffix}"
        self.hub_if, self.router_hub_if = f"th{suffix}", f"rh{suffix}"
        self.router_agent_if, self.agent_if = f"ra{suffix}", f"aa{suffix}"
        self.root_table = f"tether_cut_{suffix}"
        a, b = _free_subnet()
        self.agent_ip, self.router_agent_ip = f"10.{a}.{b}.2", f"10.{a}.{b}.1"
        self.router_hub_ip, self.hub_ip = f"10.{a}.{b}.129", f"10.{a}.{b}.130"
        self.agent_net = f"10.{a}.{b}.0/25"
        self.closed = False
        try:
            self._build(forward)
        except BaseException:
            self.close()
            raise

    # -- building ---------------------------------------------------------------------------

    def _build(self, forward: bool) -> None:
        ip = self.ip
        _run(ip, "netns", "add", self.router)
        _run(ip, "netns", "add", self.agent)
        _run(ip, "link", "add", self.hub_if, "type", "veth", "peer", "name", self.router_hub_if)
        _run(ip, "link", "set", self.router_hub_if, "netns", self.router)
        _run(
            ip, "link", "add", self.router_agent_if, "netns", self.router,
            "type", "veth", "peer", "name", self.agent_if, "netns", self.agent,
        )  # fmt: skip
        _run(ip, "addr", "add", f"{self.hub_ip}/25", "dev", self.hub_if)
        _run(ip, "link", "set", self.hub_if, "up")
        # The hub's host knows the way to the agents' network, through the router: so a
        # connection the hub opens towards an agent reaches the NAT and is dropped there,
        # instead of leaving this machine by its default route.
        _run(ip, "route", "add", self.agent_net, "via", self.router_hub_ip, "dev", self.hub_if)
        r = ("ip", "-n", self.router)
        _run(*r, "addr", "add", f"{self.router_hub_ip}/25", "dev", self.router_hub_if)
        _run(*r, "addr", "add", f"{self.router_agent_ip}/25", "dev", self.router_agent_if)
        for link in ("lo", self.router_hub_if, self.router_agent_if):
            _run(*r, "link", "set", link, "up")
        g = ("ip", "-n", self.agent)
        _run(*g, "addr", "add", f"{self.agent_ip}/25", "dev", self.agent_if)
        _run(*g, "link", "set", "lo", "up")
        _run(*g, "link", "set", self.agent_if, "up")
        _run(*g, "route", "add", "default", "via", self.router_agent_ip)
        self.in_router("sysctl", "-qw", "net.ipv4.ip_forward=1")
        outbound = (
            f'iifname "{self.router_agent_if}" oifname "{self.router_hub_if}" accept'
            if forward
            else ""
        )
        self.nft_in(
            self.router,
            f"""
            table inet tether {{
              chain loss_in {{ type filter hook prerouting priority -300; }}
              chain forward {{
                type filter hook forward priority 0; policy drop;
                ct state established,related accept
                {outbound}
              }}
              chain post {{
                type nat hook postrouting priority 100;
                oifname "{self.router_hub_if}" masquerade
              }}
            }}
            """,
        )

    # -- running things ----------------------------------------------------------------------

    def prefix(self, namespace: str) -> list[str]:
        return [self.ip, "netns", "exec", namespace]

    def in_router(self, *argv: str) -> str:
        return _run(*self.prefix(self.router), *argv)

    def in_agent(self, *argv: str, check: bool = True) -> str:
        return _run(*self.prefix(self.agent), *argv, check=check)

    def nft_in(self, namespace: str | None, script: str) -> None:
        argv = (
            [*self.prefix(namespace), self.nft, "-f", "-"] if namespace else [self.nft, "-f", "-"]
        )
        _run(*argv, stdin=script)

    # -- degrading the link ------------------------------------------------------------------

    def lose(self, percent: int) -> None:
        """Drop ``percent`` % of the packets the router receives, at random, both ways."""
        self.nft_in(
            self.router,
            f"add rule inet tether loss_in meta l4proto tcp numgen random mod 100 < {percent} drop",
        )

    def throttle(self, rate: str = "2mbit") -> None:
        """A slow link: token-bucket shaping of what the router sends towards the agent."""
        self.in_router(
            self.tc, "qdisc", "add", "dev", self.router_agent_if, "root",
            "tbf", "rate", rate, "burst", "32kbit", "latency", "400ms",
        )  # fmt: skip

    def cut(self) -> None:
        """The link dies silently: every packet is dropped on arrival at both ends."""
        self.nft_in(
            self.agent,
            f"""table inet tether_cut {{
              chain input {{
                type filter hook input priority -300;
                iifname "{self.agent_if}" drop
              }}
            }}""",
        )
        self.nft_in(
            None,
            f"""table inet {self.root_table} {{
              chain input {{
                type filter hook input priority -300;
                iifname "{self.hub_if}" drop
              }}
            }}""",
        )

    def heal(self) -> None:
        self.nft_in(self.agent, "delete table inet tether_cut")
        self.nft_in(None, f"delete table inet {self.root_table}")

    # -- clean-up ----------------------------------------------------------------------------

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for namespace in (self.agent, self.router):
            pids = _run(self.ip, "netns", "pids", namespace, check=False).split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
        _run(self.nft, "delete", "table", "inet", self.root_table, check=False)
        _run(self.ip, "link", "del", self.hub_if, check=False)
        for namespace in (self.agent, self.router):
            _run(self.ip, "netns", "del", namespace, check=False)

    def leftovers(self) -> list[str]:
        """Anything of this topology still on the host (for the clean-up test)."""
        found = []
        names = _run(self.ip, "netns", "list")
        found += [n for n in (self.agent, self.router) if n in names]
        if self.hub_if in _run(self.ip, "link"):
            found.append(self.hub_if)
        if self.root_table in _run(self.nft, "list", "tables"):
            found.append(self.root_table)
        return found
