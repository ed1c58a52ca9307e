"""Shared fixtures: the real server started as users start it, on ephemeral loopback ports."""

from __future__ import annotations

from gevent import monkey

# In-process tests (store, MSMP server) run under gevent like the server does.
monkey.patch_all()

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from geventpop3 import maildir

DEFAULT_USERS = {"alice": "alicepw", "bob": "bobpw", "carol": "carolpw"}
ADMIN = ("admin", "adminpw")


def free_port() -> int:
    """A port free on both loopback families right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe6:
                probe6.bind(("::1", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port")


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02) -> object:
    """Poll `predicate` until it returns something true, or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class ServerProcess:
    """`python -m geventpop3 ...` in a subprocess, with its Maildir and state."""

    def __init__(self, root: Path, users: dict[str, str] | None = None, config: str = "",
                 extra_args: list[str] | None = None, admin: bool = True) -> None:
        self.root = root
        self.maildir = root / "mail"
        self.state_dir = root / "state"
        self.maildir.mkdir(parents=True, exist_ok=True)
        self.users = dict(DEFAULT_USERS if users is None else users)
        self.port = free_port()
        self.admin_port = free_port()
        self.config_path = root / "server.toml"
        self.config_path.write_text("login_failure_delay = 0.05\n" + config)
        self.log_path = root / "server.log"
        args = [
            sys.executable, "-m", "geventpop3",
            "-l", "127.0.0.1", "-l", "::1", "-p", str(self.port),
            "-P", str(self.admin_port), "-d", str(self.maildir), "--state-dir", str(self.state_dir),
            "--config", str(self.config_path),
        ]
        for name, password in self.users.items():
            args += ["-u", f"{name}:{password}"]
        if admin:
            args += ["-a", f"{ADMIN[0]}:{ADMIN[1]}"]
        self.args = args + list(extra_args or [])
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        def ready() -> bool:
            ports = [self.port] + ([self.admin_port] if "-a" in self.args else [])
            return all(_accepts(host, port) for port in ports for host in ("127.0.0.1", "::1"))

        while not ready():
            if self.process.poll() is not None:
                raise AssertionError(f"server exited {self.process.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"server did not start: {self.log()}")
            time.sleep(0.02)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._log.close()
        return code

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


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: start_server(users=..., config=..., extra_args=...) -> a running server."""
    started: list[ServerProcess] = []

    def start(**kwargs: object) -> ServerProcess:
        root = tmp_path / f"server{len(started)}"
        server = ServerProcess(root, **kwargs).start()  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process is not None and server.process.poll() is None:
            server.stop()


@pytest.fixture
def server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    """A running server with users alice, bob and carol and an admin."""
    return start_server()
