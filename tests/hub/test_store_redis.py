"""What the Redis store does on its own, on real ``redis-server`` processes the tests stop,
pause, kill -9 and restart: bounded calls, all-or-nothing scripts, persistence, a data set
lost and noticed, fencing, two stores as two hubs, and what an idle fleet costs Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import psutil
import pytest

from hub.model import AgentRecord, CommandRecord, CredentialRecord, JobRecord
from hub.store.base import AuditEntry, StoreUnavailable
from hub.store.redis import SCAN_WINDOW, RedisStore
from tests.hub.test_store_conformance import T0, credential, finish, job_with
from tests.redis_server import RedisServer
from tests.support import wait_for

Factory = Callable[..., RedisServer]


@pytest.fixture
async def stores() -> AsyncIterator[Callable[..., Any]]:
    """Open Redis stores, closed after the test."""
    opened: list[RedisStore] = []

    async def make(url: str, **options: Any) -> RedisStore:
        store = RedisStore.from_url(url, **options)
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


def sim_agent(n: int, hub_id: str = "hub-a") -> AgentRecord:
    """An agent as the simulator registers it (bench/redis_store.py uses the same)."""
    now = time.time()
    return AgentRecord(
        agent_id=f"sim-{n:05d}",
        platform="linux",
        region="eu-west",
        version="1.4.0",
        hostname=f"paris-edge-{n % 100:02d}",
        labels={"site": "paris", "tier": "edge", "simulated": "true"},
        capabilities=("exec", "ping", "sysinfo", "sleep"),
        location=(48.8566, 2.3522),
        status="ok",
        hub_id=hub_id,
        first_seen=now,
        connected_at=now,
        last_seen=now,
        metrics={"cpu_percent": 12.5, "mem_percent": 45.1, "load1": 0.52, "uptime_s": 1234567.0},
    )


def commands_processed(server: RedisServer) -> int:
    return int(server.info("stats")["total_commands_processed"])


def used_memory(server: RedisServer) -> int:
    return int(server.info("memory")["used_memory"])


# -- Redis away, slow, or back -------------------------------------------------------


async def test_a_hung_redis_costs_the_timeout_not_more(
    redis_factory: Factory, stores: Callable[..., Any]
) -> None:
    server = redis_factory()
    store = await stores(server.url, timeout=0.5)
    job, commands = job_with(["a1"])
    server.pause()  # SIGSTOP: the socket stays open, nothing answers
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="timed out"):
            await store.add_job(job, commands)
        with pytest.raises(StoreUnavailable):
            await store.credentials()
        with pytest.raises(StoreUnavailable):
            await store.save_commands(commands)
        assert not await store.ping()
        # Four calls of 0.5 s each: far less than ten times that (never hanging).
        assert time.monotonic() - started < 10 * 4 * 0.5, "each call bounded by the timeout"
    finally:
        server.resume()
    # The request that timed out was never answered, yet Redis ran it once resumed: a
    # retried dispatch after such a failure is a no-op (add_job is idempotent).
    await wait_for(store.ping, what="Redis answering again")
    await store.add_job(job, commands)
    stored = await store.job(job.job_id)
    assert stored is not None and len(stored["commands"]) == 1


async def test_redis_stopped_gives_store_unavailable_and_writes_resume(
    redis_factory: Factory, stores: Callable[..., Any]
) -> None:
    server = redis_factory(appendfsync="always")
    store = await stores(server.url, timeout=1.0)
    await store.add_credential(credential(id="agt_before"))
    server.stop()
    with pytest.raises(StoreUnavailable):
        await store.add_credential(credential(id="agt_during"))
    with pytest.raises(StoreUnavailable):
        await store.load_agents()
    # Batched writes wait for Redis (a hub keeps its heartbeats meanwhile).
    store.save_agent(AgentRecord(agent_id="edge-1", region="eu", first_seen=T0))
    store.open_session("s1", "edge-1", "hub-a", "10.0.0.1:1", None, T0)
    await wait_for(lambda: store.write_failures > 1, what="a batch failing")
    server.start()
    await wait_for(store.ping, what="the store answering again")
    await wait_for(
        lambda: _agent_ids(store), timeout=15, what="the batched writes sent after the outage"
    )
    assert [c.id for c in await store.credentials()] == ["agt_before"]
    assert (await store.agent_history("edge-1"))["sessions"][0]["session_id"] == "s1"
    assert store.writes_dropped == 0


async def test_batched_writes_during_an_outage_wait_for_the_backoff(
    redis_factory: Factory, stores: Callable[..., Any]
) -> None:
    """A registration storm while Redis is down is not a storm of attempts: batched writes
    wait for the writer's backoff; only durable writes are tried at once."""
    server = redis_factory()
    store = await stores(server.url, timeout=1.0)
    server.stop()
    store.save_agent(AgentRecord(agent_id="edge-0"))
    await wait_for(lambda: store.write_failures >= 1, what="the first attempt failing")
    failures = store.write_failures
    for n in range(1, 1001):
        store.save_agent(AgentRecord(agent_id=f"edge-{n}"))
        await asyncio.sleep(0)  # a turn of the event loop per registration
    assert store.write_failures <= failures + 1, "batched writes woke the writer each turn"
    with pytest.raises(StoreUnavailable):
        await store.add_credential(credential())  # tried at once, not after the backoff
    server.start()
    await wait_for(lambda: _agent_ids(store), timeout=15, what="the storm's rows sent")
    assert len(await store.load_agents()) == 1001


