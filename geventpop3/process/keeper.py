"""The keeper: the one process that may stay root, and what it does for the server.

Forked by the server at start, after binding and after the imports every worker needs
(then `gc.freeze()`), before privileges are dropped and before any client byte is read
(OpenSSH's monitor, Dovecot's master). It reads no network input: only the requests of
the process that forked it, over a SOCK_SEQPACKET socketpair, one JSON object per
datagram, descriptors beside it (SCM_RIGHTS):

- `fork` (with the worker's end of its channel to the supervisor): a new worker, forked
  from this preloaded process, so it starts in milliseconds, shares the interpreter's
  pages and needs no interpreter file the server's user can execute. The child closes
  the keeper's descriptors, drops to --run-as at once, sets its title and runs the
  `Worker` role on the inherited POP3 and POP3S listeners (geventpop3.process.worker);
- `tls`: the certificate and key files, read now (they may be root's only, mode 0600)
  and checked (they must load as a pair), handed over in a sealed memory file;
- and, unasked, `exited`: a worker's exit status (the keeper is its parent and reaps it).

It dies with the server: PR_SET_PDEATHSIG (SIGTERM, whose default action ends it) and
the end of its socket. Its workers die with it in turn (their own PR_SET_PDEATHSIG),
and with the end of their channel to the supervisor.

The keeper runs no event loop: it is a plain loop over poll() of its socket and one
pidfd per worker (or, without pidfd_open, the end of a pipe each worker holds), with
the unpatched functions of the standard library (gevent's hub, inherited half-made from
the forking process, is made new only in each worker, `gevent.reinit()`).
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gevent
from gevent import monkey
from gevent.event import AsyncResult, Event
from gevent.lock import Semaphore

from geventpop3.net.tls import TlsError
from geventpop3.service import privileges

if TYPE_CHECKING:
    from geventpop3.process.server import Server

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
MAX_REQUEST = 64 * 1024
REQUEST_TIMEOUT = 30.0  # seconds the keeper has to answer (a fork takes milliseconds)
STOP_GRACE = 15.0  # seconds the keeper gives its workers to stop once the server is gone

# The keeper runs no event loop: gevent's versions would wait for it (its os.close, for
# one, closes the descriptor from a callback of the loop).
_fork: Callable[[], int] = monkey.get_original("os", "fork")
_close: Callable[[int], None] = monkey.get_original("os", "close")
_waitpid: Callable[[int, int], tuple[int, int]] = monkey.get_original("os", "waitpid")
_poll: Callable[[], Any] = monkey.get_original("select", "poll")
_signal: Callable[[int, Any], Any] = monkey.get_original("signal", "signal")
_BlockingSocket: type[socket.socket] = monkey.get_original("socket", "socket")  # the keeper runs no hub


class KeeperError(Exception):
    """The keeper refused or failed a request, or is gone: one line."""


def set_title(title: str) -> None:
    """`ps` shows `title` (setproctitle; nothing if it is missing)."""
    try:
        from setproctitle import setproctitle
    except ImportError:  # pragma: no cover - an install without it serves all the same
        return
    setproctitle(title)


def die_with_parent(parent: int, signum: int = signal.SIGTERM) -> None:
    """`signum` when the parent dies (Linux: PR_SET_PDEATHSIG); exit now if it already has."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def limit_malloc_arenas(count: int = 2) -> None:
    """At most `count` glibc malloc arenas: each thread that allocates (the hash threads,
    gevent's pool) would otherwise get one of its own, up to 8 per core, and keep its
    pages (about 16 MiB after one scrypt) for the life of the process."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.mallopt(-8, count)  # M_ARENA_MAX


def trim_malloc() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim): start-up parses
    (the users file, the state) leave megabytes freed but kept by malloc otherwise."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


WorkerStart = Callable[[int, int, dict[str, list[int]]], int]  # (index, channel fd, listener fds) -> exit status


class Keeper:
    """The server's end of the keeper: fork it (`start`), then ask it (gevent-cooperative)."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock = sock
        self.pid = pid
        self._lock = Semaphore()
        self._answer: AsyncResult[tuple[dict[str, Any], list[int]]] | None = None
        self._exits: dict[int, Callable[[int], None]] = {}  # pid -> called with the exit status
        self._early: dict[int, int] = {}  # exits reported before their watcher was registered
        self.gone = Event()
        self.closing = False
        self.on_gone: Callable[[], None] | None = None  # the keeper ended before `close`
        self._reader = gevent.spawn(self._read)

    @classmethod
    def start(cls, server: Server, listeners: dict[str, list[socket.socket]], worker: WorkerStart | None) -> Keeper:
        """Fork the keeper now (the caller has not dropped privileges yet). `listeners`: the
        sockets it keeps for the workers it forks (`worker` runs one and gives its exit status)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = _fork()
        if pid == 0:  # the keeper
            status = 1
            try:
                _close(ours.detach())  # the server's end: its close must reach us as EOF
                status = _keep(parent, theirs.detach(), server, listeners, worker)
            except BaseException:  # noqa: BLE001 - the keeper never returns into the server's code
                traceback.print_exc()
            finally:
                logging.shutdown()
                os._exit(status)
        theirs.close()
        return cls(ours, pid)

    # -- requests --------------------------------------------------------------------------
    def fork_worker(self, index: int, channel_fd: int, exited: Callable[[int], None]) -> int:
        """A new worker for slot `index` over `channel_fd` (its end of the channel; ours is
        closed by the caller); its pid. `exited(status)` once it has ended (status as
        subprocess gives it: negative for a signal)."""
        answer, _ = self._ask({"op": "fork", "index": index}, [channel_fd])
        pid = int(answer["pid"])
        early = self._early.pop(pid, None)
        if early is not None:
            exited(early)
        else:
            self._exits[pid] = exited
        return pid

    def certificate(self) -> tuple[bytes, bytes]:
        """The certificate and key files as the keeper read them now (checked to load as a
        pair); TlsError with the keeper's reason if they cannot be used."""
        try:
            answer, fds = self._ask({"op": "tls"})
        except KeeperError as exc:
            raise TlsError(str(exc)) from None
        if not fds:
            raise TlsError("the keeper sent no certificate")
        try:
            data = _read_all(fds[0])
        finally:
            for fd in fds:
                os.close(fd)
        split = int(answer["cert"])
        return data[:split], data[split:]

    def close(self, timeout: float = STOP_GRACE + 1) -> None:
        """The end of the socket: the keeper stops its workers (if any are left) and exits;
        wait (at most `timeout`) until it has, so that the POP3 port it holds is free once
        the server has returned (a restart binds it again)."""
        self.closing = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        self.gone.wait(timeout)
        self._reader.kill(block=False)
        self.sock.close()

    def _ask(self, request: dict[str, Any], fds: list[int] | None = None) -> tuple[dict[str, Any], list[int]]:
        with self._lock:
            if self.gone.is_set():
                raise KeeperError("the keeper is gone")
            answer: AsyncResult[tuple[dict[str, Any], list[int]]] = AsyncResult()
            self._answer = answer
            try:
                _send_fds(self.sock, json.dumps(request).encode(), fds or [])
            except OSError as exc:
                raise KeeperError(f"the keeper is gone: {exc.strerror or exc}") from None
            try:
                got = answer.get(timeout=REQUEST_TIMEOUT)
            except gevent.Timeout:
                raise KeeperError(f"the keeper did not answer {request['op']} within {REQUEST_TIMEOUT:.0f} s") from None
            if got is None:
                raise KeeperError("the keeper is gone")
            reply, received = got
            if reply.get("op") == "error":
                for fd in received:
                    os.close(fd)
                raise KeeperError(str(reply.get("why", "failed")))
            return reply, received

    def _read(self) -> None:
        try:
            while True:
                try:
                    data, fds, _, _ = _recv_fds(self.sock, MAX_REQUEST, 4)
                except OSError:
                    break
                if not data:
                    break
                message = json.loads(data)
                if message.get("op") == "exited":
                    pid, status = int(message["pid"]), int(message["status"])
                    watcher = self._exits.pop(pid, None)
                    if watcher is None:
                        self._early[pid] = status
                    else:
                        watcher(status)
                elif self._answer is not None and not self._answer.ready():
                    self._answer.set((message, fds))
                else:
                    for fd in fds:
                        os.close(fd)
        finally:
            self.gone.set()
            if self._answer is not None and not self._answer.ready():
                self._answer.set(({"op": "error", "why": "the keeper is gone"}, []))
            if not self.closing and self.on_gone is not None:
                self.on_gone()
            watchers, self._exits = self._exits, {}
            for watcher in watchers.values():  # its workers die with it (PR_SET_PDEATHSIG)
                watcher(-signal.SIGKILL)


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _sealed(data: bytes) -> int:
    fd = os.memfd_create("geventpop3-tls", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                | fcntl.F_SEAL_WRITE)
    return fd


