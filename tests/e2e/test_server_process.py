"""The server as a process: signals, its log, listen addresses and start-up errors."""

from __future__ import annotations

import contextlib
import poplib
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    GEVENTPOP3,
    REPO,
    LineClient,
    ServerProcess,
    can_login,
    crlf,
    free_port,
    logged_in,
    run_server,
    server_env,
    wait_until,
)

from geventpop3.testing.ports import greets  # noqa: E402


@pytest.fixture
def custom_server(start_server: Callable[..., ServerProcess]) -> Callable[..., ServerProcess]:
    """Factory: a server with the listen flags the test chooses, ready once it accepts on every one of `hosts`."""
    return lambda listen, hosts: start_server(listen=listen, ready_hosts=hosts)


def drained(client: LineClient) -> bool:
    """True once the server has closed `client` (an RST counts as closed)."""
    with contextlib.suppress(ConnectionResetError):
        client.read_until_closed(timeout=10)
    return True


# -- signals -------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly_without_update(start_server: Callable[..., ServerProcess], sig: int) -> None:
    server = start_server()
    messages = [b"Subject: %d\n\nbody %d\n" % (i, i) for i in range(3)]
    for content in messages:
        server.deliver("alice", content)
    server.deliver("bob", b"Subject: big\n\n" + b"a line of a big message\n" * 700_000)
    before = {user: server.message_files(user) for user in ("alice", "bob")}

    deleting = logged_in(server, "alice")
    assert deleting.cmd("DELE 1").startswith(b"+OK")
    assert deleting.cmd("DELE 3").startswith(b"+OK")
    stalled = logged_in(server, "bob", "::1")
    assert stalled.cmd("DELE 1").startswith(b"+OK")
    stalled.send(b"RETR 1\r\n")  # a response larger than the socket buffers, never read
    waiting = LineClient(server.port)
    assert waiting.cmd("USER carol") == b"+OK"
    silent = LineClient(server.port, "::1", greet=False)

    started = time.monotonic()
    assert server.stop(sig) == 0
    assert time.monotonic() - started < 10
    for client in (deleting, waiting, silent):
        assert drained(client)
    stalled.close()
    assert {user: server.message_files(user) for user in ("alice", "bob")} == before
    log = server.log()
    assert "Traceback" not in log, log


class SlowStart:
    """A server whose start-up takes seconds (300,000 users to parse), signalled once its POP3
    port is bound: the signal handlers are in place by then, start-up is not done."""

    def __init__(self, tmp_path: Path, workers: int) -> None:
        users = tmp_path / "users"
        users.write_text("".join(f"user{n}:pw{n}\n" for n in range(300_000)))
        self.port = free_port()
        self.log = tmp_path / "server.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [*GEVENTPOP3, "-l", "127.0.0.1", "-p", str(self.port), "-P", "0", "-d", str(tmp_path / "mail"),
                 "--no-state", "--users-file", str(users), "--workers", str(workers)],
                cwd=REPO, env=server_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self.bound, timeout=30)

    def bound(self) -> bool:
        """The port takes connections (the kernel's backlog), greeted or not."""
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return True
        return False

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_during_start_up_stops_in_order_with_exit_0(tmp_path: Path, workers: int,
                                                                              sig: int) -> None:
    server = SlowStart(tmp_path, workers)
    try:
        server.process.send_signal(sig)
        assert server.process.wait(60) == 0, server.text()
        assert "INFO stopped" in server.text() and "Traceback" not in server.text(), server.text()
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_during_start_up_reloads_once_serving(tmp_path: Path, workers: int) -> None:
    """Not the default action (the process gone without a word): the reload comes once start-up is done."""
    server = SlowStart(tmp_path, workers)
    try:
        server.process.send_signal(signal.SIGHUP)
        wait_until(lambda: greets(server.port), timeout=60)
        wait_until(lambda: server.text().count("reload done") == (2 if workers > 1 else 1), timeout=30)
        assert "Traceback" not in server.text()
        server.process.terminate()
        assert server.process.wait(30) == 0
    finally:
        server.stop()


