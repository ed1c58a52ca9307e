"""A small blocking MSMP client, shared by the admin shell, the tests and the Locust load tests.

It connects to the server's UNIX socket by default (`default_socket()`), or over TCP when
given a host or a port.

It uses the plain `socket` module, looked up at call time, so it works both in a normal
process and in one that gevent has monkey-patched (Locust does that): the same code then
blocks only its own greenlet.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

DEFAULT_HOST = "127.0.0.1"  # over TCP, when only a port is given
DEFAULT_PORT = 4321  # over TCP, when only a host is given
SYSTEM_SOCKET = "/run/geventpop3/msmp.sock"  # the server's socket when started as root


def default_socket() -> str:
    """The socket a server started without --admin-socket listens on, as geventpop3's
    config.default_admin_socket says: for root SYSTEM_SOCKET; for another user the one a
    server of theirs makes (in $XDG_RUNTIME_DIR, else /tmp/geventpop3-UID) if it exists,
    else SYSTEM_SOCKET if that exists (an admin in the server's admin_group), else theirs."""
    euid = os.geteuid()
    if euid == 0:
        return SYSTEM_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    own = (os.path.join(runtime, "geventpop3", "msmp.sock") if os.path.isabs(runtime)
           else f"/tmp/geventpop3-{euid}/msmp.sock")
    if not os.path.exists(own) and os.path.exists(SYSTEM_SOCKET):
        return SYSTEM_SOCKET
    return own

# Commands whose +OK response carries a dot-terminated body (both forms of LIST).
MULTILINE_COMMANDS = frozenset({"LIST", "STAT", "LOGS", "HELP", "CAPA"})

# The protocol caps a response line at 512 octets; allow slack, but never buffer without bound.
_MAX_LINE = 64 * 1024


class MsmpError(Exception):
    """The server answered -ERR; `text` is what followed it."""

    def __init__(self, text: str, command: str = "") -> None:
        super().__init__(text)
        self.text = text
        self.command = command


class MsmpAuthError(MsmpError):
    """USER/PASS was refused (the server does not say which of the two was wrong)."""


class MsmpConnectionError(ConnectionError):
    """Network trouble: refused, reset, closed by the server, unresolvable host."""


class MsmpTimeout(MsmpConnectionError, TimeoutError):
    """The server did not answer within the client's timeout."""


class MsmpProtocolError(MsmpConnectionError):
    """The peer does not speak MSMP (bad greeting, garbage, endless line); the connection is dropped."""


@dataclass
class Response:
    """One MSMP response: status, the text after +OK/-ERR, and the un-dot-stuffed body lines."""

    ok: bool
    text: str
    lines: list[str] = field(default_factory=list)


def is_multiline(command_line: str) -> bool:
    """Whether a +OK answer to this command line is followed by a body ending in `.`
    (`PENALTY` alone lists; `PENALTY CLEAR ...` answers one line)."""
    words = command_line.split()
    if words and words[0].upper() == "PENALTY":
        return len(words) == 1
    return bool(words) and words[0].upper() in MULTILINE_COMMANDS


def parse_stat(lines: list[str]) -> dict[str, str]:
    """`Name: value` lines to a dict, in server order; lines without a colon are skipped."""
    result: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            result[name.strip()] = value.strip()
    return result


def parse_user_line(line: str) -> dict[str, str]:
    """One `LIST <user>` line, e.g. `alice 3 logs 2 messages 1024 octets logged-in=yes`, to a dict.

    The protocol fixes only `<user> <n> logs`; further fields are read as `<number> <word>`
    pairs, `key=value` or `key: value` tokens, and bare words (kept as "yes").
    """
    tokens = line.split()
    if not tokens:
        return {}
    info = {"name": tokens[0]}
    i = 1
    while i < len(tokens):
        token = tokens[i]
        if "=" in token:
            key, _, value = token.partition("=")
            info[key] = value
        elif token.endswith(":") and i + 1 < len(tokens):
            info[token[:-1]] = tokens[i + 1]
            i += 1
        elif _is_number(token) and i + 1 < len(tokens) and not _is_number(tokens[i + 1]):
            info[tokens[i + 1].rstrip(",")] = token
            i += 1
        else:
            info[token.rstrip(",")] = "yes"
        i += 1
    return info


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class MsmpClient:
    """One MSMP connection. Use as a context manager, or call connect() and close() yourself.

    command() returns a Response whatever the status; the typed helpers raise MsmpError on
    -ERR. Network trouble raises MsmpConnectionError (a ConnectionError). A command cut short
    (e.g. by Ctrl-C) leaves the stream out of step, so the client then refuses to go on.
    """

    def __init__(self, host: str | None = None, port: int | None = None, timeout: float | None = 10.0,
                 ssl_context: ssl.SSLContext | None = None, path: str | None = None) -> None:
        """The UNIX socket at `path`; else TCP to `host` and `port` when either is given
        (DEFAULT_HOST, DEFAULT_PORT for the other); else the socket at `default_socket()`.
        `ssl_context` (TCP only): speak implicit TLS (a server started with --admin-tls),
        verifying the server as the context says (see `tls_context`); the host name checked is `host`."""
        if path is None and host is None and port is None:
            path = default_socket()
        if path is not None and (host is not None or port is not None):
            raise ValueError("give a socket path or a host and port, not both")
        if path is not None and ssl_context is not None:
            raise ValueError("TLS is for MSMP over TCP, not the socket")
        host = host or ("" if path is not None else DEFAULT_HOST)
        # Accept "[::1]" as people write IPv6 addresses in URLs.
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        self.path = path
        self.host = host
        self.port = port if port is not None else (0 if path is not None else DEFAULT_PORT)
        self.timeout = timeout
        self.ssl_context = ssl_context
        self.greeting = ""
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._pos = 0  # start of the unread part of _buffer
        self._in_step = True

    # -- connection ---------------------------------------------------------------------

    def connect(self) -> str:
        """Open the connection and read the greeting; returns the greeting text."""
        if self._sock is not None:
            return self.greeting
        try:
            self._sock = self._open()
        except TimeoutError as exc:
            raise MsmpTimeout(f"timed out connecting to {self.where}") from exc
        except OSError as exc:
            hint = (" (is the server running? its socket is in its log; -s PATH, or -L/-P for TCP)"
                    if self.path is not None and isinstance(exc, FileNotFoundError | ConnectionRefusedError) else "")
            raise MsmpConnectionError(f"cannot connect to {self.where}: {_reason(exc)}{hint}") from exc
        if self.ssl_context is not None:
            self._sock = self._start_tls(self._sock, self.ssl_context)
        self._buffer = b""
        self._pos = 0  # start of the unread part of _buffer
        self._in_step = True
        line = self._read_line()
        if not line.startswith("+OK"):
            self.close()
            if line.startswith("-ERR"):
                raise MsmpConnectionError(f"server refused the connection: {line[4:].strip() or line}")
            raise MsmpProtocolError(f"not an MSMP server at {self.where}: {line[:80]!r}")
        self.greeting = line[3:].strip()
        return self.greeting

    def _open(self) -> socket.socket:
        if self.path is None:
            return socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        return sock

    def _start_tls(self, sock: socket.socket, context: ssl.SSLContext) -> socket.socket:
        """The TLS side of `sock`, the server verified; MsmpConnectionError (one line) if not."""
        try:
            return context.wrap_socket(sock, server_hostname=self.host)
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            raise MsmpConnectionError(f"TLS certificate of {self.where} not trusted: "
                                      f"{exc.verify_message or _reason(exc)}") from exc
        except TimeoutError as exc:
            sock.close()
            raise MsmpTimeout(f"timed out in the TLS handshake with {self.where} "
                              "(is the server started with --admin-tls?)") from exc
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            reason = getattr(exc, "reason", None) or _reason(exc)
            raise MsmpConnectionError(f"TLS handshake with {self.where} failed: {str(reason).replace('_', ' ').lower()}"
                                      " (is the server started with --admin-tls?)") from exc

    @property
    def connected(self) -> bool:
        return self._sock is not None

    @property
    def usable(self) -> bool:
        """Connected, and no command was cut short: the next command() can go ahead."""
        return self._sock is not None and self._in_step

    def close(self) -> None:
        """Drop the connection without a QUIT; safe to call twice."""
        sock, self._sock = self._sock, None
        self._buffer = b""
        self._pos = 0  # start of the unread part of _buffer
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self._sock is not None and self._in_step:
                self.quit()
        except (MsmpError, OSError):
            pass
        finally:
            self.close()

    # -- commands -----------------------------------------------------------------------

    def command(self, line: str) -> Response:
        """Send one command line and read its whole response."""
        return self.pipeline([line])[0]

    def pipeline(self, lines: list[str]) -> list[Response]:
        """Send several commands in one write, then read their responses in order."""
        for line in lines:
            if "\r" in line or "\n" in line or "\0" in line:
                raise ValueError("a command must be a single line")
        sock = self._require()
        if not self._in_step:
            self.close()
            raise MsmpConnectionError("connection out of step after an interrupted command; reconnect")
        self._in_step = False
        data = b"".join(line.encode("utf-8") + b"\r\n" for line in lines)
        try:
            sock.sendall(data)
        except TimeoutError as exc:
            self.close()
            raise MsmpTimeout(f"timed out sending to {self.where}") from exc
        except OSError as exc:
            self.close()
            raise MsmpConnectionError(f"connection to {self.where} lost: {_reason(exc)}") from exc
        responses = [self._read_response(line) for line in lines]
        self._in_step = True
        return responses

    def _read_response(self, command_line: str) -> Response:
        status = self._read_line()
        if status.startswith("+OK"):
            ok, text = True, status[3:]
        elif status.startswith("-ERR"):
            ok, text = False, status[4:]
        else:
            self.close()
            raise MsmpProtocolError(f"unexpected response from {self.where}: {status[:80]!r}")
        response = Response(ok, text.strip())
        if ok and is_multiline(command_line):
            while True:
                line = self._read_line()
                if line == ".":
                    break
                response.lines.append(line.removeprefix("."))
        return response

    def login(self, user: str, password: str) -> None:
        """USER then PASS; raises MsmpAuthError when refused."""
        if not user or not password or any(c.isspace() for c in user + password):
            raise MsmpAuthError("Invalid credentials", "PASS")
        self.connect()
        for line in (f"USER {user}", f"PASS {password}"):
            response = self.command(line)
            if not response.ok:
                raise MsmpAuthError(response.text or "Invalid credentials", line.split()[0])

    def _checked(self, line: str) -> Response:
        response = self.command(line)
        if not response.ok:
            raise MsmpError(response.text, line.split()[0].upper())
        return response

    # -- typed helpers (raise MsmpError on -ERR) ------------------------------------------

    def stat(self) -> dict[str, str]:
        return parse_stat(self._checked("STAT").lines)

    def list_users(self) -> list[str]:
        return [line.strip() for line in self._checked("LIST").lines if line.strip()]

    def user_info(self, name: str) -> dict[str, str]:
        """`LIST <name>` parsed (see parse_user_line); the raw line is under "line"."""
        lines = self._checked(f"LIST {name}").lines
        if not lines:
            return {"name": name, "line": ""}
        info = parse_user_line(lines[0])
        info["line"] = lines[0]
        return info

    def logs(self, user: str, n: int | None = None) -> list[str]:
        line = f"LOGS {user}" if n is None else f"LOGS {user} {int(n)}"
        return self._checked(line).lines

    def get(self, key: str) -> str:
        return self._checked(f"GET {key}").text

    def set(self, key: str, value: str) -> str:
        return self._checked(f"SET {key} {value}").text

    def add_user(self, name: str, password: str) -> str:
        return self._checked(f"ADD {name} {password}").text

    def delete_user(self, name: str) -> str:
        return self._checked(f"DELE {name}").text

    def penalties(self) -> dict[str, dict[str, str]]:
        """`PENALTY`: source -> its fields (`failures`, `delay`, `idle`), most recent first."""
        result: dict[str, dict[str, str]] = {}
        for line in self._checked("PENALTY").lines:
            source, *fields = line.split()
            result[source] = dict(field.partition("=")[::2] for field in fields)
        return result

    def clear_penalty(self, address: str = "ALL") -> str:
        """`PENALTY CLEAR <address>|ALL`: forget one source's penalty, or all."""
        return self._checked(f"PENALTY CLEAR {address}").text

    def reload(self) -> str:
        """`RELOAD`: the server re-reads its users file and certificate; MsmpError with the reasons if it
        kept an old one."""
        return self._checked("RELOAD").text

    def help(self) -> list[str]:
        return self._checked("HELP").lines

    def capa(self) -> list[str]:
        return self._checked("CAPA").lines

    def quit(self) -> str:
        """QUIT, then close; returns the server's farewell text (empty if it was already gone)."""
        if self._sock is None:
            return ""
        try:
            return self._checked("QUIT").text
        except MsmpConnectionError:
            return ""
        finally:
            self.close()

    # -- plumbing -------------------------------------------------------------------------

    def _require(self) -> socket.socket:
        if self._sock is None:
            raise MsmpConnectionError(f"not connected to {self.where}")
        return self._sock

    def _read_line(self) -> str:
        sock = self._require()
        while True:
            end = self._buffer.find(b"\n", self._pos)
            if end >= 0:
                raw, self._pos = self._buffer[self._pos:end], end + 1
                return raw.rstrip(b"\r").decode("utf-8", "replace")
            # Drop what was read once per receive, not once per line (a long LOGS stays linear).
            self._buffer, self._pos = self._buffer[self._pos:], 0
            if len(self._buffer) > _MAX_LINE:
                self.close()
                raise MsmpProtocolError(f"response line from {self.where} too long")
            try:
                chunk = sock.recv(65536)
            except TimeoutError as exc:
                self.close()
                raise MsmpTimeout(f"no answer from {self.where} within {self.timeout:g} s") from exc
            except OSError as exc:
                self.close()
                raise MsmpConnectionError(f"connection to {self.where} lost: {_reason(exc)}") from exc
            if not chunk:
                self.close()
                raise MsmpConnectionError(f"connection closed by {self.where}")
            self._buffer += chunk

    @property
    def where(self) -> str:
        """host:port as people write it ([::1]:4321 for IPv6), or the socket's path, for messages."""
        if self.path is not None:
            return self.path
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def tls_context(cafile: str | None = None) -> ssl.SSLContext:
    """A client context that verifies the server's certificate and host name against the
    system's CAs, or only those in `cafile` (PEM). OSError/ssl.SSLError if it cannot be read."""
    return ssl.create_default_context(cafile=cafile)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__
