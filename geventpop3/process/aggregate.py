"""What the workers report, summed into the supervisor's one `Metrics` and `logged_in`.

A worker counts in its own `Metrics` from zero and reports the value of every number
its registry marks reported (geventpop3.core.counters), combined by kind: for a
counter the supervisor adds the difference to the last report of the same worker, so
its totals continue those restored from the store, and a worker that dies loses at
most what it counted since its last report. A gauge is the sum over the live workers
(with a reader, added to the supervisor's own reading: its penalised MSMP sources). A
max is the maximum of its gauge's sum, taken at each report with the reporting
worker's peak since its previous report (so a burst shorter than the report interval
counts too) and the others' current values.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from geventpop3.core.counters import COUNTER, GAUGE, MAX, reported
from geventpop3.core.metrics import AccessEntry, Metrics

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from geventpop3.service.context import ServerContext

# An entry's fields as a tuple (all plain values): dataclasses.astuple deep-copies each, 12 us an entry.
_ENTRY_VALUES = operator.attrgetter(*(item.name for item in dataclasses.fields(AccessEntry)))


def report(ctx: ServerContext, sent_logged_in: dict[str, int]) -> dict[str, Any]:
    """A worker's report: its reported numbers (a max: its peak since the last report),
    the access-log entries since the last report, and the changes of its logged-in users
    since `sent_logged_in` (updated to what is sent)."""
    metrics = ctx.metrics
    definitions = reported(metrics.registry)
    counters = {d.attribute: metrics.value(d) for d in definitions}
    for d in definitions:
        if d.kind is MAX:  # a worker's max is per report: from its gauge now
            setattr(metrics, d.attribute, getattr(metrics, d.of))
    changed = {name: count for name, count in ctx.logged_in.items() if sent_logged_in.get(name) != count}
    changed.update((name, 0) for name in sent_logged_in if name not in ctx.logged_in)
    for name, count in changed.items():
        if count:
            sent_logged_in[name] = count
        else:
            sent_logged_in.pop(name, None)
    return {
        "op": "report",
        "counters": counters,
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
    refreshed: int = 0  # the last Refresh it answered
    counters: dict[str, float] = field(default_factory=dict)  # its last report's
    logged_in: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """Its STAT lines, `name: number` as every other STAT line (clients parse them alike)."""
        name = f"Worker {self.index}"
        return [f"{name} pid: {self.pid}", f"{name} serving: {int(self.ready)}",
                f"{name} current connections: {int(self.counters.get('current_connections', 0))}",
                f"{name} connections: {int(self.counters.get('total_connections', 0))}",
                f"{name} starts: {self.starts}"]


class Totals:
    """Sums the workers' reports into the supervisor's context (metrics, logged_in, access log)."""

    def __init__(self, ctx: ServerContext, workers: int) -> None:
        self.ctx = ctx
        self.workers = [WorkerState(index) for index in range(workers)]
        self.reported = reported(ctx.metrics.registry)
        for d in self.reported:
            if d.reader:  # the supervisor's own reading (MSMP login failures) plus the workers'
                self._add_workers(ctx.metrics, d.attribute)

    def _add_workers(self, metrics: Metrics, attribute: str) -> None:
        own = getattr(metrics, attribute)
        workers = self.workers
        setattr(metrics, attribute, lambda: (own() if own is not None else 0)
                + sum(w.counters.get(attribute, 0) for w in workers))

    def add(self, worker: WorkerState, message: dict[str, Any]) -> None:
        metrics = self.ctx.metrics
        counters = message.get("counters") or {}
        for d in self.reported:
            name = d.attribute
            value = counters.get(name, 0)
            if isinstance(value, int | float):
                if d.kind is COUNTER:
                    setattr(metrics, name, getattr(metrics, name) + value - worker.counters.get(name, 0))
                worker.counters[name] = value
        self._logged_in(worker, message.get("logged_in") or {})
        self._gauges(worker)
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
        worker.counters = {}
        worker.ready = False
        worker.acked = 0
        worker.refreshed = 0
        self._gauges()

    def _gauges(self, reporting: WorkerState | None = None) -> None:
        """Each gauge the sum over the workers; each max the highest that sum has been, with
        the reporting worker's peak above its current value."""
        metrics = self.ctx.metrics
        for d in self.reported:
            if d.kind is GAUGE and not d.reader:
                setattr(metrics, d.attribute, sum(w.counters.get(d.attribute, 0) for w in self.workers))
        for d in self.reported:
            if d.kind is MAX:
                above: float = 0
                if reporting is not None:
                    above = max(0, reporting.counters.get(d.attribute, 0) - reporting.counters.get(d.of, 0))
                setattr(metrics, d.attribute, max(getattr(metrics, d.attribute), getattr(metrics, d.of) + above))

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
            current.add_metric(label, w.counters.get("current_connections", 0))
            total.add_metric(label, w.counters.get("total_connections", 0))
            starts.add_metric(label, w.starts)
        yield from (current, total, starts)
