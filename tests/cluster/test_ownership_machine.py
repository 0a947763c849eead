"""Ownership and leadership as state machines, on a real ``redis-server``.

Hypothesis runs random interleavings of what hubs do to the shared keys — claim an agent,
release it at a generation they once held (late clean-ups included), restart with a new
boot id, take or keep the leadership, resign with a token old or current, let the leader's
key expire — and after every step compares Redis with a model of the rules the scripts
(hub/cluster/ownership.py, hub/cluster/leases.py) promise:

* an agent's entry is its newest claim; generations only grow; a claim returns the owner it
  replaced, so that hub can be told to close its connection (4001);
* only the owner's own incarnation at its own generation releases the entry: a superseded
  connection's late clean-up, or a hub restarted since, never removes a newer claim;
* one leader at a time; every new leadership gets a higher term than any before it (the
  fence of the store's writes); only the current token resigns it;
* a hub's lease lives from its renewal until it is withdrawn or lapses, names the
  incarnation that renewed it, and a renewal says when the lease had lapsed (the hub then
  re-announces its agents).
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from hub.cluster.keys import Keys
from hub.cluster.leases import Leases
from hub.cluster.link import RedisLink
from hub.cluster.ownership import Owner, Ownership
from tests.redis_server import RedisServer

HUBS = ("hub-a", "hub-b", "hub-c")
AGENTS = ("edge-1", "edge-2", "edge-3")


class OwnershipMachine(RuleBasedStateMachine):
    url = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.keys = Keys(f"t{secrets.token_hex(4)}")
        self.link = RedisLink(self.url, self.keys, timeout=2.0)
        #: The model: agent -> (hub|boot, generation); the last generation drawn per agent.
        self.owners: dict[str, tuple[str, int]] = {}
        self.generations: dict[str, int] = {}
        #: Each hub's current incarnation and its ownership/leases objects.
        self.boots: dict[str, str] = {}
        self.ownership: dict[str, Ownership] = {}
        self.leases: dict[str, Leases] = {}
        #: (hub|boot, generation) pairs each incarnation once held, for late releases.
        self.held: list[tuple[str, str, str, int]] = []
        self.leader: str | None = None
        #: Hubs whose lease lives (renewed, not lapsed or withdrawn since) -> the boot id of
        #: the incarnation that renewed it last.
        self.live: dict[str, str] = {}
        self.top_term = 0
        self.tokens: list[str] = []

    def run(self, awaitable: Any) -> Any:
        return self.loop.run_until_complete(awaitable)

    def teardown(self) -> None:
        self.run(self.link.close())
        self.loop.close()

    @initialize()
    def start(self) -> None:
        for hub_id in HUBS:
            self._boot(hub_id)

    def _boot(self, hub_id: str) -> None:
        boot = secrets.token_hex(4)
        self.boots[hub_id] = boot
        self.ownership[hub_id] = Ownership(self.link, self.keys, hub_id, boot)
        self.leases[hub_id] = Leases(self.link, self.keys, hub_id, boot, ttl=60.0)

    def _me(self, hub_id: str) -> str:
        return f"{hub_id}|{self.boots[hub_id]}"

    # -- ownership -----------------------------------------------------------------------

    @rule(hub_id=st.sampled_from(HUBS), agent_id=st.sampled_from(AGENTS))
    def claim(self, hub_id: str, agent_id: str) -> None:
        generation, previous = self.run(self.ownership[hub_id].claim(agent_id))
        expected = self.generations.get(agent_id, 0) + 1
        assert generation == expected, "a claim draws the next generation"
        before = self.owners.get(agent_id)
        if before is None:
            assert previous is None
        else:
            assert previous == Owner.parse(f"{before[0]}|{before[1]}"), "the owner replaced"
        self.generations[agent_id] = generation
        self.owners[agent_id] = (self._me(hub_id), generation)
        self.held.append((hub_id, self.boots[hub_id], agent_id, generation))

    @rule(hub_id=st.sampled_from(HUBS), agent_ids=st.lists(st.sampled_from(AGENTS), max_size=5))
    def claim_burst(self, hub_id: str, agent_ids: list[str]) -> None:
        """Claims of one turn go in one pipeline: each still draws its own generation."""
        ownership = self.ownership[hub_id]

        async def burst() -> list[tuple[int, Owner | None]]:
            return list(await asyncio.gather(*(ownership.claim(a) for a in agent_ids)))

        for agent_id, (generation, previous) in zip(agent_ids, self.run(burst()), strict=True):
            assert generation == self.generations.get(agent_id, 0) + 1
            before = self.owners.get(agent_id)
            assert previous == (Owner.parse(f"{before[0]}|{before[1]}") if before else None)
            self.generations[agent_id] = generation
            self.owners[agent_id] = (self._me(hub_id), generation)
            self.held.append((hub_id, self.boots[hub_id], agent_id, generation))

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        """Any incarnation releases at any generation it once held: only the current
        owner's exact entry goes."""
        if not self.held:
            return
        hub_id, boot, agent_id, generation = data.draw(st.sampled_from(self.held))
        # The release is made by whatever object that incarnation had: a restarted hub's
        # old connections are gone, but its new incarnation may try its old generation.
        ownership = Ownership(self.link, self.keys, hub_id, boot)
        released = self.run(ownership.release(agent_id, generation))
        current = self.owners.get(agent_id)
        should = current == (f"{hub_id}|{boot}", generation)
        assert released == should
        if should:
            del self.owners[agent_id]

    @rule(hub_id=st.sampled_from(HUBS))
    def restart(self, hub_id: str) -> None:
        """A hub killed and started again: a new incarnation; Redis keeps its claims."""
        self._boot(hub_id)

    # -- leadership ----------------------------------------------------------------------

    @rule(hub_id=st.sampled_from(HUBS))
    def lead(self, hub_id: str) -> None:
        token = self.run(self.leases[hub_id].lead())
        me = self._me(hub_id)
        if self.leader is None:
            assert token is not None and token.startswith(me + "|")
            term = int(token.rsplit("|", 1)[1])
            assert term > self.top_term, "a new leadership has a higher term"
            self.top_term = term
            self.leader = token
            self.tokens.append(token)
        elif self.leader.startswith(me + "|"):
            assert token == self.leader, "the holder keeps its token"
        else:
            assert token is None, "nobody else leads meanwhile"

    @rule(data=st.data())
    def resign(self, data: st.DataObject) -> None:
        if not self.tokens:
            return
        token = data.draw(st.sampled_from(self.tokens))
        hub_id = token.split("|", 1)[0]
        self.run(self.leases[hub_id].resign(token))
        if token == self.leader:
            self.leader = None

    @rule()
    def leader_expires(self) -> None:
        """The leader stalled past its expiry (the key lapses on Redis's clock)."""
        self.run(self.link.client.delete(self.keys.leader))
        self.leader = None

    # -- hub leases ----------------------------------------------------------------------

    @rule(hub_id=st.sampled_from(HUBS))
    def renew(self, hub_id: str) -> None:
        """A renewal says whether the lease had lapsed (the others took the hub for down)."""
        made_anew = self.run(self.leases[hub_id].renew({"agents": 1}))
        assert made_anew == (hub_id not in self.live)
        self.live[hub_id] = self.boots[hub_id]

    @rule(hub_id=st.sampled_from(HUBS), withdrawn=st.booleans())
    def lease_ends(self, hub_id: str, withdrawn: bool) -> None:
        """A clean stop withdraws the lease; a stall past the TTL lets it lapse."""
        if withdrawn:
            self.run(self.leases[hub_id].withdraw())
        else:
            self.run(self.link.client.delete(self.keys.lease(hub_id)))
        self.live.pop(hub_id, None)

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def redis_agrees_with_the_model(self) -> None:
        if not self.boots:
            return
        owners = self.run(self.ownership[HUBS[0]].all())
        assert {a: (f"{o.hub_id}|{o.boot}", o.generation) for a, o in owners.items()} == (
            self.owners
        )
        raw = self.run(self.link.client.hgetall(self.keys.generations))
        assert {k.decode(): int(v) for k, v in raw.items()} == self.generations
        leader = self.run(self.leases[HUBS[0]].leader())
        assert leader == self.leader
        live = self.run(self.leases[HUBS[0]].live())
        assert set(live) == set(self.live)
        assert {h: lease.boot for h, lease in live.items()} == {h: self.live[h] for h in live}


@pytest.mark.slow
def test_ownership_and_leadership_hold_over_random_interleavings(
    redis_server: RedisServer,
) -> None:
    OwnershipMachine.url = redis_server.url
    run_state_machine_as_test(
        OwnershipMachine,
        settings=settings(
            max_examples=60,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
