"""When a worker slot gets a new process after its last one ended (the supervisor's policy).

- A worker killed from outside (SIGKILL: the OOM killer, an operator; SIGTERM, SIGINT
  and any other signal but those a process raises by itself) is replaced at once,
  whatever its age, and the kill is no failure: a storm of such kills never leaves a
  slot empty longer than one worker's start (milliseconds: workers are forked from the
  preloaded keeper). A worker that exits 0 is replaced at once too.
- A worker that had served at least CRASH_WINDOW seconds is replaced at once, and its
  slot's count of failures starts again from zero.
- A worker that fails by itself (an exit status, or SIGSEGV, SIGABRT, SIGBUS, SIGFPE,
  SIGILL, SIGSYS, SIGTRAP) before it was ready, or within CRASH_WINDOW seconds after,
  failed at start: the count of failures in a row grows, and so does the delay before
  the next start (BACKOFF_FIRST, doubling up to BACKOFF_MAX), so a worker that keeps
  crashing costs little and fills the log slowly, while the supervisor and the other
  workers go on.
- One exception keeps a single crash fast: the first failure in a row of a worker that
  had become ready is replaced at once too; from the second one on, the backoff applies.

A crash loop of workers that become ready and crash at once: new process at 0, 0.5, 1,
2, 4 ... 30 s. Of workers that never become ready (a broken Maildir root): 0.5, 1, 2 ...
"""

from __future__ import annotations

import signal

CRASH_WINDOW = 10.0  # seconds after ready within which an exit still counts as a failure at start
BACKOFF_FIRST = 0.5  # seconds before the second start of a slot that keeps failing; doubles
BACKOFF_MAX = 30.0
# The signals a process gets from its own fault (the kernel's, or its own abort()).
SELF_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE, signal.SIGILL,
                          signal.SIGSYS, signal.SIGTRAP})


def by_itself(status: int) -> bool:
    """Whether the exit `status` (subprocess's: negative for a signal) is a failure of the
    worker's own: an exit status other than 0, or a signal of SELF_SIGNALS."""
    if status < 0:
        return -status in SELF_SIGNALS
    return status != 0


class RestartPolicy:
    """The failures in a row of each slot, and the delay before its next start."""

    def __init__(self, slots: int) -> None:
        self.failures = [0] * slots

    def after_exit(self, slot: int, served: float | None, status: int = 1) -> float:
        """Seconds to wait before the next start of `slot`, whose process has just ended
        with `status` after serving `served` seconds since it was ready (None: it never was)."""
        if not by_itself(status):
            return 0.0  # killed from outside: at once, and no failure of its own
        if served is not None and served >= CRASH_WINDOW:
            self.failures[slot] = 0
            return 0.0
        self.failures[slot] += 1
        doublings = self.failures[slot] - (1 if served is None else 2)
        if doublings < 0:
            return 0.0  # the first failure of a worker that was ready
        return min(BACKOFF_MAX, BACKOFF_FIRST * 2.0**doublings)
