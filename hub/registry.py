"""Who is connected: one live session per agent id, and a record of every agent ever seen.

Each installed session gets a generation number. A newer connection of the same id takes
over (the older is closed with 4001), and when the older connection's clean-up finally runs
it removes the entry only if its own generation is still the current one, so a late
clean-up never evicts the newer connection.

Records are deduplicated where fleets repeat themselves: equal region names, capability
lists and label maps are shared between agents, which keeps per-agent memory small.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from .model import AgentRecord
from .protocol.messages import Register, Selector
from .protocol.selectors import is_glob, selector_matches

__all__ = ["LiveSession", "Registry", "matches"]


class LiveSession(Protocol):
    agent_id: str
    generation: int
    session_id: str
    credential_id: str | None

    def close(self, code: int, reason: str = "") -> None: ...

    def send(self, data: bytes) -> bool: ...


class _Interner:
    """Shares equal immutable values between records (bounded, so hostile ids cannot grow it)."""

    def __init__(self, limit: int = 50_000) -> None:
        self.limit = limit
        self._values: dict[Any, Any] = {}

    def __call__(self, value: Any, key: Any = None) -> Any:
        key = value if key is None else key
        found = self._values.get(key)
        if found is not None:
            return found
        if len(self._values) < self.limit:
            self._values[key] = value
        return value


class Registry:
    def __init__(self, hub_id: str) -> None:
        self.hub_id = hub_id
        self.records: dict[str, AgentRecord] = {}
        self.live: dict[str, LiveSession] = {}
        self.counts: Counter[str] = Counter()
        self._generations = itertools.count(1)
        self._intern = _Interner()
        #: Called as (record, old_state) after every state change.
        self.on_state: Callable[[AgentRecord, str], None] | None = None

    # -- records -------------------------------------------------------------------------

    def load(self, records: Iterable[AgentRecord]) -> None:
        """Records from the store at start-up; nobody is connected to this process yet.

        An agent that was connected when the hub last stopped without saving (a crash) is
        ``unknown``: its hub vanished, not necessarily the agent. The sweeper turns it
        ``offline`` if it does not come back within a grace period.
        """
        for record in records:
            record.state = "unknown" if record.connected_at is not None else "offline"
            self.add(record)

    def add(self, record: AgentRecord) -> None:
        """A record this hub did not have (loaded, or an agent held by another hub)."""
        self.share(record)
        self.records[record.agent_id] = record
        self.counts[record.state] += 1

    def share(self, record: AgentRecord) -> None:
        """Share the record's repeated values with other records (memory per agent)."""
        intern = self._intern
        record.platform = intern(record.platform)
        record.region = intern(record.region)
        record.version = intern(record.version)
        record.capabilities = intern(tuple(record.capabilities))
        if record.labels:
            record.labels = intern(record.labels, ("labels", *sorted(record.labels.items())))

    def register(self, message: Register, now: float) -> tuple[AgentRecord, bool]:
        """Update (or create) the record from a ``register``; True when the id is new."""
        record = self.records.get(message.agent_id)
        new = record is None
        if record is None:
            record = AgentRecord(agent_id=message.agent_id, first_seen=now)
            self.records[record.agent_id] = record
            self.counts[record.state] += 1
        record.platform = message.platform
        record.region = message.region
        record.version = message.version
        record.hostname = message.hostname
        record.labels = dict(message.labels)
        record.capabilities = tuple(message.capabilities)
        location = message.location
        record.location = (location.lat, location.lon) if location is not None else None
        self.share(record)
        return record, new

    def set_state(self, record: AgentRecord, state: str) -> None:
        old = record.state
        if old == state:
            return
        record.state = state
        self.counts[old] -= 1
        self.counts[state] += 1
        if self.on_state is not None:
            self.on_state(record, old)

    def state_counts(self) -> dict[str, int]:
        return {state: count for state, count in self.counts.items() if count}

    # -- live sessions -------------------------------------------------------------------

    def install(self, session: LiveSession) -> LiveSession | None:
        """Make ``session`` the live one for its id; returns the session it supersedes."""
        session.generation = next(self._generations)
        previous = self.live.get(session.agent_id)
        self.live[session.agent_id] = session
        return previous

    def remove(self, session: LiveSession) -> bool:
        """Forget ``session`` if it is still the live one; False for a late clean-up."""
        current = self.live.get(session.agent_id)
        if current is None or current.generation != session.generation:
            return False
        del self.live[session.agent_id]
        return True

    def session(self, agent_id: str) -> LiveSession | None:
        return self.live.get(agent_id)

    @property
    def connected(self) -> int:
        return len(self.live)

    # -- selection -----------------------------------------------------------------------

    def select(self, selector: Selector, limit: int | None = None) -> list[AgentRecord]:
        """Registered agents matching a selector, in id order."""
        if selector.agent_id is not None and not is_glob(selector.agent_id):
            record = self.records.get(selector.agent_id)
            candidates: Iterable[AgentRecord] = [record] if record is not None else []
        else:
            candidates = self.records.values()
        chosen = [r for r in candidates if matches(r, selector)]
        chosen.sort(key=lambda r: r.agent_id)
        return chosen[:limit] if limit is not None else chosen


def matches(record: AgentRecord, selector: Selector) -> bool:
    """Whether a record matches a selector (:mod:`hub.protocol.selectors`)."""
    return selector_matches(
        selector,
        agent_id=record.agent_id,
        region=record.region,
        platform=record.platform,
        labels=record.labels,
        state=record.state,
    )
