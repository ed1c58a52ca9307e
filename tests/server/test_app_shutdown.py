"""Shutdown of the whole app in-process: every session ends, and is logged, before the state closes.

The app runs in a greenlet of the test process (monkey-patched like the server), with
real listeners on loopback and real clients; the shutdown is triggered as SIGTERM
would trigger it.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import gevent.event
import pytest

from geventpop3 import maildir
from geventpop3.app import App
from geventpop3.cli import parse_config


def wait_for(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        gevent.sleep(0.01)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    config = parse_config([
        "-d", str(tmp_path / "mail"), "--state-dir", str(tmp_path / "state"), "-p", "0", "-l", "127.0.0.1",
        "-P", "0", "-L", "127.0.0.1", "-u", "alice:alicepw", "-a", "admin:adminpw", "--login-failure-delay", "0",
    ])
    app = App(config)
    runner = gevent.spawn(app.run)
    wait_for(lambda: app.admin_servers or runner.dead)
    assert not runner.dead, runner.value
    yield app
    app.stopping.set()
    runner.join(15)
    runner.kill()


def port_of(servers: list) -> int:
    return servers[0].socket.getsockname()[1]


def line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def login(app: App, user: str = "alice", password: str = "alicepw") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port_of(app.pop3_servers)), timeout=10)
    assert line(sock).startswith(b"+OK")
    sock.sendall(f"USER {user}\r\nPASS {password}\r\n".encode())
    assert line(sock).startswith(b"+OK")
    assert line(sock).startswith(b"+OK"), "login failed"
    return sock


def test_shutdown_ends_admin_sessions_before_the_state_closes(app: App) -> None:
    admin = socket.create_connection(("127.0.0.1", port_of(app.admin_servers)), timeout=10)
    assert line(admin).startswith(b"+OK")
    admin.sendall(b"USER admin\r\nPASS adminpw\r\n")
    assert line(admin).startswith(b"+OK")
    assert line(admin).startswith(b"+OK")
    app.stopping.set()
    wait_for(lambda: app.store is not None and app.persister is not None and not app.persister.running)
    # The admin session was ended by the shutdown, not left reading a store that is closing.
    admin.settimeout(3)
    assert admin.recv(100) == b""


def test_every_session_is_logged_out_before_shutdown_returns(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    """A session whose greenlet does not die within the grace (here: one stuck streaming a
    message, ignoring the kill for a while) is still closed and logged out by shutdown,
    so its logout entry reaches the store's last flush."""
    assert app.ctx is not None and app.pop3 is not None
    streaming = gevent.event.Event()

    def stubborn_chunks(handle: object, body_lines: int | None = None) -> Iterator[bytes]:
        streaming.set()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                gevent.sleep(0.05)
            except gevent.GreenletExit:
                continue  # a greenlet that does not die in time
        yield b"late\r\n"

    monkeypatch.setattr(maildir, "message_chunks", stubborn_chunks)
    maildir.deliver(maildir.user_maildir(app.ctx.settings.maildir, "alice"), b"Subject: x\n\nbody\n")
    client = login(app)
    client.sendall(b"RETR 1\r\n")
    assert streaming.wait(10)
    app.pop3.shutdown(timeout=0.1)
    assert len(app.pop3) == 0
    logouts = [entry for entry in app.ctx.access_log.pending if entry.event == "logout"]
    assert [(entry.user, entry.ended) for entry in logouts] == [("alice", "shutdown")]
    client.settimeout(5)
    received = b""
    while chunk := client.recv(4096):  # closed by the shutdown: EOF, not a timeout
        received += chunk
    assert b"late" not in received  # the stuck greenlet wrote nothing after its session closed
