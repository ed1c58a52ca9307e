"""Admin access that local users cannot take (issue 21, point 5): MSMP on a UNIX socket.

Real server processes. By default MSMP is served on a UNIX socket only (0600, the
server's user; 0660 with `admin_group`), TCP only when configured, and one source (an
address over TCP, a peer uid on the socket) holds at most
`admin_max_connections_per_source` connections. The "local user" is a process forked
from this one that drops to `nobody` (as root: CI is), speaking through raw sockets.
"""

from __future__ import annotations

import _socket
import contextlib
import grp
import json
import os
import posix
import pwd
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from helpers import ADMIN, REPO, LineClient, filter_tmp_dir, free_port, run_server, server_env

from admin.client import MsmpClient, MsmpConnectionError
from geventpop3.testing import launcher

ROOT = os.geteuid() == 0
as_root = pytest.mark.skipif(not ROOT, reason="starts the server as root and drops a client to nobody")
SYSTEM_SOCKET = "/run/geventpop3/msmp.sock"
GREETING = "+OK MSMP1"
FROM_SOURCE = "-ERR Too many connections from your source, try again later"
TOO_MANY = "-ERR Too many connections, try again later"


# -- a local user: a forked process as nobody, raw sockets ------------------------------

def _drop_to_nobody() -> None:  # pragma: no cover - runs in the forked child
    nobody = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)


def _first_line(sock: _socket.socket) -> str:  # pragma: no cover - runs in the forked child
    data = b""
    while b"\n" not in data:
        chunk = sock.recv(1024)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n", 1)[0].decode()


def unix_greeting(path: str) -> Callable[[list[object]], str]:
    """A connection to the socket at `path`: its first line, or the error's name."""
    def connect(keep: list[object]) -> str:  # pragma: no cover - runs in the forked child
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.settimeout(10)
        keep.append(sock)
        try:
            sock.connect(path)
        except OSError as exc:
            return type(exc).__name__
        return _first_line(sock)
    return connect


def tcp_greeting(port: int, source: str) -> Callable[[list[object]], str]:
    """A connection to 127.0.0.1:`port` from `source`: its first line."""
    def connect(keep: list[object]) -> str:  # pragma: no cover - runs in the forked child
        sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        sock.settimeout(10)
        keep.append(sock)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        return _first_line(sock)
    return connect


_close = posix.close  # gevent's os.close (the suite is monkey-patched) waits for the hub, which the child never runs


@contextlib.contextmanager
def local_user(connections: list[Callable[[list[object]], str]]) -> Iterator[list[str]]:
    """A process as `nobody` opens `connections` in order and holds them open until the block
    ends; yields what each got first (a greeting, an -ERR line, or an error's name)."""
    report_r, report_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            _close(report_r)
            _close(hold_w)
            _drop_to_nobody()
            keep: list[object] = []
            answers = [connect(keep) for connect in connections]
            os.write(report_w, json.dumps(answers).encode() + b"\n")
            os.read(hold_r, 1)  # until the test closes its end
            status = 0
        except BaseException as exc:  # noqa: BLE001 - reported to the test, never raised in a fork
            os.write(report_w, json.dumps([f"child failed: {exc!r}"]).encode() + b"\n")
        finally:
            os._exit(status)
    _close(report_w)
    _close(hold_r)
    try:
        data = b""
        while not data.endswith(b"\n"):
            chunk = os.read(report_r, 65536)
            assert chunk, "the local user's process died"
            data += chunk
        yield json.loads(data)
    finally:
        _close(report_r)
        _close(hold_w)
        os.waitpid(pid, 0)


# -- the server --------------------------------------------------------------------------

