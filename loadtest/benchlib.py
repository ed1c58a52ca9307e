"""Helpers of the benchmark: test data, the two servers, memory readings, opening sessions.

Kept apart from `bench.py` so the phases read as measurements, not plumbing. The client
is `loadtest.pop3_client` (the caller monkey-patches, so its sockets are gevent's); the
phases check every byte it reads against what was delivered, so a fast but wrong server
cannot win. With `Certificates` both servers also listen for implicit TLS, `port` is then
that POP3S port and `ssl_context` what the client verifies them with.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from geventpop3.auth.users import hash_password
from geventpop3.testing.certs import Certificates
from geventpop3.testing.ports import free_port
from loadtest.launch import Geventpop3Process, wait_greeting
from loadtest.pop3_client import Pop3Client, Pop3Error

BENCH_HASH_COST = (2**8, 8, 1)  # cheap scrypt, for the benchmark's 10,000 users only
_PEER = Path(__file__).resolve().parents[1] / "tools" / "dovecot-peer"  # the private Dovecot peer's scripts
DOVECOT_START = str(_PEER / "dovecot-peer-start.sh")
DOVECOT_STOP = str(_PEER / "dovecot-peer-stop.sh")


class BenchError(Exception):
    """A server answered wrongly or too slowly: the run's figure is not valid."""


# What makes a phase's run invalid: a wrong answer, an -ERR, a lost or timed-out connection.
PHASE_ERRORS = (BenchError, Pop3Error, OSError)


# -- test data ---------------------------------------------------------------

def crlf(raw: bytes) -> bytes:
    """What RETR must send (before dot-stuffing) for a file stored with LF ends."""
    data = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def make_message(seed: str, size: int) -> bytes:
    """A deterministic LF-ended message of about `size` octets, with dot lines to stuff."""
    head = (f"From: bench <bench@localhost>\nTo: {seed}@localhost\nSubject: benchmark {seed}\n"
            f"Message-ID: <{seed}@bench>\n\n").encode()
    lines = [head, b".a line starting with a dot\n", b".\n.. two dots\n"]
    total = sum(map(len, lines))
    counter = 0
    while total < size:
        digest = hashlib.sha256(f"{seed}/{counter}".encode()).digest() * 2
        line = base64.b64encode(digest)[:75] + b"\n"
        if counter % 17 == 5:
            line = b"." + line[1:]
        lines.append(line)
        total += len(line)
        counter += 1
    return b"".join(lines)[:size - 1] + b"\n"


def make_big_message(size: int) -> bytes:
    """`size` octets of LF-ended lines (some starting with '.'), built from a 1 MiB block."""
    block = make_message("big", 1 << 20)
    body = block[block.index(b"\n\n") + 2:]
    head = block[:block.index(b"\n\n") + 2]
    parts = [head]
    total = len(head)
    while total < size:
        parts.append(body)
        total += len(body)
    return b"".join(parts)[:size - 1] + b"\n"


def deliver(maildir: str, name: str, content: bytes) -> None:
    """Write a message straight into new/ (the benchmark owns the tree, no race to fear)."""
    with open(os.path.join(maildir, "new", name), "wb") as handle:
        handle.write(content)


def make_maildir(root: str, user: str) -> str:
    path = os.path.join(root, user)
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
    return path


def password(user: str) -> str:
    return f"pw-{user}"


@dataclass
class Dataset:
    """The Maildir tree both servers serve, the users files and the expected content."""

    root: str
    session_users: list[str]
    held_users: list[str]
    expected: dict[str, dict[str, bytes]] = field(default_factory=dict)  # user -> uid -> CRLF bytes
    big_expected: bytes = b""
    many_count: int = 0
    many_total: int = 0
    users_gevent: str = ""
    users_dovecot: str = ""


