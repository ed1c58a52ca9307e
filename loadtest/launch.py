"""How the load tools start and measure servers, on top of geventpop3.testing.

`Geventpop3Process` is geventpop3 on loopback through geventpop3.testing's launcher
(ready file, own process group), logged to a file; `command` replaces `python -m
geventpop3` (bench's --gp-command, for A/B tests of a change). Ports, certificates
(`make_certificates(..., rsa=True)` for the TLS runs, geventpop3 and Dovecot alike),
HAProxy and PostgreSQL come from geventpop3.testing too; here are what only the load
tools need: waiting for any POP3 server's greeting, process trees, CPU readings, users.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from geventpop3.testing import launcher
from geventpop3.testing.ports import greets


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


class Geventpop3Process:
    """geventpop3 in a subprocess, as an operator starts it, POP3 on 127.0.0.1:`port` (0: any
    free port, known once started)."""

    def __init__(self, port: int, args: Sequence[str], log_path: str | os.PathLike[str],
                 command: Sequence[str] | None = None, cwd: str | os.PathLike[str] | None = None,
                 stop_timeout: float = 30) -> None:
        self.port = port
        # MSMP over TCP (callers give -P): no socket, or every server started so would want the same one.
        socket_args = launcher.tcp_only_msmp() if command is None and "--admin-socket" not in args else []
        self.args = [*(command or launcher.GEVENTPOP3), "-l", "127.0.0.1", "-p", str(port), *args, *socket_args]
        self.log_path = Path(log_path)
        self.ready_path = Path(f"{log_path}.ready")
        self.cwd = cwd
        self.stop_timeout = stop_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.served: launcher.Served = {}

    def start(self, timeout: float = 60) -> Geventpop3Process:
        """Launch; return once the server serves (RuntimeError if it exits or is not ready in time)."""
        try:
            self.process, self.served = launcher.start(self.args, ready_file=self.ready_path, log_path=self.log_path,
                                                       timeout=timeout, cwd=self.cwd, env=os.environ)
        except launcher.LaunchError as exc:
            raise RuntimeError(f"geventpop3: {exc}; see {self.log_path}") from None
        self.port = int(self.served["pop3"][0]["port"])
        return self

    def pids(self) -> list[int]:
        """The server's processes: the supervisor and its workers (one with --workers 1)."""
        return process_tree(self.process.pid) if self.process and self.process.poll() is None else []

    def stop(self) -> None:
        """SIGTERM (SIGKILL after `stop_timeout`), then whatever is left of its process group."""
        if self.process is not None:
            launcher.stop(self.process, timeout=self.stop_timeout)
