"""One POP3 session: transport <-> connection core <-> Maildir, blocking style per burst.

The rules of POP3 and its framing live in `geventpop3.core.pop3.connection`: the session
feeds it what the client sent and carries out the events it returns, all in one place,
`_step()`, called from both places a session runs:

- a runner greenlet (`serve`, geventpop3.net.runners) serves a burst of client input:
  read, step, write, until the client goes quiet; then the session parks.
- parked (no greenlet, an event-loop watcher, geventpop3.net.transport), a logged-in
  session's input is stepped right in the watcher's callback (`answer_parked`): `bytes`
  answers are written there, on the hub, and the first action (RETR, QUIT, ...) goes to a
  runner, with the lines not answered yet still in the connection. The core's contract
  (every bytes answer is computed without I/O or yielding) is what makes that safe.

A login is one call, `LoginPipeline.open` (geventpop3.service.pop3.login). TLS (implicit on
the POP3S port, or after STLS) is one step here, `_start_tls`: handshake, then the
transport is swapped for a `TlsTransport` and the protocol starts AUTHORIZATION again. The
service keeps the one registry of open sessions, the per-address counts behind the
connection limits, and ends every session at shutdown.

Limits against slow and many connections (see docs/configuration.md):
- `login_timeout`: from connect to a successful login. It needs no timer of its own:
  a session that is not logged in parks for min(idle timeout, time left to log in),
  and the park's one deadline says which of the two ran out. A client trickling one
  byte at a time is also checked at every read.
- `max_connections` and `max_connections_per_ip`: open connections of the whole server,
  and per source (IPv4 address, IPv6 /64), counted by `ctx.accounting` (with workers:
  the supervisor's, asked at connect and told at the end).
- `max_sessions_per_user_ip`: logins of one user from one source in flight (password
  check, lock, scan, first filter run; counted by `ctx.accounting` for the LoginPipeline). Logged-in sessions
  are not counted here: the mailbox lock already allows one per user, and keeping a count
  per logged-in session would cost every held session memory.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, assert_never, cast

import gevent
from gevent.server import StreamServer

from geventpop3.core.accounting import MAX_CONNECTIONS_PER_IP
from geventpop3.core.lines import Delayed
from geventpop3.core.message import Message
from geventpop3.core.metrics import AccessEntry
from geventpop3.core.peer import Peer, client_host
from geventpop3.core.peer import source_key as source_key  # where the limits' tests look for it
from geventpop3.core.pop3.connection import Close, NeedData, Pop3Connection
from geventpop3.core.pop3.protocol import (
    DELAYED_FAILURES,
    LISTING_CHUNK,
    LISTING_INLINE,
    STLS_OK,
    Action,
    Listing,
    Login,
    Pop3Protocol,
    Refused,
    Retrieve,
    StartTls,
    State,
    Update,
)
from geventpop3.core.pop3.security import ConnectionSecurity, parse_address
from geventpop3.core.proxy_protocol import ProxyError, ProxyHeader
from geventpop3.mail import maildir
from geventpop3.net import proxied, tls
from geventpop3.net.runners import Runners
from geventpop3.net.transport import FLUSH_THRESHOLD, TlsTransport, Transport
from geventpop3.service.context import ServerContext
from geventpop3.service.pop3.login import Failed, LoginPipeline, Opened, loggable

log = logging.getLogger(__name__)

TOO_MANY = b"-ERR [SYS/TEMP] too many connections\r\n"
TOO_MANY_FROM_SOURCE = b"-ERR [SYS/TEMP] Too many connections from your address, try again later\r\n"
IDLE_TIMEOUT = b"-ERR Idle timeout, closing connection\r\n"
LOGIN_TIMEOUT = b"-ERR Login timeout, closing connection\r\n"
HEALTH_OK = b"+OK geventpop3 ready\r\n"  # to a load balancer's health check (PROXY LOCAL)
TIMER_SLACK = 0.05  # seconds: a login deadline this close counts as reached


def _server_address(sock: socket.socket) -> str:
    """The server's address on this connection (a client on it counts as local)."""
    try:
        return str(sock.getsockname()[0])
    except OSError:
        return ""