def build_dataset(workdir: str, held: int, sessions_users: int, many: int, big_size: int,
                  log: Callable[[str], None]) -> Dataset:
    root = os.path.join(workdir, "mail")
    os.makedirs(root, exist_ok=True)
    data = Dataset(root=root, session_users=[f"s{i:03d}" for i in range(sessions_users)],
                   held_users=[f"h{i:05d}" for i in range(held)])
    stamp = 1700000000
    for user in data.session_users + ["pipe"]:
        path = make_maildir(root, user)
        data.expected[user] = {}
        for index in range(10):
            uid = f"{stamp + index}.M{index:06d}P1.bench-{user}"
            content = make_message(f"{user}-{index}", 4096)
            deliver(path, uid, content)
            data.expected[user][uid] = crlf(content)
    for user in data.held_users:
        make_maildir(root, user)
    log(f"delivering 1 message of {big_size >> 20} MiB and {many} small messages")
    big = make_big_message(big_size)
    deliver(make_maildir(root, "big"), f"{stamp}.M0P1.bench-big", big)
    data.big_expected = crlf(big)
    path = make_maildir(root, "many")
    for index in range(many):
        content = make_message(f"many-{index}", 1024 + index % 512)
        deliver(path, f"{stamp + index}.M{index:06d}P1.bench-many", content)
        data.many_total += len(crlf(content))
    data.many_count = many
    users = data.session_users + data.held_users + ["pipe", "big", "many"]
    log(f"hashing {len(users)} passwords with the cheap benchmark cost n=2**8")
    data.users_gevent = os.path.join(workdir, "users-geventpop3.txt")
    data.users_dovecot = os.path.join(workdir, "users-dovecot.txt")
    with open(data.users_gevent, "w") as gp, open(data.users_dovecot, "w") as dc:
        for user in users:
            gp.write(f"{user}:{hash_password(password(user), cost=BENCH_HASH_COST)}\n")
            dc.write(f"{user}:{password(user)}\n")
    return data


def reset_indexes(maildir: str) -> None:
    """Forget both servers' per-mailbox caches, so the next login is a first login."""
    for name in os.listdir(maildir):
        if name.startswith(("dovecot", "geventpop3.sizes")):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(maildir, name))


# -- servers -----------------------------------------------------------------

class Server:
    """A started server: its name, port and the processes whose memory counts."""

    name = "?"
    port = 0  # where the phases connect: the POP3S port with TLS
    ssl_context: ssl.SSLContext | None = None

    def pids(self) -> list[int]:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class GeventPop3(Server):
    name = "geventpop3"

    def __init__(self, port: int, data: Dataset, workdir: str, command: list[str] | None = None,
                 tls: Certificates | None = None, workers: int | None = None) -> None:
        self.port = port
        tls_args = [] if workers is None else ["--workers", str(workers)]
        if tls is not None:
            self.port, self.ssl_context = free_port(), client_context(tls)
            tls_args += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--pop3s-port", str(self.port)]
        config = os.path.join(workdir, "geventpop3.toml")
        with open(config, "w") as handle:
            # Every benchmark client connects from 127.0.0.1: lift the per-address cap too.
            handle.write("max_connections = 20000\nmax_connections_per_ip = 20000\n")
        self.server = Geventpop3Process(
            port, ["-d", data.root, "--users-file", data.users_gevent, "--config", config,
                   "-P", str(free_port()),  # MSMP off the default 4321, which another server may hold
                   "--state-dir", os.path.join(workdir, "state"), *tls_args],
            os.path.join(workdir, f"geventpop3-{port}.log"), command,
            cwd=workdir,  # not the caller's: `python -m` puts the cwd first on the path, a checkout there would win
            stop_timeout=20)
        try:
            self.server.start()
            if tls is not None:
                wait_tls_greeting(self.port, self.ssl_context, 30)
        except RuntimeError as exc:
            self.server.stop()
            raise BenchError(str(exc)) from exc

    def pids(self) -> list[int]:
        return self.server.pids()

    def stop(self) -> None:
        self.server.stop()


