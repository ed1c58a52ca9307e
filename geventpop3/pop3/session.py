"""One POP3 connection: socket <-> protocol core <-> Maildir.

Responses to a batch of pipelined commands are gathered and written with one
`sendall`; message content is streamed in chunks and flushed once the batch holds
more than `FLUSH_THRESHOLD` octets, so memory per session stays bounded.

Parking: a session waiting for its client holds no greenlet. When a read would
block, the session starts an I/O watcher and an idle timer on the event loop and
its greenlet ends; data (or the timer) spawns a fresh greenlet that carries on. A
greenlet blocked in recv() keeps its saved stack (about 6 KiB with gevent's frames),
so parking is what lets one process hold 10,000 idle sessions at a few KiB each.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import time
from typing import Any

import gevent
from gevent.pool import Pool
from gevent.server import StreamServer

from geventpop3 import maildir
from geventpop3.context import ServerContext
from geventpop3.lines import LineBuffer
from geventpop3.metrics import AccessEntry
from geventpop3.pop3.protocol import Login, Pop3Protocol, Retrieve, Update

log = logging.getLogger("geventpop3.pop3")

RECV_SIZE = 4096
FLUSH_THRESHOLD = 128 * 1024
TOO_MANY = b"-ERR [SYS/TEMP] too many connections\r\n"
_UNSAFE_LOG_CHARS = re.compile(r"[^A-Za-z0-9._@+-]")


def loggable(name: str | None) -> str:
    """A user name safe to put in a log line (no spaces, no control characters)."""
    if name is None:
        return "-"
    return _UNSAFE_LOG_CHARS.sub("?", name)[:64] or "?"


class Pop3Session:
    """Drives one `Pop3Protocol` over one socket."""

    __slots__ = (
        "ctx", "sock", "address", "port", "protocol", "mailbox", "sent", "received",
        "started", "ended", "_out", "_out_size", "deleted_count", "transform_failures",
        "service", "fd", "buffer", "_watcher", "_timer", "_done",
    )

    def __init__(self, service: Pop3Service, sock: socket.socket, address: tuple[Any, ...]) -> None:
        ctx = service.ctx
        self.service = service
        self.ctx = ctx
        self.sock = sock
        self.fd = sock.fileno()
        self.buffer = LineBuffer()
        self._watcher: Any = None
        self._timer: Any = None
        self._done = False
        host = str(address[0])
        # Dual-stack listeners see IPv4 clients as ::ffff:a.b.c.d; log them as a.b.c.d.
        self.address = host[7:] if host.startswith("::ffff:") and "." in host else host
        self.port = int(address[1])
        self.protocol = Pop3Protocol(ctx.settings.max_login_failures)
        self.mailbox: maildir.Mailbox | None = None  # set while logged in: the lock is held
        self.sent = 0
        self.received = 0
        self.started = time.time()
        self.ended = "disconnect"
        self._out: list[bytes] = []
        self._out_size = 0
        self.deleted_count = 0
        self.transform_failures = 0

    # -- output --------------------------------------------------------------
    def _queue(self, data: bytes) -> None:
        self._out.append(data)
        self._out_size += len(data)
        if self._out_size >= FLUSH_THRESHOLD:
            self._flush()

    def _flush(self) -> None:
        if not self._out:
            return
        data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out.clear()
        self._out_size = 0
        # Usually the kernel takes it all at once: one write(2), no gevent machinery.
        try:
            written = os.write(self.fd, data)
        except BlockingIOError:
            written = 0
        if written < len(data):
            self.sock.sendall(memoryview(data)[written:])  # waits for room, honours the timeout
        self.sent += len(data)
        self.ctx.metrics.bytes_sent += len(data)

    # -- main loop -----------------------------------------------------------
    def greet(self) -> None:
        self._queue(self.protocol.greeting())
        self.serve()

    def serve(self) -> None:
        """Answer what the client sent; park when it goes quiet, end when it is over."""
        if self._done:
            return
        try:
            self.sock.settimeout(self.ctx.settings.idle_timeout)  # bounds a stalled send
            self._flush()
            over = self._pump()
        except gevent.GreenletExit:
            self.ended, over = "shutdown", True
        except OSError:
            self.ended, over = "disconnect", True  # reset by peer, broken pipe: nothing to answer
        except Exception:  # never let one session take the server down
            self.ended, over = "error", True
            log.exception("pop3 session error: rip=%s", self.address)
        if over:
            self.close()
        else:
            self._park()

    def _pump(self) -> bool:
        """Read and answer until the client has nothing more for now (False: park)
        or the session is over (True)."""
        protocol = self.protocol
        metrics = self.ctx.metrics
        while not protocol.closing:
            try:
                data = os.read(self.fd, RECV_SIZE)
            except BlockingIOError:
                return False
            if not data:
                return True
            self.received += len(data)
            metrics.bytes_received += len(data)
            for line in self.buffer.feed(data):
                self._dispatch(protocol.handle(line))
                if protocol.closing:
                    break
            self._flush()
            if len(data) < RECV_SIZE and not protocol.closing:
                # A short read took all the client had sent; it is now waiting for
                # these answers. Park without a read that would only say EAGAIN.
                return False
        if self.ended == "disconnect":
            self.ended = "closed"
        return True

    def _park(self) -> None:
        loop = gevent.get_hub().loop
        if self._watcher is None:
            self._watcher = loop.io(self.fd, 1)
        self._watcher.start(self._wake)
        self._timer = loop.timer(self.ctx.settings.idle_timeout)
        self._timer.start(self._idle)
        self.service.parked.add(self)

    def _unpark(self) -> None:
        self.service.parked.discard(self)
        if self._watcher is not None:
            self._watcher.stop()
        if self._timer is not None:
            self._timer.stop()
            self._timer.close()
            self._timer = None

    def _wake(self) -> None:
        """Event-loop callback: the client sent something (or closed)."""
        self._unpark()
        self.service.pool.spawn(self.serve)

    def _idle(self) -> None:
        """Event-loop callback: the client was silent for idle_timeout seconds."""
        self._unpark()
        self.ended = "timeout"
        self._queue(b"-ERR Idle timeout, closing connection\r\n")
        self.service.pool.spawn(self.close)

    def close(self) -> None:
        """End the session once, however it ended: lock, logs, counters, socket."""
        if self._done:
            return
        self._done = True
        self.service.sessions.discard(self)
        self._unpark()
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        try:
            if self.ended in ("timeout", "shutdown"):
                with contextlib.suppress(OSError):
                    self.sock.settimeout(1.0)
                    self._flush()
        finally:
            self.finish()
            self.ctx.metrics.connection_closed()
            self.sock.close()

    def _dispatch(self, action: object) -> None:
        if type(action) is bytes:
            self._queue(action)
        elif isinstance(action, Retrieve):
            self._retrieve(action)
        elif isinstance(action, Login):
            self._queue(self._login(action))
        elif isinstance(action, Update):
            self._queue(self._update(action))

    # -- actions -------------------------------------------------------------
    def _login(self, action: Login) -> bytes:
        ctx = self.ctx
        user = action.user
        if not ctx.users.verify(user, action.password):
            return self._login_failed(user, "auth")
        try:
            mailbox = maildir.Mailbox(ctx.settings.maildir, user)
            mailbox.open()  # creates the Maildir at a user's first login
            if not mailbox.lock():
                return self._login_failed(user, "in-use", delay=False)
        except (OSError, maildir.MaildirError) as exc:
            log.error("pop3 mailbox error: user=%s error=%s", loggable(user), exc)
            return self._login_failed(user, "temp", delay=False)
        try:
            messages = mailbox.snapshot()
            if ctx.filters is not None:
                messages = ctx.filters.prepare(messages, user=user, address=self.address, port=self.port)
                self.transform_failures = sum(1 for m in messages if m.error is not None)
        except Exception as exc:
            mailbox.release()
            log.error("pop3 mailbox scan failed: user=%s error=%s", loggable(user), exc)
            return self._login_failed(user, "temp", delay=False)
        self.mailbox = mailbox
        ctx.logged_in[user] = ctx.logged_in.get(user, 0) + 1
        ctx.metrics.logins_ok += 1
        log.info("pop3 login: user=%s rip=%s rport=%d messages=%d", loggable(user), self.address, self.port,
                 len(messages))
        self._record("login", user)
        return self.protocol.login_succeeded(user, messages)

    def _login_failed(self, user: str, reason: str, delay: bool = True) -> bytes:
        self.ctx.metrics.logins_failed += 1
        log.warning("pop3 login failed: user=%s rip=%s rport=%d reason=%s", loggable(user), self.address,
                    self.port, reason)
        self._record("login-failed", user, detail=f"reason={reason}")
        if delay:
            # The answer is sent only after the delay: slows password guessing.
            self._flush()
            gevent.sleep(self.ctx.settings.login_failure_delay)
        return self.protocol.login_failed(reason)

    def _retrieve(self, action: Retrieve) -> None:
        try:
            handle = open(action.message.path, "rb")  # noqa: SIM115 - closed below
        except OSError:
            self._queue(self.protocol.retrieve_failed())
            return
        with handle:
            self._queue(action.header)
            # Past the +OK line a read error can only end the connection (OSError).
            for chunk in maildir.message_chunks(handle, action.body_lines):
                self._queue(chunk)
        self._queue(b".\r\n")
        if action.body_lines is None:
            self.ctx.metrics.messages_retrieved += 1

    def _update(self, action: Update) -> bytes:
        self.ended = "quit"
        deleted = action.deleted
        if not deleted:
            self._release_mailbox()
            return self.protocol.update_done(0)
        assert self.mailbox is not None
        failed = self.mailbox.delete(deleted)
        self.deleted_count = len(deleted) - len(failed)
        self.ctx.metrics.messages_deleted += self.deleted_count
        if failed:
            log.error("pop3 update: user=%s could not delete %d messages", loggable(self.protocol.user), len(failed))
        self._release_mailbox()  # before the answer: a client may reconnect the moment it reads it
        return self.protocol.update_done(len(failed))

    # -- end -----------------------------------------------------------------
    def _release_mailbox(self) -> None:
        if self.mailbox is None:
            return
        self.mailbox.release()
        self.mailbox = None
        user = self.protocol.user or ""
        count = self.ctx.logged_in.get(user, 0) - 1
        if count > 0:
            self.ctx.logged_in[user] = count
        else:
            self.ctx.logged_in.pop(user, None)

    def finish(self) -> None:
        """Release the lock and log the logout, however the session ended."""
        self._release_mailbox()
        user = self.protocol.user
        if user is None:
            return
        log.info("pop3 logout: user=%s rip=%s rport=%d retr=%d dele=%d top=%d bytes=%d ended=%s",
                 loggable(user), self.address, self.port, self.protocol.retrieved, self.deleted_count,
                 self.protocol.tops, self.sent, self.ended)
        detail = f"filter_failures={self.transform_failures}" if self.transform_failures else ""
        self._record("logout", user, detail=detail)

    def _record(self, event: str, user: str, detail: str = "") -> None:
        self.ctx.access_log.record(AccessEntry(
            time=time.time(), user=loggable(user), address=self.address, port=self.port, event=event,
            retr=self.protocol.retrieved, dele=self.deleted_count, top=self.protocol.tops, bytes=self.sent,
            duration=time.time() - self.started, ended=self.ended if event == "logout" else "", detail=detail,
        ))


class Pop3Service:
    """All POP3 sessions of one process: the StreamServer handler and shutdown."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.pool = Pool()  # greenlets of sessions that are doing something
        self.parked: set[Pop3Session] = set()  # sessions waiting for their client
        self.sessions: set[Pop3Session] = set()  # every session not yet closed

    def handle(self, sock: socket.socket, address: tuple[Any, ...]) -> None:
        """StreamServer handler: enforce the connection limit, then greet and serve."""
        metrics = self.ctx.metrics
        if metrics.current_connections >= self.ctx.settings.max_connections:
            metrics.total_connections += 1  # accepted, then refused: still a connection
            with contextlib.suppress(OSError):
                sock.sendall(TOO_MANY)
            sock.close()
            return
        metrics.connection_opened()
        # Answers are already batched per read; Nagle would only hold the next batch
        # back until the client's delayed ACK (40 ms per pipelined write).
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = Pop3Session(self, sock, address)
        self.sessions.add(session)
        session.greet()

    def __len__(self) -> int:
        return len(self.pool) + len(self.parked)

    def shutdown(self, timeout: float) -> None:
        """End every session without UPDATE: busy ones are killed, parked ones closed."""
        for session in list(self.parked):
            session.ended = "shutdown"
            session.close()
        self.pool.kill(block=True, timeout=timeout)
        if not self.pool:
            # Woken (data or idle timer) but killed before their greenlet started:
            # nothing else would close them.
            for session in list(self.sessions):
                session.ended = "shutdown"
                session.close()


class Pop3Server(StreamServer):
    """A StreamServer whose sessions close their own sockets: a parked session
    outlives the greenlet that accepted it."""

    def do_close(self, *args: Any) -> None:
        pass
