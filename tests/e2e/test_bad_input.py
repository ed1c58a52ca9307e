"""Every bad input of pop3.md against the real server, each with a bystander session.

For each case a good session (bob, over IPv6) is opened *before* the bad one; after
the bad one it must still answer STAT and RETR correctly, the server must still
accept new sessions, the bad session's mailbox lock must be released, no message
file may be lost or changed, and the server log must hold no traceback.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from helpers import CRLF, LineClient, ServerProcess, can_login, crlf, logged_in

ALICE = [
    b"From: a@example.org\nSubject: one\n\nfirst\n.dot\n",
    b"From: a@example.org\r\nSubject: two\r\n\r\nsecond\r\n",
    b"Subject: three\n\n\xe9\xff 8-bit, no final newline",
]
BOB = [
    b"From: b@example.org\nSubject: bob one\n\n..dots\n.\nend\n",
    b"From: b@example.org\nSubject: bob two\n\n" + b"bob's line\n" * 5000,
]
MIB = 1 << 20


def big_message(size: int) -> bytes:
    line = b"0123456789 .abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ\n"
    return b"Subject: big\n\n" + line * (size // len(line)) + b".last\n"


def junk(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def keepalive_wait(good: LineClient, predicate: Callable[[], object], timeout: float = 20.0) -> None:
    """Poll `predicate`, sending NOOP on the good session meanwhile (it must stay answered)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert good.cmd("NOOP") == b"+OK"
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def closed_by_server(bad: LineClient) -> Callable[[], bool]:
    """A predicate: has the server closed `bad`? (reads what arrives meanwhile)"""
    bad.sock.settimeout(0.05)

    def check() -> bool:
        try:
            return not bad.fill()
        except TimeoutError:
            return False

    return check


def responses_until(bad: LineClient, last: bytes) -> list[bytes]:
    lines = []
    while True:
        line = bad.line()
        lines.append(line)
        if line == last:
            return lines


# -- the bad sessions ---------------------------------------------------------

def binary_junk_before_login(server: ServerProcess, good: LineClient) -> None:
    bad = LineClient(server.port)
    bad.send(junk(64 * 1024, 1) + b"\r\nQUIT\r\n")
    lines = bad.read_until_closed().split(CRLF)
    assert lines[-2:] == [b"+OK Bye", b""]
    assert lines[:-2] and all(line.startswith(b"-ERR ") for line in lines[:-2])


def binary_junk_in_session(server: ServerProcess, good: LineClient) -> None:
    bad = logged_in(server, "alice")
    assert bad.cmd("DELE 1").startswith(b"+OK")
    bad.send(junk(64 * 1024, 2) + b"\r\nNOOP\r\n")
    lines = responses_until(bad, b"+OK")
    assert all(line.startswith(b"-ERR ") for line in lines[:-1])
    assert bad.cmd("STAT").startswith(b"+OK 2 ")
    bad.close()  # without QUIT: DELE 1 must not happen


def nul_bytes(server: ServerProcess, good: LineClient) -> None:
    bad = LineClient(server.port)
    assert bad.cmd(b"\x00" * 200).startswith(b"-ERR")
    assert bad.cmd(b"NOOP\x00").startswith(b"-ERR")
    assert bad.cmd(b"USER al\x00ice") == b"+OK"
    assert bad.cmd(b"PASS alicepw").startswith(b"-ERR [AUTH]")
    assert bad.cmd(b"USER alice") == b"+OK"
    assert bad.cmd(b"PASS alice\x00pw").startswith(b"-ERR [AUTH]")
    assert bad.login("alice", "alicepw").startswith(b"+OK")
    assert bad.cmd(b"RETR \x001").startswith(b"-ERR")
    assert bad.cmd(b"DELE 1\x00").startswith(b"-ERR")
    assert bad.cmd(b"TOP 1 \x00").startswith(b"-ERR")
    assert bad.cmd(b"\x00\x00\x00\x00").startswith(b"-ERR")
    assert bad.retr(1) == crlf(ALICE[0])
    assert bad.cmd("QUIT") == b"+OK Bye, 0 messages deleted"
    bad.close()


