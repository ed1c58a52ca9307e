"""A logged-in session answers NOOP-class commands on the event loop and stays parked;
whatever has to wait (RETR, QUIT, a client slow to read) goes on in a greenlet, in order.

The app runs in a greenlet of the test process (monkey-patched like the server), with
real listeners on loopback; every client is a real socket (plain, or TLS verified
against the test CA). Which greenlets run is watched with greenlet.settrace.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import greenlet
import pytest
from helpers import LineClient, TlsFiles, free_port, running_app, tls_client, wait_until

from geventpop3.process.server import App
from geventpop3.service.pop3.session import Pop3Session

IDLE_TIMEOUT = 1.0


@pytest.fixture
def app(tmp_path: Path, tls_files: TlsFiles) -> Iterator[App]:
    with running_app([
        "-d", str(tmp_path / "mail"), "--no-state", "-p", "0", "-l", "127.0.0.1", "-P", "0", "-L", "127.0.0.1",
        "-u", "alice:alicepw", "--login-failure-delay", "0",
        *tls_files.server_args(free_port()),
    ]) as running:
        yield running


def deliver(root: Path, count: int) -> list[bytes]:
    """`count` messages in alice's new/ (sizes differ); their contents, in order."""
    new = root / "mail" / "alice" / "new"
    for sub in ("cur", "new", "tmp"):
        os.makedirs(root / "mail" / "alice" / sub, exist_ok=True)
    contents = []
    for index in range(count):
        content = b"Subject: %d\r\n\r\n" % index + b"line\r\n" * (index % 7 + 1)
        (new / f"{1_700_000_000 + index}.M{index}P1.test").write_bytes(content)
        contents.append(content)
    return contents


def connect(app: App, tls_files: TlsFiles, how: str) -> LineClient:
    """A logged-in client over plain POP3 or implicit TLS."""
    plain, implicit = (server.socket.getsockname()[1] for server in app.pop3_servers)
    client = LineClient(plain) if how == "plain" else tls_client(implicit, tls_files)
    assert client.login("alice", "alicepw").startswith(b"+OK Logged in")
    return client


def only_session(app: App) -> Pop3Session:
    assert app.pop3 is not None
    sessions = wait_until(lambda: list(app.pop3.sessions))
    assert len(sessions) == 1
    return sessions[0]


@pytest.mark.parametrize("how", ["plain", "tls"])
def test_noop_and_stat_are_answered_without_a_greenlet(app: App, tls_files: TlsFiles, how: str) -> None:
    client = connect(app, tls_files, how)
    session = only_session(app)
    wait_until(lambda: session.greenlet is None and session.transport.parked)
    entered: list[object] = []

    def trace(event: str, args: tuple[greenlet.greenlet, greenlet.greenlet]) -> None:
        target = args[1]
        run = getattr(target, "_run", None)
        if isinstance(target, gevent.Greenlet) and getattr(run, "__self__", None) is session:
            entered.append(run)

    previous = greenlet.settrace(trace)
    try:
        for _ in range(20):
            assert client.cmd("NOOP") == b"+OK"
            assert client.cmd("STAT") == b"+OK 0 0"
            assert session.transport.parked and session.greenlet is None
    finally:
        greenlet.settrace(previous)
    assert entered == []
    assert client.cmd("QUIT").startswith(b"+OK")


@pytest.mark.parametrize("how", ["plain", "tls"])
def test_commands_that_wait_go_on_in_order(app: App, tls_files: TlsFiles, tmp_path: Path, how: str) -> None:
    contents = deliver(tmp_path, 3)
    client = connect(app, tls_files, how)
    session = only_session(app)
    wait_until(lambda: session.greenlet is None and session.transport.parked)
    client.send(b"NOOP\r\nSTAT\r\nRETR 1\r\nNOOP\r\nTOP 2 0\r\nDELE 1\r\nLIST\r\nNOOP\r\n")
    assert client.line() == b"+OK"
    assert client.line() == b"+OK 3 %d" % sum(map(len, contents))
    assert client.line().startswith(b"+OK")
    assert client.body() == contents[0]
    assert client.line() == b"+OK"
    assert client.line().startswith(b"+OK")
    assert client.body() == contents[1].split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    assert client.line() == b"+OK Message 1 deleted"
    assert client.line().startswith(b"+OK 2 messages")
    assert client.body_lines() == [b"2 %d" % len(contents[1]), b"3 %d" % len(contents[2])]
    assert client.line() == b"+OK"
    wait_until(lambda: session.greenlet is None and session.transport.parked)  # parked again after RETR
    client.send(b"NOOP\r\nQUIT\r\n")
    assert client.line() == b"+OK"
    assert client.line() == b"+OK Bye, 1 messages deleted"
    assert client.read_until_closed() == b""
    maildir = tmp_path / "mail" / "alice"
    assert len(os.listdir(maildir / "cur")) + len(os.listdir(maildir / "new")) == 2


@pytest.mark.parametrize("how", ["plain", "tls"])
@pytest.mark.slow
def test_a_client_slow_to_read_gets_every_answer(app: App, tls_files: TlsFiles, tmp_path: Path, how: str) -> None:
    """10 MB of pipelined LIST answers the client does not read for a while: more than the
    loop may queue (FLUSH_THRESHOLD) and more than loopback socket buffers take, so the rest
    is sent by a greenlet that waits; every answer arrives, whole and in order. (Shrinking the
    client's SO_RCVBUF after connect made Linux reset the connection on some runs.)"""
    contents = deliver(tmp_path, 500)
    client = connect(app, tls_files, how)
    session = only_session(app)
    wait_until(lambda: session.greenlet is None and session.transport.parked)
    count = 2000
    client.send(b"LIST\r\n" * count + b"NOOP\r\n")
    wait_until(lambda: session.greenlet is not None)  # waiting for the client to read
    listing = [b"%d %d" % (number + 1, len(content)) for number, content in enumerate(contents)]
    for _ in range(count):
        assert client.line() == b"+OK 500 messages"
        assert client.body_lines() == listing
    assert client.line() == b"+OK"
    wait_until(lambda: session.greenlet is None and session.transport.parked)
    assert client.cmd("NOOP") == b"+OK"


@pytest.mark.parametrize("how", ["plain", "tls"])
@pytest.mark.slow
def test_the_idle_timeout_counts_from_the_last_command(app: App, tls_files: TlsFiles, how: str) -> None:
    assert app.ctx is not None
    app.ctx.settings.set("idle_timeout", str(IDLE_TIMEOUT))
    client = connect(app, tls_files, how)
    busy_until = time.monotonic() + 2.5 * IDLE_TIMEOUT
    while time.monotonic() < busy_until:  # answered on the loop: each moves the deadline
        assert client.cmd("NOOP") == b"+OK"
    last = time.monotonic()
    assert client.read_until_closed(timeout=10) == b"-ERR Idle timeout, closing connection\r\n"
    assert time.monotonic() - last >= IDLE_TIMEOUT - 0.05
