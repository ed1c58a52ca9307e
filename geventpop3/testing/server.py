"""A real geventpop3 server for any test suite: `Pop3TestServer`, also behind the pytest plugin.

    with Pop3TestServer(users={"alice": "secret"}) as server:
        uidl = server.deliver("alice", b"Subject: hi\\n\\nhello\\n")
        client = poplib.POP3(server.host, server.port)

The server runs as a child process (`python -m geventpop3`), so the test process is never
monkey-patched: this module imports only the standard library and the MSMP client (plain
sockets), and `trustme` for `tls=True`. The child binds port 0 on loopback and reports the
ports it got in its `--ready-file`, so no free port is guessed (POP3S excepted: its port 0
means "none", so a free one is picked and the start retried if it was taken meanwhile).
Everything lives in one temporary directory (Maildir root, config, log, certificates, the
child's TMPDIR); `stop()` ends the child and its process group and removes the directory,
also after a failing test, a KeyboardInterrupt, or at interpreter exit.

What makes the start fast (see docs/testing.md): no state database (`--no-state`), no
metrics listener, and users in a users file as scrypt hashes of a tiny cost (no 50 ms
hash per user); `add_user` rewrites that file and has the server re-read it (RELOAD).
"""

from __future__ import annotations

import base64
import contextlib
import email.message
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import site
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from admin.client import MsmpClient, MsmpConnectionError

__all__ = ["Pop3TestServer", "Pop3TestServerError"]

Served = dict[str, Any]  # the ready file: {"pid": ..., "pop3": [{"host": ..., "port": ...}], ...}

ADMIN_NAME = "pop3test"
# Test-friendly defaults, each overridable through `settings`: a failed login is answered at once.
DEFAULT_SETTINGS: dict[str, object] = {"login_failure_delay": 0, "auth_penalty_max": 0}
CHEAP_COST = (2, 1, 1)  # scrypt n, r, p: microseconds instead of 50 ms; the server verifies it alike
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
POLL = 0.005
FAULT_FILTER = """#!/bin/sh
# Pop3TestServer's fault filter: the message unchanged, unless a fault is set for its UIDL
# in the directory given as $1 (a file named after the UIDL: "tempfail" or "slow SECONDS").
case "$GEVENTPOP3_UIDL" in ""|*/*|.*) exec cat ;; esac
if [ -f "$1/$GEVENTPOP3_UIDL" ]; then
    read -r kind seconds < "$1/$GEVENTPOP3_UIDL"
    case "$kind" in
        tempfail) echo "Pop3TestServer fault: tempfail" >&2; exit 75 ;;
        slow) sleep "$seconds" ;;
    esac
fi
exec cat
"""
# The server's rules (docs/msmp.md ADD; maildir.uid_of), repeated here: the server's modules import gevent.
_USERNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,39}")
_FAULT = re.compile(r"tempfail|slow:(\d+(?:\.\d+)?)")


class Pop3TestServerError(RuntimeError):
    """The server could not start (the message ends with its log), or a fault was misused."""


def cheap_hash(password: str) -> str:
    """`$scrypt$` at a tiny cost: a users file entry the server loads and checks without 50 ms of work."""
    n, r, p = CHEAP_COST
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode("utf-8", "surrogateescape"), salt=salt, n=n, r=r, p=p)
    return f"$scrypt$n={n},r={r},p={p}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def uidl_of(name: str) -> str:
    """The UIDL the server shows for a Maildir file name (maildir.uid_of): its base name when
    that is a safe UIDL, in any `uidl_format` unless a dovecot-uidlist lists the file."""
    uid = name.split(":", 1)[0]
    if uid.isascii() and uid.isprintable() and " " not in uid and 0 < len(uid) <= 70 and uid[0] != "~":
        return uid
    return "~" + hashlib.blake2b(os.fsencode(name).split(b":", 1)[0], digest_size=16).hexdigest()


