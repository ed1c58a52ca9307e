"""geventpop3 behind a real HAProxy in TCP mode with `send-proxy-v2` (Debian's haproxy):
the server sees the client's own address, HAProxy's health checks (PROXY LOCAL) are no
sessions, and POP3S works through it with the header read before the handshake."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import (
    LineClient,
    ServerProcess,
    TlsFiles,
    accepts,
    admin,
    counters,
    free_port,
    logs_with,
    start_tls,
    wait_until,
)

from geventpop3.testing.haproxy import haproxy_config, start_haproxy


class HaProxy:
    def __init__(self, directory: Path, port: int, pop3s: int) -> None:
        self.front, self.front_tls = free_port(), free_port()
        config = haproxy_config({self.front: [f"one 127.0.0.1:{port} send-proxy-v2 check check-send-proxy inter 200ms"],
                                 self.front_tls: [f"one 127.0.0.1:{pop3s} send-proxy-v2"]}, ["maxconn 2000"])
        self.process = start_haproxy(directory, config)
        wait_until(lambda: self.process.poll() is None and accepts("127.0.0.1", self.front)
                   and accepts("127.0.0.1", self.front_tls))

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def behind_haproxy(start_server: Callable[..., ServerProcess], tls_files: TlsFiles,
                   tmp_path: Path) -> Iterator[tuple[ServerProcess, HaProxy]]:
    pop3s = free_port()
    config = 'proxy_networks = ["127.0.0.1/32"]\nlog_level = "DEBUG"\nplaintext_auth = "always"\n'
    server = start_server(config=config,
                          extra_args=tls_files.server_args(pop3s))
    wait_until(lambda: accepts("127.0.0.1", pop3s))
    proxy = HaProxy(tmp_path, server.port, pop3s)
    try:
        yield server, proxy
    finally:
        proxy.stop()


def test_the_server_sees_the_client_address_and_checks_are_no_sessions(
        behind_haproxy: tuple[ServerProcess, HaProxy]) -> None:
    server, proxy = behind_haproxy
    with admin(server) as msmp:
        # The fixture's two probes of HAProxy's ports reach the server as two connections,
        # whenever HAProxy gets to them: wait for both, then count.
        before = wait_until(lambda: (stat := counters(msmp))["Current connections"] == 0
                            and stat["Total connections"] == 2 and stat)
        checks = server.log().count("PROXY LOCAL")
        wait_until(lambda: server.log().count("PROXY LOCAL") >= checks + 2)  # more of HAProxy's checks
        assert counters(msmp)["Total connections"] == before["Total connections"]
        client = LineClient(proxy.front, source="127.0.0.5")
        assert client.greeting.startswith(b"+OK")
        assert client.login("alice", "alicepw").startswith(b"+OK")
        assert client.cmd("QUIT").startswith(b"+OK")
        client.close()
        lines = logs_with(msmp, "alice", "logout")
        assert any("127.0.0.5" in line for line in lines), lines
    assert "rip=127.0.0.5" in server.log()


def test_pop3s_through_haproxy(behind_haproxy: tuple[ServerProcess, HaProxy], tls_files: TlsFiles) -> None:
    server, proxy = behind_haproxy
    client = LineClient(proxy.front_tls, greet=False, source="127.0.0.6")
    start_tls(client, tls_files.client_context())
    assert client.line().startswith(b"+OK")
    assert client.login("bob", "bobpw").startswith(b"+OK")
    client.close()
    wait_until(lambda: "rip=127.0.0.6" in server.log())
