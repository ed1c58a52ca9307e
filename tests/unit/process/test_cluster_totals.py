"""The supervisor's sums of worker reports (geventpop3.process.aggregate), on real contexts."""

from __future__ import annotations

import json

from geventpop3.auth.users import UserDirectory
from geventpop3.core.metrics import AccessEntry
from geventpop3.process.aggregate import Totals, report
from geventpop3.process.channel import encode
from geventpop3.service.context import ServerContext
from geventpop3.service.setting_checks import checked_settings


def context() -> ServerContext:
    return ServerContext(settings=checked_settings(), users=UserDirectory())


def test_counts_continue_the_restored_totals_and_a_new_process_starts_from_zero() -> None:
    supervisor, worker = context(), context()
    supervisor.metrics.restore({"total_connections": 100, "logins_ok": 7})
    totals = Totals(supervisor, 2)
    slot = totals.workers[0]
    sent: dict[str, int] = {}
    worker.metrics.connection_opened()
    worker.metrics.logins_ok += 1
    totals.add(slot, report(worker, sent))
    worker.metrics.connection_opened()
    totals.add(slot, report(worker, sent))
    assert supervisor.metrics.total_connections == 102
    assert supervisor.metrics.logins_ok == 8
    assert supervisor.metrics.current_connections == 2
    totals.forget(slot)  # the process died: its sessions with it, its counts stay
    assert supervisor.metrics.current_connections == 0
    replacement = context()
    replacement.metrics.connection_opened()
    totals.add(slot, report(replacement, {}))
    assert supervisor.metrics.total_connections == 103


def test_the_maximum_is_of_the_sum_and_counts_a_burst_between_reports() -> None:
    supervisor, first, second = context(), context(), context()
    totals = Totals(supervisor, 2)
    for _ in range(3):
        first.metrics.connection_opened()
    totals.add(totals.workers[0], report(first, {}))
    for _ in range(5):  # a burst of 5 on the second worker, over before its report
        second.metrics.connection_opened()
    for _ in range(5):
        second.metrics.connection_closed()
    totals.add(totals.workers[1], report(second, {}))
    assert supervisor.metrics.current_connections == 3
    assert supervisor.metrics.max_concurrent == 8  # 3 open on the first + the second's peak of 5


def test_logged_in_users_are_summed_over_workers_and_dropped_with_a_dead_one() -> None:
    supervisor, first, second = context(), context(), context()
    totals = Totals(supervisor, 2)
    sent_first: dict[str, int] = {}
    first.logged_in.update(alice=1, bob=1)
    second.logged_in.update(alice=1)
    totals.add(totals.workers[0], report(first, sent_first))
    totals.add(totals.workers[1], report(second, {}))
    assert supervisor.logged_in == {"alice": 2, "bob": 1}
    del first.logged_in["bob"]
    totals.add(totals.workers[0], report(first, sent_first))
    assert supervisor.logged_in == {"alice": 2}
    totals.forget(totals.workers[1])
    assert supervisor.logged_in == {"alice": 1}


def test_entries_reach_the_supervisor_once_and_stay_bounded_without_a_store() -> None:
    supervisor, worker = context(), context()
    totals = Totals(supervisor, 1)
    worker.access_log.record(AccessEntry(time=1.0, user="alice", address="127.0.0.1", port=1, event="login"))
    sent: dict[str, int] = {}
    totals.add(totals.workers[0], report(worker, sent))
    totals.add(totals.workers[0], report(worker, sent))
    assert [entry.user for entry in supervisor.access_log.pending] == ["alice"]
    logout = AccessEntry(time=2.5, user="alice", address="::1", port=2, event="logout", retr=10, dele=1, top=2,
                         bytes=40960, duration=0.25, ended="quit", detail="filter_failures=1")
    worker.access_log.record(logout)
    totals.add(totals.workers[0], json.loads(encode(report(worker, sent))))  # as the channel carries it
    assert supervisor.access_log.pending[-1] == logout  # every field, as recorded
    supervisor.access_log.recent_limit = 2
    many = [["1.0", "bob", "127.0.0.1", 1, "login"]] * 25
    totals.add(totals.workers[0], {"op": "report", "entries": many})
    assert len(supervisor.access_log.pending) <= 20
