"""Console tests run on a qasync loop, so Qt timers, paints and the hub's sockets share one loop.

The hubs are real (``hub_factory`` from tests/conftest.py, in-process on 127.0.0.1 with an
ephemeral port), the agents speak the real protocol (``RawAgent``), the widgets are the real
ones offscreen. Nothing is mocked. Waits poll with deadlines (``tests.support.wait_for``);
``qtbot.waitUntil`` is not used in async tests (it deadlocks on the qasync loop).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("QT_API", "pyside6")

import pytest
from PySide6.QtWidgets import QApplication

from tests.conftest import HubHandle

from .helpers import open_window


def _qapp() -> QApplication:
    app = QApplication.instance()
    return app if isinstance(app, QApplication) else QApplication(["tether-console-tests"])


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Callable[[], Any]]:
    import qasync

    return {"qasync": lambda: qasync.QEventLoop(_qapp())}


@pytest.fixture
async def window_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    windows: list[Any] = []

    async def make(hub: HubHandle, role: str = "operator", **kwargs: Any) -> Any:
        window = await open_window(hub, role, tmp_path / f"settings{len(windows)}.ini", **kwargs)
        windows.append(window)
        return window

    yield make
    for window in windows:
        await window.shutdown()
        window.close()
        window.deleteLater()