class Dovecot(Server):
    name = "dovecot"

    def __init__(self, port: int, data: Dataset, tls: Certificates | None = None) -> None:
        self.port = port
        env = dict(os.environ)
        if tls is not None:  # the peer script's options: STLS on `port`, implicit TLS on POP3S_PORT
            self.port, self.ssl_context = free_port(), client_context(tls)
            env.update(TLS_CERT=str(tls.cert), TLS_KEY=str(tls.key), POP3S_PORT=str(self.port))
        # Output to a file, not a pipe: the daemon inherits the descriptor and keeps it open.
        with tempfile.TemporaryFile("w+") as out:
            code = subprocess.run([DOVECOT_START, str(port), data.root, data.users_dovecot],
                                  stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  timeout=300, env=env).returncode
            out.seek(0)
            text = out.read().strip()
        if code != 0 or not text:
            raise BenchError(f"dovecot peer did not start: {text[-300:]}")
        self.run_dir = text.splitlines()[-1]
        self.master = self._master_pid(60)
        try:
            wait_greeting(port, 60)
            if tls is not None:
                wait_tls_greeting(self.port, self.ssl_context, 30)
        except RuntimeError as exc:
            self.stop()
            raise BenchError(str(exc)) from exc

    def _master_pid(self, timeout: float) -> int:
        """The master's pid: on a loaded machine the file may appear after the start script returned."""
        path = os.path.join(self.run_dir, "base", "master.pid")
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, ValueError), open(path) as handle:
                return int(handle.read().strip())
            if time.monotonic() > deadline:
                raise BenchError(f"dovecot peer wrote no {path} within {timeout:g} s")
            time.sleep(0.1)

    def pids(self) -> list[int]:
        try:
            master = psutil.Process(self.master)
            return [self.master] + [child.pid for child in master.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def pop3_pids(self) -> list[int]:
        found = []
        for pid in self.pids():
            with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as handle:
                if handle.read().strip() == "pop3":
                    found.append(pid)
        return found

    def stop(self) -> None:
        subprocess.run([DOVECOT_STOP, self.run_dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       stdin=subprocess.DEVNULL, timeout=120)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and psutil.pid_exists(self.master):
            time.sleep(0.1)
        shutil.rmtree(self.run_dir, ignore_errors=True)


# -- memory ------------------------------------------------------------------

def rollup(pid: int) -> tuple[int, int]:
    """(PSS, RSS) in KiB of one process, (0, 0) if it is gone."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except OSError:
        pass
    return pss, rss


def memory(pids: list[int]) -> tuple[int, int]:
    """Summed (PSS, RSS) in KiB over `pids` (RSS double-counts shared pages; PSS does not)."""
    pss = rss = 0
    for pid in pids:
        p, r = rollup(pid)
        pss += p
        rss += r
    return pss, rss


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds (user + system, with reaped children: Dovecot's finished pop3 processes) of `pids`."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


def own_cpu_seconds() -> float:
    """CPU seconds of the benchmark's client process: it shares the two cores with the server."""
    times = os.times()
    return times.user + times.system


def status_kib(pid: int, field_name: str) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise BenchError(f"no {field_name} for pid {pid}")


def reset_peak(pid: int) -> None:
    """Make VmHWM start again from the current RSS (clear_refs 5, Linux 4.0+)."""
    with open(f"/proc/{pid}/clear_refs", "w") as handle:
        handle.write("5")


# -- client ------------------------------------------------------------------

def client_context(tls: Certificates) -> ssl.SSLContext:
    """What the benchmark's clients verify a server with: the throw-away CA, host name checked."""
    return ssl.create_default_context(cafile=str(tls.ca))


def wait_tls_greeting(port: int, context: ssl.SSLContext | None, timeout: float) -> None:
    """Return once the POP3S port completes a handshake and greets; RuntimeError when time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        client = Pop3Client("127.0.0.1", port, 2, ssl_context=context)
        try:
            client.connect()
            return
        except (OSError, Pop3Error) as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no TLS greeting on port {port} within {timeout:g} s: {exc}") from None
            time.sleep(0.05)
        finally:
            client.close()


def connect(port: int, timeout: float, ssl_context: ssl.SSLContext | None = None) -> Pop3Client:
    """A client connected to the server on loopback (with a context: over implicit TLS), greeting read."""
    client = Pop3Client("127.0.0.1", port, timeout, ssl_context=ssl_context)
    client.connect()
    return client


def session(port: int, user: str, timeout: float, ssl_context: ssl.SSLContext | None = None) -> Pop3Client:
    """A logged-in client of one of the benchmark's users."""
    client = connect(port, timeout, ssl_context)
    try:
        client.login(user, password(user))
    except BaseException:
        client.close()
        raise
    return client
