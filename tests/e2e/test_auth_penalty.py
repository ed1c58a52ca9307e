"""Password guessing across connections, on the real server: the per-source penalty shared
by POP3 and MSMP (growing delays, other sources untouched, reset on success, MSMP PENALTY,
metrics), the hashing threads that keep a valid login fast under guessing, and the
`geventpop3 hash` command with the warning for plain passwords on the command line.

Delays are small (login_failure_delay 0.05, auth_penalty_max 0.4); the tests compare
times with each other (growth, ordering) with generous margins, never exact values.
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import gevent
import pytest
from helpers import ADMIN, GEVENTPOP3, REPO, LineClient, ServerProcess, admin, counters, server_env, wait_until

from admin.client import MsmpError
from geventpop3.auth.schemes import parse

PENALTY_CONFIG = "auth_penalty_max = 0.4\n"
BASE = 0.05


class SourceClient(LineClient):
    """A LineClient whose connection comes from `source` (any 127.0.0.0/8 address on Linux)."""

    def __init__(self, port: int, source: str, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout, source_address=(source, 0))
        self._buffer = bytearray()
        self.max_line = None
        self.greeting = self.line()


def failed_login_seconds(server: ServerProcess, source: str = "127.0.0.1", user: str = "alice") -> float:
    """One failed POP3 login on a new connection: seconds from PASS to its -ERR."""
    with SourceClient(server.port, source) as client:
        assert client.cmd(f"USER {user}") == b"+OK"
        start = time.perf_counter()
        reply = client.cmd("PASS wrong-password")
        elapsed = time.perf_counter() - start
        assert reply.startswith(b"-ERR"), reply
        client.cmd("QUIT")
    return elapsed


def good_login(server: ServerProcess, user: str, source: str = "127.0.0.1") -> float:
    """One valid POP3 login on a new connection: seconds from PASS to its +OK."""
    with SourceClient(server.port, source) as client:
        assert client.cmd(f"USER {user}") == b"+OK"
        start = time.perf_counter()
        reply = client.cmd(f"PASS {server.users[user]}")
        elapsed = time.perf_counter() - start
        assert reply.startswith(b"+OK"), reply
        client.cmd("QUIT")
    return elapsed


@pytest.fixture
def penalised(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return start_server(config=PENALTY_CONFIG, login_failure_delay=BASE)


def test_failures_from_one_source_wait_longer_and_longer_across_connections(penalised: ServerProcess) -> None:
    """Regression: every connection started again at the base delay, so reconnecting kept guessing fast."""
    times = [failed_login_seconds(penalised, source="127.0.0.6") for _ in range(5)]
    # Each answer waits at least its penalty (lower bounds hold on a busy machine too;
    # without the penalty every one would wait only the base delay plus the hash).
    for elapsed, least in zip(times, [BASE, 2 * BASE, 4 * BASE, 8 * BASE, 8 * BASE], strict=True):
        assert elapsed >= least - 0.01, times
    with admin(penalised) as client:  # the server's own account: five failures, the next waits the cap
        entry = client.penalties()["127.0.0.6"]
        assert entry["failures"] == "5" and float(entry["delay"]) == 8 * BASE, entry


@pytest.mark.slow
def test_another_source_is_not_penalised_and_success_resets_its_own(penalised: ServerProcess) -> None:
    for _ in range(4):
        failed_login_seconds(penalised)
    penalised_time = failed_login_seconds(penalised)
    other = failed_login_seconds(penalised, source="127.0.0.2")
    assert other < penalised_time - 0.15, (other, penalised_time)
    good_login(penalised, "alice")  # Dovecot: a success forgets its source's penalty
    after_success = failed_login_seconds(penalised)
    assert after_success < penalised_time - 0.15, (after_success, penalised_time)


@pytest.mark.slow
def test_msmp_and_pop3_share_the_penalty(penalised: ServerProcess) -> None:
    for _ in range(4):
        failed_login_seconds(penalised, source="127.0.0.3")
    with SourceClient(penalised.admin_port, "127.0.0.3") as client:
        assert client.cmd(f"USER {ADMIN[0]}") == b"+OK"
        start = time.perf_counter()
        assert client.cmd("PASS wrong") == b"-ERR Invalid credentials"
        msmp_time = time.perf_counter() - start
    with SourceClient(penalised.admin_port, "127.0.0.4") as client:
        assert client.cmd(f"USER {ADMIN[0]}") == b"+OK"
        start = time.perf_counter()
        assert client.cmd("PASS wrong") == b"-ERR Invalid credentials"
        fresh_time = time.perf_counter() - start
    assert msmp_time > fresh_time + 0.15, (msmp_time, fresh_time)
    with admin(penalised) as client:
        assert client.penalties()["127.0.0.3"]["failures"] == "5"


def test_msmp_penalty_lists_and_clears(penalised: ServerProcess) -> None:
    """The admin logs in from 127.0.0.1, which that success clears: the failures come from others."""
    for source in ("127.0.0.5", "127.0.0.5", "127.0.0.5", "127.0.0.2"):
        failed_login_seconds(penalised, source=source)
    with admin(penalised, host="127.0.0.1") as client:
        listed = client.penalties()
        assert list(listed) == ["127.0.0.2", "127.0.0.5"], listed  # most recent first
        assert listed["127.0.0.5"]["failures"] == "3" and listed["127.0.0.5"]["delay"] == "0.4"
        assert listed["127.0.0.2"]["failures"] == "1" and listed["127.0.0.2"]["delay"] == "0.1"
        assert "PENALTY" in next(line for line in client.capa() if line.startswith("COMMANDS"))
        assert any(line.startswith("PENALTY CLEAR") for line in client.help())
        stat = counters(client)
        assert stat["Penalised sources"] == 2 and stat["Penalty delays"] == 2  # the 2nd and 3rd of 127.0.0.5
        assert client.clear_penalty("127.0.0.5") == "Cleared 1 source"
        assert set(client.penalties()) == {"127.0.0.2"}
        assert client.clear_penalty("127.0.0.5") == "Cleared 0 sources"
        with pytest.raises(MsmpError, match="Invalid address"):
            client.clear_penalty("not-an-ip")
        assert client.command("PENALTY FORGET 127.0.0.2").text == "Syntax error"
        assert client.clear_penalty() == "Cleared 1 source"
        assert client.penalties() == {}
        assert counters(client)["Penalised sources"] == 0
    cleared = failed_login_seconds(penalised, source="127.0.0.5")  # after CLEAR: the base delay again
    assert cleared < 0.4, cleared


@pytest.mark.slow
def test_penalty_is_forgotten_after_quiet_time(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(config=PENALTY_CONFIG + "auth_penalty_forget = 2\n", login_failure_delay=BASE)
    for _ in range(3):
        failed_login_seconds(server, source="127.0.0.5")
    with admin(server) as client:
        assert "127.0.0.5" in client.penalties()
        wait_until(lambda: not client.penalties(), timeout=10)


def test_a_valid_login_stays_fast_while_forty_connections_guess(start_server: Callable[..., ServerProcess]) -> None:
    """Regression: guesses filled gevent's shared thread pool, a valid login waited behind
    them (33 ms became 800 ms). Now hashes have their own threads and a clean source goes
    first. The guessers come from 8 sources, 5 connections each; no delay, so they hammer."""
    fresh = {f"v{i}": f"valid{i}pw" for i in range(10)}
    server = start_server(users={"alice": "alicepw", **fresh}, login_failure_delay=0)
    names = iter(fresh)  # each measured user logs in once: no cached check, always the slow hash
    baseline = statistics.median(good_login(server, next(names), "127.0.0.2") for _ in range(3))
    stop = False
    guesses = 0

    def guess(source: str) -> None:
        nonlocal guesses
        while not stop:
            try:
                with SourceClient(server.port, source) as client:
                    while not stop and client.cmd("USER alice") == b"+OK":
                        if not client.cmd("PASS guess").startswith(b"-ERR"):
                            break
                        guesses += 1
            except (OSError, EOFError):
                pass

    guessers = [gevent.spawn(guess, f"127.0.0.{10 + i % 8}") for i in range(40)]
    try:
        wait_until(lambda: guesses >= 40, timeout=30)
        loaded = statistics.median(good_login(server, next(names), "127.0.0.2") for _ in range(5))
    finally:
        stop = True
        gevent.joinall(guessers, timeout=30)
    print(f"valid login: {baseline * 1000:.0f} ms alone, {loaded * 1000:.0f} ms among {len(guessers)} guessers")
    assert guesses > 40
    assert loaded < 4 * baseline + 0.3, (loaded, baseline)


def test_plain_password_flags_warn_hashed_ones_do_not(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(users={"alice": "alicepw"})
    warnings = [line for line in server.log().splitlines() if "plain password on the command line" in line]
    assert len(warnings) == 2, warnings  # one for -u, one for -a
    assert "user alice" in warnings[0] and "geventpop3 hash" in warnings[0] and "alicepw" not in warnings[0]
    hashed = hash_entry("alice", "alicepw")
    quiet = start_server(users={}, admin=False, extra_args=["-u", hashed])
    assert "plain password" not in quiet.log()
    quiet.users["alice"] = "alicepw"
    good_login(quiet, "alice")  # the entry `geventpop3 hash` printed logs in


def hash_entry(name: str, password: str) -> str:
    result = subprocess.run([*GEVENTPOP3, "hash", name], input=password + "\n", cwd=REPO, env=server_env(),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stderr == "", result
    return result.stdout.strip()


def test_hash_command_prints_an_entry_the_server_accepts(tmp_path: Path) -> None:
    entry = hash_entry("bob", "s3cret")
    name, _, digest = entry.partition(":")
    assert name == "bob" and digest.startswith("$scrypt$n=16384,r=8,p=1$")
    stored = parse(digest, b"")
    assert stored.verify("s3cret") and not stored.verify("s3cret ")


@pytest.mark.parametrize(("args", "stdin", "fragment"), [
    (["a", "b"], "pw\n", "usage: geventpop3 hash"),
    (["--cost"], "pw\n", "usage: geventpop3 hash"),
    (["../x"], "pw\n", "unsafe user name"),
    ([], "two words\n", "invalid password"),
    ([], "", "invalid password"),
])
def test_hash_command_bad_use_is_one_line_and_exit_2(args: list[str], stdin: str, fragment: str) -> None:
    result = subprocess.run([*GEVENTPOP3, "hash", *args], input=stdin, cwd=REPO, env=server_env(),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and fragment in result.stderr, result.stderr
