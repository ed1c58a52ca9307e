"""geventpop3.core.accounting: the whole server's counts of connections and logins per source,
and the penalty, as the supervisor keeps them for its workers (each call names its owner)."""

from __future__ import annotations

from geventpop3.core.accounting import ADMITTED, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_IP, LocalAccounting
from geventpop3.core.penalty import Penalty
from geventpop3.core.settings import Settings


def accounting(**values: object) -> LocalAccounting:
    settings = Settings()
    for key, value in {"login_failure_delay": 1, "auth_penalty_max": 8, **values}.items():
        settings.apply(key, value, "test")
    return LocalAccounting(settings, Penalty(settings))


def test_the_per_source_cap_counts_every_owner_and_an_end_frees_a_place() -> None:
    acct = accounting(max_connections_per_ip=3)
    assert [acct.connect("192.0.2.1", owner) for owner in (0, 1, 0)] == [ADMITTED] * 3
    assert acct.connect("192.0.2.1", 1) == MAX_CONNECTIONS_PER_IP
    assert acct.connect("192.0.2.2", 1) == ADMITTED  # another source: its own count
    acct.disconnect("192.0.2.1", 1)
    assert acct.connect("192.0.2.1", 0) == ADMITTED
    assert acct.connections == 4


def test_the_total_cap_is_the_whole_servers() -> None:
    acct = accounting(max_connections=2)
    assert acct.connect("192.0.2.1", 0) == acct.connect("192.0.2.2", 1) == ADMITTED
    assert acct.connect("192.0.2.3", 0) == MAX_CONNECTIONS


def test_a_dead_owners_connections_and_logins_are_taken_back_and_its_late_ends_ignored() -> None:
    acct = accounting(max_connections_per_ip=2, max_sessions_per_user_ip=1)
    assert acct.connect("192.0.2.1", 0) == acct.connect("192.0.2.1", 1) == ADMITTED
    assert acct.login("alice", "192.0.2.1", 1) == 0
    assert acct.login("alice", "192.0.2.1", 0) is None  # one in flight already, on the other worker
    acct.forget(1)
    assert acct.connections == 1 and acct.in_flight == {}
    acct.disconnect("192.0.2.1", 1)  # the dead worker's own end, if it arrives: counted once only
    acct.login_done("alice", "192.0.2.1", False, 1)
    assert acct.connections == 1 and acct.per_source == {"192.0.2.1": 1}
    assert acct.login("alice", "192.0.2.1", 0) == 0


def test_failures_escalate_whichever_owner_saw_them_and_a_right_password_forgets_them() -> None:
    acct = accounting()
    assert [acct.failed("192.0.2.1", "alice", owner) for owner in (0, 1, 0, 1)] == [1, 2, 4, 8]
    assert acct.login("bob", "192.0.2.1", 1) == 4  # its failures: the hash queue's priority
    acct.login_done("bob", "192.0.2.1", True, 1)
    assert acct.penalty.failures("192.0.2.1") == 0
    assert acct.failed("192.0.2.1", "alice", 0) == 1
