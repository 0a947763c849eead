"""The audit trail: who did what, from where, stored durably and streamed to admins.

Entries made during one turn of the event loop reach the store together, in one write.
Strings that came from the network are stored as given (they are data, never markup) but
secrets never enter an entry: callers pass credential ids, not tokens.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from .bus import Bus
from .protocol.times import format_time
from .store.base import AuditEntry, Store, StoreUnavailable

log = logging.getLogger(__name__)

__all__ = ["Auditor"]

#: Entries waiting for the store beyond this are dropped (and counted): an audit flood
#: must not grow the hub without bound when the disk cannot keep up.
MAX_PENDING = 100_000
#: Entries the store could not take are tried again after this long, doubling (seconds).
RETRY_FIRST = 0.5
RETRY_MAX = 5.0


class Auditor:
    def __init__(self, store: Store, bus: Bus, hub_id: str) -> None:
        self.store = store
        self.bus = bus
        self.hub_id = hub_id
        self.dropped = 0
        self._pending: list[AuditEntry] = []
        self._scheduled = False
        self._inflight: set[asyncio.Future[None]] = set()
        self._retry_delay = 0.0

    def entry(
        self,
        action: str,
        *,
        actor: str | None = None,
        subject: str | None = None,
        source: str | None = None,
        **detail: Any,
    ) -> AuditEntry:
        """Build an entry (and announce it) without queuing it; for atomic writes."""
        entry = AuditEntry(
            ts=time.time(),
            action=action,
            actor=actor,
            subject=subject,
            source=source,
            detail=detail or None,
            hub_id=self.hub_id,
        )
        if self.bus.wanted("audit"):
            self.bus.publish("audit", "entry", None, entry=self.view(entry))
        return entry

    def record(
        self,
        action: str,
        *,
        actor: str | None = None,
        subject: str | None = None,
        source: str | None = None,
        **detail: Any,
    ) -> None:
        """Queue an entry for the next batched write."""
        if len(self._pending) >= MAX_PENDING:
            self.dropped += 1
            return
        self.queue(self.entry(action, actor=actor, subject=subject, source=source, **detail))

    def queue(self, entry: AuditEntry) -> None:
        """Queue an entry built with :meth:`entry` that no other write took after all."""
        if len(self._pending) >= MAX_PENDING:
            self.dropped += 1
            return
        self._pending.append(entry)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        entries, self._pending = self._pending, []
        if not entries:
            return
        future = asyncio.ensure_future(self.store.audit(entries))
        self._inflight.add(future)
        future.add_done_callback(lambda f: self._done(f, entries))

    def _done(self, future: asyncio.Future[None], entries: list[AuditEntry]) -> None:
        self._inflight.discard(future)
        if future.cancelled():
            return
        failure = future.exception()
        if failure is None:
            self._retry_delay = 0.0
            return
        if not isinstance(failure, StoreUnavailable):
            log.error("audit write failed: %s", failure)
            return
        # The store cannot take them now (a full disk): kept, ahead of newer entries, and
        # tried again later; logged when a run of failures starts, not at every try.
        if self._retry_delay == 0.0:
            log.error("audit write failed, %d entries kept to retry: %s", len(entries), failure)
        room = MAX_PENDING - len(self._pending)
        if len(entries) > room:
            self.dropped += len(entries) - max(room, 0)
            entries = entries[: max(room, 0)]
        self._pending[:0] = entries
        self._retry_delay = min(RETRY_MAX, max(RETRY_FIRST, self._retry_delay * 2))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(self._retry_delay, self._flush)

    async def drain(self) -> None:
        """Wait for every queued entry to be stored."""
        self._flush()
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)

    def view(self, entry: AuditEntry) -> dict[str, Any]:
        return {
            "time": format_time(entry.ts),
            "hub_id": entry.hub_id,
            "action": entry.action,
            "actor": entry.actor,
            "subject": entry.subject,
            "source": entry.source,
            "detail": entry.detail,
        }
