"""Pop3Connection: framing and events in order, and the contract parked sessions rely on:
every bytes answer is computed without I/O or yielding; anything else is an action.

"Without I/O" is watched with an audit hook (open, os.*, socket.*, time.sleep, subprocess:
every I/O the standard library reports), "without yielding" with greenlet.settrace (no
switch to any other greenlet), both around each `next_event()` that gives bytes."""

from __future__ import annotations

import sys

import greenlet
from hypothesis import given, settings
from hypothesis import strategies as st

from geventpop3.core.lines import MAX_COMMAND_LINE
from geventpop3.core.message import Message
from geventpop3.core.pop3.connection import CLOSE, NEED_DATA, Close, Event, NeedData, Pop3Connection
from geventpop3.core.pop3.protocol import (
    ERR_BAD_NUMBER,
    ERR_DELETED,
    ERR_NO_SUCH,
    ERR_NOT_IN_AUTH,
    ERR_SYNTAX,
    ERR_TOO_LONG,
    ERR_UNKNOWN,
    OK,
    Login,
    Pop3Protocol,
    Retrieve,
    StartTls,
    Update,
)
from geventpop3.core.pop3.security import ConnectionSecurity

_watching: list[list[str]] = []  # the events seen while a next_event() runs (none watched: empty)


def _audit(event: str, args: tuple[object, ...]) -> None:
    if _watching and not event.startswith(("object.", "sys._getframe", "code.__new__")):
        _watching[-1].append(event)


sys.addaudithook(_audit)  # for the rest of this process; it only looks while _watching is set


def watched_event(connection: Pop3Connection) -> tuple[Event, list[str], int]:
    """`connection.next_event()`, with the I/O audit events and greenlet switches it made."""
    seen: list[str] = []
    switches = 0

    def trace(event: str, args: object) -> None:
        nonlocal switches
        switches += 1

    _watching.append(seen)
    previous = greenlet.settrace(trace)
    try:
        event = connection.next_event()
    finally:
        greenlet.settrace(previous)
        _watching.pop()
    return event, seen, switches


def make_messages(count: int = 3) -> list[Message]:
    return [Message(f"uid{i}", f"/nowhere/new/uid{i}", 100 * i, f"/nowhere/new/uid{i}") for i in range(1, count + 1)]


def logged_in(count: int = 3) -> Pop3Connection:
    connection = Pop3Connection(Pop3Protocol())
    connection.receive_data(b"USER alice\r\nPASS pw\r\n")
    assert connection.next_event() == OK
    assert connection.next_event() == Login("alice", "pw")
    connection.protocol.login_succeeded("alice", make_messages(count))
    assert connection.next_event() is NEED_DATA
    return connection


def answers(connection: Pop3Connection, data: bytes) -> list[Event]:
    """Every event `data` gives, up to and including NeedData or Close."""
    connection.receive_data(data)
    events = []
    while True:
        event = connection.next_event()
        events.append(event)
        if isinstance(event, (NeedData, Close)):
            return events


# -- framing -----------------------------------------------------------------

def test_one_line_gives_its_answer_then_need_data() -> None:
    connection = logged_in()
    assert answers(connection, b"NOOP\r\n") == [OK, NEED_DATA]
    assert answers(connection, b"noop\n") == [OK, NEED_DATA]  # bare LF, any case


def test_pipelined_lines_are_answered_in_order() -> None:
    connection = logged_in()
    assert answers(connection, b"NOOP\r\nDELE 1\r\nSTAT\r\nRSET\r\n") == [
        OK, b"+OK Message 1 deleted\r\n", b"+OK 2 500\r\n", b"+OK 3 messages\r\n", NEED_DATA]


def test_a_partial_line_waits_for_its_end() -> None:
    connection = logged_in()
    assert answers(connection, b"NO") == [NEED_DATA]
    assert answers(connection, b"OP\r") == [NEED_DATA]
    assert answers(connection, b"\nSTAT\r\nLI") == [OK, b"+OK 3 600\r\n", NEED_DATA]
    assert answers(connection, b"ST 2\r\n") == [b"+OK 2 200\r\n", NEED_DATA]


