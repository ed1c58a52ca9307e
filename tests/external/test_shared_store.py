"""Two real geventpop3 instances sharing one Maildir root and one PostgreSQL database
(`--state-url`): users, settings, leases and counters cross from one to the other."""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import gevent
import pytest
from helpers import (
    LineClient,
    PostgresServer,
    ServerProcess,
    accepts,
    admin,
    counters,
    filter_tmp_dir,
    free_port,
    logged_in,
    pop3,
    run_server,
    unique_name,
    wait_until,
)

from admin.client import MsmpError
from geventpop3.testing.haproxy import haproxy_config, start_haproxy

LEASE = 2.0  # lease_timeout of the test instances, in seconds


def login_answer(server: ServerProcess, user: str, password: str) -> bytes:
    """The answer to PASS (then QUIT, which gives the mailbox back at once)."""
    with LineClient(server.port) as client:
        reply = client.login(user, password)
        client.cmd("QUIT")
        return reply


def shared_pair(start_server: Callable[..., ServerProcess], url: str, maildir: Path,
                config: str = "") -> tuple[ServerProcess, ServerProcess]:
    """Instances A and B on one database and one Maildir root, alice configured on both."""
    pair = []
    for _ in range(2):
        server = start_server(users={"alice": "alicepw"}, listen=["127.0.0.1"], admin_listen=["127.0.0.1"],
                              extra_args=["--state-url", url, "-d", str(maildir)],
                              config=f"lease_timeout = {LEASE}\n" + config)
        server.maildir = maildir
        pair.append(server)
    return pair[0], pair[1]


@pytest.fixture
def pair(start_server: Callable[..., ServerProcess], postgres: PostgresServer,
         tmp_path: Path) -> tuple[ServerProcess, ServerProcess]:
    maildir = tmp_path / "shared-mail"
    maildir.mkdir()
    return shared_pair(start_server, postgres.create_database(), maildir)


