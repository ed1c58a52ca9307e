"""One MSMP connection over a socket, and the loopback listeners that accept them.

Thin on purpose: read, feed the protocol core, write its answers (one write per
received chunk, so pipelined commands cost one syscall), wait before an answer the
core hands back as `Delayed` (a failed PASS: the core says how long), close on QUIT,
after the last allowed failure, or when idle. Timeouts and delays are read from
`ctx.settings` each time, so `SET` applies to open sessions too.

With `--admin-tls` every connection starts with a TLS handshake (implicit TLS, as
POP3S) under a deadline, with the context the server holds at that moment: a reload
reaches new admin connections too. A failed handshake is one log line and a close.

MSMP is served on a UNIX socket (the default; its file mode says who may connect) and
over TCP when configured. Each has its own slots, so a flood over TCP never takes the
socket's.

Limits: at most `admin_max_connections` MSMP connections at once on each (logged in or
not; one more is answered `-ERR` and closed), at most `admin_max_connections_per_source`
of them from one source (over TCP an IPv4 address or IPv6 /64, on the socket a peer uid
from SO_PEERCRED), so one source cannot hold every slot; `admin_login_timeout` seconds
from connect to a successful login however the client trickles, and after the last
answer a linger of at most `LINGER_SECONDS` in total.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import gevent
from gevent import socket
from gevent.pool import Pool
from gevent.server import StreamServer

from geventpop3.core.lines import Delayed
from geventpop3.core.msmp.protocol import MsmpProtocol
from geventpop3.core.penalty import source_of
from geventpop3.net import listen, tls
from geventpop3.service.context import ServerContext
from geventpop3.service.msmp.backend import ManagementBackend

if TYPE_CHECKING:
    from geventpop3.net.tls import ServerTls

log = logging.getLogger(__name__)

RECV_SIZE = 16 * 1024
LINGER_SECONDS = 1.0  # at most this long, and this much input, read after our last answer
LINGER_OCTETS = 64 * 1024

TOO_MANY = b"-ERR Too many connections, try again later\r\n"
TOO_MANY_FROM_SOURCE = b"-ERR Too many connections from your source, try again later\r\n"
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
LOGIN_TIMEOUT = b"-ERR Login timeout, closing\r\n"

Handler = Callable[[socket.socket, object], None]  # (connection, peer address)


def serve_admin(ctx: ServerContext, reload: Callable[[], list[str]] | None = None,
                server_tls: ServerTls | None = None, backend: ManagementBackend | None = None,
                local: bool = False) -> Handler:
    """A StreamServer handler serving MSMP sessions against `ctx` (through `backend`, by
    default a ManagementBackend of `ctx`); implicit TLS with `server_tls`. `local`: for the
    UNIX socket (sources are peer uids, no TLS). Each handler counts its own connections."""
    backend = backend if backend is not None else ManagementBackend(ctx, reload)
    open_connections = 0
    by_source: dict[str, int] = {}

    def handle(raw: socket.socket, address: object) -> None:
        nonlocal open_connections
        sock = raw
        if local:
            source, peer = _local_peer(raw)
        else:
            host = _host(address)
            source, peer = source_of(host) or host, _peer(address)
        refused = _refusal(ctx, open_connections, by_source.get(source, 0))
        if refused is not None:
            ctx.metrics.admin_refused += 1
            log.log(logging.WARNING if refused is TOO_MANY else logging.INFO,
                    "MSMP connection from %s refused: %s reached", peer,
                    "admin_max_connections" if refused is TOO_MANY else "admin_max_connections_per_source")
            try:
                if server_tls is None:  # a TLS client would take plaintext for a broken handshake
                    sock.settimeout(1.0)
                    sock.sendall(refused)
            except OSError:
                pass
            finally:
                sock.close()
            return
        open_connections += 1
        by_source[source] = by_source.get(source, 0) + 1
        log.debug("MSMP connection from %s", peer)
        try:
            if server_tls is not None:
                wrapped = _handshake(ctx, server_tls, raw, peer)
                if wrapped is None:
                    return
                sock = wrapped
            if not local:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # answers are batched already
            _session(ctx, MsmpProtocol(backend, peer=source if local else _host(address)), sock, peer)
            _linger(sock)
        except OSError as exc:  # reset, broken pipe: the client went away
            log.debug("MSMP %s: %s", peer, exc)
        except Exception:  # never let an exception reach gevent's handler
            log.exception("MSMP session %s failed", peer)
            try:
                sock.settimeout(1.0)
                sock.sendall(b"-ERR Internal error, closing\r\n")
            except Exception:  # noqa: BLE001 - best effort on a broken session
                log.debug("MSMP %s: could not send the error", peer)
        finally:
            open_connections -= 1
            left = by_source.pop(source) - 1
            if left:
                by_source[source] = left
            sock.close()

    return handle


def _refusal(ctx: ServerContext, open_connections: int, from_source: int) -> bytes | None:
    """The answer that refuses one more connection (the caps of the settings), or None."""
    if open_connections >= ctx.settings.admin_max_connections:
        return TOO_MANY
    if from_source >= ctx.settings.admin_max_connections_per_source:
        return TOO_MANY_FROM_SOURCE
    return None


def _local_peer(sock: socket.socket) -> tuple[str, str]:
    """(source, name for the log) of a UNIX socket's client: `uid:<uid>`, from the kernel."""
    try:
        pid, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except OSError:
        return "uid:?", "local uid ?"
    return f"uid:{uid}", f"local uid {uid} pid {pid}"


