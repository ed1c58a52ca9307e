"""Both protocols against the real server process: what an admin changes over MSMP,
POP3 clients see at once (users, Maildir root, limits), and what POP3 clients do,
MSMP reports (STAT counters, access logs). Real sockets, IPv4 and IPv6 loopback.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    ADMIN,
    LineClient,
    ServerProcess,
    admin,
    counters,
    crlf,
    login_error,
    logs_with,
    pop3,
    quiet_stat,
    retr,
    wait_until,
)

from admin.client import MsmpClient, MsmpConnectionError, Response
from geventpop3.mail import maildir

HOSTS = ["127.0.0.1", "::1"]
AUTH_FAILED = b"-ERR [AUTH]"


# -- users ---------------------------------------------------------------------

@pytest.mark.parametrize("host", HOSTS)
def test_added_user_logs_in_over_pop3_at_once(server: ServerProcess, host: str) -> None:
    with admin(server, host) as client:
        assert client.add_user("dave", "d4ve-pw") == "Added user"
        home = Path(server.user_dir("dave"))
        assert all((home / sub).is_dir() for sub in ("cur", "new", "tmp"))
        assert "dave" in client.list_users()
    content = b"Subject: hello dave\n\nwelcome\n"
    server.deliver("dave", content)
    session = pop3(server, "dave", "d4ve-pw", host)
    assert session.stat() == (1, len(crlf(content)))
    assert retr(session, 1) == crlf(content)
    session.quit()


def test_add_existing_user_changes_the_password_at_once(server: ServerProcess) -> None:
    server.deliver("alice", b"Subject: x\n\nbody\n")
    with admin(server) as client:
        assert pop3(server, "alice", "alicepw").quit().startswith(b"+OK")  # warms any cache of the old password
        assert client.add_user("alice", "n3w-alice") == "Updated password"
    assert login_error(server, "alice", "alicepw").startswith(AUTH_FAILED)
    session = pop3(server, "alice", "n3w-alice", "::1")
    assert session.stat()[0] == 1
    session.quit()


def test_add_existing_user_leaves_open_sessions_alone(server: ServerProcess) -> None:
    server.deliver("alice", b"Subject: x\n\nbody\n")
    session = pop3(server, "alice", "alicepw")
    with admin(server) as client:
        assert client.add_user("alice", "other-pw") == "Updated password"
    assert retr(session, 1) == crlf(b"Subject: x\n\nbody\n")
    session.quit()


def test_dele_refused_while_logged_in_then_moves_the_mail_aside(server: ServerProcess) -> None:
    contents = [b"Subject: one\n\nfirst\n", b"Subject: two\n\nsecond\n"]
    for content in contents:
        server.deliver("bob", content)
    unknown = login_error(server, "nosuchuser", "whatever")
    session = pop3(server, "bob", "bobpw", "::1")
    with admin(server) as client:
        response = client.command("DELE bob")
        assert (response.ok, response.text) == (False, "User is currently logged in")
        assert "logged-in=yes" in client.user_info("bob")["line"]
        assert session.stat()[0] == 2  # the refused DELE did not disturb the session
        session.quit()
        # The session's end (lock release) follows its QUIT answer: poll.
        wait_until(lambda: client.command("DELE bob").ok)
        assert "bob" not in client.list_users()
        assert client.command("LIST bob").text == "User does not exist"
        assert client.command("DELE bob").text == "User does not exist"
        assert logs_with(client, "bob", "logout")  # the log outlives the account

    assert not os.path.exists(server.user_dir("bob"))
    moved = list((server.maildir / ".deleted").iterdir())
    assert len(moved) == 1 and re.fullmatch(r"bob\.\d{14}(-\d+)?", moved[0].name), moved
    kept = sorted(path.read_bytes() for sub in ("new", "cur") for path in (moved[0] / sub).iterdir()
                  if not path.name.startswith("."))
    assert kept == sorted(contents)

    assert login_error(server, "bob", "bobpw") == unknown
    assert unknown.startswith(AUTH_FAILED)

    with admin(server) as client:  # the name can be used again, with an empty mailbox
        assert client.add_user("bob", "fresh-pw") == "Added user"
    session = pop3(server, "bob", "fresh-pw")
    assert session.stat() == (0, 0)
    session.quit()


UNSAFE_NAMES = ["../x", ".x", "x" * 41, "-x", "a/b", "..", "x\\y", "Ünïcode", "../../etc/passwd"]


def test_unsafe_user_names_are_refused(server: ServerProcess) -> None:
    def tree() -> list[str]:
        return sorted(str(path.relative_to(server.root.parent)) for path in server.root.parent.rglob("*"))

    with admin(server) as client:
        before = tree()
        for name in UNSAFE_NAMES:
            response = client.command(f"ADD {name} secret")
            assert (response.ok, response.text) == (False, "Unsafe username"), name
        assert client.list_users() == ["alice", "bob", "carol"]
        assert tree() == before


def test_longest_safe_name_is_accepted(server: ServerProcess) -> None:
    name = "x" * 40
    with admin(server) as client:
        assert client.add_user(name, "pw") == "Added user"
    pop3(server, name, "pw").quit()


def test_user_limit(server: ServerProcess) -> None:
    with admin(server) as client:
        assert len(client.list_users()) == 3
        assert client.set("user_limit", "3") == "Changed value"
        response = client.command("ADD dave davepw")
        assert (response.ok, response.text) == (False, "User limit reached")
        assert not os.path.exists(server.user_dir("dave"))
        assert client.add_user("alice", "still-allowed") == "Updated password"
        assert client.set("user_limit", "4") == "Changed value"
        assert client.add_user("dave", "davepw") == "Added user"
        assert client.command("ADD erin erinpw").text == "User limit reached"
        assert client.get("user_limit") == "4"
    pop3(server, "dave", "davepw").quit()


# -- settings ------------------------------------------------------------------

def test_set_maildir_new_sessions_see_the_new_root_open_ones_keep_theirs(server: ServerProcess) -> None:
    old_mail = b"Subject: old root\n\nold\n"
    new_mail = b"Subject: new root\n\nnew, and longer\n"
    server.deliver("alice", old_mail)
    new_root = server.root / "mail2"
    maildir.deliver(str(new_root / "alice"), new_mail)

    before = pop3(server, "alice", "alicepw")
    with admin(server) as client:
        assert client.set("maildir", str(new_root)) == "Changed value"
        assert client.get("maildir") == str(new_root)
        after = pop3(server, "alice", "alicepw", "::1")  # the old root's lock is not this one
        assert after.stat() == (1, len(crlf(new_mail)))
        assert retr(after, 1) == crlf(new_mail)
        assert retr(before, 1) == crlf(old_mail)
        assert before.dele(1).startswith(b"+OK")
        before.quit()
        after.quit()
        # The old session's QUIT deleted from the old root, not the new one.
        assert server.message_files("alice") == []
        assert len(maildir.Mailbox(str(new_root), "alice").snapshot()) == 1
        # MSMP ADD works in the new root too.
        assert client.add_user("dave", "davepw") == "Added user"
        assert (new_root / "dave" / "new").is_dir()
        assert not (server.maildir / "dave").exists()


def test_set_maildir_to_a_non_directory_is_refused(server: ServerProcess) -> None:
    with admin(server) as client:
        for target in (server.config_path, server.root / "no-such-dir", "/dev/null"):
            response = client.command(f"SET maildir {target}")
            assert (response.ok, response.text) == (False, "Invalid value: not an existing directory"), target
        assert client.get("maildir") == str(server.maildir)
    pop3(server, "alice", "alicepw").quit()


def settable_values(server: ServerProcess) -> dict[str, str]:
    """A valid value for every key, as GET shows it back."""
    new_root = server.root / "other-root"
    new_root.mkdir()
    return {
        "maildir": str(new_root),
        "transformer": "none",
        "max_connections": "500",
        "idle_timeout": "30",
        "login_timeout": "45",
        "max_connections_per_ip": "40",
        "max_sessions_per_user_ip": "3",
        "admin_max_connections": "15",
        "admin_max_connections_per_source": "3",
        "admin_login_timeout": "20",
        "login_failure_delay": "0.05",
        "max_login_failures": "5",
        "user_limit": "1000",
        "admin_idle_timeout": "300",
        "log_level": "DEBUG",
        "transformer_timeout": "2.5",
        "transformer_concurrency": "2",
        "transformer_failure": "passthrough",
        "transformer_max_output": "1048576",
        "log_retention_count": "50",
        "log_retention_days": "7",
        "plaintext_auth": "tls",
        "trusted_networks": "10.0.0.0/8,2001:db8::/32",
        "proxy_networks": "192.0.2.0/24",  # POP3 would now be refused from loopback: nothing here uses it after
        "tls_min_version": "TLSv1.3",
        "log_retention_total": "5000",
        "auth_penalty_max": "4",
        "auth_penalty_forget": "60",
        "auth_penalty_sources": "1000",
        "auth_hash_threads": "3",
        "auth_hash_queue": "20",
        "lease_timeout": "12",
        "auth_hash_memory": "512",
        "max_messages_per_mailbox": "5000",
        "max_message_size": "2097152",
    }


READ_ONLY_KEYS = {"transformer_programs": "*", "uidl_format": "%f"}  # GET only; set in the config file


def test_get_returns_every_key_set_accepts(server: ServerProcess) -> None:
    values = settable_values(server)
    with admin(server) as client:
        keys_lines = [line for line in client.capa() if line.startswith("KEYS ")]
        assert all(len(line) <= 509 for line in keys_lines)  # the response line limit, dot-stuffing included
        listed = [key for line in keys_lines for key in line.split()[1:]]
        assert sorted(listed) == sorted([*values, *READ_ONLY_KEYS])
        for key in values:
            assert client.command(f"GET {key}").ok, key
        for key, value in READ_ONLY_KEYS.items():
            assert client.get(key) == value
            assert not client.command(f"SET {key} {value}").ok
        assert client.get("login_failure_delay") == "0.05"  # from the config file
        assert client.get("maildir") == str(server.maildir)
        for key, value in values.items():
            assert client.set(key, value) == "Changed value", key
        assert {key: client.get(key) for key in values} == values
        assert client.set("log_level", "warning") == "Changed value"
        assert client.get("log_level") == "WARNING"
        assert client.command("GET nosuchkey").text == "Invalid key"
        assert client.command("GET MAILDIR").text == "Invalid key"
        assert client.command("SET idle_timeout 0").text.startswith("Invalid value")
        assert client.command("SET idle_timeout soon").text.startswith("Invalid value")
        assert client.get("idle_timeout") == "30"


def test_max_connections_applies_to_new_connections(server: ServerProcess) -> None:
    with admin(server) as client:
        quiet_stat(client)
        assert client.set("max_connections", "1") == "Changed value"
        first = LineClient(server.port)
        assert first.greeting.startswith(b"+OK")
        second = LineClient(server.port, "::1")
        assert second.greeting.startswith(b"-ERR"), second.greeting
        assert second.read_until_closed() == b""
        assert client.set("max_connections", "2") == "Changed value"
        third = LineClient(server.port, "::1")
        assert third.greeting.startswith(b"+OK")
        assert first.cmd("QUIT").startswith(b"+OK") and third.cmd("QUIT").startswith(b"+OK")


@pytest.mark.slow
def test_idle_timeout_applies_to_new_sessions(server: ServerProcess) -> None:
    with admin(server) as client:
        assert client.set("idle_timeout", "1") == "Changed value"
    silent = LineClient(server.port)
    started = time.monotonic()
    tail = silent.read_until_closed(timeout=10)
    assert tail.startswith(b"-ERR Idle timeout"), tail
    assert 0.8 < time.monotonic() - started < 5


# -- statistics and access logs --------------------------------------------------

def test_stat_counters_rise_after_pop3_sessions(server: ServerProcess) -> None:
    first, second = b"Subject: 1\n\none\n", b"Subject: 2\n\ntwo\n"
    server.deliver("alice", first)
    server.deliver("alice", second)
    with admin(server) as client:
        before = quiet_stat(client)
        session = LineClient(server.port, "::1")
        received = session.greeting + b"\r\n"
        sent = b""
        for command in ("USER alice", "PASS alicepw", "RETR 1", "DELE 2"):
            sent += command.encode() + b"\r\n"
            answer = session.cmd(command)
            received += answer + b"\r\n"
            if command.startswith("RETR"):
                received += session.body() + b".\r\n"  # the message needs no dot-stuffing
        sent += b"QUIT\r\n"
        session.send(b"QUIT\r\n")
        received += session.read_until_closed()
        failed = LineClient(server.port)
        refusal = failed.login("bob", "wrong")
        assert refusal.startswith(AUTH_FAILED)
        sent += b"USER bob\r\nPASS wrong\r\n"
        received += failed.greeting + b"\r\n+OK\r\n" + refusal + b"\r\n"
        failed.close()
        after = quiet_stat(client)

    grew = {name: after[name] - before[name] for name in after}
    assert grew["Total connections"] == 2
    assert grew["Logins ok"] == 1
    assert grew["Logins failed"] == 1
    assert grew["Messages retrieved"] == 1
    assert grew["Messages deleted"] == 1
    assert grew["Total transferred bytes"] == grew["Bytes sent"] + grew["Bytes received"]
    assert grew["Bytes received"] == len(sent)
    assert grew["Bytes sent"] == len(received)
    assert after["Uptime seconds"] >= 0


def test_historical_maximum_traffic(server: ServerProcess) -> None:
    with admin(server, "::1") as client:
        base = quiet_stat(client)
        clients = [LineClient(server.port, host) for host in HOSTS + HOSTS]
        stat = wait_until(lambda: (s := counters(client))["Current connections"] == 4 and s)
        assert stat["Historical maximum traffic"] == max(base["Historical maximum traffic"], 4)
        for raw in clients:
            raw.close()
        after = quiet_stat(client)
        assert after["Historical maximum traffic"] == stat["Historical maximum traffic"]
        assert after["Total connections"] == base["Total connections"] + 4


@pytest.mark.parametrize("host", HOSTS)
def test_logs_show_pop3_sessions_with_the_client_address(server: ServerProcess, host: str) -> None:
    for i in range(3):
        server.deliver("alice", b"Subject: %d\n\nbody\n" % i)
    session = pop3(server, "alice", "alicepw", host)
    port = session.sock.getsockname()[1]
    retr(session, 1)
    retr(session, 2)
    session.dele(3)
    session.quit()
    login_error(server, "alice", "wrong", host)
    with admin(server, host) as client:
        lines = logs_with(client, "alice", "login-failed")
    prefix = rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d IP: {re.escape(host)} port="
    assert re.fullmatch(prefix + rf"{port} login", lines[0]), lines
    assert re.fullmatch(prefix + rf"{port} logout retr=2 dele=1 top=0 bytes=\d+ duration=[\d.]+s ended=quit",
                        lines[1]), lines
    assert re.fullmatch(prefix + r"\d+ login-failed reason=auth", lines[2]), lines


def test_logs_n_limits_and_list_counts(server: ServerProcess) -> None:
    for _ in range(3):
        pop3(server, "carol", "carolpw").quit()
    login_error(server, "ghost", "pw")
    with admin(server) as client:
        every = logs_with(client, "carol", "logout", 3)
        assert len(every) == 6
        assert client.logs("carol", 2) == every[-2:]
        assert client.logs("carol", 1) == every[-1:]
        assert client.logs("carol", 100000) == every
        assert int(client.user_info("carol")["logs"]) == 6
        assert client.user_info("bob")["line"].startswith("bob 0 logs")
        assert client.logs("bob") == []
        # Failed logins under names that are no user share one bucket (issue 9).
        assert client.logs("-unknown-")[-1].endswith("login-failed reason=auth tried=ghost")
        assert client.command("LOGS ghost").text == "Invalid user"
        for bad in ("0", "-1", "x", "1.5"):
            assert client.command(f"LOGS carol {bad}").text == "Invalid number: n must be a positive integer"
        assert client.command("LOGS nobody").text == "Invalid user"
        assert client.command("LOGS").text == "Syntax error"


# -- bad input on MSMP -------------------------------------------------------------

@pytest.mark.parametrize("host", HOSTS)
def test_bad_msmp_input_gets_an_error_and_the_session_goes_on(server: ServerProcess, host: str) -> None:
    with admin(server):  # wait for the MSMP listener
        pass
    raw = LineClient(server.admin_port, host)
    assert raw.greeting.startswith(b"+OK MSMP1")
    checks: list[tuple[bytes, Callable[[bytes], bool]]] = [
        (b"STAT", lambda r: r == b"-ERR Not authenticated"),
        (b"ADD eve evepw", lambda r: r == b"-ERR Not authenticated"),
        (b"SET maildir /tmp", lambda r: r == b"-ERR Not authenticated"),
        (b"LOGS alice", lambda r: r == b"-ERR Not authenticated"),
        (b"\xff\xfe\x80junk", lambda r: r.startswith(b"-ERR")),
        (b"USER " + ADMIN[0].encode(), lambda r: r == b"+OK"),
        (b"PASS " + ADMIN[1].encode(), lambda r: r == b"+OK Logged in"),
        (b"X" * 300, lambda r: r == b"-ERR Line too long"),
        (b"GET " + b"k" * 300, lambda r: r == b"-ERR Line too long"),
        (b"\xff\xfe\x80junk", lambda r: r == b"-ERR Invalid command: not UTF-8 text"),
        (b"GET idle\x00_timeout", lambda r: r == b"-ERR Invalid command: contains NUL"),
        (bytes(range(1, 32)).replace(b"\r", b"").replace(b"\n", b""), lambda r: r.startswith(b"-ERR")),
        (b"", lambda r: r == b"-ERR Unknown command"),
        (b"FROB x", lambda r: r == b"-ERR Unknown command"),
        (b"SET idle_timeout 1 2", lambda r: r == b"-ERR Syntax error"),
        (b"SET transformer /bin/echo hello", lambda r: r == b"-ERR Syntax error"),
        (b"SET " + b"k" * 41 + b" 1", lambda r: r == b"-ERR Invalid key"),
        (b"GET " + b"k" * 41, lambda r: r == b"-ERR Invalid key"),
        (b"SET transformer /" + b"v" * 100, lambda r: r.startswith(b"-ERR Invalid value")),
        (b"ADD eve " + b"p" * 101, lambda r: r == b"-ERR Invalid password"),
        (b"GET idle_timeout", lambda r: r == b"+OK 600"),
    ]
    for data, expected in checks:
        answer = raw.cmd(data)
        assert expected(answer), (data[:60], answer)
    # A line far beyond the limit is one error, and nothing of it is taken as commands.
    raw.sock.sendall(b"STAT " * 20000 + b"\r\nGET user_limit\r\n")
    assert raw.line() == b"-ERR Line too long"
    assert raw.line() == b"+OK 100000"
    # Pipelined junk and good commands: answered in order.
    raw.sock.sendall(b"\x00\x01\x02\r\nGET log_level\r\nADD ../x pw\r\nQUIT\r\n")
    assert raw.line().startswith(b"-ERR Invalid command")
    assert raw.line() == b"+OK INFO"
    assert raw.line() == b"-ERR Unsafe username"
    assert raw.line() == b"+OK Bye"
    raw.close()
    # Nothing of it reached the server's settings or users, and nothing crashed.
    with admin(server, host) as client:
        assert client.get("transformer") == "none"
        assert client.list_users() == ["alice", "bob", "carol"]
    assert "Traceback" not in server.log()


def test_failed_msmp_logins_close_after_three(server: ServerProcess) -> None:
    with admin(server):
        pass
    client = MsmpClient("::1", server.admin_port)
    client.connect()
    answers: list[Response] = []
    for _ in range(3):
        answers.append(client.command("USER admin"))
        answers.append(client.command("PASS wrong"))
    assert [a.text for a in answers if not a.ok] == ["Invalid credentials"] * 3
    with pytest.raises(MsmpConnectionError):
        client.command("CAPA")
