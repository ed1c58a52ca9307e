"""MSMP (the management protocol) as a pure state machine: bytes in, bytes out, no I/O.

The session module feeds received bytes and writes what comes back; everything a
client can say, right or wrong, is decided here, so it is tested without sockets.
The work itself (users, settings, counters, logs) is done by a `Backend`, which the
server implements over its `ServerContext` (geventpop3.service.msmp.backend) and the tests
implement in memory. See docs/msmp.md for the protocol as implemented.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple, Protocol

from geventpop3 import IMPLEMENTATION
from geventpop3.core.lines import LINE_TOO_LONG, MAX_RESPONSE_LINE, Delayed, LineBuffer, dot_stuff_lines, response_line
from geventpop3.core.names import HashingBusy, UserError, valid_username
from geventpop3.core.settings import KEYS, MAX_KEY_LENGTH, MAX_VALUE_LENGTH, SettingError, SettingNotSaved

log = logging.getLogger(__name__)

# msmp.md: "after 3 failures on one connection it closes the connection". A fixed
# number, not the POP3 `max_login_failures` setting, so the admin port behaves as
# documented whatever the POP3 side is tuned to.
MAX_LOGIN_FAILURES = 3
DEFAULT_LOGS = 100  # LOGS without n
MAX_LOGS = 10_000  # LOGS n is clamped to this

# Data lines are cut so that, even dot-stuffed, they fit the 512-octet response limit.
_MAX_DATA_OCTETS = MAX_RESPONSE_LINE - 3


class Backend(Protocol):
    """What the protocol asks of the server. UserError/SettingError carry the -ERR text."""

    def check_admin(self, name: str, password: str, peer: str) -> bool:
        """True for a known admin with this password; same cost for an unknown name.
        `peer` is the client's address (its penalty orders the wait; a success clears it).
        HashingBusy when too many logins already wait for a hash."""

    def login_failure_delay(self, peer: str) -> float:
        """Count a failed PASS from `peer`; the seconds to wait before answering it."""

    def penalties(self) -> list[str]:
        """The PENALTY lines: one per source with recent failed logins."""

    def clear_penalty(self, address: str | None) -> int:
        """Forget the penalty of the source of `address` (None: all); how many. UserError if not an IP."""

    def add_user(self, name: str, password: str) -> bool:
        """Create the user (and Maildir) or update its password; True when created."""

    def delete_user(self, name: str) -> None:
        """Remove the account, moving its mail aside (never destroying it)."""

    def list_users(self) -> list[str]: ...

    def user_info(self, name: str) -> str:
        """The LIST <user> line: `<user> <n> logs ...`; UserError if unknown."""

    def set_setting(self, key: str, value: str) -> None: ...

    def get_setting(self, key: str) -> str: ...

    def stat_lines(self) -> list[str]: ...

    def logs(self, user: str, n: int) -> list[str]:
        """The user's last n access-log lines, oldest first; UserError('Invalid user')."""

    def reload(self) -> list[str]:
        """Re-read what the server can re-read while running (the certificate); the problems."""


HELP_LINES = (
    "USER <name>            start logging in",
    "PASS <password>        finish logging in",
    "ADD <user> <password>  create a POP3 user, or change its password",
    "DELE <user>            delete a POP3 user (its mail is kept aside)",
    "LIST                   list POP3 users",
    "LIST <user>            one user: access-log entries, messages, octets, logged in",
    "SET <key> <value>      change a setting at once",
    "GET <key>              read a setting",
    "STAT                   server statistics",
    "LOGS <user> [<n>]      a user's last n access-log entries (default 100)",
    "PENALTY                sources with recent failed logins, their delay",
    "PENALTY CLEAR <ip>|ALL forget the penalty of one source, or of all",
    "RELOAD                 re-read the users file, the TLS certificate and key (as SIGHUP)",
    "HELP                   this list",
    "CAPA                   capabilities",
    "QUIT                   end the session",
)

Answer = bytes | Delayed  # a Delayed only for a failed PASS


def _ok(text: str = "") -> bytes:
    return response_line(f"+OK {text}" if text else "+OK")


def _keys_lines() -> list[str]:
    """`KEYS ...` capability lines naming every setting, as many as the 512-octet line limit needs."""
    lines: list[str] = []
    current = "KEYS"
    for key in KEYS:
        if len(current) + 1 + len(key) > _MAX_DATA_OCTETS:
            lines.append(current)
            current = "KEYS"
        current += " " + key
    return [*lines, current]


def _err(text: str) -> bytes:
    return response_line(f"-ERR {text}")


def _clip(line: str) -> str:
    """One data line made safe to send: no line breaks, short enough once stuffed."""
    if "\r" in line or "\n" in line:
        line = line.replace("\r", " ").replace("\n", " ")
    data = line.encode("utf-8", "replace")
    if len(data) > _MAX_DATA_OCTETS:
        line = data[:_MAX_DATA_OCTETS].decode("utf-8", "ignore")
    return line


