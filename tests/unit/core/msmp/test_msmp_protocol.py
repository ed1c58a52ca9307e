"""The MSMP core without sockets: every command, state and error of msmp.md."""

from __future__ import annotations

import pytest

from geventpop3 import IMPLEMENTATION
from geventpop3.core.lines import Delayed
from geventpop3.core.msmp.protocol import DEFAULT_LOGS, MAX_LOGIN_FAILURES, MAX_LOGS, MsmpProtocol
from geventpop3.core.names import UserError, valid_password
from geventpop3.core.settings import KEYS, SettingError
from geventpop3.service.setting_checks import checked_settings


class MemoryBackend:
    """The Backend interface over dicts, recording the calls that matter."""

    def __init__(self) -> None:
        self.admins = {"admin": "secret"}
        self.users: dict[str, str] = {"alice": "pw1"}
        self.logged_in: set[str] = set()
        self.user_limit = 3
        self.settings = checked_settings()
        self.log_entries: dict[str, list[str]] = {"alice": [f"entry {i}" for i in range(150)]}
        self.stats = ["Total connections: 5", "Current connections: 1"]
        self.logs_asked: list[tuple[str, int]] = []
        self.admin_checks: list[tuple[str, str]] = []
        self.explode = False
        self.failure_delay = 0.25

    def login_failure_delay(self, peer: str) -> float:
        return self.failure_delay

    def penalties(self) -> list[str]:
        return []

    def clear_penalty(self, address: str | None) -> int:
        return 0

    def check_admin(self, name: str, password: str, peer: str) -> bool:
        self.admin_checks.append((name, password))
        return self.admins.get(name) == password

    def add_user(self, name: str, password: str) -> bool:
        if not valid_password(password):
            raise UserError("Invalid password")
        if name not in self.users and len(self.users) >= self.user_limit:
            raise UserError("User limit reached")
        created = name not in self.users
        self.users[name] = password
        return created

    def delete_user(self, name: str) -> None:
        if name not in self.users:
            raise UserError("User does not exist")
        if name in self.logged_in:
            raise UserError("User is currently logged in")
        del self.users[name]

    def list_users(self) -> list[str]:
        if self.explode:
            raise RuntimeError("backend broke")
        return sorted(self.users)

    def user_info(self, name: str) -> str:
        if name not in self.users:
            raise UserError("User does not exist")
        count = len(self.log_entries.get(name, []))
        return f"{name} {count} logs messages=0 octets=0 logged-in={'yes' if name in self.logged_in else 'no'}"

    def set_setting(self, key: str, value: str) -> None:
        self.settings.set(key, value, source="test")

    def get_setting(self, key: str) -> str:
        return self.settings.get(key)

    def stat_lines(self) -> list[str]:
        return list(self.stats)

    def logs(self, user: str, n: int) -> list[str]:
        self.logs_asked.append((user, n))
        entries = self.log_entries.get(user)
        if entries is None and user not in self.users:
            raise UserError("Invalid user")
        return (entries or [])[-n:]


@pytest.fixture
def backend() -> MemoryBackend:
    return MemoryBackend()


@pytest.fixture
def proto(backend: MemoryBackend) -> MsmpProtocol:
    return MsmpProtocol(backend)


@pytest.fixture
def admin(proto: MsmpProtocol) -> MsmpProtocol:
    assert proto.receive(b"USER admin\r\nPASS secret\r\n") == b"+OK\r\n+OK Logged in\r\n"
    return proto


def say(proto: MsmpProtocol, line: str | bytes) -> bytes:
    data = line if isinstance(line, bytes) else line.encode()
    return proto.receive(data + b"\r\n")


def multi(*lines: str) -> bytes:
    return b"".join(line.encode() + b"\r\n" for line in ("+OK", *lines, "."))


def body(answer: bytes) -> list[str]:
    """The data lines of a multi-line answer (dot-stuffing undone)."""
    lines = answer.decode().split("\r\n")
    assert lines[0] == "+OK" and lines[-2:] == [".", ""], answer
    return [line[1:] if line.startswith(".") else line for line in lines[1:-2]]


