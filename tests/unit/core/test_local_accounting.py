"""geventpop3.core.accounting: one process's counts of connections and logins per source,
and the penalty (`--workers 1`; the supervisor's penalty with workers)."""

from __future__ import annotations

from geventpop3.core.accounting import ADMITTED, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_IP, LocalAccounting
from geventpop3.core.penalty import Penalty
from geventpop3.core.settings import Settings


def accounting(**values: object) -> LocalAccounting:
    settings = Settings()
    for key, value in {"login_failure_delay": 1, "auth_penalty_max": 8, **values}.items():
        settings.apply(key, value, "test")
    return LocalAccounting(settings, Penalty(settings))


def test_the_per_source_cap_and_an_end_frees_a_place() -> None:
    acct = accounting(max_connections_per_ip=3)
    assert [acct.connect("192.0.2.1") for _ in range(3)] == [ADMITTED] * 3
    assert acct.connect("192.0.2.1") == MAX_CONNECTIONS_PER_IP
    assert acct.connect("192.0.2.2") == ADMITTED  # another source: its own count
    acct.disconnect("192.0.2.1")
    assert acct.connect("192.0.2.1") == ADMITTED
    assert acct.connections == 4


def test_the_total_cap() -> None:
    acct = accounting(max_connections=2)
    assert acct.connect("192.0.2.1") == acct.connect("192.0.2.2") == ADMITTED
    assert acct.connect("192.0.2.3") == MAX_CONNECTIONS


def test_logins_in_flight_per_user_and_source() -> None:
    acct = accounting(max_sessions_per_user_ip=1)
    assert acct.login("alice", "192.0.2.1") == 0
    assert acct.login("alice", "192.0.2.1") is None
    assert acct.login("bob", "192.0.2.1") == 0
    acct.login_done("alice", "192.0.2.1", False)
    assert acct.login("alice", "192.0.2.1") == 0


def test_failures_escalate_and_a_right_password_forgets_them() -> None:
    acct = accounting()
    assert [acct.failed("192.0.2.1", "alice") for _ in range(4)] == [1, 2, 4, 8]
    assert acct.login("bob", "192.0.2.1") == 4  # its failures: the hash queue's priority
    acct.login_done("bob", "192.0.2.1", True)
    assert acct.penalty.failures("192.0.2.1") == 0
    assert acct.failed("192.0.2.1", "alice") == 1
