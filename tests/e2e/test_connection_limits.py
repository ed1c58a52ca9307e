"""Connection limits on the real server process: set in the TOML file, changed with
MSMP SET, refusals counted in MSMP STAT and Prometheus (127.0.0.1, 127.0.0.2 and ::1
are three client addresses on loopback)."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable

import pytest
from helpers import LineClient, ServerProcess, accepts, admin, counters, free_port, ipv6_loopback, wait_until

PER_SOURCE = b"-ERR [SYS/TEMP] Too many connections from your address, try again later\r\n"


def refused(server: ServerProcess, source: str | None = None, host: str = "127.0.0.1") -> bytes:
    """What a connection gets before the server closes it (it must close it)."""
    client = LineClient(server.port, host, greet=False, source=source)
    try:
        return client.read_until_closed(timeout=5, reset_ok=True)
    finally:
        client.close()


def test_per_address_cap_from_the_file_changed_by_set_and_counted(
        start_server: Callable[..., ServerProcess]) -> None:
    metrics_port = free_port()
    server = start_server(config="max_connections_per_ip = 2\n", extra_args=["--metrics-port", str(metrics_port)])
    held = [LineClient(server.port) for _ in range(2)]
    assert refused(server) == PER_SOURCE
    held.append(LineClient(server.port, source="127.0.0.2"))  # another address: its own count
    if ipv6_loopback():
        held.append(LineClient(server.port, "::1"))
    assert all(client.greeting.startswith(b"+OK") for client in held)
    with admin(server) as client:
        assert client.get("max_connections_per_ip") == "2"
        assert counters(client)["Connections refused per IP"] == 1
        client.set("max_connections_per_ip", "3")
    held.append(LineClient(server.port))  # a new connection sees the new value
    assert held[-1].greeting.startswith(b"+OK")
    wait_until(lambda: accepts("127.0.0.1", metrics_port))
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        body = response.read().decode()
    assert "geventpop3_connections_refused_per_ip_total 1.0" in body
    for client in held:
        client.close()


@pytest.mark.slow
def test_login_timeout_from_the_file_ends_a_trickling_client(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(config="login_timeout = 1\nidle_timeout = 30\n")
    client = LineClient(server.port)
    client.sock.settimeout(0.1)
    start = time.monotonic()
    received = b""
    while time.monotonic() - start < 5:
        try:
            client.send(b"U")  # one octet every 0.1 s (the recv timeout is the pace): never idle
            data = client.sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            break
        if not data:
            break
        received += data
    seconds = time.monotonic() - start
    assert received == b"-ERR Login timeout, closing connection\r\n", received
    assert seconds <= 2.0, seconds
    with admin(server) as session:
        assert session.get("login_timeout") == "1"
        assert counters(session)["Login timeouts"] == 1