def _multi(lines: list[str]) -> bytes:
    return _ok() + dot_stuff_lines(_clip(line) for line in lines)


def _printable_token(text: str) -> bool:
    return text.isprintable() and not any(ch.isspace() for ch in text)


class MsmpProtocol:
    """One MSMP connection's state. Not thread-safe; one per connection.

    Use: send `greeting()`; for each received chunk, for each item of `feed(data)`,
    send `handle_line(item)`. That answer is bytes, or for a failed PASS a `Delayed`:
    send what is queued, wait its `seconds`, then send its `data`. Once `closing` is
    True, send what is due and close. `receive(data)` does it all without the delay
    (for tests).

    Commands dispatch through one table per state (`_AUTHORIZATION_COMMANDS` before
    login, `_ADMIN_COMMANDS` after), each entry naming its handler and its arity.
    """

    def __init__(self, backend: Backend, max_login_failures: int = MAX_LOGIN_FAILURES, peer: str = "") -> None:
        self.backend = backend
        self.peer = peer  # the client's address: its failed logins are penalised together
        self.max_login_failures = max_login_failures
        self.closing = False
        self.authenticated = False
        self.admin: str | None = None  # the admin's name once logged in
        self.login_failures = 0
        self._user: str | None = None  # name given by USER, waiting for PASS
        self._lines = LineBuffer()

    @staticmethod
    def greeting() -> bytes:
        return _ok(f"MSMP1 {IMPLEMENTATION} ready")

    def feed(self, data: bytes) -> list[object]:
        """Frame received bytes into command lines (bytes) or LINE_TOO_LONG."""
        return self._lines.feed(data)

    def receive(self, data: bytes) -> bytes:
        """Every answer due for `data`, in order, delays skipped; nothing after QUIT or
        the last failure."""
        out = []
        for item in self.feed(data):
            if self.closing:
                break
            answer = self.handle_line(item)
            out.append(answer.data if isinstance(answer, Delayed) else answer)
        return b"".join(out)

    def handle_line(self, item: object) -> Answer:
        """The answer to one framed line; never raises for any input."""
        if self.closing:
            return b""
        if item is LINE_TOO_LONG:
            return _err("Line too long")
        assert isinstance(item, bytes)
        try:
            text = item.decode("utf-8")
        except UnicodeDecodeError:
            return _err("Invalid command: not UTF-8 text")
        if "\x00" in text:
            return _err("Invalid command: contains NUL")
        words = [word for word in text.split(" ") if word]
        if not words:
            return _err("Unknown command")
        command, args = words[0].upper(), words[1:]
        try:
            return self._dispatch(command, args)
        except Exception:  # a backend failure is an answer, not a crash
            log.exception("MSMP %s failed", command)
            return _err("Internal error, see the server log")

    # -- dispatch -------------------------------------------------------------
    def _dispatch(self, command: str, args: list[str]) -> Answer:
        table = _ADMIN_COMMANDS if self.authenticated else _AUTHORIZATION_COMMANDS
        entry = table.get(command)
        if entry is None:
            # Before login every other word is refused alike: nothing is told about commands.
            return _err("Unknown command" if self.authenticated else "Not authenticated")
        if not entry.least <= len(args) <= entry.most:
            return _err("Syntax error")
        return entry.handler(self, *args)

    # -- authorization --------------------------------------------------------
    def _cmd_user(self, name: str) -> Answer:
        self._user = name  # always +OK: whether the name exists is not told
        return _ok()

    def _cmd_pass(self, password: str) -> Answer:
        if self._user is None:
            return _err("USER first")
        name, self._user = self._user, None
        try:
            ok = self.backend.check_admin(name, password, self.peer)
        except HashingBusy as exc:  # not a failure: nothing was checked
            return _err(str(exc))
        if ok:
            self.authenticated = True
            self.admin = name
            return _ok("Logged in")
        self.login_failures += 1
        if self.login_failures >= self.max_login_failures:
            self.closing = True
        return Delayed(self.backend.login_failure_delay(self.peer), _err("Invalid credentials"))

    def _cmd_already(self, _argument: str) -> Answer:
        return _err("Already logged in")

    def _cmd_quit(self) -> bytes:
        self.closing = True
        return _ok("Bye")

    def _cmd_help(self) -> bytes:
        return _multi(list(HELP_LINES))

    def _cmd_capa(self) -> bytes:
        return _multi([
            "MSMP1",
            f"IMPLEMENTATION {IMPLEMENTATION}",
            "USER",
            "PIPELINING",
            "COMMANDS " + " ".join(_ADMIN_COMMANDS),
            *_keys_lines(),
        ])

    # -- users ----------------------------------------------------------------
    def _cmd_add(self, name: str, password: str) -> bytes:
        try:
            if not valid_username(name):
                raise UserError("Unsafe username")
            created = self.backend.add_user(name, password)
        except UserError as exc:
            return _err(str(exc))
        return _ok("Added user" if created else "Updated password")

    def _cmd_dele(self, name: str) -> bytes:
        try:
            if not valid_username(name):
                raise UserError("User does not exist")
            self.backend.delete_user(name)
        except UserError as exc:
            return _err(str(exc))
        return _ok("Deleted user")

    def _cmd_list(self, name: str | None = None) -> bytes:
        if name is None:
            return _multi(self.backend.list_users())
        try:
            if not valid_username(name):
                raise UserError("User does not exist")
            line = self.backend.user_info(name)
        except UserError as exc:
            return _err(str(exc))
        return _multi([line])

    def _cmd_logs(self, name: str, count: str | None = None) -> bytes:
        n = DEFAULT_LOGS
        if count is not None:
            if not count.isascii() or not count.isdigit() or int(count) < 1:
                return _err("Invalid number: n must be a positive integer")
            n = min(int(count), MAX_LOGS)
        try:
            # Any name: also `-unknown-`, the bucket of failed logins under names that are no user.
            lines = self.backend.logs(name, n)
        except UserError as exc:
            return _err(str(exc))
        return _multi(lines)

    # -- settings and statistics ----------------------------------------------
    def _cmd_set(self, key: str, value: str) -> bytes:
        if len(key) > MAX_KEY_LENGTH or key not in KEYS:
            return _err("Invalid key")
        if len(value) > MAX_VALUE_LENGTH:
            return _err(f"Invalid value: longer than {MAX_VALUE_LENGTH} characters")
        if not _printable_token(value):
            return _err("Invalid value: not printable")
        try:
            self.backend.set_setting(key, value)
        except SettingError as exc:
            return _err(_setting_error(exc))
        return _ok("Changed value")

    def _cmd_get(self, key: str) -> bytes:
        if len(key) > MAX_KEY_LENGTH or key not in KEYS:
            return _err("Invalid key")
        try:
            value = self.backend.get_setting(key)
        except SettingError as exc:
            return _err(_setting_error(exc))
        return _ok(_clip(value))

    def _cmd_stat(self) -> bytes:
        return _multi(self.backend.stat_lines())

    def _cmd_penalty(self, action: str | None = None, target: str | None = None) -> bytes:
        if action is None:
            return _multi(self.backend.penalties())
        if action.upper() != "CLEAR" or target is None:
            return _err("Syntax error")
        try:
            cleared = self.backend.clear_penalty(None if target.upper() == "ALL" else target)
        except UserError as exc:
            return _err(str(exc))
        return _ok(f"Cleared {cleared} source" + ("" if cleared == 1 else "s"))

    def _cmd_reload(self) -> bytes:
        problems = self.backend.reload()
        if problems:
            return _err(_clip("; ".join(problems)))
        return _ok("Reloaded")