# -- greeting and login ---------------------------------------------------------

def test_greeting_names_the_implementation(proto: MsmpProtocol) -> None:
    assert proto.greeting() == f"+OK MSMP1 {IMPLEMENTATION} ready\r\n".encode()
    assert IMPLEMENTATION.startswith("geventpop3-")


def test_login_then_quit(proto: MsmpProtocol) -> None:
    assert say(proto, "USER admin") == b"+OK\r\n"
    assert not proto.authenticated
    assert say(proto, "PASS secret") == b"+OK Logged in\r\n"
    assert proto.authenticated and proto.admin == "admin"
    assert say(proto, "QUIT") == b"+OK Bye\r\n"
    assert proto.closing


def test_user_is_always_ok_and_failures_are_indistinguishable(proto: MsmpProtocol, backend: MemoryBackend) -> None:
    assert say(proto, "USER nobody") == b"+OK\r\n"
    unknown = say(proto, "PASS secret")
    assert say(proto, "USER admin") == b"+OK\r\n"
    wrong = say(proto, "PASS wrong")
    assert unknown == wrong == b"-ERR Invalid credentials\r\n"
    # Both went to the backend, which is what makes their timing equal.
    assert backend.admin_checks == [("nobody", "secret"), ("admin", "wrong")]
    assert not proto.authenticated and not proto.closing


def test_user_with_an_unsafe_name_is_still_ok(proto: MsmpProtocol) -> None:
    assert say(proto, "USER " + "x" * 60) == b"+OK\r\n"
    assert say(proto, "USER ../etc") == b"+OK\r\n"


def test_pass_without_user_is_an_error_not_a_failure(proto: MsmpProtocol, backend: MemoryBackend) -> None:
    assert say(proto, "PASS secret") == b"-ERR USER first\r\n"
    assert proto.login_failures == 0
    assert backend.admin_checks == []


def test_after_a_failed_pass_the_client_starts_again_with_user(proto: MsmpProtocol) -> None:
    say(proto, "USER admin")
    assert say(proto, "PASS wrong") == b"-ERR Invalid credentials\r\n"
    assert say(proto, "PASS secret") == b"-ERR USER first\r\n"
    assert not proto.authenticated
    assert proto.receive(b"USER admin\r\nPASS secret\r\n") == b"+OK\r\n+OK Logged in\r\n"


def test_second_user_replaces_the_first(proto: MsmpProtocol) -> None:
    assert proto.receive(b"USER nobody\r\nUSER admin\r\nPASS secret\r\n") == b"+OK\r\n+OK\r\n+OK Logged in\r\n"


def test_three_failures_close_the_connection(proto: MsmpProtocol) -> None:
    assert MAX_LOGIN_FAILURES == 3
    for attempt in range(1, 4):
        assert say(proto, "USER admin") == b"+OK\r\n"
        assert say(proto, f"PASS wrong{attempt}") == b"-ERR Invalid credentials\r\n"
        assert proto.closing == (attempt == 3)
    # Nothing more is answered once closing, not even a correct login.
    assert proto.receive(b"USER admin\r\nPASS secret\r\n") == b""
    assert not proto.authenticated


def test_pipelined_failures_stop_at_the_third(proto: MsmpProtocol) -> None:
    data = b"USER a\r\nPASS x\r\n" * 3 + b"USER admin\r\nPASS secret\r\n"
    assert proto.receive(data) == b"+OK\r\n-ERR Invalid credentials\r\n" * 3
    assert proto.closing and not proto.authenticated