def test_a_user_added_on_a_logs_in_on_b_and_a_deletion_reaches_b(pair: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = pair
    name = unique_name("shared")
    with admin(a) as client:
        client.add_user(name, "pw1")
    wait_until(lambda: login_answer(b, name, "pw1").startswith(b"+OK"), timeout=1.5)  # within a second or so
    with admin(a) as client:
        client.add_user(name, "pw2")  # a new password too
    wait_until(lambda: login_answer(b, name, "pw2").startswith(b"+OK"), timeout=1.5)
    with admin(b) as client:
        assert name in client.list_users()
    with admin(a) as client:
        client.delete_user(name)
    wait_until(lambda: login_answer(b, name, "pw2").startswith(b"-ERR [AUTH]"), timeout=1.5)


def test_a_session_on_a_makes_a_login_on_b_in_use_until_it_quits(pair: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = pair
    a.deliver("alice", b"Subject: one\n\nbody\n")
    with logged_in(a) as session:
        assert login_answer(b, "alice", "alicepw").startswith(b"-ERR [IN-USE]")
        assert session.cmd("DELE 1").startswith(b"+OK")
        assert session.cmd("QUIT").startswith(b"+OK")
    assert login_answer(b, "alice", "alicepw").startswith(b"+OK")  # released before +OK: at once
    assert a.message_files("alice") == []
    with admin(a) as client:  # a session on B: A cannot delete the user meanwhile
        session = pop3(b, "alice", "alicepw")
        try:
            with pytest.raises(MsmpError, match="logged in"):
                client.delete_user("alice")
        finally:
            session.quit()


def test_after_a_sigkill_the_lease_expires_and_b_finds_all_the_mail_a_did_not_delete(
        pair: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = pair
    for n in range(3):
        a.deliver("alice", f"Subject: {n}\n\nbody {n}\n".encode())
    session = logged_in(a)
    assert session.cmd("DELE 1").startswith(b"+OK")  # marked, never carried out
    a.stop(signal.SIGKILL)
    session.close()
    assert login_answer(b, "alice", "alicepw").startswith(b"-ERR [IN-USE]")
    killed = time.monotonic()
    wait_until(lambda: login_answer(b, "alice", "alicepw").startswith(b"+OK"), timeout=LEASE + 3)
    assert time.monotonic() - killed < LEASE + 3
    client = pop3(b, "alice", "alicepw")
    try:
        assert client.stat()[0] == 3
    finally:
        client.quit()


def test_set_on_a_is_seen_on_b_within_a_second_and_stat_sums_the_instances(
        pair: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = pair
    with admin(a) as on_a, admin(b) as on_b:
        on_a.set("idle_timeout", "123")
        changed = time.monotonic()
        wait_until(lambda: on_b.get("idle_timeout") == "123", timeout=1.0, interval=0.01)
        assert time.monotonic() - changed < 1.0
        for server in (a, b, b):
            pop3(server, "alice", "alicepw").quit()
        # totals over both instances once B's counters are stored (about a second), and a line each
        stat = wait_until(lambda: (s := counters(on_a))["Logins ok"] >= 3 and s["Instances alive"] == 2 and s,
                          timeout=5)
        assert stat["Instances"] == 2
        per_instance = {name: value for name, value in stat.items() if name.endswith(" logins ok")}
        assert sorted(per_instance.values()) == [1, 2], stat


def test_a_bad_or_unreachable_state_url_is_one_line_and_exit_2(tmp_path: Path) -> None:
    for url, message in (("mysql://x", "invalid state_url: must be a postgresql:// URL"),
                         ("postgresql://127.0.0.1:notaport/x", "invalid state_url"),
                         (f"postgresql://127.0.0.1:{free_port()}/x", "cannot connect to state database")):
        result = run_server("-d", str(tmp_path / "mail"), "--state-dir", str(tmp_path / "state"),
                            "-p", "0", "-P", "0", "--state-url", url, timeout=60)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


class LoginLoad:
    """Greenlets logging `user` in and out over and over, keeping every answer to PASS."""

    def __init__(self, server: ServerProcess, user: str, password: str, clients: int = 4) -> None:
        self.answers: list[bytes] = []
        self._stop = False
        self._greenlets = [gevent.spawn(self._run, server, user, password) for _ in range(clients)]

    def _run(self, server: ServerProcess, user: str, password: str) -> None:
        while not self._stop:
            with LineClient(server.port) as client:
                answer = client.login(user, password)
                client.cmd("QUIT")
            self.answers.append(answer[:20])

    def seen(self, prefix: bytes) -> int:
        return sum(answer.startswith(prefix) for answer in self.answers)

    def stop(self) -> None:
        self._stop = True
        gevent.joinall(self._greenlets, timeout=30, raise_error=True)


def test_postgresql_stopped_and_started_again_under_load(start_server: Callable[..., ServerProcess],
                                                          own_postgres: PostgresServer, tmp_path: Path) -> None:
    maildir = tmp_path / "mail"
    maildir.mkdir()
    url = own_postgres.create_database()
    a, _ = shared_pair(start_server, url, maildir)
    with admin(a) as client:
        client.add_user("dave", "davepw")  # from the store: loaded, so verifiable while it is down
    for n in range(3):
        a.deliver("alice", f"Subject: {n}\n\nbody {n}\n".encode())
    held = logged_in(a)  # holds alice's lease through the outage
    load = LoginLoad(a, "dave", "davepw")
    wait_until(lambda: load.seen(b"+OK") >= 5)

    own_postgres.stop("fast")
    wait_until(lambda: load.seen(b"-ERR [SYS/TEMP]") >= 5, timeout=15)
    assert login_answer(a, "dave", "wrong").startswith(b"-ERR [SYS/TEMP] Cannot verify")  # not [AUTH]
    assert login_answer(a, "nobody", "x").startswith(b"-ERR [SYS/TEMP] Cannot verify")
    with admin(a) as client:
        for change in (lambda: client.set("idle_timeout", "99"), lambda: client.add_user("erin", "erinpw")):
            with pytest.raises(MsmpError):
                change()
        assert "unavailable" in " ".join(client.command("STAT").lines)
    assert held.retr(1).startswith(b"Subject: 0")  # a session logged in goes on
    assert held.cmd("DELE 1").startswith(b"+OK")
    assert held.cmd("QUIT").startswith(b"-ERR [SYS/TEMP]")  # its lease cannot be confirmed: nothing deleted
    held.close()
    assert len(a.message_files("alice")) == 3

    own_postgres.start()
    outage_ok = load.seen(b"+OK")
    wait_until(lambda: load.seen(b"+OK") > outage_ok + 5, timeout=20)  # recovered by itself
    load.stop()
    with admin(a) as client:
        assert client.set("idle_timeout", "99")
    # nothing acknowledged is lost: one access-log entry per answer, outage included
    import psycopg

    def stored(event: str) -> int:
        with psycopg.connect(url) as conn:
            row = conn.execute('SELECT count(*) FROM access_log WHERE "user" = %s AND event = %s',
                               ("dave", event)).fetchone()
            return int(row[0]) if row else 0

    wait_until(lambda: stored("login") == load.seen(b"+OK") == stored("logout")
               and stored("login-failed") > load.seen(b"-ERR"), timeout=10)
    assert stored("login-failed") == load.seen(b"-ERR") + 1  # and dave's wrong password above ("nobody": -unknown-)


def test_run_as_with_a_shared_store_serves_after_the_drop(postgres: PostgresServer) -> None:
    """The PostgreSQL modules are read before privileges are dropped; leases work as `nobody`."""
    import grp
    import os
    import pwd

    from helpers import started_servers

    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges")
    nobody = pwd.getpwnam("nobody")
    with filter_tmp_dir() as tmp, started_servers(tmp) as start:
        (tmp / "server0" / "mail").mkdir(parents=True)
        for path in [tmp, *tmp.rglob("*")]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        server = start(users={"alice": "alicepw"}, listen=["127.0.0.1"], admin_listen=["127.0.0.1"],
                       extra_args=["--state-url", postgres.create_database(), "--run-as", "nobody",
                                   "--run-as-group", grp.getgrgid(nobody.pw_gid).gr_name])
        assert login_answer(server, "alice", "alicepw").startswith(b"+OK")
        with admin(server) as client:
            client.set("idle_timeout", "321")
        assert "Traceback" not in server.log()


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed (tools/install-system-deps.sh)")
def test_through_haproxy_a_user_added_on_a_is_served_by_either_instance(
        start_server: Callable[..., ServerProcess], postgres: PostgresServer, tmp_path: Path) -> None:
    maildir = tmp_path / "shared-mail"
    maildir.mkdir()
    a, b = shared_pair(start_server, postgres.create_database(), maildir,
                       config='proxy_networks = ["127.0.0.1/32"]\n')
    front = free_port()
    proxy = start_haproxy(tmp_path, haproxy_config({front: [f"a 127.0.0.1:{a.port} send-proxy-v2",
                                                            f"b 127.0.0.1:{b.port} send-proxy-v2"]}))
    try:
        wait_until(lambda: proxy.poll() is None and accepts("127.0.0.1", front))
        name = unique_name("lb")
        with admin(a) as client:
            client.add_user(name, "lbpw")
        wait_until(lambda: f"user {name} changed by another instance" in b.log(), timeout=1.5)
        answers = []
        for _ in range(4):  # round robin: A, B, A, B
            with LineClient(front, source="127.0.0.7") as session:
                answers.append(session.login(name, "lbpw"))
                session.cmd("QUIT")
        assert all(answer.startswith(b"+OK") for answer in answers), answers
        with admin(b) as client:  # one access log for both, with the address HAProxy saw
            lines = wait_until(lambda: [line for line in client.logs(name) if " login" in line and "127.0.0.7" in line]
                               if len(client.logs(name)) >= 8 else [], timeout=5)
            assert len(lines) == 4
            wait_until(lambda: (stat := counters(client))[f"Instance {_name(a)} logins ok"] == 2
                       and stat[f"Instance {_name(b)} logins ok"] == 2, timeout=5)
    finally:
        proxy.terminate()
        proxy.wait(10)


def _name(server: ServerProcess) -> str:
    from geventpop3.state.postgres import default_instance_name

    return default_instance_name(server.port)