class _Command(NamedTuple):
    """One table entry: the handler and how many arguments it takes (least, most)."""

    handler: Callable[..., Answer]
    least: int
    most: int


# Before login (msmp.md, Session 3): USER, PASS and the commands that reveal nothing.
_AUTHORIZATION_COMMANDS: dict[str, _Command] = {
    "USER": _Command(MsmpProtocol._cmd_user, 1, 1),
    "PASS": _Command(MsmpProtocol._cmd_pass, 1, 1),
    "HELP": _Command(MsmpProtocol._cmd_help, 0, 0),
    "CAPA": _Command(MsmpProtocol._cmd_capa, 0, 0),
    "QUIT": _Command(MsmpProtocol._cmd_quit, 0, 0),
}
# After login; the order is the one CAPA lists.
_ADMIN_COMMANDS: dict[str, _Command] = {
    "USER": _Command(MsmpProtocol._cmd_already, 1, 1),
    "PASS": _Command(MsmpProtocol._cmd_already, 1, 1),
    "ADD": _Command(MsmpProtocol._cmd_add, 2, 2),
    "DELE": _Command(MsmpProtocol._cmd_dele, 1, 1),
    "LIST": _Command(MsmpProtocol._cmd_list, 0, 1),
    "SET": _Command(MsmpProtocol._cmd_set, 2, 2),
    "GET": _Command(MsmpProtocol._cmd_get, 1, 1),
    "STAT": _Command(MsmpProtocol._cmd_stat, 0, 0),
    "LOGS": _Command(MsmpProtocol._cmd_logs, 1, 2),
    "PENALTY": _Command(MsmpProtocol._cmd_penalty, 0, 2),
    "RELOAD": _Command(MsmpProtocol._cmd_reload, 0, 0),
    "HELP": _Command(MsmpProtocol._cmd_help, 0, 0),
    "CAPA": _Command(MsmpProtocol._cmd_capa, 0, 0),
    "QUIT": _Command(MsmpProtocol._cmd_quit, 0, 0),
}


def _setting_error(exc: SettingError) -> str:
    why = str(exc)
    if why == "Invalid key" or isinstance(exc, SettingNotSaved):
        return why
    return f"Invalid value: {why}"