def test_only_a_failed_pass_is_delayed(proto: MsmpProtocol, backend: MemoryBackend) -> None:
    """The core says how long to wait, reading the delay at each failure (SET applies at once)."""
    items = proto.feed(b"USER admin\r\nPASS wrong\r\nUSER admin\r\nPASS wrong\r\nUSER admin\r\n")
    answers = []
    for number, item in enumerate(items):
        if number == 3:
            backend.failure_delay = 1.5
        answers.append(proto.handle_line(item))
    assert answers == [b"+OK\r\n", Delayed(0.25, b"-ERR Invalid credentials\r\n"), b"+OK\r\n",
                       Delayed(1.5, b"-ERR Invalid credentials\r\n"), b"+OK\r\n"]


def test_unknown_name_and_wrong_password_wait_alike(proto: MsmpProtocol) -> None:
    unknown = [proto.handle_line(item) for item in proto.feed(b"USER nobody\r\nPASS secret\r\n")][1]
    wrong = [proto.handle_line(item) for item in proto.feed(b"USER admin\r\nPASS wrong\r\n")][1]
    assert unknown == wrong == Delayed(0.25, b"-ERR Invalid credentials\r\n")


def test_successful_and_refused_commands_are_never_delayed(proto: MsmpProtocol) -> None:
    lines = [b"PASS secret", b"FROB", b"USER admin", b"PASS", b"PASS secret", b"USER admin", b"ADD bob pw",
             b"LIST", b"QUIT"]
    answers = [proto.handle_line(line) for line in lines]
    assert all(isinstance(answer, bytes) for answer in answers), answers
    assert proto.authenticated


@pytest.mark.parametrize("line", ["ADD bob pw", "DELE alice", "LIST", "LIST alice", "SET maildir /tmp",
                                  "GET maildir", "STAT", "LOGS alice", "LOGS alice 5", "NOOP", "FROB x y"])
def test_commands_before_login_are_refused(proto: MsmpProtocol, backend: MemoryBackend, line: str) -> None:
    assert say(proto, line) == b"-ERR Not authenticated\r\n"
    assert backend.users == {"alice": "pw1"} and backend.logs_asked == []


def test_help_capa_quit_work_before_login(proto: MsmpProtocol) -> None:
    assert "ADD <user> <password>" in say(proto, "HELP").decode()
    capa = body(say(proto, "CAPA"))
    assert capa[0] == "MSMP1"
    assert f"IMPLEMENTATION {IMPLEMENTATION}" in capa
    assert "PIPELINING" in capa
    assert say(proto, "QUIT") == b"+OK Bye\r\n" and proto.closing


def test_user_and_pass_after_login_are_refused(admin: MsmpProtocol) -> None:
    assert say(admin, "USER admin") == b"-ERR Already logged in\r\n"
    assert say(admin, "PASS secret") == b"-ERR Already logged in\r\n"
    assert admin.authenticated


# -- users ------------------------------------------------------------------------

def test_add_creates_then_updates(admin: MsmpProtocol, backend: MemoryBackend) -> None:
    assert say(admin, "ADD bob s3cret") == b"+OK Added user\r\n"
    assert backend.users["bob"] == "s3cret"
    assert say(admin, "ADD bob other") == b"+OK Updated password\r\n"
    assert backend.users["bob"] == "other"


@pytest.mark.parametrize("name", ["x" * 41, ".hidden", "-dash", "a/b", "..", "b\u00e9b", "a\\b"])
def test_add_refuses_unsafe_names_before_the_backend(admin: MsmpProtocol, backend: MemoryBackend, name: str) -> None:
    assert say(admin, f"ADD {name} pw") == b"-ERR Unsafe username\r\n"
    assert name not in backend.users


def test_add_accepts_a_forty_character_name(admin: MsmpProtocol) -> None:
    assert say(admin, "ADD " + "u" * 40 + " pw") == b"+OK Added user\r\n"


def test_add_user_limit_and_bad_password(admin: MsmpProtocol, backend: MemoryBackend) -> None:
    assert say(admin, "ADD bob pw") == b"+OK Added user\r\n"
    assert say(admin, "ADD carol pw") == b"+OK Added user\r\n"
    assert say(admin, "ADD dave pw") == b"-ERR User limit reached\r\n"
    assert say(admin, "ADD bob newpw") == b"+OK Updated password\r\n"  # updates still work at the limit
    assert say(admin, "ADD bob " + "p" * 101) == b"-ERR Invalid password\r\n"


