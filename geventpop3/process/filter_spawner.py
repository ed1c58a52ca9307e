"""The filter spawner: the one root process that starts filters, as `filter_user`.

After the drop to `--run-as`, no server process can switch users; yet a filter must not
run as the server's user (it would read every Maildir, the state, and could ptrace the
worker). So the server forks this process before it drops (`start`): it stays root,
reads no network input and no mail, and only starts filters for the server's processes:

- it listens on an abstract UNIX socket (a random name, passed to the workers in the
  environment as `SPAWNER_ENV`) and serves only peers whose SO_PEERCRED uid is the
  server's user (`handle_connection`);
- a request is one SOCK_SEQPACKET message: JSON {argv, env, max_output, timeout} and
  three descriptors (SCM_RIGHTS): stdin (the stored message), stdout (the spool file),
  stderr (a pipe the worker drains). `run_request` starts the filter with them in the
  sandbox (geventpop3.service.sandbox: filter_user, no supplementary groups,
  PR_SET_NO_NEW_PRIVS, rlimits, an empty cwd, its own session), answers {"pid"}, then
  {"exit", "timeout"} once it is over; on timeout or when the connection closes (the
  login was abandoned) it kills the filter's process group. Afterwards it kills what
  the filter left behind (geventpop3.service.reaper: this process is the subreaper);
- it ends with the server: PR_SET_PDEATHSIG, and a check of its parent every second.

`run_request` and `handle_connection` are plain functions of their arguments, so another
root-side process may host them.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import json
import logging
import os
import signal
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from subprocess import SubprocessError
from typing import Any

import gevent
import gevent.event
from gevent import socket
from gevent.pool import Pool
from gevent.subprocess import Popen

from geventpop3.process.keeper import set_title
from geventpop3.service import reaper
from geventpop3.service.filters import FD_COUNT, MESSAGE_MAX, SPAWNER_ENV, kill_group
from geventpop3.service.privileges import Identity
from geventpop3.service.sandbox import Sandbox, empty_dir, remove_empty_dir

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
COMM = b"gp3-filterspawn"  # at most 15 bytes
PARENT_POLL = 1.0  # seconds between checks that the server is still there
BACKLOG = 128
ACCEPT_RETRY = 0.1  # seconds before accepting again after an error
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

# Filters running now, token -> pid (0 between fork and exec): their orphans are theirs.
_running: dict[str, int] = {}


@dataclass(frozen=True)
class Spawner:
    """The running spawner as the server sees it: its pid and socket name."""

    pid: int
    name: str


@dataclass(frozen=True)
class Request:
    """One filter run a worker asks for (the descriptors travel beside it)."""

    argv: list[str]
    env: dict[str, str]
    max_output: int
    timeout: float

    @classmethod
    def parse(cls, data: bytes) -> Request:
        """ValueError unless `data` is exactly what geventpop3.service.filters sends."""
        value = json.loads(data)
        if not isinstance(value, dict):
            raise ValueError("not an object")
        argv, env, max_output, timeout = value.get("argv"), value.get("env"), value.get("max_output"), \
            value.get("timeout")
        if not isinstance(argv, list) or not argv or not all(isinstance(arg, str) for arg in argv) or not argv[0]:
            raise ValueError("bad argv")
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ValueError("bad env")
        if isinstance(max_output, bool) or not isinstance(max_output, int) or max_output < 0:
            raise ValueError("bad max_output")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 86400:
            raise ValueError("bad timeout")
        return cls(argv, env, max_output, float(timeout))


def start(identity: Identity, server_uid: int, inherited: Iterable[socket.socket] = ()) -> Spawner:
    """Fork the spawner (as root, before the drop) and return it; OSError if it cannot be.

    `inherited`: the server's listening sockets, closed in the spawner (it must not hold
    the ports). The socket name is also put into our environment, for the workers we start."""
    name = f"geventpop3-filter-{os.getpid()}-{os.urandom(8).hex()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        listener.bind("\0" + name)
        listener.listen(BACKLOG)
        parent = os.getpid()
        sys.stderr.flush()
        pid = os.fork()
    except BaseException:
        listener.close()
        raise
    if pid == 0:  # the spawner: never returns into the server
        status = 1
        try:
            for sock in inherited:
                sock.close()
            status = serve(listener, identity, server_uid, parent)
        except BaseException:  # noqa: BLE001 - whatever happens, this process must not go on as the server
            log.exception("filter spawner failed")
        finally:
            os._exit(status)
    listener.close()
    os.environ[SPAWNER_ENV] = name
    return Spawner(pid, name)


def _die_with_server() -> None:
    """SIGTERM when the server dies (Linux); the parent check covers the rest. Titled for `ps`,
    named for `ps -o comm` (after the title, which would shorten it)."""
    set_title("geventpop3: filter spawner")
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(COMM), 0, 0, 0)


def serve(listener: socket.socket, identity: Identity, server_uid: int, parent: int) -> int:
    """The spawner's life: serve requests until SIGTERM or until the server is gone; 0."""
    _die_with_server()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle; filters reset it
    stop = gevent.event.Event()
    handler = gevent.signal_handler(signal.SIGTERM, stop.set)
    reaper.become_subreaper()
    empty_dir()  # root's, 0555: the filters' cwd
    sessions = Pool()

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError as exc:  # out of descriptors, say: go on once some are free
                log.error("filter spawner: cannot accept: %s", exc.strerror or exc)
                gevent.sleep(ACCEPT_RETRY)
                continue
            sessions.spawn(handle_connection, conn, identity, server_uid)

    def watch_parent() -> None:
        while os.getppid() == parent:
            gevent.sleep(PARENT_POLL)
        stop.set()

    greenlets = [gevent.spawn(accept), gevent.spawn(watch_parent)]
    log.info("filter spawner ready: filters run as user %s (uid %d, gid %d)", identity.user, identity.uid,
             identity.gid)
    try:
        stop.wait()
    finally:
        handler.cancel()
        gevent.killall(greenlets)
        listener.close()
        sessions.kill(block=True, timeout=5)  # each kills its filter's group
        remove_empty_dir()
    return 0


