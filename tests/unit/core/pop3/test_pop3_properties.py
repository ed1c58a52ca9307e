"""Properties of the POP3 core (Hypothesis, derandomized): a model of a mailbox, and random bytes.

The state machine runs sessions one after another on one mailbox model (messages with
uids and sizes, mail arriving between sessions). Every command is tried in every state
with valid and invalid numbers; after each step the answer must agree with the model
(STAT/LIST/UIDL numbering and sizes without the deleted messages, RETR/TOP of a deleted
message refused, RSET restoring, QUIT giving an Update with exactly the deleted
messages) and be well formed: `+OK`/`-ERR` first, multi-line answers ending in `.`,
no line over 512 octets with its CRLF. The random-bytes test feeds arbitrary lines
(CR, LF, NUL, high bytes, very long) the way the session does and directly.
"""

from __future__ import annotations

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from geventpop3.core.lines import MAX_RESPONSE_LINE, Delayed, LineBuffer
from geventpop3.core.message import Message
from geventpop3.core.pop3.protocol import Login, Pop3Protocol, Retrieve, State, Update
from geventpop3.service.filters import FAILED_ERROR

settings.register_profile("geventpop3-derandomized", derandomize=True, max_examples=200, deadline=None,
                          database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DERANDOMIZED = settings.get_profile("geventpop3-derandomized")

UID_CHARS = "".join(chr(c) for c in range(0x21, 0x7F))  # RFC 1939: 0x21-0x7E, 1-70 octets
uids = st.text(UID_CHARS, min_size=1, max_size=70)
sizes = st.integers(0, 2**40)
# Message numbers as a client may type them: in range, out of range, not numbers at all.
numbers = st.one_of(
    st.integers(1, 6).map(str),  # mostly live messages: the interesting paths
    st.integers(1, 6).map(str),
    st.integers(-3, 12).map(str),
    st.sampled_from(["0", "00", "01", "+1", "-1", "1.0", "0x1", "1e3", "١", "999999999999", "9999999999999",
                     "18446744073709551617", "one"]),
    st.text(string.digits, min_size=1, max_size=20),
)
users = st.sampled_from(["alice", "bob", "a" * 40, "ålice", "x\x00y"])


def lines_of(answer: bytes) -> list[bytes]:
    """The CRLF-terminated lines of an answer (a line without CRLF fails the check)."""
    assert answer.endswith(b"\r\n"), answer[-80:]
    lines = answer[:-2].split(b"\r\n")
    for line in lines:
        assert b"\n" not in line and b"\r" not in line, line[:80]
        assert len(line) + 2 <= MAX_RESPONSE_LINE, line[:80]
    return lines


def single(answer: object) -> bytes:
    """A well-formed one-line answer."""
    assert isinstance(answer, bytes), answer
    lines = lines_of(answer)
    assert len(lines) == 1, answer[:200]
    assert lines[0].startswith((b"+OK", b"-ERR")), lines[0][:80]
    assert lines[0] in (b"+OK", b"-ERR") or lines[0][3:4] == b" " or lines[0][4:5] == b" ", lines[0][:80]
    return lines[0]


def multi(answer: object) -> list[bytes]:
    """A well-formed multi-line +OK answer: its data lines, un-dot-stuffed."""
    assert isinstance(answer, bytes), answer
    lines = lines_of(answer)
    assert lines[0].startswith(b"+OK") and lines[-1] == b".", answer[:200]
    body = lines[1:-1]
    assert all(not line.startswith(b".") or line.startswith(b"..") for line in body), body
    return [line[1:] if line.startswith(b".") else line for line in body]


def is_err(answer: object) -> bool:
    return single(answer).startswith(b"-ERR")


def is_ok(answer: object) -> bool:
    return single(answer).startswith(b"+OK")


def any_answer(command: bytes, answer: object) -> None:
    """Well formed whatever it is: one line, or a multi-line +OK for LIST/UIDL without argument and CAPA."""
    assert isinstance(answer, bytes), answer
    words = command.split()
    multiline = (answer.startswith(b"+OK") and bool(words)
                 and (words[0].upper() == b"CAPA" or (words[0].upper() in (b"LIST", b"UIDL") and len(words) == 1)))
    if multiline:
        multi(answer)
    else:
        single(answer)


def open_session(machine: MailboxModel) -> bool:
    return not machine.protocol.closing


class MailboxModel(RuleBasedStateMachine):
    """One mailbox, and the current session on it, against `Pop3Protocol`."""

    @initialize(messages=st.lists(st.tuples(uids, sizes), min_size=1, max_size=8, unique_by=lambda m: m[0]),
                failure_delay=st.sampled_from([0.0, 2.0]))
    def setup(self, messages: list[tuple[str, int]], failure_delay: float) -> None:
        self.mailbox = [self.message(uid, size) for uid, size in messages]
        self.failure_delay = failure_delay
        self.connect()

    @staticmethod
    def message(uid: str, size: int, broken: bool = False) -> Message:
        path = f"/maildir/cur/{uid}:2,"
        return Message(uid, path, size, path, FAILED_ERROR if broken else None)

    def connect(self) -> None:
        self.protocol = Pop3Protocol(max_failures=3, failure_delay=self.failure_delay)
        self.state = "auth"  # auth, transaction, update (QUIT answered or pending), closed
        self.pending_user: str | None = None
        self.snapshot: list[Message] = []
        self.deleted: set[int] = set()  # 0-based indexes into snapshot
        self.failures = 0
        self.doomed: list[Message] = []  # what QUIT handed to UPDATE

    # -- the model's view -----------------------------------------------------------
    def live(self) -> list[tuple[int, Message]]:
        return [(i + 1, m) for i, m in enumerate(self.snapshot) if i not in self.deleted]

    def target(self, number: str) -> Message | None:
        """The live message a number names, or None if the server must refuse it."""
        if not (number.isascii() and number.isdigit()) or len(number) > 12:
            return None
        index = int(number) - 1
        if not 0 <= index < len(self.snapshot) or index in self.deleted:
            return None
        return self.snapshot[index]

    def send(self, line: str | bytes) -> object:
        data = line.encode() if isinstance(line, str) else line
        answer = self.protocol.handle(data)
        if self.state == "update":
            assert answer == b"-ERR Session is ending\r\n"
        return answer

    # -- between sessions -----------------------------------------------------------
    @precondition(lambda self: self.state in ("auth", "closed"))
    @rule(uid=uids, size=sizes, broken=st.booleans())
    def mail_arrives(self, uid: str, size: int, broken: bool) -> None:
        if uid not in {m.uid for m in self.mailbox}:
            self.mailbox.append(self.message(uid, size, broken))

    @precondition(lambda self: self.state == "closed" or self.protocol.closing)
    @rule()
    def reconnect(self) -> None:
        self.connect()

    # -- AUTHORIZATION (commands run only while the session is open) ------------------
    @precondition(open_session)
    @rule(user=users)
    def user(self, user: str) -> None:
        answer = self.send(f"USER {user}")
        if self.state == "auth":
            assert answer == b"+OK\r\n"
            self.pending_user = user
        elif self.state == "transaction":
            assert is_err(answer)

    @precondition(lambda self: self.state == "auth" and not self.protocol.closing)
    @rule(user=users)
    def login(self, user: str) -> None:
        """USER and PASS that succeed, in one step: most runs should spend their steps logged in."""
        self.user(user)
        self.password("secret", "ok")

    @precondition(open_session)
    @rule(password=st.text(min_size=0, max_size=40).filter(lambda p: "\n" not in p and "\r" not in p),
          outcome=st.sampled_from(["ok", "ok", "ok", "auth", "in-use", "temp", "perm"]))
    def password(self, password: str, outcome: str) -> None:
        answer = self.send(b"PASS " + password.encode())
        if self.state != "auth":
            assert is_err(answer)
            return
        if self.pending_user is None or not password:
            assert is_err(answer)
            return
        user, self.pending_user = self.pending_user, None
        assert answer == Login(user, password)
        if outcome == "ok":
            self.snapshot = list(self.mailbox)
            self.deleted.clear()
            assert is_ok(self.protocol.login_succeeded(user, list(self.snapshot)))
            assert self.protocol.state is State.TRANSACTION
            self.state = "transaction"
            return
        self.failures += 1
        reply = self.protocol.login_failed(outcome)
        if isinstance(reply, Delayed):
            assert outcome == "auth" and reply.seconds == self.failure_delay
            reply = reply.data
        assert is_err(reply)
        assert self.protocol.closing == (self.failures >= 3)

    # -- TRANSACTION --------------------------------------------------------------------
    @precondition(open_session)
    @rule()
    def stat(self) -> None:
        answer = self.send("STAT")
        if self.state == "transaction":
            live = self.live()
            assert single(answer) == f"+OK {len(live)} {sum(m.size for _, m in live)}".encode()
        else:
            assert is_err(answer)

    @precondition(open_session)
    @rule(field=st.sampled_from(["LIST", "UIDL"]))
    def listing(self, field: str) -> None:
        answer = self.send(field)
        if self.state != "transaction":
            assert is_err(answer)
            return
        value = (lambda m: str(m.size)) if field == "LIST" else (lambda m: m.uid)
        assert multi(answer) == [f"{n} {value(m)}".encode() for n, m in self.live()]

    @precondition(open_session)
    @rule(field=st.sampled_from(["LIST", "UIDL"]), number=numbers)
    def listing_one(self, field: str, number: str) -> None:
        answer = self.send(f"{field} {number}")
        message = self.target(number)
        if self.state != "transaction" or message is None:
            assert is_err(answer)
            return
        value = str(message.size) if field == "LIST" else message.uid
        assert single(answer) == f"+OK {int(number)} {value}".encode()

    @precondition(open_session)
    @rule(number=numbers, lines=st.one_of(st.none(), st.integers(0, 2**70).map(str), st.sampled_from(["-1", "x"])))
    def retrieve(self, number: str, lines: str | None) -> None:
        answer = self.send(f"RETR {number}" if lines is None else f"TOP {number} {lines}")
        message = self.target(number)
        if (self.state != "transaction" or message is None or message.error is not None
                or (lines is not None and not lines.isdigit())):
            assert is_err(answer)
            return
        assert isinstance(answer, Retrieve), answer
        assert answer.message is message
        assert is_ok(answer.header)
        if lines is None:
            assert answer.body_lines is None and answer.header == f"+OK {message.size} octets\r\n".encode()
        else:
            assert answer.body_lines == min(int(lines), 2**62)

    @precondition(open_session)
    @rule(number=numbers)
    def delete(self, number: str) -> None:
        answer = self.send(f"DELE {number}")
        message = self.target(number)
        if self.state != "transaction" or message is None:
            assert is_err(answer)
            return
        assert is_ok(answer)
        self.deleted.add(int(number) - 1)

    @precondition(open_session)
    @rule()
    def reset(self) -> None:
        answer = self.send("RSET")
        if self.state != "transaction":
            assert is_err(answer)
            return
        assert is_ok(answer)
        self.deleted.clear()

    @precondition(open_session)
    @rule(argument=st.sampled_from(["", " x", " 1"]))
    def noop(self, argument: str) -> None:
        answer = self.send("NOOP" + argument)
        assert is_ok(answer) if self.state == "transaction" and not argument else is_err(answer)

    @precondition(open_session)
    @rule(command=st.sampled_from(["CAPA", "APOP a b", "AUTH PLAIN", "AUTH LOGIN", "STLS", "XYZZY", "", "RETR", "TOP 1",
                                   "DELE", "STAT 1", "RSET 1", "LIST 1 2"]))
    def other(self, command: str) -> None:
        answer = self.send(command)
        if self.state == "update":
            return
        if isinstance(answer, bytes) and answer.startswith(b"+ "):  # a SASL challenge (RFC 5034): cancel it
            assert self.state == "auth" and command.upper().startswith("AUTH")
            assert single(self.send("*")).startswith(b"-ERR")
            return
        any_answer(command.encode(), answer)
        if command == "CAPA":
            assert b"UIDL" in multi(answer)

    @precondition(open_session)
    @rule()
    def quit(self) -> None:
        answer = self.send("QUIT")
        if self.state == "auth":
            assert is_ok(answer) and self.protocol.closing
            self.state = "closed"
            return
        if self.state != "transaction":
            return
        doomed = [self.snapshot[i] for i in sorted(self.deleted)]
        assert isinstance(answer, Update), answer
        assert answer.deleted == doomed  # exactly the deleted ones, in order
        assert self.protocol.state is State.UPDATE
        self.state = "update"  # commands that arrive now (pipelined after QUIT) are refused
        self.doomed = doomed

    @precondition(lambda self: self.state == "update" and not self.protocol.closing)
    @rule(failed_share=st.floats(0, 1))
    def update_finished(self, failed_share: float) -> None:
        failed = int(len(self.doomed) * failed_share)
        reply = self.protocol.update_done(failed)
        assert (is_err(reply) if failed else is_ok(reply)) and self.protocol.closing
        gone = {m.uid for m in self.doomed[failed:]}  # the files that could not be removed stay
        self.mailbox = [m for m in self.mailbox if m.uid not in gone]

    @invariant()
    def protocol_state_matches(self) -> None:
        expected = {"auth": State.AUTHORIZATION, "closed": State.AUTHORIZATION, "transaction": State.TRANSACTION,
                    "update": State.UPDATE}[self.state]
        assert self.protocol.state is expected


MailboxModel.TestCase.settings = DERANDOMIZED
TestMailboxModel = MailboxModel.TestCase
TestMailboxModel.pytestmark = [pytest.mark.slow]  # about 3.5 s


# -- random bytes -------------------------------------------------------------------

KEYWORDS = [b"USER", b"PASS", b"STAT", b"LIST", b"UIDL", b"RETR", b"TOP", b"DELE", b"RSET", b"NOOP", b"QUIT",
            b"CAPA", b"APOP", b"AUTH", b"STLS", b"user", b"lIsT", b"retr"]
hostile_bytes = st.binary(max_size=300) | st.binary(min_size=250, max_size=5000)
hostile_lines = st.one_of(
    hostile_bytes,
    st.builds(lambda k, sep, rest: k + sep + rest, st.sampled_from(KEYWORDS), st.sampled_from([b" ", b"  ", b"\t",
                                                                                               b"\x00", b""]),
              hostile_bytes),
    st.builds(lambda k, n: k + b" " + n.encode(), st.sampled_from(KEYWORDS), numbers),
)


def drive(protocol: Pop3Protocol, line: object, messages: list[Message]) -> None:
    """Handle one line as the session would, answering actions; every answer checked."""
    answer = protocol.handle(line)
    command = line if isinstance(line, bytes) else b""
    if isinstance(answer, Login):
        reply = protocol.login_succeeded(answer.user, list(messages)) if answer.password == "ok" else \
            protocol.login_failed("auth")
        single(reply.data if isinstance(reply, Delayed) else reply)
    elif isinstance(answer, Retrieve):
        single(answer.header)
        assert answer.message in messages
    elif isinstance(answer, Update):
        single(protocol.update_done(0))
    else:
        any_answer(command, answer)


@DERANDOMIZED
@given(data=st.lists(hostile_lines, max_size=30), logged_in=st.booleans(),
       messages=st.lists(st.tuples(uids, sizes), max_size=5, unique_by=lambda m: m[0]))
def test_random_lines_never_raise_and_answers_are_well_formed(data: list[bytes], logged_in: bool,
                                                              messages: list[tuple[str, int]]) -> None:
    snapshot = [MailboxModel.message(uid, size) for uid, size in messages]
    protocol = Pop3Protocol(failure_delay=1.0)
    if logged_in:
        drive(protocol, b"USER someone", snapshot)
        drive(protocol, b"PASS ok", snapshot)
        assert protocol.state is State.TRANSACTION
    for line in data:
        drive(protocol, line, snapshot)  # raw, as a hostile caller could hand it over


@DERANDOMIZED
@given(chunks=st.lists(st.binary(max_size=600) | st.sampled_from([b"\r\n", b"\n", b"\r", b"USER ok\r\n",
                                                                  b"PASS ok\r\n", b"LIST\r\n", b"RETR 1\n"]),
                       max_size=40),
       messages=st.lists(st.tuples(uids, sizes), max_size=5, unique_by=lambda m: m[0]))
def test_random_stream_through_the_line_buffer(chunks: list[bytes], messages: list[tuple[str, int]]) -> None:
    """What the session does with received bytes: frame them, then handle each item."""
    snapshot = [MailboxModel.message(uid, size) for uid, size in messages]
    protocol = Pop3Protocol()
    buffer = LineBuffer()
    for chunk in chunks:
        for item in buffer.feed(chunk):
            if isinstance(item, bytes):
                assert b"\n" not in item and len(item) < 255
            drive(protocol, item, snapshot)
