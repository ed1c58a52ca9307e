"""State that outlives the server process: users added over MSMP, SET values, access
logs and counters, across a clean restart (SIGTERM) and a crash (SIGKILL); and a state
database that cannot be written, which must never stop POP3 service.

Precedence at start-up (geventpop3/cli.py): defaults < --config file < values SET over
MSMP (persisted) < flags given on this command line. A flag wins for the run it is given
to, without erasing the persisted value: a later start without the flag uses it again.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable

import pytest
from helpers import (
    ServerProcess,
    admin,
    counters,
    crlf,
    login_error,
    logs_with,
    pop3,
    quiet_stat,
    retr,
    state_db,
    wait_until,
)

STATE_DB = "geventpop3.db"  # geventpop3.process.server.STATE_DB


def restart(server: ServerProcess, sig: int = signal.SIGTERM) -> ServerProcess:
    """Stop with `sig` and start again: same flags, Maildir, state directory and ports."""
    code = server.restart(sig)
    assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL), code
    return server


def stored_counters(server: ServerProcess) -> dict[str, int]:
    with state_db(server) as db:
        return dict(db.execute("SELECT name, value FROM counters").fetchall())


def stored_entries(server: ServerProcess, user: str) -> int:
    with state_db(server) as db:
        return db.execute("SELECT count(*) FROM access_log WHERE user = ?", (user,)).fetchone()[0]


def pop3_session(server: ServerProcess, user: str, password: str, host: str = "127.0.0.1") -> None:
    """Log in, fetch everything, QUIT."""
    session = pop3(server, user, password, host)
    for number in range(1, session.stat()[0] + 1):
        retr(session, number)
    session.quit()


# -- clean restart -------------------------------------------------------------

@pytest.mark.slow
def test_restart_keeps_users_settings_logs_and_counters(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server()
    other_root = server.root / "mail2"
    other_root.mkdir()
    with admin(server) as client:
        assert client.add_user("dave", "davepw") == "Added user"
        assert client.add_user("bob", "n3w-bob") == "Updated password"
        assert client.set("idle_timeout", "77") == "Changed value"
        assert client.set("user_limit", "50") == "Changed value"
        assert client.set("log_retention_count", "500") == "Changed value"
        assert client.set("transformer_failure", "passthrough") == "Changed value"
        server.deliver("dave", b"Subject: kept\n\nbody\n")
        pop3_session(server, "dave", "davepw", "::1")
        login_error(server, "carol", "wrong")
        logs = logs_with(client, "dave", "logout")
        failed = client.logs("carol")
        before = quiet_stat(client)
        assert before["Logins ok"] >= 1 and before["Messages retrieved"] >= 1

    restart(server)

    with admin(server, "::1") as client:
        assert client.list_users() == ["alice", "bob", "carol", "dave"]
        assert client.get("idle_timeout") == "77"
        assert client.get("user_limit") == "50"
        assert client.get("log_retention_count") == "500"
        assert client.get("transformer_failure") == "passthrough"
        assert client.logs("dave") == logs
        assert client.logs("carol") == failed
        assert client.user_info("dave")["logs"] == "2"
        after = quiet_stat(client)
        # Totals continue from the earlier run (the start-up probes add connections only).
        assert after["Total connections"] >= before["Total connections"] + 1
        assert after["Historical maximum traffic"] >= before["Historical maximum traffic"]
        for name in ("Logins ok", "Logins failed", "Messages retrieved", "Messages deleted", "Bytes received"):
            assert after[name] == before[name], name
        assert after["Bytes sent"] >= before["Bytes sent"]
    pop3_session(server, "dave", "davepw")
    assert login_error(server, "dave", "wrong").startswith(b"-ERR [AUTH]")


def test_restart_keeps_a_deleted_user_deleted(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(users={})
    with admin(server) as client:
        assert client.add_user("dave", "davepw") == "Added user"
        assert client.delete_user("dave") == "Deleted user"
    restart(server, signal.SIGKILL)
    with admin(server) as client:
        assert client.list_users() == []
    assert login_error(server, "dave", "davepw").startswith(b"-ERR [AUTH]")


def test_flag_at_restart_wins_over_a_persisted_set(start_server: Callable[..., ServerProcess]) -> None:
    """flag > persisted SET > config file; the flag does not erase the persisted value."""
    server = start_server(config="max_connections = 100\nuser_limit = 20\n", extra_args=["--idle-timeout", "30"])
    with admin(server) as client:
        assert (client.get("idle_timeout"), client.get("max_connections")) == ("30", "100")
        assert client.set("idle_timeout", "77") == "Changed value"  # SET wins during the run
        assert client.set("max_connections", "200") == "Changed value"
        assert client.get("idle_timeout") == "77"

    restart(server)
    with admin(server) as client:
        assert client.get("idle_timeout") == "30"  # the explicit flag
        assert client.get("max_connections") == "200"  # the persisted SET beats the config file
        assert client.get("user_limit") == "20"  # never SET: the config file

    server.args.remove("--idle-timeout")
    server.args.remove("30")
    restart(server)
    with admin(server) as client:
        assert client.get("idle_timeout") == "77"  # without the flag the persisted SET is back


def test_saved_setting_that_no_longer_validates_is_skipped(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server()
    other_root = server.root / "mail2"
    other_root.mkdir()
    with admin(server) as client:
        assert client.set("maildir", str(other_root)) == "Changed value"
    server.stop()
    other_root.rmdir()  # the persisted Maildir root is gone by the next start
    server.start()
    with admin(server) as client:
        assert client.get("maildir") == str(server.maildir)  # the -d flag
    pop3_session(server, "alice", "alicepw")
    assert "Traceback" not in server.log()


# -- crash -----------------------------------------------------------------------

def test_kill_9_right_after_add_keeps_the_user(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server()
    with admin(server) as client:
        assert client.add_user("dave", "davepw") == "Added user"
        assert client.add_user("alice", "n3w-alice") == "Updated password"
        assert client.set("user_limit", "9") == "Changed value"
    server.stop(signal.SIGKILL)  # no chance to flush anything: ADD and SET were durable on their own
    server.start()
    pop3_session(server, "dave", "davepw", "::1")
    with admin(server) as client:
        assert "dave" in client.list_users()
        assert client.get("user_limit") == "9"
    # `-u alice:alicepw` is given again at this start: flags win over the MSMP password too.
    pop3_session(server, "alice", "alicepw")


@pytest.mark.slow
def test_kill_9_loses_at_most_the_last_second_of_counters(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server()
    for i in range(3):
        server.deliver("alice", b"Subject: %d\n\nbody\n" % i)
    with admin(server) as client:
        pop3_session(server, "alice", "alicepw")
        pop3_session(server, "bob", "bobpw", "::1")
        login_error(server, "carol", "wrong")
        stat = quiet_stat(client)
    names = {"Total connections": "total_connections", "Logins ok": "logins_ok", "Logins failed": "logins_failed",
             "Messages retrieved": "messages_retrieved", "Bytes received": "bytes_received"}
    expected = {stored: stat[shown] for shown, stored in names.items()}
    # The persister writes about every second: poll the file until it holds what STAT said.
    started = time.monotonic()
    wait_until(lambda: {k: v for k, v in stored_counters(server).items() if k in expected} == expected, timeout=5)
    assert time.monotonic() - started < 4  # one write interval (1 s), with slack for a busy machine
    wait_until(lambda: stored_entries(server, "alice") == 2 and stored_entries(server, "carol") == 1, timeout=5)

    restart(server, signal.SIGKILL)

    with admin(server) as client:
        after = counters(client)
        for shown in ("Logins ok", "Logins failed", "Messages retrieved", "Bytes received"):
            assert after[shown] == stat[shown], shown
        assert after["Total connections"] >= stat["Total connections"]
        assert len(client.logs("alice")) == 2
        assert client.logs("carol")[0].endswith("login-failed reason=auth")


def test_mailbox_lock_is_free_after_kill_9(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server()
    server.deliver("alice", b"Subject: kept\n\nbody\n")
    held = pop3(server, "alice", "alicepw")
    assert held.dele(1).startswith(b"+OK")
    server.stop(signal.SIGKILL)
    held.close()
    server.start()
    again = pop3(server, "alice", "alicepw", "::1")  # at once: no [IN-USE], no stale lock
    assert again.stat()[0] == 1  # no QUIT, so the DELE never happened
    again.quit()
    with admin(server) as client:
        wait_until(lambda: client.command("DELE alice").ok)  # nor does MSMP see it as in use


# -- a state database that cannot be written ------------------------------------------

class WriteLock:
    """Another process holding SQLite's write lock on the state file: every write of the
    server fails with 'database is locked' after its busy timeout, even for root (for
    whom a read-only file or directory would not be read-only). As in test_store.py."""

    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, timeout=10)
        self.db.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")
        self.db.close()


@pytest.mark.slow
def test_unwritable_state_database_never_stops_pop3(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server()
    for i in range(2):
        server.deliver("alice", b"Subject: %d\n\nbody\n" % i)
    with admin(server):
        pass  # fully started: the persister is running
    wait_until(lambda: stored_counters(server))
    lock = WriteLock(str(server.state_dir / STATE_DB))
    try:
        errors_before = server.log().count(" ERROR ")
        # POP3 keeps working, at full speed, while the database cannot be written.
        for i in range(4):
            started = time.monotonic()
            session = pop3(server, "bob", "bobpw", "::1" if i % 2 else "127.0.0.1")
            assert session.stat() == (0, 0)
            session.quit()
            assert time.monotonic() - started < 3  # below the 5 s busy timeout
        started = time.monotonic()
        session = pop3(server, "alice", "alicepw")
        assert retr(session, 1) == crlf(b"Subject: 0\n\nbody\n")
        session.quit()
        assert time.monotonic() - started < 3
        with admin(server) as client:  # STAT needs no database
            stat = counters(client)
            assert stat["Logins ok"] >= 5
        # The failure is logged loudly (after the server's 5 s busy timeout).
        wait_until(lambda: server.log().count(" ERROR ") > errors_before, timeout=20)
        failure = [line for line in server.log().splitlines() if " ERROR " in line and "state database" in line]
        assert failure and "locked" in failure[-1], server.log()[-2000:]
        assert stored_entries(server, "bob") == 0
        with admin(server) as client:
            # LOGS shows the entries kept in memory, waiting at most for one write attempt.
            started = time.monotonic()
            assert [line.split()[-1] for line in client.logs("bob")][:2] == ["login", "ended=quit"]
            assert len(client.logs("bob")) == 8
            assert time.monotonic() - started < 12
        pop3_session(server, "bob", "bobpw")  # still serving after the failure was noticed
    finally:
        lock.release()
    # Once the database is writable again, the kept entries and the counters are written.
    wait_until(lambda: stored_entries(server, "bob") == 10 and stored_entries(server, "alice") == 2, timeout=20)
    wait_until(lambda: stored_counters(server).get("logins_ok", 0) >= stat["Logins ok"] + 1, timeout=5)
    wait_until(lambda: "writable again" in server.log(), timeout=5)  # logged once the write returned
    assert "Traceback" not in server.log()
    with admin(server) as client:
        assert len(client.logs("bob")) == 10


# -- a state database that cannot be used ---------------------------------------------

def start_failure(server: ServerProcess) -> list[str]:
    """Run the server's command line to its end; the lines it printed besides warnings."""
    done = subprocess.run(server.args, cwd=server.root, env=server.env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    return [line for line in done.stderr.splitlines() if " WARNING " not in line]


def test_corrupt_state_database_stops_the_start(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server()
    server.stop()
    database = server.state_dir / STATE_DB
    for leftover in server.state_dir.glob(STATE_DB + "-*"):
        leftover.unlink()
    database.write_bytes(b"garbage, not SQLite " * 500)
    lines = start_failure(server)
    assert len(lines) == 1 and lines[0].startswith("geventpop3: "), lines
    assert str(database) in lines[0] and "not a database" in lines[0]
    assert not accepts_pop3(server)
    server.args.append("--no-state")  # the explicit way to run without state
    server.start()
    pop3_session(server, "alice", "alicepw")


def test_unusable_state_directory_stops_the_start(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server()
    server.stop()
    shutil.rmtree(server.state_dir)
    server.state_dir.write_text("a file where the state directory should be\n")
    lines = start_failure(server)
    assert len(lines) == 1 and lines[0].startswith("geventpop3: cannot "), lines
    assert str(server.state_dir) in lines[0]


def accepts_pop3(server: ServerProcess) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", server.port), timeout=1):
        return True
    return False


@pytest.mark.slow
def test_change_that_cannot_be_saved_answers_err_and_changes_nothing(
        start_server: Callable[..., ServerProcess]) -> None:
    """ADD and SET while another process holds the write lock: -ERR (after the 5 s busy
    timeout), and the old state stays, in the running server and after a restart. (DELE's
    failing store: tests/inprocess/test_msmp_server.py, in-process.)"""
    server = start_server()
    # Busy timeouts, each maybe behind one of the persister's: a patient client.
    with contextlib.closing(server.admin_client(timeout=60)) as client:
        assert client.set("idle_timeout", "77") == "Changed value"
        lock = WriteLock(str(server.state_dir / STATE_DB))
        try:
            added, changed = client.pipeline(["ADD dave davepw", "SET idle_timeout 88"])
        finally:
            lock.release()
        assert not added.ok and "state database" in added.text, added
        assert not changed.ok and changed.text == "Not changed: the state database cannot be written", changed
        assert client.get("idle_timeout") == "77"
        assert client.list_users() == ["alice", "bob", "carol"]
    assert login_error(server, "dave", "davepw").startswith(b"-ERR [AUTH]")
    restart(server)
    with admin(server) as client:
        assert client.get("idle_timeout") == "77"
        assert client.list_users() == ["alice", "bob", "carol"]
        assert client.add_user("dave", "davepw") == "Added user"  # writable again
