"""The users file on a real server: Dovecot passwd-file lines, 100,000 entries, equal failure
timing with cheap and dear entries mixed, and reload (SIGHUP, MSMP RELOAD)."""

from __future__ import annotations

import re
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import LineClient, ServerProcess, admin, wait_until

from geventpop3.auth.users import hash_password

CHEAP = (2**8, 8, 1)
CALIBRATED = re.compile(r"user password checks calibrated: 2 cost classes, a failure takes at least (\d+) ms")


def users_server(start_server: Callable[..., ServerProcess], tmp_path: Path, content: str,
                 config: str = "", **kwargs: object) -> tuple[ServerProcess, Path]:
    users_file = tmp_path / "users"
    users_file.write_text(content)
    server = start_server(users={}, extra_args=["--users-file", str(users_file)], config=config, **kwargs)
    return server, users_file


def login(server: ServerProcess, user: str, password: str) -> bytes:
    """The answer to PASS on a fresh connection (QUIT after a success)."""
    with LineClient(server.port) as client:
        reply = client.login(user, password)
        if reply.startswith(b"+OK"):
            client.cmd("QUIT")
        return reply


def logs_in(server: ServerProcess, user: str, password: str) -> bool:
    return login(server, user, password).startswith(b"+OK")


def test_dovecot_passwd_file_lines_log_in(start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    hashed = hash_password("bobpw", CHEAP)
    server, _ = users_server(start_server, tmp_path, (
        "# a Dovecot passwd-file, as is\n"
        "alice:alicepw\n"
        f"bob:{hashed}:1001:1001:Bob:/home/bob:/bin/false:userdb_quota_rule=*:storage=1G\n"
        f"carol:{hash_password('carolpw', CHEAP)}::::::\n"
        f"dave:{hash_password('davepw', CHEAP)}:1003:1003::/home/dave::nologin\n"
    ))
    assert logs_in(server, "alice", "alicepw")
    assert logs_in(server, "bob", "bobpw")
    assert logs_in(server, "carol", "carolpw")
    assert login(server, "dave", "davepw").startswith(b"-ERR [AUTH]")  # nologin: left out
    assert login(server, "bob", "alicepw").startswith(b"-ERR [AUTH]")
    log = server.log()
    assert log.count("are ignored on") == 1, log  # one note for the whole file
    assert "left out 1 users" in log and "dave" in log


def test_a_hundred_thousand_users_start_and_serve(start_server: Callable[..., ServerProcess],
                                                  tmp_path: Path) -> None:
    """No hashing at start: the file's plain and hashed entries are parsed, not hashed (the
    time is the benchmark's job, loadtest/users_start.py; this test only starts and serves)."""
    hashed = hash_password("hashedpw", CHEAP)
    lines = [f"u{n}:{hashed}" if n % 2 else f"u{n}:pw{n}" for n in range(100_000)]
    server, _ = users_server(start_server, tmp_path, "\n".join(lines) + "\n")
    assert "users=100000" in server.log()
    assert logs_in(server, "u0", "pw0")
    assert logs_in(server, "u99998", "pw99998")
    assert logs_in(server, "u99999", "hashedpw")
    assert login(server, "u99999", "pw99999").startswith(b"-ERR [AUTH]")


def pass_seconds(server: ServerProcess, user: str, password: str) -> float:
    """How long the server takes to answer PASS (the connection and USER not counted)."""
    with LineClient(server.port) as client:
        assert client.cmd(f"USER {user}") == b"+OK"
        started = time.perf_counter()
        reply = client.cmd(f"PASS {password}")
        seconds = time.perf_counter() - started
        assert reply.startswith(b"-ERR [AUTH]"), reply
        return seconds


@pytest.mark.slow
def test_unknown_user_and_wrong_password_take_the_same_time_with_cheap_and_dear_entries(
        start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    """A plain entry (microseconds to check) beside a default-cost scrypt entry (tens of ms):
    without padding a wrong password for the plain entry answers at once and an unknown name
    (checked against a dummy of the scrypt class) after a hash, which tells the name exists.
    Failures are measured in turn in each round (a change of load hits all alike); the
    medians may differ by half the largest at most (without padding: all of it), and none is
    below 0.7 x the floor the server logged."""
    server, _ = users_server(
        start_server, tmp_path, f"plain:plainpw\ndear:{hash_password('dearpw')}\n",
        config="auth_penalty_max = 0\n", login_failure_delay=0)  # no penalty: only the check's time
    calibrated = wait_until(lambda: CALIBRATED.search(server.log()), timeout=60)
    floor = int(calibrated[1]) / 1000
    samples: dict[str, list[float]] = {"nobody": [], "plain": [], "dear": []}
    for _ in range(7):
        for user, times in samples.items():
            times.append(pass_seconds(server, user, "wrong"))
    medians = {user: statistics.median(times) for user, times in samples.items()}
    assert min(medians.values()) >= 0.7 * floor, (medians, floor)
    assert max(medians.values()) - min(medians.values()) < 0.5 * max(medians.values()), (medians, floor)


@pytest.mark.slow
def test_reload_adds_changes_and_removes_users_and_open_sessions_go_on(
        start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    server, users_file = users_server(start_server, tmp_path, (
        f"alice:alicepw\nbob:{hash_password('bobpw', CHEAP)}\ncarol:carolpw\n"))
    with admin(server) as client:
        assert client.add_user("dave", "davepw")  # over MSMP: the store's, not the file's
    session = LineClient(server.port)
    assert session.login("alice", "alicepw").startswith(b"+OK")
    users_file.write_text(f"bob:{hash_password('newbobpw', CHEAP)}\ncarol:carolpw\nerin:erinpw:with:colons\n")
    server.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    wait_until(lambda: logs_in(server, "erin", "erinpw:with:colons"))
    assert "users file reloaded" in server.log() and "1 added, 1 changed, 1 removed" in server.log()
    assert logs_in(server, "bob", "newbobpw") and not logs_in(server, "bob", "bobpw")
    assert not logs_in(server, "alice", "alicepw")
    assert logs_in(server, "carol", "carolpw") and logs_in(server, "dave", "davepw")
    assert session.cmd("STAT").startswith(b"+OK")  # alice's open session goes on
    assert session.cmd("QUIT").startswith(b"+OK")
    session.close()


def test_a_broken_users_file_keeps_the_old_users(start_server: Callable[..., ServerProcess],
                                                 tmp_path: Path) -> None:
    server, users_file = users_server(start_server, tmp_path, "alice:alicepw\nbob:bobpw\n")
    users_file.write_text("alice:changed\n# fine so far\nno colon here\nbob:changed\n")
    with admin(server) as client:
        reply = client.command("RELOAD")
        assert not reply.ok
        assert f"users file not reloaded, the current users stay: {users_file}:3: expected name:password" in reply.text
        users_file.write_text("alice:changed\nbob:{NO-SUCH-SCHEME}x\n")
        reply = client.command("RELOAD")
        assert not reply.ok and f"{users_file}:2: " in reply.text and "NO-SUCH-SCHEME" in reply.text, reply.text
    server.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    wait_until(lambda: server.log().count("ERROR reload: users file not reloaded") >= 3)
    assert logs_in(server, "alice", "alicepw") and logs_in(server, "bob", "bobpw")
    assert not logs_in(server, "alice", "changed")
    users_file.write_text("alice:changed\n")
    with admin(server) as client:
        assert client.command("RELOAD").ok
    assert logs_in(server, "alice", "changed") and not logs_in(server, "bob", "bobpw")
