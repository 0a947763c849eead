"""A hub is ready again as soon as Redis answers, not at its next periodic store probe.

An outage long enough to be seen by every check a hub makes, then Redis started again: the
deadline runs from the moment Redis answers PING. The hub's link checks Redis every lease
interval (0.25 s here), so "as soon as" is well inside the deadline; a hub that waits for
its every-5-s store probe misses it by seconds.
"""

from __future__ import annotations

from typing import Any

from tests.cluster.test_redis_trouble import _not_ready, _ready
from tests.support import wait_for

#: From Redis answering to /readyz 200: a few lease intervals, with room for a busy machine.
READY_AFTER_REDIS = 2.5


async def test_ready_again_as_soon_as_redis_answers(cluster: Any) -> None:
    (a,) = await cluster(1)
    redis = cluster.state["redis"]
    redis.stop()
    await wait_for(lambda: _not_ready(a.hub.port), timeout=5, what="readyz 503")
    # Every check the hub makes has seen the outage (its store flag too).
    await wait_for(lambda: not a.hub.store_ready, timeout=10, what="the store seen down")
    redis.start()  # returns once Redis answers PING: the deadline runs from here
    await wait_for(
        lambda: _ready(a.hub.port), timeout=READY_AFTER_REDIS, what="ready once redis answers"
    )
    # And the hub works again, not only says so.
    assert await a.token("enroll")
