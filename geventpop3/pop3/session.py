"""One POP3 session: transport <-> protocol core <-> Maildir, blocking style per burst.

`serve()` is the handler for one burst of client input: read what the client sent,
feed each line to the protocol core, carry out the actions it asks for (login,
retrieve, update) and write the answers, then park until the client speaks again.
The socket side, write batching and parking live in `geventpop3.transport`; the
rules of POP3 in `geventpop3.pop3.protocol`. The service keeps the one registry of
open sessions and ends them all at shutdown.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import time
from typing import Any, cast

import gevent
from gevent.server import StreamServer

from geventpop3 import maildir
from geventpop3.context import ServerContext
from geventpop3.lines import Delayed, LineBuffer
from geventpop3.metrics import AccessEntry
from geventpop3.pop3.protocol import Login, Pop3Protocol, Retrieve, Update
from geventpop3.transport import Transport

log = logging.getLogger(__name__)

TOO_MANY = b"-ERR [SYS/TEMP] too many connections\r\n"
IDLE_TIMEOUT = b"-ERR Idle timeout, closing connection\r\n"
_UNSAFE_LOG_CHARS = re.compile(r"[^A-Za-z0-9._@+-]")


def loggable(name: str | None) -> str:
    """A user name safe to put in a log line (no spaces, no control characters)."""
    if name is None:
        return "-"
    return _UNSAFE_LOG_CHARS.sub("?", name)[:64] or "?"


class Pop3Session:
    """Drives one `Pop3Protocol` over one `Transport`."""

    __slots__ = (
        "ctx", "service", "transport", "buffer", "address", "port", "protocol", "mailbox",
        "started", "ended", "deleted_count", "transform_failures", "greenlet", "_done",
    )

    def __init__(self, service: Pop3Service, sock: socket.socket, address: tuple[Any, ...]) -> None:
        ctx = service.ctx
        self.service = service
        self.ctx = ctx
        self.transport = Transport(sock, on_sent=service.count_sent)
        self.buffer = LineBuffer()
        host = str(address[0])
        # Dual-stack listeners see IPv4 clients as ::ffff:a.b.c.d; log them as a.b.c.d.
        self.address = host[7:] if host.startswith("::ffff:") and "." in host else host
        self.port = int(address[1])
        settings = ctx.settings
        self.protocol = Pop3Protocol(settings.max_login_failures, settings.login_failure_delay)
        self.mailbox: maildir.Mailbox | None = None  # set while logged in: the lock is held
        self.started = time.time()
        self.ended = "disconnect"
        self.deleted_count = 0
        self.transform_failures = 0
        self.greenlet: gevent.Greenlet | None = None  # None while parked: no greenlet waits for the client
        self._done = False

    # -- one burst ------------------------------------------------------------
    def start(self) -> None:
        """Greet, then serve the first burst (in the greenlet that accepted the connection)."""
        self.transport.write(self.protocol.greeting())
        self.serve()

    def serve(self) -> None:
        """Answer what the client sent; park when it goes quiet, end when it is over."""
        if self._done:
            return
        try:
            self.transport.set_timeout(self.ctx.settings.idle_timeout)  # bounds a stalled send
            self.transport.flush()
            over = self._answer_burst()
        except gevent.GreenletExit:
            self.ended, over = "shutdown", True
        except OSError:
            self.ended, over = "disconnect", True  # reset by peer, broken pipe: nothing to answer
        except Exception:  # never let one session take the server down
            self.ended, over = "error", True
            log.exception("pop3 session error: rip=%s", self.address)
        self.greenlet = None
        if over:
            self.close()
        else:
            self.transport.park(self._on_ready, self._on_idle, self.ctx.settings.idle_timeout)

    def _answer_burst(self) -> bool:
        """Read and answer until the client has nothing more for now (False: park)
        or the session is over (True)."""
        protocol = self.protocol
        transport = self.transport
        metrics = self.ctx.metrics
        while not protocol.closing:
            data = transport.read()
            if data is None:
                return False
            if not data:
                return True
            metrics.bytes_received += len(data)
            for line in self.buffer.feed(data):
                self._dispatch(protocol.handle(line))
                if protocol.closing:
                    break
            transport.flush()
        if self.ended == "disconnect":
            self.ended = "closed"
        return True

    def _on_ready(self) -> None:
        """Event-loop callback: the client sent something (or closed)."""
        self.greenlet = gevent.spawn(self.serve)

    def _on_idle(self) -> None:
        """Event-loop callback: the client was silent for idle_timeout seconds."""
        self.ended = "timeout"
        self.greenlet = gevent.spawn(self.close, IDLE_TIMEOUT)

    def close(self, last_words: bytes = b"") -> None:
        """End the session once, however it ended: lock, logs, counters, socket."""
        if self._done:
            return
        self._done = True
        self.service.sessions.discard(self)
        try:
            self.finish()
        finally:
            self.ctx.metrics.connection_closed()
            self.transport.close(last_words)

    def _dispatch(self, action: object) -> None:
        if type(action) is bytes:
            self.transport.write(action)
        elif isinstance(action, Retrieve):
            self._retrieve(action)
        elif isinstance(action, Login):
            self._dispatch(self._login(action))
        elif isinstance(action, Update):
            self.transport.write(self._update(action))
        elif isinstance(action, Delayed):
            # A failed login: its answer leaves only after the delay (slows guessing).
            self.transport.flush()
            gevent.sleep(action.seconds)
            self.transport.write(action.data)

    # -- actions -------------------------------------------------------------
    def _login(self, action: Login) -> bytes | Delayed:
        ctx = self.ctx
        user = action.user
        if not ctx.users.verify(user, action.password):
            return self._login_failed(user, "auth")
        try:
            mailbox = maildir.Mailbox(ctx.settings.maildir, user)
            mailbox.open()  # creates the Maildir at a user's first login
            if not mailbox.lock():
                return self._login_failed(user, "in-use")
        except (OSError, maildir.MaildirError) as exc:
            log.error("pop3 mailbox error: user=%s error=%s", loggable(user), exc)
            return self._login_failed(user, "temp")
        try:
            messages = mailbox.snapshot()
            if ctx.filters is not None:
                messages = ctx.filters.prepare(messages, user=user, address=self.address, port=self.port)
                self.transform_failures = sum(1 for m in messages if m.error is not None)
        except Exception as exc:
            mailbox.release()
            log.error("pop3 mailbox scan failed: user=%s error=%s", loggable(user), exc)
            return self._login_failed(user, "temp")
        self.mailbox = mailbox
        ctx.logged_in[user] = ctx.logged_in.get(user, 0) + 1
        ctx.metrics.logins_ok += 1
        log.info("pop3 login: user=%s rip=%s rport=%d messages=%d", loggable(user), self.address, self.port,
                 len(messages))
        self._record("login", user)
        return self.protocol.login_succeeded(user, messages)

    def _login_failed(self, user: str, reason: str) -> bytes | Delayed:
        self.ctx.metrics.logins_failed += 1
        log.warning("pop3 login failed: user=%s rip=%s rport=%d reason=%s", loggable(user), self.address,
                    self.port, reason)
        self._record("login-failed", user, detail=f"reason={reason}")
        return self.protocol.login_failed(reason)

    def _retrieve(self, action: Retrieve) -> None:
        try:
            handle = maildir.open_message(action.message)  # only the regular file the snapshot saw
        except OSError:
            self.transport.write(self.protocol.retrieve_failed())
            return
        write = self.transport.write
        with handle:
            write(action.header)
            # Past the +OK line a read error can only end the connection (OSError).
            for chunk in maildir.message_chunks(handle, action.body_lines):
                write(chunk)
        write(b".\r\n")
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
                 self.protocol.tops, self.transport.sent, self.ended)
        detail = f"filter_failures={self.transform_failures}" if self.transform_failures else ""
        self._record("logout", user, detail=detail)

    def _record(self, event: str, user: str, detail: str = "") -> None:
        self.ctx.access_log.record(AccessEntry(
            time=time.time(), user=loggable(user), address=self.address, port=self.port, event=event,
            retr=self.protocol.retrieved, dele=self.deleted_count, top=self.protocol.tops, bytes=self.transport.sent,
            duration=time.time() - self.started, ended=self.ended if event == "logout" else "", detail=detail,
        ))


class Pop3Service:
    """All POP3 sessions of one process: the StreamServer handler, the one registry of
    open sessions, and shutdown."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.sessions: set[Pop3Session] = set()  # every session not yet closed, busy or parked
        self.count_sent = self._count_sent  # one bound method shared by every transport

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
        session = Pop3Session(self, sock, address)
        self.sessions.add(session)
        session.greenlet = cast(gevent.Greenlet, gevent.getcurrent())  # the server spawned a Greenlet for us
        session.start()

    def _count_sent(self, octets: int) -> None:
        self.ctx.metrics.bytes_sent += octets

    def __len__(self) -> int:
        return len(self.sessions)

    def shutdown(self, timeout: float) -> None:
        """End every session without UPDATE, each with its logout logged.

        Parked sessions are closed at once; busy ones are killed (their greenlet ends
        the session). Whatever is still open after `timeout` (a greenlet that did not
        die in time, or one woken but killed before it started) is closed here, so
        every logout is recorded before the state is flushed.
        """
        busy = []
        for session in list(self.sessions):
            session.ended = "shutdown"
            if session.greenlet is None:
                session.close()
            else:
                busy.append(session.greenlet)
        gevent.killall(busy, block=False)
        gevent.joinall(busy, timeout=timeout)
        for session in list(self.sessions):
            session.ended = "shutdown"
            session.close()


class Pop3Server(StreamServer):
    """A StreamServer whose sessions close their own sockets: a parked session
    outlives the greenlet that accepted it."""

    def do_close(self, *args: Any) -> None:
        pass
