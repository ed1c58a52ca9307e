"""The one raw line client of the tests: POP3 or MSMP on a plain socket (IPv4 or IPv6),
raw bytes out, exact lines in, optionally over TLS (`start_tls`).

Blocking stdlib sockets: under a monkey-patched test process they are gevent's, and the
client blocks only its own greenlet.
"""

from __future__ import annotations

import socket
import ssl
import struct

CRLF = b"\r\n"


class LineClient:
    """POP3 or MSMP on a plain socket (IPv4 or IPv6): raw bytes out, exact lines in.

    Every read has a timeout, so a hang fails fast; `max_line` (octets with CRLF) is
    asserted on every line read when given.
    """

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0, greet: bool = True,
                 max_line: int | None = None, source: str | None = None) -> None:
        # `source`: the client's own address (127.0.0.2 is a non-local client of a server on 127.0.0.1)
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self._buffer = bytearray()  # deleting its front is cheap: a 64 MiB answer reads in linear time
        self.max_line = max_line
        self.greeting = self.line() if greet else b""

    def __enter__(self) -> LineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def buffer(self) -> bytes:
        """What arrived and is not read yet."""
        return bytes(self._buffer)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def fill(self) -> bool:
        """Read what arrives into `buffer`; False once the server has closed."""
        data = self.sock.recv(65536)
        self._buffer += data
        return bool(data)

    def readline(self) -> bytes:
        """One line with its CRLF, as a socket file gives it; the rest (b"" at the end) once closed."""
        scan = 0
        while (end := self._buffer.find(CRLF, scan)) < 0:
            scan = max(0, len(self._buffer) - 1)
            if not self.fill():
                rest = bytes(self._buffer)
                self._buffer.clear()
                return rest
        line = bytes(self._buffer[:end + 2])
        del self._buffer[:end + 2]
        return line

    def line(self) -> bytes:
        """One line without its CRLF; raises EOFError if the server closed."""
        line = self.readline()
        if not line.endswith(CRLF):
            raise EOFError(f"connection closed, pending {line[:80]!r}")
        if self.max_line is not None:
            assert len(line) <= self.max_line, line[:80]
        return line[:-2]

    def cmd(self, text: str | bytes) -> bytes:
        """Send one command line, return the first answer line."""
        self.send((text.encode() if isinstance(text, str) else text) + CRLF)
        return self.line()

    def body_lines(self) -> list[bytes]:
        """The lines of a multi-line body after its +OK line, up to the lone dot, un-dot-stuffed."""
        lines = []
        while (line := self.line()) != b".":
            lines.append(line[1:] if line.startswith(b".") else line)
        return lines

    def body(self) -> bytes:
        """A multi-line body after its +OK line: un-dot-stuffed, CRLF line ends kept."""
        return b"".join(part + CRLF for part in self.body_lines())

    def multi(self, text: str) -> tuple[bytes, bytes]:
        """A multi-line command: (its +OK line, its body)."""
        first = self.cmd(text)
        assert first.startswith(b"+OK"), first
        return first, self.body()

    def login(self, user: str, password: str) -> bytes:
        """USER (must be +OK) then PASS; the answer to PASS."""
        assert self.cmd(f"USER {user}") == b"+OK"
        return self.cmd(f"PASS {password}")

    def retr(self, number: int) -> bytes:
        return self.multi(f"RETR {number}")[1]

    def read_until_closed(self, timeout: float = 10.0, reset_ok: bool = False) -> bytes:
        """Everything until the server closes (a reset counts with `reset_ok`); fails if `timeout` s pass silent."""
        self.sock.settimeout(timeout)
        try:
            while self.fill():
                pass
        except ConnectionResetError:
            if not reset_ok:
                raise
        except TimeoutError:
            raise AssertionError(f"connection still open after {timeout} s: {self.buffer[-80:]!r}") from None
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def reset(self) -> None:
        """Close with an RST (SO_LINGER 0) instead of a FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


def start_tls(client: LineClient, context: ssl.SSLContext, host: str = "127.0.0.1") -> None:
    """Turn `client`'s socket into TLS (after STLS's +OK, or at once for POP3S), verifying the server."""
    assert not client.buffer, f"plaintext left unread before the handshake: {client.buffer!r}"
    client.sock = context.wrap_socket(client.sock, server_hostname=host)


def tls_line_client(port: int, context: ssl.SSLContext, host: str = "127.0.0.1",
                    source: str | None = None) -> LineClient:
    """A client of implicit TLS (POP3S): handshake done, server verified, greeting read."""
    client = LineClient(port, host, greet=False, source=source)
    start_tls(client, context, host)
    client.greeting = client.line()
    return client