def peer_uid(conn: socket.socket) -> int | None:
    """The uid of the process at the other end (SO_PEERCRED); None where it cannot be read."""
    try:
        return int(_CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))[1])
    except (OSError, struct.error):
        return None


def handle_connection(conn: socket.socket, identity: Identity, server_uid: int) -> None:
    """One worker's request on `conn`: checked (peer uid, form), run, answered; `conn` closed."""
    fds: list[int] = []
    try:
        uid = peer_uid(conn)
        if uid != server_uid:
            log.warning("filter spawner: refused a connection from uid %s (not the server's)", uid)
            return
        try:
            data, fds = _receive(conn)
            request = Request.parse(data)
            if len(fds) != FD_COUNT:
                raise ValueError(f"{len(fds)} descriptors")
        except (OSError, ValueError) as exc:
            log.warning("filter spawner: bad request: %s", exc)
            _send(conn, {"error": "filter spawner: bad request"})
            return
        run_request(request, fds, identity, conn)
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        conn.close()


def _receive(conn: socket.socket) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    data, ancillary, _flags, _address = conn.recvmsg(MESSAGE_MAX, socket.CMSG_SPACE(FD_COUNT * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    return data, list(fds)


def _send(conn: socket.socket, message: dict[str, Any]) -> bool:
    try:
        conn.sendall(json.dumps(message).encode())
    except OSError:
        return False
    return True


def _start(request: Request, fds: list[int], identity: Identity, token: str) -> Popen[bytes] | str:
    env = dict(request.env)
    env["HOME"] = identity.home
    env[reaper.FILTER_TOKEN_VAR] = token  # ours: a worker's word must not name another run's processes
    try:
        return Popen(request.argv, stdin=fds[0], stdout=fds[1], stderr=fds[2], env=env, close_fds=True,
                     start_new_session=True, cwd=empty_dir(),
                     preexec_fn=Sandbox(request.max_output, request.timeout, identity))
    except FileNotFoundError:
        return "not found"
    except PermissionError:
        return "not executable"
    except OSError as exc:
        return f"cannot start: {exc.strerror or exc}"
    except SubprocessError as exc:  # preexec_fn failed: the limits or the user switch
        return f"cannot start: {exc}"


def run_request(request: Request, fds: list[int], identity: Identity, conn: socket.socket) -> None:
    """Start the filter, answer its pid, wait (timeout, or `conn` closed: kill), clean up, answer its status."""
    token = os.urandom(8).hex()
    _running[token] = 0
    try:
        started = _start(request, fds, identity, token)
    except BaseException:
        del _running[token]
        raise
    for fd in fds:  # the filter has them now; the worker keeps its own copies
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()
    if isinstance(started, str):
        del _running[token]
        _send(conn, {"error": started})
        return
    proc = started
    _running[token] = proc.pid
    timed_out = False
    try:
        if _send(conn, {"pid": proc.pid}):
            closed: gevent.Greenlet[..., None] = gevent.spawn(_wait_closed, conn)
            try:
                waiter: gevent.Greenlet[..., None] = gevent.spawn(_wait_exit, proc)
                try:
                    gevent.wait([waiter, closed], count=1, timeout=request.timeout)
                    timed_out = not waiter.ready() and not closed.ready()
                finally:
                    waiter.kill()
            finally:
                closed.kill()
    finally:  # also when this greenlet is killed (the spawner stops): never leave a filter behind
        kill_group(proc)
        del _running[token]
        reaper.kill_leftovers(set(_running.values()), set(_running), tokenless=0 not in _running.values())
    _send(conn, {"exit": proc.returncode, "timeout": timed_out})


def _wait_exit(proc: Popen[bytes]) -> None:
    proc.wait()


def _wait_closed(conn: socket.socket) -> None:
    """Return once the worker closed its end (it sends nothing more: anything is taken as its close)."""
    with contextlib.suppress(OSError):
        conn.recv(1)

