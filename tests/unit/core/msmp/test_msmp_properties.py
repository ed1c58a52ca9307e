"""Properties of the MSMP core (Hypothesis, derandomized): random bytes in, well-formed answers out.

Arbitrary input (CR, LF, NUL, high bytes, invalid UTF-8, very long lines, commands with
hostile arguments) is framed and handled the way the session does, before and after
login, over a backend whose data is itself hostile (user names, log lines and values
with line breaks, 10 KB strings, a backend that raises). Every answer must be one
`+OK`/`-ERR` line, or for HELP/CAPA/LIST/STAT/LOGS a dot-stuffed multi-line `+OK`
ending in `.`; no line over 512 octets with its CRLF; nothing raises.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geventpop3.core.lines import MAX_RESPONSE_LINE, Delayed
from geventpop3.core.msmp.protocol import MsmpProtocol
from geventpop3.core.names import UserError
from geventpop3.core.settings import KEYS, SettingError

settings.register_profile("geventpop3-derandomized", derandomize=True, max_examples=200, deadline=None,
                          database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DERANDOMIZED = settings.get_profile("geventpop3-derandomized")

MULTILINE = {"HELP", "CAPA", "LIST", "STAT", "LOGS"}
hostile_text = st.text(max_size=40) | st.text(min_size=400, max_size=10_000) | st.sampled_from(
    [".", "..", ".leading dot", "a\r\nb", "a\nb", "\r", "x" * 511, "é" * 300, "\x00", "\udcff"])


@dataclass
class HostileBackend:
    """The Backend interface over whatever the test draws; it raises where told to."""

    users: list[str]
    log_lines: list[str]
    stat: list[str]
    value: str
    explode: bool
    settings: dict[str, str] = field(default_factory=dict)

    def check_admin(self, name: str, password: str, peer: str) -> bool:
        return (name, password) == ("admin", "secret")

    def login_failure_delay(self, peer: str) -> float:
        return 0.5

    def penalties(self) -> list[str]:
        self.maybe_explode()
        return [f"{self.value} failures=3 delay=8 idle=1"]

    def clear_penalty(self, address: str | None) -> int:
        self.maybe_explode()
        if address is not None and not address[:1].isdigit():
            raise UserError("Invalid address")
        return 1

    def add_user(self, name: str, password: str) -> bool:
        self.maybe_explode()
        if len(password) < 3:
            raise UserError("Invalid password")
        created = name not in self.users
        self.users.append(name)
        return created

    def delete_user(self, name: str) -> None:
        self.maybe_explode()
        if name not in self.users:
            raise UserError("User does not exist")
        self.users.remove(name)

    def list_users(self) -> list[str]:
        self.maybe_explode()
        return list(self.users)

    def user_info(self, name: str) -> str:
        self.maybe_explode()
        return f"{name} {len(self.log_lines)} logs {self.value}"

    def set_setting(self, key: str, value: str) -> None:
        self.maybe_explode()
        if value.startswith("bad"):
            raise SettingError(self.value)
        self.settings[key] = value

    def get_setting(self, key: str) -> str:
        self.maybe_explode()
        return self.settings.get(key, self.value)

    def stat_lines(self) -> list[str]:
        self.maybe_explode()
        return list(self.stat)

    def logs(self, user: str, n: int) -> list[str]:
        self.maybe_explode()
        if user == "nobody":
            raise UserError("Invalid user")
        return self.log_lines[-n:]

    def maybe_explode(self) -> None:
        if self.explode:
            raise RuntimeError("backend broke\r\nwith a second line")


backends = st.builds(HostileBackend, users=st.lists(hostile_text, max_size=8), log_lines=st.lists(hostile_text,
                     max_size=8), stat=st.lists(hostile_text, max_size=5), value=hostile_text,
                     explode=st.integers(0, 5).map(lambda n: n == 0))

COMMANDS = ["USER", "PASS", "ADD", "DELE", "LIST", "SET", "GET", "STAT", "LOGS", "PENALTY", "HELP", "CAPA", "QUIT",
            "user",
            "lIsT", "NOPE"]
words = st.one_of(st.sampled_from(["admin", "secret", "alice", "nobody", "bad", "badvalue", "1", "0", "-1",
                                   "99999999999999999999", *KEYS]),
                  st.text(max_size=30).map(lambda t: t.replace(" ", "")))
command_lines = st.builds(lambda c, args, sep: (sep.join([c, *args])).encode("utf-8", "surrogatepass"),
                          st.sampled_from(COMMANDS), st.lists(words, max_size=3), st.sampled_from([" ", "  "]))
raw_bytes = st.binary(max_size=300) | st.binary(min_size=250, max_size=5000)
crlf_lines = command_lines.map(lambda line: line + b"\r\n")
chunks = st.lists(
    st.one_of(crlf_lines, crlf_lines, crlf_lines, st.sampled_from([b"LIST\r\n", b"LOGS alice\r\n", b"STAT\r\n"]),
              command_lines.map(lambda line: line + b"\n"), raw_bytes,
              st.sampled_from([b"\r\n", b"\n", b"\r", b"\x00\r\n", b"\xff\xfe\r\n"])),
    max_size=40)
LOGIN = b"USER admin\r\nPASS secret\r\n"


def check_answer(item: object, answer: object, closing_before: bool) -> None:
    """One answer of handle_line: well formed for the command it answers."""
    if isinstance(answer, Delayed):
        assert answer.seconds == 0.5
        answer = answer.data
    assert isinstance(answer, bytes), answer
    if closing_before:
        assert answer == b""
        return
    assert answer.endswith(b"\r\n"), answer[-80:]
    lines = answer[:-2].split(b"\r\n")
    for line in lines:
        assert b"\r" not in line and b"\n" not in line, line[:80]
        assert len(line) + 2 <= MAX_RESPONSE_LINE, line[:80]
    assert lines[0] == b"+OK" or lines[0].startswith((b"+OK ", b"-ERR ")), lines[0][:80]
    command = ""
    if isinstance(item, bytes):
        try:
            parts = item.decode("utf-8").split()
        except UnicodeDecodeError:
            parts = []
        command = parts[0].upper() if parts else ""
    if lines[0].startswith(b"+OK") and command in MULTILINE:
        assert lines[0] == b"+OK" and lines[-1] == b".", answer[:200]
        assert all(not line.startswith(b".") or line.startswith(b"..") for line in lines[1:-1])
    else:
        assert len(lines) == 1, answer[:200]


@DERANDOMIZED
@given(backend=backends, login=st.booleans(), data=chunks)
@pytest.mark.slow
def test_random_input_never_raises_and_answers_are_well_formed(backend: HostileBackend, login: bool,
                                                               data: list[bytes]) -> None:
    protocol = MsmpProtocol(backend)
    for chunk in ([LOGIN] if login else []) + data:
        for item in protocol.feed(chunk):
            closing_before = protocol.closing
            check_answer(item, protocol.handle_line(item), closing_before)
    if login and not backend.explode:
        assert protocol.authenticated


@DERANDOMIZED
@given(backend=backends, data=chunks)
@pytest.mark.slow
def test_receive_answers_every_line_until_closing(backend: HostileBackend, data: list[bytes]) -> None:
    """The all-in-one path: as many answers as lines (until QUIT or the third failure), each well formed."""
    protocol = MsmpProtocol(backend)
    answer = protocol.receive(LOGIN + b"".join(data))
    assert answer.startswith(b"+OK\r\n+OK Logged in\r\n")
    for line in answer[:-2].split(b"\r\n") if answer else []:
        assert len(line) + 2 <= MAX_RESPONSE_LINE and b"\r" not in line and b"\n" not in line