class Pop3Session:
    """Drives one `Pop3Connection` over one `Transport`."""

    __slots__ = (
        "service", "ctx", "transport", "peer", "connection", "mailbox", "started", "ended", "greenlet", "_done",
    )

    def __init__(self, service: Pop3Service, sock: socket.socket, peer: Peer, server: str) -> None:
        """`server`: the address the client reached (behind a proxy, the proxy's)."""
        self.service = service
        self.ctx = ctx = service.ctx
        self.transport = Transport(sock, on_sent=service.count_sent)
        self.peer = peer
        settings = ctx.settings
        security = ConnectionSecurity(settings, peer.address, server, tls=peer.secure,
                                      tls_available=ctx.tls is not None)
        self.connection = Pop3Connection(
            Pop3Protocol(settings.max_login_failures, settings.login_failure_delay, security))
        self.mailbox: maildir.Mailbox | None = None  # set while logged in: the lock is held
        self.started = time.monotonic()  # also the start of the login deadline
        self.ended = "disconnect"
        self.greenlet: gevent.Greenlet[..., None] | None = None  # None while parked: no greenlet waits for the client
        self._done = False

    # -- the one driver --------------------------------------------------------
    def _step(self, on_hub: bool) -> NeedData | Close | Action | None:
        """Answer the lines the connection holds, in order, until it needs data or is over
        (that event is returned).

        In a runner (`on_hub` False) every action is carried out here, waiting as it must.
        On the hub (`answer_parked`) answers are only queued, never waited for: the first
        action is returned undone, and None once more than FLUSH_THRESHOLD is queued; a
        runner goes on from there, the lines after it still in the connection."""
        connection = self.connection
        transport = self.transport
        while True:
            event = connection.next_event()
            match event:
                case bytes():
                    if not on_hub:
                        transport.write(event)
                        continue
                    if transport.queue(event) >= FLUSH_THRESHOLD:
                        return None
                case NeedData() | Close():
                    return event
                case Retrieve() | Update() | Login() | Refused() | StartTls() | Listing():  # the most frequent first
                    if on_hub:
                        return event
                    self._act(event)
                    transport = self.transport  # a new one after STLS
                case _:
                    assert_never(event)

    def _act(self, action: Action) -> None:
        """Carry out what the core asked for (in a runner: this may wait), then answer."""
        match action:
            case Retrieve():
                self._retrieve(action)
            case Update():
                self.transport.write(self._update(action))
            case Login():
                self._answer(self._login(action))
            case Refused():
                self._answer(self._login_failed(action.user, "insecure", action.mech))
            case StartTls():
                self._stls()
            case Listing():
                self._send_listing(action)
            case _:
                assert_never(action)

    def _answer(self, answer: bytes | Delayed) -> None:
        if isinstance(answer, Delayed):
            # A failed login: its answer leaves only after the delay (slows guessing).
            self.transport.flush()
            gevent.sleep(answer.seconds)
            answer = answer.data
        self.transport.write(answer)

    # -- in a runner -------------------------------------------------------------
    def start(self, implicit_tls: bool = False) -> None:
        """Greet, then serve the first burst (in the greenlet that accepted the connection);
        with `implicit_tls` (POP3S) the handshake comes before the greeting."""
        if implicit_tls:
            try:
                started = self._start_tls()
            except gevent.GreenletExit:
                self.ended, started = "shutdown", False
            if not started:
                self.close()
                return
        self.transport.write(self.connection.protocol.greeting())
        self.serve()

    def serve(self, action: Action | None = None) -> None:
        """Answer what the client sent; park when it goes quiet, end when it is over.
        `action`: what `answer_parked` took in but left to a runner."""
        if self._done:
            return
        try:
            self.transport.set_timeout(self.ctx.settings.idle_timeout)  # bounds a stalled send
            self.transport.flush()
            if action is not None:
                self._act(action)
            over = self._answer_burst()
        except gevent.GreenletExit:
            self.ended, over = "shutdown", True
        except OSError:
            self.ended, over = "disconnect", True  # reset by peer, broken pipe: nothing to answer
        except Exception:  # never let one session take the server down
            self.ended, over = "error", True
            log.exception("pop3 session error: rip=%s", self.peer.address)
        self.greenlet = None
        if over:
            self.close(LOGIN_TIMEOUT if self.ended == "login-timeout" else b"")
        else:
            self._park()

    def _answer_burst(self) -> bool:
        """Step, read and answer until the client has nothing more for now (False: park)
        or the session is over (True)."""
        connection = self.connection
        metrics = self.ctx.metrics
        while True:
            over = isinstance(self._step(on_hub=False), Close)
            transport = self.transport  # a new one after STLS
            transport.flush()
            if over:
                if self.ended == "disconnect":
                    self.ended = "closed"
                return True
            if connection.protocol.user is None and self._login_time_left() <= 0:  # a client that never stops sending
                self._count_login_timeout()
                return True
            data = transport.read()
            if data is None:
                return False
            if not data:
                return True
            metrics.bytes_received += len(data)
            connection.receive_data(data)

    def _park(self) -> None:
        """Wait for the client holding no greenlet; one deadline covers both the idle timeout
        and, before login, the login deadline (whichever comes first decides its callback)."""
        timeout = self.ctx.settings.idle_timeout
        if self.connection.protocol.user is None:
            left = self._login_time_left()
            if left <= 0:
                self._on_login_timeout()
                return
            timeout = min(timeout, left)
        self.transport.park(self, timeout)

    def _login_time_left(self) -> float:
        return float(self.started + self.ctx.settings.login_timeout - time.monotonic())

    # -- parked: event-loop callbacks ------------------------------------------
    def answer_parked(self) -> bool:
        """Event-loop callback, still parked: the client sent something (or closed).

        A logged-in session's commands that need nothing but their answer (NOOP, STAT,
        LIST, UIDL, DELE, RSET, CAPA, errors) are answered right here by `_step`, and the
        session stays parked: no greenlet, no watcher stop and start. One read per wake:
        more input wakes the watcher again at the loop's next turn, after the other
        sessions ready now. Whatever needs to wait (RETR/TOP, QUIT, the client's close, a
        LIST/UIDL of more than LISTING_INLINE messages,
        answers the client is slow to read, over FLUSH_THRESHOLD queued) goes on in a
        runner (`serve`), the lines not answered yet still in the connection. False
        before login: `on_ready` then."""
        connection = self.connection
        if connection.protocol.state is not State.TRANSACTION or self._done:
            return False
        ctx = self.ctx
        transport = self.transport
        try:
            data = transport.read()
            if data is None:  # nothing complete (a TLS record in pieces)
                transport.rearm(ctx.settings.idle_timeout)
                return True
            if not data:
                return self._carry_on(None, close=True)
            ctx.metrics.bytes_received += len(data)
            connection.receive_data(data)
            match self._step(on_hub=True):
                case NeedData():
                    if not transport.send_queued() or transport.more_buffered():
                        return self._carry_on(None)
                    transport.rearm(ctx.settings.idle_timeout)
                case Close() | None:
                    return self._carry_on(None)
                case action:
                    return self._carry_on(action)
        except OSError:
            self.ended = "disconnect"  # reset by peer: nothing to answer
            return self._carry_on(None, close=True)
        except Exception:  # never let one session take the server down
            self.ended = "error"
            log.exception("pop3 session error: rip=%s", self.peer.address)
            return self._carry_on(None, close=True)
        return True

    def _carry_on(self, action: Action | None, close: bool = False) -> bool:
        """What `answer_parked` cannot finish on the event loop goes on in a greenlet."""
        self.transport.unpark()
        if close:
            self.greenlet = gevent.spawn(self.close)
        elif action is None:
            self.greenlet = self.service.runners.spawn(self.serve)
        else:
            self.greenlet = self.service.runners.spawn(self.serve, action)
        return True

    def on_ready(self) -> None:
        """Event-loop callback: the client sent something (or closed)."""
        self.greenlet = self.service.runners.spawn(self.serve)

    def on_timeout(self) -> None:
        """Event-loop callback: the park's one deadline passed. Before login it was set to
        min(idle timeout, time left to log in); which of the two it was, the clock says
        (a small slack, so that a deadline met to the tick counts)."""
        if self.connection.protocol.user is None and self._login_time_left() <= TIMER_SLACK:
            self._on_login_timeout()
            return
        self.ended = "timeout"
        self.greenlet = gevent.spawn(self.close, IDLE_TIMEOUT)

    def _on_login_timeout(self) -> None:
        """login_timeout passed without a login (from the park's deadline or from `_park`)."""
        self._count_login_timeout()
        self.greenlet = gevent.spawn(self.close, LOGIN_TIMEOUT)

    def _count_login_timeout(self) -> None:
        self.ended = "login-timeout"
        self.ctx.metrics.login_timeouts += 1
        log.info("pop3 login timeout: rip=%s rport=%d", self.peer.address, self.peer.port)

    def close(self, last_words: bytes = b"") -> None:
        """End the session once, however it ended: lock, logs, counters, socket."""
        if self._done:
            return
        self._done = True
        self.service.forget(self)
        try:
            self.finish()
        finally:
            self.ctx.metrics.connection_closed()
            self.transport.close(last_words)

    # -- TLS -----------------------------------------------------------------
    def _stls(self) -> None:
        """STLS accepted: nothing the client sent after it is ever executed.

        The connection has dropped the lines it held (geventpop3.core.pop3.connection);
        unread input is discarded before the +OK leaves (a client must wait for it
        before its ClientHello); bytes that arrive later were sent before the
        ClientHello too and break the handshake, which closes the connection.
        """
        transport = self.transport
        transport.discard_input()
        transport.write(STLS_OK)
        transport.flush()
        if not self._start_tls():
            self.connection.protocol.closing = True  # nothing more is said in plaintext

    def _start_tls(self) -> bool:
        """The server side of the handshake under its deadline; False (logged) if it failed."""
        server_tls = self.ctx.tls
        assert server_tls is not None
        try:
            self.transport = TlsTransport.accept(self.transport, server_tls.context, tls.HANDSHAKE_TIMEOUT)
        except tls.HandshakeFailed as exc:
            self.ended = "tls-failed"
            log.info("pop3 tls handshake failed: rip=%s rport=%d error=%s", self.peer.address, self.peer.port, exc)
            return False
        self.connection.protocol.tls_started()
        return True

    def _tls_description(self) -> str:
        transport = self.transport
        if not isinstance(transport, TlsTransport) and self.peer.secure:
            return "proxy"  # TLS ended at the load balancer (PROXY v2 SSL TLV)
        return tls.describe(transport.tls if isinstance(transport, TlsTransport) else None)

    # -- actions -------------------------------------------------------------
    def _login(self, action: Login) -> bytes | Delayed:
        """The LoginPipeline, then the outcome counted, logged and answered."""
        outcome = self.service.login.open(action, self.peer, self.transport.peer_gone)
        match outcome:
            case Failed(reason):
                return self._login_failed(action.user, reason, action.mech)
            case Opened(mailbox, messages):
                pass
            case _:
                assert_never(outcome)
        ctx = self.ctx
        user = action.user
        self.mailbox = mailbox
        ctx.logged_in[user] = ctx.logged_in.get(user, 0) + 1
        ctx.metrics.logins_ok += 1
        log.info("pop3 login: user=%s rip=%s rport=%d mech=%s tls=%s messages=%d", loggable(user),
                 self.peer.address, self.peer.port, action.mech, self._tls_description(), len(messages))
        self._record("login", user)
        return self.connection.protocol.login_succeeded(user, messages)

    def _login_failed(self, user: str | None, reason: str, mech: str = "user") -> bytes | Delayed:
        """Every failed login, USER/PASS or AUTH: counted, logged, answered by the protocol core."""
        self.ctx.metrics.logins_failed += 1
        log.warning("pop3 login failed: user=%s rip=%s rport=%d mech=%s tls=%s reason=%s", loggable(user),
                    self.peer.address, self.peer.port, mech, self._tls_description(), reason)
        if user is not None:  # AUTH refused before its exchange names nobody
            self._record("login-failed", user, detail=f"reason={reason}")
        failed = self.ctx.accounting.failed
        delay = failed(self.peer.source, user or "") if reason in DELAYED_FAILURES else None
        return self.connection.protocol.login_failed(reason, delay)

    def _retrieve(self, action: Retrieve) -> None:
        """RETR/TOP: never more than the size announced (LIST, `+OK <n> octets`), plus the final
        CRLF a file may lack (Dovecot's W= size does not count it). A message found bigger
        before the `+OK` is refused (and offered as -ERR from then on); one that grows while
        it is sent ends the connection at the announced size."""
        message = action.message
        try:
            handle = maildir.open_message(message)  # only the regular file the snapshot saw
        except OSError:
            self.transport.write(self.connection.protocol.retrieve_failed())
            return
        write = self.transport.write
        limit = message.size + 2
        with handle:
            try:
                if handle.size > message.size:  # CRLF octets are never fewer than the octets stored
                    raise maildir.MessageChanged(
                        errno.EFBIG, f"grew since the snapshot ({message.size} octets announced, {handle.size} stored)")
                whole = maildir.whole_message(handle, limit) if action.body_lines is None else None
            except maildir.MessageChanged as exc:
                self._message_changed(message, exc)
                message.error = "Message changed since the session started"
                write(self.connection.protocol.retrieve_failed())
                return
            if whole is not None:
                write(b"".join((action.header, whole, b".\r\n")))
            else:
                write(action.header)
                # Past the +OK line a read error can only end the connection (OSError).
                try:
                    for chunk in maildir.message_chunks(handle, action.body_lines, limit):
                        write(chunk)
                except maildir.MessageChanged as exc:
                    self._message_changed(message, exc)
                    raise
                write(b".\r\n")
        if action.body_lines is None:
            self.ctx.metrics.messages_retrieved += 1

    def _message_changed(self, message: Message, exc: maildir.MessageChanged) -> None:
        log.warning("pop3 message not sent: user=%s file=%s: %s", loggable(self.connection.protocol.user),
                    ascii(message.path), exc.strerror)

    def _send_listing(self, listing: Listing) -> None:
        """A long LIST/UIDL (or STAT), chunk by chunk, the other sessions served between two chunks
        (a chunk waits for the client only when its socket is full)."""
        write = self.transport.write
        for chunk in listing.chunks():
            if chunk:
                write(chunk)
            gevent.idle()  # every event ready is handled first (gevent.sleep(0) would handle none)

    def _update(self, action: Update) -> bytes:
        self.ended = "quit"
        protocol = self.connection.protocol
        deleted = action.deleted
        if not deleted:
            self._release_mailbox()
            return protocol.update_done(0)
        assert self.mailbox is not None
        shared = self.ctx.shared
        if shared is not None and not shared.leases.confirm(self.mailbox.user):
            log.error("pop3 update: user=%s lease lost or unconfirmed: nothing deleted", loggable(protocol.user))
            self._release_mailbox()
            return protocol.update_done(len(deleted))
        failed = self.mailbox.delete(deleted)
        self.ctx.metrics.messages_deleted += len(deleted) - len(failed)
        if failed:
            log.error("pop3 update: user=%s could not delete %d messages", loggable(protocol.user), len(failed))
        self._release_mailbox()  # before the answer: a client may reconnect the moment it reads it
        return protocol.update_done(len(failed))

    # -- end -----------------------------------------------------------------
    def _release_mailbox(self) -> None:
        if self.mailbox is None:
            return
        self.service.login.release(self.mailbox)
        self.mailbox = None
        user = self.connection.protocol.user or ""
        count = self.ctx.logged_in.get(user, 0) - 1
        if count > 0:
            self.ctx.logged_in[user] = count
        else:
            self.ctx.logged_in.pop(user, None)

    def finish(self) -> None:
        """Release the lock and log the logout, however the session ended."""
        self._release_mailbox()
        protocol = self.connection.protocol
        user = protocol.user
        if user is None:
            return
        log.info("pop3 logout: user=%s rip=%s rport=%d retr=%d dele=%d top=%d bytes=%d ended=%s",
                 loggable(user), self.peer.address, self.peer.port, protocol.retrieved, protocol.expunged,
                 protocol.tops, self.transport.sent, self.ended)
        # Messages the first filter run could not prepare (offered as -ERR at RETR): counted
        # here, once, rather than kept in every held session.
        messages = protocol.messages
        if len(messages) > LISTING_INLINE and self.ended != "shutdown":
            # Counting 500,000 messages held the event loop 40 ms, freeing them 0.2 s: both in
            # steps, in a greenlet of their own; the access-log entry is the one of now.
            protocol.messages = []
            gevent.spawn(_logout_in_steps, self.ctx.access_log.record, self._entry("logout", user), messages)
            return
        failures = sum(1 for message in messages if message.error is not None)
        self._record("logout", user, detail=f"filter_failures={failures}" if failures else "")

    def _record(self, event: str, user: str, detail: str = "") -> None:
        self.ctx.access_log.record(self._entry(event, user, detail))

    def _entry(self, event: str, user: str, detail: str = "") -> AccessEntry:
        protocol = self.connection.protocol
        return AccessEntry(
            time=time.time(), user=loggable(user), address=self.peer.address, port=self.peer.port, event=event,
            retr=protocol.retrieved, dele=protocol.expunged, top=protocol.tops, bytes=self.transport.sent,
            duration=time.monotonic() - self.started, ended=self.ended if event == "logout" else "", detail=detail,
        )


