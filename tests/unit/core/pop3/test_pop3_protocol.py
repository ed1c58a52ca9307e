"""The POP3 state machine on its own: every command in every state, every error, no sockets."""

from __future__ import annotations

import pytest

from geventpop3 import IMPLEMENTATION
from geventpop3.core.lines import LINE_TOO_LONG, Delayed
from geventpop3.core.message import Message
from geventpop3.core.pop3.protocol import LISTING_INLINE, Listing, Login, Pop3Protocol, Retrieve, State, Update

TRANSACTION_ONLY = [b"STAT", b"LIST", b"LIST 1", b"UIDL", b"UIDL 1", b"RETR 1", b"TOP 1 0", b"DELE 1", b"NOOP",
                    b"RSET"]


def make_messages(count: int = 3) -> list[Message]:
    return [Message(f"uid{i}", f"/nowhere/new/uid{i}", 100 * i, f"/nowhere/new/uid{i}") for i in range(1, count + 1)]


def is_err(response: object) -> bool:
    return isinstance(response, bytes) and response.startswith(b"-ERR") and response.endswith(b"\r\n")


def is_ok(response: object) -> bool:
    return isinstance(response, bytes) and response.startswith(b"+OK") and response.endswith(b"\r\n")


def logged_in(count: int = 3) -> Pop3Protocol:
    protocol = Pop3Protocol()
    assert protocol.handle(b"USER alice") == b"+OK\r\n"
    action = protocol.handle(b"PASS secret")
    assert action == Login("alice", "secret")
    assert is_ok(protocol.login_succeeded("alice", make_messages(count)))
    assert protocol.state is State.TRANSACTION
    return protocol


def multiline(response: object) -> list[bytes]:
    """The lines of a multi-line response between the +OK line and the final `.`."""
    assert isinstance(response, bytes)
    lines = response.split(b"\r\n")
    assert lines[0].startswith(b"+OK")
    assert lines[-2:] == [b".", b""]
    return lines[1:-2]


# -- AUTHORIZATION -----------------------------------------------------------

def test_greeting_is_ok_line() -> None:
    assert is_ok(Pop3Protocol().greeting())


def test_user_pass_gives_login_action_and_transaction_after_success() -> None:
    protocol = Pop3Protocol()
    assert protocol.state is State.AUTHORIZATION
    assert protocol.handle(b"USER alice") == b"+OK\r\n"
    assert protocol.handle(b"PASS pw") == Login("alice", "pw")
    assert protocol.state is State.AUTHORIZATION  # until the session reports back
    response = protocol.login_succeeded("alice", make_messages(2))
    assert response.startswith(b"+OK") and b"2" in response
    assert protocol.state is State.TRANSACTION
    assert protocol.user == "alice"
    assert not protocol.closing


def test_pass_without_user() -> None:
    protocol = Pop3Protocol()
    assert is_err(protocol.handle(b"PASS pw"))
    assert protocol.state is State.AUTHORIZATION
    assert not protocol.closing


def test_pass_keeps_spaces_in_password() -> None:
    protocol = Pop3Protocol()
    protocol.handle(b"USER alice")
    assert protocol.handle(b"PASS my secret  pass ") == Login("alice", "my secret  pass ")


def test_pass_non_utf8_password_is_passed_through() -> None:
    protocol = Pop3Protocol()
    protocol.handle(b"USER alice")
    action = protocol.handle(b"PASS \xff\xfe")
    assert isinstance(action, Login)
    assert action.password.encode("utf-8", "surrogateescape") == b"\xff\xfe"


def test_pass_empty_is_syntax_error_and_user_is_kept() -> None:
    protocol = Pop3Protocol()
    protocol.handle(b"USER alice")
    assert is_err(protocol.handle(b"PASS"))
    assert is_err(protocol.handle(b"PASS "))
    assert protocol.handle(b"PASS pw") == Login("alice", "pw")


