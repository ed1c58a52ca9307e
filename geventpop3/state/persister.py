"""Moves the in-memory state of the hot path into the store, from one background greenlet.

Sessions only append to `context.access_log` and bump `context.metrics`; every
`interval` seconds the persister writes the new access-log entries (one transaction)
and the counters, so a kill -9 loses about a second of counters and nothing else.
A failing store (disk full, read-only, locked) is logged loudly but rarely, the
unsaved entries wait in memory (bounded: the oldest go first) for the next try, and
POP3 service never stops because of it.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import gevent
from gevent.event import Event
from gevent.lock import Semaphore

from geventpop3.core.metrics import AccessEntry
from geventpop3.state import Store, StoreError

if TYPE_CHECKING:
    from geventpop3.service.context import ServerContext

log = logging.getLogger(__name__)


class Persister:
    """The one writer of access-log entries and counters to the store."""

    def __init__(
        self,
        context: ServerContext,
        store: Store,
        interval: float = 1.0,
        prune_interval: float = 300.0,
        max_backlog: int = 100_000,
        error_interval: float = 60.0,
    ) -> None:
        self.context = context
        self.store = store
        self.interval = interval
        self.prune_interval = prune_interval
        self.max_backlog = max_backlog
        self.error_interval = error_interval
        self.dropped = 0  # entries lost because the store failed for too long
        self.failures = 0  # consecutive failed flushes
        self._backlog: list[AccessEntry] = []  # taken from the access log, not yet stored
        self._saved_counters: dict[str, int] | None = None
        self._flushing = Semaphore()
        self._stopping = Event()
        self._greenlet: gevent.Greenlet[[], None] | None = None
        self._pruner: gevent.Greenlet[[], int] | None = None
        self._last_report = float("-inf")
        self._suppressed = 0
        self._stored_total: int | None = None  # an upper bound of the stored entries; None: unknown
        self._prune_soon = False
        context.settings.subscribe(self._on_setting)

    # -- lifetime -------------------------------------------------------------
    def start(self) -> None:
        if self._greenlet is None:
            self._stopping.clear()
            self._greenlet = gevent.spawn(self._run)

    def stop(self, timeout: float | None = 10.0) -> bool:
        """End the background greenlet and persist what is pending; True if all of it was."""
        self._stopping.set()
        if self._greenlet is not None:
            self._greenlet.join(timeout)
            self._greenlet.kill(block=False)
            self._greenlet = None
        if self._pruner is not None:
            self._pruner.kill(block=False)
            self._pruner = None
        return self.flush()

    @property
    def running(self) -> bool:
        return self._greenlet is not None and not self._greenlet.dead

    def _run(self) -> None:
        next_prune = time.monotonic()  # once soon after start: retention may have been lowered
        while not self._stopping.wait(self.interval):
            self.flush()
            due = self._prune_soon or time.monotonic() >= next_prune
            if due and (self._pruner is None or self._pruner.dead):
                self._prune_soon = False
                next_prune = time.monotonic() + self.prune_interval
                self._pruner = gevent.spawn(self.prune)

    def _on_setting(self, key: str, old: object, new: object) -> None:
        """A retention setting changed (MSMP SET): apply it at the next flush, not in 5 minutes."""
        if key.startswith("log_retention_") and old != new:
            self._prune_soon = True

    # -- work -------------------------------------------------------------------
    def flush(self) -> bool:
        """Persist pending entries and changed counters now; True when nothing is left unsaved.

        Never raises: failures are logged (rate-limited) and retried next time."""
        with self._flushing:
            return self._flush_locked()

    def _flush_locked(self) -> bool:
        try:
            self._take()
            if self._backlog:
                self.store.append_access(self._backlog)
                if self._stored_total is not None:
                    self._stored_total += len(self._backlog)
                self._backlog = []
            self._cap_total()
            counters = self.context.metrics.snapshot()
            if counters != self._saved_counters:
                self.store.save_counters(counters)
                self._saved_counters = counters
        except Exception as exc:  # the store must never take POP3 down
            self._failed(exc)
            return False
        if self.failures:
            log.warning("state database %s writable again after %d failed attempts", self.store.location, self.failures)
            self.failures = 0
            self._last_report = float("-inf")
        return True

    def _cap_total(self) -> None:
        """Keep the whole access log within `log_retention_total`, oldest first, after
        every write that may have crossed it (the table is counted only then)."""
        cap = self.context.settings.log_retention_total
        if self._stored_total is None or self._stored_total > cap:
            before = self._stored_total
            self._stored_total = None  # unknown until the trim says
            left = self.store.trim(cap)
            self._stored_total = left
            if before is not None and before > left:
                log.info("access log over log_retention_total=%d: removed the oldest entries", cap)

    def prune(self) -> int:
        """Apply the retention settings; returns the rows removed (0 on failure, logged)."""
        settings = self.context.settings
        try:
            removed = self.store.prune(settings.log_retention_count, settings.log_retention_days,
                                       settings.log_retention_total)
        except Exception as exc:  # logged, retried later
            self._failed(exc)
            return 0
        if removed:
            log.info("pruned %d access-log entries", removed)
        return removed

    def unsaved(self, user: str) -> list[AccessEntry]:
        """Entries of `user` still only in memory, oldest first."""
        return [entry for entry in self._backlog + self.context.access_log.pending if entry.user == user]

    def logs(self, user: str, limit: int) -> list[AccessEntry]:
        """What MSMP LOGS shows: flush, then the last `limit` entries, including any the
        store could not take yet; if the store cannot be read, the in-memory ones."""
        if limit <= 0:
            return []
        with self._flushing:  # no flush in between: an entry is either stored or unsaved
            self._flush_if_healthy()
            try:
                stored = self.store.query_access(user, limit)
            except StoreError as exc:
                self._failed(exc)
                stored = []
            return (stored + self.unsaved(user))[-limit:]

    def log_count(self, user: str) -> int:
        """How many entries `user` has, stored or not (for MSMP LIST), without double counting."""
        with self._flushing:
            self._flush_if_healthy()
            try:
                stored = self.store.access_count(user)
            except StoreError as exc:
                self._failed(exc)
                stored = 0
            return stored + len(self.unsaved(user))

    def _flush_if_healthy(self) -> None:
        """Flush before a query, unless the last flush failed: a failing write costs the
        store's busy timeout, and the background greenlet retries anyway; the query
        then shows stored plus unsaved entries, which is the same answer."""
        if not self.failures:
            self._flush_locked()

    def _take(self) -> None:
        self._backlog.extend(self.context.access_log.take_pending())
        excess = len(self._backlog) - self.max_backlog
        if excess > 0:
            del self._backlog[:excess]
            self.dropped += excess
            log.error("state database unavailable: dropped the %d oldest unsaved access-log entries", excess)

    def _failed(self, exc: Exception) -> None:
        """Log loudly, but at most once per `error_interval` seconds."""
        self.failures += 1
        now = time.monotonic()
        if now - self._last_report < self.error_interval:
            self._suppressed += 1
            return
        self._last_report = now
        extra = f" ({self._suppressed} similar errors suppressed)" if self._suppressed else ""
        self._suppressed = 0
        exc_info = None if isinstance(exc, StoreError) else exc  # a traceback only for bugs
        log.error(
            "state database %s: %s; %d access-log entries kept in memory for retry%s",
            self.store.location,
            exc,
            len(self._backlog),
            extra,
            exc_info=exc_info,
        )
