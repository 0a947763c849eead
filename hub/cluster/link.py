"""The hub's connection to Redis: every call bounded, its health known, a data loss noticed.

Why a link of its own: a hub must never hang on Redis. Every call here runs under a timeout;
a connection error or a timeout marks Redis unhealthy (readiness answers 503 with the
reason, the hub refuses what it would have to store) and raises
:class:`~hub.store.base.StoreUnavailable`; the next call that succeeds, or the health check
every second, marks it healthy again. Waiting for one of the hub's own connections to Redis
(a burst of registrations makes hundreds of calls at once) is a local queue, never an
outage: calls take a slot before their timeout starts, and the pool's limit is never taken
for Redis failing. A Redis that restarted without its data (no
persistence, or a failover that lost writes) answers without the epoch token the hubs
agreed on: the link tells the runtime, which re-announces what this hub holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from ..store.base import StoreUnavailable
from .keys import Keys

log = logging.getLogger(__name__)

__all__ = ["RedisLink", "describe_redis_error", "persistence_warnings"]

T = TypeVar("T")

#: Failures that mean Redis cannot be reached or cannot serve now (not a bug of ours).
OUTAGES: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    redis_errors.ReadOnlyError,
    TimeoutError,
    OSError,
)

#: Connections of the pool for ordinary calls; :meth:`RedisLink.run` uses at most
#: ``RUN_SLOTS`` of them at once, the rest are for the store's reads and the health check.
POOL_SIZE = 64
RUN_SLOTS = 48
#: What redis-py says when its pool, not Redis, is the limit.
_POOL_LIMITS = frozenset({"Too many connections", "No connection available."})


def pool_limit(exc: BaseException) -> bool:
    """The client's connection pool was full here: Redis itself was never asked."""
    return isinstance(exc, redis_errors.ConnectionError) and str(exc) in _POOL_LIMITS


def describe_redis_error(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


def persistence_warnings(config: dict[str, str]) -> list[str]:
    """What a Redis with these settings may lose in a crash, in words for an operator."""
    warnings = []
    if config.get("appendonly", "no") != "yes":
        saving = config.get("save", "")
        lost = f"everything since the last snapshot (save {saving!r})" if saving else "everything"
        warnings.append(
            f"Redis runs without the append-only file (appendonly no): a Redis crash or "
            f"restart loses {lost} — jobs, commands, credentials and audit of the cluster"
        )
    elif config.get("appendfsync") == "no":
        warnings.append("appendfsync no: a machine crash loses what the OS had not written (~30 s)")
    return warnings


class RedisLink:
    def __init__(
        self,
        url: str,
        keys: Keys,
        timeout: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.keys = keys
        self.timeout = timeout
        self.clock = clock
        common: dict[str, Any] = {
            "socket_connect_timeout": timeout,
            "retry_on_timeout": False,
            "health_check_interval": 0,
        }
        #: For ordinary calls: each bounded by ``timeout``. A caller past the pool's size
        #: waits for a connection (within its own deadline) rather than failing.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=POOL_SIZE, timeout=None, socket_timeout=timeout, **common
        )
        self.client = aioredis.Redis(connection_pool=pool)
        self._slots = asyncio.Semaphore(RUN_SLOTS)
        #: For reads that block on purpose (XREAD BLOCK, pub/sub): their own connections,
        #: so a blocked read never holds a connection an ordinary call waits for.
        self.blocking = aioredis.Redis.from_url(url, socket_timeout=None, **common)
        self.healthy = False
        self.reason = "not connected yet"
        self.down_since: float | None = self.clock()
        #: The epoch token this hub works under (None until the first check).
        self.epoch: str | None = None
        #: What Redis's persistence settings may lose, for the log and /readyz detail.
        self.warnings: list[str] = []
        #: Called when Redis stops answering and when it answers again.
        self.on_down: Callable[[str], None] = lambda reason: None
        self.on_up: Callable[[], None] = lambda: None
        #: Called with (old epoch, new epoch) when Redis came back without its data.
        self.on_data_lost: Callable[[str, str], None] = lambda old, new: None

    async def close(self) -> None:
        for client in (self.client, self.blocking):
            with contextlib.suppress(Exception):  # closing a broken connection may fail
                await client.aclose()

    # -- calls ---------------------------------------------------------------------------

    async def run(self, awaitable: Awaitable[T], timeout: float | None = None) -> T:
        """Await one Redis call (or pipeline) within the timeout; outages raise
        :class:`StoreUnavailable` and mark Redis down. The wait for a free connection comes
        before the timeout: it is this hub's queue, not Redis's answer."""
        try:
            async with self._slots:
                async with asyncio.timeout(self.timeout if timeout is None else timeout):
                    result = await awaitable
        except BaseException as exc:
            if inspect.iscoroutine(awaitable):
                awaitable.close()  # cancelled while waiting for a slot: it never started
            if not isinstance(exc, OUTAGES):
                raise
            if pool_limit(exc):
                raise StoreUnavailable("redis: every connection of this hub is busy") from exc
            self.failed(exc)
            raise StoreUnavailable(f"redis: {describe_redis_error(exc)}") from exc
        self.succeeded()
        return result

    def failed(self, exc: BaseException) -> None:
        reason = f"redis unavailable: {describe_redis_error(exc)}"
        if self.healthy:
            self.healthy = False
            self.down_since = self.clock()
            self.reason = reason
            log.error("%s", reason)
            self.on_down(reason)
        else:
            self.reason = reason

    def succeeded(self) -> None:
        if not self.healthy:
            was_down = self.down_since is not None and self.epoch is not None
            self.healthy = True
            self.down_since = None
            self.reason = ""
            if was_down:
                log.warning("redis answers again")
                self.on_up()

    # -- health --------------------------------------------------------------------------

    async def check(self) -> bool:
        """Ping, and compare the epoch token (called every second, and at start)."""
        try:
            async with asyncio.timeout(self.timeout):
                epoch = await self.client.get(self.keys.epoch)
                if epoch is None:
                    fresh = secrets.token_hex(8)
                    await self.client.set(self.keys.epoch, fresh, nx=True)
                    epoch = await self.client.get(self.keys.epoch)
        except OUTAGES as exc:
            if pool_limit(exc):
                return self.healthy  # busy here: Redis was not asked
            self.failed(exc)
            return False
        token = epoch.decode() if isinstance(epoch, bytes) else str(epoch)
        old, self.epoch = self.epoch, token
        self.succeeded()
        if old is not None and old != token:
            log.critical(
                "redis lost its data (epoch %s became %s): re-announcing this hub's state",
                old,
                token,
            )
            self.on_data_lost(old, token)
        return True

    async def read_persistence(self) -> list[str]:
        """Warnings about Redis's persistence settings (logged loudly at start)."""
        try:
            async with asyncio.timeout(self.timeout):
                raw = await self.client.config_get("appendonly")
                raw |= await self.client.config_get("appendfsync")
                raw |= await self.client.config_get("save")
        except redis_errors.ResponseError as exc:  # CONFIG disabled (managed Redis)
            self.warnings = [f"cannot read Redis's persistence settings: {exc}"]
            return self.warnings
        except OUTAGES as exc:
            self.failed(exc)
            return self.warnings
        config = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()
        }
        self.warnings = persistence_warnings(config)
        for warning in self.warnings:
            log.warning("%s", warning)
        return self.warnings

    async def time_ms(self) -> int:
        """Redis's clock (ms): the one clock every hub shares."""
        seconds, micros = await self.run(self.client.time())
        return int(seconds) * 1000 + int(micros) // 1000
