"""Store backends for the conformance suite (``test_store_conformance.py``).

Each backend makes stores on one place of its own (a data directory, a key prefix of its
own in the session's ``redis-server``); ``make()`` called again gives a second store on the
same data, the way a restarted hub (or, on Redis, another hub) sees it. Every conformance
test runs against both.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import pytest

from hub.store.base import Store
from hub.store.redis import RedisStore
from hub.store.sqlite import SQLiteStore
from tests.redis_server import RedisServer

#: Every implementation of :class:`hub.store.base.Store`; each must pass the same suite.
STORE_BACKENDS = ["sqlite", "redis"]
_prefixes = itertools.count(1)


class StoreBackend(Protocol):
    name: str

    def make(self) -> Store:
        """A new, not yet opened store on this backend's data."""


class SQLiteBackend:
    name = "sqlite"

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def make(self) -> Store:
        return SQLiteStore(self.data_dir)


class RedisBackend:
    """Stores on the session's ``redis-server`` (``tests/conftest.py``), under a key prefix
    of the test's own."""

    name = "redis"

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.prefix = f"conformance{next(_prefixes)}"

    def make(self) -> Store:
        return RedisStore.from_url(self.server.url, prefix=self.prefix)


@pytest.fixture(params=STORE_BACKENDS)
def store_backend(request: pytest.FixtureRequest, tmp_path: Path) -> StoreBackend:
    if request.param == "sqlite":
        return SQLiteBackend(tmp_path / "store")
    if request.param == "redis":
        return RedisBackend(request.getfixturevalue("redis_server"))
    raise AssertionError(f"no fixture for store backend {request.param!r}")


@pytest.fixture
async def store(store_backend: StoreBackend) -> AsyncIterator[Store]:
    """An open store; closed after the test (closing twice is allowed)."""
    opened = store_backend.make()
    await opened.open()
    yield opened
    await opened.close()
