"""The pipe between the supervisor and one worker: JSON lines over a Unix socketpair.

One JSON object per line, `{"op": ..., ...}`: geventpop3.process.messages says which
objects are messages and what they mean; this module only carries them. Sending never blocks the caller: a
message is queued and one writer greenlet sends them in order, so a wedged peer
cannot stall an MSMP command that broadcasts a change. The first message can be held
back until `start(first)`, so a new worker gets its initial state before any change
broadcast while that state was being put together.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import gevent
from gevent import socket
from gevent.queue import Queue

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024 * 1024  # a report with many access-log entries stays far below this
MAX_LINE_FROM_SUPERVISOR = 1 << 30  # init and reload carry the users file's content, which has no size limit
RECV_SIZE = 256 * 1024

Frame = dict[str, Any]  # a message as JSON carries it (messages.encode, messages.decode)


def socketpair() -> tuple[socket.socket, socket.socket]:
    """(ours, theirs): `theirs` goes to the child (made inheritable by pass_fds)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return ours, theirs


class Channel:
    """One end of a socketpair speaking JSON lines."""

    def __init__(self, sock: socket.socket, max_line: int = MAX_LINE) -> None:
        self.sock = sock
        self.max_line = max_line
        self._outbox: Queue[bytes | None] = Queue()
        self._writer: gevent.Greenlet[..., None] | None = None
        self._idle = False  # the writer waits for the next message, everything before it written
        self._batch: list[bytes] = []  # written in one go once this turn of the event loop ends
        self.closed = False

    @classmethod
    def from_fd(cls, fd: int, max_line: int = MAX_LINE) -> Channel:
        return cls(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=fd), max_line)

    def start(self, first: Frame | None = None) -> None:
        """Start sending what is queued, `first` before everything else."""
        head = [encode(first)] if first is not None else []
        self._writer = gevent.spawn(self._write, head)

    def send(self, message: Frame) -> None:
        self.send_encoded(encode(message))

    def send_encoded(self, data: bytes) -> None:
        """A message already `encode`d: a broadcast encodes once for every worker.

        When nothing is waiting for the writer, what is sent during this turn of the event
        loop is written in one go at its end, without waking the writer (the accounting's
        questions and answers are several per connection: one wake-up of the other process
        for all of them); else it is queued behind what waits."""
        if self.closed:
            return
        batch = self._batch
        if batch:
            batch.append(data)
        elif self._idle and not self._outbox.qsize():
            batch.append(data)
            gevent.get_hub().loop.run_callback(self._write_batch)
        else:
            self._outbox.put(data)

    def _write_batch(self) -> None:
        """The batch, written without blocking (fine on the hub); what does not fit goes to the writer."""
        if not self._batch:
            return
        data = b"".join(self._batch)
        self._batch.clear()
        if self.closed:
            return
        try:
            written = os.write(self.sock.fileno(), data)
        except BlockingIOError:
            written = 0
        except OSError:
            return  # the peer is gone: the reader sees the end
        if written < len(data):
            self._outbox.put(data[written:])

    def send_now(self, message: Frame, timeout: float = 5.0) -> bool:
        """Send `message` after what is queued and wait until it is written (the last report)."""
        if self.closed or self._writer is None:
            return False
        self._write_batch()
        self._outbox.put(encode(message))
        self._outbox.put(None)  # the writer ends after the queued messages
        self._writer.join(timeout)
        return self._writer.dead

    def _write(self, head: list[bytes]) -> None:
        try:
            for data in head:
                self.sock.sendall(data)
            outbox = self._outbox
            while True:
                self._idle = not outbox.qsize()
                queued = outbox.get()
                self._idle = False
                if queued is None:
                    return
                if outbox.qsize():  # what was queued meanwhile goes in the same write (one syscall)
                    batch = [queued]
                    while outbox.qsize() and (queued := outbox.get_nowait()) is not None:
                        batch.append(queued)
                    self.sock.sendall(b"".join(batch))
                    if queued is None:
                        return
                    continue
                self.sock.sendall(queued)
        except OSError as exc:  # the peer is gone: its reader sees EOF and says so
            log.debug("channel: send failed: %s", exc)
            self.closed = True

    def messages(self) -> Iterator[Frame]:
        """Received messages until EOF (or a broken pipe); a malformed or over-long line is
        logged and skipped. The buffer grows in place and is searched from where the last
        search stopped, so a message of many megabytes costs linear time."""
        pending = bytearray()
        searched = 0  # bytes of `pending` known to hold no newline
        dropping = False  # inside a line that was over max_line: skip to its end
        while True:
            try:
                data = self.sock.recv(RECV_SIZE)
            except OSError:
                return
            if not data:
                return
            pending += data
            start = 0
            while (end := pending.find(b"\n", max(start, searched))) >= 0:
                line, start, searched = pending[start:end], end + 1, 0
                if dropping or len(line) > self.max_line:
                    if not dropping:
                        log.error("channel: message over %d bytes dropped", self.max_line)
                    dropping = False
                    continue
                try:
                    message = _DECODER.decode(line.decode())
                except ValueError:  # UnicodeDecodeError too
                    log.error("channel: malformed message dropped")
                    continue
                if isinstance(message, dict):
                    yield message
            del pending[:start]
            searched = len(pending)
            if len(pending) > self.max_line:
                log.error("channel: message over %d bytes dropped", self.max_line)
                pending.clear()
                searched = 0
                dropping = True

    def close(self) -> None:
        self.closed = True
        if self._writer is not None:
            self._writer.kill(block=False)
        self.sock.close()


def encode(message: Frame) -> bytes:
    return _ENCODER.encode(message).encode() + b"\n"


# One of each, made once: json.dumps with separators builds an encoder per call, and json.loads
# of bytes guesses their encoding first; the accounting sends several messages per connection.
_ENCODER = json.JSONEncoder(separators=(",", ":"))
_DECODER = json.JSONDecoder()

