"""The parked-answer contract over real sockets: every command and error form that can
reach a parked (logged-in) session is answered on the event loop, while the session stays
parked, and no runner greenlet (nor any greenlet of the session) is entered for it.

The app runs in a greenlet of this process (monkey-patched like the server) with real
loopback listeners; the client is a real socket, plain or TLS (verified against the test
CA). Which greenlets run is watched with greenlet.settrace. The contract itself is written
in geventpop3.core.pop3.connection and checked without sockets in
tests/unit/core/pop3/test_pop3_connection.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import gevent
import greenlet
import pytest
from helpers import LineClient, TlsFiles, free_port, running_app, tls_client, wait_until

from geventpop3.process.server import App
from geventpop3.service.pop3.session import Pop3Session

CONTENTS = [b"Subject: %d\r\n\r\n" % index + b"line\r\n" * (index + 1) for index in range(3)]
SIZES = [len(content) for content in CONTENTS]


@pytest.fixture
def app(tmp_path: Path, tls_files: TlsFiles) -> Iterator[App]:
    new = tmp_path / "mail" / "alice" / "new"
    for sub in ("cur", "new", "tmp"):
        os.makedirs(tmp_path / "mail" / "alice" / sub)
    for index, content in enumerate(CONTENTS):
        (new / f"{1_700_000_000 + index}.M{index}P1.test").write_bytes(content)
    with running_app([
        "-d", str(tmp_path / "mail"), "--no-state", "-p", "0", "-l", "127.0.0.1", "-P", "0", "-L", "127.0.0.1",
        "-u", "alice:alicepw", "--login-failure-delay", "0", *tls_files.server_args(free_port()),
    ]) as running:
        yield running


def parked_client(app: App, tls_files: TlsFiles, how: str) -> tuple[LineClient, Pop3Session]:
    """A logged-in client (plain POP3 or implicit TLS) and its session, parked."""
    plain, implicit = (server.socket.getsockname()[1] for server in app.pop3_servers)
    client = LineClient(plain) if how == "plain" else tls_client(implicit, tls_files)
    assert client.login("alice", "alicepw").startswith(b"+OK Logged in")
    assert app.pop3 is not None
    (session,) = wait_until(lambda: list(app.pop3.sessions))
    wait_until(lambda: session.greenlet is None and session.transport.parked)
    return client, session


class GreenletWatch:
    """Records every switch into a runner of `app` or a greenlet of `session`."""

    def __init__(self, app: App, session: Pop3Session) -> None:
        assert app.pop3 is not None
        self.owners = (app.pop3.runners, session)
        self.entered: list[object] = []

    def __enter__(self) -> GreenletWatch:
        self._previous = greenlet.settrace(self._trace)
        return self

    def __exit__(self, *exc: object) -> None:
        greenlet.settrace(self._previous)

    def _trace(self, event: str, args: tuple[greenlet.greenlet, greenlet.greenlet]) -> None:
        target = args[1]
        run = getattr(target, "_run", None)
        if isinstance(target, gevent.Greenlet) and getattr(run, "__self__", None) in self.owners:
            self.entered.append(run)


def listing(lines: list[bytes]) -> list[bytes]:
    return [b"+OK %d messages" % len(lines), *lines]


# Every command and error form that can reach a parked session, and the lines it answers.
PARKED = [
    (b"NOOP", [b"+OK"]),
    (b"STAT", [b"+OK 3 %d" % sum(SIZES)]),
    (b"LIST", listing([b"%d %d" % (n + 1, size) for n, size in enumerate(SIZES)])),
    (b"LIST 2", [b"+OK 2 %d" % SIZES[1]]),
    (b"UIDL", None),  # three lines of "n uid": checked by shape
    (b"UIDL 1", None),
    (b"DELE 1", [b"+OK Message 1 deleted"]),
    (b"LIST 1", [b"-ERR Message is deleted"]),
    (b"STAT", [b"+OK 2 %d" % sum(SIZES[1:])]),
    (b"RSET", [b"+OK 3 messages"]),
    (b"CAPA", None),
    (b"XYZZY", [b"-ERR Unknown command"]),
    (b"", [b"-ERR Empty command"]),
    (b"LIST 9", [b"-ERR No such message"]),
    (b"UIDL 0", [b"-ERR No such message"]),
    (b"DELE x", [b"-ERR Invalid message number"]),
    (b"RETR 99", [b"-ERR No such message"]),
    (b"STAT 1", [b"-ERR Syntax error"]),
    (b"USER bob", [b"-ERR Already logged in"]),
    (b"x" * 300, [b"-ERR Line too long"]),
]


def read_answer(client: LineClient, line: bytes, expected: list[bytes] | None) -> None:
    first = client.line()
    if expected is not None:
        assert first == expected[0], line
        if len(expected) > 1:
            assert client.body_lines() == expected[1:]
    elif line == b"CAPA":
        assert first == b"+OK Capability list follows"
        assert b"UIDL" in client.body_lines()
    elif line == b"UIDL":
        assert first == b"+OK 3 messages"
        assert [entry.split()[0] for entry in client.body_lines()] == [b"1", b"2", b"3"]
    else:
        assert line == b"UIDL 1" and first.startswith(b"+OK 1 ") and len(first.split()) == 3


@pytest.mark.parametrize("how", ["plain", "tls"])
def test_each_command_is_answered_while_the_session_stays_parked(app: App, tls_files: TlsFiles, how: str) -> None:
    client, session = parked_client(app, tls_files, how)
    with GreenletWatch(app, session) as watch:
        for line, expected in PARKED:
            client.send(line + b"\r\n")
            read_answer(client, line, expected)
            assert session.transport.parked and session.greenlet is None, line
            assert watch.entered == [], line
    assert watch.entered == []
    assert client.cmd("QUIT") == b"+OK Bye, 0 messages deleted"


@pytest.mark.parametrize("how", ["plain", "tls"])
def test_pipelined_commands_are_answered_in_order_while_parked(app: App, tls_files: TlsFiles, how: str) -> None:
    client, session = parked_client(app, tls_files, how)
    with GreenletWatch(app, session) as watch:
        client.send(b"".join(line + b"\r\n" for line, _ in PARKED))
        for line, expected in PARKED:
            read_answer(client, line, expected)
        assert session.transport.parked and session.greenlet is None
    assert watch.entered == []


@pytest.mark.parametrize("how", ["plain", "tls"])
def test_an_over_long_line_in_pieces_is_answered_once_while_parked(app: App, tls_files: TlsFiles, how: str) -> None:
    client, session = parked_client(app, tls_files, how)
    with GreenletWatch(app, session) as watch:
        client.send(b"NOOP " + b"y" * 400)  # no line end yet: over the limit already, said at once
        assert client.line() == b"-ERR Line too long"
        # The same line goes on: dropped, no answer. (Sent in pieces smaller than one read: a
        # TLS record longer than that leaves decrypted bytes behind, which a runner takes.)
        for _ in range(3):
            client.send(b"y" * 3000)
        client.send(b"yyy\r\nSTAT\r\n")
        assert client.line() == b"+OK 3 %d" % sum(SIZES)
        assert session.transport.parked and session.greenlet is None
    assert watch.entered == []


@pytest.mark.parametrize("how", ["plain", "tls"])
def test_the_watch_sees_what_goes_to_a_runner(app: App, tls_files: TlsFiles, how: str) -> None:
    """What needs the disk (RETR) is not answered on the loop: the watch above can fail."""
    client, session = parked_client(app, tls_files, how)
    with GreenletWatch(app, session) as watch:
        assert client.retr(1) == CONTENTS[0]
    assert watch.entered != []
    wait_until(lambda: session.greenlet is None and session.transport.parked)
