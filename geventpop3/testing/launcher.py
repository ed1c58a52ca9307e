"""The one launcher: `python -m geventpop3 ... --ready-file FILE` as a child process.

Used by `Pop3TestServer`, by the suite's `ServerProcess` and by the load tools. The child
writes its bound endpoints to the ready file once it serves (JSON, written whole and
renamed: `{"pid": ..., "pop3": [{"host": ..., "port": ...}], "pop3s": [...], "msmp": [...],
"metrics": [...]}`), so a server on port 0 needs no guessed port and "ready" means
serving, every worker included. The child leads its own process group and, on Linux,
gets SIGTERM if the launching process dies without stopping it; `stop` ends the group, so
no worker or filter outlives the test.

Standard library only, and nothing of the server: the launching process stays free of
gevent and of the server's modules.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import site
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

GEVENTPOP3 = (sys.executable, "-m", "geventpop3")
SOURCE = str(Path(__file__).resolve().parents[2])  # the checkout (or site-packages) this package is in
POLL = 0.005  # seconds between looks at the ready file: a start takes about 0.3 s
STOP_TIMEOUT = 15.0

Served = dict[str, Any]  # the ready file's content


class LaunchError(RuntimeError):
    """The server exited during start-up (`returncode`), or was not ready in time (None)."""

    def __init__(self, message: str, returncode: int | None) -> None:
        super().__init__(message)
        self.returncode = returncode


def child_env(env: Mapping[str, str] | None = None, tmp: Path | None = None) -> dict[str, str]:
    """The launcher's environment plus `env`, with this copy of geventpop3 importable first
    (a source checkout is not on the child's path by itself) and TMPDIR=`tmp` if given."""
    merged = dict(os.environ, **(env or {}))
    if tmp is not None:
        merged["TMPDIR"] = str(tmp)
    paths = [path for path in merged.get("PYTHONPATH", "").split(os.pathsep) if path]
    installed = {os.path.realpath(path) for path in [*site.getsitepackages(), site.getusersitepackages()]}
    if os.path.realpath(SOURCE) not in installed and (not paths or paths[0] != SOURCE):
        merged["PYTHONPATH"] = os.pathsep.join([SOURCE, *(path for path in paths if path != SOURCE)])
    return merged


def tcp_only_msmp(source: str | os.PathLike[str] = SOURCE) -> list[str]:
    """`--admin-socket none` for the server of the tree at `source`, if it has that flag; for a
    command line that gives MSMP a TCP port. The default socket is one per machine for root
    (/run/geventpop3/msmp.sock): servers started side by side would contend for it. An older
    tree has no socket, and no flag: nothing to add."""
    try:
        known = "--admin-socket" in Path(source, "geventpop3", "flags.py").read_text(encoding="utf-8")
    except OSError:
        known = False
    return ["--admin-socket", "none"] if known else []


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


def _exit_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the server gets SIGTERM if the launching process dies without stopping it (SIGKILL)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def read_ready(path: Path) -> Served | None:
    """The ready file's endpoints, or None while there is none."""
    try:
        served: Served = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    return served


def launch(argv: Sequence[str], *, ready_file: Path, log_path: Path, cwd: Path | str | None = None,
           env: Mapping[str, str] | None = None,
           started: list[subprocess.Popen[bytes]] | None = None) -> subprocess.Popen[bytes]:
    """Start `argv` (a geventpop3 command line) with `--ready-file` added, its output appended
    to `log_path`; a ready file left by an earlier, killed run is removed first. `started`
    gets the process as soon as it exists (an interrupt cannot lose it)."""
    with contextlib.suppress(FileNotFoundError):
        ready_file.unlink()
    in_main_thread = threading.current_thread() is threading.main_thread()
    with open(log_path, "ab") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [*argv, "--ready-file", str(ready_file)], cwd=cwd, env=dict(env) if env is not None else child_env(),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, process_group=0,
            preexec_fn=_exit_with_parent if _PRCTL is not None and in_main_thread else None)
    if started is not None:
        started.append(process)
    return process


def wait_ready(process: subprocess.Popen[bytes], ready_file: Path, timeout: float) -> Served:
    """The ready file's endpoints once the server serves; LaunchError if it exits first or
    `timeout` passes (then it is stopped)."""
    deadline = time.monotonic() + timeout
    while True:
        served = read_ready(ready_file)
        if served is not None and served.get("pid") is not None:
            return served
        if process.poll() is not None:
            raise LaunchError(f"geventpop3 exited {process.returncode} during start-up", process.returncode)
        if time.monotonic() > deadline:
            stop(process, signal.SIGKILL)
            raise LaunchError(f"geventpop3 not ready within {timeout:g} s", None)
        time.sleep(POLL)


def start(argv: Sequence[str], *, ready_file: Path, log_path: Path, timeout: float = 30.0,
          cwd: Path | str | None = None, env: Mapping[str, str] | None = None,
          started: list[subprocess.Popen[bytes]] | None = None) -> tuple[subprocess.Popen[bytes], Served]:
    """`launch` then `wait_ready`: the running process and its endpoints."""
    process = launch(argv, ready_file=ready_file, log_path=log_path, cwd=cwd, env=env, started=started)
    return process, wait_ready(process, ready_file, timeout)


def _exited(process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait for the child to exit without reaping it where we can: its pid, so its process
    group id, stays taken until then. (A gevent-patched subprocess reaps at once; the group
    id stays safe while a member lives: Linux gives no new process an id a group uses.)"""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:  # reaped already (a gevent-patched subprocess reaps by itself)
            return process.poll() is not None
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL)


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT,
         kill_group: bool = True) -> int:
    """Send `sig` (SIGKILL after `timeout`) and return the exit status; with `kill_group`,
    SIGKILL what is left of its process group (workers, filters) once it has exited. A test
    of what the workers do when their supervisor dies passes False.

    A child that had already exited and been reaped is left alone, group included: its id
    may belong to another process by now (pids wrap, at 32768 in small containers)."""
    if process.poll() is not None:
        return process.returncode
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(sig)
    if not _exited(process, timeout):
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    if kill_group:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # the leader's pid is the group's id (process_group=0)
    return process.wait()