def _valid_user(user: str) -> str:
    if not _USERNAME.fullmatch(user):
        raise ValueError(f"unsafe user name {user!r}")
    return user


def _valid_password(password: str) -> str:
    if not password or "\n" in password or "\r" in password:
        raise ValueError("a password is one line, not empty")
    return password


def _as_bytes(message: bytes | str | email.message.Message) -> bytes:
    if isinstance(message, bytes):
        return message
    if isinstance(message, str):
        return message.encode("utf-8")
    if isinstance(message, email.message.Message):
        return message.as_bytes()
    raise TypeError(f"a message is bytes, str or email.message.Message, not {type(message).__name__}")


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        return "[" + ", ".join(json.dumps(item) for item in value) + "]"
    raise TypeError(f"setting value {value!r}: use str, int, float, bool or a list of str")


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _child_env(tmp: Path) -> dict[str, str]:
    """The test process's environment, with the child's temporary files in our directory and
    this copy of geventpop3 importable (a source checkout is not on the child's path by itself)."""
    env = dict(os.environ, TMPDIR=str(tmp))
    source = str(Path(__file__).resolve().parents[1])
    paths = env.get("PYTHONPATH", "").split(os.pathsep) if env.get("PYTHONPATH") else []
    installed = {os.path.realpath(path) for path in [*site.getsitepackages(), site.getusersitepackages()]}
    if source not in paths and os.path.realpath(source) not in installed:
        env["PYTHONPATH"] = os.pathsep.join([source, *paths])
    return env