def test_dele(admin: MsmpProtocol, backend: MemoryBackend) -> None:
    backend.users["bob"] = "pw"
    backend.logged_in.add("bob")
    assert say(admin, "DELE bob") == b"-ERR User is currently logged in\r\n"
    assert say(admin, "DELE alice") == b"+OK Deleted user\r\n"
    assert say(admin, "DELE alice") == b"-ERR User does not exist\r\n"
    assert say(admin, "DELE ../etc") == b"-ERR User does not exist\r\n"
    assert "alice" not in backend.users and "bob" in backend.users


def test_list_and_list_user(admin: MsmpProtocol, backend: MemoryBackend) -> None:
    backend.users[".x"] = "not reachable over ADD, but a stuffing case"
    assert say(admin, "LIST") == multi("..x", "alice")
    assert body(say(admin, "LIST")) == [".x", "alice"]
    assert say(admin, "LIST alice") == multi("alice 150 logs messages=0 octets=0 logged-in=no")
    assert say(admin, "LIST nobody") == b"-ERR User does not exist\r\n"
    assert say(admin, "LIST " + "n" * 41) == b"-ERR User does not exist\r\n"


def test_empty_list_is_ok_and_dot(admin: MsmpProtocol, backend: MemoryBackend) -> None:
    backend.users.clear()
    assert say(admin, "LIST") == b"+OK\r\n.\r\n"


# -- settings ---------------------------------------------------------------------

def test_set_and_get(admin: MsmpProtocol, backend: MemoryBackend, tmp_path) -> None:
    assert say(admin, f"SET maildir {tmp_path}") == b"+OK Changed value\r\n"
    assert say(admin, "GET maildir") == f"+OK {tmp_path}\r\n".encode()
    assert say(admin, "SET idle_timeout 30") == b"+OK Changed value\r\n"
    assert say(admin, "GET idle_timeout") == b"+OK 30\r\n"
    assert say(admin, "GET transformer") == b"+OK none\r\n"


def test_every_key_that_set_accepts_get_returns(admin: MsmpProtocol) -> None:
    for key in KEYS:
        answer = say(admin, f"GET {key}")
        assert answer.startswith(b"+OK"), (key, answer)


def test_keys_are_case_sensitive_and_bounded(admin: MsmpProtocol) -> None:
    assert say(admin, "GET MAILDIR") == b"-ERR Invalid key\r\n"
    assert say(admin, "SET this_is_an_invalid_key ./maildir") == b"-ERR Invalid key\r\n"
    assert say(admin, "GET " + "k" * 41) == b"-ERR Invalid key\r\n"
    assert say(admin, "SET " + "k" * 41 + " 1") == b"-ERR Invalid key\r\n"


def test_invalid_values_say_why(admin: MsmpProtocol, backend: MemoryBackend) -> None:
    assert say(admin, "SET maildir /no/such/dir") == b"-ERR Invalid value: not an existing directory\r\n"
    assert say(admin, "SET idle_timeout abc") == b"-ERR Invalid value: not a number\r\n"
    assert say(admin, "SET max_connections 0") == b"-ERR Invalid value: must be between 1 and 1000000\r\n"
    answer = say(admin, "SET transformer no-such-program-xyz")
    assert answer.startswith(b"-ERR Invalid value: program not found"), answer
    assert say(admin, "SET idle_timeout " + "1" * 101) == b"-ERR Invalid value: longer than 100 characters\r\n"
    assert say(admin, "SET idle_timeout 1\x072") == b"-ERR Invalid value: not printable\r\n"
    assert backend.settings.idle_timeout == 600.0  # nothing changed


def test_set_value_with_spaces_is_a_syntax_error(admin: MsmpProtocol) -> None:
    assert say(admin, "SET transformer tr a b") == b"-ERR Syntax error\r\n"


