"""What the tests share on top of geventpop3.testing: the server process with an admin,
users and a config file, sessions on it, worker lookups, the app in this process.

Imported as `from helpers import ...`: pytest puts tests/ on sys.path when it loads
tests/conftest.py (rootdir-relative "prepend" import mode, no __init__.py files), both
for `python -m pytest` at the repo root and for one file (`python -m pytest tests/e2e/x.py`).
No test module imports another test module; conftest.py holds only fixtures.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import poplib
import shutil
import signal
import sqlite3
import ssl
import subprocess
import tempfile
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest

from admin.client import MsmpClient, MsmpConnectionError
from geventpop3.mail import maildir
from geventpop3.testing import launcher
from geventpop3.testing.certs import Certificates, make_certificates, make_stray_key
from geventpop3.testing.lineclient import CRLF, LineClient, tls_line_client
from geventpop3.testing.lineclient import start_tls as start_tls  # re-exported for the tests, as below
from geventpop3.testing.ports import accepts, free_dual_port, wait_until
from geventpop3.testing.ports import ipv6_loopback as ipv6_loopback
from geventpop3.testing.postgres import PostgresServer as PostgresServer

if TYPE_CHECKING:
    from geventpop3.process.server import App

REPO = Path(__file__).resolve().parents[1]
GEVENTPOP3 = list(launcher.GEVENTPOP3)
LOOPBACKS = ("127.0.0.1", "::1")
DEFAULT_USERS = {"alice": "alicepw", "bob": "bobpw", "carol": "carolpw"}
ADMIN = ("admin", "adminpw")
_names = itertools.count(1)


# -- ports ----------------------------------------------------------------------

free_port = free_dual_port  # one port on both loopbacks: the suite's servers listen on 127.0.0.1 and ::1


def unique_name(prefix: str = "u") -> str:
    """A user name no other test uses, so tests on a shared server never see each other's leftovers."""
    return f"{prefix}{os.getpid()}x{next(_names)}"


def crlf(content: bytes) -> bytes:
    """What RETR must send for a stored message (before dot-stuffing)."""
    text = content.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return text if text.endswith(CRLF) else text + CRLF


def chown_tree(root: Path, uid: int, gid: int) -> None:
    """Give `root` and everything below it to uid:gid (a server dropped to that user serves it); links not followed."""
    for path in [root, *root.rglob("*")]:
        os.chown(path, uid, gid, follow_symlinks=False)


