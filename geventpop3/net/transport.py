"""One connection's socket side: non-blocking reads, batched writes, parking, close.

The session above it reads top to bottom as a blocking-style handler for each burst
of client input: `read()` until it returns None (nothing more for now), answer with
`write()`, then `park()`. Writes are gathered and go out in one write(2) per burst
(or once more than `FLUSH_THRESHOLD` octets are queued, so memory stays bounded
while a message streams).

Parking, the one memory optimisation of the server: a session waiting for its
client holds no greenlet. `park(waiter, timeout)` starts an I/O watcher on the event
loop, puts the transport in the `IdleClock` and returns; the greenlet that served the
burst then ends. Data (or EOF) calls `waiter.answer_parked()`, which may answer right
there on the event loop and `rearm()` (the watcher stays started, the deadline moves:
a logged-in session's NOOP costs no greenlet and no epoll_ctl); otherwise the transport
is unparked and `waiter.on_ready()` called. Silence for `timeout` seconds (up to
`IdleClock.TICK` more) calls `waiter.on_timeout()`. Both run on the event loop and
typically spawn a fresh greenlet to carry on. A greenlet blocked in recv()
keeps its saved stack (about 6 KiB with gevent's frames), so this is what lets one
process hold 10,000 idle sessions at a few KiB each. For the same reason a parked
transport holds as little as it can: the watcher's callback is the transport itself
(not a bound method), the waiter is an object (the session), the deadline is an entry
in the IdleClock's ring of its tick (two slots, not a timer object each),
and the write queue is None, not an empty list, between bursts.

TLS is a subclass, `TlsTransport`, so a plain connection runs exactly the code it
ran before (os.read/os.write on the descriptor, no TLS check per call); STLS swaps
the session's transport for one made with `TlsTransport.accept`, which holds the bare
SSL object, not an `ssl.SSLSocket` (see geventpop3.net.tls). Parking works the same: TLS
records arrive on the same descriptor, and bytes the SSL object has already decrypted
are served before parking (`pending()`).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import select
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

import gevent
from gevent import monkey
from gevent.socket import wait_read, wait_write

from geventpop3.net import tls

RECV_SIZE = 4096
FLUSH_THRESHOLD = 128 * 1024
DISCARD_READS = 16  # at most this many reads of unread input are dropped at once (a flood cannot hold us)
CLOSE_FLUSH_TIMEOUT = 1.0  # seconds a last answer (idle timeout, shutdown) may take to leave



class Waiter(Protocol):
    """What a parked transport wakes: called on the event loop, holding no greenlet."""

    def answer_parked(self) -> bool:
        """The client sent something (or closed), the transport still parked: True if the
        waiter dealt with it right here (answered and `rearm`ed, or unparked and handed on),
        False to be unparked and told `on_ready()`."""
        ...

    def on_ready(self) -> None: ...

    def on_timeout(self) -> None: ...

_original_poll = monkey.get_original("select", "poll")  # gevent's own poll() knows no POLLRDHUP


class Transport:
    """A connected socket with a write queue and an event-loop parking place."""

    __slots__ = ("sock", "sent", "closed", "short_read", "_out", "_out_size", "_watcher",
                 "_prev_due", "_next_due", "_due", "_waiter", "on_sent")

    def __init__(self, sock: socket.socket | tls.TlsSocket, on_sent: Callable[[int], None] | None = None) -> None:
        self.sock = sock
        self.sent = 0
        self.closed = False
        self.short_read = False  # the last read took less than asked: the client is now waiting
        self._out: list[bytes] | None = None  # answers not sent yet; None (not an empty list) between bursts
        self._out_size = 0
        self._watcher: Any = None  # gevent loop io watcher, kept across parks
        # While parked: linked into the IdleClock's ring of its deadline's tick.
        self._prev_due: Transport | _Tick | None = None
        self._next_due: Transport | _Tick | None = None
        # While parked: the tick the deadline is really at, the linked ring's or a later one
        # (`rearm` moves a deadline later without relinking; the IdleClock relinks at expiry).
        self._due: _Tick | None = None
        self._waiter: Waiter | None = None  # who is woken, while parked
        self.on_sent = on_sent  # told the octets of every flush (server-wide counters)
        # Answers are already batched per burst; Nagle would only hold the next batch
        # back until the client's delayed ACK (40 ms per pipelined write).
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @property
    def fd(self) -> int:
        """The descriptor: the watcher's once there is one (a C attribute, where the socket's
        fileno() is a Python method of gevent's), else asked of the socket (an int kept per
        session would be 32 bytes more)."""
        watcher = self._watcher
        return watcher.fd if watcher is not None else self.sock.fileno()

    # -- input ---------------------------------------------------------------
    def read(self) -> bytes | None:
        """What the client has sent, without waiting: bytes, b"" at EOF, None if nothing now.

        After a short read the client has sent all it had and waits for answers, so the
        next call returns None without a read(2) that would only say EAGAIN.
        """
        if self.short_read:
            self.short_read = False
            return None
        try:
            data = os.read(self.fd, RECV_SIZE)
        except BlockingIOError:
            return None
        self.short_read = 0 < len(data) < RECV_SIZE
        return data

    def discard_input(self) -> None:
        """Drop whatever the client has sent and is not read yet (before STLS's +OK)."""
        self.short_read = False
        with contextlib.suppress(OSError):  # BlockingIOError: all of it is gone
            for _ in range(DISCARD_READS):
                if not os.read(self.fd, RECV_SIZE):
                    break

    def peer_gone(self) -> bool:
        """True once the client closed or reset its side, even with input still queued (Linux).

        Without POLLRDHUP only an error or hang-up counts: a half-closed client looks alive.
        """
        if self.closed:
            return True
        poller = _original_poll()
        poller.register(self.fd, getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR)
        try:
            return bool(poller.poll(0))
        except OSError:
            return True

    # -- output --------------------------------------------------------------
    def write(self, data: bytes) -> None:
        """Queue `data`; it leaves at the next `flush()` or once the queue is large."""
        self.queue(data)
        if self._out_size >= FLUSH_THRESHOLD:
            self.flush()

    def queue(self, data: bytes) -> int:
        """Queue `data`, never sending it here (on the event loop, where no flush may wait);
        returns the octets now queued."""
        if self._out is None:
            self._out = [data]
        else:
            self._out.append(data)
        self._out_size += len(data)
        return self._out_size

    @property
    def queued(self) -> int:
        """Octets queued, not sent yet."""
        return self._out_size

    def _take(self) -> bytes | None:
        """Everything queued, as one bytes, and the queue emptied; None if nothing is."""
        out = self._out
        if not out:
            return None
        self._out = None
        self._out_size = 0
        if self.closed:  # a greenlet that outlived its session must not write into a reused descriptor
            raise OSError(errno.EBADF, "connection closed")
        return b"".join(out) if len(out) > 1 else out[0]

    def send_queued(self) -> bool:
        """Send what is queued without ever waiting (on the event loop): True if all of it
        left, False if the client is slow to read (the rest stays queued for `flush()`)."""
        data = self._take()
        if data is None:
            return True
        try:
            written = os.write(self.fd, data)
        except BlockingIOError:
            written = 0
        if written:
            self.sent += written
            if self.on_sent is not None:
                self.on_sent(written)
        if written < len(data):
            self._out = [data[written:]]
            self._out_size = len(data) - written
            return False
        return True

    def flush(self) -> None:
        """Send everything queued; waits (this greenlet only) while the client is slow."""
        data = self._take()
        if data is None:
            return
        # Usually the kernel takes it all at once: one write(2), no gevent machinery.
        try:
            written = os.write(self.fd, data)
        except BlockingIOError:
            written = 0
        if written < len(data):
            self.sock.sendall(memoryview(data)[written:])  # waits for room, honours the timeout
        self.sent += len(data)
        if self.on_sent is not None:
            self.on_sent(len(data))

    def set_timeout(self, seconds: float) -> None:
        """Bounds a blocked send: a client that stops reading cannot hold a greenlet forever.
        (Set at every burst: only a change reaches the socket.)"""
        sock = self.sock
        if sock.timeout != seconds:
            sock.settimeout(seconds)

    # -- parking -------------------------------------------------------------
    def park(self, waiter: Waiter, timeout: float) -> None:
        """Wait for the client on the event loop, holding no greenlet (see the module doc)."""
        if self._watcher is None:
            self._watcher = gevent.get_hub().loop.io(self.fd, 1)
        self._waiter = waiter
        self._watcher.start(self)  # the transport itself is the callback (see __call__)
        IdleClock.of_this_thread().add(self, timeout)

    def rearm(self, timeout: float) -> None:
        """Stay parked after the waiter answered on the event loop (`answer_parked`): the
        deadline moves to now + `timeout`, the watcher stays started (no epoll_ctl).

        The next read is a real read again: what a short read says (the client waits for
        answers) held for the burst just answered, not for the next wake. A deadline that
        only moves later (the common case) is just noted (`_due`), not relinked."""
        self.short_read = False
        due = self._due
        clock = IdleClock._current
        if due is not None and clock is not None and self._watcher.active and clock.loop is self._watcher.loop:
            head = clock.ring_for(timeout)
            if head.tick >= due.tick:
                self._due = head
                return
        clock = IdleClock.of_this_thread()
        if self._next_due is not None:
            clock.remove(self)
        watcher = self._watcher
        if watcher is None or not watcher.active:  # woken by a callback, not the watcher (TLS pending)
            if watcher is None:
                watcher = self._watcher = gevent.get_hub().loop.io(self.fd, 1)
            watcher.start(self)
        clock.add(self, timeout)

    def more_buffered(self) -> bool:
        """Input already taken off the socket but not read yet (TLS: decrypted bytes)."""
        return False

    @property
    def parked(self) -> bool:
        return self._waiter is not None

    def unpark(self) -> None:
        """Stop waiting; the waiter is not called after this."""
        if self._watcher is not None:
            self._watcher.stop()
        if self._next_due is not None:
            IdleClock.of_this_thread().remove(self)
        self._waiter = None

    def __call__(self) -> None:
        """Event-loop callback of the watcher: the client sent something (or closed).

        The waiter may answer right here and stay parked (`answer_parked`); otherwise the
        transport is unparked and the waiter told `on_ready()`. The transport itself is
        the callback, not a bound method: that would be one more object for every parked
        session."""
        waiter = self._waiter
        if waiter is None or waiter.answer_parked():
            return
        self.unpark()
        waiter.on_ready()

    def expire(self) -> None:
        """Called by the IdleClock (already unlinked): the park's timeout ran out."""
        waiter = self._waiter
        self.unpark()
        if waiter is not None:
            waiter.on_timeout()

    # -- end -----------------------------------------------------------------
    def close(self, last_words: bytes = b"") -> None:
        """Send `last_words` and anything queued (briefly, best effort), then close. Idempotent."""
        if self.closed:
            return
        self.unpark()
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        if last_words:
            self._out = [*(self._out or ()), last_words]
        if self._out:
            with contextlib.suppress(OSError):
                self.set_timeout(CLOSE_FLUSH_TIMEOUT)
                self.flush()
        self.closed = True
        self._out = None
        self._close_socket()

    def _close_socket(self) -> None:
        self.sock.close()



class _Tick:
    """The head of the ring of transports due at one tick of the IdleClock."""

    __slots__ = ("tick", "_prev_due", "_next_due")

    def __init__(self, tick: int) -> None:
        self.tick = tick
        self._prev_due: Transport | _Tick = self
        self._next_due: Transport | _Tick = self


class IdleClock:
    """The deadlines of every parked transport of a thread, kept by one event-loop timer.

    A parked transport needs a deadline (the idle timeout, or the time left to log in),
    but a libev timer per parked session is 120 bytes, and a new one at every park
    scatters long-lived objects among a burst's short-lived ones (Python's allocator
    then keeps the burst's memory). Here the deadline is rounded up to the next TICK and
    the transport is linked into the ring of that tick (two slots of the transport, no
    object per park); one repeating timer, running while any transport is parked,
    expires the rings whose tick has come. A deadline is thus met up to TICK late,
    never early. Waking (data) or unparking unlinks the transport; an emptied ring is
    dropped at once, so memory follows the parked transports, not the parks.
    """

    TICK = 0.25  # seconds

    _current: IdleClock | None = None

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self._rings: dict[int, _Tick] = {}
        self._next = 0  # the first tick whose ring is not expired yet
        self._timer: Any = None
        # ring_for's last answer: for `_ring_timeout` until monotonic time `_ring_until`
        self._ring: _Tick | None = None
        self._ring_timeout = 0.0
        self._ring_until = -math.inf

    @classmethod
    def of_this_thread(cls) -> IdleClock:
        loop = gevent.get_hub().loop
        clock = cls._current
        if clock is None or clock.loop is not loop:
            clock = cls._current = cls(loop)
        return clock

    def add(self, transport: Transport, timeout: float) -> None:
        """Link `transport` into the ring of now + `timeout`."""
        now = time.monotonic()
        if self._timer is None:
            self._next = int(now / self.TICK)
            self._timer = self.loop.timer(self.TICK, self.TICK)
            self._timer.start(self._expire_due)
        tick = max(math.ceil((now + timeout) / self.TICK), self._next)
        head = self._rings.get(tick)
        if head is None:
            head = self._rings[tick] = _Tick(tick)
        self._link(transport, head)

    @staticmethod
    def _link(transport: Transport, head: _Tick) -> None:
        last = head._prev_due
        transport._prev_due, transport._next_due = last, head
        last._next_due = head._prev_due = transport
        transport._due = head

    def ring_for(self, timeout: float) -> _Tick:
        """The head of the ring of now + `timeout` (not necessarily in `_rings` yet: relinking
        puts it there). Asked at every NOOP of every held session, so the answer is kept for
        as long as it stays right (until the deadline would round up to the next tick)."""
        now = time.monotonic()
        ring = self._ring
        if ring is not None and now <= self._ring_until and timeout == self._ring_timeout:
            return ring
        tick = max(math.ceil((now + timeout) / self.TICK), self._next)
        ring = self._rings.get(tick)
        if ring is None:
            ring = _Tick(tick)
        self._ring, self._ring_timeout, self._ring_until = ring, timeout, tick * self.TICK - timeout
        return ring

    def remove(self, transport: Transport) -> None:
        """Unlink `transport` (parked: linked); its ring goes once empty."""
        before, after = transport._prev_due, transport._next_due
        assert before is not None and after is not None
        before._next_due, after._prev_due = after, before
        transport._prev_due = transport._next_due = transport._due = None
        if before is after and isinstance(before, _Tick) and self._rings.get(before.tick) is before:
            del self._rings[before.tick]

    def _expire_due(self) -> None:
        """Expire the transports of every ring whose tick has come; stop when none is left."""
        now = int(time.monotonic() / self.TICK)
        rings = self._rings
        self._ring = None  # it may be a ring expired here
        while self._next <= now and rings:
            head = rings.pop(self._next, None)
            self._next += 1
            if head is None:
                continue
            due = []
            node = head._next_due
            while node is not head:
                assert isinstance(node, Transport)
                due.append(node)
                following = node._next_due
                assert following is not None
                node = following
            expired = []
            for transport in due:  # all unlinked first: an expire() may unpark another of them
                transport._prev_due = transport._next_due = None
                later = transport._due
                if later is not None and later.tick > head.tick:  # rearmed since linked: relink
                    self._link(transport, rings.setdefault(later.tick, later))
                else:
                    transport._due = None
                    expired.append(transport)
            for transport in expired:
                transport.expire()
        if not rings:
            self._timer.stop()
            self._timer.close()
            self._timer = None

class TlsTransport(Transport):
    """A Transport over the bare SSL object of a connection whose handshake is done
    (`geventpop3.net.tls.accept`): no `ssl.SSLSocket`, no gevent socket, so a held TLS
    session keeps only OpenSSL's state, the descriptor and this transport's own watcher
    and timer.

    The descriptor is non-blocking: a read of a record not yet complete is "nothing now"
    (SSLWantReadError), and the parking watcher wakes the session when more of it
    arrives; a read that would have to write (a TLS 1.3 key update with a full send
    buffer) is nothing now as well. Writes wait on the event loop for room, within the
    send timeout (`set_timeout`) for the whole flush, as a gevent socket's sendall does.
    """

    __slots__ = ("tls", "_send_timeout")

    def __init__(self, sock: tls.TlsSocket, connection: tls.Connection,
                 on_sent: Callable[[int], None] | None = None) -> None:
        super().__init__(sock, on_sent)
        self.tls = connection
        self._send_timeout: float | None = None

    @classmethod
    def accept(cls, plain: Transport, context: ssl.SSLContext,
               timeout: float = tls.HANDSHAKE_TIMEOUT) -> TlsTransport:
        """The TLS side of `plain` (STLS, or implicit TLS before the greeting): the plain
        side is retired first (the descriptor is the TLS side's from the handshake on),
        counters carry over. Raises tls.HandshakeFailed, the descriptor then closed."""
        plain.unpark()
        if plain._watcher is not None:
            plain._watcher.close()
            plain._watcher = None
        plain.closed = True
        sock, connection = tls.accept(cast(socket.socket, plain.sock), context, timeout)
        secure = cls(sock, connection, plain.on_sent)
        secure.sent = plain.sent
        return secure

    def read(self) -> bytes | None:
        try:
            data = self.tls.read(RECV_SIZE)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return None
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):  # closed, with or without close_notify: the end
            return b""
        return data

    def send_queued(self) -> bool:
        """As Transport.send_queued; when the SSL object cannot take it all now, the whole
        of it stays queued: OpenSSL wants a write it could not finish repeated with the same
        bytes, which `flush()` then does."""
        data = self._take()
        if data is None:
            return True
        try:
            written = self.tls.write(data)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            written = 0
        if written < len(data):
            self._out = [data[written:]]
            self._out_size = len(data) - written
        if written:
            self.sent += written
            if self.on_sent is not None:
                self.on_sent(written)
        return written == len(data)

    def more_buffered(self) -> bool:
        return bool(self.tls.pending())

    def flush(self) -> None:
        data = self._take()
        if data is None:
            return
        self._send(data)
        self.sent += len(data)
        if self.on_sent is not None:
            self.on_sent(len(data))

    def _send(self, data: bytes) -> None:
        """All of `data` through the SSL object; waits (this greenlet only) while the client is
        slow, socket.timeout once the send timeout has passed."""
        connection = self.tls
        view = memoryview(data)
        deadline = None if self._send_timeout is None else time.monotonic() + self._send_timeout
        while view:
            try:
                view = view[connection.write(view):]
                continue
            except ssl.SSLWantWriteError:
                wait = wait_write
            except ssl.SSLWantReadError:
                wait = wait_read
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError("timed out")
            wait(self.fd, left)
            if self.closed:  # closed by another greenlet meanwhile: the descriptor may be someone else's
                raise OSError(errno.EBADF, "connection closed")

    def set_timeout(self, seconds: float) -> None:
        """The send timeout; the descriptor itself stays non-blocking."""
        self._send_timeout = seconds

    def park(self, waiter: Waiter, timeout: float) -> None:
        """As Transport.park, but decrypted bytes still inside the SSL object wake the session at once."""
        if self.tls.pending():
            self._waiter = waiter
            gevent.get_hub().loop.run_callback(self)  # as if the watcher had fired; a no-op once unparked
            return
        super().park(waiter, timeout)

    def _close_socket(self) -> None:
        """Send close_notify first (without waiting for the client's): clients such as
        OpenSSL 3 take a TLS connection closed without it for a truncation attack."""
        with contextlib.suppress(OSError, ValueError):  # ssl.SSLError is an OSError; SSLWantReadError expected
            self.tls.shutdown()
        self.sock.close()
