"""Worker reports and the supervisor's sums come from the counter registry: every
reported definition travels in a report and combines by its kind."""

from __future__ import annotations

import json

from geventpop3.auth.users import UserDirectory
from geventpop3.core.counters import COUNTER, GAUGE, MAX, REGISTRY, Definition
from geventpop3.core.metrics import Metrics
from geventpop3.process.aggregate import Totals, report
from geventpop3.process.channel import encode
from geventpop3.service.context import ServerContext
from geventpop3.service.setting_checks import checked_settings

PARKED = Definition("parked_sessions", GAUGE, "Parked sessions", "geventpop3_parked_sessions",
                    "POP3 sessions waiting for input without a greenlet")
STLS = Definition("stls_upgrades", COUNTER, "STLS upgrades", "geventpop3_stls_upgrades",
                  "POP3 connections upgraded to TLS by STLS", persisted=True)
EXTENDED = (*REGISTRY, PARKED, STLS)


def context(registry: tuple[Definition, ...] = REGISTRY) -> ServerContext:
    return ServerContext(settings=checked_settings(), users=UserDirectory(), metrics=Metrics(registry))


def test_a_report_carries_every_reported_definition_and_only_those() -> None:
    worker = context()
    worker.metrics.tls_seconds_left = lambda: 1.0
    counters = json.loads(encode(report(worker, {})))["counters"]  # as the channel carries it
    assert set(counters) == {d.attribute for d in REGISTRY if d.reported}
    assert {"uptime", "tls_seconds_left", "transferred_bytes"}.isdisjoint(counters)  # the supervisor's own


def test_every_reported_definition_reaches_the_supervisor_by_its_kind() -> None:
    supervisor, worker = context(), context()
    totals = Totals(supervisor, 1)
    for d in REGISTRY:
        if d.reported and not d.reader:
            setattr(worker.metrics, d.attribute, 5)
    worker.metrics.penalised_sources = lambda: 2
    worker.metrics.transformer_seconds = 0.5
    totals.add(totals.workers[0], json.loads(encode(report(worker, {}))))
    m = supervisor.metrics
    for d in REGISTRY:
        if d.reported:
            expected = {"penalised_sources": 2, "transformer_seconds": 0.5}.get(d.attribute, 5)
            assert m.value(d) == expected, d.attribute
    assert worker.metrics.max_concurrent == 5  # its peak was sent: from its current connections again


def test_a_supervisor_reader_adds_the_workers_to_its_own() -> None:
    supervisor, worker = context(), context()
    supervisor.metrics.penalised_sources = lambda: 1  # its MSMP login failures
    totals = Totals(supervisor, 2)
    worker.metrics.penalised_sources = lambda: 3
    totals.add(totals.workers[0], report(worker, {}))
    totals.add(totals.workers[1], report(worker, {}))
    assert supervisor.metrics.penalised_sources() == 7
    totals.forget(totals.workers[1])
    assert supervisor.metrics.penalised_sources() == 4


def test_one_definition_is_reported_and_combined_by_its_kind() -> None:
    supervisor, first, second = context(EXTENDED), context(EXTENDED), context(EXTENDED)
    supervisor.metrics.restore({"stls_upgrades": 10})
    totals = Totals(supervisor, 2)
    sent: dict[str, int] = {}
    first.metrics.stls_upgrades += 2
    first.metrics.parked_sessions = 3
    second.metrics.parked_sessions = 4
    totals.add(totals.workers[0], report(first, sent))
    totals.add(totals.workers[1], report(second, {}))
    first.metrics.stls_upgrades += 1
    totals.add(totals.workers[0], report(first, sent))
    assert supervisor.metrics.stls_upgrades == 13  # the restored total goes on
    assert supervisor.metrics.parked_sessions == 7
    totals.forget(totals.workers[1])
    assert supervisor.metrics.parked_sessions == 3 and supervisor.metrics.stls_upgrades == 13
    assert "Parked sessions: 3" in supervisor.metrics.stat_lines()
    assert supervisor.metrics.snapshot()["stls_upgrades"] == 13


def test_a_new_max_follows_the_sum_of_its_gauge() -> None:
    most = Definition("most_parked", MAX, "Most parked", "geventpop3_most_parked", "most parked", of="parked_sessions")
    registry = (*EXTENDED, most)
    supervisor, first, second = context(registry), context(registry), context(registry)
    totals = Totals(supervisor, 2)
    first.metrics.parked_sessions = 2
    totals.add(totals.workers[0], report(first, {}))
    second.metrics.most_parked = 6  # a burst between two reports, over now
    totals.add(totals.workers[1], report(second, {}))
    assert supervisor.metrics.parked_sessions == 2
    assert supervisor.metrics.most_parked == 8
    assert second.metrics.most_parked == 0