# -- statistics and logs ----------------------------------------------------------

def test_stat(admin: MsmpProtocol) -> None:
    assert say(admin, "STAT") == multi("Total connections: 5", "Current connections: 1")


def test_logs_default_count_and_n(admin: MsmpProtocol, backend: MemoryBackend) -> None:
    lines = body(say(admin, "LOGS alice"))
    assert len(lines) == DEFAULT_LOGS and lines[-1] == "entry 149" and lines[0] == "entry 50"
    assert body(say(admin, "LOGS alice 2")) == ["entry 148", "entry 149"]
    say(admin, "LOGS alice 999999999999")
    assert backend.logs_asked[-1] == ("alice", MAX_LOGS)


def test_logs_errors(admin: MsmpProtocol, backend: MemoryBackend) -> None:
    assert say(admin, "LOGS nobody") == b"-ERR Invalid user\r\n"
    assert say(admin, "LOGS ../../etc") == b"-ERR Invalid user\r\n"
    for bad in ("0", "-1", "x", "1.5", "\u0663"):
        assert say(admin, f"LOGS alice {bad}").startswith(b"-ERR Invalid number"), bad
    backend.users["quiet"] = "pw"
    assert say(admin, "LOGS quiet") == b"+OK\r\n.\r\n"


def test_log_lines_are_dot_stuffed_and_clipped(admin: MsmpProtocol, backend: MemoryBackend) -> None:
    backend.log_entries["alice"] = [".starts with a dot", "x" * 2000, "new\r\nline"]
    answer = say(admin, "LOGS alice")
    assert all(len(line) + 2 <= 512 for line in answer.split(b"\r\n"))
    lines = answer.split(b"\r\n")
    assert lines[1] == b"..starts with a dot"
    assert lines[3] == b"new  line"
    assert body(answer)[0] == ".starts with a dot"


# -- syntax -----------------------------------------------------------------------

@pytest.mark.parametrize("line", ["ADD bob", "ADD a b c", "DELE", "DELE a b", "LIST a b", "SET maildir",
                                  "GET", "GET a b", "STAT x", "LOGS", "LOGS a 1 2", "QUIT now", "HELP me",
                                  "CAPA x"])
def test_wrong_argument_count_is_a_syntax_error(admin: MsmpProtocol, line: str) -> None:
    assert say(admin, line) == b"-ERR Syntax error\r\n"


def test_login_syntax_errors(proto: MsmpProtocol) -> None:
    assert say(proto, "USER") == b"-ERR Syntax error\r\n"
    assert say(proto, "USER a b") == b"-ERR Syntax error\r\n"
    say(proto, "USER admin")
    assert say(proto, "PASS") == b"-ERR Syntax error\r\n"
    assert proto.login_failures == 0
    assert say(proto, "PASS secret") == b"+OK Logged in\r\n"  # the USER still stands


def test_unknown_commands(admin: MsmpProtocol) -> None:
    assert say(admin, "NOOP") == b"-ERR Unknown command\r\n"
    assert say(admin, "RETR 1") == b"-ERR Unknown command\r\n"
    assert say(admin, "") == b"-ERR Unknown command\r\n"
    assert say(admin, "   ") == b"-ERR Unknown command\r\n"


def test_keywords_are_case_insensitive_and_spaces_collapse(admin: MsmpProtocol, backend: MemoryBackend) -> None:
    assert say(admin, "add   Bob    pw") == b"+OK Added user\r\n"
    assert "Bob" in backend.users  # user names keep their case
    assert say(admin, "  gEt   transformer  ") == b"+OK none\r\n"
    assert say(admin, "Stat").startswith(b"+OK\r\n")


def test_bare_lf_is_accepted(proto: MsmpProtocol) -> None:
    assert proto.receive(b"USER admin\nPASS secret\n") == b"+OK\r\n+OK Logged in\r\n"


