"""The one POP3 client of the load tests: the Locust suite and the benchmark use it.

Each step (CONNECT, LOGIN, STAT, LIST, UIDL, RETR, TOP, DELE, NOOP, QUIT) is timed from
the first byte sent to the last byte of the answer read and handed to an optional
`on_step(name, seconds, length, exception)` callback: the Locust user turns that into
one request event, the benchmark passes none. Below the steps, `command`, `send`,
`status`, `read_line` and `read_body` give the benchmark the wire itself (pipelining,
a RETR timed to the terminator). It uses the plain `socket` module, so under gevent's
monkey-patching (Locust, the benchmark) it blocks only its own greenlet.

It is written for speed, since the load generator shares the CPU with the server it
measures: answers are read into one bytearray, only the newly read part is searched for
CRLF or the terminator, lines and bodies come back as one slice of that buffer (no
per-line Python loop, a 64 MiB RETR costs one copy), and bodies stay dot-stuffed
(`unstuff` undoes it where the content is checked; a load test needs only the octets).
Lines must end in CRLF (RFC 1939): anything else is an error, not something to guess.

TLS: with an `ssl.SSLContext` the client speaks implicit TLS (RFC 8314: the handshake
first, then the greeting), and with `starttls=True` as well it reads the greeting in
plaintext, sends STLS and shakes hands after the +OK (RFC 2595). The handshake is part of
the CONNECT step; the server's name is checked against `server_hostname` (default: the
host). Without a context nothing changes: the plaintext path is the same code as before.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Callable

StepCallback = Callable[[str, float, int, BaseException | None], None]

RECV_SIZE = 65536
MAX_RECV = 1 << 20  # a big body is read in ever larger pieces, up to this
MAX_LINE = 8192  # a status line longer than this is not POP3
TLS_RECV_SIZE = 65536  # one SSL read returns at most a record (16 KiB): a bigger buffer is only allocated


class Pop3Error(Exception):
    """The server answered -ERR; `text` is the rest of the line."""

    def __init__(self, step: str, text: str) -> None:
        super().__init__(f"{step}: -ERR {text}")
        self.step = step
        self.text = text


class Pop3ConnectionError(ConnectionError):
    """Refused, reset, closed by the server, timed out, or not POP3 at all."""


def _ignore(_name: str, _seconds: float, _length: int, _exc: BaseException | None) -> None:
    pass


class Pop3Client:
    """One POP3 connection: each public step method reports one step; the wire methods report nothing."""

    __slots__ = ("host", "port", "timeout", "on_step", "sock", "buf", "finished", "ssl_context", "starttls",
                 "server_hostname", "max_recv")

    def __init__(self, host: str, port: int, timeout: float = 60.0, on_step: StepCallback | None = None,
                 ssl_context: ssl.SSLContext | None = None, starttls: bool = False,
                 server_hostname: str | None = None) -> None:
        if starttls and ssl_context is None:
            raise ValueError("starttls needs an ssl_context")
        self.host = host
        self.port = port
        self.timeout = timeout
        self.on_step = on_step or _ignore
        self.sock: socket.socket | None = None
        self.buf = bytearray()
        self.finished = 0.0  # perf_counter() when the last multi-line answer's terminator arrived
        self.ssl_context = ssl_context
        self.starttls = starttls
        self.server_hostname = server_hostname or host
        self.max_recv = MAX_RECV if ssl_context is None else TLS_RECV_SIZE

    # -- steps ---------------------------------------------------------------
    def connect(self) -> str:
        """CONNECT: open the connection (with TLS: and shake hands) and read the greeting; returns its text."""
        start = time.perf_counter()
        try:
            self.sock = _open(self.host, self.port, self.timeout)
            if self.ssl_context is None:
                line = self.status("CONNECT")
            elif self.starttls:
                line = self.status("CONNECT")
                self.command("STLS")
                self._handshake()
            else:
                self._handshake()
                line = self.status("CONNECT")
        except BaseException as exc:
            self._failed("CONNECT", start, exc)
            raise
        self.on_step("CONNECT", time.perf_counter() - start, len(line) + 2, None)
        return _text(line[3:])

    def login(self, user: str, password: str) -> None:
        """LOGIN: USER then PASS, one step (two round trips, as most clients do)."""
        start = time.perf_counter()
        try:
            length = len(self.command(f"USER {user}")) + len(self.command(f"PASS {password}")) + 4
        except BaseException as exc:
            self._failed("LOGIN", start, exc)
            raise
        self.on_step("LOGIN", time.perf_counter() - start, length, None)

    def stat(self) -> tuple[int, int]:
        """STAT: (message count, mailbox octets)."""
        line = self._step("STAT", "STAT")
        try:
            count, size = line[3:].split()[:2]
            return int(count), int(size)
        except ValueError:
            self.close()
            raise Pop3ConnectionError(f"bad STAT answer {bytes(line[:60])!r}") from None

    def list(self) -> list[tuple[int, int]]:
        """LIST: (number, octets) of every message."""
        return [(int(a), int(b)) for a, b in _pairs(self._step("LIST", "LIST", multi=True))]

    def uidl(self) -> list[tuple[int, str]]:
        """UIDL: (number, unique id) of every message."""
        return [(int(a), b.decode("ascii", "replace")) for a, b in _pairs(self._step("UIDL", "UIDL", multi=True))]

    def retr(self, number: int) -> bytearray:
        """RETR: the message as sent, dot-stuffed (`unstuff` gives the message itself)."""
        return self._step("RETR", f"RETR {number}", multi=True)

    def top(self, number: int, lines: int = 0) -> bytearray:
        """TOP: the headers and `lines` body lines, dot-stuffed."""
        return self._step("TOP", f"TOP {number} {lines}", multi=True)

    def dele(self, number: int) -> None:
        self._step("DELE", f"DELE {number}")

    def noop(self) -> None:
        self._step("NOOP", "NOOP")

    def quit(self) -> None:
        """QUIT, then wait for the server to close: the mailbox lock is released by then."""
        try:
            self._step("QUIT", "QUIT")
            with contextlib.suppress(OSError):
                while self._require().recv(4096):
                    pass
        finally:
            self.close()

    def close(self) -> None:
        """Drop the connection without QUIT (nothing is deleted); safe to call twice."""
        sock, self.sock = self.sock, None
        self.buf.clear()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    @property
    def connected(self) -> bool:
        return self.sock is not None

    def local_port(self) -> int:
        """The client's port: what tells which server process holds the other end."""
        return int(self._require().getsockname()[1])

    # -- the wire, unreported ------------------------------------------------
    def command(self, line: str) -> bytearray:
        """Send one command line and return its +OK status line (see `status`)."""
        self.send(line.encode() + b"\r\n")
        return self.status(line.partition(" ")[0])  # the verb only: no password in an error

    def send(self, data: bytes) -> None:
        """Write raw bytes (one command or a whole pipeline)."""
        try:
            self._require().sendall(data)
        except OSError as exc:
            self.close()
            raise Pop3ConnectionError(f"send failed: {exc}") from exc

    def status(self, name: str = "") -> bytearray:
        """The next line if it is +OK; -ERR raises Pop3Error, anything else Pop3ConnectionError."""
        line = self.read_line()
        if line.startswith(b"+OK"):
            return line
        if line.startswith(b"-ERR"):
            raise Pop3Error(name, _text(line[4:]))
        self.close()
        raise Pop3ConnectionError(f"{name}: not a POP3 answer: {bytes(line[:60])!r}")

    def read_line(self) -> bytearray:
        """The next CRLF-ended line, without its CRLF."""
        buf = self.buf
        scan = 0
        while True:
            end = buf.find(b"\r\n", scan)
            if end >= 0:
                line = buf[:end]
                del buf[:end + 2]
                return line
            if len(buf) > MAX_LINE:
                self.close()
                raise Pop3ConnectionError("status line too long")
            scan = max(0, len(buf) - 1)
            self._fill(RECV_SIZE)

    def read_body(self) -> bytearray:
        """The rest of a multi-line answer (status line already read): dot-stuffed, ends in CRLF or is empty.

        Sets `finished` when the terminator has arrived, before the body is copied out.
        """
        buf = self.buf
        scan = 0
        size = RECV_SIZE
        while True:
            if buf.startswith(b".\r\n"):
                self.finished = time.perf_counter()
                del buf[:3]
                return bytearray()
            end = buf.find(b"\r\n.\r\n", scan)
            if end >= 0:
                self.finished = time.perf_counter()
                body = buf[:end + 2]
                del buf[:end + 5]
                return body
            scan = max(0, len(buf) - 4)
            self._fill(size)
            size = min(size * 2, self.max_recv)

    # -- plumbing ------------------------------------------------------------
    def _step(self, name: str, line: str, multi: bool = False) -> bytearray:
        """One reported step: the status line, or with `multi` the body after it."""
        start = time.perf_counter()
        try:
            answer = self.command(line)
            length = len(answer) + 2
            if multi:
                answer = self.read_body()
                length += len(answer) + 3
        except BaseException as exc:
            self._failed(name, start, exc)
            raise
        self.on_step(name, time.perf_counter() - start, length, None)
        return answer

    def _require(self) -> socket.socket:
        if self.sock is None:
            raise Pop3ConnectionError("not connected")
        return self.sock

    def _handshake(self) -> None:
        """Wrap the socket in TLS; plaintext read past the STLS answer would be injected input: refuse it."""
        assert self.ssl_context is not None
        if self.buf:
            self.close()
            raise Pop3ConnectionError(f"plaintext after the STLS answer: {bytes(self.buf[:60])!r}")
        try:
            self.sock = self.ssl_context.wrap_socket(self._require(), server_hostname=self.server_hostname)
        except TimeoutError as exc:
            self.close()
            raise Pop3ConnectionError(f"no TLS handshake within {self.timeout:g} s") from exc
        except OSError as exc:  # ssl.SSLError, ssl.SSLCertVerificationError included
            self.close()
            raise Pop3ConnectionError(f"TLS handshake failed: {exc}") from exc

    @property
    def tls_version(self) -> str | None:
        """The TLS protocol version of the connection, None if it is plaintext."""
        return self.sock.version() if isinstance(self.sock, ssl.SSLSocket) else None

    def _fill(self, size: int) -> None:
        sock = self._require()
        try:
            chunk = sock.recv(size)
        except TimeoutError as exc:
            self.close()
            raise Pop3ConnectionError(f"no answer within {self.timeout:g} s") from exc
        except OSError as exc:
            self.close()
            raise Pop3ConnectionError(f"connection lost: {exc}") from exc
        if not chunk:
            self.close()
            raise Pop3ConnectionError("connection closed by the server")
        self.buf += chunk

    def _failed(self, name: str, start: float, exc: BaseException) -> None:
        """A step ended early: drop the connection (its state is unknown) unless -ERR, and report."""
        if not isinstance(exc, Pop3Error):
            self.close()
        if isinstance(exc, Exception):
            self.on_step(name, time.perf_counter() - start, 0, exc)


def _open(host: str, port: int, timeout: float) -> socket.socket:
    """A connected socket; a numeric address skips getaddrinfo, which gevent runs in a thread pool."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        break
    else:
        sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def unstuff(body: bytes | bytearray) -> bytes | bytearray:
    """A multi-line body without its dot-stuffing: the message as stored, with CRLF ends."""
    if body.startswith(b".."):
        body = body[1:]
    return body.replace(b"\r\n..", b"\r\n.")


def _text(data: bytes | bytearray) -> str:
    return bytes(data).decode("utf-8", "replace").strip()


def _pairs(body: bytearray) -> list[tuple[bytes, bytes]]:
    """The `a b` lines of a LIST or UIDL body."""
    pairs = []
    for raw in bytes(body).split(b"\r\n"):
        parts = raw.split()
        if len(parts) >= 2:
            pairs.append((parts[0], parts[1]))
    return pairs
