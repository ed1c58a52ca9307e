"""The Prometheus series come from the counter registry: every definition with a
Prometheus name is one family, of its kind's type, with the value STAT shows."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from geventpop3.core.counters import COUNTER, GAUGE, REGISTRY, Definition
from geventpop3.core.metrics import Metrics
from geventpop3.service.prometheus import PrometheusCollector

PARKED = Definition("parked_sessions", GAUGE, "Parked sessions", "geventpop3_parked_sessions",
                    "POP3 sessions waiting for input without a greenlet")
STLS = Definition("stls_upgrades", COUNTER, "STLS upgrades", "geventpop3_stls_upgrades",
                  "POP3 connections upgraded to TLS by STLS", persisted=True)


def families(metrics: Metrics) -> dict[str, Metric]:
    return {family.name: family for family in PrometheusCollector(metrics).collect()}


def with_certificate(registry: tuple[Definition, ...] = REGISTRY) -> Metrics:
    metrics = Metrics(registry)
    metrics.tls_seconds_left = lambda: 3600.0
    metrics.logins_ok = 3
    metrics.transformer_seconds = 0.25
    return metrics


def test_every_definition_with_a_name_is_one_family_of_its_type_help_and_value() -> None:
    metrics = with_certificate()
    found = families(metrics)
    named = [d for d in REGISTRY if d.prometheus is not None]
    assert set(found) == {d.prometheus for d in named}
    for d in named:
        family = found[d.prometheus]  # type: ignore[index]
        assert family.type == ("counter" if d.kind is COUNTER else "gauge"), d.attribute
        assert family.documentation == d.help and d.help, d.attribute
        [sample] = family.samples
        value = metrics.value(d)
        assert value is not None
        if d.attribute == "uptime":  # read a moment after the scrape
            assert 0 <= sample.value <= value
        else:
            assert sample.value == value, d.attribute
        assert sample.name == d.prometheus + ("_total" if d.kind is COUNTER else ""), d.attribute
    assert found["geventpop3_logins_ok"].samples[0].value == 3
    assert found["geventpop3_transformer_seconds"].samples[0].value == 0.25
    assert found["geventpop3_tls_certificate_expiry_seconds"].samples[0].value == 3600.0


def test_counters_come_first_then_gauges_each_in_registry_order() -> None:
    names = list(families(with_certificate()))
    counters = [d.prometheus for d in REGISTRY if d.prometheus and d.kind is COUNTER]
    gauges = [d.prometheus for d in REGISTRY if d.prometheus and d.kind is not COUNTER]
    assert names == counters + gauges


def test_no_certificate_no_expiry_series() -> None:
    assert "geventpop3_tls_certificate_expiry_seconds" not in families(Metrics())


def test_one_definition_adds_the_series() -> None:
    metrics = with_certificate((*REGISTRY, PARKED, STLS))
    metrics.parked_sessions = 4
    metrics.stls_upgrades += 2
    registry = CollectorRegistry()
    registry.register(PrometheusCollector(metrics))
    text = generate_latest(registry).decode()
    assert "# HELP geventpop3_parked_sessions POP3 sessions waiting for input without a greenlet\n" in text
    assert "# TYPE geventpop3_parked_sessions gauge\ngeventpop3_parked_sessions 4.0\n" in text
    assert "# TYPE geventpop3_stls_upgrades_total counter\ngeventpop3_stls_upgrades_total 2.0\n" in text