def test_user_twice_last_one_wins() -> None:
    protocol = Pop3Protocol()
    assert protocol.handle(b"USER alice") == b"+OK\r\n"
    assert protocol.handle(b"USER bob") == b"+OK\r\n"
    assert protocol.handle(b"PASS pw") == Login("bob", "pw")


@pytest.mark.parametrize("line", [b"USER", b"USER ", b"USER a b"])
def test_user_argument_errors(line: bytes) -> None:
    protocol = Pop3Protocol()
    assert is_err(protocol.handle(line))
    assert is_err(protocol.handle(b"PASS pw"))  # no user was accepted


def test_pass_after_failed_login_needs_user_again() -> None:
    protocol = Pop3Protocol()
    protocol.handle(b"USER alice")
    protocol.handle(b"PASS wrong")
    assert protocol.login_failed("auth").startswith(b"-ERR [AUTH]")
    assert is_err(protocol.handle(b"PASS pw"))


def test_lowercase_and_mixed_case_keywords() -> None:
    protocol = Pop3Protocol()
    assert protocol.handle(b"user alice") == b"+OK\r\n"
    assert protocol.handle(b"pAsS pw") == Login("alice", "pw")
    protocol.login_succeeded("alice", make_messages(2))
    assert protocol.handle(b"stat") == b"+OK 2 300\r\n"
    assert protocol.handle(b"list 2") == b"+OK 2 200\r\n"
    assert protocol.handle(b"Uidl 1") == b"+OK 1 uid1\r\n"
    assert protocol.handle(b"noop") == b"+OK\r\n"
    assert isinstance(protocol.handle(b"retr 1"), Retrieve)
    assert isinstance(protocol.handle(b"top 1 0"), Retrieve)
    assert is_ok(protocol.handle(b"dele 1"))
    assert is_ok(protocol.handle(b"rset"))
    assert isinstance(protocol.handle(b"quit"), Update)


@pytest.mark.parametrize("line", TRANSACTION_ONLY)
def test_transaction_commands_refused_in_authorization(line: bytes) -> None:
    protocol = Pop3Protocol()
    response = protocol.handle(line)
    assert response == b"-ERR Not logged in\r\n"
    assert protocol.state is State.AUTHORIZATION
    assert not protocol.closing


@pytest.mark.parametrize("line", [b"APOP alice 0123456789abcdef0123456789abcdef", b"AUTH CRAM-MD5", b"STLS"])
def test_unsupported_auth_mechanisms(line: bytes) -> None:
    protocol = Pop3Protocol()
    assert is_err(protocol.handle(line))
    assert protocol.state is State.AUTHORIZATION


@pytest.mark.parametrize("state", ["authorization", "transaction"])
@pytest.mark.parametrize("line", [b"FOO", b"XYZZY 1 2", b"\x00\xff", b"RETRX 1", b"\xc3\xa9"])
def test_unknown_command(state: str, line: bytes) -> None:
    protocol = Pop3Protocol() if state == "authorization" else logged_in()
    assert protocol.handle(line) == b"-ERR Unknown command\r\n"
    assert not protocol.closing


@pytest.mark.parametrize("state", ["authorization", "transaction"])
@pytest.mark.parametrize("line", [b"", b" ", b"  STAT"])
def test_empty_command(state: str, line: bytes) -> None:
    protocol = Pop3Protocol() if state == "authorization" else logged_in()
    assert is_err(protocol.handle(line))
    assert not protocol.closing


@pytest.mark.parametrize("state", ["authorization", "transaction"])
def test_line_too_long(state: str) -> None:
    protocol = Pop3Protocol() if state == "authorization" else logged_in()
    assert protocol.handle(LINE_TOO_LONG) == b"-ERR Line too long\r\n"
    assert not protocol.closing