class Started:
    """A server started with exactly the flags given (no MSMP flags added), with its ready file."""

    def __init__(self, root: Path, *args: str) -> None:
        self.root = root
        self.log_path = root / "server.log"
        self.ready_path = root / "ready.json"
        self.pop3_port = free_port()
        self.args = [*launcher.GEVENTPOP3, "-l", "127.0.0.1", "-p", str(self.pop3_port), "-d", str(root / "mail"),
                     "--state-dir", str(root / "state"), "-a", f"{ADMIN[0]}:{ADMIN[1]}", *args]
        self.process, self.served = launcher.start(self.args, ready_file=self.ready_path, log_path=self.log_path,
                                                   cwd=REPO, env=server_env())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        return launcher.stop(self.process)


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory `nobody` may traverse (pytest's are root's, 0700): the socket's own mode,
    not a directory on the way, is what keeps a local user out."""
    with filter_tmp_dir() as path:
        path.chmod(0o755)
        yield path


@pytest.fixture
def started(base: Path) -> Iterator[Callable[..., Started]]:
    servers: list[Started] = []

    def start(*args: str) -> Started:
        root = base / f"s{len(servers)}"
        root.mkdir(mode=0o755)
        servers.append(Started(root, *args))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def tcp_listen_ports(pid: int) -> set[int]:
    """The TCP ports the process tree of `pid` listens on."""
    ports = set()
    for process in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        ports |= {conn.laddr.port for conn in process.net_connections("tcp") if conn.status == psutil.CONN_LISTEN}
    return ports


def admin_login(client: MsmpClient) -> dict[str, str]:
    """Connect, log in, STAT, QUIT: the STAT."""
    with client:
        client.login(*ADMIN)
        return client.stat()


def shell(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "admin", *args], cwd=REPO, capture_output=True, text=True,
                          env=server_env({"GEVENTPOP3_ADMIN_PASSWORD": ADMIN[1]}), timeout=60,
                          stdin=subprocess.DEVNULL)


# -- tests -------------------------------------------------------------------------------

@as_root
def test_by_default_msmp_is_on_the_socket_only(started: Callable[..., Started]) -> None:
    """Started as an administrator would (default workers, no MSMP flags): the socket at
    /run/geventpop3/msmp.sock, 0600 root, named in the log; no TCP listener but POP3's;
    the shell's one-shot STAT finds it without flags."""
    server = started()
    info = os.lstat(SYSTEM_SOCKET)
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert (info.st_uid, info.st_gid) == (0, 0)
    assert server.served["msmp"] == [] and server.served["msmp_socket"] == [{"path": SYSTEM_SOCKET}]
    assert f"MSMP listening on socket {SYSTEM_SOCKET} (mode 0600, uid 0, gid 0)" in server.log()
    assert tcp_listen_ports(server.process.pid) == {server.pop3_port}
    done = shell("STAT")
    assert done.returncode == 0, done.stderr
    assert "Current connections" in done.stdout
    with local_user([unix_greeting(SYSTEM_SOCKET)]) as answers:
        assert answers == ["PermissionError"]
    assert server.stop() == 0
    assert not os.path.exists(SYSTEM_SOCKET)  # removed by the server that made it


@as_root
def test_the_socket_belongs_to_the_run_as_user_and_a_stale_one_is_replaced(base: Path) -> None:
    """With --run-as nobody the socket is nobody's (0600); the server cannot remove it from
    root's /run/geventpop3 at the end, and the next start replaces the stale file."""
    nobody = pwd.getpwnam("nobody")
    for attempt in range(2):
        root = base / f"run{attempt}"
        root.mkdir()
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        server = Started(root, "--run-as", "nobody", "--workers", "1")
        try:
            info = os.lstat(SYSTEM_SOCKET)
            assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (nobody.pw_uid, nobody.pw_gid, 0o600)
            assert admin_login(MsmpClient(path=SYSTEM_SOCKET))["Current connections"] == "0"
        finally:
            assert server.stop() == 0
        if attempt == 0:
            assert stat.S_ISSOCK(os.lstat(SYSTEM_SOCKET).st_mode)  # left behind, stale
            assert "removed the stale socket" not in server.log()
    assert f"removed the stale socket {SYSTEM_SOCKET}" in server.log()
    os.unlink(SYSTEM_SOCKET)  # stale again: no later start needs to say so


