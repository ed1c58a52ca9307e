"""The one way the load tools start geventpop3: `python -m geventpop3` on loopback, logged to a file.

Used by the benchmark (`bench.py`, `bench_transform.py`) and by `run.py`. `command`
replaces `python -m geventpop3` (bench's --gp-command, for A/B tests of a change).
Stopping is SIGTERM, then SIGKILL after `stop_timeout`. `make_certificate` gives the TLS
runs a throw-away CA and a loopback server certificate, for geventpop3 and Dovecot alike.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

GEVENTPOP3 = (sys.executable, "-m", "geventpop3")


def free_port() -> int:
    """A loopback port free right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def greets(port: int, host: str = "127.0.0.1") -> bool:
    """True if a server on host:port answers a new connection with +OK."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1) as sock:
        return sock.recv(512).startswith(b"+OK")
    return False


def wait_greeting(port: int, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Return once the server on 127.0.0.1:`port` greets; RuntimeError if `alive()` turns false or time runs out."""
    deadline = time.monotonic() + timeout
    while not greets(port):
        if not alive():
            raise RuntimeError(f"the server on port {port} exited during start-up")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server on port {port} did not greet within {timeout:g} s")
        time.sleep(0.05)


def process_tree(root: int) -> list[int]:
    """`root` and every descendant (a --workers supervisor's workers, their filters; Dovecot's
    processes): the load tools sum CPU and memory over all of them."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


CHEAP_COST = (2**8, 8, 1)  # scrypt n, r, p of the load tools' users: cheap to make; logins are not what they measure


def make_users(root: str | os.PathLike[str], names: Sequence[str]) -> None:
    """Empty Maildirs `root`/mail/<name> and a users file `root`/users; each password is name + "pw"."""
    from geventpop3.auth.users import hash_password

    entries = []
    for name in names:
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(root, "mail", name, sub), exist_ok=True)
        entries.append(f"{name}:{hash_password(name + 'pw', CHEAP_COST)}")
    Path(root, "users").write_text("\n".join(entries) + "\n", encoding="ascii")


def own_cpu_seconds(pid: int) -> float:
    """utime + stime of one process from /proc (0 if it is gone): a busy machine does not inflate it."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of `pid` and its living descendants (with --workers: the supervisor and every worker)."""
    return sum(own_cpu_seconds(member) for member in process_tree(pid))


def interleaved(names: Sequence[str], rounds: int) -> Iterator[tuple[int, str]]:
    """(round, name) in the order A, B, B, A, ...: a drift of the machine's load hits every tree alike."""
    for number in range(rounds):
        for name in names if number % 2 == 0 else list(reversed(names)):
            yield number, name


def ratio_to(value: float, first: float, first_name: str) -> str:
    """`value` as a multiple of the first tree's figure (a CPU reading can be 0: too short to tick)."""
    return f"{value / first:.3f} x {first_name}" if first else "too short a run for the 10 ms CPU clock"


@dataclass(frozen=True)
class Certificate:
    """A throw-away CA (what clients trust) and the server's chain and key it signed."""

    ca: Path
    cert: Path
    key: Path


def make_certificate(directory: str | os.PathLike[str], rsa: bool = True) -> Certificate:
    """A CA and a certificate for localhost, 127.0.0.1 and ::1, written to `directory`.

    RSA 2048 by default, the key Dovecot's published TLS figures were measured with (the
    handshake's cost depends on it); `rsa=False` gives ECDSA P-256. Needs `trustme` (a test extra).
    """
    import trustme

    key_type = trustme.KeyType.RSA if rsa else trustme.KeyType.ECDSA
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    authority = trustme.CA(key_type=key_type)
    leaf = authority.issue_cert("localhost", "127.0.0.1", "::1", key_type=key_type)
    files = Certificate(folder / "ca.pem", folder / "cert.pem", folder / "key.pem")
    authority.cert_pem.write_to_path(str(files.ca))
    for index, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(str(files.cert), append=index > 0)
    leaf.private_key_pem.write_to_path(str(files.key))
    files.key.chmod(0o600)  # read by the server (Dovecot: as root) only
    return files