async def _agent_ids(store: RedisStore) -> list[str]:
    try:
        return [a.agent_id for a in await store.load_agents()]
    except StoreUnavailable:
        return []


async def test_a_script_killed_mid_way_leaves_all_or_nothing(
    redis_factory: Factory, stores: Callable[..., Any]
) -> None:
    """kill -9 while a job to 30,000 agents is being written, in one script: after the
    restart the job is there with every command, or not at all."""
    server = redis_factory(appendfsync="always")
    store = await stores(server.url, timeout=5.0)
    agents = [f"sim-{n:05d}" for n in range(30_000)]
    job, commands = job_with(agents)
    entries = [AuditEntry(T0, "job.dispatch", subject=job.job_id)]
    process = psutil.Process(server.process.pid)  # type: ignore[union-attr]
    busy = sum(process.cpu_times()[:2])
    write = asyncio.ensure_future(store.add_job(job, commands, entries))
    # Redis is running the script once it has spent CPU on it (or already has answered).
    await wait_for(lambda: write.done() or sum(process.cpu_times()[:2]) - busy > 0.02,
                   interval=0.001, what="Redis busy with the script")  # fmt: skip
    server.kill()
    outcome = await asyncio.gather(write, return_exceptions=True)
    server.start()
    await wait_for(store.ping, what="Redis back")
    stored = await store.job(job.job_id)
    if stored is None:
        assert isinstance(outcome[0], StoreUnavailable)
        assert await store.commands({"job_id": job.job_id}, 10, None) == (
            await store.commands({"job_id": "none"}, 10, None)
        )
        assert (await store.audit_entries({}, 10, None)).items == []
        assert await store.unfinished() == ([], [], 0)
    else:
        assert len(stored["commands"]) == len(agents)
        assert len((await store.audit_entries({}, 10, None)).items) == 1
        _, unfinished, top = await store.unfinished()
        assert len(unfinished) == len(agents) and top == commands[-1].seq


