"""geventpop3.process.restarts: when a worker slot gets a new process (the processes
themselves: tests/e2e/test_workers.py)."""

from __future__ import annotations

import signal

from geventpop3.process.restarts import BACKOFF_MAX, CRASH_WINDOW, RestartPolicy, by_itself


def test_a_worker_that_served_a_while_is_replaced_at_once_every_time() -> None:
    policy = RestartPolicy(2)
    assert [policy.after_exit(0, CRASH_WINDOW + 60) for _ in range(5)] == [0.0] * 5
    assert policy.failures == [0, 0]


def test_deaths_soon_after_ready_back_off_from_the_second_and_up_to_the_maximum() -> None:
    policy = RestartPolicy(1)
    delays = [policy.after_exit(0, 0.2) for _ in range(10)]
    assert delays[:6] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]
    assert max(delays) == BACKOFF_MAX == delays[-1]
    assert policy.failures == [10]


def test_workers_that_never_get_ready_back_off_from_the_first() -> None:
    policy = RestartPolicy(1)
    assert [policy.after_exit(0, None) for _ in range(4)] == [0.5, 1.0, 2.0, 4.0]


def test_a_stable_period_resets_the_count_and_slots_count_apart() -> None:
    policy = RestartPolicy(2)
    for _ in range(4):
        policy.after_exit(0, 1.0)
    assert policy.after_exit(1, 1.0) == 0.0  # the other slot: its first failure
    assert policy.after_exit(0, CRASH_WINDOW) == 0.0  # served the whole window: not a failure
    assert policy.failures == [0, 1]
    assert policy.after_exit(0, 1.0) == 0.0  # a new series
    assert policy.after_exit(0, 1.0) == 0.5


def test_a_kill_from_outside_is_replaced_at_once_whatever_its_age_and_is_no_failure() -> None:
    """SIGKILL (the OOM killer, an operator), SIGTERM, an exit 0: at once, even before ready,
    and the count of failures in a row stays where it was."""
    policy = RestartPolicy(1)
    for status in (-signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT, 0):
        assert [policy.after_exit(0, served, status) for served in (None, 0.1, 0.1, 0.1)] == [0.0] * 4
    assert policy.failures == [0]


def test_a_failure_of_its_own_backs_off_as_before() -> None:
    """An exit status, SIGSEGV, SIGABRT: the worker failed by itself."""
    assert by_itself(1) and by_itself(-signal.SIGSEGV) and by_itself(-signal.SIGABRT)
    assert not by_itself(0) and not by_itself(-signal.SIGKILL) and not by_itself(-(int(signal.SIGRTMIN) + 6))
    policy = RestartPolicy(1)
    assert [policy.after_exit(0, 0.2, status) for status in (-signal.SIGSEGV, -signal.SIGABRT, 3)] == [0.0, 0.5, 1.0]
    assert policy.after_exit(0, 0.2, -signal.SIGKILL) == 0.0  # an outside kill in between: no failure, at once
    assert policy.failures == [3]
