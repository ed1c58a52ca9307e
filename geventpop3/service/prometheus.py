"""The Prometheus endpoint: `Metrics` (geventpop3.core.metrics) in the text format, over gevent's WSGI server."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from geventpop3.core.counters import COUNTER
from geventpop3.core.metrics import Metrics

if TYPE_CHECKING:  # both are imported only when Prometheus metrics are asked for
    from gevent.pywsgi import WSGIServer
    from prometheus_client.metrics_core import Metric


class PrometheusCollector:
    """Exposes `Metrics` to prometheus-client, reading the same numbers MSMP STAT shows:
    every definition of its registry with a Prometheus name, the counters first."""

    def __init__(self, metrics: Metrics, refresh: Callable[[], None] | None = None) -> None:
        self.metrics = metrics
        self.refresh = refresh  # with workers: their reports as of now, before the numbers are read

    def collect(self) -> Iterator[Metric]:
        """prometheus-client's collector protocol."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        if self.refresh is not None:
            self.refresh()

        m = self.metrics
        counters_first = sorted(m.registry, key=lambda d: d.kind is not COUNTER)  # stable: registry order within
        for definition in counters_first:
            value = m.value(definition)
            if definition.prometheus is None or value is None:
                continue
            family = CounterMetricFamily if definition.kind is COUNTER else GaugeMetricFamily
            yield family(definition.prometheus, definition.help, value=value)


def start_prometheus_server(metrics: Metrics, listener: socket.socket, collectors: Sequence[Any] = (),
                            refresh: Callable[[], None] | None = None) -> WSGIServer:
    """Serve the OpenMetrics/Prometheus text format on http://<listener>/metrics; `collectors`
    add series (the cluster's per-worker ones); `refresh` brings `metrics` up to date first."""
    from gevent.pywsgi import WSGIServer
    from prometheus_client import CollectorRegistry, make_wsgi_app

    registry = CollectorRegistry(auto_describe=True)
    registry.register(PrometheusCollector(metrics, refresh))
    for collector in collectors:
        registry.register(collector)
    server = WSGIServer(listener, make_wsgi_app(registry), log=None)
    server.start()
    return server
