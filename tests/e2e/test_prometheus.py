"""The Prometheus endpoint of the real server process: off by default, on loopback when
enabled, the same numbers as MSMP STAT, in both text formats prometheus-client serves.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import ServerProcess, accepts, admin, counters, free_port, login_error, pop3, quiet_stat, retr, wait_until
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus

OPENMETRICS = "application/openmetrics-text"

# STAT line -> the sample the endpoint exposes for it.
SAME_AS_STAT = {
    "Total connections": "geventpop3_connections_total",
    "Current connections": "geventpop3_current_connections",
    "Historical maximum traffic": "geventpop3_max_concurrent_connections",
    "Bytes sent": "geventpop3_bytes_sent_total",
    "Bytes received": "geventpop3_bytes_received_total",
    "Logins ok": "geventpop3_logins_ok_total",
    "Logins failed": "geventpop3_logins_failed_total",
    "Messages retrieved": "geventpop3_messages_retrieved_total",
    "Messages deleted": "geventpop3_messages_deleted_total",
    "Transformer runs": "geventpop3_transformer_runs_total",
    "Transformer failures": "geventpop3_transformer_failures_total",
}


def url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics"


def fetch(host: str, port: int, accept: str | None = None) -> tuple[str, str]:
    """(content type, body) of GET /metrics."""
    request = urllib.request.Request(url(host, port), headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        return response.headers["Content-Type"], response.read().decode()


def samples(body: str, openmetrics: bool = False) -> dict[str, float]:
    parse = parse_openmetrics if openmetrics else parse_prometheus
    return {sample.name: sample.value for family in parse(body) for sample in family.samples
            if not sample.name.endswith("_created")}


def scrape(host: str, port: int) -> dict[str, float]:
    return samples(fetch(host, port)[1])


@pytest.fixture
def metrics_server(start_server: Callable[..., ServerProcess]) -> tuple[ServerProcess, int]:
    port = free_port()
    server = start_server(extra_args=["--metrics-port", str(port)])
    wait_until(lambda: accepts("127.0.0.1", port))
    return server, port


def test_metrics_in_prometheus_text(metrics_server: tuple[ServerProcess, int]) -> None:
    _, port = metrics_server
    content_type, body = fetch("127.0.0.1", port)
    assert content_type.startswith("text/plain"), content_type
    assert "# TYPE geventpop3_connections_total counter" in body
    found = samples(body)
    for name in SAME_AS_STAT.values():
        assert name in found, name
    assert found["geventpop3_uptime_seconds"] >= 0


def test_openmetrics_when_asked_for(metrics_server: tuple[ServerProcess, int]) -> None:
    _, port = metrics_server
    content_type, body = fetch("127.0.0.1", port, accept=OPENMETRICS)
    assert content_type.startswith(OPENMETRICS), content_type
    assert body.endswith("# EOF\n")
    assert "# TYPE geventpop3_connections counter" in body
    assert samples(body, openmetrics=True).keys() >= set(SAME_AS_STAT.values())


def test_counters_rise_and_equal_msmp_stat(metrics_server: tuple[ServerProcess, int]) -> None:
    server, port = metrics_server
    server.deliver("alice", b"Subject: 1\n\none\n")
    server.deliver("alice", b"Subject: 2\n\ntwo\n")
    with admin(server) as client:
        quiet_stat(client)
        before = scrape("127.0.0.1", port)
        session = pop3(server, "alice", "alicepw", "::1")
        retr(session, 1)
        session.dele(2)
        session.quit()
        login_error(server, "bob", "wrong")
        stat = quiet_stat(client)
        after = scrape("127.0.0.1", port)
        again = counters(client)
        assert {k: v for k, v in again.items() if k != "Uptime seconds"} == \
            {k: v for k, v in stat.items() if k != "Uptime seconds"}  # nothing moved during the scrape
    for name in ("connections", "logins_ok", "logins_failed", "messages_retrieved", "messages_deleted"):
        sample = f"geventpop3_{name}_total"
        assert after[sample] == before[sample] + (2 if name == "connections" else 1), sample
    assert after["geventpop3_bytes_sent_total"] > before["geventpop3_bytes_sent_total"]
    for line, sample in SAME_AS_STAT.items():
        assert after[sample] == stat[line], (line, sample)
    assert after["geventpop3_bytes_sent_total"] + after["geventpop3_bytes_received_total"] == \
        stat["Total transferred bytes"]


def test_default_address_is_ipv4_loopback_only(metrics_server: tuple[ServerProcess, int]) -> None:
    _, port = metrics_server
    assert accepts("127.0.0.1", port)
    assert not accepts("::1", port)


def test_ipv6_address(start_server: Callable[..., ServerProcess]) -> None:
    port = free_port()
    start_server(extra_args=["--metrics-address", "::1", "--metrics-port", str(port)])
    wait_until(lambda: accepts("::1", port))
    assert "geventpop3_connections_total" in scrape("::1", port)


def test_port_from_the_config_file(start_server: Callable[..., ServerProcess]) -> None:
    port = free_port()
    start_server(config=f"metrics_port = {port}\n")
    wait_until(lambda: accepts("127.0.0.1", port))
    assert "geventpop3_logins_ok_total" in scrape("127.0.0.1", port)


def test_unknown_path_is_not_an_error_page_with_a_traceback(metrics_server: tuple[ServerProcess, int]) -> None:
    server, port = metrics_server
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/nothing-here", timeout=10) as response:
            assert response.status in (200, 404)
    except urllib.error.HTTPError as exc:
        assert exc.code == 404
    assert "Traceback" not in server.log()


def listening_ports(pid: int) -> set[int]:
    """TCP ports the process listens on, from /proc (Linux)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_off_by_default(server: ServerProcess) -> None:
    assert server.process is not None
    with admin(server):
        pass  # every listener is up
    assert listening_ports(server.process.pid) == {server.port, server.admin_port}
    assert "prometheus" not in server.log().lower()