def _session(ctx: ServerContext, protocol: MsmpProtocol, sock: socket.socket, peer: str) -> None:
    settings = ctx.settings
    started = time.monotonic()
    sock.settimeout(settings.admin_idle_timeout)
    sock.sendall(protocol.greeting())
    while not protocol.closing:
        wait = settings.admin_idle_timeout
        login_left = started + settings.admin_login_timeout - time.monotonic()
        if not protocol.authenticated:
            if login_left <= 0:  # checked at every read: trickling bytes do not extend it
                _login_timeout(ctx, sock, peer)
                return
            wait = min(wait, login_left)
        sock.settimeout(wait)
        try:
            data = sock.recv(RECV_SIZE)
        except TimeoutError:
            if not protocol.authenticated and wait == login_left:
                _login_timeout(ctx, sock, peer)
                return
            log.info("MSMP %s: idle timeout", peer)
            sock.sendall(b"-ERR Idle timeout, closing\r\n")
            return
        if not data:
            return
        out: list[bytes] = []
        for item in protocol.feed(data):
            answer = protocol.handle_line(item)
            if isinstance(answer, Delayed):  # a failed login: what came before goes out first
                log.info("MSMP %s: failed admin login", peer)
                if out:
                    sock.sendall(b"".join(out))
                    out = []
                gevent.sleep(answer.seconds)
                answer = answer.data
            out.append(answer)
            if protocol.closing:
                break
        if out:
            sock.sendall(b"".join(out))
    if protocol.login_failures >= protocol.max_login_failures and not protocol.authenticated:
        log.warning("MSMP %s: closed after %d failed logins", peer, protocol.login_failures)


def _handshake(ctx: ServerContext, server_tls: ServerTls, sock: socket.socket, peer: str) -> socket.socket | None:
    """The TLS side of `sock`, handshake done within the login timeout (30 s at most);
    None once it failed (logged, the socket closed)."""
    deadline = min(tls.HANDSHAKE_TIMEOUT, ctx.settings.admin_login_timeout)
    try:
        return tls.handshake(sock, server_tls.context, deadline)
    except tls.HandshakeFailed as exc:
        log.info("MSMP %s: tls handshake failed: %s", peer, exc)
        return None


def _login_timeout(ctx: ServerContext, sock: socket.socket, peer: str) -> None:
    ctx.metrics.admin_login_timeouts += 1
    log.info("MSMP %s: login timeout", peer)
    sock.sendall(LOGIN_TIMEOUT)


def _linger(sock: socket.socket) -> None:
    """Send FIN, then read what the client still sends, briefly: closing with unread
    input would reset the connection and could lose our last answer (`+OK Bye`).
    The whole linger ends within LINGER_SECONDS, however the client trickles."""
    sock.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + LINGER_SECONDS
    drained = 0
    while drained < LINGER_OCTETS:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        sock.settimeout(left)
        try:
            data = sock.recv(RECV_SIZE)
        except TimeoutError:
            return
        if not data:
            return
        drained += len(data)


def _host(address: object) -> str:
    """The client's IP (an IPv4 client of a dual-stack listener as a.b.c.d): its penalty source."""
    host = str(address[0]) if isinstance(address, tuple) and address else str(address)
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def _peer(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


def start_admin_servers(ctx: ServerContext, addresses: list[str] | None, port: int,
                        spawn: Pool | None = None, listeners: list[socket.socket] | None = None,
                        reload: Callable[[], list[str]] | None = None,
                        server_tls: ServerTls | None = None,
                        backend: ManagementBackend | None = None,
                        unix_listeners: list[socket.socket] | None = None) -> list[StreamServer]:
    """MSMP servers on `addresses` (default: the loopback addresses) and `port`, started.

    `reload` is what RELOAD runs (the app's reload); `server_tls`, when given, makes every
    connection implicit TLS with its current context. `backend`: what the commands act
    on (the cluster's supervisor passes one that also tells its workers).

    Their handlers run in `spawn`, so shutdown can end the admin sessions (and wait for
    them) before the state they use is flushed and closed. `listeners`: sockets bound
    already (the app binds before dropping privileges); the addresses are then unused.
    `unix_listeners`: MSMP's UNIX sockets (listen.open_unix_listener), with slots of their
    own and no TLS (the socket's mode and owner say who may connect).
    """
    backend = backend if backend is not None else ManagementBackend(ctx, reload)  # one for both kinds
    handler = serve_admin(ctx, reload, server_tls, backend)
    servers: list[StreamServer] = []
    if listeners is None:
        listeners = listen.open_listeners(addresses, port, "MSMP", defaults=listen.LOOPBACK)
    for listener in listeners:
        server = StreamServer(listener, handler, spawn=spawn if spawn is not None else "default")
        server.start()
        servers.append(server)
        log.info("MSMP listening on %s%s", listen.describe(listener), " (TLS)" if server_tls is not None else "")
    if unix_listeners:
        local = serve_admin(ctx, reload, None, backend, local=True)
        for listener in unix_listeners:
            server = StreamServer(listener, local, spawn=spawn if spawn is not None else "default")
            server.start()
            servers.append(server)
            log.info("MSMP listening on socket %s%s", listen.describe(listener), _file_mode(listen.describe(listener)))
    return servers


def _file_mode(path: str) -> str:
    """` (mode 0600, uid 0, gid 0)` of the socket file at `path`, for the log."""
    try:
        info = os.lstat(path)
    except OSError:
        return ""
    return f" (mode {stat.S_IMODE(info.st_mode):04o}, uid {info.st_uid}, gid {info.st_gid})"
