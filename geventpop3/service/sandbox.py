"""What a filter process gets between fork and exec: its user, its limits, no way up.

A filter parses attacker-controlled mail, so it is treated as hostile once it runs:
- its own user (`filter_user`) with no supplementary groups, never root and never the
  server's user, so it can read no Maildir, no state, no users file, no key, and
  cannot ptrace the server;
- `PR_SET_NO_NEW_PRIVS`: no set-user-id program and no file capability gives it more;
- rlimits: RLIMIT_FSIZE at `max_output` + 1 (an output past the cap is cut by the
  kernel), CPU a little past the timeout, 1024 descriptors, no core files, and with a
  user of its own a bound on its processes (against a fork bomb);
- an empty working directory it cannot write (`empty_dir`, 0555), and the signals a filter
  expects at their defaults (the server ignores some).

`Sandbox` is a `preexec_fn`: the filter spawner (geventpop3.process.filter_spawner)
uses it for every filter while the server runs as `--run-as`, and the filter runner
(geventpop3.service.filters) when it starts filters itself.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import math
import os
import resource
import signal
import stat
import tempfile
from dataclasses import dataclass

from geventpop3.service.privileges import Identity

PR_SET_NO_NEW_PRIVS = 38
MAX_FILES = 1024  # descriptors a filter may hold
MAX_PROCESSES = 1024  # processes of the filter user (only with a user of its own: it counts the user's all)
CPU_GRACE = 5  # seconds of CPU past the timeout before the kernel's SIGXCPU (the timeout kills first)
DEFAULT_SIGNALS = (signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE, signal.SIGQUIT)

_libc: ctypes.CDLL | None = None
_empty_dir: str | None = None
_private = False  # _empty_dir is this process's own, to remove at its exit


def _prctl() -> ctypes.CDLL | None:
    """The C library, loaded before any fork (the child must not load anything)."""
    global _libc
    if _libc is None:
        with contextlib.suppress(OSError, AttributeError):
            _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def empty_dir() -> str:
    """An empty directory, mode 0555, that this process's user owns: every filter's cwd.

    One per user for the whole machine (`<tmp>/geventpop3-empty-<uid>`), made once and
    kept, so no run leaves one behind (a server killed with SIGKILL runs no clean-up); it
    is used only while it is a real directory of ours, 0555 and empty, else this process
    makes a private one, removed at its exit."""
    global _empty_dir, _private
    if _empty_dir is None or not _usable(_empty_dir):
        shared = os.path.join(tempfile.gettempdir(), f"geventpop3-empty-{os.geteuid()}")
        try:
            os.mkdir(shared, 0o555)
        except FileExistsError:
            pass
        except OSError:
            shared = ""
        if shared and _usable(shared):
            _empty_dir, _private = shared, False
        else:
            private = tempfile.mkdtemp(prefix="geventpop3-empty-")
            os.chmod(private, 0o555)
            atexit.register(_remove, private)
            _empty_dir, _private = private, True
    return _empty_dir


def _usable(path: str) -> bool:
    """A directory (not a link) of this user, mode 0555, with nothing in it."""
    try:
        status = os.lstat(path)
        return (stat.S_ISDIR(status.st_mode) and status.st_uid == os.geteuid()
                and stat.S_IMODE(status.st_mode) == 0o555 and not os.listdir(path))
    except OSError:
        return False


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.rmdir(path)


def remove_empty_dir() -> None:
    """Remove a private `empty_dir` now (a process that ends with os._exit runs no atexit)."""
    global _empty_dir
    if _empty_dir is not None and _private:
        _remove(_empty_dir)
        _empty_dir = None


def _lower(limit: int, soft: int, hard: int | None = None) -> None:
    """Set a limit no higher than it is now (an unprivileged process cannot raise a hard limit)."""
    current_soft, current_hard = resource.getrlimit(limit)
    hard = soft if hard is None else hard
    if current_hard != resource.RLIM_INFINITY:
        hard = min(hard, current_hard)
    resource.setrlimit(limit, (min(soft, hard), hard))


@dataclass(frozen=True)
class Sandbox:
    """The bounds of one filter process; called as its `preexec_fn` (see the module docstring)."""

    max_output: int
    timeout: float
    identity: Identity | None = None  # None: stay the caller's user (a server that is not root)

    def __post_init__(self) -> None:
        _prctl()  # loaded in the parent

    def __call__(self) -> None:
        for signum in DEFAULT_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)  # Python ignores SIGXFSZ and SIGPIPE; the kernel should act
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.max_output + 1, self.max_output + 1))
        cpu = math.ceil(self.timeout) + CPU_GRACE
        _lower(resource.RLIMIT_CPU, cpu, cpu + 1)
        _lower(resource.RLIMIT_NOFILE, MAX_FILES)
        _lower(resource.RLIMIT_CORE, 0)
        if self.identity is not None:
            _lower(resource.RLIMIT_NPROC, MAX_PROCESSES)
            os.setgroups([])
            os.setgid(self.identity.gid)
            os.setuid(self.identity.uid)
        libc = _libc
        if libc is None or libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno() if libc is not None else 0, "cannot set PR_SET_NO_NEW_PRIVS")