# -- the keeper process --------------------------------------------------------------------
def _keep(parent: int, fd: int, server: Server, listeners: dict[str, list[socket.socket]],
          worker: WorkerStart | None) -> int:
    """The keeper's life: set itself up, then serve requests until the server is gone."""
    die_with_parent(parent)
    os.setpgid(0, 0)  # a Ctrl-C reaches the server only, which stops the workers in order
    server.leave_process()  # the server's signal handlers and setting listeners are not ours
    _signal(signal.SIGTERM, signal.SIG_DFL)
    _signal(signal.SIGINT, signal.SIG_IGN)
    _signal(signal.SIGHUP, signal.SIG_IGN)
    set_title("geventpop3: keeper")
    kept = {service: [sock.detach() for sock in socks] for service, socks in listeners.items()}
    for socks in server.bound.values():  # MSMP, metrics: the server's, never held here
        for sock in socks:
            if sock.fileno() >= 0 and all(sock.fileno() not in fds for fds in kept.values()):
                _close(sock.detach())
    ctl = _BlockingSocket(socket.AF_UNIX, socket.SOCK_SEQPACKET, fileno=fd)
    return _KeeperLoop(ctl, server, kept, worker).run()


def _pidfd_works() -> bool:
    try:
        _close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    return True


_HAS_PIDFD = _pidfd_works()


