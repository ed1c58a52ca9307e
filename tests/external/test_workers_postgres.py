"""`--workers 2` with the PostgreSQL store: instance A (a supervisor and two workers) and
instance B (one process) on one database and one Maildir root.

The supervisor holds the store and follows the other instances; each worker takes its
own mailbox leases (geventpop3.process.shared_store). Which worker serves a connection
is found from the kernel's socket table (helpers.worker_serving), never assumed.
"""

from __future__ import annotations

import datetime
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    LineClient,
    PostgresServer,
    ServerProcess,
    admin,
    counters,
    one_per_worker,
    unique_name,
    wait_until,
    worker_serving,
    workers_of,
)

from geventpop3.state.postgres import default_instance_name

LEASE = 30.0  # lease_timeout: far longer than any wait below, so nothing here passes by expiry


class Pair:
    """A (2 workers) and B (one process), alice and bob configured on both."""

    def __init__(self, start_server: Callable[..., ServerProcess], url: str, maildir: Path) -> None:
        self.url = url
        common: dict[str, Any] = {
            "users": {"alice": "alicepw", "bob": "bobpw"}, "listen": ["127.0.0.1"], "admin_listen": ["127.0.0.1"],
            "extra_args": ["--state-url", url, "-d", str(maildir)], "config": f"lease_timeout = {LEASE}\n"}
        self.a = start_server(workers=2, **common)
        self.b = start_server(workers=1, **common)
        for server in (self.a, self.b):
            server.maildir = maildir

    def query(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.url) as conn:
            return conn.execute(sql, args).fetchall()

    def leases(self, user: str) -> list[tuple[str, str]]:
        """(owner, instance) of `user`'s live lease, if any."""
        return [(str(owner), str(instance)) for owner, instance in self.query(
            "SELECT owner, instance FROM leases WHERE mailbox = %s AND expires > now()", user)]


@pytest.fixture
def pair(start_server: Callable[..., ServerProcess], postgres: PostgresServer, tmp_path: Path) -> Pair:
    maildir = tmp_path / "shared-mail"
    maildir.mkdir()
    return Pair(start_server, postgres.create_database(), maildir)


def login_answer(server: ServerProcess, user: str, password: str) -> bytes:
    """The answer to PASS (then QUIT, which gives the mailbox back at once)."""
    with LineClient(server.port) as client:
        reply = client.login(user, password)
        client.cmd("QUIT")
        return reply


def on_every_worker(server: ServerProcess, user: str, password: str) -> list[bytes]:
    """The answer to PASS through each worker of `server`, by worker."""
    answers = []
    with one_per_worker(server) as clients:
        for client in clients.values():
            answers.append(client.login(user, password))
            client.cmd("QUIT")
    return answers


def test_a_session_on_one_worker_makes_the_other_worker_and_the_other_instance_answer_in_use(pair: Pair) -> None:
    a, b = pair.a, pair.b
    with one_per_worker(a) as clients:
        (first_pid, first), (_, second) = clients.items()
        assert first.login("alice", "alicepw").startswith(b"+OK")
        # The lease is the worker's own: its owner names the supervisor (whose owner the
        # instances row holds), the worker and its process; the instance is A's.
        (owner, instance), = pair.leases("alice")
        (supervisor,), = pair.query("SELECT owner FROM instances WHERE instance = %s", instance)
        assert instance == default_instance_name(a.port)
        assert owner.startswith(f"{supervisor}-w") and owner.endswith(f"-{first_pid}"), (owner, supervisor)
        assert second.login("alice", "alicepw").startswith(b"-ERR [IN-USE]")
        assert login_answer(b, "alice", "alicepw").startswith(b"-ERR [IN-USE]")
        assert second.login("bob", "bobpw").startswith(b"+OK")  # another user on the other worker
        (bob_owner, _), = pair.leases("bob")
        assert bob_owner != owner
        assert first.cmd("QUIT").startswith(b"+OK")
        assert pair.leases("alice") == []  # given back before the answer
    with LineClient(b.port) as on_b:  # and the other way round: a session on B, both workers of A refused
        assert on_b.login("alice", "alicepw").startswith(b"+OK")
        assert all(answer.startswith(b"-ERR [IN-USE]") for answer in on_every_worker(a, "alice", "alicepw"))
        on_b.cmd("QUIT")
    assert all(answer.startswith(b"+OK") for answer in on_every_worker(a, "alice", "alicepw"))


def applied_at(server: ServerProcess, message: str) -> list[float]:
    """When each process of `server` logged `message` (its log lines' wall-clock times)."""
    stamps = []
    for line in server.log().splitlines():
        if message in line:
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            stamps.append(stamp.timestamp())
    return stamps


def closed_after_one_failure(client: LineClient) -> bool:
    """Whether the server closes `client` after one failed login (max_login_failures = 1)."""
    assert client.login("alice", "wrong").startswith(b"-ERR")
    try:
        client.cmd("NOOP")  # -ERR: still open
        return False
    except (EOFError, OSError):
        return True