def test_restart_after_stop_serves_the_same_mail(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server()
    server.deliver("alice", b"Subject: kept\n\nstill here\n")
    session = logged_in(server, "alice")
    assert session.cmd("DELE 1").startswith(b"+OK")
    assert server.stop() == 0
    session.close()
    server.start()  # same Maildir, same ports; the lock of the killed session is not stale
    again = logged_in(server, "alice", "::1")
    assert again.retr(1) == crlf(b"Subject: kept\n\nstill here\n")
    assert again.cmd("QUIT").startswith(b"+OK")


# -- the log -------------------------------------------------------------------

def events(log: str, user: str) -> dict[str, list[str]]:
    """The log lines about `user`, by event: login, failed, logout."""
    found: dict[str, list[str]] = {"login": [], "failed": [], "logout": []}
    for line in log.splitlines():
        if not re.search(rf"\buser={re.escape(user)}(\s|$)", line):
            continue
        if "fail" in line:
            found["failed"].append(line)
        elif "logout" in line:
            found["logout"].append(line)
        elif "login" in line:
            found["login"].append(line)
    return found


def test_log_has_one_line_per_login_failure_and_logout_never_a_password(server: ServerProcess) -> None:
    secrets = ["alicepw", "bobpw", "carolpw", "Wr0ng-Secret", "an0ther secret"]
    alice = logged_in(server, "alice", "127.0.0.1")
    assert alice.cmd("QUIT").startswith(b"+OK")
    alice.close()
    intruder = LineClient(server.port, "::1")
    assert intruder.login("bob", "Wr0ng-Secret").startswith(b"-ERR [AUTH]")
    assert intruder.login("mallory", "an0ther secret").startswith(b"-ERR [AUTH]")
    intruder.close()
    carol = logged_in(server, "carol", "::1")
    carol.reset()  # gone without QUIT: still one logout line

    def complete() -> dict[str, dict[str, list[str]]] | None:
        log = server.log()
        per_user = {user: events(log, user) for user in ("alice", "bob", "mallory", "carol")}
        return per_user if per_user["carol"]["logout"] and per_user["alice"]["logout"] else None

    per_user = wait_until(complete)
    assert isinstance(per_user, dict)
    expected = {
        "alice": {"login": 1, "failed": 0, "logout": 1},
        "bob": {"login": 0, "failed": 1, "logout": 0},
        "mallory": {"login": 0, "failed": 1, "logout": 0},
        "carol": {"login": 1, "failed": 0, "logout": 1},
    }
    assert {user: {k: len(v) for k, v in found.items()} for user, found in per_user.items()} == expected
    for user, address in (("alice", "127.0.0.1"), ("bob", "::1"), ("mallory", "::1"), ("carol", "::1")):
        for line in sum(per_user[user].values(), []):
            assert re.search(rf"\brip={re.escape(address)}(\s|$)", line), line
    log = server.log()
    for secret in secrets:
        assert secret not in log


# -- listen addresses ----------------------------------------------------------

def localhost_addresses() -> list[str]:
    infos = socket.getaddrinfo("localhost", None, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def test_listen_on_host_name(custom_server: Callable[..., ServerProcess]) -> None:
    addresses = localhost_addresses()
    server = custom_server(["localhost"], addresses)
    server.deliver("alice", b"Subject: by name\n\nhello\n")
    for host in addresses + ["localhost"]:
        client = poplib.POP3(host, server.port, timeout=10)
        client.user("alice")
        client.pass_("alicepw")
        assert client.retr(1)[1] == [b"Subject: by name", b"", b"hello"]
        client.quit()


def test_default_listen_takes_ipv4_and_ipv6(custom_server: Callable[..., ServerProcess]) -> None:
    server = custom_server([], ["127.0.0.1", "::1"])
    assert "-l" not in server.args
    for host in ("127.0.0.1", "::1"):
        client = logged_in(server, "alice", host)
        assert client.cmd("STAT") == b"+OK 0 0"
        assert client.cmd("QUIT").startswith(b"+OK")
        client.close()
    wait_until(lambda: can_login(server, "alice"))
    # One dual-stack socket sees IPv4 clients as ::ffff:127.0.0.1; the log must say 127.0.0.1.
    logins = events(server.log(), "alice")["login"]
    assert any(re.search(r"\brip=127\.0\.0\.1\s", line) for line in logins), logins
    assert any(re.search(r"\brip=::1\s", line) for line in logins), logins


# -- start-up errors -----------------------------------------------------------

LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ geventpop3\[\d+\] [A-Z]+ ")


@pytest.mark.parametrize("listen", [["-l", "127.0.0.1"], []], ids=["ipv4", "default"])
def test_pop3_port_in_use_is_one_line_and_exit_2(tmp_path: Path, listen: list[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_server(*listen, "-p", str(port), "-P", str(free_port()), "-d", str(tmp_path / "mail"),
                            "--state-dir", str(tmp_path / "state"), "-u", "alice:alicepw")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "in use" in lines[0] and "Traceback" not in result.stderr


def test_admin_port_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        admin_port = taken.getsockname()[1]
        result = run_server("-l", "127.0.0.1", "-p", str(free_port()), "-P", str(admin_port), "-L", "127.0.0.1",
                            "-d", str(tmp_path / "mail"), "--state-dir", str(tmp_path / "state"),
                            "-u", "alice:alicepw", "-a", "admin:adminpw")
    assert result.returncode == 2
    # The POP3 listener may have logged its start before MSMP failed; the error itself is one line.
    lines = [line for line in result.stderr.strip().splitlines() if not LOG_RECORD.match(line)]
    assert len(lines) == 1, result.stderr
    assert "in use" in lines[0] and "Traceback" not in result.stderr
