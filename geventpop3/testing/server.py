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
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

from admin.client import MsmpClient, MsmpConnectionError
from geventpop3.testing import launcher
from geventpop3.testing.certs import make_certificates
from geventpop3.testing.ports import free_port

__all__ = ["Pop3TestServer", "Pop3TestServerError"]

ADMIN_NAME = "pop3test"
# Test-friendly defaults, each overridable through `settings`: a failed login is answered at once.
DEFAULT_SETTINGS: dict[str, object] = {"login_failure_delay": 0, "auth_penalty_max": 0}
CHEAP_COST = (2, 1, 1)  # scrypt n, r, p: microseconds instead of 50 ms; the server verifies it alike
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
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


def _cleanup(processes: list[subprocess.Popen[bytes]], root: Path) -> None:
    """End the server (SIGTERM, then SIGKILL for its whole process group) and remove `root`.

    A module-level function given the list the server's processes go into as soon as they
    exist: the finalizer that calls it must not keep the server object alive."""
    try:
        for process in processes:
            launcher.stop(process, timeout=STOP_TIMEOUT)
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
        socket_path = self.root / "msmp.sock"  # MSMP's UNIX socket (TCP on `admin_port` too)
        self.admin_socket: Path | None = socket_path if len(bytes(socket_path)) <= 107 else None
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
                # a socket of its own (the default is one per machine for root), if its path fits one
                "--admin-socket", str(self.admin_socket) if self.admin_socket is not None else "none",
                "-d", str(self.maildir), "--no-state", "--config", str(self.root / "server.toml"),
                "--users-file", str(self._users_file), "-a", f"{self.admin_user}:{cheap_hash(self.admin_password)}",
                "--workers", "1"]  # one process: fastest to start; the launcher adds --ready-file
        if self.tls:
            argv += self._make_certificate()
        if self.faults:
            argv += ["-t", self._make_fault_filter()]
        return argv + extra

    def _make_certificate(self) -> list[str]:
        try:
            files = make_certificates(self.root / "tls", common_name="localhost")  # fetchmail wants a CN
        except RuntimeError as exc:
            raise Pop3TestServerError(f"tls=True: {exc}") from None
        self.ca_path = files.ca
        return files.server_args()

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
            pop3s = ["--pop3s-port", str(free_port(self.host))] if self.tls else []
            process = launcher.launch(argv + pop3s, ready_file=self._ready_path, log_path=self._log_path,
                                      cwd=self.root, env=launcher.child_env(tmp=self.root / "tmp"),
                                      started=self._processes)
            self.process = process
            try:
                self._take(launcher.wait_ready(process, self._ready_path, timeout))
                return
            except launcher.LaunchError as exc:
                if exc.returncode is None:
                    raise Pop3TestServerError(f"{exc}:\n{self._tail()}") from None
            if attempt + 1 < attempts and re.search(r"cannot listen for POP3S .*in use", self._tail()):
                continue
            raise Pop3TestServerError(f"geventpop3 exited {process.returncode} at start:\n{self._tail()}")

    def _take(self, served: launcher.Served) -> None:
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
