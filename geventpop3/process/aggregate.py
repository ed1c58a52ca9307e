"""What the workers report, summed into the supervisor's one `Metrics` and `logged_in`.

A worker counts in its own `Metrics` from zero and reports its absolute counters
(`report()`); the supervisor adds the difference to the last report of the same
worker, so its totals continue those restored from the store, and a worker that dies
loses at most what it counted since its last report. Current connections are the sum
over the live workers; the historical maximum is the maximum of that sum, taken at
each report with the reporting worker's peak since its previous report (so a burst
shorter than the report interval counts too) and the others' current connections.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from geventpop3.core.metrics import PERSISTED_COUNTERS, AccessEntry

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from geventpop3.service.context import ServerContext

# An entry's fields as a tuple (all plain values): dataclasses.astuple deep-copies each, 12 us an entry.
_ENTRY_VALUES = operator.attrgetter(*(item.name for item in dataclasses.fields(AccessEntry)))
# Counters a worker reports (max_concurrent is the supervisor's: the maximum of the sum).
REPORTED = (*(name for name in PERSISTED_COUNTERS if name != "max_concurrent"),
            "auth_penalty_delays", "transformer_seconds")


def report(ctx: ServerContext, sent_logged_in: dict[str, int]) -> dict[str, Any]:
    """A worker's report: its counters, current connections, penalised sources, the
    access-log entries since the last report, and the changes of its logged-in users
    since `sent_logged_in` (updated to what is sent)."""
    metrics = ctx.metrics
    peak, metrics.max_concurrent = metrics.max_concurrent, metrics.current_connections  # a worker's: per report
    changed = {name: count for name, count in ctx.logged_in.items() if sent_logged_in.get(name) != count}
    changed.update((name, 0) for name in sent_logged_in if name not in ctx.logged_in)
    for name, count in changed.items():
        if count:
            sent_logged_in[name] = count
        else:
            sent_logged_in.pop(name, None)
    return {
        "op": "report",
        "counters": {name: getattr(metrics, name) for name in REPORTED},
        "current": metrics.current_connections,
        "peak": peak,
        "penalised": metrics.penalised_sources(),
        "logged_in": changed,
        "entries": [_ENTRY_VALUES(entry) for entry in ctx.access_log.take_pending()],
    }


@dataclass
class WorkerState:
    """The supervisor's view of one worker slot (its pid changes when it is replaced)."""

    index: int
    pid: int = 0
    starts: int = 0
    ready: bool = False
    acked: int = 0  # the last broadcast it applied
    counters: dict[str, float] = field(default_factory=dict)
    current: int = 0
    penalised: int = 0
    logged_in: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """Its STAT lines, `name: number` as every other STAT line (clients parse them alike)."""
        name = f"Worker {self.index}"
        return [f"{name} pid: {self.pid}", f"{name} serving: {int(self.ready)}",
                f"{name} current connections: {self.current}",
                f"{name} connections: {int(self.counters.get('total_connections', 0))}",
                f"{name} starts: {self.starts}"]


class Totals:
    """Sums the workers' reports into the supervisor's context (metrics, logged_in, access log)."""

    def __init__(self, ctx: ServerContext, workers: int) -> None:
        self.ctx = ctx
        self.workers = [WorkerState(index) for index in range(workers)]
        own = ctx.metrics.penalised_sources  # the supervisor's own: MSMP login failures
        ctx.metrics.penalised_sources = lambda: own() + sum(w.penalised for w in self.workers)

    def add(self, worker: WorkerState, message: dict[str, Any]) -> None:
        metrics = self.ctx.metrics
        counters = message.get("counters") or {}
        for name in REPORTED:
            value = counters.get(name, 0)
            if isinstance(value, int | float):
                setattr(metrics, name, getattr(metrics, name) + value - worker.counters.get(name, 0))
                worker.counters[name] = value
        worker.current = int(message.get("current", 0))
        worker.penalised = int(message.get("penalised", 0))
        self._logged_in(worker, message.get("logged_in") or {})
        self._current(int(message.get("peak", 0)) - worker.current)
        entries = message.get("entries") or []
        access_log = self.ctx.access_log
        pending = access_log.pending  # recorded (and bucketed) by the worker already
        for values in entries:
            try:
                pending.append(AccessEntry(*values))
            except TypeError:
                continue
        if len(pending) > access_log.recent_limit * 10:  # no store draining them: bounded, as AccessLog.record
            del pending[: len(pending) - access_log.recent_limit]

    def forget(self, worker: WorkerState) -> None:
        """A worker is gone: its sessions with it; its counters stay in the totals."""
        self._logged_in(worker, {name: 0 for name in worker.logged_in})
        worker.current = worker.penalised = 0
        worker.counters = {}
        worker.ready = False
        worker.acked = 0
        self._current()

    def _current(self, above: int = 0) -> None:
        """Current connections: the sum; its maximum, with `above` more for a reporting worker's peak."""
        metrics = self.ctx.metrics
        metrics.current_connections = sum(w.current for w in self.workers)
        metrics.max_concurrent = max(metrics.max_concurrent, metrics.current_connections + max(0, above))

    def _logged_in(self, worker: WorkerState, changes: dict[str, int]) -> None:
        logged_in = self.ctx.logged_in
        for name, count in changes.items():
            total = logged_in.get(name, 0) - worker.logged_in.get(name, 0) + int(count)
            if count:
                worker.logged_in[name] = int(count)
            else:
                worker.logged_in.pop(name, None)
            if total > 0:
                logged_in[name] = total
            else:
                logged_in.pop(name, None)

    def stat_lines(self) -> list[str]:
        return [f"Workers: {len(self.workers)}", *(line for w in self.workers for line in w.lines())]

    def collect(self) -> Iterator[Metric]:
        """Per-worker series for prometheus-client (the totals are the usual collector's)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        current = GaugeMetricFamily("geventpop3_worker_current_connections", "open POP3 connections of a worker",
                                    labels=["worker"])
        total = CounterMetricFamily("geventpop3_worker_connections", "POP3 connections of the worker's current process",
                                    labels=["worker"])
        starts = CounterMetricFamily("geventpop3_worker_starts", "processes started for a worker slot",
                                     labels=["worker"])
        for w in self.workers:
            label = [str(w.index)]
            current.add_metric(label, w.current)
            total.add_metric(label, w.counters.get("total_connections", 0))
            starts.add_metric(label, w.starts)
        yield from (current, total, starts)
