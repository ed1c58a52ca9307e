"""POP3 over raw sockets against the real server process: pipelining, the lock, UPDATE, limits.

`LineClient` (helpers.py) reads exactly what the server sends, so the tests see the
wire, not a library's view of it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest
from helpers import CRLF, LineClient, ServerProcess, can_login, crlf, logged_in, wait_until

MESSAGES = [
    b"From: a@example.org\nSubject: one\n\nfirst body\n.leading dot\n",
    b"From: b@example.org\r\nSubject: two\r\n\r\nsecond\r\n..two dots\r\n.\r\nend\r\n",
    b"Subject: three\n\nno final newline",
]


def test_pipelining_1000_commands_in_one_write(server: ServerProcess) -> None:
    for content in MESSAGES:
        server.deliver("alice", content)
    sizes = [len(crlf(m)) for m in MESSAGES]
    uids = [os.path.basename(p).split(":")[0] for p in sorted(server.message_files("alice"))]
    commands = [b"USER alice", b"PASS alicepw"]
    expected = [b"+OK", b"+OK Logged in, 3 messages"]
    for i in range(996):
        k = i % 3 + 1
        kind = i % 4
        if kind == 0:
            commands.append(f"LIST {k}".encode())
            expected.append(f"+OK {k} {sizes[k - 1]}".encode())
        elif kind == 1:
            commands.append(f"UIDL {k}".encode())
            expected.append(f"+OK {k} {uids[k - 1]}".encode())
        elif kind == 2:
            commands.append(b"NOOP")
            expected.append(b"+OK")
        else:
            commands.append(f"LIST {k + 3}".encode())
            expected.append(b"-ERR No such message")
    commands += [b"STAT", b"QUIT"]
    expected += [f"+OK 3 {sum(sizes)}".encode(), b"+OK Bye, 0 messages deleted"]
    assert len(commands) == 1000
    client = LineClient(server.port)
    client.send(b"".join(c + CRLF for c in commands))
    data = client.read_until_closed()
    assert data.split(CRLF) == expected + [b""]


def test_pipelined_retr_and_multiline_answers_keep_order(server: ServerProcess) -> None:
    for content in MESSAGES:
        server.deliver("alice", content)
    client = logged_in(server)
    client.send(b"RETR 1\r\nLIST\r\nRETR 2\r\nTOP 3 0\r\nRETR 3\r\nNOOP\r\n")
    assert client.line().startswith(b"+OK")
    assert client.body() == crlf(MESSAGES[0])
    assert client.line().startswith(b"+OK")
    listing = client.body()
    assert listing.split(CRLF)[:3] == [f"{i + 1} {len(crlf(m))}".encode() for i, m in enumerate(MESSAGES)]
    assert client.line().startswith(b"+OK")
    assert client.body() == crlf(MESSAGES[1])
    assert client.line().startswith(b"+OK")
    assert client.body() == b"Subject: three\r\n\r\n"
    assert client.line().startswith(b"+OK")
    assert client.body() == crlf(MESSAGES[2])
    assert client.line() == b"+OK"
    client.close()


def _end_quit(client: LineClient) -> None:
    assert client.cmd("QUIT").startswith(b"+OK")
    client.close()


def _end_close(client: LineClient) -> None:
    client.close()


def _end_reset(client: LineClient) -> None:
    client.reset()


@pytest.mark.parametrize("end", [_end_quit, _end_close, _end_reset], ids=["quit", "close", "rst"])
def test_second_login_is_in_use_until_first_session_ends(
    server: ServerProcess, end: Callable[[LineClient], None]
) -> None:
    first = logged_in(server, "alice", "::1")
    second = LineClient(server.port)
    assert second.cmd("USER alice") == b"+OK"
    started = time.monotonic()
    reply = second.cmd("PASS alicepw")
    assert reply.startswith(b"-ERR [IN-USE]"), reply
    assert time.monotonic() - started < 3.0  # at once: a wait for the lock would hit the 10 s read timeout
    # The failed attempt does not end the second session, nor block other mailboxes.
    assert second.login("bob", "bobpw").startswith(b"+OK")
    end(first)
    wait_until(lambda: can_login(server, "alice"))
    second.close()


def test_lock_is_per_mailbox_and_holds_across_families(server: ServerProcess) -> None:
    first = logged_in(server, "alice", "127.0.0.1")
    assert logged_in(server, "bob", "::1").cmd("STAT").startswith(b"+OK")
    other = LineClient(server.port, "::1")
    assert other.login("alice", "alicepw").startswith(b"-ERR [IN-USE]")
    first.close()
    other.close()


def test_dele_without_quit_deletes_nothing(server: ServerProcess) -> None:
    for content in MESSAGES:
        server.deliver("alice", content)
    before = server.message_files("alice")
    client = logged_in(server)
    assert client.cmd("DELE 1").startswith(b"+OK")
    assert client.cmd("DELE 3").startswith(b"+OK")
    assert client.cmd("STAT") == f"+OK 1 {len(crlf(MESSAGES[1]))}".encode()
    client.close()
    wait_until(lambda: can_login(server, "alice"))
    assert server.message_files("alice") == before


def test_dele_and_quit_deletes(server: ServerProcess) -> None:
    for content in MESSAGES:
        server.deliver("alice", content)
    files = server.message_files("alice")
    client = logged_in(server)
    assert client.cmd("DELE 2").startswith(b"+OK")
    assert client.cmd("RETR 2").startswith(b"-ERR")
    assert client.cmd("DELE 2").startswith(b"-ERR")
    assert client.cmd("QUIT") == b"+OK Bye, 1 messages deleted"
    assert client.read_until_closed() == b""
    assert server.message_files("alice") == [files[0], files[2]]
    again = logged_in(server)
    assert again.cmd("STAT").startswith(b"+OK 2 ")
    assert again.retr(2) == crlf(MESSAGES[2])
    again.close()


def test_rset_undoes_deletions(server: ServerProcess) -> None:
    for content in MESSAGES:
        server.deliver("alice", content)
    before = server.message_files("alice")
    client = logged_in(server)
    assert client.cmd("DELE 1").startswith(b"+OK")
    assert client.cmd("DELE 2").startswith(b"+OK")
    assert client.cmd("STAT").startswith(b"+OK 1 ")
    assert client.cmd("RSET").startswith(b"+OK")
    assert client.cmd("STAT").startswith(b"+OK 3 ")
    assert client.retr(1) == crlf(MESSAGES[0])
    assert client.cmd("QUIT") == b"+OK Bye, 0 messages deleted"
    client.close()
    assert server.message_files("alice") == before


def test_delivery_during_session_shows_in_next_session(server: ServerProcess) -> None:
    server.deliver("alice", MESSAGES[0])
    client = logged_in(server)
    stat = client.cmd("STAT")
    assert stat == f"+OK 1 {len(crlf(MESSAGES[0]))}".encode()
    server.deliver("alice", MESSAGES[1])
    assert client.cmd("STAT") == stat
    assert client.cmd("LIST 2") == b"-ERR No such message"
    assert client.cmd("QUIT").startswith(b"+OK")
    client.close()
    again = logged_in(server)
    assert again.cmd("STAT").startswith(b"+OK 2 ")
    assert again.retr(2) == crlf(MESSAGES[1])
    again.close()


def test_file_removed_during_session(server: ServerProcess) -> None:
    for content in MESSAGES:
        server.deliver("alice", content)
    client = logged_in(server)
    os.unlink(server.message_files("alice")[1])
    assert client.cmd("RETR 2").startswith(b"-ERR")
    assert client.cmd("TOP 2 0").startswith(b"-ERR")
    assert client.cmd("NOOP") == b"+OK"
    assert client.retr(3) == crlf(MESSAGES[2])
    assert client.cmd("DELE 2").startswith(b"+OK")
    assert client.cmd("QUIT").startswith(b"+OK")  # already gone counts as deleted
    client.close()
    assert len(server.message_files("alice")) == 2


def test_list_sizes_equal_octets_of_retr(server: ServerProcess) -> None:
    contents = MESSAGES + [
        b"Subject: big\n\n" + b"".join(b".%d dotted line\n" % i if i % 3 else b"line %d\r\n" % i for i in range(30000)),
        b"Subject: 8bit\n\n" + bytes(range(128, 256)) + b"\n\r\n.\n..\n",
        b"\n",
    ]
    for content in contents:
        server.deliver("alice", content)
    client = logged_in(server)
    _, listing = client.multi("LIST")
    sizes = [int(line.split()[1]) for line in listing.split(CRLF) if line]
    total = 0
    for number, size in enumerate(sizes, 1):
        first, body = client.multi(f"RETR {number}")
        assert first == f"+OK {size} octets".encode()
        assert len(body) == size
        assert body == crlf(contents[number - 1])
        total += size
    assert client.cmd("STAT") == f"+OK {len(contents)} {total}".encode()
    client.close()


def test_top(server: ServerProcess) -> None:
    server.deliver("alice", b"From: x\nSubject: top\n\n.one\ntwo\nthree\n")
    client = logged_in(server)
    assert client.multi("TOP 1 0")[1] == b"From: x\r\nSubject: top\r\n\r\n"
    assert client.multi("TOP 1 2")[1] == b"From: x\r\nSubject: top\r\n\r\n.one\r\ntwo\r\n"
    assert client.multi("TOP 1 99")[1] == crlf(b"From: x\nSubject: top\n\n.one\ntwo\nthree\n")
    assert client.cmd("TOP 1") == b"-ERR Syntax error"
    assert client.cmd("TOP 2 0") == b"-ERR No such message"
    client.close()


@pytest.mark.slow
def test_idle_timeout_closes_silent_client_only(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(config="idle_timeout = 1\n")
    busy = logged_in(server, "bob")
    silent = logged_in(server, "alice")
    started = time.monotonic()
    silent.sock.settimeout(0.3)
    closed = b""
    while time.monotonic() - started < 10:
        assert busy.cmd("NOOP") == b"+OK"
        try:
            if not silent.fill():
                closed = silent.buffer
                break
        except TimeoutError:
            continue
    else:
        pytest.fail("silent client was not closed")
    assert closed.startswith(b"-ERR"), closed
    assert time.monotonic() - started >= 0.9
    assert busy.cmd("STAT").startswith(b"+OK")
    wait_until(lambda: can_login(server, "alice"))
    busy.close()


def test_connection_limit(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(config="max_connections = 3\n")
    clients = [LineClient(server.port, host) for host in ("127.0.0.1", "::1", "127.0.0.1")]
    assert all(c.greeting.startswith(b"+OK") for c in clients)
    extra = LineClient(server.port, greet=False)
    assert extra.read_until_closed() == b"-ERR [SYS/TEMP] too many connections\r\n"
    assert clients[0].cmd("NOOP").startswith(b"-ERR")  # the others still work (not logged in)
    clients.pop().close()

    def greeted() -> bool:
        probe = LineClient(server.port, greet=False)
        try:
            return probe.line().startswith(b"+OK")
        finally:
            probe.close()

    wait_until(greeted)
    for client in clients:
        client.close()


def test_failed_logins_are_delayed_and_closed_after_three(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(extra_args=["--login-failure-delay", "0.3"])
    client = LineClient(server.port)
    answers = []
    for user, password in (("alice", "wrong"), ("nosuchuser", "alicepw"), ("alice", "Alicepw")):
        assert client.cmd(f"USER {user}") == b"+OK"
        started = time.monotonic()
        answers.append(client.cmd(f"PASS {password}"))
        assert time.monotonic() - started >= 0.3
    assert answers[0].startswith(b"-ERR [AUTH]")
    assert len(set(answers)) == 1  # unknown user and wrong password look the same
    assert client.read_until_closed() == b""
    assert can_login(server, "alice")


def test_unknown_user_and_wrong_password_same_answer(server: ServerProcess) -> None:
    answers = set()
    for user, password in (("alice", "nope"), ("mallory", "nope"), ("mallory", "alicepw"), ("ALICE", "alicepw")):
        client = LineClient(server.port, "::1")
        assert client.cmd(f"USER {user}") == b"+OK"
        answers.add(client.cmd(f"PASS {password}"))
        client.close()
    assert len(answers) == 1
    assert answers.pop().startswith(b"-ERR [AUTH]")


@pytest.mark.slow
def test_path_user_names_are_refused(server: ServerProcess) -> None:
    outside = sorted(os.listdir(server.root))
    inside = sorted(os.listdir(server.maildir))
    tmp_x = os.path.exists("/tmp/x")
    for name in ("../bob", "../../escape", "bob/../alice", "..", ".", "a/b", "/tmp/x", "../server0/mail/bob"):
        client = LineClient(server.port)
        assert client.cmd(f"USER {name}") == b"+OK"
        reply = client.cmd("PASS bobpw" if "bob" in name else "PASS alicepw")
        assert reply == b"-ERR [AUTH] Invalid user name or password", name
        assert client.cmd("STAT") == b"-ERR Not logged in"
        client.close()
    assert sorted(os.listdir(server.root)) == outside
    assert sorted(os.listdir(server.maildir)) == inside
    assert os.path.exists("/tmp/x") == tmp_x