def test_an_over_long_line_is_answered_once_and_the_rest_dropped() -> None:
    connection = logged_in()
    assert answers(connection, b"NOOP " + b"x" * MAX_COMMAND_LINE + b"\r\nNOOP\r\n") == [ERR_TOO_LONG, OK, NEED_DATA]
    assert answers(connection, b"y" * 1000) == [ERR_TOO_LONG, NEED_DATA]  # no line end in sight: said at once
    assert answers(connection, b"y" * 100_000) == [NEED_DATA]  # still the same line: dropped, not held
    assert answers(connection, b"yyy\r\nSTAT\r\n") == [b"+OK 3 600\r\n", NEED_DATA]


def test_a_line_of_exactly_the_limit_is_a_command() -> None:
    connection = logged_in()
    line = b"NOOP" + b" " * (MAX_COMMAND_LINE - 6) + b"\r\n"
    assert len(line) == MAX_COMMAND_LINE
    assert answers(connection, line) == [OK, NEED_DATA]


def test_lines_after_stls_are_never_answered() -> None:
    connection = Pop3Connection(Pop3Protocol(security=ConnectionSecurity(None, tls_available=True)))
    connection.receive_data(b"STLS\r\nUSER alice\r\nPASS pw\r\nPASS")
    assert isinstance(connection.next_event(), StartTls)
    assert connection.next_event() is NEED_DATA  # the lines and the partial one are gone
    connection.protocol.tls_started()
    assert answers(connection, b"\r\n") == [b"-ERR Empty command\r\n", NEED_DATA]


def test_lines_after_the_end_are_never_answered() -> None:
    connection = Pop3Connection(Pop3Protocol())
    assert answers(connection, b"QUIT\r\nNOOP\r\nUSER a\r\n") == [b"+OK Bye\r\n", CLOSE]
    assert connection.next_event() is CLOSE


def test_too_many_failed_logins_close_before_the_next_line() -> None:
    connection = Pop3Connection(Pop3Protocol(max_failures=1))
    connection.receive_data(b"USER a\r\nPASS b\r\nNOOP\r\n")
    assert connection.next_event() == OK
    assert connection.next_event() == Login("a", "b")
    connection.protocol.login_failed("auth")
    assert connection.next_event() is CLOSE


def test_quit_in_transaction_is_an_update_and_the_end_follows_update_done() -> None:
    connection = logged_in()
    assert answers(connection, b"DELE 2\r\n")[0] == b"+OK Message 2 deleted\r\n"
    connection.receive_data(b"QUIT\r\nNOOP\r\n")
    event = connection.next_event()
    assert isinstance(event, Update) and [m.uid for m in event.deleted] == ["uid2"]
    connection.protocol.update_done(0)
    assert connection.next_event() is CLOSE


# -- the contract ------------------------------------------------------------

