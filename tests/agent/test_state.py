"""The state dir: the stored agent key and the choice of credential."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.state import (
    Credentials,
    KeyFile,
    StateDirBusy,
    default_state_dir,
    lock_state_dir,
    prepare_state_dir,
)


def test_default_state_dir_follows_xdg() -> None:
    assert default_state_dir("edge-1", {"XDG_STATE_HOME": "/srv/state"}) == Path(
        "/srv/state/tether-agent/edge-1"
    )
    assert default_state_dir("edge-1", {}) == Path.home() / ".local/state/tether-agent/edge-1"


def test_key_file_is_private_and_atomic(tmp_path: Path) -> None:
    state = prepare_state_dir(tmp_path / "s")
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    store = KeyFile(state)
    assert store.load() is None
    store.save("first-key")
    store.save("second-key")
    assert store.load() == "second-key"
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert sorted(p.name for p in state.iterdir()) == ["agent_key"]  # no temp file left
    store.discard()
    assert store.load() is None
    store.discard()  # idempotent


async def test_issued_key_replaces_token_and_survives_restart(tmp_path: Path) -> None:
    store = KeyFile(prepare_state_dir(tmp_path))
    creds = Credentials.from_state("enroll-secret", store)
    assert creds.current() == "enroll-secret" and creds.kind == "token"
    await creds.issued("agent-key-1")
    assert creds.current() == "agent-key-1" and creds.kind == "agent_key"
    restarted = Credentials.from_state("enroll-secret", store)
    assert restarted.current() == "agent-key-1"


async def test_revoked_stored_key_falls_back_to_token_and_is_deleted(tmp_path: Path) -> None:
    store = KeyFile(prepare_state_dir(tmp_path))
    store.save("agent-key-1")
    creds = Credentials.from_state("enroll-secret", store)
    await creds.revoked("agent-key-1")
    assert creds.current() == "enroll-secret"
    assert store.load() is None


async def test_revoked_token_keeps_being_the_only_choice(tmp_path: Path) -> None:
    creds = Credentials("only-token")
    await creds.revoked("only-token")
    assert creds.current() == "only-token"


async def test_revocation_of_an_old_credential_does_not_drop_a_new_key(tmp_path: Path) -> None:
    store = KeyFile(prepare_state_dir(tmp_path))
    creds = Credentials.from_state("enroll-secret", store)
    await creds.issued("fresh-key")
    await creds.revoked("enroll-secret")
    assert creds.current() == "fresh-key"
    assert store.load() == "fresh-key"


def test_unknown_key_alternates_with_token_but_stays_on_disk(tmp_path: Path) -> None:
    store = KeyFile(prepare_state_dir(tmp_path))
    store.save("agent-key-1")
    creds = Credentials.from_state("enroll-secret", store)
    creds.refused("agent-key-1")
    assert creds.current() == "enroll-secret"
    creds.refused("enroll-secret")
    assert creds.current() == "agent-key-1"
    assert store.load() == "agent-key-1"


def test_no_credential_at_all() -> None:
    creds = Credentials(None)
    assert creds.current() is None and creds.kind == "none"


@pytest.mark.skipif(os.name != "posix", reason="flock")
def test_state_dir_lock_is_exclusive(tmp_path: Path) -> None:
    held = lock_state_dir(tmp_path)
    try:
        with pytest.raises(StateDirBusy):
            lock_state_dir(tmp_path)
    finally:
        held.close()
    lock_state_dir(tmp_path).close()


async def test_revoked_key_is_replaced_by_a_new_one_found_on_disk(tmp_path: Path) -> None:
    store = KeyFile(prepare_state_dir(tmp_path))
    store.save("old-key")
    creds = Credentials.from_state("enroll-secret", store)
    store.save("new-key")  # e.g. `tether-agent doctor` enrolled again and saved its key
    assert await creds.revoked("old-key") is True
    assert creds.current() == "new-key"
    assert store.load() == "new-key"
    assert await creds.revoked("new-key") is False
    assert creds.current() == "enroll-secret"
