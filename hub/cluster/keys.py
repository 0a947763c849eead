"""Every Redis key cluster mode uses, under one prefix (docs/cluster.md lists them)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Keys"]


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "tether"

    @property
    def epoch(self) -> str:
        """A random token set once: a Redis that lost its data answers without it."""
        return f"{self.prefix}:cl:epoch"

    @property
    def hubs(self) -> str:
        """Sorted set: every hub ever seen → the last time its lease was renewed (ms)."""
        return f"{self.prefix}:cl:hubs"

    def lease(self, hub_id: str) -> str:
        """Hash with an expiry: a hub's lease and its figures (boot, agents, load)."""
        return f"{self.prefix}:cl:hub:{hub_id}"

    @property
    def owners(self) -> str:
        """Hash: agent id → ``hub|boot|generation`` of the connection that holds it."""
        return f"{self.prefix}:cl:owner"

    @property
    def generations(self) -> str:
        """Hash: agent id → the last generation handed out (only ever grows)."""
        return f"{self.prefix}:cl:gen"

    @property
    def draining(self) -> str:
        """Set: agents whose heartbeat says ``draining``."""
        return f"{self.prefix}:cl:draining"

    def inbox(self, hub_id: str) -> str:
        """Stream: messages for one hub (deliveries, supersedes, replies)."""
        return f"{self.prefix}:cl:inbox:{hub_id}"

    @property
    def ledger(self) -> str:
        """Stream with the consumer group ``leader``: everything the ledger leader must see."""
        return f"{self.prefix}:cl:ledger"

    @property
    def leader(self) -> str:
        """The leader's token ``hub|boot|term``, with an expiry (the leadership lease)."""
        return f"{self.prefix}:cl:leader"

    @property
    def term(self) -> str:
        """Counter: one more for every new leadership (fencing)."""
        return f"{self.prefix}:cl:term"

    @property
    def events(self) -> str:
        """Pub/sub channel: batches of events, each batch numbered per hub incarnation."""
        return f"{self.prefix}:cl:events"
