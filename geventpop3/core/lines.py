"""Line framing shared by the POP3 and MSMP protocol cores (no I/O here).

Both protocols are CRLF line protocols with a 255-octet command limit (RFC 2449),
accept a bare LF from clients, and dot-stuff multi-line responses. Keeping this in
one place means both servers treat hostile input the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

MAX_COMMAND_LINE = 255  # octets, CRLF included (RFC 2449 section 4)
MAX_RESPONSE_LINE = 512  # octets, CRLF included

# Sentinel handed out instead of a line that exceeded the limit.
LINE_TOO_LONG = object()


@dataclass(frozen=True, slots=True)
class Delayed:
    """A response the session sends only after `seconds`: the answer to a failed login.

    Both protocol cores decide the delay (it slows password guessing); the sessions
    only flush what came before, wait, and send `data`.
    """

    seconds: float
    data: bytes


class LineBuffer:
    """Splits a byte stream into command lines, enforcing the length limit.

    `feed()` returns complete lines without their line ending. A line longer than
    the limit comes out as `LINE_TOO_LONG` once, and the rest of it (up to the next
    LF) is discarded without being buffered, so a 1 MiB line costs no memory.
    """

    __slots__ = ("_buffer", "_discarding", "_limit")

    def __init__(self, limit: int = MAX_COMMAND_LINE) -> None:
        self._buffer = b""
        self._discarding = False
        self._limit = limit

    def feed(self, data: bytes) -> list[object]:
        out: list[object] = []
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        start = 0
        limit = self._limit
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            if self._discarding:
                self._discarding = False
            elif end + 1 - start > limit:
                out.append(LINE_TOO_LONG)
            else:
                line = data[start:end]
                if line.endswith(b"\r"):
                    line = line[:-1]
                out.append(line)
            start = end + 1
        rest = data[start:]
        if self._discarding:
            return out
        if len(rest) >= limit:
            # Over the limit with no end in sight: report once, drop the rest.
            out.append(LINE_TOO_LONG)
            self._discarding = True
        else:
            self._buffer = rest
        return out

    @property
    def empty(self) -> bool:
        """Nothing held: no partial line, no over-long line being dropped."""
        return not self._buffer and not self._discarding

    @property
    def pending(self) -> int:
        """Octets held waiting for a line end (for tests and accounting)."""
        return len(self._buffer)


def single_line(data: bytes, limit: int = MAX_COMMAND_LINE) -> bytes | None:
    """`data` as one command line, when it is exactly one whole line within the limit (the
    usual burst of a client that waits for each answer): what `LineBuffer().feed(data)`
    would give, without making a LineBuffer. None for anything else (no line end yet,
    several lines, over the limit): feed a LineBuffer then."""
    end = len(data) - 1
    if not 0 <= end < limit or data[end] != 10 or data.find(b"\n", 0, end) >= 0:
        return None
    return data[:end - 1] if end and data[end - 1] == 13 else data[:end]


def dot_stuff_lines(lines: Iterable[str]) -> bytes:
    """A multi-line body: each line CRLF-terminated and dot-stuffed, then `.`."""
    parts = []
    for line in lines:
        if line.startswith("."):
            line = "." + line
        parts.append(line.encode("utf-8", "replace") + b"\r\n")
    parts.append(b".\r\n")
    return b"".join(parts)


def response_line(text: str) -> bytes:
    """One response line, truncated so that it never exceeds MAX_RESPONSE_LINE."""
    data = text.encode("utf-8", "replace")
    if len(data) > MAX_RESPONSE_LINE - 2:
        # Cut, then drop a character the cut split in two: the line stays valid UTF-8.
        data = data[: MAX_RESPONSE_LINE - 2].decode("utf-8", "ignore").encode("utf-8")
    return data + b"\r\n"