def test_set_add_and_dele_on_the_other_instance_reach_every_worker_within_a_second(pair: Pair) -> None:
    a, b = pair.a, pair.b

    def every_worker_closes() -> bool:
        with one_per_worker(a) as clients:
            return all([closed_after_one_failure(client) for client in clients.values()])

    with admin(b) as on_b:
        assert not every_worker_closes()
        changed = time.time()
        on_b.set("max_login_failures", "1")  # a new session closes after its first failed login
        wait_until(every_worker_closes, timeout=5)
        applied = applied_at(a, "setting max_login_failures changed from 3 to 1")
        assert len(applied) == 3, applied  # the supervisor and both workers
        assert max(applied) - changed < 1.0, applied
        on_b.set("max_login_failures", "3")

        # The first scrypt entry is a new cost class: every process measures it first (seconds).
        warm = unique_name("pgw")
        on_b.add_user(warm, "warmpw")
        wait_until(lambda: all(answer.startswith(b"+OK") for answer in on_every_worker(a, warm, "warmpw")),
                   timeout=30)
        # Timed without the slow hash: PASS goes to both workers (a user each: one mailbox is
        # one session) as soon as A's supervisor has both users (it tells the workers before
        # it logs), and both workers must already know them.
        names = [unique_name("pgw"), unique_name("pgw")]
        with one_per_worker(a) as clients:
            for client, name in zip(clients.values(), names, strict=True):
                assert client.cmd(f"USER {name}").startswith(b"+OK")
            for name in names:
                on_b.add_user(name, "pw1")
            added = time.monotonic()
            wait_until(lambda: all(f"user {name} changed by another instance" in a.log() for name in names),
                       interval=0.005)
            asked = time.monotonic() - added
            for client in clients.values():
                client.send(b"PASS pw1\r\n")
            assert [client.line()[:3] for client in clients.values()] == [b"+OK", b"+OK"]
            for client in clients.values():
                client.cmd("QUIT")
            assert asked < 1.0, f"{asked:.2f} s"
        with admin(a) as on_a:
            assert set(names) <= set(on_a.list_users())

        name = names[0]
        on_b.delete_user(name)
        wait_until(lambda: all(answer.startswith(b"-ERR [AUTH]") for answer in on_every_worker(a, name, "pw1")),
                   timeout=10)


def test_stat_and_the_stored_counters_and_access_log_are_what_clients_did(pair: Pair) -> None:
    a, b = pair.a, pair.b
    user = "bob"
    for _ in range(2):
        assert all(answer.startswith(b"+OK") for answer in on_every_worker(a, user, "bobpw"))  # 4 on A
    assert login_answer(b, user, "bobpw").startswith(b"+OK")  # 1 on B
    assert login_answer(a, user, "wrong").startswith(b"-ERR [AUTH]")  # 1 failed on A

    def stored(event: str) -> int:
        return int(pair.query('SELECT count(*) FROM access_log WHERE "user" = %s AND event = %s', user, event)[0][0])

    wait_until(lambda: (stored("login"), stored("logout"), stored("login-failed")) == (5, 5, 1), timeout=10)
    with admin(a) as on_a:
        stat = wait_until(lambda: (s := counters(on_a))["Logins ok"] == 5 and s, timeout=10)
        assert stat["Instances"] == 2
        assert stat["Workers"] == 2
        per_instance = sorted(v for k, v in stat.items() if k.endswith(" logins ok"))
        assert per_instance == [1, 4], stat
    wait_until(lambda: sorted(int(v) for _, v in pair.query(
        "SELECT instance, value FROM counters WHERE name = 'logins_ok'")) == [1, 4], timeout=5)
    with admin(b) as on_b:  # the access log of both instances, read from the other one
        assert sum(" login " in line or line.endswith(" login") for line in on_b.logs(user)) >= 5


def test_sigkill_of_a_worker_mid_session_frees_its_lease_at_once_not_after_lease_timeout(pair: Pair) -> None:
    a, b = pair.a, pair.b
    pair.a.deliver("alice", b"Subject: kept\r\n\r\nbody\r\n")
    session = LineClient(a.port)
    try:
        assert session.login("alice", "alicepw").startswith(b"+OK")
        assert session.cmd("DELE 1").startswith(b"+OK")  # marked, never carried out
        victim = worker_serving(a, session)
        assert len(pair.leases("alice")) == 1
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: login_answer(b, "alice", "alicepw").startswith(b"+OK"), timeout=10)
        freed_in = time.monotonic() - killed
        assert freed_in < 3, f"alice could log in again only after {freed_in:.1f} s"
    finally:
        session.close()
    assert len(a.message_files("alice")) == 1
    wait_until(lambda: "released 1 mailbox leases of worker" in a.log())
    replacement = wait_until(lambda: [pid for pid in workers_of(a) if pid != victim and len(workers_of(a)) == 2])
    assert replacement
    assert all(answer.startswith(b"+OK") for answer in on_every_worker(a, "alice", "alicepw"))


