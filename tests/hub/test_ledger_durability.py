"""Every transition is stored before it is announced: the ledger with a real SQLite store and
a real bus, driven through random sequences of dispatches, replies, cancels and time.

The rules themselves are tested without I/O in ``test_ledger_rules.py``; this checks the
I/O around them. A subscriber on the ``commands`` topic reads the store's file (another
connection, as any reader would) at the moment each event reaches it.
"""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.audit import Auditor
from hub.bus import Bus
from hub.config import HubConfig
from hub.ledger import Ledger
from hub.metrics import Metrics
from hub.protocol.messages import Dispatch, Register, Result
from hub.protocol.states import STATE_RANK
from hub.registry import Registry
from hub.store.sqlite import SQLiteStore
from tests.support import FakeClock

AGENTS = ("a0", "a1", "a2")

action = st.one_of(
    st.tuples(
        st.just("dispatch"),
        st.lists(st.sampled_from(AGENTS), min_size=1, max_size=3, unique=True),
        st.sampled_from([None, 1, 2]),
        st.sampled_from([None, 0]),
    ),
    st.tuples(st.just("connect"), st.sampled_from(AGENTS)),
    st.tuples(st.just("disconnect"), st.sampled_from(AGENTS)),
    st.tuples(st.just("ack"), st.sampled_from(AGENTS)),
    st.tuples(
        st.just("result"),
        st.sampled_from(AGENTS),
        st.sampled_from(["succeeded", "failed", "cancelled"]),
    ),
    st.tuples(
        st.just("cancel_job"),
    ),
    st.tuples(st.just("time"), st.sampled_from([1.0, 30.0, 700.0])),
    st.tuples(
        st.just("settle"),
    ),
)


class StoreReader:
    """A subscriber that checks each announced state against the store's file."""

    topics = frozenset({"commands"})

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path)
        self.announced = 0
        #: Recorded, not raised: an event reaches subscribers inside the loop's callbacks.
        self.violations: list[str] = []

    def push(self, key: Any, data: bytes) -> None:
        event = orjson.loads(data)
        command = event.get("command")
        if event.get("kind") != "state" or command is None:
            return
        row = self.db.execute(
            "SELECT state FROM commands WHERE command_id = ?", (command["command_id"],)
        ).fetchone()
        if row is None:
            self.violations.append(f"{command['command_id']} announced before it was stored")
        elif STATE_RANK[row[0]] < STATE_RANK[command["state"]]:
            self.violations.append(f"announced {command['state']}, the store holds {row[0]}")
        self.announced += 1


async def run(actions: list[tuple[Any, ...]], directory: Path) -> StoreReader:
    clock = FakeClock(1_000_000.0)
    config = HubConfig(data_dir=directory, hub_id="hub-test")
    store = SQLiteStore(directory, synchronous="normal")
    await store.open()
    bus = Bus()
    reader = StoreReader(store.path)
    bus.subscribe(reader)
    registry = Registry("hub-test")
    inbox: dict[str, list[dict[str, Any]]] = {a: [] for a in AGENTS}
    connected: set[str] = set()

    def send(agent_id: str, data: bytes) -> bool:
        if agent_id not in connected:
            return False
        inbox[agent_id].append(orjson.loads(data))
        return True

    auditor = Auditor(store, bus, "hub-test")
    ledger = Ledger(config, store, registry, bus, Metrics(), auditor, send, clock=clock)
    for agent_id in AGENTS:
        registry.register(
            Register(type="register", agent_id=agent_id, capabilities=["ping"]), clock()
        )
    jobs: list[str] = []
    try:
        for step in actions:
            kind = step[0]
            if kind == "dispatch":
                _, targets, window, errors = step
                request = Dispatch.model_validate(
                    {
                        "type": "dispatch",
                        "id": 1,
                        "target": {"agent_ids": targets},
                        "name": "ping",
                        "ttl": 600,
                        "timeout": 20,
                        "max_concurrency": window,
                        "max_errors": errors,
                    }
                )
                jobs.append((await ledger.dispatch(request, "admin:test"))["job_id"])
            elif kind == "connect" and step[1] not in connected:
                connected.add(step[1])
                ledger.agent_connected(step[1])
            elif kind == "disconnect" and step[1] in connected:
                connected.discard(step[1])
                ledger.agent_disconnected(step[1])
            elif kind in ("ack", "result") and inbox[step[1]]:
                message = inbox[step[1]].pop(0)
                if message["type"] != "command":
                    continue
                if kind == "ack":
                    ledger.on_ack(step[1], message["command_id"])
                else:
                    ledger.on_result(
                        step[1],
                        Result(type="result", command_id=message["command_id"], status=step[2]),
                    )
            elif kind == "cancel_job" and jobs:
                ledger.cancel_job(jobs[-1], "admin:test")
            elif kind == "time":
                clock.now += step[1]
                ledger.tick()
            elif kind == "settle":
                await ledger.drain()
            await asyncio.sleep(0)
        await ledger.drain()
        await asyncio.sleep(0.01)
        return reader
    finally:
        await store.close()
        reader.db.close()


@settings(max_examples=25, deadline=None)
@given(st.lists(action, min_size=5, max_size=40))
def test_every_announced_transition_was_stored_first(actions: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        reader = asyncio.run(run(actions, Path(directory)))
    assert not reader.violations, reader.violations
