"""A worker's accounting (geventpop3.process.accountant) over a real channel and a real
shared table: connections and logins counted in the table without a message, a failure
asked of the supervisor, whose penalty publishes the source's failures for the next
login, a right password told, and deciding alone when the supervisor does not answer."""

from __future__ import annotations

import time
from collections.abc import Callable

import gevent

from geventpop3.core.accounting import ADMITTED, MAX_CONNECTIONS_PER_IP, LocalAccounting
from geventpop3.core.penalty import Penalty
from geventpop3.core.settings import Settings
from geventpop3.process import accountant, messages
from geventpop3.process.accountant import RemoteAccounting
from geventpop3.process.channel import Channel, socketpair
from geventpop3.process.messages import Answer, Ask, Tell
from geventpop3.process.table import AccountingTable


def accounting(**values: object) -> LocalAccounting:
    settings = Settings()
    for key, value in {"login_failure_delay": 1, "auth_penalty_max": 8, **values}.items():
        settings.apply(key, value, "test")
    return LocalAccounting(settings, Penalty(settings))


def test_counts_go_to_the_table_and_failures_to_the_supervisor() -> None:
    worker_end, supervisor_end = socketpair()
    worker, supervisor = Channel(worker_end), Channel(supervisor_end)
    worker.start()
    supervisor.start()
    table = AccountingTable(2, 100, 100)
    shared = accounting()
    shared.penalty.changed = lambda source: table.publish(  # as Supervisor.serve sets it
        source, shared.penalty.failures(source) if source else 0, time.monotonic())
    seen: list[str] = []

    def serve() -> None:  # the supervisor's side, as WorkerPool does it
        for received in messages.decoded(supervisor.messages(), "worker 0"):
            message = received.message
            seen.append(message.OP)
            if isinstance(message, Ask):
                supervisor.send(messages.encode(accountant.answer(shared, message)))
            elif isinstance(message, Tell):
                accountant.told(shared, message)

    def read() -> None:  # the worker's reader
        for received in messages.decoded(worker.messages(), "supervisor"):
            assert isinstance(received.message, Answer)
            remote.answered(received.message)

    local = accounting(max_connections_per_ip=1)
    remote = RemoteAccounting(worker, table, 0, local.settings, local)
    greenlets = [gevent.spawn(serve), gevent.spawn(read)]
    try:
        assert remote.connect("192.0.2.1") == ADMITTED
        assert table.connect("192.0.2.1", 1, local.settings) == MAX_CONNECTIONS_PER_IP  # the other worker
        remote.disconnect("192.0.2.1")
        assert table.connect("192.0.2.1", 1, local.settings) == ADMITTED
        assert remote.login("alice", "192.0.2.1") == 0
        remote.login_done("alice", "192.0.2.1", True)  # no failures: nothing to tell
        assert seen == []  # no message for any of it
        assert remote.failed("192.0.2.1", "alice") == 1.0
        assert remote.failed("192.0.2.1", "alice") == 2.0
        assert remote.login("alice", "192.0.2.1") == 2  # published: the hash queue's order
        remote.login_done("alice", "192.0.2.1", True)  # told: the supervisor forgets them
        _until(lambda: shared.penalty.failures("192.0.2.1") == 0)
        assert seen == ["ask", "ask", "tell"]
        assert remote.login("alice", "192.0.2.1") == 0
    finally:
        gevent.killall(greenlets)
        worker.close()
        supervisor.close()


def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the deadline"
        gevent.sleep(0.001)


def test_a_silent_supervisor_leaves_the_worker_counting_failures_alone() -> None:
    worker_end, supervisor_end = socketpair()
    worker = Channel(worker_end)
    worker.start()
    local = accounting(max_connections_per_ip=1)
    remote = RemoteAccounting(worker, AccountingTable(1, 100, 100), 0, local.settings, local, timeout=0.05)
    try:
        assert remote.connect("192.0.2.1") == ADMITTED
        assert remote.login("alice", "192.0.2.1") == 0
        assert remote.failed("192.0.2.1") == 1.0  # the worker's own penalty
        assert remote.pending == {}
    finally:
        worker.close()
        supervisor_end.close()
