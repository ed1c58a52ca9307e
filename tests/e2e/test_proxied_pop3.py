"""PROXY protocol on the real server: with `proxy_networks` set, POP3 connections must come
from a listed proxy and start with a v1 or v2 header; the address in the header is the
client for logs, access logs, limits and the plaintext policy. Here the test plays the
proxy from 127.0.0.1 (a listed network) and a stray client from 127.0.0.2."""

from __future__ import annotations

from collections.abc import Callable

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

from geventpop3.core.proxy_protocol import v1_header, v2_header

PROXIES = 'proxy_networks = ["127.0.0.1/32"]\n'
CLIENT = ("192.0.2.7", 40001)


def proxied(server: ServerProcess, header: bytes, port: int | None = None) -> LineClient:
    """A connection from the 'proxy' (127.0.0.1) that sends `header` first, greeting not read yet."""
    client = LineClient(port or server.port, greet=False)
    client.send(header)
    return client


def closed_without_greeting(client: LineClient) -> bytes:
    try:
        return client.read_until_closed(timeout=10, reset_ok=True)
    finally:
        client.close()


@pytest.mark.parametrize("header", [v1_header(CLIENT, ("127.0.0.1", 110)),
                                    v2_header(CLIENT, ("127.0.0.1", 110))], ids=["v1", "v2"])
def test_the_address_in_the_header_is_the_client(start_server: Callable[..., ServerProcess], header: bytes) -> None:
    server = start_server(config=PROXIES)
    client = proxied(server, header)
    client.greeting = client.line()
    assert client.greeting.startswith(b"+OK")
    assert client.login("alice", "alicepw").startswith(b"+OK")
    assert client.cmd("QUIT").startswith(b"+OK")
    client.close()
    with admin(server) as msmp:
        assert any("192.0.2.7" in line for line in logs_with(msmp, "alice", "logout"))
    wait_until(lambda: "rip=192.0.2.7" in server.log())


def test_a_connection_from_outside_proxy_networks_is_closed_unanswered(
        start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(config=PROXIES)
    stray = LineClient(server.port, greet=False, source="127.0.0.2")
    stray.send(v1_header(CLIENT, ("127.0.0.1", 110)))  # a header does not help from there
    assert closed_without_greeting(stray) == b""
    with admin(server) as msmp:
        assert counters(msmp)["Connections refused by PROXY rules"] >= 1


@pytest.mark.parametrize("first", [b"USER alice\r\n", b"PROXY TCP4 192.0.2.7 nonsense\r\n",
                                   b"\r\n\r\n\x00\r\nQUIT\n\x99"])
@pytest.mark.slow
def test_a_missing_or_bad_header_closes_the_connection(start_server: Callable[..., ServerProcess],
                                                       first: bytes) -> None:
    server = start_server(config=PROXIES)
    assert closed_without_greeting(proxied(server, first)) == b""


@pytest.mark.slow
def test_a_header_that_never_completes_is_cut_at_its_deadline(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(config=PROXIES)
    client = proxied(server, b"PROXY TCP4 ")  # and then nothing: closed after 3 s, not held
    assert closed_without_greeting(client) == b""


def test_local_is_a_health_check_not_a_session(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(config=PROXIES)
    with admin(server) as msmp:
        before = counters(msmp)["Total connections"]
        check = proxied(server, v2_header(None, local=True))
        assert check.read_until_closed(timeout=10).startswith(b"+OK")
        check.close()
        assert counters(msmp)["Total connections"] == before


def test_per_address_limits_count_the_proxied_address(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(config=PROXIES + "max_connections_per_ip = 1\n")
    first = proxied(server, v1_header(("192.0.2.7", 1), ("127.0.0.1", 110)))
    assert first.line().startswith(b"+OK")
    other = proxied(server, v1_header(("192.0.2.8", 1), ("127.0.0.1", 110)))
    assert other.line().startswith(b"+OK")  # another client behind the same proxy
    same = proxied(server, v1_header(("192.0.2.7", 2), ("127.0.0.1", 110)))
    assert same.line().startswith(b"-ERR [SYS/TEMP]")
    for client in (first, other, same):
        client.close()


def test_tls_the_proxy_terminated_counts_as_secure(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(config=PROXIES + 'plaintext_auth = "tls"\n')
    plain = proxied(server, v2_header(CLIENT, ("198.51.100.1", 110)))
    plain.greeting = plain.line()
    assert plain.cmd("USER alice").startswith(b"-ERR")  # a remote client without TLS
    plain.close()
    secure = proxied(server, v2_header(CLIENT, ("198.51.100.1", 995), tls_version="TLSv1.3"))
    secure.greeting = secure.line()
    assert secure.login("alice", "alicepw").startswith(b"+OK")
    secure.close()
    wait_until(lambda: "rip=192.0.2.7 rport=40001 mech=user tls=proxy" in server.log())


def test_pop3s_reads_the_header_before_the_handshake(start_server: Callable[..., ServerProcess],
                                                     tls_files: TlsFiles) -> None:
    pop3s = free_port()
    server = start_server(config=PROXIES, extra_args=tls_files.server_args(pop3s))
    wait_until(lambda: accepts("127.0.0.1", pop3s))
    client = proxied(server, v2_header(CLIENT, ("127.0.0.1", 995)), port=pop3s)
    start_tls(client, tls_files.client_context())
    assert client.line().startswith(b"+OK")
    assert client.login("alice", "alicepw").startswith(b"+OK")
    client.close()

