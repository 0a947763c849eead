"""What a registration means when several hubs share the fleet.

The same as on one hub (:class:`~hub.fleet.Fleet`), plus ownership: an agent that registers
here claims itself in Redis and gets its connection's generation; whoever held it before is
told to close its connection (4001), on this hub or another. The rest of the cluster hears
of the agent (its ``connected`` event, the ledger's entry) only once the claim is made, and
with its generation, so that every hub can tell a newer connection from an older one's late
news. When the connection ends, the hub releases the claim only if it is still its own
(compare-and-delete) and only then says the agent went offline.

While Redis does not answer, agents still register and stay connected here; their claims
are made when it answers again (:meth:`ClusterFleet.reconcile`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..fleet import Fleet, Member
from ..protocol.constants import Close
from ..protocol.messages import Heartbeat
from ..protocol.states import AgentState
from ..store.base import StoreUnavailable
from .inbox import Outbox
from .ledger import LedgerLink
from .ownership import Owner, Ownership

log = logging.getLogger(__name__)

__all__ = ["SUPERSEDE", "ClusterFleet"]

SUPERSEDE = b"supersede"
OFFLINE = AgentState.OFFLINE.value


class ClusterFleet(Fleet):
    ledger: LedgerLink  # type: ignore[assignment]

    def __init__(
        self, *args: Any, ownership: Ownership, outbox: Outbox, boot: str, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.ownership = ownership
        self.outbox = outbox
        self.boot = boot
        #: Local connections and the generation their claim got (0 while it is pending).
        self.claims: dict[str, tuple[Member, int]] = {}
        self._claiming: dict[Member, asyncio.Task[int]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def _spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- joining -------------------------------------------------------------------------

    def joined(self, member: Member) -> None:
        """Claim the agent, then let the cluster know (events, ledger) with its generation."""
        self.claims[member.agent_id] = (member, 0)
        self._claiming[member] = self._spawn(self._claim(member))

    async def _claim(self, member: Member) -> int:
        agent_id = member.agent_id
        try:
            generation, previous = await self.ownership.claim(agent_id)
        except StoreUnavailable:
            log.warning(
                "agent %s registered while redis is down: claimed when it answers", agent_id
            )
            return 0
        finally:
            self._claiming.pop(member, None)
        if self.registry.live.get(agent_id) is not member:
            # Gone (or superseded here) while claiming: give the claim back at once.
            await self._release(agent_id, generation)
            return 0
        self.claims[agent_id] = (member, generation)
        record = member.record
        assert record is not None
        record.generation = generation
        if previous is not None and (previous.hub_id, previous.boot) != (self.hub_id, self.boot):
            self._supersede_elsewhere(agent_id, previous, member)
        self.events.agent(record, "connected")
        self.ledger.agent_connected(agent_id, generation)
        return generation

    def _supersede_elsewhere(self, agent_id: str, previous: Owner, member: Member) -> None:
        """The agent's older connection is on another hub: that hub closes it (4001)."""
        self._takeover(agent_id, member.peer)
        self.outbox.to_hub(
            previous.hub_id,
            {"k": SUPERSEDE, "a": agent_id, "g": previous.generation, "b": previous.boot},
        )

    def superseded(self, fields: dict[bytes, bytes]) -> None:
        """Another hub took an agent over: close this hub's connection of that generation."""
        agent_id = fields.get(b"a", b"").decode()
        generation = int(fields.get(b"g", 0))
        if fields.get(b"b", b"").decode() != self.boot:
            return  # addressed to an earlier incarnation of this hub
        claim = self.claims.get(agent_id)
        if claim is None or claim[1] != generation:
            return
        claim[0].close(Close.SUPERSEDED, "superseded by a newer connection on another hub")

    # -- leaving -------------------------------------------------------------------------

    def _gone(self, member: Member, code: int) -> None:
        """Offline only once the claim is given back (and is still this connection's)."""
        claim = self.claims.get(member.agent_id)
        if claim is not None and claim[0] is member:
            del self.claims[member.agent_id]
        self._spawn(self._leave(member, claim[1] if claim is not None else 0))

    async def _leave(self, member: Member, generation: int) -> None:
        pending = self._claiming.get(member)
        if pending is not None:
            generation = await pending
        record = member.record
        assert record is not None
        if generation and not await self._release(member.agent_id, generation):
            return  # the agent is held elsewhere now: its hub speaks for it
        if record.generation != generation or member.agent_id in self.registry.live:
            return  # newer news of the agent arrived meanwhile
        record.connected_at = None
        self.registry.set_state(record, OFFLINE)
        self.ledger.agent_disconnected(member.agent_id, generation)
        self.store.save_agent(record)
        self.events.agent(record, "disconnected")

    async def _release(self, agent_id: str, generation: int) -> bool:
        try:
            return await self.ownership.release(agent_id, generation)
        except StoreUnavailable:
            return True  # redis is down: released when it answers (reconcile)

    # -- heartbeats ----------------------------------------------------------------------

    def heartbeat(self, record: Any, message: Heartbeat) -> None:
        was_draining = record.status == "draining"
        super().heartbeat(record, message)
        if (record.status == "draining") != was_draining:
            self._spawn(self._draining(record.agent_id, record.status == "draining"))

    async def _draining(self, agent_id: str, draining: bool) -> None:
        try:
            await self.ownership.set_draining(agent_id, draining)
        except StoreUnavailable:
            pass

    def sweep(self) -> None:
        """This hub's connections only: an ``unknown`` agent stays so until it registers on
        some hub (its own hub vanished, and may come back)."""
        self._sweep_connections(self.clock(), self.config.heartbeat_interval)

    # -- after an outage -----------------------------------------------------------------

    def _announce(self, member: Member, generation: int) -> None:
        record = member.record
        if record is None or record.generation != generation:
            return
        self.events.agent(record, "connected")
        self.ledger.agent_connected(member.agent_id, generation)

    async def reconcile(self, owners: dict[str, Owner], announce: bool = False) -> int:
        """Redis answers again (or came back empty): claim every agent connected here that
        has no claim of this incarnation, give back claims of this incarnation whose agent
        left meanwhile. With ``announce`` (this hub's lease had lapsed), the claims that
        still hold are announced again: the others' mirrors and the leader's ledger
        forgot them. An agent claimed elsewhere meanwhile is left alone (that hub's
        4001 is on its way here). Returns how many claims were made."""
        made = 0
        mine = f"{self.hub_id}|{self.boot}"
        for agent_id, owner in owners.items():
            if f"{owner.hub_id}|{owner.boot}" == mine and agent_id not in self.registry.live:
                await self._release(agent_id, owner.generation)
        for agent_id, member in list(self.registry.live.items()):
            owner = owners.get(agent_id)
            claim = self.claims.get(agent_id)
            if owner is not None and claim is not None and owner.generation == claim[1]:
                if announce and f"{owner.hub_id}|{owner.boot}" == mine:
                    self._announce(member, owner.generation)
                continue
            if announce and owner is not None and f"{owner.hub_id}|{owner.boot}" != mine:
                continue
            if member in self._claiming:
                continue
            self.claims[agent_id] = (member, 0)  # type: ignore[assignment]
            self._claiming[member] = self._spawn(self._claim(member))  # type: ignore[index]
            made += 1
        return made
