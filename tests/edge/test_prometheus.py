"""The operators' side: Prometheus rules and the hub's /metrics, checked by promtool itself.

promtool comes with Debian's ``prometheus`` package, which ``scripts/bootstrap.sh`` installs;
without it these tests fail (they never skip).
"""

from __future__ import annotations

import asyncio
import subprocess
import urllib.request

from tests.agent.proxies import need
from tests.conftest import HubHandle
from tests.support import ROOT

RULES = ROOT / "resources" / "prometheus"


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [need("promtool"), *args],
        input=stdin,
        capture_output=True,
        cwd=RULES,
        timeout=60,
        check=False,
    )


def test_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", "tether-rules.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert b"SUCCESS" in result.stdout


def test_rules_fire_as_their_unit_tests_say() -> None:
    result = promtool("test", "rules", "tether-rules.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


async def test_metrics_carry_process_figures_and_pass_promtool(hub: HubHandle) -> None:
    url = f"http://127.0.0.1:{hub.hub.port}/metrics"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
    text = body.decode()
    for family in (
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_cpu_seconds_total",
        "process_start_time_seconds",
        "tether_agents",
    ):
        assert f"\n{family}" in text, family
    result = await asyncio.to_thread(promtool, "check", "metrics", stdin=body)
    # promtool check metrics exits 0 when there are no problems (lint notes go to stdout).
    assert result.returncode == 0, result.stdout + result.stderr
