"""The access log belongs to the users, not to whoever guesses passwords (issue 9):
failed logins under made-up names share one bucket, failures are pruned apart from a
user's logins and logouts, and the whole table has a cap. Real server, real POP3 and
MSMP clients, the real SQLite file."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from helpers import ServerProcess, admin, login_error, logs_with, pop3, state_db, wait_until

UNKNOWN = "-unknown-"  # geventpop3.core.metrics.UNKNOWN_USER


def stored_buckets(server: ServerProcess) -> dict[str, int]:
    with state_db(server) as db:
        return dict(db.execute("SELECT user, count(*) FROM access_log GROUP BY user").fetchall())


def session(server: ServerProcess, user: str, password: str) -> None:
    pop3(server, user, password).quit()


@pytest.mark.slow
def test_made_up_names_share_one_bucket_and_cannot_erase_a_users_entries(
        start_server: Callable[..., ServerProcess]) -> None:
    server = start_server()
    session(server, "alice", "alicepw")
    for _ in range(4):
        login_error(server, "alice", "wrong")
    made_up = [f"guess{i}" for i in range(8)] + ["x" * 40 + "-long-name"]
    for name in made_up:
        login_error(server, name, "wrong")
    with admin(server) as client:
        logs_with(client, "alice", "logout")
        assert client.set("log_retention_count", "3") == "Changed value"
        # Pruned at the next write: 3 failures kept, and alice's login and logout too.
        lines = wait_until(lambda: len(lines := client.logs("alice")) == 5 and lines, timeout=15)
        assert [line.split()[5] for line in lines] == ["login", "logout"] + ["login-failed"] * 3
        unknown = wait_until(lambda: len(lines := client.logs(UNKNOWN)) == 3 and lines)
        assert [line.split()[-1] for line in unknown] == ["tried=guess6", "tried=guess7", "tried=" + "x" * 32]
        for name in made_up[:2]:
            assert not client.command(f"LOGS {name}").ok  # no bucket of its own
    wait_until(lambda: stored_buckets(server) == {"alice": 5, UNKNOWN: 3})


@pytest.mark.slow
def test_the_whole_access_log_has_a_cap(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(config="log_retention_total = 12\n")
    for _ in range(6):
        session(server, "bob", "bobpw")
    login_error(server, "nobody", "wrong")
    session(server, "carol", "carolpw")
    with admin(server) as client:
        assert client.get("log_retention_total") == "12"
        logs_with(client, "carol", "logout")
        # 15 entries written, 12 kept: oldest first, whoever they belong to.
        wait_until(lambda: stored_buckets(server) == {"bob": 9, UNKNOWN: 1, "carol": 2})
        assert [line.split()[5] for line in client.logs("carol")] == ["login", "logout"]
        assert len(client.logs("bob")) == 9
        assert client.set("log_retention_total", "10") == "Changed value"  # applied at once
        wait_until(lambda: stored_buckets(server) == {"bob": 7, UNKNOWN: 1, "carol": 2})
