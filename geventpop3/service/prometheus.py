"""The Prometheus endpoint: `Metrics` (geventpop3.core.metrics) in the text format, over gevent's WSGI server."""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from geventpop3.core.metrics import Metrics

if TYPE_CHECKING:  # both are imported only when Prometheus metrics are asked for
    from gevent.pywsgi import WSGIServer
    from prometheus_client.metrics_core import Metric


class PrometheusCollector:
    """Exposes `Metrics` to prometheus-client, reading the same counters MSMP STAT shows."""

    _COUNTERS = (
        ("connections", "total_connections", "POP3 connections accepted"),
        ("bytes_sent", "bytes_sent", "octets sent on POP3"),
        ("bytes_received", "bytes_received", "octets received on POP3"),
        ("logins_ok", "logins_ok", "successful POP3 logins"),
        ("logins_failed", "logins_failed", "failed POP3 logins"),
        ("messages_retrieved", "messages_retrieved", "messages sent by RETR"),
        ("messages_deleted", "messages_deleted", "messages removed in UPDATE"),
        ("transformer_runs", "transformer_runs", "filter runs"),
        ("transformer_failures", "transformer_failures", "filter runs that failed"),
        ("transformer_timeouts", "transformer_timeouts", "filter runs killed after the timeout"),
        ("transformer_cache_hits", "transformer_cache_hits", "filtered messages served from the cache"),
        ("transformer_seconds", "transformer_seconds", "seconds spent running filters"),
        ("connections_refused_per_ip", "refused_per_ip", "POP3 connections refused by max_connections_per_ip"),
        ("connections_refused_proxy", "refused_proxy",
         "POP3 connections closed by proxy_networks (not from a proxy, or no valid PROXY header)"),
        ("logins_refused_user_ip", "refused_user_ip", "POP3 logins refused by max_sessions_per_user_ip"),
        ("login_timeouts", "login_timeouts", "POP3 connections closed at login_timeout"),
        ("admin_connections_refused", "admin_refused", "MSMP connections refused by admin_max_connections"),
        ("admin_login_timeouts", "admin_login_timeouts", "MSMP connections closed at admin_login_timeout"),
        ("auth_penalty_delays", "auth_penalty_delays", "failed-login answers delayed beyond login_failure_delay"),
    )

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        """prometheus-client's collector protocol."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        m = self.metrics
        for name, attribute, doc in self._COUNTERS:
            yield CounterMetricFamily(f"geventpop3_{name}", doc, value=getattr(m, attribute))
        yield GaugeMetricFamily("geventpop3_current_connections", "open POP3 connections", value=m.current_connections)
        yield GaugeMetricFamily("geventpop3_max_concurrent_connections", "most simultaneous POP3 connections",
                                value=m.max_concurrent)
        yield GaugeMetricFamily("geventpop3_penalised_sources", "client sources with recent failed logins",
                                value=m.penalised_sources())
        yield GaugeMetricFamily("geventpop3_uptime_seconds", "seconds since the server started", value=m.uptime())
        if m.tls_seconds_left is not None:
            yield GaugeMetricFamily("geventpop3_tls_certificate_expiry_seconds",
                                    "seconds until the TLS certificate new connections get expires (negative: expired)",
                                    value=m.tls_seconds_left())


def start_prometheus_server(metrics: Metrics, listener: socket.socket, collectors: Sequence[Any] = ()) -> WSGIServer:
    """Serve the OpenMetrics/Prometheus text format on http://<listener>/metrics; `collectors`
    add series (the cluster's per-worker ones)."""
    from gevent.pywsgi import WSGIServer
    from prometheus_client import CollectorRegistry, make_wsgi_app

    registry = CollectorRegistry(auto_describe=True)
    registry.register(PrometheusCollector(metrics))
    for collector in collectors:
        registry.register(collector)
    server = WSGIServer(listener, make_wsgi_app(registry), log=None)
    server.start()
    return server
