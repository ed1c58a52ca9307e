"""TLS in-process: an idle logged-in TLS session holds no greenlet, decrypted bytes are
served before parking, and the handshake has a deadline.

The app runs in a greenlet of the test process (monkey-patched like the server) with
real listeners on loopback; clients verify the certificate against the test CA.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest
from helpers import LineClient, TlsFiles, free_port, running_app, start_tls, tls_client, wait_until

from geventpop3.net import tls
from geventpop3.net.transport import RECV_SIZE, TlsTransport, Transport
from geventpop3.process.server import App
from geventpop3.service.pop3.session import Pop3Session


class Waiter:
    """What the transport wakes, as Events."""

    def __init__(self) -> None:
        self.ready = gevent.event.Event()

    def answer_parked(self) -> bool:
        return False  # never answers on the event loop: unparked, then on_ready

    def on_ready(self) -> None:
        self.ready.set()

    def on_timeout(self) -> None:
        raise AssertionError("timed out")


@pytest.fixture
def app(tmp_path: Path, tls_files: TlsFiles) -> Iterator[App]:
    with running_app([
        "-d", str(tmp_path / "mail"), "--no-state", "-p", "0", "-l", "127.0.0.1", "-P", "0", "-L", "127.0.0.1",
        "-u", "alice:alicepw", "--login-failure-delay", "0", *tls_files.server_args(free_port()),
    ]) as running:
        yield running


def ports(app: App) -> tuple[int, int]:
    """(plain POP3 port, POP3S port)."""
    plain, implicit = (server.socket.getsockname()[1] for server in app.pop3_servers)
    return plain, implicit


def only_session(app: App) -> Pop3Session:
    assert app.pop3 is not None
    sessions = wait_until(lambda: list(app.pop3.sessions))
    assert len(sessions) == 1
    return sessions[0]


def assert_parked_without_greenlet(session: Pop3Session) -> None:
    wait_until(lambda: session.greenlet is None and session.transport.parked)
    assert isinstance(session.transport, TlsTransport)


@pytest.mark.parametrize("how", ["implicit", "stls"])
def test_an_idle_logged_in_tls_session_holds_no_greenlet(app: App, tls_files: TlsFiles, how: str) -> None:
    plain_port, implicit_port = ports(app)
    if how == "implicit":
        client = tls_client(implicit_port, tls_files)
    else:
        client = LineClient(plain_port)
        assert client.cmd("STLS") == b"+OK Begin TLS negotiation"
        start_tls(client, tls_files.client_context())
    assert client.login("alice", "alicepw").startswith(b"+OK")
    session = only_session(app)
    assert_parked_without_greenlet(session)
    for _ in range(3):  # woken by TLS records on the descriptor, parked again after each answer
        assert client.cmd("STAT") == b"+OK 0 0"
        assert_parked_without_greenlet(session)
    assert client.cmd("QUIT").startswith(b"+OK")


def test_a_silent_client_is_closed_at_the_handshake_deadline(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tls, "HANDSHAKE_TIMEOUT", 0.3)
    _, implicit_port = ports(app)
    with LineClient(implicit_port, greet=False) as silent:
        assert silent.read_until_closed(timeout=10, reset_ok=True) == b""
    assert app.pop3 is not None
    wait_until(lambda: not app.pop3.sessions)


def test_decrypted_bytes_inside_the_ssl_object_are_served_before_parking(tls_files: TlsFiles) -> None:
    server_context = tls.build_context(str(tls_files.cert), str(tls_files.key))
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    listener.close()
    client_tls = gevent.spawn(tls_files.client_context().wrap_socket, client, server_hostname="127.0.0.1")
    transport = TlsTransport.accept(Transport(accepted), server_context)
    secure_client = client_tls.get(timeout=10)
    try:
        record = b"x" * (RECV_SIZE * 3)  # one TLS record, larger than one read
        secure_client.sendall(record)
        gevent.socket.wait_read(transport.fd, timeout=5)
        first = transport.read()
        assert first == b"x" * RECV_SIZE
        assert transport.tls.pending() > 0  # the rest is decrypted already: the descriptor stays quiet
        waiter = Waiter()
        transport.park(waiter, timeout=30)
        assert waiter.ready.wait(5), "a parked transport with pending bytes was not woken"
        rest = b""
        while (data := transport.read()) is not None:
            rest += data
        assert first + rest == record
    finally:
        transport.close()
        secure_client.close()


def test_a_read_of_a_partial_record_is_nothing_now(tls_files: TlsFiles) -> None:
    """The client's TLS runs on memory BIOs, so the test decides how much of a record the server has."""
    server_context = tls.build_context(str(tls_files.cert), str(tls_files.key))
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    listener.close()
    server_side = gevent.spawn(TlsTransport.accept, Transport(accepted), server_context)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_tls = tls_files.client_context().wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    client.settimeout(5)
    while True:
        try:
            client_tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            client.sendall(outgoing.read())
            incoming.write(client.recv(65536))
    client.sendall(outgoing.read())
    transport = server_side.get(timeout=10)
    try:
        assert transport.read() is None  # nothing sent yet
        client_tls.write(b"NOOP\r\n")
        record = outgoing.read()
        client.sendall(record[:7])  # a record header and a little: not decryptable yet
        gevent.socket.wait_read(transport.fd, timeout=5)
        assert transport.read() is None
        client.sendall(record[7:])
        gevent.socket.wait_read(transport.fd, timeout=5)
        assert transport.read() == b"NOOP\r\n"
        assert transport.read() is None
    finally:
        transport.close()
        client.close()
