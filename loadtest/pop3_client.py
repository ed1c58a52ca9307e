"""A small blocking POP3 client that reports every step, for Locust and for benchmarks.

Each step (CONNECT, LOGIN, STAT, LIST, UIDL, RETR, TOP, DELE, NOOP, QUIT) is timed
from the first byte sent to the last byte of the answer read, and handed to an
`on_step(name, seconds, length, exception)` callback: the Locust user turns that into
one request event. It uses the plain `socket` module, so under Locust (which
monkey-patches with gevent) it blocks only its own greenlet.

It is written for speed on the load generator, not for completeness: a multi-line
answer is read into one buffer and only its end is searched for the terminator, and
message bodies are not un-dot-stuffed (the octet count is what a load test needs).
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable

StepCallback = Callable[[str, float, int, BaseException | None], None]

RECV_SIZE = 65536
MAX_LINE = 8192  # a status line longer than this is not POP3
TERMINATOR = b"\r\n.\r\n"


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
    """One POP3 connection; every public method is one reported step."""

    def __init__(self, host: str, port: int, timeout: float = 60.0, on_step: StepCallback | None = None) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.on_step = on_step or _ignore
        self.sock: socket.socket | None = None
        self._buf = bytearray()

    # -- steps ---------------------------------------------------------------
    def connect(self) -> str:
        """CONNECT: open the connection and read the greeting."""
        start = time.perf_counter()
        try:
            self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            line = self._read_line()
            if not line.startswith(b"+OK"):
                raise (Pop3Error("CONNECT", _text(line[4:])) if line.startswith(b"-ERR")
                       else Pop3ConnectionError(f"not a POP3 greeting: {bytes(line[:60])!r}"))
        except BaseException as exc:
            self._failed("CONNECT", start, exc)
            raise
        self.on_step("CONNECT", time.perf_counter() - start, len(line), None)
        return _text(line[3:])

    def login(self, user: str, password: str) -> None:
        """LOGIN: USER then PASS, one step (two round trips, as most clients do)."""
        start = time.perf_counter()
        try:
            length = len(self._simple("USER", f"USER {user}"))
            length += len(self._simple("PASS", f"PASS {password}"))
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
            raise Pop3ConnectionError(f"bad STAT answer {bytes(line[:60])!r}") from None

    def list(self) -> list[tuple[int, int]]:
        """LIST: (number, octets) of every message."""
        return [(int(a), int(b)) for a, b in _pairs(self._step("LIST", "LIST", multi=True))]

    def uidl(self) -> list[tuple[int, str]]:
        """UIDL: (number, unique id) of every message."""
        return [(int(a), b.decode("ascii", "replace")) for a, b in _pairs(self._step("UIDL", "UIDL", multi=True))]

    def retr(self, number: int) -> int:
        """RETR: the whole answer's octet count (status line, body and terminator)."""
        return len(self._step("RETR", f"RETR {number}", multi=True))

    def top(self, number: int, lines: int = 0) -> int:
        return len(self._step("TOP", f"TOP {number} {lines}", multi=True))

    def dele(self, number: int) -> None:
        self._step("DELE", f"DELE {number}")

    def noop(self) -> None:
        self._step("NOOP", "NOOP")

    def quit(self) -> None:
        """QUIT: the server deletes what was marked (UPDATE) and closes."""
        try:
            self._step("QUIT", "QUIT")
        finally:
            self.close()

    def close(self) -> None:
        """Drop the connection without QUIT (nothing is deleted); safe to call twice."""
        sock, self.sock = self.sock, None
        self._buf.clear()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    @property
    def connected(self) -> bool:
        return self.sock is not None

    # -- plumbing ------------------------------------------------------------
    def _step(self, name: str, line: str, multi: bool = False) -> bytearray:
        start = time.perf_counter()
        try:
            data = self._exchange(name, line, multi)
        except BaseException as exc:
            self._failed(name, start, exc)
            raise
        self.on_step(name, time.perf_counter() - start, len(data), None)
        return data

    def _simple(self, name: str, line: str) -> bytearray:
        return self._exchange(name, line, multi=False)

    def _exchange(self, name: str, line: str, multi: bool) -> bytearray:
        sock = self._require()
        try:
            sock.sendall(line.encode() + b"\r\n")
        except OSError as exc:
            self.close()
            raise Pop3ConnectionError(f"{name}: send failed: {exc}") from exc
        status = self._read_line()
        if status.startswith(b"-ERR"):
            raise Pop3Error(name, _text(status[4:]))
        if not status.startswith(b"+OK"):
            self.close()
            raise Pop3ConnectionError(f"{name}: bad answer {bytes(status[:60])!r}")
        if not multi:
            return status
        return status + self._read_body()

    def _require(self) -> socket.socket:
        if self.sock is None:
            raise Pop3ConnectionError("not connected")
        return self.sock

    def _recv(self) -> None:
        sock = self._require()
        try:
            chunk = sock.recv(RECV_SIZE)
        except TimeoutError as exc:
            self.close()
            raise Pop3ConnectionError(f"no answer within {self.timeout:g} s") from exc
        except OSError as exc:
            self.close()
            raise Pop3ConnectionError(f"connection lost: {exc}") from exc
        if not chunk:
            self.close()
            raise Pop3ConnectionError("connection closed by the server")
        self._buf += chunk

    def _read_line(self) -> bytearray:
        """One CRLF (or LF) line, without its end."""
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = self._buf[:end]
                del self._buf[:end + 1]
                return line[:-1] if line.endswith(b"\r") else line
            if len(self._buf) > MAX_LINE:
                self.close()
                raise Pop3ConnectionError("status line too long")
            self._recv()

    def _read_body(self) -> bytearray:
        """Everything up to and including the lone `.` line (the status line already read)."""
        while len(self._buf) < 3 and b".\r\n".startswith(bytes(self._buf)):
            self._recv()  # not yet enough to tell an empty body from a first line
        if self._buf.startswith(b".\r\n"):  # empty body
            del self._buf[:3]
            return bytearray(b".\r\n")
        searched = 0
        while True:
            end = self._buf.find(TERMINATOR, max(searched - 4, 0))
            if end >= 0:
                body = self._buf[:end + 5]
                del self._buf[:end + 5]
                return body
            searched = len(self._buf)
            self._recv()

    def _failed(self, name: str, start: float, exc: BaseException) -> None:
        if not isinstance(exc, Pop3Error):
            self.close()
        if isinstance(exc, Exception):
            self.on_step(name, time.perf_counter() - start, 0, exc)


def _text(data: bytes | bytearray) -> str:
    return bytes(data).decode("utf-8", "replace").strip()


def _pairs(data: bytearray) -> list[tuple[bytes, bytes]]:
    """The `a b` data lines of a LIST/UIDL answer (status line and terminator skipped)."""
    lines = bytes(data).split(b"\r\n")[1:]
    pairs = []
    for raw in lines:
        if raw == b".":
            break
        parts = raw.split()
        if len(parts) >= 2:
            pairs.append((parts[0], parts[1]))
    return pairs