def _logout_in_steps(record: Callable[[AccessEntry], None], entry: AccessEntry, messages: list[Message]) -> None:
    """The logout of a big snapshot: its filter failures counted and the messages let go of a few
    thousand at a time, the other sessions served between; then the access-log entry."""
    failures = 0
    while messages:
        failures += sum(1 for message in messages[-LISTING_CHUNK:] if message.error is not None)
        del messages[-LISTING_CHUNK:]
        gevent.idle()
    record(replace(entry, detail=f"filter_failures={failures}") if failures else entry)


class Pop3Service:
    """All POP3 sessions of one process: the StreamServer handler, the one registry of
    open sessions, and shutdown."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.sessions: set[Pop3Session] = set()  # every session not yet closed, busy or parked
        self.login = LoginPipeline(ctx)  # one for every session: it keeps nothing per session
        self.count_sent = self._count_sent  # one bound method shared by every transport
        self.runners = Runners()  # the greenlets that serve bursts (and first bursts, see Pop3Server)

    def handle_tls(self, sock: socket.socket, address: tuple[Any, ...]) -> None:
        """The POP3S listeners' handler: the handshake comes before the greeting."""
        self.handle(sock, address, implicit_tls=True)

    def handle(self, sock: socket.socket, address: tuple[Any, ...], implicit_tls: bool = False) -> None:
        """StreamServer handler: enforce the connection limits, then greet and serve."""
        metrics = self.ctx.metrics
        settings = self.ctx.settings
        proxy = None
        if settings.proxy_networks:
            proxy = self._proxy_header(sock, address, implicit_tls)
            if proxy is None:
                return
        peer = Peer.accepted(address, proxy)
        if metrics.current_connections >= settings.max_connections:  # this process alone is full: no need to ask
            self._refuse(sock, TOO_MANY, implicit_tls)
            return
        refused = self.ctx.accounting.connect(peer.source)  # the whole server's counts
        if refused:
            if refused == MAX_CONNECTIONS_PER_IP:
                metrics.refused_per_ip += 1
                log.debug("pop3 connection refused: rip=%s over max_connections_per_ip", peer.address)
                self._refuse(sock, TOO_MANY_FROM_SOURCE, implicit_tls)
            else:
                self._refuse(sock, TOO_MANY, implicit_tls)
            return
        try:
            # Behind a proxy the server address is the one the client reached (the proxy's).
            server = proxy.destination[0] if proxy is not None and proxy.destination else _server_address(sock)
            session = Pop3Session(self, sock, peer, server)
        except BaseException:
            self.ctx.accounting.disconnect(peer.source)  # counted above: not a session after all
            raise
        metrics.connection_opened()
        self.sessions.add(session)
        session.greenlet = cast("gevent.Greenlet[..., None]", gevent.getcurrent())  # the server spawned it
        session.start(implicit_tls)

    def _proxy_header(self, sock: socket.socket, address: tuple[Any, ...], implicit_tls: bool) -> ProxyHeader | None:
        """The PROXY header of a connection from one of `proxy_networks`; None when the
        connection is closed here: from anywhere else (a client going around the proxy
        would choose its own address), a missing or bad header, or the proxy's own
        health check (LOCAL), which is no session (on the plain port it gets a greeting
        line, for a check that expects one; POP3S checks are bare TCP connects)."""
        peer = client_host(address)
        parsed = parse_address(peer)
        if parsed is None or not any(parsed in network for network in self.ctx.settings.proxy_networks):
            self.ctx.metrics.refused_proxy += 1
            log.info("pop3 connection refused: rip=%s not in proxy_networks", peer)
            sock.close()
            return None
        try:
            header = proxied.read_header(sock)
        except ProxyError as exc:
            self.ctx.metrics.refused_proxy += 1
            log.info("pop3 connection refused: rip=%s bad PROXY header: %s", peer, exc)
            sock.close()
            return None
        if header.local:
            log.debug("pop3 PROXY LOCAL (health check) from %s", peer)
            if not implicit_tls:
                with contextlib.suppress(OSError):
                    sock.sendall(HEALTH_OK)
            sock.close()
            return None
        return header

    def _refuse(self, sock: socket.socket, answer: bytes, implicit_tls: bool) -> None:
        self.ctx.metrics.total_connections += 1  # accepted, then refused: still a connection
        if not implicit_tls:  # a TLS client would take plaintext for a broken handshake
            with contextlib.suppress(OSError):
                sock.sendall(answer)
        sock.close()

    def forget(self, session: Pop3Session) -> None:
        """A session has ended: out of the registry and the per-source count."""
        self.sessions.discard(session)
        self.ctx.accounting.disconnect(session.peer.source)

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
        self.runners.close()  # a runner ends after its burst: joining it returns
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
    outlives the greenlet that accepted it. A Pop3Service's handler runs in the
    service's runners (geventpop3.net.runners), not in a new greenlet per connection."""

    def __init__(self, listener: Any, handle: Any) -> None:
        service = getattr(handle, "__self__", None)
        if isinstance(service, Pop3Service):
            super().__init__(listener, handle, spawn=cast(Any, service.runners.spawn))
        else:
            super().__init__(listener, handle)

    def do_close(self, *args: Any) -> None:
        pass
