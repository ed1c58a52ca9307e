"""What a filter leaves behind: escaped descendants are found and killed (Linux).

A filter leads its own session and process group, and that group is killed when it
ends; but a descendant that calls `setsid` (or `setpgid`) leaves the group, and once
its parent dies it would be adopted by init and live on. With `PR_SET_CHILD_SUBREAPER`
set on the server, such an orphan is adopted by the server instead, so after a filter
has ended every descendant still alive is either a child of the server that is not a
running filter, or a descendant of one. Each run marks its processes with a token in
their environment (`FILTER_TOKEN_VAR`) so an orphan of a filter that is still running
is left to that filter's own clean-up.

Elsewhere (no `/proc`, no prctl) only the process group is killed, as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import time

import gevent

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36
FILTER_TOKEN_VAR = "GEVENTPOP3_FILTER_ID"
REAP_DEADLINE = 2.0  # seconds to keep killing what a dying process tree re-parents to us
REAP_POLL = 0.01

_subreaper = False


def become_subreaper() -> bool:
    """Make this process adopt its orphaned descendants (Linux); False where it cannot."""
    global _subreaper
    if _subreaper:
        return True
    try:
        # The C library is loaded already: its prctl through the process's own symbols
        # (find_library("c") would run ldconfig in a subprocess at every start).
        libc = ctypes.CDLL(None, use_errno=True)
        _subreaper = libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        _subreaper = False
    if not _subreaper:
        log.info("cannot become a child subreaper: escaped filter descendants are only killed with their group")
    return _subreaper


def children(pid: int) -> list[int]:
    """The live children of `pid` (all its threads), from /proc; [] where it cannot be read."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children", "rb") as handle:
                found.extend(int(word) for word in handle.read().split())
    return found


def _token(pid: int) -> str | None:
    """The filter token in a process's environment; None if it has none or cannot be read."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            environ = handle.read()
    except OSError:
        return None
    prefix = FILTER_TOKEN_VAR.encode() + b"="
    for entry in environ.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix):].decode("ascii", "replace")
    return None


def _kill_tree(pid: int) -> None:
    """SIGKILL `pid`, its group and every descendant (children first found, then killed)."""
    for child in children(pid):
        _kill_tree(child)
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)  # a setsid'd orphan leads its own group
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


def _reap(pid: int) -> None:
    """Collect an adopted child's exit status, unless the event loop already did."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def kill_leftovers(running: set[int], running_tokens: set[str], tokenless: bool) -> int:
    """Kill every adopted orphan of a filter that has ended; the number killed.

    `running`: pids of filters still running (our legitimate children);
    `running_tokens`: the tokens of runs not yet ended, whose orphans are left to them.
    An orphan without a token (it cleared its environment) is killed only if
    `tokenless`: no filter is being started, for a child between fork and exec still
    shows the server's environment. Nothing but filters is ever a child of the server.
    """
    if not _subreaper:
        return 0
    me = os.getpid()
    killed = 0
    deadline = time.monotonic() + REAP_DEADLINE
    while True:
        orphans = [pid for pid in children(me) if pid not in running and _leftover(_token(pid), running_tokens,
                                                                                   tokenless)]
        alive = [pid for pid in orphans if _alive(pid)]
        for pid in alive:
            _kill_tree(pid)
            killed += 1
        for pid in orphans:
            _reap(pid)
        if not alive or time.monotonic() > deadline:
            return killed
        gevent.sleep(REAP_POLL)  # their own descendants are being re-parented to us


def _leftover(token: str | None, running_tokens: set[str], tokenless: bool) -> bool:
    return tokenless if token is None else token not in running_tokens


def _alive(pid: int) -> bool:
    """Not yet a zombie (a zombie is dead and only waits to be collected)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X")
