"""Store backends for the conformance suite (``test_store_conformance.py``).

Each backend makes stores on one place of its own (a data directory, a Redis database);
``make()`` called again gives a second store on the same data, the way a restarted hub
sees it. Cluster mode adds ``"redis"`` to :data:`STORE_BACKENDS` with a backend that starts
its own ``redis-server``: every conformance test then runs against both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import pytest

from hub.store.base import Store
from hub.store.sqlite import SQLiteStore

#: Every implementation of :class:`hub.store.base.Store`; each must pass the same suite.
STORE_BACKENDS = ["sqlite"]


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


@pytest.fixture(params=STORE_BACKENDS)
def store_backend(request: pytest.FixtureRequest, tmp_path: Path) -> StoreBackend:
    if request.param == "sqlite":
        return SQLiteBackend(tmp_path / "store")
    raise AssertionError(f"no fixture for store backend {request.param!r}")


@pytest.fixture
async def store(store_backend: StoreBackend) -> AsyncIterator[Store]:
    """An open store; closed after the test (closing twice is allowed)."""
    opened = store_backend.make()
    await opened.open()
    yield opened
    await opened.close()
