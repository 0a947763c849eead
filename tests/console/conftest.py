"""Console tests run on a qasync loop, so Qt timers, paints and the hub's sockets share one loop.

The hubs are real (``hub_factory`` from tests/conftest.py, in-process on 127.0.0.1 with an
ephemeral port), the agents speak the real protocol (``RawAgent``), the widgets are the real
ones offscreen. Nothing is mocked. Waits poll with deadlines (``tests.support.wait_for``);
``qtbot.waitUntil`` is not used in async tests (it deadlocks on the qasync loop).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("QT_API", "pyside6")

import pytest
import pytestqt.plugin
from PySide6.QtWidgets import QApplication

from tests.conftest import HubHandle

from .helpers import open_window


def _qapp() -> QApplication:
    app = QApplication.instance()
    return app if isinstance(app, QApplication) else QApplication(["tether-console-tests"])


#: The qasync loop of the test that is running (one per test).
_current_loop: list[asyncio.AbstractEventLoop] = []


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Callable[[], Any]]:
    import qasync

    def make() -> asyncio.AbstractEventLoop:
        loop = qasync.QEventLoop(_qapp())
        _current_loop[:] = [loop]
        return loop

    return {"qasync": make}


def _process_events_as_the_loop() -> None:
    """pytest-qt processes Qt events between test phases, outside any asyncio run.

    On a qasync loop those events include asyncio callbacks (the hub's periodic tasks,
    a fixture's pending steps), which then run with no running loop and fail at random
    in ``get_running_loop()``. Running them as the loop keeps asyncio's invariant.
    """
    app = QApplication.instance()
    if app is None:
        return
    loop = _current_loop[0] if _current_loop else None
    if loop is None or loop.is_closed() or loop.is_running():
        app.processEvents()
        return
    asyncio.events._set_running_loop(loop)
    try:
        app.processEvents()
    finally:
        asyncio.events._set_running_loop(None)


pytestqt.plugin._process_events = _process_events_as_the_loop


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