@as_root
def test_a_local_user_cannot_lock_the_admin_out(started: Callable[..., Started], base: Path) -> None:
    """The issue's attack: an unprivileged local process holds MSMP connections. The socket
    refuses it (0600); over TCP it holds at most 4 from one address (the 5th gets the one-line
    -ERR), so an admin from another address gets in; and when it fills every TCP slot from
    many loopback addresses, every admin login over the socket still succeeds."""
    port = free_port()
    path = str(base / "msmp.sock")
    server = started("-P", str(port), "-L", "127.0.0.1", "--admin-socket", path)
    assert server.served["msmp_socket"] == [{"path": path}]
    one_source = [tcp_greeting(port, "127.0.0.1") for _ in range(10)]
    with local_user([unix_greeting(path), *one_source]) as answers:
        assert answers[0] == "PermissionError"
        assert [answer.startswith(GREETING) for answer in answers[1:]] == [True] * 4 + [False] * 6
        assert set(answers[5:]) == {FROM_SOURCE}
        with LineClient(port, source="127.0.0.2") as tcp_admin:  # an admin from another address
            assert tcp_admin.login(*ADMIN) == b"+OK Logged in"
            assert tcp_admin.cmd("STAT") == b"+OK"
            assert "Admin connections refused: 6" in [line.decode() for line in tcp_admin.body_lines()]
    many_sources = [tcp_greeting(port, f"127.0.0.{n}") for n in range(10, 40)]
    with local_user(many_sources) as answers:
        assert set(answers) <= {TOO_MANY} | {a for a in answers if a.startswith(GREETING)}
        assert answers.count(TOO_MANY) >= 10  # every TCP slot (admin_max_connections = 20) taken
        started_at = time.monotonic()
        logins = [admin_login(MsmpClient(path=path)) for _ in range(20)]
        elapsed = time.monotonic() - started_at
        assert len(logins) == 20 and int(logins[-1]["Admin connections refused"]) >= 16
        assert elapsed < 20, f"20 admin logins over the socket took {elapsed:.1f} s"


@as_root
def test_admin_group_makes_the_socket_0660_for_that_group(started: Callable[..., Started], base: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid).gr_name  # nobody's own: it can connect through the group
    path = str(base / "admin.sock")
    server = started("--admin-socket", path, "--admin-group", group)
    info = os.lstat(path)
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o660, 0, nobody.pw_gid)
    assert f"MSMP listening on socket {path} (mode 0660, uid 0, gid {nobody.pw_gid})" in server.log()
    with local_user([unix_greeting(path) for _ in range(5)]) as answers:
        assert [answer.startswith(GREETING) for answer in answers] == [True] * 4 + [False]
        assert answers[4] == FROM_SOURCE  # one uid, one source
        assert admin_login(MsmpClient(path=path))["Current connections"] == "0"  # root: a source of its own


def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "msmp.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # its file stays: a server killed by SIGKILL leaves one so
    root = tmp_path / "server"
    root.mkdir()
    server = Started(root, "--admin-socket", str(path), "--workers", "1")
    try:
        assert admin_login(MsmpClient(path=str(path)))["Current connections"] == "0"
        assert f"removed the stale socket {path}" in server.log()
        assert shell("-s", str(path), "GET", "log_level").stdout.strip() == "INFO"
    finally:
        assert server.stop() == 0
    assert not path.exists()


def test_a_killed_server_leaves_a_socket_the_next_start_replaces(tmp_path: Path) -> None:
    path = tmp_path / "msmp.sock"
    root = tmp_path / "server"
    root.mkdir()
    first = Started(root, "--admin-socket", str(path), "--workers", "1")
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    second = Started(root, "--admin-socket", str(path), "--workers", "1")
    try:
        assert admin_login(MsmpClient(path=str(path)))["Current connections"] == "0"
    finally:
        second.stop()


