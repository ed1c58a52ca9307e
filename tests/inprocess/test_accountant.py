"""A worker's accounting over a real channel (geventpop3.process.accountant): the supervisor's
answers, the ends told in one message before the next question, and deciding alone when the
supervisor does not answer."""

from __future__ import annotations

import gevent

from geventpop3.core.accounting import ADMITTED, MAX_CONNECTIONS_PER_IP, LocalAccounting
from geventpop3.core.penalty import Penalty
from geventpop3.core.settings import Settings
from geventpop3.process import accountant, messages
from geventpop3.process.accountant import RemoteAccounting
from geventpop3.process.channel import Channel, socketpair
from geventpop3.process.messages import Answer, Ask, Tell


def accounting(**values: object) -> LocalAccounting:
    settings = Settings()
    for key, value in {"login_failure_delay": 1, "auth_penalty_max": 8, **values}.items():
        settings.apply(key, value, "test")
    return LocalAccounting(settings, Penalty(settings))


def test_the_worker_asks_the_supervisor_and_tells_its_ends_before_the_next_question() -> None:
    worker_end, supervisor_end = socketpair()
    worker, supervisor = Channel(worker_end), Channel(supervisor_end)
    worker.start()
    supervisor.start()
    shared = accounting(max_connections_per_ip=1)
    seen: list[str] = []

    def serve() -> None:  # the supervisor's side, as WorkerPool does it
        for received in messages.decoded(supervisor.messages(), "worker 0"):
            message = received.message
            seen.append(message.OP)
            if isinstance(message, Ask):
                supervisor.send(messages.encode(accountant.answer(shared, message, 0)))
            elif isinstance(message, Tell):
                accountant.told(shared, message, 0)

    def read() -> None:  # the worker's reader
        for received in messages.decoded(worker.messages(), "supervisor"):
            assert isinstance(received.message, Answer)
            remote.answered(received.message)

    remote = RemoteAccounting(worker, accounting())
    greenlets = [gevent.spawn(serve), gevent.spawn(read)]
    try:
        assert remote.connect("192.0.2.1") == ADMITTED
        assert remote.connect("192.0.2.1") == MAX_CONNECTIONS_PER_IP  # the supervisor's count
        remote.disconnect("192.0.2.1")  # gathered, not sent yet...
        assert remote.connect("192.0.2.1") == ADMITTED  # ...but before this question
        assert seen == ["ask", "ask", "tell", "ask"]
        assert remote.failed("192.0.2.1", "alice") == 1.0
        assert remote.failed("192.0.2.1", "alice") == 2.0
        assert remote.login("alice", "192.0.2.1") == 2  # the failures: the hash queue's order
        remote.login_done("alice", "192.0.2.1", True)  # told within TELL_DELAY
        gevent.sleep(accountant.TELL_DELAY * 10)
        assert shared.penalty.failures("192.0.2.1") == 0 and shared.in_flight == {}
    finally:
        gevent.killall(greenlets)
        worker.close()
        supervisor.close()


def test_a_silent_supervisor_leaves_the_worker_deciding_alone() -> None:
    worker_end, supervisor_end = socketpair()
    worker = Channel(worker_end)
    worker.start()
    local = accounting(max_connections_per_ip=1)
    remote = RemoteAccounting(worker, local, timeout=0.05)
    try:
        assert remote.connect("192.0.2.1") == ADMITTED
        assert remote.login("alice", "192.0.2.1") == 0
        assert remote.failed("192.0.2.1") == 1.0  # the worker's own penalty
        assert remote.pending == {}
    finally:
        worker.close()
        supervisor_end.close()