def _exit_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the server gets SIGTERM if the test process dies without cleaning up (SIGKILL)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def _prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up now: between fork and exec only the call may run."""
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):
        return None


_PRCTL = _prctl()


def _wait_exited(process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait for the child to exit without reaping it (its pid, so its process group id, stays
    taken until then: the group can be killed without hitting a reused id)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:  # reaped already
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL)


def _cleanup(processes: list[subprocess.Popen[bytes]], root: Path) -> None:
    """End the server (SIGTERM, then SIGKILL for its whole process group) and remove `root`.

    A module-level function given the list the server's processes go into as soon as they
    exist: the finalizer that calls it must not keep the server object alive."""
    try:
        for process in processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
                _wait_exited(process, STOP_TIMEOUT)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)  # what is left of the group; the leader if it hung
            process.wait()
    finally:
        shutil.rmtree(root, ignore_errors=True)


class Pop3TestServer:
    """A geventpop3 server in a child process, started at construction, on loopback ports.

    `users`: name -> password. `tls`: a throw-away CA and certificate (trustme), STLS and
    POP3S (`pop3s_port`, `ca_path`, `ssl_context()`). `settings`: any setting of the server's
    config file (docs/configuration.md), such as `idle_timeout` or `transformer`.
    `faults`: run the fault filter, so `deliver(..., fault=...)` can make a message fail or
    slow. `host`: "127.0.0.1" or "::1". `args`: more `geventpop3` flags.
    """

    def __init__(self, users: Mapping[str, str] | None = None, *, tls: bool = False,
                 settings: Mapping[str, object] | None = None, faults: bool = False, host: str = "127.0.0.1",
                 args: Sequence[str] = (), timeout: float = START_TIMEOUT) -> None:
        settings = dict(settings or {})
        if faults and "transformer" in settings:
            raise ValueError("faults run through the transformer: give faults=True or a transformer, not both")
        self.host = host
        self.users: dict[str, str] = {_valid_user(name): _valid_password(password)
                                      for name, password in (users or {}).items()}
        self.admin_user = ADMIN_NAME
        self.admin_password = secrets.token_urlsafe(16)
        self.tls = tls
        self.faults = faults
        self.port = 0
        self.admin_port = 0
        self.pop3s_port: int | None = None
        self.pid = 0
        self.ca_path: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.root = Path(tempfile.mkdtemp(prefix="pop3testserver-"))
        self.maildir = self.root / "mail"
        self._log_path = self.root / "server.log"
        self._ready_path = self.root / "ready.json"
        self._log_mark = 0
        self._initial = dict(self.users)  # what clear() brings the users back to
        self._users_file = self.root / "users"
        self._entries: dict[tuple[str, str], str] = {}  # (name, password) -> its line's hash, kept across rewrites
        self._changed: dict[str, str] = {}  # setting -> value before set()
        self._client: MsmpClient | None = None
        self._processes: list[subprocess.Popen[bytes]] = []  # every start attempt's, for the clean-up
        self._finalizer = weakref.finalize(self, _cleanup, self._processes, self.root)
        try:
            argv = self._prepare(settings, list(args))
            self._start(argv, timeout)
        except BaseException:
            self.stop()
            raise

    # -- start and stop ------------------------------------------------------
    def _prepare(self, settings: dict[str, object], extra: list[str]) -> list[str]:
        """The directory's files and the command line (without the POP3S port)."""
        (self.root / "tmp").mkdir()
        config = {**DEFAULT_SETTINGS, **settings}
        (self.root / "server.toml").write_text("".join(f"{key} = {_toml_value(value)}\n"
                                                        for key, value in config.items()))
        self._write_users_file()
        argv = [sys.executable, "-m", "geventpop3", "-l", self.host, "-p", "0", "-L", self.host, "-P", "0",
                "-d", str(self.maildir), "--no-state", "--config", str(self.root / "server.toml"),
                "--users-file", str(self._users_file), "-a", f"{self.admin_user}:{cheap_hash(self.admin_password)}",
                "--ready-file", str(self._ready_path), "--workers", "1"]  # one process: fastest to start
        if self.tls:
            argv += self._make_certificate()
        if self.faults:
            argv += ["-t", self._make_fault_filter()]
        return argv + extra

    def _make_certificate(self) -> list[str]:
        try:
            import trustme
        except ImportError:
            raise Pop3TestServerError("tls=True needs trustme: pip install 'geventpop3[testing]'") from None
        directory = self.root / "tls"
        directory.mkdir()
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost", "127.0.0.1", "::1", common_name="localhost")  # fetchmail wants a CN
        self.ca_path = directory / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_path))
        leaf.private_key_and_cert_chain_pem.write_to_path(str(directory / "server.pem"))
        (directory / "server.pem").chmod(0o600)
        return ["--tls-cert", str(directory / "server.pem")]

    def _make_fault_filter(self) -> str:
        """The filter script and its fault directory, reachable by `nobody` (filters of a root server run as it)."""
        directory = self.root / "faults"
        directory.mkdir(mode=0o755)
        directory.chmod(0o755)
        self.root.chmod(0o711)  # traversable, not listable
        script = directory / "filter.sh"
        script.write_text(FAULT_FILTER)
        script.chmod(0o755)
        return shlex.join([str(script), str(directory)])

    def _start(self, argv: list[str], timeout: float) -> None:
        attempts = 3 if self.tls else 1  # the POP3S port is picked free, and may be taken before the bind
        for attempt in range(attempts):
            pop3s = ["--pop3s-port", str(_free_port(self.host))] if self.tls else []
            with open(self._log_path, "ab") as log:
                in_main_thread = threading.current_thread() is threading.main_thread()
                self._processes.append(subprocess.Popen(  # in the list at once: an interrupt cannot lose it
                    argv + pop3s, cwd=self.root, env=_child_env(self.root / "tmp"), stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT, process_group=0,
                    preexec_fn=_exit_with_parent if _PRCTL is not None and in_main_thread else None))
            self.process = self._processes[-1]
            served = self._wait_ready(self.process, timeout)
            if served is not None:
                self._take(served)
                return
            if attempt + 1 < attempts and re.search(r"cannot listen for POP3S .*in use", self._tail()):
                continue
            raise Pop3TestServerError(f"geventpop3 exited {self.process.returncode} at start:\n{self._tail()}")

    def _wait_ready(self, process: subprocess.Popen[bytes], timeout: float) -> Served | None:
        """The ready file's endpoints once the server serves; None if it exited first."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(FileNotFoundError):
                served: Served = json.loads(self._ready_path.read_text())
                return served
            if process.poll() is not None:
                return None
            if time.monotonic() > deadline:
                raise Pop3TestServerError(f"geventpop3 not ready within {timeout} s:\n{self._tail()}")
            time.sleep(POLL)

    def _take(self, served: Served) -> None:
        self.pid = int(served["pid"])
        self.port = int(served["pop3"][0]["port"])
        self.admin_port = int(served["msmp"][0]["port"])
        if served["pop3s"]:
            self.pop3s_port = int(served["pop3s"][0]["port"])

    def stop(self) -> None:
        """End the server and remove its directory; safe to call twice, and called for you at exit."""
        if self._client is not None:
            self._client.close()
            self._client = None
        self._finalizer()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> Pop3TestServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Pop3TestServer {self.host}:{self.port} pid={self.pid} {'running' if self.running else 'stopped'}>"

    # -- the log -------------------------------------------------------------
    @property
    def log(self) -> list[str]:
        """The server's log lines since the start, or since the last `clear()`."""
        try:
            with open(self._log_path, "rb") as handle:
                handle.seek(self._log_mark)
                return handle.read().decode("utf-8", "replace").splitlines()
        except FileNotFoundError:
            return []

    def _tail(self, lines: int = 20) -> str:
        with contextlib.suppress(FileNotFoundError):
            return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    # -- users and settings, over MSMP ----------------------------------------
    def admin(self) -> MsmpClient:
        """A new MSMP client, logged in as the server's admin (use it in a `with` block)."""
        client = MsmpClient(self.host, self.admin_port, timeout=10)
        client.connect()
        client.login(self.admin_user, self.admin_password)
        return client

    def _msmp(self, call: str, *args: str) -> str:
        """One MSMP command on the kept connection (made again if the server closed it)."""
        for attempt in (1, 2):
            if self._client is None:
                self._client = self.admin()
            try:
                return str(getattr(self._client, call)(*args))
            except MsmpConnectionError:
                self._client.close()
                self._client = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def add_user(self, name: str, password: str) -> None:
        """Create a user, or change its password, in the running server: a line of the users
        file, then MSMP RELOAD (milliseconds; MSMP ADD would spend a 50 ms scrypt hash)."""
        self.users[_valid_user(name)] = _valid_password(password)
        self._reload_users()

    def delete_user(self, name: str) -> None:
        """Delete a user and its Maildir (its line goes from the users file, then RELOAD)."""
        if self.users.pop(name, None) is None:
            raise KeyError(f"no user {name!r}")
        self._reload_users()
        shutil.rmtree(self.user_dir(name), ignore_errors=True)

    def _reload_users(self) -> None:
        self._write_users_file()
        self._msmp("reload")

    def _write_users_file(self) -> None:
        """`name:$scrypt$...` lines at a tiny cost (any password fits: no colon in the hash),
        written under a temporary name and renamed, so the server never reads half of it."""
        lines = []
        for name, password in self.users.items():
            encoded = self._entries.get((name, password)) or cheap_hash(password)
            self._entries[(name, password)] = encoded  # an unchanged line keeps the server's cached logins
            lines.append(f"{name}:{encoded}\n")
        temp = self._users_file.with_suffix(".tmp")
        temp.touch(0o600)
        temp.write_text("".join(lines))
        os.replace(temp, self._users_file)

    def set(self, key: str, value: object) -> None:
        """Change a setting now (MSMP SET); `clear()` puts it back."""
        if key not in self._changed:
            self._changed[key] = self._msmp("get", key)
        self._msmp("set", key, str(value))

    # -- mail on disk ----------------------------------------------------------
    def user_dir(self, user: str) -> Path:
        return self.maildir / _valid_user(user)

    def deliver(self, user: str, message: bytes | str | email.message.Message, *, fault: str | None = None) -> str:
        """Deliver into `user`'s Maildir as a delivery agent does (a new file in tmp/, renamed into
        new/) and return the UIDL the server will show for it.

        `fault` (needs faults=True): "tempfail" - RETR and TOP of it answer
        `-ERR [SYS/TEMP] ...`; "slow:SECONDS" - the login that first lists it waits that long."""
        content = _as_bytes(message)
        slow = self._check_fault(fault)
        directory = self.user_dir(user)
        for sub in ("", "cur", "new", "tmp"):
            with contextlib.suppress(FileExistsError):
                (directory / sub).mkdir(mode=0o700)
        host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
        now = time.time_ns()
        name = f"{now // 10**9}.M{now // 1000 % 1_000_000:06d}P{os.getpid()}R{secrets.token_hex(4)}.{host}"
        uidl = uidl_of(name)
        if fault is not None:
            (self.root / "faults" / uidl).write_text(f"slow {slow}\n" if slow else "tempfail\n")
        temp = directory / "tmp" / name
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as handle:  # no fsync: a throw-away Maildir; the rename is what makes it appear whole
            handle.write(content)
        os.rename(temp, directory / "new" / name)
        return uidl

    def _check_fault(self, fault: str | None) -> str | None:
        """The seconds of a "slow:" fault, None otherwise; ValueError for anything unknown."""
        if fault is None:
            return None
        if not self.faults:
            raise Pop3TestServerError("deliver(fault=...) needs Pop3TestServer(faults=True)")
        match = _FAULT.fullmatch(fault)
        if match is None:
            raise ValueError(f"unknown fault {fault!r}: 'tempfail' or 'slow:SECONDS'")
        return match.group(1)

    def messages(self, user: str) -> dict[str, bytes]:
        """What is still on disk for `user`: UIDL -> stored content, in delivery order."""
        found: dict[str, bytes] = {}
        for sub in ("new", "cur"):
            directory = self.user_dir(user) / sub
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(directory):
                    if entry.is_file(follow_symlinks=False):
                        found.setdefault(uidl_of(entry.name), Path(entry.path).read_bytes())
        return dict(sorted(found.items()))  # names begin with the delivery time

    def clear(self, user: str | None = None) -> None:
        """Remove `user`'s mail; without a user, reset the server for the next test: every
        message, the users as they were at the start (`add_user` and `delete_user` undone),
        the settings `set()` changed, the login penalties, and the start of `log`."""
        users = [user] if user is not None else self._user_dirs()
        for name in users:
            for sub in ("new", "cur", "tmp"):
                with contextlib.suppress(FileNotFoundError):
                    for entry in os.scandir(self.user_dir(name) / sub):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.path)
        if user is not None:
            return
        if self.users != self._initial:
            for name in set(self.users) - set(self._initial):
                shutil.rmtree(self.user_dir(name), ignore_errors=True)
            self.users = dict(self._initial)
            self._reload_users()
        shutil.rmtree(self.maildir / ".deleted", ignore_errors=True)
        for key, value in self._changed.items():
            self._msmp("set", key, value)
        self._changed.clear()
        self._msmp("clear_penalty")
        with contextlib.suppress(FileNotFoundError):
            self._log_mark = self._log_path.stat().st_size

    def _user_dirs(self) -> list[str]:
        with contextlib.suppress(FileNotFoundError):
            return sorted(entry.name for entry in os.scandir(self.maildir)
                          if entry.is_dir(follow_symlinks=False) and _USERNAME.fullmatch(entry.name))
        return []

    # -- TLS -----------------------------------------------------------------
    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts the server's throw-away CA (host name checked: use
        "localhost", "127.0.0.1" or "::1")."""
        if self.ca_path is None:
            raise Pop3TestServerError("ssl_context() needs Pop3TestServer(tls=True)")
        return ssl.create_default_context(cafile=str(self.ca_path))