def invalid_utf8(server: ServerProcess, good: LineClient) -> None:
    bad = LineClient(server.port, "::1")
    assert bad.cmd(b"\xff\xfe\xfd").startswith(b"-ERR")
    assert bad.cmd(b"USER \xc3\x28") == b"+OK"
    assert bad.cmd(b"PASS \xa0\xa1").startswith(b"-ERR [AUTH]")
    assert bad.cmd(b"USER alice") == b"+OK"
    assert bad.cmd(b"PASS \xe9alicepw").startswith(b"-ERR [AUTH]")
    assert bad.login("alice", "alicepw").startswith(b"+OK")
    assert bad.cmd(b"LIST \xf0\x28\x8c\x28").startswith(b"-ERR")
    assert bad.cmd(b"TOP 1 \xff").startswith(b"-ERR")
    assert bad.cmd(b"DELE \xd9\xa3").startswith(b"-ERR")  # ARABIC-INDIC DIGIT THREE is not a number here
    assert bad.cmd(b"\xed\xa0\x80 1").startswith(b"-ERR")  # a UTF-16 surrogate
    assert bad.retr(3) == crlf(ALICE[2])
    assert bad.cmd("QUIT") == b"+OK Bye, 0 messages deleted"
    bad.close()


def mebibyte_lines(server: ServerProcess, good: LineClient) -> None:
    bad = LineClient(server.port)
    assert bad.cmd(b"A" * MIB) == b"-ERR Line too long"
    assert bad.cmd(b"USER " + b"u" * MIB) == b"-ERR Line too long"
    assert bad.cmd("PASS alicepw") == b"-ERR Send USER first"
    assert bad.login("alice", "alicepw").startswith(b"+OK")
    assert bad.cmd(b"DELE " + b"1" * MIB) == b"-ERR Line too long"
    # The same line in small pieces, then a pipelined STAT after it in the last piece.
    for _ in range(64):
        bad.send(b"RETR 1" * 2730)
    bad.send(b"\r\nSTAT\r\n")
    assert bad.line() == b"-ERR Line too long"
    assert bad.line().startswith(b"+OK 3 ")
    assert bad.retr(2) == crlf(ALICE[1])
    assert bad.cmd("QUIT") == b"+OK Bye, 0 messages deleted"
    bad.close()


def silent_before_login(server: ServerProcess, good: LineClient) -> None:
    bad = LineClient(server.port, greet=False)
    keepalive_wait(good, closed_by_server(bad))
    assert bad.buffer.startswith(b"+OK")  # the greeting, then maybe an idle notice, then EOF


def silent_after_dele(server: ServerProcess, good: LineClient) -> None:
    bad = logged_in(server, "alice", "::1")
    assert bad.cmd("DELE 2").startswith(b"+OK")
    keepalive_wait(good, closed_by_server(bad))


def stalled_reader_mid_retr(server: ServerProcess, good: LineClient) -> None:
    bad = logged_in(server, "alice")
    assert bad.cmd("DELE 1").startswith(b"+OK")
    bad.send(b"RETR 4\r\n")  # 16 MiB, more than the socket buffers hold; never read
    keepalive_wait(good, lambda: can_login(server, "alice"))
    bad.close()


def vanish_mid_retr(reset: bool) -> Callable[[ServerProcess, LineClient], None]:
    def run(server: ServerProcess, good: LineClient) -> None:
        bad = logged_in(server, "alice")
        assert bad.cmd("DELE 1").startswith(b"+OK")
        bad.send(b"RETR 4\r\n")
        while len(bad.buffer) < 256 * 1024:
            assert bad.fill()
        assert bad.buffer.startswith(b"+OK ")
        if reset:
            bad.reset()
        else:
            bad.close()

    return run


def half_command_then_gone(server: ServerProcess, good: LineClient) -> None:
    bad = logged_in(server, "alice")
    assert bad.cmd("DELE 3").startswith(b"+OK")
    bad.send(b"QUI")  # never completed: no UPDATE
    bad.reset()
    early = LineClient(server.port, greet=False)
    early.reset()  # gone before even reading the greeting