@contextlib.contextmanager
def filter_tmp_dir() -> Iterator[Path]:
    """A temporary directory that filters can use: under a root server they run as `nobody`,
    and pytest's own temporary directories are 0700 below a 0700 /tmp/pytest-of-root."""
    path = Path(tempfile.mkdtemp(prefix="geventpop3-test-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def unpatched_close() -> Iterator[None]:
    """Around pexpect.spawn: tests/conftest.py monkey-patches with gevent, whose os.close defers
    the real close to the hub. ptyprocess closes its exec-error pipe and then blocks reading it, so the hub never runs
    and pexpect.spawn hangs. The original os.close while spawning avoids that."""
    try:
        from gevent import monkey
    except ImportError:
        yield
        return
    if not monkey.is_object_patched("os", "close"):
        yield
        return
    patched = os.close
    os.close = monkey.get_original("os", "close")
    try:
        yield
    finally:
        os.close = patched


# -- the server process ----------------------------------------------------------

def server_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a server subprocess: this checkout first on PYTHONPATH."""
    return launcher.child_env(env)


def run_server(*args: str, cwd: Path | str | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`python -m geventpop3 ARGS` to completion (start-up errors, --help): output captured.
    With MSMP over TCP (-P or -L) and no --admin-socket, `--admin-socket none` is added: the
    default socket is one per machine for root, which servers of other tests may hold."""
    tcp = any(arg in ("-P", "-L", "--admin-port", "--admin-address") for arg in args)
    extra = ["--admin-socket", "none"] if tcp and "--admin-socket" not in args else []
    return subprocess.run([*GEVENTPOP3, *args, *extra], cwd=cwd or REPO, env=server_env(), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


class ServerProcess:
    """`python -m geventpop3 ...` in a subprocess, with its Maildir, state, config file and log.

    Started by geventpop3.testing's launcher. `listen` and `admin_listen` become -l and -L
    flags (None: the server's default loopback pair, no flag). The ports are picked free on
    both loopbacks, not 0: one port for both families, kept across restarts. start() waits
    for the ready file, then until the POP3 port (and the MSMP port, with an admin) accepts
    on every host in `ready_hosts` / `admin_listen`. stop() and start() again restart on
    the same directories and ports; `args` may be edited in between.
    """

    def __init__(self, root: Path, users: dict[str, str] | None = None, config: str = "",
                 extra_args: Sequence[str] = (), admin: bool = True,
                 listen: Sequence[str] | None = LOOPBACKS, admin_listen: Sequence[str] | None = None,
                 ready_hosts: Sequence[str] | None = None, login_failure_delay: float = 0.05,
                 env: dict[str, str] | None = None, workers: int = 1) -> None:
        self.root = root
        self.maildir = root / "mail"
        self.state_dir = root / "state"
        self.maildir.mkdir(parents=True, exist_ok=True)
        self.users = dict(DEFAULT_USERS if users is None else users)
        self.port = free_port()
        self.admin_port = free_port()
        self.admin_hosts = list(admin_listen or LOOPBACKS) if admin else []
        self.admin_host = self.admin_hosts[0] if admin else ""
        self.ready_hosts = list(ready_hosts or listen or LOOPBACKS)
        self.config_path = root / "server.toml"
        defaults = f"login_failure_delay = {login_failure_delay}\n"
        if "auth_penalty_max" not in config:  # the penalty on, but short: tests of other things stay quick
            defaults += "auth_penalty_max = 0.2\n"
        self.config_path.write_text(defaults + config)
        self.log_path = root / "server.log"
        # Not under `root`: a server run with --run-as writes it after dropping root, and
        # pytest's directories are private to root.
        ready_dir = Path(tempfile.mkdtemp(prefix="geventpop3-ready-"))
        ready_dir.chmod(0o777)
        weakref.finalize(self, shutil.rmtree, ready_dir, True)
        self.ready_path = ready_dir / "ready.json"
        self.env = server_env(env)
        # MSMP's socket of its own (the default is one per machine for root), as well as TCP.
        self.admin_socket = root / "msmp.sock"
        assert len(bytes(self.admin_socket)) <= 107, f"socket path too long: {self.admin_socket}"
        args = [*GEVENTPOP3, *(arg for host in listen or () for arg in ("-l", host)), "-p", str(self.port),
                "-P", str(self.admin_port), *(arg for host in admin_listen or () for arg in ("-L", host)),
                "-d", str(self.maildir), "--state-dir", str(self.state_dir), "--config", str(self.config_path),
                "--admin-socket", str(self.admin_socket)]
        for name, password in self.users.items():
            args += ["-u", f"{name}:{password}"]
        if admin:
            args += ["-a", f"{ADMIN[0]}:{ADMIN[1]}"]
        # One process unless a test asks for workers: the default (the CPUs) would make
        # every test pay for a supervisor and N interpreters.
        self.args = args + ["--workers", str(workers)] + list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> ServerProcess:
        """Launch `args`; return once it serves and every listener accepts (fails with the log if it exits)."""
        self.process = launcher.launch(self.args, ready_file=self.ready_path, log_path=self.log_path, cwd=REPO,
                                       env=self.env)
        try:
            launcher.wait_ready(self.process, self.ready_path, timeout)
        except launcher.LaunchError as exc:
            if exc.returncode is None:
                raise AssertionError(f"server did not start: {self.log()}") from None
            raise AssertionError(f"server exited {exc.returncode}: {self.log()}") from None
        endpoints = [(host, self.port) for host in self.ready_hosts]
        endpoints += [(host, self.admin_port) for host in self.admin_hosts]
        wait_until(lambda: all(accepts(host, port) for host, port in endpoints), timeout)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        """Send `sig` (SIGKILL after `timeout`) and return the exit status; its workers are left
        to react on their own (tests of a supervisor's death watch them)."""
        assert self.process is not None
        return launcher.stop(self.process, sig, timeout, kill_group=False)

    def clean_up(self) -> None:
        """At the end of a test: stop it if running, and whatever is left of its process group."""
        if self.running:
            assert self.process is not None
            launcher.stop(self.process)

    def restart(self, sig: int = signal.SIGTERM) -> int:
        """Stop with `sig` and start again on the same flags, directories and ports; the exit status."""
        code = self.stop(sig)
        self.start()
        return code

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def user_dir(self, user: str) -> str:
        return str(self.maildir / user)

    def deliver(self, user: str, content: bytes) -> str:
        return maildir.deliver(self.user_dir(user), content)

    def message_files(self, user: str) -> list[str]:
        found = []
        for sub in ("new", "cur"):
            path = os.path.join(self.user_dir(user), sub)
            if os.path.isdir(path):
                found += sorted(os.path.join(path, name) for name in os.listdir(path))
        return found

    def msmp_client(self, host: str | None = None, timeout: float = 10.0) -> MsmpClient:
        """An MSMP client for this server over TCP, not yet connected."""
        return MsmpClient(host or self.admin_host, self.admin_port, timeout)

    def socket_client(self, timeout: float = 10.0) -> MsmpClient:
        """An MSMP client for this server's UNIX socket, not yet connected."""
        return MsmpClient(path=str(self.admin_socket), timeout=timeout)

    def admin_client(self, host: str | None = None, timeout: float = 15.0) -> MsmpClient:
        """A connected, logged-in MSMP client; the caller closes it."""
        client = self.msmp_client(host, timeout)

        def connected() -> bool:
            try:
                client.connect()
            except MsmpConnectionError:
                return False
            return True

        wait_until(connected)
        client.login(*ADMIN)
        return client


@contextlib.contextmanager
def started_servers(root: Path) -> Iterator[Callable[..., ServerProcess]]:
    """start(**ServerProcess arguments) -> a running server under `root`; all stopped at the end."""
    started: list[ServerProcess] = []

    def start(**kwargs: object) -> ServerProcess:
        server = ServerProcess(root / f"server{len(started)}", **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in started:
            server.clean_up()


# -- worker processes of --workers N (geventpop3.process) ------------------------------

def workers_of(server: ServerProcess) -> list[int]:
    """The pids of the worker processes serving now (children of the keeper, a child of the
    supervisor: geventpop3.process.keeper), by their process title."""
    assert server.process is not None
    pids = []
    for child in psutil.Process(server.process.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.cmdline()[:1] and child.cmdline()[0].startswith("geventpop3: worker"):
                pids.append(child.pid)
    return pids


def keeper_of(server: ServerProcess) -> int | None:
    """The pid of the server's keeper, if it has one."""
    assert server.process is not None
    for child in psutil.Process(server.process.pid).children():
        with contextlib.suppress(psutil.Error):
            if child.cmdline()[:1] == ["geventpop3: keeper"]:
                return child.pid
    return None


def worker_serving(server: ServerProcess, client: LineClient, port: int | None = None) -> int:
    """The pid of the worker holding the server side of `client`'s connection (to `port`, default POP3)."""
    local_port = client.sock.getsockname()[1]
    port = port or server.port

    def find() -> int | None:
        for pid in workers_of(server):
            try:
                connections = psutil.Process(pid).net_connections("tcp")
            except psutil.NoSuchProcess:
                continue
            for conn in connections:
                if conn.laddr and conn.laddr.port == port and conn.raddr and conn.raddr.port == local_port:
                    return pid
        return None

    return wait_until(find)


@contextlib.contextmanager
def one_per_worker(server: ServerProcess, count: int = 2,
                   connect: Callable[[], LineClient] | None = None, port: int | None = None,
                   made: list[int] | None = None) -> Iterator[dict[int, LineClient]]:
    """A greeted POP3 connection on each of `count` workers, by worker pid (extras are closed);
    `connect` and `port` for another listener than plain POP3; `made` gets how many connections it took."""
    found: dict[int, LineClient] = {}
    try:
        for attempt in range(1, 201):
            client = connect() if connect is not None else LineClient(server.port)
            if made is not None:
                made[:] = [attempt]
            pid = worker_serving(server, client, port)
            if pid in found:
                client.close()
            else:
                found[pid] = client
            if len(found) == count:
                break
        assert len(found) == count, f"connections reached only workers {list(found)}"
        yield found
    finally:
        for client in found.values():
            client.close()


# -- sessions on the real server -------------------------------------------------

@contextlib.contextmanager
def admin(server: ServerProcess, host: str = "127.0.0.1") -> Iterator[MsmpClient]:
    """A logged-in MSMP session, QUIT at the end."""
    client = server.admin_client(host)
    try:
        yield client
    finally:
        with contextlib.suppress(OSError):
            client.quit()
        client.close()


def counters(client: MsmpClient) -> dict[str, int]:
    return {name: int(float(value)) for name, value in client.stat().items()}


def quiet_stat(client: MsmpClient) -> dict[str, int]:
    """STAT once no POP3 connection is open (closing is asynchronous in the server)."""
    return wait_until(lambda: (stat := counters(client))["Current connections"] == 0 and stat)


def logs_with(client: MsmpClient, user: str, needle: str, count: int = 1) -> list[str]:
    """LOGS user, polled until `count` lines contain `needle` (a logout is logged after QUIT is answered)."""
    return wait_until(lambda: (lines := client.logs(user)) and sum(needle in line for line in lines) >= count
                      and lines)


def pop3(server: ServerProcess, user: str, password: str, host: str = "127.0.0.1") -> poplib.POP3:
    """A POP3 session logged in with poplib (fails the test if the login is refused)."""
    session = poplib.POP3(host, server.port, timeout=10)
    session.user(user)
    session.pass_(password)
    return session


def login_error(server: ServerProcess, user: str, password: str, host: str = "127.0.0.1") -> bytes:
    """The -ERR a POP3 login gets (fails the test if it succeeds)."""
    session = poplib.POP3(host, server.port, timeout=10)
    try:
        session.user(user)
        with pytest.raises(poplib.error_proto) as refused:
            session.pass_(password)
        return refused.value.args[0]
    finally:
        session.close()


def retr(session: poplib.POP3, number: int) -> bytes:
    _, lines, _ = session.retr(number)
    return b"".join(line + b"\r\n" for line in lines)


def logged_in(server: ServerProcess, user: str = "alice", host: str = "127.0.0.1") -> LineClient:
    """A raw POP3 session, logged in."""
    client = LineClient(server.port, host)
    reply = client.login(user, server.users[user])
    assert reply.startswith(b"+OK"), reply
    return client


def can_login(server: ServerProcess, user: str) -> bool:
    """True if a fresh session logs in (then QUITs at once)."""
    with LineClient(server.port) as client:
        ok = client.login(user, server.users[user]).startswith(b"+OK")
        client.cmd("QUIT")
        return ok


# -- TLS: the session's throw-away CA, clients that verify against it --------------

@dataclass(frozen=True)
class TlsFiles(Certificates):
    """geventpop3.testing's certificates for localhost, 127.0.0.1 and ::1, and a stray key."""

    other_key: Path = Path()  # a key that does not belong to `cert`

    def server_args(self, pop3s_port: int | None = None) -> list[str]:  # type: ignore[override]
        return super().server_args() + ["--pop3s-port", str(pop3s_port if pop3s_port is not None else 0)]


def make_tls_files(directory: Path) -> TlsFiles:
    made = make_certificates(directory)
    return TlsFiles(made.ca, made.cert, made.key, make_stray_key(directory / "other-key.pem"))


def tls_client(port: int, files: TlsFiles, host: str = "127.0.0.1", context: ssl.SSLContext | None = None,
               source: str | None = None) -> LineClient:
    """A raw POP3S client, handshake done and greeting read; `source` binds the client's address."""
    return tls_line_client(port, context or files.client_context(), host, source)


# -- the app in this process -----------------------------------------------------

@contextlib.contextmanager
def running_app(argv: Sequence[str]) -> Iterator[App]:
    """The server's App run in a greenlet of the test process (monkey-patched like the
    server), with `argv` as its command line; stopped as SIGTERM would stop it."""
    import gevent

    from geventpop3.flags import parse_config
    from geventpop3.process.server import App

    # MSMP over TCP only (callers give -P): the default socket is one per machine for root.
    socket_args = [] if "--admin-socket" in argv else ["--admin-socket", "none"]
    app = App(parse_config([*argv, *socket_args]))
    runner = gevent.spawn(app.run)
    wait_until(lambda: app.admin_servers or runner.dead)
    assert not runner.dead, runner.value
    try:
        yield app
    finally:
        app.stopping.set()
        runner.join(15)
        runner.kill()


@contextlib.contextmanager
def state_db(server: ServerProcess) -> Iterator[sqlite3.Connection]:
    """A read-only look at the server's SQLite file, as another process sees it."""
    from geventpop3.process.server import STATE_DB

    db = sqlite3.connect(f"file:{server.state_dir / STATE_DB}?mode=ro", uri=True, timeout=5)
    try:
        yield db
    finally:
        db.close()


@contextlib.contextmanager
def getmail_destination() -> Iterator[tuple[Path, str | None]]:
    """An empty Maildir for getmail, and the user it delivers as: getmail refuses to
    deliver as root, so as root it delivers as `nobody`, in a directory outside pytest's
    private (0700) temporary tree."""
    root = Path(tempfile.mkdtemp(prefix="geventpop3-getmail-"))
    dest = root / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (dest / sub).mkdir(parents=True)
    user = None
    if os.geteuid() == 0:
        import pwd

        user = "nobody"
        nobody = pwd.getpwnam(user)
        root.chmod(0o755)
        for path in (dest, dest / "cur", dest / "new", dest / "tmp"):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
    try:
        yield dest, user
    finally:
        shutil.rmtree(root, ignore_errors=True)