def test_pipelining_answers_in_order(proto: MsmpProtocol) -> None:
    data = b"USER admin\r\nPASS secret\r\nADD bob pw\r\nGET transformer\r\nLIST\r\nQUIT\r\nLIST\r\n"
    assert proto.receive(data) == (
        b"+OK\r\n+OK Logged in\r\n+OK Added user\r\n+OK none\r\n" + multi("alice", "bob") + b"+OK Bye\r\n"
    )


def test_commands_split_across_chunks(admin: MsmpProtocol) -> None:
    assert admin.receive(b"GE") == b""
    assert admin.receive(b"T trans") == b""
    assert admin.receive(b"former\r") == b""
    assert admin.receive(b"\nST") == b"+OK none\r\n"
    assert admin.receive(b"AT\r\n").startswith(b"+OK\r\n")


def test_overlong_line_is_refused_and_the_session_goes_on(admin: MsmpProtocol) -> None:
    line = b"ADD bob " + b"p" * 300
    assert admin.receive(line + b"\r\nGET transformer\r\n") == b"-ERR Line too long\r\n+OK none\r\n"
    # A line of exactly 255 octets with its CRLF is fine; 256 is not.
    exact = b"GET " + b"k" * 249
    assert len(exact) + 2 == 255
    assert admin.receive(exact + b"\r\n") == b"-ERR Invalid key\r\n"
    assert admin.receive(exact + b"k\r\n") == b"-ERR Line too long\r\n"


def test_endless_line_is_reported_once(admin: MsmpProtocol) -> None:
    answers = b"".join(admin.receive(b"x" * 4096) for _ in range(50))
    assert answers == b"-ERR Line too long\r\n"
    assert admin.receive(b"tail\r\nGET transformer\r\n") == b"+OK none\r\n"


def test_overlong_line_before_login(proto: MsmpProtocol) -> None:
    assert proto.receive(b"USER " + b"a" * 400 + b"\r\n") == b"-ERR Line too long\r\n"


@pytest.mark.parametrize("junk", [b"\xff\xfe\xfd", b"GET \xc3(", b"\x00\x01\x02", b"USER a\x00b",
                                  bytes(range(256)).replace(b"\n", b""), b"\x80" * 200])
def test_binary_junk_gets_a_clear_error(proto: MsmpProtocol, admin: MsmpProtocol, junk: bytes) -> None:
    for state in (MsmpProtocol(MemoryBackend()), admin):
        answer = state.receive(junk + b"\r\n")
        assert answer.startswith(b"-ERR ") and answer.endswith(b"\r\n") and answer.count(b"\r\n") == 1, answer
    assert say(admin, "GET transformer") == b"+OK none\r\n"


def test_random_bytes_never_raise(admin: MsmpProtocol) -> None:
    import random

    rng = random.Random(1234)
    for _ in range(300):
        chunk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 120)))
        answer = admin.receive(chunk)
        for line in answer.split(b"\r\n")[:-1]:
            assert len(line) + 2 <= 512
            assert line[:1] in (b"+", b"-", b".") or line.isascii(), line


def test_backend_failure_is_an_error_answer(admin: MsmpProtocol, backend: MemoryBackend) -> None:
    backend.explode = True
    assert say(admin, "LIST") == b"-ERR Internal error, see the server log\r\n"
    assert not admin.closing
    backend.explode = False
    assert say(admin, "LIST").startswith(b"+OK")


def test_responses_never_exceed_512_octets(admin: MsmpProtocol, backend: MemoryBackend) -> None:
    backend.stats = ["S" * 1000]
    backend.settings.apply("transformer", "t" * 700, "test")
    for line in ("STAT", "GET transformer", "HELP", "CAPA"):
        for part in say(admin, line).split(b"\r\n"):
            assert len(part) + 2 <= 512


def test_setting_error_for_key_from_backend(admin: MsmpProtocol, backend: MemoryBackend) -> None:
    def refuse(key: str) -> str:
        raise SettingError("Invalid key")

    backend.get_setting = refuse  # type: ignore[method-assign]
    assert say(admin, "GET maildir") == b"-ERR Invalid key\r\n"