def test_sigterm_of_the_supervisor_with_sessions_open_exits_0_and_leaves_no_lease(pair: Pair) -> None:
    a = pair.a
    with one_per_worker(a) as clients:
        first, second = clients.values()
        assert first.login("alice", "alicepw").startswith(b"+OK")
        assert second.login("bob", "bobpw").startswith(b"+OK")
        assert len(pair.leases("alice")) == len(pair.leases("bob")) == 1
        assert a.stop(signal.SIGTERM) == 0
        for client in (first, second):
            client.read_until_closed()
    assert pair.query("SELECT owner FROM leases") == []
    assert "Traceback" not in a.log()


def test_the_supervisor_killed_its_workers_give_their_leases_back_on_the_way_out(pair: Pair) -> None:
    a, b = pair.a, pair.b
    with LineClient(a.port) as session:
        assert session.login("alice", "alicepw").startswith(b"+OK")
        assert len(pair.leases("alice")) == 1
        assert a.stop(signal.SIGKILL) == -signal.SIGKILL
        killed = time.monotonic()
        session.read_until_closed(reset_ok=True)  # the worker got SIGTERM from the kernel (PR_SET_PDEATHSIG)
        wait_until(lambda: login_answer(b, "alice", "alicepw").startswith(b"+OK"), timeout=10)
        freed_in = time.monotonic() - killed
        assert freed_in < 5, f"alice could log in again only after {freed_in:.1f} s"


def test_postgresql_down_logins_are_temporary_on_every_worker_a_replaced_worker_serves_and_all_recover(
        start_server: Callable[..., ServerProcess], own_postgres: PostgresServer, tmp_path: Path) -> None:
    maildir = tmp_path / "mail"
    maildir.mkdir()
    a = Pair(start_server, own_postgres.create_database(), maildir).a
    assert all(answer.startswith(b"+OK") for answer in on_every_worker(a, "alice", "alicepw"))
    own_postgres.stop("fast")
    wait_until(lambda: all(answer.startswith(b"-ERR [SYS/TEMP]") for answer in on_every_worker(a, "alice", "alicepw")),
               timeout=15)
    # Not [AUTH]: while the database is down no worker can tell a user changed elsewhere.
    assert all(answer.startswith(b"-ERR [SYS/TEMP] Cannot verify") for answer in on_every_worker(a, "alice", "no"))
    victim = workers_of(a)[0]
    os.kill(victim, signal.SIGKILL)  # its replacement starts while the database is down, and serves
    wait_until(lambda: victim not in workers_of(a) and len(workers_of(a)) == 2)
    with admin(a) as client:
        # (not helpers.counters: STAT's "Instances" line is words while the database is down)
        wait_until(lambda: sum(int(v) for k, v in client.stat().items() if k.endswith("serving")) == 2, timeout=15)
    assert all(answer.startswith(b"-ERR [SYS/TEMP]") for answer in on_every_worker(a, "alice", "alicepw"))
    own_postgres.start()
    wait_until(lambda: all(answer.startswith(b"+OK") for answer in on_every_worker(a, "alice", "alicepw")),
               timeout=20)
    assert "Traceback" not in a.log()


def test_the_penalty_is_one_over_both_instances_and_every_worker(start_server: Callable[..., ServerProcess],
                                                                 postgres: PostgresServer, tmp_path: Path) -> None:
    """A guesser behind a load balancer meets one penalty: failures on A's two workers and on B
    double the same delay, and PENALTY and PENALTY CLEAR on either instance see all of them."""
    base, cap, source = 0.01, 2.0, "127.0.0.7"
    url = postgres.create_database()
    common: dict[str, Any] = {
        "users": {"alice": "alicepw"}, "listen": ["127.0.0.1"], "admin_listen": ["127.0.0.1"],
        "extra_args": ["--state-url", url], "config": f"auth_penalty_max = {cap}\n", "login_failure_delay": base}
    a = start_server(workers=2, **common)
    b = start_server(workers=1, **common)

    def guess(client: LineClient) -> float:
        assert client.cmd("USER alice") == b"+OK"
        start = time.perf_counter()
        assert client.cmd("PASS wrong").startswith(b"-ERR")
        return time.perf_counter() - start

    times: list[float] = []
    for _ in range(2):  # each round: A's first worker, A's second worker, then B
        with one_per_worker(a, connect=lambda: LineClient(a.port, source=source)) as clients:
            times += [guess(client) for client in clients.values()]
        with LineClient(b.port, source=source) as client:
            times.append(guess(client))
    for k, elapsed in enumerate(times):
        assert elapsed >= min(base * 2 ** k, cap) - 0.005, times
    for server in (a, b):
        with admin(server) as client:
            entry = client.penalties()[source]
            assert entry["failures"] == "6" and float(entry["delay"]) == base * 2 ** 6, (server.port, entry)
    with admin(b) as client:
        assert client.clear_penalty(source) == "Cleared 1 source"
    with admin(a) as client:
        assert client.penalties() == {}
    with LineClient(a.port, source=source) as client:
        assert guess(client) < 0.5  # the base again