async def test_a_big_write_gets_more_than_the_clients_socket_timeout(
    redis_server: RedisServer,
) -> None:
    """A client made for short calls (the cluster's, 1 s) still writes a job to the whole
    fleet: the writer's deadline grows with the write."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=0.02)
    store = RedisStore(client, prefix="bigwrite", timeout=1.0)
    await store.open()
    try:
        job, commands = job_with([f"sim-{n:05d}" for n in range(30_000)])
        await store.add_job(job, commands)
        assert await store.command(commands[-1].command_id) == commands[-1].view()
    finally:
        await store.close()
        await client.aclose()


async def test_a_cancelled_redis_call_ends_its_task(redis_server: RedisServer) -> None:
    """A hub stops by cancelling its tasks; a Redis call must let the cancel through.
    redis-py 8.0-8.2 returned the command's answer instead, once in a few cancels (a hub's
    lease loop went on after its stop, for 40 s); pyproject.toml keeps below 8."""
    import random

    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_server.url)
    calls = 0

    async def loop() -> None:
        nonlocal calls
        while True:
            await client.get("cancel-probe")
            calls += 1

    try:
        rng = random.Random(7)
        for _ in range(200):
            task = asyncio.create_task(loop())
            await asyncio.sleep(rng.random() * 0.002)
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=2)
            assert done, "a cancelled task went on with its Redis calls"
            assert task.cancelled()
        assert calls > 0
    finally:
        await client.aclose()


async def test_what_redis_answered_survives_kill_9_with_appendfsync_always(
    redis_factory: Factory, stores: Callable[..., Any]
) -> None:
    server = redis_factory(appendfsync="always")
    store = await stores(server.url)
    job, commands = job_with(["a1", "a2"])
    await store.add_job(job, commands)
    finish(commands[0])
    await store.save_commands([commands[0]], [AuditEntry(T0, "done")])
    await store.add_credential(credential(id="agt_kept"))
    store.save_agent(AgentRecord(agent_id="a1", region="eu"))
    await store.flush()
    epoch = await store.epoch()
    server.kill()
    server.start()
    await wait_for(store.ping, what="Redis back")
    assert await store.epoch() == epoch, "the same data set"
    stored = await store.job(job.job_id)
    assert stored is not None and stored["commands"][0]["state"] == "succeeded"
    assert [c.id for c in await store.credentials()] == ["agt_kept"]
    assert [a.region for a in await store.load_agents()] == ["eu"]


async def test_a_redis_restarted_without_its_data_is_noticed(
    redis_factory: Factory, stores: Callable[..., Any]
) -> None:
    server = redis_factory()
    hub_a = await stores(server.url)
    hub_b = await stores(server.url)
    await hub_a.add_credential(credential(id="agt_old"))
    epoch = await hub_a.epoch()
    assert await hub_b.epoch() == epoch
    seen, _ = await hub_b.credentials_since(0)
    server.restart(keep_data=False)
    await wait_for(hub_a.ping, what="Redis back")
    fresh = await hub_a.epoch()
    assert fresh != epoch and await hub_b.epoch() == fresh
    # Revisions start again above every one seen before: hub B, syncing since the old
    # data set's revision, still gets the credentials made in the new one.
    await hub_a.add_credential(credential(id="agt_new"))
    newest, changed = await hub_b.credentials_since(seen)
    assert [c.id for c in changed] == ["agt_new"] and newest > seen
    # Scripts were lost with the data (a new process): writes load them again.
    job, commands = job_with(["a1"])
    await hub_b.add_job(job, commands)
    assert await hub_a.job(job.job_id) is not None


async def test_scripts_flushed_are_loaded_again(
    redis_server: RedisServer, stores: Callable[..., Any]
) -> None:
    store = await stores(redis_server.url, prefix="flushed")
    redis_server.call("SCRIPT", "FLUSH")
    job, commands = job_with(["a1"])
    await store.add_job(job, commands)
    redis_server.call("SCRIPT", "FLUSH")
    assert await store.credentials_since(0) == (0, [])
    assert await store.job(job.job_id) is not None


# -- the cluster's needs -------------------------------------------------------------


async def test_fencing_refuses_a_leader_that_lost_its_lease(
    redis_server: RedisServer, stores: Callable[..., Any]
) -> None:
    lease: dict[str, tuple[str, str] | None] = {"fence": ("fenced:leader", "token-1")}
    redis_server.call("SET", "fenced:leader", "token-1")
    store = await stores(redis_server.url, prefix="fenced", fence=lambda: lease["fence"])
    job, (command,) = job_with(["a1"])
    await store.add_job(job, [command])
    command.state = "sent"
    await store.save_commands([command])
    redis_server.call("SET", "fenced:leader", "token-2")  # a successor took the lease
    finish(command)
    with pytest.raises(StoreUnavailable, match="fenced: not the ledger leader"):
        await store.save_commands([command], [AuditEntry(T0, "late")], [job])
    assert (await store.command(command.command_id) or {})["state"] == "sent"
    assert (await store.audit_entries({}, 10, None)).items == []
    redis_server.call("DEL", "fenced:leader")
    with pytest.raises(StoreUnavailable, match="fenced"):
        await store.save_commands([command])
    lease["fence"] = None  # no fencing asked: written
    await store.save_commands([command])
    assert (await store.command(command.command_id) or {})["state"] == "succeeded"


async def test_a_revoke_on_one_hub_reaches_the_other(
    redis_server: RedisServer, stores: Callable[..., Any]
) -> None:
    hub_a = await stores(redis_server.url, prefix="twohubs")
    hub_b = await stores(redis_server.url, prefix="twohubs")
    await hub_a.add_credential(credential(id="agt_shared"))
    rev, known = await hub_b.credentials_since(0)
    assert [c.id for c in known] == ["agt_shared"]
    await hub_a.revoke_credential("agt_shared")
    await hub_a.revoke_credential("jwt:stolen")
    newest, changed = await hub_b.credentials_since(rev)
    assert [(c.id, c.revoked) for c in changed] == [("agt_shared", True), ("jwt:stolen", True)]
    assert await hub_b.credentials_since(newest) == (newest, [])


async def test_credentials_since_an_old_revision_reads_them_all(
    redis_server: RedisServer, stores: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("hub.store.redis.CREDENTIAL_LOG", 3)
    store = await stores(redis_server.url, prefix="shortlog")
    await store.add_credential(credential(id="agt_0"))
    rev, _ = await store.credentials_since(0)
    for n in range(1, 6):
        await store.add_credential(credential(id=f"agt_{n}"))
    assert redis_server.call("ZCARD", "shortlog:cred:log") == b":3"
    newest, changed = await store.credentials_since(rev)  # older than the log: everything
    assert [c.id for c in changed] == [f"agt_{n}" for n in range(6)]
    _, recent = await store.credentials_since(newest - 2)
    assert [c.id for c in recent] == ["agt_4", "agt_5"]


async def test_adding_a_job_again_changes_nothing(
    redis_server: RedisServer, stores: Callable[..., Any]
) -> None:
    store = await stores(redis_server.url, prefix="again")
    job, commands = job_with(["a1", "a2"])
    await store.add_job(job, commands, [AuditEntry(T0, "job.dispatch", subject=job.job_id)])
    finish(commands[0])
    await store.save_commands([commands[0]])
    await store.add_job(job, commands, [AuditEntry(T0, "job.dispatch", subject=job.job_id)])
    stored = await store.job(job.job_id)
    assert stored is not None and stored["commands"][0]["state"] == "succeeded"
    assert len((await store.commands({}, 10, None)).items) == 2
    assert len((await store.audit_entries({}, 10, None)).items) == 1


async def test_audit_entries_of_two_hubs_interleave_in_time(
    redis_server: RedisServer, stores: Callable[..., Any]
) -> None:
    hub_a = await stores(redis_server.url, prefix="audit2")
    hub_b = await stores(redis_server.url, prefix="audit2")
    for n in range(6):
        writer = hub_a if n % 2 == 0 else hub_b
        await writer.audit(
            [AuditEntry(time.time(), f"e{n}", hub_id="hub-a" if n % 2 == 0 else "hub-b")]
        )
    listed = (await hub_b.audit_entries({}, 10, None)).items
    assert [e["action"] for e in listed] == [f"e{n}" for n in reversed(range(6))]
    assert [
        e["hub_id"] for e in (await hub_a.audit_entries({"hub_id": "hub-b"}, 10, None)).items
    ] == ["hub-b"] * 3


async def test_a_rare_audit_filter_reads_a_bounded_window_per_page(
    redis_server: RedisServer, stores: Callable[..., Any]
) -> None:
    store = await stores(redis_server.url, prefix="window")
    await store.audit([AuditEntry(T0, "needle")])
    await store.audit([AuditEntry(T0, "hay") for _ in range(SCAN_WINDOW + 500)])
    first = await store.audit_entries({"action": "needle"}, 10, None)
    assert first.items == [] and first.next is not None, "a short page, and a cursor"
    second = await store.audit_entries({"action": "needle"}, 10, first.next)
    assert [e["action"] for e in second.items] == ["needle"] and second.next is None


async def test_audit_retention_trims_by_redis_time(
    redis_server: RedisServer, stores: Callable[..., Any]
) -> None:
    store = await stores(redis_server.url, prefix="retention", audit_retention=1.0)
    await store.audit([AuditEntry(T0, "old")])
    assert await store.checkpoint() == 0  # nothing older than a second yet
    await wait_for(store.trim_audit, what="the entry a second old trimmed")
    await store.audit([AuditEntry(T0, "new")])
    assert [e["action"] for e in (await store.audit_entries({}, 10, None)).items] == ["new"]


# -- what an idle fleet costs Redis --------------------------------------------------


async def test_heartbeats_of_5000_agents_are_a_few_commands(
    redis_factory: Factory, stores: Callable[..., Any]
) -> None:
    server = redis_factory()
    store = await stores(server.url)
    agents = [sim_agent(n) for n in range(5000)]
    for agent in agents:
        store.save_agent(agent)
    await store.flush()
    for samples in (False, True):
        for agent in agents:
            agent.last_seen = time.time()
        before = commands_processed(server)
        store.save_heartbeats(agents, samples=samples)
        await store.flush()
        spent = commands_processed(server) - before - 1  # the INFO that read the count
        # One HSET of the heartbeats and one of the metric names; with samples, one script
        # and its HMGET and HSET: never a command per agent.
        assert spent <= (8 if samples else 3), spent


async def test_an_idle_agent_costs_redis_under_a_kilobyte(
    redis_factory: Factory, stores: Callable[..., Any]
) -> None:
    """Registration row, last heartbeat, session and kept samples of idle agents: what
    Redis holds for 2,000 more agents than 1,000, per agent (the fixed costs cancel out;
    bench/redis_store.py reports 1,000 and 19,000, agent keys included)."""
    server = redis_factory()
    store = await stores(server.url)

    async def idle(agents: list[AgentRecord]) -> None:
        for agent in agents:
            store.save_agent(agent)
            store.open_session(f"3f2a9c1b{agent.agent_id}", agent.agent_id, "hub-a",
                               "10.1.2.3:54321", None, agent.connected_at or 0.0)  # fmt: skip
        for _ in range(store.samples_kept + 2):  # more samples than are kept
            for agent in agents:
                agent.last_seen = (agent.last_seen or 0) + 60
            store.save_heartbeats(agents, samples=True)
            await store.flush()

    await idle([sim_agent(n) for n in range(1000)])
    before = used_memory(server)
    more = [sim_agent(n) for n in range(1000, 3000)]
    await idle(more)
    per_agent = (used_memory(server) - before) / len(more)
    assert per_agent <= 1024, f"{per_agent:.0f} bytes per idle agent"
    history = await store.agent_history(more[7].agent_id)
    assert len(history["heartbeats"]) == store.samples_kept
    assert len(history["sessions"]) == 1


async def test_agents_inventing_metric_names_do_not_grow_the_names_without_bound(
    redis_server: RedisServer, stores: Callable[..., Any]
) -> None:
    store = await stores(redis_server.url, prefix="hostile")
    store.names.limit = 50
    agents = [
        AgentRecord(agent_id=f"bad-{n}", last_seen=T0 + n, metrics={f"m{n}": 1.0})
        for n in range(200)
    ]
    for agent in agents:
        store.save_agent(agent)
    store.save_heartbeats(agents, samples=True)
    await store.flush()
    assert int(redis_server.call("HLEN", "hostile:mnames")[1:]) <= 50
    loaded = {a.agent_id: a.metrics for a in await store.load_agents()}
    assert loaded == {f"bad-{n}": {f"m{n}": 1.0} for n in range(200)}
    history = await store.agent_history("bad-199")
    assert history["heartbeats"][0]["metrics"] == {"m199": 1.0}


async def test_a_second_store_reads_metrics_interned_by_the_first(
    redis_server: RedisServer, stores: Callable[..., Any]
) -> None:
    first = await stores(redis_server.url, prefix="interned")
    agent = sim_agent(1)
    first.save_agent(agent)
    first.save_heartbeats([agent], samples=True)
    await first.flush()
    second = await stores(redis_server.url, prefix="interned")
    second.names = type(second.names)()  # learned nothing
    (loaded,) = await second.load_agents()
    assert loaded.metrics == agent.metrics
    assert (await second.agent_history(agent.agent_id))["heartbeats"][0]["metrics"] == agent.metrics


def test_the_client_must_not_decode_responses() -> None:
    import redis.asyncio as aioredis

    with pytest.raises(ValueError, match="decode_responses"):
        RedisStore(aioredis.Redis(decode_responses=True))


_ = (CommandRecord, CredentialRecord, JobRecord)
