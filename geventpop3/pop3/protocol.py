"""POP3 (RFC 1939, RFC 2449, RFC 3206) as a state machine without I/O.

`handle(line)` takes one command line (CRLF already stripped) and returns either the
response bytes, or an action the session must carry out first because it needs disk
or the user directory: `Login`, `Retrieve` or `Update`. The session then reports
back (`login_succeeded`, `login_failed`, `update_done`, `retrieve_failed`) and gets
the bytes to send. Nothing here touches a socket or a file, so every command in
every state is unit-tested directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from geventpop3 import IMPLEMENTATION
from geventpop3.lines import LINE_TOO_LONG, Delayed
from geventpop3.message import Message


class State(Enum):
    AUTHORIZATION = "authorization"
    TRANSACTION = "transaction"
    UPDATE = "update"


@dataclass(slots=True)
class Login:
    """Check these credentials, lock and snapshot the mailbox."""

    user: str
    password: str


@dataclass(slots=True)
class Retrieve:
    """Send `header`, then the message content (TOP: `body_lines` lines), then `.`."""

    header: bytes
    message: Message
    body_lines: int | None


@dataclass(slots=True)
class Update:
    """QUIT in TRANSACTION: remove these messages, then call `update_done`."""

    deleted: list[Message]


Action = bytes | Login | Retrieve | Update | Delayed

CAPABILITIES = (
    "TOP",
    "UIDL",
    "USER",
    "RESP-CODES",
    "AUTH-RESP-CODE",
    "PIPELINING",
    "EXPIRE NEVER",
    f"IMPLEMENTATION {IMPLEMENTATION}",
)
CAPA_RESPONSE = ("+OK Capability list follows\r\n" + "".join(c + "\r\n" for c in CAPABILITIES) + ".\r\n").encode()

GREETING = b"+OK POP3 server ready\r\n"
OK = b"+OK\r\n"
ERR_TOO_LONG = b"-ERR Line too long\r\n"
ERR_UNKNOWN = b"-ERR Unknown command\r\n"
ERR_SYNTAX = b"-ERR Syntax error\r\n"
ERR_AUTH = b"-ERR [AUTH] Invalid user name or password\r\n"
ERR_IN_USE = b"-ERR [IN-USE] Mailbox is in use by another session\r\n"
ERR_TEMP_LOGIN = b"-ERR [SYS/TEMP] Mailbox temporarily unavailable, try again later\r\n"
ERR_PERM_LOGIN = b"-ERR [SYS/PERM] Mailbox cannot be opened\r\n"
ERR_NOT_AUTH = b"-ERR Not logged in\r\n"
ERR_NOT_IN_AUTH = b"-ERR Already logged in\r\n"
ERR_NO_USER = b"-ERR Send USER first\r\n"
ERR_BAD_NUMBER = b"-ERR Invalid message number\r\n"
ERR_NO_SUCH = b"-ERR No such message\r\n"
ERR_DELETED = b"-ERR Message is deleted\r\n"
ERR_UNAVAILABLE = b"-ERR [SYS/TEMP] Message is no longer available\r\n"
ERR_NOT_SUPPORTED = b"-ERR Not supported\r\n"
ERR_ENDING = b"-ERR Session is ending\r\n"

ERR_BUSY_LOGIN = b"-ERR [SYS/TEMP] Server busy, try again later\r\n"
LOGIN_FAILURES = {"auth": ERR_AUTH, "in-use": ERR_IN_USE, "temp": ERR_TEMP_LOGIN, "perm": ERR_PERM_LOGIN,
                  "busy": ERR_BUSY_LOGIN}


class Pop3Protocol:
    """One POP3 session's state; the session module owns the socket."""

    __slots__ = (
        "state", "closing", "messages", "deleted", "user", "failures", "max_failures",
        "retrieved", "tops", "_pending_user", "failure_delay",
    )

    def __init__(self, max_failures: int = 3, failure_delay: float = 0.0) -> None:
        self.state = State.AUTHORIZATION
        self.closing = False  # the session closes the connection after sending
        self.messages: list[Message] = []
        self.deleted: set[int] = set()  # indexes into messages
        self.user: str | None = None
        self.failures = 0
        self.max_failures = max_failures
        self.failure_delay = failure_delay  # seconds before a wrong password is answered
        self.retrieved = 0
        self.tops = 0
        self._pending_user: str | None = None

    def greeting(self) -> bytes:
        return GREETING

    # -- input -------------------------------------------------------------
    def handle(self, line: bytes | object) -> Action:
        if line is LINE_TOO_LONG:
            return ERR_TOO_LONG
        if self.state is State.UPDATE:
            return ERR_ENDING  # QUIT was taken: no second Update, no more marks
        assert isinstance(line, bytes)
        keyword, _, rest = line.partition(b" ")
        keyword = keyword.upper()
        if keyword == b"PASS" and self.state is State.AUTHORIZATION:
            return self._pass(rest)  # a password may contain spaces: keep the rest whole
        args = rest.split()
        if self.state is State.AUTHORIZATION:
            handler = _AUTH_COMMANDS.get(keyword)
            if handler is None:
                return ERR_NOT_AUTH if keyword in _TRANSACTION_COMMANDS else _unknown(keyword)
        else:
            handler = _TRANSACTION_COMMANDS.get(keyword)
            if handler is None:
                return ERR_NOT_IN_AUTH if keyword in (b"USER", b"PASS", b"APOP", b"AUTH") else _unknown(keyword)
        return handler(self, args)

    # -- AUTHORIZATION -------------------------------------------------------
    def _user(self, args: list[bytes]) -> Action:
        if len(args) != 1:
            return ERR_SYNTAX
        self._pending_user = args[0].decode("utf-8", "replace")
        return OK

    def _pass(self, rest: bytes) -> Action:
        if self._pending_user is None:
            return ERR_NO_USER
        if not rest:
            return ERR_SYNTAX
        user, self._pending_user = self._pending_user, None
        return Login(user, rest.decode("utf-8", "surrogateescape"))

    def login_succeeded(self, user: str, messages: list[Message]) -> bytes:
        self.state = State.TRANSACTION
        self.user = user
        self.messages = messages
        return f"+OK Logged in, {len(messages)} messages\r\n".encode()

    def login_failed(self, reason: str, delay: float | None = None) -> bytes | Delayed:
        """`reason`: auth, in-use, temp, perm or busy. Counts toward the close-after limit.

        A wrong password (or unknown user) is answered only after `delay` seconds (the
        session's penalty for the client's source; `failure_delay` when not given), which
        slows password guessing; a busy or broken mailbox is answered at once."""
        self.failures += 1
        if self.failures >= self.max_failures:
            self.closing = True
        seconds = self.failure_delay if delay is None else delay
        if reason == "auth" and seconds > 0:
            return Delayed(seconds, ERR_AUTH)
        return LOGIN_FAILURES[reason]

    def _quit_auth(self, args: list[bytes]) -> Action:
        self.closing = True
        return b"+OK Bye\r\n"

    def _capa(self, args: list[bytes]) -> Action:
        return CAPA_RESPONSE

    def _not_supported(self, args: list[bytes]) -> Action:
        return ERR_NOT_SUPPORTED

    # -- TRANSACTION ---------------------------------------------------------
    def _message_index(self, arg: bytes) -> int | bytes:
        """The 0-based index of a live message, or the -ERR to send."""
        if not arg.isdigit() or len(arg) > 12:
            return ERR_BAD_NUMBER
        number = int(arg)
        if not 1 <= number <= len(self.messages):
            return ERR_NO_SUCH
        if number - 1 in self.deleted:
            return ERR_DELETED
        return number - 1

    def _live(self) -> list[tuple[int, Message]]:
        return [(i, m) for i, m in enumerate(self.messages) if i not in self.deleted]

    def _stat(self, args: list[bytes]) -> Action:
        if args:
            return ERR_SYNTAX
        live = self._live()
        return f"+OK {len(live)} {sum(m.size for _, m in live)}\r\n".encode()

    def _list(self, args: list[bytes]) -> Action:
        return self._listing(args, lambda m: str(m.size))

    def _uidl(self, args: list[bytes]) -> Action:
        return self._listing(args, lambda m: m.uid)

    def _listing(self, args: list[bytes], field: Callable[[Message], str]) -> Action:
        if len(args) > 1:
            return ERR_SYNTAX
        if args:
            index = self._message_index(args[0])
            if isinstance(index, bytes):
                return index
            return f"+OK {index + 1} {field(self.messages[index])}\r\n".encode()
        live = self._live()
        lines = [f"+OK {len(live)} messages\r\n"]
        lines.extend(f"{i + 1} {field(m)}\r\n" for i, m in live)
        lines.append(".\r\n")
        return "".join(lines).encode()

    def _retr(self, args: list[bytes]) -> Action:
        if len(args) != 1:
            return ERR_SYNTAX
        index = self._message_index(args[0])
        if isinstance(index, bytes):
            return index
        message = self.messages[index]
        if message.error is not None:
            return f"-ERR [SYS/TEMP] {message.error}\r\n".encode()
        self.retrieved += 1
        return Retrieve(f"+OK {message.size} octets\r\n".encode(), message, None)

    def _top(self, args: list[bytes]) -> Action:
        if len(args) != 2:
            return ERR_SYNTAX
        index = self._message_index(args[0])
        if isinstance(index, bytes):
            return index
        if not args[1].isdigit():
            return b"-ERR Invalid line count\r\n"
        message = self.messages[index]
        if message.error is not None:
            return f"-ERR [SYS/TEMP] {message.error}\r\n".encode()
        self.tops += 1
        return Retrieve(b"+OK Top of message follows\r\n", message, min(int(args[1]), 2**62))

    def retrieve_failed(self) -> bytes:
        """The message file could not be opened (it vanished): the session goes on."""
        return ERR_UNAVAILABLE

    def _dele(self, args: list[bytes]) -> Action:
        if len(args) != 1:
            return ERR_SYNTAX
        index = self._message_index(args[0])
        if isinstance(index, bytes):
            return index
        self.deleted.add(index)
        return f"+OK Message {index + 1} deleted\r\n".encode()

    def _noop(self, args: list[bytes]) -> Action:
        return OK if not args else ERR_SYNTAX

    def _rset(self, args: list[bytes]) -> Action:
        if args:
            return ERR_SYNTAX
        self.deleted.clear()
        return f"+OK {len(self.messages)} messages\r\n".encode()

    def _quit_transaction(self, args: list[bytes]) -> Action:
        self.state = State.UPDATE
        return Update([self.messages[i] for i in sorted(self.deleted)])

    def update_done(self, failed: int) -> bytes:
        self.closing = True
        if failed:
            return f"-ERR [SYS/TEMP] {failed} messages could not be deleted\r\n".encode()
        return f"+OK Bye, {len(self.deleted)} messages deleted\r\n".encode()


def _unknown(keyword: bytes) -> bytes:
    return ERR_UNKNOWN if keyword else b"-ERR Empty command\r\n"


_AUTH_COMMANDS: dict[bytes, Callable[[Pop3Protocol, list[bytes]], Action]] = {
    b"USER": Pop3Protocol._user,
    b"QUIT": Pop3Protocol._quit_auth,
    b"CAPA": Pop3Protocol._capa,
    b"APOP": Pop3Protocol._not_supported,
    b"AUTH": Pop3Protocol._not_supported,
    b"STLS": Pop3Protocol._not_supported,
}
_TRANSACTION_COMMANDS: dict[bytes, Callable[[Pop3Protocol, list[bytes]], Action]] = {
    b"STAT": Pop3Protocol._stat,
    b"LIST": Pop3Protocol._list,
    b"UIDL": Pop3Protocol._uidl,
    b"RETR": Pop3Protocol._retr,
    b"TOP": Pop3Protocol._top,
    b"DELE": Pop3Protocol._dele,
    b"NOOP": Pop3Protocol._noop,
    b"RSET": Pop3Protocol._rset,
    b"QUIT": Pop3Protocol._quit_transaction,
    b"CAPA": Pop3Protocol._capa,
}
