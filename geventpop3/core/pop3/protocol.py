"""POP3 (RFC 1939, RFC 2449, RFC 3206) as a state machine without I/O.

`handle(line)` takes one command line (CRLF already stripped) and returns either the
response bytes, computed here without I/O or waiting, or an action the session must
carry out first because it needs disk, the user directory or the socket: `Login`,
`Refused`, `Retrieve`, `Update` or `StartTls`; or `Listing`, a whole-mailbox LIST or
UIDL too long to build in one piece on the event loop. The session then reports back
(`login_succeeded`, `login_failed`, `update_done`, `retrieve_failed`, `tls_started`)
and gets the bytes to send. Nothing here touches a socket or a file, so every command
in every state is unit-tested directly. Framing, and the contract sessions rely on to
answer on the event loop, are in geventpop3.core.pop3.connection.

Authentication: USER/PASS and SASL (AUTH PLAIN/LOGIN, geventpop3.core.pop3.sasl) both end
in the same `Login`; the plaintext policy (geventpop3.core.pop3.security) turns either
into `Refused` on a connection that may not send a password in the clear.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from functools import cache

from geventpop3 import IMPLEMENTATION
from geventpop3.core.lines import LINE_TOO_LONG, Delayed
from geventpop3.core.message import Message
from geventpop3.core.pop3 import sasl
from geventpop3.core.pop3.security import ConnectionSecurity


class State(Enum):
    AUTHORIZATION = "authorization"
    TRANSACTION = "transaction"
    UPDATE = "update"


@dataclass(slots=True)
class Login:
    """Check these credentials, lock and snapshot the mailbox."""

    user: str
    password: str
    mech: str = "user"  # how the credentials came: user (USER/PASS), plain or login (AUTH)


@dataclass(slots=True)
class Refused:
    """A login attempt the plaintext policy refuses: log it and answer `login_failed("insecure")`."""

    user: str | None
    mech: str


@dataclass(slots=True)
class StartTls:
    """STLS accepted: send `STLS_OK`, discard unread input, do the handshake, then call
    `tls_started` (or close the connection if the handshake fails)."""


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


# A whole-mailbox LIST, UIDL or STAT of more messages than this is a `Listing` action, sent in
# chunks from a runner: built in one piece on the event loop, 500,000 UIDLs (20.8 MB)
# stalled every other session of the process for 1.3 s.
LISTING_INLINE = 1000
LISTING_CHUNK = 2000  # lines per chunk of a Listing (about 80 KB of UIDLs, 1 to 2 ms to build)


@dataclass(slots=True)
class Listing:
    """LIST, UIDL (`command`) or STAT over every live message, too long to compute on the event
    loop: send `chunks()` in order, giving the other sessions a turn between two of them.
    Pure: the chunks are computed from the snapshot, without I/O."""

    messages: list[Message]
    deleted: frozenset[int]
    command: bytes  # b"LIST", b"UIDL" or b"STAT"

    def chunks(self, lines: int = LISTING_CHUNK) -> Iterator[bytes]:
        """The `+OK` line, the listing in pieces of at most `lines` lines, then `.`; for STAT,
        empty pieces while the sizes are added up, then the one line."""
        messages = self.messages
        deleted = self.deleted
        if self.command == b"STAT":
            octets = 0
            for start in range(0, len(messages), lines):
                octets += sum([m.size for index, m in enumerate(messages[start:start + lines], start)
                               if index not in deleted])
                yield b""
            yield f"+OK {len(messages) - len(deleted)} {octets}\r\n".encode()
            return
        uidl = self.command == b"UIDL"
        yield f"+OK {len(messages) - len(deleted)} messages\r\n".encode()
        for start in range(0, len(messages), lines):
            part = [f"{index + 1} {(m.uidl or m.uid) if uidl else m.size}\r\n"
                    for index, m in enumerate(messages[start:start + lines], start) if index not in deleted]
            if part:
                yield "".join(part).encode()
        yield b".\r\n"


# What needs I/O, a password check, a lock or the socket, or is too long to build at once:
# the session carries it out.
Action = Login | Refused | StartTls | Retrieve | Update | Listing
# What `handle` returns: the answer itself (computed without I/O), or an action.
Outcome = bytes | Action


@cache
def capa_response(plaintext: bool, stls: bool) -> bytes:
    """CAPA for a connection: USER and SASL mechanisms only where a password may be sent
    (a bare `SASL` otherwise, as Dovecot), STLS only where it can be started."""
    capabilities = [
        "TOP", "UIDL", *(["USER"] if plaintext else []), "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING",
        "EXPIRE NEVER", " ".join(["SASL", *(sasl.MECHANISMS if plaintext else ())]), *(["STLS"] if stls else []),
        f"IMPLEMENTATION {IMPLEMENTATION}",
    ]
    return ("+OK Capability list follows\r\n" + "".join(c + "\r\n" for c in capabilities) + ".\r\n").encode()


GREETING = b"+OK POP3 server ready\r\n"
OK = b"+OK\r\n"
ERR_TOO_LONG = b"-ERR Line too long\r\n"
ERR_UNKNOWN = b"-ERR Unknown command\r\n"
ERR_SYNTAX = b"-ERR Syntax error\r\n"
ERR_AUTH = b"-ERR [AUTH] Invalid user name or password\r\n"
ERR_INSECURE = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.\r\n"
STLS_OK = b"+OK Begin TLS negotiation\r\n"
ERR_STLS_ACTIVE = b"-ERR TLS is already active\r\n"
ERR_STLS_UNAVAILABLE = b"-ERR TLS is not available\r\n"
ERR_IN_USE = b"-ERR [IN-USE] Mailbox is in use by another session\r\n"
ERR_USER_IP = b"-ERR [IN-USE] Too many logins for this user from your address at once, try again later\r\n"
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
ERR_UNVERIFIED = b"-ERR [SYS/TEMP] Cannot verify this login now, try again later\r\n"
LOGIN_FAILURES = {"auth": ERR_AUTH, "insecure": ERR_INSECURE, "in-use": ERR_IN_USE, "user-ip": ERR_USER_IP,
                  "temp": ERR_TEMP_LOGIN, "perm": ERR_PERM_LOGIN, "busy": ERR_BUSY_LOGIN,
                  "unverified": ERR_UNVERIFIED}
# Guessing or probing: answered only after the delay ("unverified": a failed password
# check while the shared store is down, which must cost a guesser what "auth" costs).
DELAYED_FAILURES = ("auth", "insecure", "unverified")


AUTHENTICATED = ConnectionSecurity(None)  # shared by every logged-in session
NOTHING_DELETED: frozenset[int] = frozenset()


class _Authorization:
    """What only AUTHORIZATION needs: dropped at login, so a held session does not keep it."""

    __slots__ = ("failures", "max_failures", "failure_delay", "pending_user", "sasl")

    def __init__(self, max_failures: int, failure_delay: float) -> None:
        self.failures = 0
        self.max_failures = max_failures
        self.failure_delay = failure_delay  # seconds before a wrong password is answered
        self.pending_user: str | None = None  # USER given, PASS awaited
        self.sasl: sasl.SaslExchange | None = None  # an AUTH exchange waiting for the client's response


class Pop3Protocol:
    """One POP3 session's state; the session module owns the socket."""

    __slots__ = ("state", "closing", "messages", "deleted", "user", "retrieved", "tops", "expunged", "security",
                 "_authorization")

    def __init__(self, max_failures: int = 3, failure_delay: float = 0.0,
                 security: ConnectionSecurity | None = None) -> None:
        self.state = State.AUTHORIZATION
        self.closing = False  # the session closes the connection after sending
        self.messages: list[Message] = []
        # Indexes into messages; the shared empty frozenset until the first DELE (an empty
        # set() is 216 bytes, and most sessions of a held crowd never delete).
        self.deleted: set[int] | frozenset[int] = NOTHING_DELETED
        self.user: str | None = None
        self.retrieved = 0
        self.tops = 0
        self.expunged = 0  # messages UPDATE removed (as `update_done` was told)
        # What the plaintext policy and STLS need to know; the default allows plaintext, offers no TLS.
        self.security = security if security is not None else ConnectionSecurity(None)
        self._authorization: _Authorization | None = _Authorization(max_failures, failure_delay)  # None once logged in

    def greeting(self) -> bytes:
        return GREETING

    @property
    def failures(self) -> int:
        """Failed logins on this connection so far (kept until the login that succeeds)."""
        return self._authorization.failures if self._authorization is not None else 0

    # -- input -------------------------------------------------------------
    def handle(self, line: bytes | object) -> Outcome:
        if line is LINE_TOO_LONG:
            if self._authorization is not None:
                self._authorization.sasl = None  # an over-long SASL response ends the exchange
            return ERR_TOO_LONG
        if self.state is not State.TRANSACTION:
            return self._handle_authorization(line)
        assert isinstance(line, bytes)
        keyword, _, rest = line.partition(b" ")
        keyword = keyword.upper()
        handler = _TRANSACTION_COMMANDS.get(keyword)
        if handler is None:
            return ERR_NOT_IN_AUTH if keyword in _AUTHORIZATION_ONLY else _unknown(keyword)
        return handler(self, rest.split())

    def _handle_authorization(self, line: bytes | object) -> Outcome:
        """AUTHORIZATION (and UPDATE, which answers nothing more)."""
        if self.state is State.UPDATE:
            return ERR_ENDING  # QUIT was taken: no second Update, no more marks
        assert isinstance(line, bytes)
        auth = self._authorization
        assert auth is not None
        if auth.sasl is not None:
            return self._sasl_step(auth, line)
        keyword, _, rest = line.partition(b" ")
        keyword = keyword.upper()
        if keyword == b"PASS":
            return self._pass(auth, rest)  # a password may contain spaces: keep the rest whole
        handler = _AUTH_COMMANDS.get(keyword)
        if handler is None:
            return ERR_NOT_AUTH if keyword in _TRANSACTION_COMMANDS else _unknown(keyword)
        return handler(self, rest.split())

    # -- AUTHORIZATION -------------------------------------------------------
    def _user(self, args: list[bytes]) -> Outcome:
        if len(args) != 1:
            return ERR_SYNTAX
        user = args[0].decode("utf-8", "replace")
        if not self.security.plaintext_allowed():
            return Refused(user, "user")  # refused at USER already, as Dovecot
        assert self._authorization is not None
        self._authorization.pending_user = user
        return OK

    def _pass(self, auth: _Authorization, rest: bytes) -> Outcome:
        if auth.pending_user is None:
            return ERR_NO_USER
        if not rest:
            return ERR_SYNTAX
        user, auth.pending_user = auth.pending_user, None
        if not self.security.plaintext_allowed():  # trusted_networks or plaintext_auth changed since USER
            return Refused(user, "user")
        return Login(user, rest.decode("utf-8", "surrogateescape"))

    def _auth(self, args: list[bytes]) -> Outcome:
        """AUTH: alone, the mechanism list; else start a SASL exchange (RFC 5034)."""
        plaintext = self.security.plaintext_allowed()
        if not args:
            mechanisms = sasl.MECHANISMS if plaintext else ()
            return ("+OK\r\n" + "".join(m + "\r\n" for m in mechanisms) + ".\r\n").encode()
        if len(args) > 2:
            return ERR_SYNTAX
        mechanism = args[0].upper().decode("ascii", "replace")
        if mechanism not in sasl.MECHANISMS:
            return sasl.ERR_MECHANISM
        if not plaintext:
            return Refused(None, mechanism.lower())
        exchange = sasl.SaslExchange(mechanism)
        try:
            answer = exchange.start(args[1] if len(args) == 2 else None)
        except sasl.SaslError as exc:
            return bytes(exc.args[0])
        return self._sasl_answer(exchange, answer)

    def _sasl_step(self, auth: _Authorization, line: bytes) -> Outcome:
        exchange, auth.sasl = auth.sasl, None
        assert exchange is not None
        try:
            answer = exchange.step(line)
        except sasl.SaslError as exc:
            return bytes(exc.args[0])
        return self._sasl_answer(exchange, answer)

    def _sasl_answer(self, exchange: sasl.SaslExchange, answer: bytes | sasl.Credentials) -> Outcome:
        if isinstance(answer, bytes):  # a challenge: the next line is the client's response
            assert self._authorization is not None
            self._authorization.sasl = exchange
            return answer
        return Login(answer.user, answer.password, exchange.mechanism.lower())

    def _stls(self, args: list[bytes]) -> Outcome:
        if args:
            return ERR_SYNTAX
        if self.security.tls:
            return ERR_STLS_ACTIVE
        if not self.security.tls_available:
            return ERR_STLS_UNAVAILABLE
        return StartTls()

    def tls_started(self) -> None:
        """The handshake after STLS succeeded: AUTHORIZATION starts again (a USER before is forgotten)."""
        self.security.tls = True
        assert self._authorization is not None
        self._authorization.pending_user = None
        self._authorization.sasl = None

    def login_succeeded(self, user: str, messages: list[Message]) -> bytes:
        self.state = State.TRANSACTION
        self.user = user
        self.messages = messages
        # The connection's security answered its last question (no STLS, no password from
        # here on): a logged-in session, held for minutes, drops its per-connection objects.
        self.security = AUTHENTICATED
        self._authorization = None
        return f"+OK Logged in, {len(messages)} messages\r\n".encode()

    def login_failed(self, reason: str, delay: float | None = None) -> bytes | Delayed:
        """`reason`: auth, insecure, in-use, user-ip (max_sessions_per_user_ip), temp, perm or busy.
        Counts toward the close-after limit.

        A wrong password (or unknown user) is answered only after `delay` seconds (the
        session's penalty for the client's source; `failure_delay` when not given), which
        slows password guessing; a busy or broken mailbox is answered at once."""
        auth = self._authorization
        assert auth is not None
        auth.failures += 1
        if auth.failures >= auth.max_failures:
            self.closing = True
        seconds = auth.failure_delay if delay is None else delay
        if reason in DELAYED_FAILURES and seconds > 0:
            return Delayed(seconds, LOGIN_FAILURES[reason])
        return LOGIN_FAILURES[reason]

    def _quit_auth(self, args: list[bytes]) -> Outcome:
        self.closing = True
        return b"+OK Bye\r\n"

    def _capa(self, args: list[bytes]) -> Outcome:
        security = self.security
        stls = self.state is State.AUTHORIZATION and security.offer_stls
        return capa_response(security.plaintext_allowed(), stls)

    def _not_supported(self, args: list[bytes]) -> Outcome:
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
        deleted = self.deleted
        if not deleted:  # the usual case: no DELE yet
            return list(enumerate(self.messages))
        return [(i, m) for i, m in enumerate(self.messages) if i not in deleted]

    def _stat(self, args: list[bytes]) -> Outcome:
        if args:
            return ERR_SYNTAX
        if len(self.messages) > LISTING_INLINE:
            return Listing(self.messages, frozenset(self.deleted), b"STAT")
        if not self.deleted:
            messages = self.messages
            return f"+OK {len(messages)} {sum([m.size for m in messages])}\r\n".encode()
        live = self._live()
        return f"+OK {len(live)} {sum(m.size for _, m in live)}\r\n".encode()

    def _list(self, args: list[bytes]) -> Outcome:
        if not args:
            if len(self.messages) > LISTING_INLINE:
                return Listing(self.messages, frozenset(self.deleted), b"LIST")
            return self._listing_all([f"{i + 1} {m.size}\r\n" for i, m in self._live()])
        return self._listing(args, lambda m: str(m.size))

    def _uidl(self, args: list[bytes]) -> Outcome:
        if not args:
            if len(self.messages) > LISTING_INLINE:
                return Listing(self.messages, frozenset(self.deleted), b"UIDL")
            return self._listing_all([f"{i + 1} {m.uidl or m.uid}\r\n" for i, m in self._live()])
        return self._listing(args, lambda m: m.uidl or m.uid)

    def _listing_all(self, lines: list[str]) -> bytes:
        """LIST or UIDL of every live message: `lines` between the +OK and the `.`."""
        return f"+OK {len(lines)} messages\r\n{''.join(lines)}.\r\n".encode()

    def _listing(self, args: list[bytes], field: Callable[[Message], str]) -> Outcome:
        """LIST or UIDL of one message (or a syntax error)."""
        if len(args) > 1:
            return ERR_SYNTAX
        index = self._message_index(args[0])
        if isinstance(index, bytes):
            return index
        return f"+OK {index + 1} {field(self.messages[index])}\r\n".encode()

    def _retr(self, args: list[bytes]) -> Outcome:
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

    def _top(self, args: list[bytes]) -> Outcome:
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

    def _dele(self, args: list[bytes]) -> Outcome:
        if len(args) != 1:
            return ERR_SYNTAX
        index = self._message_index(args[0])
        if isinstance(index, bytes):
            return index
        if isinstance(self.deleted, set):
            self.deleted.add(index)
        else:
            self.deleted = {index}
        return f"+OK Message {index + 1} deleted\r\n".encode()

    def _noop(self, args: list[bytes]) -> Outcome:
        return OK if not args else ERR_SYNTAX

    def _rset(self, args: list[bytes]) -> Outcome:
        if args:
            return ERR_SYNTAX
        self.deleted = NOTHING_DELETED
        return f"+OK {len(self.messages)} messages\r\n".encode()

    def _quit_transaction(self, args: list[bytes]) -> Outcome:
        self.state = State.UPDATE
        return Update([self.messages[i] for i in sorted(self.deleted)])

    def update_done(self, failed: int) -> bytes:
        """UPDATE is over: `failed` of the marked messages are still there (all of them when
        none could be deleted)."""
        self.closing = True
        self.expunged = len(self.deleted) - failed
        if failed:
            return f"-ERR [SYS/TEMP] {failed} messages could not be deleted\r\n".encode()
        return f"+OK Bye, {len(self.deleted)} messages deleted\r\n".encode()


def _unknown(keyword: bytes) -> bytes:
    return ERR_UNKNOWN if keyword else b"-ERR Empty command\r\n"


_AUTH_COMMANDS: dict[bytes, Callable[[Pop3Protocol, list[bytes]], Outcome]] = {
    b"USER": Pop3Protocol._user,
    b"QUIT": Pop3Protocol._quit_auth,
    b"CAPA": Pop3Protocol._capa,
    b"APOP": Pop3Protocol._not_supported,
    b"AUTH": Pop3Protocol._auth,
    b"STLS": Pop3Protocol._stls,
}
_AUTHORIZATION_ONLY = frozenset((b"USER", b"PASS", b"APOP", b"AUTH", b"STLS"))
_TRANSACTION_COMMANDS: dict[bytes, Callable[[Pop3Protocol, list[bytes]], Outcome]] = {
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