class Geventpop3Process:
    """geventpop3 in a subprocess, as an operator starts it, POP3 on 127.0.0.1:`port`."""

    def __init__(self, port: int, args: Sequence[str], log_path: str | os.PathLike[str],
                 command: Sequence[str] | None = None, cwd: str | os.PathLike[str] | None = None,
                 stop_timeout: float = 30) -> None:
        self.port = port
        self.args = [*(command or GEVENTPOP3), "-l", "127.0.0.1", "-p", str(port), *args]
        self.log_path = log_path
        self.cwd = cwd
        self.stop_timeout = stop_timeout
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> Geventpop3Process:
        """Launch; return once the server greets (RuntimeError if it exits or stays silent)."""
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=self.cwd)
        process = self.process
        try:
            wait_greeting(self.port, timeout, lambda: process.poll() is None)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"geventpop3: {exc}; see {self.log_path}") from None
        return self

    def pids(self) -> list[int]:
        """The server's processes: the supervisor and its workers (one with --workers 1)."""
        return process_tree(self.process.pid) if self.process and self.process.poll() is None else []

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# -- HAProxy in front (the PROXY protocol tests and bench_haproxy) -------------------------

_HAPROXY_DEFAULTS = """defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
"""


def haproxy_config(backends: dict[int, list[str]], global_lines: Sequence[str] = ()) -> str:
    """A TCP-mode HAProxy configuration: for each frontend port on 127.0.0.1, a round-robin
    backend of the given `server` lines (e.g. "one 127.0.0.1:1100 send-proxy-v2")."""
    parts = ["global\n", *(f"    {line}\n" for line in global_lines), _HAPROXY_DEFAULTS]
    for index, (port, servers) in enumerate(backends.items()):
        parts.append(f"frontend front{index}\n    bind 127.0.0.1:{port}\n    default_backend back{index}\n")
        parts.append(f"backend back{index}\n    balance roundrobin\n")
        parts.extend(f"    server {server}\n" for server in servers)
    return "".join(parts)


def start_haproxy(directory: Path, config: str, name: str = "haproxy") -> subprocess.Popen[bytes]:
    """`haproxy -db` (foreground, in its own session) on `config`, written to DIRECTORY/NAME.cfg,
    its output in NAME.log; the caller waits for its ports and stops it."""
    path = directory / f"{name}.cfg"
    path.write_text(config)
    with open(directory / f"{name}.log", "ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(["haproxy", "-db", "-f", str(path)], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


# -- a throw-away PostgreSQL (the shared-store tests and bench_haproxy) -------------------

def postgres_bin() -> Path | None:
    """The directory of the newest installed PostgreSQL server binaries (Debian keeps
    them off PATH, in /usr/lib/postgresql/<version>/bin), or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    """A throw-away PostgreSQL cluster: `initdb` into a temporary directory, `pg_ctl start`
    on a free loopback port (no Unix socket), trust authentication on loopback.

    PostgreSQL refuses to run as root: as root the cluster belongs to, and runs as, the
    `postgres` system user (the Debian package creates it). stop() and start() again
    keep the data, for tests of the server while the database is down."""

    def __init__(self, fsync: bool = False) -> None:
        self.fsync = fsync  # off for tests (a throw-away cluster); on to measure as deployed
        bindir = postgres_bin()
        if bindir is None:
            raise RuntimeError("PostgreSQL server binaries not installed (tools/install-system-deps.sh)")
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="geventpop3-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            import pwd

            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self._databases = itertools.count(1)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync",
                  "-E", "UTF8", "--locale=C")

    def _run(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        # its own session: a Ctrl-C reaches the caller only, which then stops the cluster in order
        return subprocess.run([*self._as, str(self.bindir / program), *args], capture_output=True, text=True,
                              timeout=120, check=check, stdin=subprocess.DEVNULL, cwd=self.root,
                              start_new_session=True)

    def start(self) -> PostgresServer:
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories='' "
                   f"-c fsync={'on' if self.fsync else 'off'} -c max_connections=200 -c shared_buffers=32MB")
        self._run("pg_ctl", "start", "-D", str(self.data), "-w", "-t", "60", "-l", str(self.root / "log"),
                  "-o", options)
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "60", check=False)

    @property
    def pid(self) -> int:
        """The postmaster's process id."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    @property
    def running(self) -> bool:
        return self._run("pg_ctl", "status", "-D", str(self.data), check=False).returncode == 0

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"test{next(self._databases)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def destroy(self) -> None:
        if self.running:
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