class _KeeperLoop:
    """poll() over the request socket and one pidfd per worker."""

    def __init__(self, ctl: socket.socket, server: Server, listeners: dict[str, list[int]],
                 worker: WorkerStart | None) -> None:
        self.ctl = ctl
        self.server = server
        self.listeners = listeners
        self.worker = worker
        self.children: dict[int, int] = {}  # pidfd -> pid
        self.poller = _poll()

    def run(self) -> int:
        self.ctl.setblocking(True)
        self.poller.register(self.ctl.fileno(), 0x001)  # POLLIN
        while True:
            for fd, _ in self.poller.poll():
                if fd == self.ctl.fileno():
                    if not self._request():
                        self._stop_workers()
                        return 0
                else:
                    self._reap(fd)

    def _request(self) -> bool:
        try:
            data, fds, _, _ = _recv_fds(self.ctl, MAX_REQUEST, 4)
        except OSError:
            return False
        if not data:
            return False
        try:
            request = json.loads(data)
            op = request.get("op")
            if op == "fork" and fds and self.worker is not None:
                self._reply({"op": "forked", "pid": self._fork(int(request["index"]), fds[0])})
            elif op == "tls" and self.server.config.tls is not None:
                server_tls = self.server.config.tls
                try:
                    server_tls.reload()
                except TlsError as exc:
                    self._reply({"op": "error", "why": str(exc)})
                else:
                    pem = _sealed(server_tls.cert_pem + server_tls.key_pem)
                    try:
                        self._reply({"op": "tls", "cert": len(server_tls.cert_pem)}, [pem])
                    finally:
                        _close(pem)
            else:
                self._reply({"op": "error", "why": f"no such request: {op}"})
        except (OSError, ValueError, KeyError) as exc:
            self._reply({"op": "error", "why": str(exc)})
        finally:
            for received in fds:
                _close(received)
        return True

    def _reply(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        with contextlib.suppress(OSError):
            _send_fds(self.ctl, json.dumps(message).encode(), fds or [])

    def _fork(self, index: int, channel: int) -> int:
        keeper = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        # Without pidfd_open (Linux before 5.3, valgrind): the end of a pipe the child holds
        # open until it exits (close-on-exec: no program it runs keeps it) tells its exit.
        exit_pipe = None if _HAS_PIDFD else os.pipe()
        pid = _fork()
        if pid == 0:
            status = 1
            try:
                self.ctl.close()
                for pidfd in self.children:
                    _close(pidfd)
                if exit_pipe is not None:
                    _close(exit_pipe[0])
                status = _run_worker(keeper, index, channel, self.listeners, self.server, self.worker)
            except SystemExit as exc:
                status = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001 - a worker never returns into the keeper's loop
                traceback.print_exc()
            finally:
                logging.shutdown()
                os._exit(status)
        if exit_pipe is not None:
            _close(exit_pipe[1])
            pidfd = exit_pipe[0]
        else:
            pidfd = os.pidfd_open(pid)
        self.children[pidfd] = pid
        self.poller.register(pidfd, 0x001)
        return pid

    def _reap(self, pidfd: int) -> None:
        pid = self.children.pop(pidfd)
        self.poller.unregister(pidfd)
        _close(pidfd)
        _, status = _waitpid(pid, 0)
        self._reply({"op": "exited", "pid": pid, "status": os.waitstatus_to_exitcode(status)})

    def _stop_workers(self) -> None:
        """The server is gone: each worker sees the end of its channel and stops; SIGKILL
        for those still there after STOP_GRACE."""
        for pid in self.children.values():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        left = dict(self.children)
        while left:
            ready = self.poller.poll(STOP_GRACE * 1000)
            if not ready:
                for pid in left.values():
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                ready = self.poller.poll()
            for fd, _ in ready:
                if fd in left:
                    pid = left.pop(fd)
                    self.poller.unregister(fd)
                    with contextlib.suppress(ChildProcessError):
                        _waitpid(pid, 0)


def _run_worker(keeper: int, index: int, channel: int, listeners: dict[str, list[int]], server: Server,
                worker: WorkerStart | None) -> int:
    """In a new child of the keeper: drop at once, then be worker `index`."""
    die_with_parent(keeper)
    identity = server.config.run_as
    if identity is not None:
        privileges.drop(identity)
    set_title(f"geventpop3: worker {index}")
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        _signal(signum, signal.SIG_DFL)
    gevent.reinit()
    assert worker is not None
    return worker(index, channel, listeners)


def _send_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], ancillary)


def _recv_fds(sock: socket.socket, size: int, maxfds: int) -> tuple[bytes, list[int], int, Any]:
    fds = array.array("i")
    data, ancillary, flags, address = sock.recvmsg(size, socket.CMSG_LEN(maxfds * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - (len(payload) % fds.itemsize)])
    for fd in fds:
        os.set_inheritable(fd, False)  # no filter a worker runs may get them
    return data, list(fds), flags, address
