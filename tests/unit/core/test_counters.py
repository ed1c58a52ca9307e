"""The counter registry (geventpop3.core.counters) and the `Metrics` made from it: one
definition gives the attribute, the STAT line and the persisted total."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import geventpop3
from geventpop3.core.counters import COUNTER, GAUGE, MAX, REGISTRY, Definition, persisted
from geventpop3.core.metrics import Metrics

# Extra numbers as a later change would add them: one definition each, nothing else.
PARKED = Definition("parked_sessions", GAUGE, "Parked sessions", "geventpop3_parked_sessions",
                    "POP3 sessions waiting for input without a greenlet")
STLS = Definition("stls_upgrades", COUNTER, "STLS upgrades", "geventpop3_stls_upgrades",
                  "POP3 connections upgraded to TLS by STLS", persisted=True)
EXTENDED = (*REGISTRY, PARKED, STLS)

# The STAT body of msmp.md and the admin client: text and order must not change.
STAT_TODAY = [
    "Total connections: 1", "Current connections: 2", "Historical maximum traffic: 3",
    "Total transferred bytes: 9", "Bytes sent: 4", "Bytes received: 5", "Logins ok: 6", "Logins failed: 7",
    "Messages retrieved: 8", "Messages deleted: 9", "Transformer runs: 10", "Transformer failures: 11",
    "Transformer timeouts: 12", "Transformer cache hits: 13", "Transformer seconds: 1.234",
    "Connections refused per IP: 14", "Connections refused by PROXY rules: 15",
    "Logins refused per user and IP: 16", "Login timeouts: 17", "Admin connections refused: 18",
    "Admin login timeouts: 19", "Penalised sources: 20", "Penalty delays: 21", "Uptime seconds: 100",
    "Certificate expires in days: -1",
]
# Names of the rows in the stores' counters tables: renaming one loses its total.
PERSISTED_TODAY = (
    "total_connections", "max_concurrent", "bytes_sent", "bytes_received", "logins_ok", "logins_failed",
    "messages_retrieved", "messages_deleted", "transformer_runs", "transformer_failures", "transformer_timeouts",
    "transformer_cache_hits", "refused_per_ip", "refused_proxy", "refused_user_ip", "login_timeouts",
    "admin_refused", "admin_login_timeouts",
)


def counted(registry: tuple[Definition, ...] = REGISTRY) -> Metrics:
    """A `Metrics` where every number has a distinct value and every reader one to give."""
    metrics = Metrics(registry)
    metrics.started_at -= 100.9
    metrics.penalised_sources = lambda: 20
    metrics.tls_seconds_left = lambda: -0.5  # expired half a second ago: day -1
    plain = ("total_connections", "current_connections", "max_concurrent", "bytes_sent", "bytes_received",
             "logins_ok", "logins_failed", "messages_retrieved", "messages_deleted", "transformer_runs",
             "transformer_failures", "transformer_timeouts", "transformer_cache_hits", "refused_per_ip",
             "refused_proxy", "refused_user_ip", "login_timeouts", "admin_refused", "admin_login_timeouts")
    for value, name in enumerate(plain, 1):
        setattr(metrics, name, value)
    metrics.auth_penalty_delays = 21
    metrics.transformer_seconds = 1.2344
    return metrics


def test_stat_text_and_order_are_those_clients_parse() -> None:
    assert counted().stat_lines() == STAT_TODAY


def test_the_persisted_totals_keep_their_names() -> None:
    assert persisted(REGISTRY) == PERSISTED_TODAY


def test_attributes_labels_and_series_are_each_used_once() -> None:
    for field in ("attribute", "stat", "prometheus"):
        values = [getattr(d, field) for d in REGISTRY if getattr(d, field) is not None]
        assert len(values) == len(set(values)), field


def test_every_definition_is_an_attribute_of_a_new_metrics() -> None:
    metrics = Metrics()
    for d in REGISTRY:
        value = getattr(metrics, d.attribute)
        if d.reader:
            assert value is None or callable(value), d.attribute
        else:
            assert value == 0 and type(value) is (float if d.decimals else int), d.attribute


def test_every_definition_has_its_stat_line_in_registry_order() -> None:
    labels = [line.split(": ", 1)[0] for line in counted().stat_lines()]
    assert labels == [d.stat for d in REGISTRY]


def test_a_reader_with_nothing_to_show_has_no_line() -> None:
    assert not any(line.startswith("Certificate") for line in Metrics().stat_lines())


def test_a_max_names_its_gauge_and_its_gauge_is_held() -> None:
    attributes = {d.attribute: d for d in REGISTRY}
    for d in REGISTRY:
        if d.kind is MAX:
            assert attributes[d.of].kind is GAUGE and not attributes[d.of].reader, d.attribute


def test_a_definition_that_cannot_work_is_refused() -> None:
    with pytest.raises(ValueError, match="names the gauge"):
        Definition("peak", MAX, "Peak", None)
    with pytest.raises(ValueError, match="names the gauge"):
        Definition("open", GAUGE, "Open", None, of="current_connections")
    with pytest.raises(ValueError, match="cannot be persisted"):
        Definition("age", GAUGE, "Age", None, reader=True, persisted=True)
    with pytest.raises(ValueError, match="is a gauge"):
        Definition("sum", COUNTER, "Sum", None, reader=True)


def test_stat_values_whole_truncated_or_with_decimals() -> None:
    days = Definition("left", GAUGE, "Days", None, stat_unit=86400)
    assert days.stat_line(86400 * 2 - 1) == "Days: 1"
    assert days.stat_line(-1) == "Days: -1"
    assert Definition("up", GAUGE, "Up", None).stat_line(7.99) == "Up: 7"
    assert Definition("s", COUNTER, "S", None, decimals=3).stat_line(0.0005) == "S: 0.001"


def test_snapshot_and_restore_carry_the_persisted_totals_only() -> None:
    saved = counted().snapshot()
    assert tuple(saved) == PERSISTED_TODAY
    restored = Metrics()
    restored.restore({**saved, "current_connections": 5, "auth_penalty_delays": 3, "gone_counter": 1})
    assert restored.snapshot() == saved
    assert restored.current_connections == 0 and restored.auth_penalty_delays == 0
    assert not hasattr(restored, "gone_counter")


def test_one_definition_adds_the_attribute_the_stat_line_and_the_persisted_total() -> None:
    metrics = counted(EXTENDED)
    metrics.parked_sessions += 2
    metrics.stls_upgrades += 1
    assert metrics.stat_lines() == [*STAT_TODAY, "Parked sessions: 2", "STLS upgrades: 1"]
    assert metrics.snapshot() == {**counted().snapshot(), "stls_upgrades": 1}
    again = Metrics(EXTENDED)
    again.restore(metrics.snapshot())
    assert again.stls_upgrades == 1 and again.parked_sessions == 0
    assert not hasattr(Metrics(), "stls_upgrades")


def test_metrics_keeps_numbers_as_plain_instance_attributes() -> None:
    """The hot path's `metrics.x += 1` stays an instance-dict update: no property, slot or
    __getattr__ in the way at run time."""
    metrics = Metrics()
    for d in REGISTRY:
        if not d.reader:
            assert d.attribute in vars(metrics) and not hasattr(Metrics, d.attribute), d.attribute
    assert "__getattr__" not in vars(Metrics) and "__setattr__" not in vars(Metrics)


def test_every_metrics_attribute_the_code_uses_exists() -> None:
    """mypy sees the registered numbers loosely typed (they are set from the registry), so
    this catches a misspelt `metrics.<name>` in the package instead."""
    metrics = Metrics()
    used = set()
    for path in Path(geventpop3.__file__).parent.rglob("*.py"):
        used |= set(re.findall(r"\bmetrics\.([A-Za-z_]\w*)", path.read_text()))
    assert used, "the pattern found no use at all"
    missing = sorted(name for name in used if not hasattr(metrics, name))
    assert missing == []