def lowercase_commands(server: ServerProcess, good: LineClient) -> None:
    bad = LineClient(server.port)
    assert bad.cmd("capa").startswith(b"+OK")
    assert b"PIPELINING" in bad.body()
    assert bad.cmd("user alice") == b"+OK"
    assert bad.cmd("pass alicepw").startswith(b"+OK")
    assert bad.cmd("stat").startswith(b"+OK 3 ")
    assert bad.cmd("list").startswith(b"+OK")
    assert bad.body().count(CRLF) == 3
    assert bad.cmd("uidl 1").startswith(b"+OK 1 ")
    assert bad.cmd("Retr 1").startswith(b"+OK")
    assert bad.body() == crlf(ALICE[0])
    assert bad.cmd("tOp 2 0").startswith(b"+OK")
    assert bad.body() == b"From: a@example.org\r\nSubject: two\r\n\r\n"
    assert bad.cmd("dele 1").startswith(b"+OK")
    assert bad.cmd("noop") == b"+OK"
    assert bad.cmd("rset").startswith(b"+OK")
    assert bad.cmd("quit") == b"+OK Bye, 0 messages deleted"
    bad.close()


@dataclass(frozen=True)
class Case:
    run: Callable[[ServerProcess, LineClient], None]
    config: str = ""
    big: int = 0  # size of a 4th message for alice


CASES = {
    "binary-junk-before-login": Case(binary_junk_before_login),
    "binary-junk-in-session": Case(binary_junk_in_session),
    "nul-bytes": Case(nul_bytes),
    "invalid-utf8": Case(invalid_utf8),
    "1-MiB-lines": Case(mebibyte_lines),
    "silent-before-login": Case(silent_before_login, "idle_timeout = 1\n"),
    "silent-after-dele": Case(silent_after_dele, "idle_timeout = 1\n"),
    "stalled-reader-mid-retr": Case(stalled_reader_mid_retr, "idle_timeout = 1\n", big=16 * MIB),
    "vanish-mid-retr-close": Case(vanish_mid_retr(reset=False), big=8 * MIB),
    "vanish-mid-retr-rst": Case(vanish_mid_retr(reset=True), big=8 * MIB),
    "half-command-then-gone": Case(half_command_then_gone),
    "lowercase-commands": Case(lowercase_commands),
}


def mail_contents(server: ServerProcess) -> dict[str, bytes]:
    return {path: open(path, "rb").read() for user in ("alice", "bob") for path in server.message_files(user)}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.slow
def test_bad_input_disturbs_nobody(start_server: Callable[..., ServerProcess], name: str) -> None:
    case = CASES[name]
    server = start_server(config=case.config)
    for content in ALICE + ([big_message(case.big)] if case.big else []):
        server.deliver("alice", content)
    for content in BOB:
        server.deliver("bob", content)
    good = logged_in(server, "bob", "::1")
    stat = good.cmd("STAT")
    assert stat == f"+OK 2 {sum(len(crlf(m)) for m in BOB)}".encode()
    before = mail_contents(server)

    case.run(server, good)

    # The bystander is unaffected.
    assert good.cmd("STAT") == stat
    for number, content in enumerate(BOB, 1):
        assert good.retr(number) == crlf(content)
    # The bad session's lock is gone, and new sessions on both families are served.
    keepalive_wait(good, lambda: can_login(server, "alice"))
    fresh = logged_in(server, "carol", "127.0.0.1")
    assert fresh.cmd("STAT") == b"+OK 0 0"
    assert fresh.cmd("QUIT").startswith(b"+OK")
    fresh.close()
    assert good.cmd("QUIT") == b"+OK Bye, 0 messages deleted"
    good.close()
    # No mail lost, deleted or changed; the server is alive and logged no traceback.
    assert mail_contents(server) == before
    assert server.process is not None and server.process.poll() is None
    log = server.log()
    assert "Traceback" not in log and "session error" not in log, log
