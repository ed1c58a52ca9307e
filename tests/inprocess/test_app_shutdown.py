"""Shutdown of the whole app in-process: every session ends, and is logged, before the state closes.

The app runs in a greenlet of the test process (monkey-patched like the server), with
real listeners on loopback and real clients; the shutdown is triggered as SIGTERM
would trigger it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import gevent.event
import pytest
from helpers import LineClient, running_app, wait_until

from geventpop3.flags import parse_config
from geventpop3.mail import maildir
from geventpop3.process.server import App


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    with running_app([
        "-d", str(tmp_path / "mail"), "--state-dir", str(tmp_path / "state"), "-p", "0", "-l", "127.0.0.1",
        "-P", "0", "-L", "127.0.0.1", "-u", "alice:alicepw", "-a", "admin:adminpw", "--login-failure-delay", "0",
    ]) as running:
        yield running


def port_of(servers: list) -> int:
    return servers[0].socket.getsockname()[1]




def live_server_greenlets(where: str = "/geventpop3/") -> list[str]:
    """Greenlets still suspended inside geventpop3 code: at interpreter exit each would be
    finalized with GreenletExit and run its cleanup (and logging) too late."""
    import gc

    from greenlet import greenlet

    found = []
    for obj in gc.get_objects():
        if isinstance(obj, greenlet) and not obj.dead and obj.gr_frame is not None:
            frame = obj.gr_frame
            while frame is not None:
                if where in frame.f_code.co_filename:
                    found.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")
                    break
                frame = frame.f_back
    return found


def test_shutdown_ends_admin_sessions_before_the_state_closes(app: App) -> None:
    admin = LineClient(port_of(app.admin_servers))
    assert admin.login("admin", "adminpw").startswith(b"+OK")
    app.stopping.set()
    wait_until(lambda: app.store is not None and app.persister is not None and not app.persister.running)
    # The admin session was ended by the shutdown, not left reading a store that is closing.
    assert admin.read_until_closed(timeout=3, reset_ok=True) == b""


def test_every_session_is_logged_out_before_shutdown_returns(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    """A session whose greenlet does not die within the grace (here: one stuck streaming a
    message, ignoring the kill for a while) is still closed and logged out by shutdown,
    so its logout entry reaches the store's last flush."""
    assert app.ctx is not None and app.pop3 is not None
    streaming = gevent.event.Event()

    def stubborn_chunks(handle: object, body_lines: int | None = None, limit: int | None = None) -> Iterator[bytes]:
        streaming.set()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                gevent.sleep(0.05)
            except gevent.GreenletExit:
                continue  # a greenlet that does not die in time
        yield b"late\r\n"

    monkeypatch.setattr(maildir, "message_chunks", stubborn_chunks)
    monkeypatch.setattr(maildir, "whole_message", lambda handle, limit=None: None)  # streamed, even a small message
    maildir.deliver(maildir.user_maildir(app.ctx.settings.maildir, "alice"), b"Subject: x\n\nbody\n")
    client = LineClient(port_of(app.pop3_servers))
    assert client.login("alice", "alicepw").startswith(b"+OK")
    client.send(b"RETR 1\r\n")
    assert streaming.wait(10)
    app.pop3.shutdown(timeout=0.1)
    assert len(app.pop3) == 0
    logouts = [entry for entry in app.ctx.access_log.pending if entry.event == "logout"]
    assert [(entry.user, entry.ended) for entry in logouts] == [("alice", "shutdown")]
    received = client.read_until_closed(timeout=5)  # closed by the shutdown: EOF, not a timeout
    assert b"late" not in received  # the stuck greenlet wrote nothing after its session closed
    # The stubborn greenlet gives up in the end: nothing of this test leaks into the next ones.
    wait_until(lambda: not live_server_greenlets("/geventpop3/pop3/"))


def test_no_server_greenlet_outlives_the_app(tmp_path: Path) -> None:
    config = parse_config([
        "-d", str(tmp_path / "mail"), "--state-dir", str(tmp_path / "state"), "-p", "0", "-l", "127.0.0.1",
        "-P", "0", "-L", "127.0.0.1", "-u", "alice:alicepw", "-a", "admin:adminpw", "--admin-socket", "none",
    ])
    app = App(config)
    runner = gevent.spawn(app.run)
    wait_until(lambda: app.admin_servers or runner.dead)
    admin = LineClient(port_of(app.admin_servers))
    assert admin.login("admin", "adminpw").startswith(b"+OK")
    pop3 = LineClient(port_of(app.pop3_servers))
    assert pop3.login("alice", "alicepw").startswith(b"+OK")
    pop3.send(b"PASS wrong\r\n")  # a command in progress is fine too
    app.stopping.set()
    assert runner.get(timeout=15) == 0
    assert live_server_greenlets() == []
    admin.close()
    pop3.close()
