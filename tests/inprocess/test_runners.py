"""Runners (geventpop3.net.runners): bursts of POP3 sessions served by reused greenlets,
in-process over real loopback sockets; and shutdown still ends busy sessions at once."""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest
from helpers import LineClient, wait_until

from geventpop3.auth import users
from geventpop3.auth.users import UserDirectory
from geventpop3.net import listen
from geventpop3.net.runners import Runners
from geventpop3.service.context import ServerContext
from geventpop3.service.pop3.session import Pop3Server, Pop3Service
from geventpop3.service.setting_checks import checked_settings

CHEAP = (2**8, 8, 1)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[Pop3Service, int]]:
    root = tmp_path / "mail"
    root.mkdir()
    ctx = ServerContext(settings=checked_settings(), users=UserDirectory())
    ctx.users.add_configured([("alice", users.hash_password("alicepw", cost=CHEAP))])
    ctx.settings.apply("maildir", str(root), "test")
    service = Pop3Service(ctx)
    server = Pop3Server(listen.open_listeners(["127.0.0.1"], 0, "POP3")[0], service.handle)
    server.start()
    yield service, server.socket.getsockname()[1]
    server.close()
    service.shutdown(5)


def test_bursts_reuse_idle_runners(service: tuple[Pop3Service, int]) -> None:
    pop3, port = service
    with LineClient(port) as client:  # the greeting ran in a runner, which waits idle now
        wait_until(lambda: len(pop3.runners.idle) == 1)
        runner = pop3.runners.idle[0]
        for _ in range(5):
            client.send(b"NOOP\r\n")
            assert client.line() == b"-ERR Not logged in"
        client.send(b"USER alice\r\nPASS alicepw\r\nSTAT\r\nQUIT\r\n")
        assert client.line() == b"+OK"
        assert client.line().startswith(b"+OK Logged in")
        assert client.line() == b"+OK 0 0"
        assert client.line().startswith(b"+OK Bye")
    wait_until(lambda: not pop3.sessions)
    assert pop3.runners.idle == [runner]  # every burst of the session ran in that one greenlet


def test_an_idle_runner_keeps_nothing_of_its_bursts() -> None:
    runners = Runners()

    class Burst:
        def __call__(self) -> None:
            pass

    burst = Burst()
    alive = weakref.ref(burst)
    runner = runners.spawn(burst)
    del burst
    wait_until(lambda: runners.idle == [runner])
    assert alive() is None  # neither the Greenlet's arguments nor the loop's locals hold it
    runners.close()


def test_idle_runners_are_bounded() -> None:
    runners = Runners(keep=2)
    done: list[int] = []
    busy = [runners.spawn(gevent.sleep, 0.05) for _ in range(5)]
    gevent.joinall(busy[2:], timeout=5)  # beyond `keep`, a runner ends after its burst
    wait_until(lambda: len(runners.idle) == 2)
    assert all(runner.dead for runner in busy if runner not in runners.idle)
    again = runners.spawn(done.append, 1)
    assert again in busy
    wait_until(lambda: done == [1])
    runners.close()
    wait_until(lambda: all(runner.dead for runner in busy))


def test_shutdown_ends_a_busy_session_and_its_runner(service: tuple[Pop3Service, int]) -> None:
    pop3, port = service
    pop3.ctx.settings.apply("login_failure_delay", 30.0, "test")  # the burst sleeps in its runner
    with LineClient(port) as client:
        client.send(b"USER alice\r\nPASS wrong\r\n")
        assert client.line() == b"+OK"
        wait_until(lambda: any(session.greenlet is not None for session in pop3.sessions))
        (session,) = pop3.sessions
        runner = session.greenlet
        assert runner is not None
        started = time.monotonic()
        pop3.shutdown(5)
        assert time.monotonic() - started < 2  # the runner ended with its burst: no wait for the timeout
        assert runner.dead and not pop3.sessions
        assert client.readline() == b""
