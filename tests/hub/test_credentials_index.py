"""The re-enrollment index and the forgetting of revoked keys, against a brute-force model.

``Credentials.enrollment_keys_of`` answers from an index (agent id -> its enrollment-issued
keys) instead of scanning every record; revoked keys leave the records for a compact,
bucketed set that expires. A Hypothesis state machine drives a store's truth and a hub's
view of it through creation, revocation, re-enrollment (replace), syncs (incremental, stale
and the full read a Redis store falls back to), the store's retention removing revoked
rows, the clock moving and the hub restarting, and after every step compares the index
with the scan the hub used to make over everything it had seen, and every token's answer
with what the contract says (live: accepted; revoked: 403 within the retention).

The same comparison then runs on both real stores (SQLite and the Redis store a cluster
shares), with a second hub syncing what the first enrolled.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from hub.auth import REVOKED_BUCKETS, AuthFailure, Credentials, NotCached
from hub.model import CredentialRecord
from hub.store.base import Store
from tests.hub.conftest import StoreBackend
from tests.support import FakeClock

AGENTS = ("a0", "a1", "a2", "a3")
DAY = 86400.0
RETENTION = 10 * DAY
SPAN = RETENTION / REVOKED_BUCKETS


def scan(view: dict[str, CredentialRecord], agent_id: str) -> list[str]:
    """What ``enrollment_keys_of`` used to compute: every record the hub has seen."""
    return [
        r.id
        for r in view.values()
        if r.kind == "agent"
        and r.agent_id == agent_id
        and not r.revoked
        and (r.issued_by or "").startswith("enroll:")
    ]


class CredentialsMachine(RuleBasedStateMachine):
    """``store`` is the truth (id -> record, with revisions); ``view`` is what the old
    implementation held in memory (every record it had seen, as last seen); ``learned``
    when the hub learned each revocation (the retention counts from then)."""

    @initialize()
    def start(self) -> None:
        self.clock = FakeClock(1_000_000.0)
        self.revs = itertools.count(1)
        self.store: dict[str, CredentialRecord] = {}
        self.tokens: dict[str, str] = {}
        self.synced = 0
        self._boot()
        enroll, token = self.creds.make("enroll", issued_by=None)
        self._write(enroll, token)
        self.enroll_id = enroll.id
        self.sync()

    def _boot(self) -> None:
        """A hub starting: everything the store holds, read once."""
        self.creds = Credentials(None, clock=self.clock, revoked_retention=RETENTION)  # type: ignore[arg-type]
        self.creds.apply([dataclasses.replace(r) for r in self.store.values()], announce=False)
        self.view = {i: dataclasses.replace(r) for i, r in self.store.items()}
        self.learned = {i: self.clock.now for i, r in self.store.items() if r.revoked}
        self.synced = max((r.rev for r in self.store.values()), default=0)

    def _write(self, record: CredentialRecord, token: str | None = None) -> None:
        record.rev = next(self.revs)
        self.store[record.id] = dataclasses.replace(record)
        if token is not None:
            self.tokens[record.id] = token

    def _deliver(self, records: list[CredentialRecord]) -> None:
        """Records read from the store reach the hub (``Credentials.apply``, as a sync
        does). A revocation the hub had already forgotten (past the retention) that a read
        brings again is learned again: the store still holds it."""
        revoked = self.creds.revoked.ids()
        held = {r.id for r in records if r.id in revoked or r.id in self.creds.records}
        self.creds.apply([dataclasses.replace(r) for r in records])
        for record in records:
            before = self.view.get(record.id)
            if record.revoked and (before is None or not before.revoked or record.id not in held):
                self.learned[record.id] = self.clock.now
            self.view[record.id] = dataclasses.replace(record)

    # -- what happens to credentials -----------------------------------------------------

    @rule(
        agent_id=st.sampled_from(AGENTS),
        issued_by=st.sampled_from([None, "enroll:elsewhere", "admin:ops"]),
    )
    def create_agent_key(self, agent_id: str, issued_by: str | None) -> None:
        """A key made by an admin (or by another hub's enrollment), reaching the store."""
        record, token = self.creds.make("agent", agent_id=agent_id, issued_by=issued_by)
        self._write(record, token)

    @rule(kind=st.sampled_from(["enroll", "admin"]))
    def create_other(self, kind: str) -> None:
        record, token = self.creds.make(kind, role="admin" if kind == "admin" else None)
        self._write(record, token)

    @rule(data=st.data())
    def revoke(self, data: st.DataObject) -> None:
        """``token revoke`` against the store (the hub learns at its next sync)."""
        # In creation order, not by id (ids are random: draws must not depend on them).
        live = [i for i, r in self.store.items() if not r.revoked and i != self.enroll_id]
        if not live:
            return
        credential_id = data.draw(st.sampled_from(live))
        record = dataclasses.replace(self.store[credential_id], revoked=True)
        self._write(record)

    @rule(jti=st.sampled_from(["j1", "j2"]))
    def revoke_jwt(self, jti: str) -> None:
        if f"jwt:{jti}" not in self.store:
            self._write(
                CredentialRecord(
                    id=f"jwt:{jti}",
                    kind="jwt",
                    secret_hash=b"",
                    created_at=self.clock.now,
                    revoked=True,
                    issued_by="revocation",
                )
            )

    @rule(agent_id=st.sampled_from(AGENTS))
    def reenroll(self, agent_id: str) -> None:
        """What ``Fleet.enroll`` does: replace the keys enrollment gave this id before."""
        replaced = self.creds.enrollment_keys_of(agent_id)
        assert sorted(replaced) == sorted(scan(self.view, agent_id))
        issued, token = self.creds.make(
            "agent", agent_id=agent_id, issued_by=f"enroll:{self.enroll_id}"
        )
        for old in replaced:
            if old in self.store and not self.store[old].revoked:
                self._write(dataclasses.replace(self.store[old], revoked=True))
        self._write(issued, token)
        self.creds.enrolled(self.enroll_id, issued, replaced, new_id=False)
        for old in replaced:
            self.view[old].revoked = True
            self.learned[old] = self.clock.now
        self.view[issued.id] = dataclasses.replace(issued)

    @rule()
    def sync(self) -> None:
        changed = sorted(
            (r for r in self.store.values() if r.rev > self.synced), key=lambda r: r.rev
        )
        self._deliver(changed)
        self.synced = max([self.synced, *(r.rev for r in changed)])

    @rule(data=st.data())
    def stale_sync(self, data: st.DataObject) -> None:
        """A read that began before a later write: older states of some records, in any
        order (the next sync brings the current ones)."""
        if not self.view:
            return
        ids = data.draw(st.lists(st.sampled_from(list(self.view)), max_size=4, unique=True))
        # The oldest state a store could still answer is the one this hub saw last.
        records = [dataclasses.replace(self.view[i], revoked=False) for i in ids if i in self.store]
        records = [r for r in records if r.kind != "jwt"]
        self._deliver(records)
        self.synced = 0  # the next sync reads everything again: current states win

    @rule()
    def full_read(self) -> None:
        """The Redis store's fallback when its change log was trimmed: every record."""
        records = list(self.store.values())
        self._deliver(records)
        self.synced = max((r.rev for r in records), default=0)

    @rule(data=st.data())
    def store_retention(self, data: st.DataObject) -> None:
        """The store's retention removes revoked rows; the hub forgets them too."""
        revoked = [i for i, r in self.store.items() if r.revoked and r.kind != "jwt"]
        if not revoked:
            return
        gone = data.draw(st.lists(st.sampled_from(revoked), min_size=1, unique=True))
        for credential_id in gone:
            del self.store[credential_id]
            self.view.pop(credential_id, None)
            self.learned.pop(credential_id, None)
            self.tokens.pop(credential_id, None)
        self.creds.forget(gone)

    @rule(days=st.sampled_from([0.5, 3.0, 9.0, 12.0]))
    def time_passes(self, days: float) -> None:
        """The clock moves; the hub's sync forgets what is past the retention (and the
        store deletes it)."""
        self.clock.now += days * DAY
        for credential_id in self.creds.revoked.expire():
            self.store.pop(credential_id, None)
            self.view.pop(credential_id, None)
            self.learned.pop(credential_id, None)

    @rule()
    def restart(self) -> None:
        self._boot()

    # -- what must hold after every step -------------------------------------------------

    @invariant()
    def index_is_the_scan(self) -> None:
        for agent_id in AGENTS:
            assert sorted(self.creds.enrollment_keys_of(agent_id)) == sorted(
                scan(self.view, agent_id)
            )
        assert all(self.creds.enrolled_keys.values())
        assert set(self.creds.enrolled_keys) <= set(AGENTS)

    @invariant()
    def only_what_may_matter_is_kept(self) -> None:
        expected = {i for i, r in self.view.items() if not r.revoked or r.kind == "jwt"}
        assert set(self.creds.records) == expected
        revoked = {i for i, r in self.view.items() if r.revoked and r.kind != "jwt"}
        assert self.creds.revoked.ids() <= revoked
        assert len(self.creds.revoked) == len(self.creds.revoked.ids())

    @invariant()
    def every_token_gets_its_answer(self) -> None:
        creds = self.creds
        for credential_id, token in self.tokens.items():
            seen = self.view.get(credential_id)
            if seen is None:
                continue  # not synced yet: looked up in the store
            if not seen.revoked:
                assert creds.authenticate(token).credential_id == credential_id
                assert not creds.is_revoked(credential_id)
                continue
            age = self.clock.now - self.learned[credential_id]
            try:
                creds.authenticate(token)
            except AuthFailure as failure:
                answer = failure.status
            except NotCached:
                answer = 0
            else:
                raise AssertionError(f"revoked {credential_id} accepted")
            if age < RETENTION:
                assert answer == 403, (credential_id, age, answer)
                # The same id with a wrong secret is unknown (looked up first), not revoked.
                wrong = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
                with pytest.raises((AuthFailure, NotCached)) as refused:
                    creds.authenticate(wrong)
                assert getattr(refused.value, "status", 401) == 401
            elif age >= RETENTION + SPAN:
                assert answer in (0, 401), (credential_id, age, answer)
        for jti in ("j1", "j2"):
            stored = f"jwt:{jti}" in self.view
            assert creds.is_revoked(f"jwt:{jti}") is stored


CredentialsMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCredentialsIndex = CredentialsMachine.TestCase


# -- on the real stores --------------------------------------------------------------------


async def _check(creds: Credentials, store: Store) -> None:
    view = {r.id: r for r in await store.credentials()}
    for agent_id in AGENTS:
        assert sorted(creds.enrollment_keys_of(agent_id)) == sorted(scan(view, agent_id))


async def test_the_index_follows_enrollments_on_both_stores(store_backend: StoreBackend) -> None:
    """One hub re-enrolls agents again and again on a real store; another (a restarted hub,
    or on Redis a second hub of the cluster) syncs; both indexes are the scan of the store,
    and the replaced keys are held only as revocations."""
    store, other_store = store_backend.make(), store_backend.make()
    await store.open()
    await other_store.open()
    try:
        hub = Credentials(store)
        other = Credentials(other_store)
        enroll, _ = hub.make("enroll", uses=len(AGENTS))
        await store.add_credential(enroll)
        await hub.load()
        await other.load()
        for round_ in range(3):
            for agent_id in AGENTS:
                replaced = hub.enrollment_keys_of(agent_id)
                assert len(replaced) == (1 if round_ else 0)
                issued, _ = hub.make("agent", agent_id=agent_id, issued_by=f"enroll:{enroll.id}")
                assert await store.enroll(enroll.id, agent_id, issued, replaced)
                hub.enrolled(enroll.id, issued, replaced, new_id=round_ == 0)
            await _check(hub, store)
            await other.sync()
            await _check(other, store)
        # An admin revokes one agent's key: both hubs drop it from the index at their sync.
        (key,) = hub.enrollment_keys_of("a0")
        assert await store.revoke_credential(key) is not None
        await hub.sync()
        await other.sync()
        for creds in (hub, other):
            await _check(creds, store)
            assert key in creds.revoked.ids() and key not in creds.records
        # Twelve keys issued, eight replaced or revoked: only the four live ones are records.
        assert sum(r.kind == "agent" for r in hub.records.values()) == len(AGENTS) - 1
        assert len(hub.revoked) == 2 * len(AGENTS) + 1
        restarted = Credentials(store)
        await restarted.load()
        await _check(restarted, store)
        assert len(restarted.revoked) == 2 * len(AGENTS) + 1
    finally:
        await store.close()
        await other_store.close()


async def test_purging_deletes_only_revoked_credentials_on_both_stores(
    store_backend: StoreBackend,
) -> None:
    """The store's side of the retention: revoked rows go (and a sync after it still
    works), live ones stay whatever the caller asks."""
    store = store_backend.make()
    await store.open()
    try:
        maker = Credentials(store)
        live, _ = maker.make("agent", agent_id="a0")
        gone, _ = maker.make("agent", agent_id="a1")
        for record in (live, gone):
            await store.add_credential(record)
        rev, _ = await store.credentials_since(0)
        assert await store.revoke_credential(gone.id) is not None
        assert await store.purge_credentials([live.id, gone.id, "unknown0000"]) == 1
        assert [r.id for r in await store.credentials()] == [live.id]
        newest, changed = await store.credentials_since(rev)
        assert [r.id for r in changed] == [] and newest >= rev
        assert await store.purge_credentials([]) == 0
    finally:
        await store.close()


async def test_revocations_past_the_retention_leave_memory_and_the_store(tmp_path) -> None:
    """A hub forgets a revocation a retention after it learned of it, and deletes the row
    (a key presented after that is unknown: 401, still refused)."""
    from hub.store.sqlite import SQLiteStore

    clock = FakeClock(1_000_000.0)
    store = SQLiteStore(tmp_path / "store")
    await store.open()
    try:
        hub = Credentials(store, clock=clock, revoked_retention=RETENTION)
        enroll, _ = hub.make("enroll")
        await store.add_credential(enroll)
        await hub.load()
        tokens = []
        for _ in range(2):
            replaced = hub.enrollment_keys_of("a0")
            issued, token = hub.make("agent", agent_id="a0", issued_by=f"enroll:{enroll.id}")
            assert await store.enroll(enroll.id, "a0", issued, replaced)
            hub.enrolled(enroll.id, issued, replaced, new_id=not replaced)
            tokens.append(token)
        with pytest.raises(AuthFailure) as refused:
            hub.authenticate(tokens[0])
        assert refused.value.status == 403
        clock.now += RETENTION + 2 * SPAN
        await hub.sync()
        assert len(hub.revoked) == 0
        assert [r.id for r in await store.credentials()] == [enroll.id, tokens[1][4:16]]
        with pytest.raises(NotCached):
            hub.authenticate(tokens[0])
        await hub.look_up(tokens[0][4:16])
        with pytest.raises(AuthFailure) as unknown:
            hub.authenticate(tokens[0])
        assert unknown.value.status == 401
        assert hub.authenticate(tokens[1]).agent_id == "a0"
    finally:
        await store.close()


def test_revocations_are_bounded_whatever_the_retention() -> None:
    """A hundred storms within the retention: past the limit the oldest bucket goes early,
    and its ids are handed to the next expiry (to be deleted from the store)."""
    from hub.auth import Revocations

    clock = FakeClock(0.0)
    revocations = Revocations(RETENTION, clock, limit=250)
    ids = []
    for storm in range(10):
        clock.now = storm * SPAN  # one bucket per storm
        for n in range(100):
            credential_id = f"{storm:02d}{n:010d}"
            ids.append(credential_id)
            revocations.add(credential_id, bytes([n]) * 32)
    assert len(revocations) <= 250 and len(revocations) == len(revocations.ids())
    kept = revocations.ids()
    assert kept == set(ids[-len(kept) :])  # the newest
    assert revocations.holds(ids[-1], bytes([99]) * 32)
    assert not revocations.holds(ids[0], bytes([0]) * 32)
    assert revocations.due()
    assert sorted(revocations.expire()) == sorted(set(ids) - kept)
    assert not revocations.due() and len(revocations) == len(kept)
