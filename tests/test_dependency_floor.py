"""The lowest websockets (and redis-py) that pyproject.toml allows is tested, not assumed.

The lean connection drives websockets' sans-I/O protocol objects directly and reads
names that appeared in 17.0 (``max_message_size``, ``HeaderLineTooLong``…); pyproject
says ``>=17``. This installs exactly that version beside the suite (``pip install
--target``, nothing in the venv changes) and runs the tests of the wire, both sides,
against it in a subprocess.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
#: The tests that exercise websockets' protocol objects from both ends.
WIRE_TESTS = [
    "tests/agent/test_connection_frames.py",
    "tests/hub/test_hostile_frames.py",
    "tests/hub/test_agent_channel.py",
    "tests/hub/test_handshake.py",
]


def lowest_allowed(requirement: str) -> str:
    """The lower bound pyproject.toml gives ``requirement`` (``websockets``, ``redis[hiredis]``)."""
    text = (ROOT / "pyproject.toml").read_text()
    found = re.search(rf'"{re.escape(requirement)}>=([\d.]+)', text)
    assert found, f"pyproject.toml names no lower bound for {requirement}"
    return found.group(1)


def run_tests_on(tmp_path: Path, package: str, version: str, tests: list[str]) -> None:
    """Install exactly ``package==version`` beside the suite and run ``tests`` against it."""
    target = tmp_path / "floor"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
         f"{package}=={version}"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert install.returncode == 0, f"cannot install {package}=={version}: {install.stderr}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)])}
    probe = subprocess.run(
        [sys.executable, "-c", f"import importlib.metadata as m; print(m.version({package!r}))"],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    assert Version(probe.stdout.strip()) == Version(version), probe.stdout
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


@pytest.mark.slow
def test_the_wire_tests_pass_on_the_lowest_websockets_allowed(tmp_path: Path) -> None:
    run_tests_on(tmp_path, "websockets", lowest_allowed("websockets"), WIRE_TESTS)


#: The tests of the Redis store: it drives redis-py's asyncio connection directly (its own
#: writer connection, cancellation on timeouts). Below 5.2.1 a cancelled read could hang.
REDIS_TESTS = ["tests/hub/test_store_redis.py", "tests/hub/test_store_conformance.py"]


@pytest.mark.slow
def test_the_redis_store_passes_on_the_lowest_redis_py_allowed(tmp_path: Path) -> None:
    run_tests_on(tmp_path, "redis", lowest_allowed("redis[hiredis]"), REDIS_TESTS)