def bind_refused(tmp_path: Path, path: Path) -> str:
    """The one line of a start that cannot make its socket at `path` (exit 2)."""
    done = run_server("-l", "127.0.0.1", "-p", str(free_port()), "-d", str(tmp_path / "mail"), "--no-state",
                      "--admin-socket", str(path), "--workers", "1")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_a_link_at_the_socket_path_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "msmp.sock"
    link.symlink_to(victim)
    assert bind_refused(tmp_path, link) == (f"geventpop3: cannot listen for MSMP on {link}: "
                                            "it exists and is a symbolic link: not replaced")
    assert link.is_symlink() and victim.read_text() == "precious\n"
    dangling = tmp_path / "dangling.sock"
    dangling.symlink_to(tmp_path / "nothing-here")
    assert "symbolic link: not replaced" in bind_refused(tmp_path, dangling)
    assert not (tmp_path / "nothing-here").exists()


def test_a_file_or_a_live_socket_at_the_path_stops_the_start(tmp_path: Path) -> None:
    regular = tmp_path / "file.sock"
    regular.write_text("x")
    assert bind_refused(tmp_path, regular).endswith(f"{regular}: it exists and is not a socket: not replaced")
    live_path = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(live_path))
        live.listen(1)
        assert bind_refused(tmp_path, live_path).endswith(f"{live_path}: another server listens there")
        assert stat.S_ISSOCK(os.lstat(live_path).st_mode)  # the other server's, untouched


def test_a_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert bind_refused(tmp_path, shared / "msmp.sock").endswith(
        f"its directory {shared} is writable by others, who could replace the socket")


@pytest.mark.parametrize(("args", "message"), [
    (["--admin-socket", "none"], "admin_socket none needs MSMP over TCP"),
    (["--admin-socket", "/tmp/" + "x" * 120], "too long for a UNIX socket"),
    (["--admin-group", "no-such-group-xyz"], "unknown group 'no-such-group-xyz' for admin_group"),
    (["--admin-socket", "none", "-P", "0", "--admin-group", "root"], "admin_group needs the admin socket"),
])
def test_bad_admin_socket_settings_are_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    done = run_server("-l", "127.0.0.1", "-p", "0", "-d", str(tmp_path / "mail"), "--no-state", *args)
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--tls", "STAT"], "--tls is for MSMP over TCP: give -L and/or -P"),
    (["-s", "/x.sock", "-P", "4321", "STAT"], "-s/--socket or -L/-P (TCP), not both"),
    (["-s", "/nonexistent/msmp.sock", "STAT"],
     "cannot connect to /nonexistent/msmp.sock: No such file or directory (is the server running?"),
])
def test_the_shell_on_a_bad_socket_choice_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    done = shell(*args)
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_the_client_library_takes_a_socket_or_tcp(tmp_path: Path) -> None:
    assert MsmpClient(path="/x.sock").where == "/x.sock"
    assert MsmpClient(port=4000).where == "127.0.0.1:4000"
    assert MsmpClient("::1").where == "[::1]:4321"
    with pytest.raises(ValueError):
        MsmpClient("127.0.0.1", path="/x.sock")
    with pytest.raises(MsmpConnectionError):
        MsmpClient(path=str(tmp_path / "none.sock")).connect()


def test_the_client_default_is_the_server_default() -> None:
    """admin.client.default_socket and the server's config.default_admin_socket agree (the
    client cannot import the server: the rule is written twice)."""
    from admin.client import default_socket
    from geventpop3.config import default_admin_socket

    assert default_socket() == default_admin_socket(os.geteuid(), os.environ) or (
        os.geteuid() != 0 and default_socket() == SYSTEM_SOCKET)
    assert default_admin_socket(0, {}) == SYSTEM_SOCKET
    assert default_admin_socket(1000, {"XDG_RUNTIME_DIR": "/run/user/1000"}) == "/run/user/1000/geventpop3/msmp.sock"
    assert default_admin_socket(1000, {}) == "/tmp/geventpop3-1000/msmp.sock"