# Every command and error form a parked (logged-in) session can be sent, with its answer.
PARKED_ANSWERS = [
    (b"NOOP", OK),
    (b"STAT", b"+OK 3 600\r\n"),
    (b"LIST", b"+OK 3 messages\r\n1 100\r\n2 200\r\n3 300\r\n.\r\n"),
    (b"LIST 2", b"+OK 2 200\r\n"),
    (b"UIDL", b"+OK 3 messages\r\n1 uid1\r\n2 uid2\r\n3 uid3\r\n.\r\n"),
    (b"UIDL 3", b"+OK 3 uid3\r\n"),
    (b"DELE 1", b"+OK Message 1 deleted\r\n"),
    (b"LIST 1", ERR_DELETED),
    (b"DELE 1", ERR_DELETED),
    (b"STAT", b"+OK 2 500\r\n"),
    (b"RSET", b"+OK 3 messages\r\n"),
    (b"CAPA", None),  # the capability list: checked apart
    (b"XYZZY", ERR_UNKNOWN),
    (b"", b"-ERR Empty command\r\n"),
    (b"LIST 9", ERR_NO_SUCH),
    (b"UIDL 0", ERR_NO_SUCH),
    (b"DELE x", ERR_BAD_NUMBER),
    (b"LIST -1", ERR_BAD_NUMBER),
    (b"RETR 99", ERR_NO_SUCH),
    (b"TOP 1 x", b"-ERR Invalid line count\r\n"),
    (b"TOP 1", ERR_SYNTAX),
    (b"STAT 1", ERR_SYNTAX),
    (b"NOOP 1", ERR_SYNTAX),
    (b"LIST 1 2", ERR_SYNTAX),
    (b"USER bob", ERR_NOT_IN_AUTH),
    (b"PASS pw", ERR_NOT_IN_AUTH),
    (b"STLS", ERR_NOT_IN_AUTH),
    (b"x" * 300, ERR_TOO_LONG),
]


def test_every_answer_a_parked_session_can_get_is_bytes_made_without_io_or_yielding() -> None:
    parked = logged_in()
    for line, expected in PARKED_ANSWERS:
        parked.receive_data(line + b"\r\n")
        event, io, switches = watched_event(parked)
        assert type(event) is bytes, line
        assert io == [] and switches == 0, (line, io, switches)
        if expected is not None:
            assert event == expected, line
        else:
            assert event.startswith(b"+OK Capability list follows\r\n") and event.endswith(b"\r\n.\r\n")
        assert parked.next_event() is NEED_DATA


def test_what_needs_the_disk_is_an_action_never_bytes() -> None:
    parked = logged_in()
    parked.receive_data(b"RETR 1\r\nTOP 2 5\r\nQUIT\r\n")
    retrieve = parked.next_event()
    assert isinstance(retrieve, Retrieve) and retrieve.body_lines is None and retrieve.message.uid == "uid1"
    top = parked.next_event()
    assert isinstance(top, Retrieve) and top.body_lines == 5
    assert isinstance(parked.next_event(), Update)


def test_the_watch_sees_io_and_switches() -> None:
    """The contract test above can fail: what it watches for is seen when it happens."""
    seen: list[str] = []
    _watching.append(seen)
    try:
        open(__file__, "rb").close()  # noqa: SIM115
    finally:
        _watching.pop()
    assert "open" in seen
    switches = []
    previous = greenlet.settrace(lambda event, args: switches.append(event))
    try:
        greenlet.greenlet(lambda: None).switch()
    finally:
        greenlet.settrace(previous)
    assert switches


_KEYWORDS = [b"NOOP", b"STAT", b"LIST", b"UIDL", b"DELE", b"RSET", b"CAPA", b"RETR", b"TOP", b"QUIT", b"USER",
             b"PASS", b"AUTH", b"STLS", b"APOP", b"XYZZY", b"noop", b"list"]
_ARGUMENT = st.one_of(st.integers(-2, 6).map(lambda n: str(n).encode()), st.binary(max_size=8).filter(
    lambda b: b"\n" not in b))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_KEYWORDS), st.lists(_ARGUMENT, max_size=3)), min_size=1, max_size=12))
def test_any_pipelined_input_when_logged_in_gives_bytes_without_io_or_an_action(
        commands: list[tuple[bytes, list[bytes]]]) -> None:
    connection = logged_in(4)
    connection.receive_data(b"".join(b" ".join([keyword, *args]) + b"\r\n" for keyword, args in commands))
    while True:
        event, io, switches = watched_event(connection)
        if isinstance(event, (NeedData, Close)):
            return
        if type(event) is bytes:
            assert io == [] and switches == 0, (event, io)
            continue
        assert isinstance(event, (Retrieve, Update)), event  # RETR, TOP, QUIT: the only actions here
        if isinstance(event, Update):
            connection.protocol.update_done(0)