@pytest.mark.parametrize("state", ["authorization", "transaction"])
def test_capa(state: str) -> None:
    protocol = Pop3Protocol() if state == "authorization" else logged_in()
    capabilities = multiline(protocol.handle(b"CAPA"))
    words = {line.split()[0] for line in capabilities}
    assert {b"TOP", b"UIDL", b"USER", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING", b"IMPLEMENTATION"} <= words
    assert f"IMPLEMENTATION {IMPLEMENTATION}".encode() in capabilities
    assert protocol.handle(b"capa") == protocol.handle(b"CAPA")


@pytest.mark.parametrize(("reason", "code"), [
    ("auth", b"[AUTH]"), ("in-use", b"[IN-USE]"), ("temp", b"[SYS/TEMP]"), ("perm", b"[SYS/PERM]"),
])
def test_login_failed_codes(reason: str, code: bytes) -> None:
    protocol = Pop3Protocol()
    protocol.handle(b"USER alice")
    protocol.handle(b"PASS pw")
    response = protocol.login_failed(reason)
    assert response.startswith(b"-ERR " + code + b" ")
    assert response.endswith(b"\r\n")
    assert protocol.state is State.AUTHORIZATION
    assert not protocol.closing


@pytest.mark.parametrize("max_failures", [1, 3, 5])
def test_closes_after_max_failures(max_failures: int) -> None:
    protocol = Pop3Protocol(max_failures=max_failures)
    for attempt in range(1, max_failures + 1):
        protocol.handle(b"USER alice")
        assert isinstance(protocol.handle(b"PASS wrong"), Login)
        assert is_err(protocol.login_failed("auth"))
        assert protocol.closing is (attempt == max_failures)


def test_failures_of_any_kind_count_toward_the_limit() -> None:
    protocol = Pop3Protocol(max_failures=3)
    protocol.login_failed("in-use")
    protocol.login_failed("temp")
    assert not protocol.closing
    protocol.login_failed("perm")
    assert protocol.closing


def test_login_after_failure_still_possible() -> None:
    protocol = Pop3Protocol(max_failures=3)
    protocol.handle(b"USER alice")
    protocol.handle(b"PASS wrong")
    protocol.login_failed("auth")
    protocol.handle(b"USER alice")
    assert protocol.handle(b"PASS right") == Login("alice", "right")
    protocol.login_succeeded("alice", [])
    assert protocol.state is State.TRANSACTION


def test_quit_in_authorization_closes_without_update() -> None:
    protocol = Pop3Protocol()
    protocol.handle(b"USER alice")
    response = protocol.handle(b"QUIT")
    assert is_ok(response)
    assert protocol.closing
    assert protocol.state is State.AUTHORIZATION


# -- TRANSACTION -------------------------------------------------------------

@pytest.mark.parametrize("line", [b"USER bob", b"PASS pw", b"PASS two words", b"APOP a b", b"AUTH PLAIN"])
def test_authorization_commands_refused_in_transaction(line: bytes) -> None:
    protocol = logged_in()
    assert protocol.handle(line) == b"-ERR Already logged in\r\n"
    assert protocol.state is State.TRANSACTION
    assert protocol.user == "alice"


def test_stat_list_uidl() -> None:
    protocol = logged_in(3)
    assert protocol.handle(b"STAT") == b"+OK 3 600\r\n"
    assert multiline(protocol.handle(b"LIST")) == [b"1 100", b"2 200", b"3 300"]
    assert multiline(protocol.handle(b"UIDL")) == [b"1 uid1", b"2 uid2", b"3 uid3"]
    assert protocol.handle(b"LIST 3") == b"+OK 3 300\r\n"
    assert protocol.handle(b"UIDL 2") == b"+OK 2 uid2\r\n"


def test_empty_mailbox() -> None:
    protocol = logged_in(0)
    assert protocol.handle(b"STAT") == b"+OK 0 0\r\n"
    assert multiline(protocol.handle(b"LIST")) == []
    assert multiline(protocol.handle(b"UIDL")) == []
    assert protocol.handle(b"LIST 1") == b"-ERR No such message\r\n"
    assert protocol.handle(b"RETR 1") == b"-ERR No such message\r\n"
    assert protocol.handle(b"DELE 1") == b"-ERR No such message\r\n"
    assert protocol.handle(b"TOP 1 0") == b"-ERR No such message\r\n"
    assert isinstance(protocol.handle(b"QUIT"), Update)


@pytest.mark.parametrize("command", [b"LIST", b"UIDL", b"RETR", b"DELE", b"TOP"])
@pytest.mark.parametrize(("number", "expected"), [
    (b"0", b"-ERR No such message\r\n"),
    (b"4", b"-ERR No such message\r\n"),
    (b"999999999999", b"-ERR No such message\r\n"),
    (b"-1", b"-ERR Invalid message number\r\n"),
    (b"+1", b"-ERR Invalid message number\r\n"),
    (b"1.0", b"-ERR Invalid message number\r\n"),
    (b"abc", b"-ERR Invalid message number\r\n"),
    (b"0x1", b"-ERR Invalid message number\r\n"),
    (b"\xd9\xa1", b"-ERR Invalid message number\r\n"),  # ARABIC-INDIC DIGIT ONE in UTF-8
    (b"9" * 200, b"-ERR Invalid message number\r\n"),
])
def test_bad_message_numbers(command: bytes, number: bytes, expected: bytes) -> None:
    protocol = logged_in(3)
    line = command + b" " + number + (b" 1" if command == b"TOP" else b"")
    assert protocol.handle(line) == expected
    assert protocol.state is State.TRANSACTION
    assert protocol.deleted == set()


def test_leading_zeros_are_a_number() -> None:
    protocol = logged_in(3)
    assert protocol.handle(b"LIST 002") == b"+OK 2 200\r\n"


@pytest.mark.parametrize("line", [
    b"STAT 1", b"NOOP x", b"RSET 1", b"LIST 1 2", b"UIDL 1 2", b"RETR", b"RETR 1 2", b"DELE", b"DELE 1 2",
    b"TOP", b"TOP 1", b"TOP 1 2 3",
])
def test_argument_count_errors(line: bytes) -> None:
    protocol = logged_in(3)
    assert protocol.handle(line) == b"-ERR Syntax error\r\n"
    assert protocol.deleted == set()
    assert protocol.retrieved == 0 and protocol.tops == 0


def test_multiple_spaces_between_arguments_are_tolerated() -> None:
    protocol = logged_in(3)
    assert protocol.handle(b"LIST  2") == b"+OK 2 200\r\n"
    assert isinstance(protocol.handle(b"TOP 1   5"), Retrieve)


def test_retr() -> None:
    protocol = logged_in(3)
    action = protocol.handle(b"RETR 2")
    assert isinstance(action, Retrieve)
    assert action.header == b"+OK 200 octets\r\n"
    assert action.message.uid == "uid2"
    assert action.body_lines is None
    assert protocol.retrieved == 1


@pytest.mark.parametrize(("count", "expected"), [(b"0", 0), (b"5", 5), (b"00", 0), (b"9" * 100, 2**62)])
def test_top(count: bytes, expected: int) -> None:
    protocol = logged_in(3)
    action = protocol.handle(b"TOP 3 " + count)
    assert isinstance(action, Retrieve)
    assert action.header.startswith(b"+OK") and action.header.endswith(b"\r\n")
    assert action.message.uid == "uid3"
    assert action.body_lines == expected
    assert protocol.tops == 1 and protocol.retrieved == 0


@pytest.mark.parametrize("count", [b"-1", b"x", b"1.5", b"+2"])
def test_top_bad_line_count(count: bytes) -> None:
    protocol = logged_in(3)
    response = protocol.handle(b"TOP 1 " + count)
    assert is_err(response)
    assert protocol.tops == 0


def test_top_bad_message_number_reported_before_line_count() -> None:
    protocol = logged_in(3)
    assert protocol.handle(b"TOP 9 x") == b"-ERR No such message\r\n"


def test_dele_marks_and_excludes_from_stat_and_list() -> None:
    protocol = logged_in(3)
    assert protocol.handle(b"DELE 2") == b"+OK Message 2 deleted\r\n"
    assert protocol.handle(b"STAT") == b"+OK 2 400\r\n"
    assert multiline(protocol.handle(b"LIST")) == [b"1 100", b"3 300"]
    assert multiline(protocol.handle(b"UIDL")) == [b"1 uid1", b"3 uid3"]
    # numbers of the others do not change
    assert protocol.handle(b"LIST 3") == b"+OK 3 300\r\n"


@pytest.mark.parametrize("line", [b"RETR 2", b"TOP 2 0", b"DELE 2", b"LIST 2", b"UIDL 2"])
def test_deleted_message_is_refused(line: bytes) -> None:
    protocol = logged_in(3)
    protocol.handle(b"DELE 2")
    assert protocol.handle(line) == b"-ERR Message is deleted\r\n"
    assert protocol.retrieved == 0 and protocol.tops == 0


def test_rset_unmarks() -> None:
    protocol = logged_in(3)
    protocol.handle(b"DELE 1")
    protocol.handle(b"DELE 3")
    assert protocol.handle(b"STAT") == b"+OK 1 200\r\n"
    assert protocol.handle(b"RSET") == b"+OK 3 messages\r\n"
    assert protocol.handle(b"STAT") == b"+OK 3 600\r\n"
    assert isinstance(protocol.handle(b"RETR 1"), Retrieve)
    update = protocol.handle(b"QUIT")
    assert update == Update([])


def test_noop() -> None:
    protocol = logged_in(3)
    assert protocol.handle(b"NOOP") == b"+OK\r\n"


def test_quit_in_transaction_updates_with_marked_messages_in_order() -> None:
    protocol = logged_in(4)
    protocol.handle(b"DELE 3")
    protocol.handle(b"DELE 1")
    action = protocol.handle(b"QUIT")
    assert isinstance(action, Update)
    assert [m.uid for m in action.deleted] == ["uid1", "uid3"]
    assert protocol.state is State.UPDATE
    response = protocol.update_done(0)
    assert is_ok(response) and b"2" in response
    assert protocol.closing


def test_quit_without_deletions() -> None:
    protocol = logged_in(2)
    assert protocol.handle(b"QUIT") == Update([])
    assert is_ok(protocol.update_done(0))
    assert protocol.closing


def test_update_done_with_failures_is_err() -> None:
    protocol = logged_in(3)
    protocol.handle(b"DELE 1")
    protocol.handle(b"DELE 2")
    protocol.handle(b"QUIT")
    response = protocol.update_done(1)
    assert response.startswith(b"-ERR [SYS/TEMP]") and b"1" in response
    assert protocol.closing


@pytest.mark.parametrize("line", [b"STAT", b"DELE 1", b"QUIT", b"USER bob", b"RETR 1", b"NOOP"])
def test_update_state_takes_no_more_commands(line: bytes) -> None:
    protocol = logged_in(3)
    protocol.handle(b"DELE 2")
    update = protocol.handle(b"QUIT")
    assert isinstance(update, Update)
    assert is_err(protocol.handle(line))
    assert protocol.state is State.UPDATE
    assert protocol.deleted == {1}
    assert b"1 messages" in protocol.update_done(0)


def test_message_with_error_is_refused_with_sys_temp() -> None:
    messages = make_messages(2)
    messages[0].error = "filter failed"
    protocol = Pop3Protocol()
    protocol.handle(b"USER alice")
    protocol.handle(b"PASS pw")
    protocol.login_succeeded("alice", messages)
    for line in (b"RETR 1", b"TOP 1 0"):
        response = protocol.handle(line)
        assert is_err(response) and response.startswith(b"-ERR [SYS/TEMP]")
    assert protocol.retrieved == 0 and protocol.tops == 0
    # it is still listed and can be deleted
    assert protocol.handle(b"LIST 1") == b"+OK 1 100\r\n"
    assert is_ok(protocol.handle(b"DELE 1"))
    assert isinstance(protocol.handle(b"RETR 2"), Retrieve)


def test_retrieve_failed_is_sys_temp_and_session_goes_on() -> None:
    protocol = logged_in(2)
    assert isinstance(protocol.handle(b"RETR 1"), Retrieve)
    assert protocol.retrieve_failed().startswith(b"-ERR [SYS/TEMP]")
    assert not protocol.closing
    assert protocol.handle(b"NOOP") == b"+OK\r\n"


def test_every_response_line_is_crlf_terminated_and_short() -> None:
    protocol = logged_in(3)
    lines = [b"STAT", b"LIST", b"UIDL", b"LIST 1", b"UIDL 1", b"DELE 1", b"RSET", b"NOOP", b"CAPA", b"FOO",
             b"", b"RETR 9", b"USER x", b"X" * 250]
    for line in lines:
        response = protocol.handle(line)
        assert isinstance(response, bytes)
        assert response.endswith(b"\r\n")
        for part in response.split(b"\r\n")[:-1]:
            assert len(part) + 2 <= 512
            assert b"\r" not in part and b"\n" not in part


def test_a_wrong_password_is_answered_after_the_delay_the_core_decides() -> None:
    protocol = Pop3Protocol(max_failures=3, failure_delay=2.5)
    answer = protocol.login_failed("auth")
    assert isinstance(answer, Delayed)
    assert answer.seconds == 2.5
    assert answer.data.startswith(b"-ERR [AUTH]")
    # A busy or broken mailbox is no guess: answered at once.
    assert protocol.login_failed("in-use").startswith(b"-ERR [IN-USE]")
    assert protocol.login_failed("temp").startswith(b"-ERR [SYS/TEMP]")


# -- long listings: an action, sent in chunks ---------------------------------------

@pytest.mark.parametrize("command", [b"LIST", b"UIDL"])
def test_a_long_whole_mailbox_listing_is_a_listing_action_in_chunks(command: bytes) -> None:
    count = LISTING_INLINE + 500
    protocol = logged_in(count)
    assert protocol.handle(b"DELE 2") == b"+OK Message 2 deleted\r\n"
    listing = protocol.handle(command)
    assert isinstance(listing, Listing)
    protocol.handle(b"DELE 3")  # after the action: not in it (it was taken when the command came)
    chunks = list(listing.chunks(lines=300))
    assert all(len(chunk.split(b"\r\n")) <= 301 for chunk in chunks)
    lines = multiline(b"".join(chunks))
    assert chunks[0] == b"+OK %d messages\r\n" % (count - 1) and len(lines) == count - 1
    field = (lambda i: b"uid%d" % i) if command == b"UIDL" else (lambda i: b"%d" % (100 * i))
    assert lines[:2] == [b"1 " + field(1), b"3 " + field(3)] and lines[-1] == b"%d " % count + field(count)
    assert protocol.handle(command + b" 1") == b"+OK 1 " + field(1) + b"\r\n"  # one message: bytes


def test_stat_of_a_long_mailbox_is_a_listing_action_added_up_in_steps() -> None:
    count = LISTING_INLINE + 500
    protocol = logged_in(count)
    assert protocol.handle(b"DELE 2") == b"+OK Message 2 deleted\r\n"
    stat = protocol.handle(b"STAT")
    assert isinstance(stat, Listing)
    chunks = list(stat.chunks(lines=300))
    assert chunks[:-1] == [b""] * 5  # a turn for the others between two steps
    assert chunks[-1] == b"+OK %d %d\r\n" % (count - 1, sum(100 * i for i in range(1, count + 1)) - 200)


def test_a_listing_up_to_the_inline_limit_stays_bytes() -> None:
    protocol = logged_in(LISTING_INLINE)
    assert len(multiline(protocol.handle(b"UIDL"))) == LISTING_INLINE
