"""One POP3 connection without I/O: framing and the protocol, as a closed set of events (h11's shape).

The session hands over what it read (`receive_data`) and asks for `next_event()` until
it gets `NeedData` (read more) or `Close` (the protocol is over: send what is queued and
close). Every other event answers one command line, in order:

- `bytes`: the answer, to be sent as it is.
- an action (`Login`, `Refused`, `Retrieve`, `Update`, `StartTls`): what needs the
  disk, the user database, a lock or the socket; the session carries it out and reports
  back to `protocol` (`login_succeeded`, `login_failed`, `update_done`, ...), which
  gives the bytes to send. `Listing` (a whole-mailbox LIST or UIDL of more than
  LISTING_INLINE messages) needs none of those, only more time than an answer on the
  event loop may take: a runner sends it in chunks.

**The contract that makes parked answers safe:** every `bytes` event is computed without
I/O and without yielding (no file, no socket, no lock, no clock, no password check);
anything else is an action. So a session parked on the event loop may take a `bytes`
answer and write it right there, in the watcher's callback, and must hand the first action
to a greenlet (geventpop3.service.pop3.session). A command that one day needs to wait
must become an action, never bytes computed with I/O: tests/unit/core/pop3 and
tests/inprocess/test_parked_contract.py check it for every command a parked session sees.

Framing lives here, once, for both callers: lines split at LF (a CR before it dropped),
at most 255 octets (RFC 2449), an over-long line answered once and its rest discarded
without being buffered (geventpop3.core.lines). The usual burst, one whole command, takes a
fast path that builds no LineBuffer; a partial line waits in one between bursts, and a
held session keeps none. After `StartTls` the lines already received are dropped: nothing
the client sent before the handshake is executed after it.
"""

from __future__ import annotations

from dataclasses import dataclass

from geventpop3.core.lines import LineBuffer, single_line
from geventpop3.core.pop3.protocol import Listing, Login, Pop3Protocol, Refused, Retrieve, StartTls, Update


@dataclass(frozen=True, slots=True)
class NeedData:
    """No whole command line is waiting: read more from the client (or park)."""


@dataclass(frozen=True, slots=True)
class Close:
    """The protocol is over (QUIT, too many failed logins, the handshake after STLS failed):
    send what is queued, then close. Lines still waiting are never answered."""


NEED_DATA = NeedData()
CLOSE = Close()

# Every event `next_event` returns; a session matches them all (`typing.assert_never`).
Event = bytes | Login | Refused | Retrieve | Update | StartTls | Listing | NeedData | Close


class Pop3Connection:
    """Framing plus the protocol state machine of one connection; `protocol` is the state
    (user, messages, marks) the session reports back to."""

    __slots__ = ("protocol", "_buffer", "_line", "_lines")

    def __init__(self, protocol: Pop3Protocol) -> None:
        self.protocol = protocol
        # A partial line between bursts; None when there is none (most of the time).
        self._buffer: LineBuffer | None = None
        # The line of a one-line burst, not answered yet; None when there is none. The usual
        # burst (a client waiting for each answer) so makes no list.
        self._line: bytes | None = None
        # Lines received and not answered yet, the oldest last (pop() takes it); None when none.
        self._lines: list[object] | None = None

    def receive_data(self, data: bytes) -> None:
        """Take what the client sent (not empty: the end of input is the session's to see)."""
        buffer = self._buffer
        if buffer is None:
            single = single_line(data)  # one whole command, as most bursts are: no LineBuffer
            if single is not None and self._line is None and self._lines is None:
                self._line = single
                return
            buffer = self._buffer = LineBuffer()
        lines = buffer.feed(data)
        if buffer.empty:
            self._buffer = None
        if self._line is not None:  # it came first
            lines.insert(0, self._line)
            self._line = None
        if lines:
            lines.reverse()
            if self._lines:
                lines.extend(self._lines)
            self._lines = lines

    def next_event(self) -> Event:
        """The answer (or action) for the next line received, `NeedData` when none is
        waiting, `Close` once the protocol is over."""
        protocol = self.protocol
        if protocol.closing:
            return CLOSE
        line: object = self._line
        if line is not None:
            self._line = None
        else:
            lines = self._lines
            if not lines:
                return NEED_DATA
            line = lines.pop()
            if not lines:
                self._lines = None  # a held session keeps no empty list
        event = protocol.handle(line)
        if type(event) is StartTls:
            self.discard()
        return event

    def discard(self) -> None:
        """Forget every line received and not answered, and any partial line."""
        self._line = None
        self._lines = None
        self._buffer = None
