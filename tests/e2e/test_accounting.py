"""One accounting for the whole server with `--workers 2` (issue 21 point 4): the penalty
escalates as with one process, the per-address cap holds for the server as a whole, MSMP
PENALTY sees and clears what the workers counted, and STAT shows what already happened.

Which worker serves a connection is found from the kernel's socket table
(helpers.one_per_worker), so every test puts its connections on both workers for sure.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from collections.abc import Callable

import pytest
from helpers import (
    LineClient,
    ServerProcess,
    admin,
    counters,
    crlf,
    filter_tmp_dir,
    free_port,
    one_per_worker,
    wait_until,
    worker_serving,
)

PER_SOURCE = b"-ERR [SYS/TEMP] Too many connections from your address, try again later\r\n"
TOO_MANY_LOGINS = b"-ERR [IN-USE] Too many logins for this user from your address at once, try again later"
BASE = 0.01
CAP = 2.0


def current_connections(server: ServerProcess) -> int:
    with admin(server) as client:
        return counters(client)["Current connections"]


def refused(server: ServerProcess, source: str) -> bytes:
    client = LineClient(server.port, greet=False, source=source)
    try:
        return client.read_until_closed(timeout=5, reset_ok=True)
    finally:
        client.close()


def admitted(server: ServerProcess, source: str) -> LineClient:
    """A greeted connection from `source`, polled for: a place freed by a close counts once
    the server saw the close."""
    def attempt() -> LineClient | None:
        client = LineClient(server.port, greet=False, source=source)
        client.greeting = client.line()
        if client.greeting.startswith(b"+OK"):
            return client
        client.close()
        return None

    return wait_until(attempt)


@pytest.fixture
def cluster(start_server: Callable[..., ServerProcess]) -> Callable[..., ServerProcess]:
    """Factory: a server with two workers on 127.0.0.1 (more settings as a config text)."""
    def start(config: str = "", **kwargs: object) -> ServerProcess:
        return start_server(workers=2, listen=["127.0.0.1"], admin_listen=["127.0.0.1"], config=config, **kwargs)
    return start


def test_failed_logins_spread_over_two_workers_escalate_as_with_one(cluster: Callable[..., ServerProcess]) -> None:
    """Regression: each worker had its own penalty, so 8 guesses over 2 workers waited
    0.01, 0.01, 0.02, 0.02 ... 0.08 s instead of doubling every time up to 1.28 s."""
    server = cluster(config=f"auth_penalty_max = {CAP}\n", login_failure_delay=BASE)
    source = "127.0.0.7"
    times: list[float] = []
    workers: set[int] = set()
    for _ in range(4):  # each round: one failed login on each worker
        with one_per_worker(server, connect=lambda: LineClient(server.port, source=source)) as clients:
            for pid, client in clients.items():
                workers.add(pid)
                assert client.cmd("USER alice") == b"+OK"
                start = time.perf_counter()
                assert client.cmd("PASS wrong").startswith(b"-ERR")
                times.append(time.perf_counter() - start)
    assert len(workers) == 2
    expected = [min(BASE * 2 ** k, CAP) for k in range(8)]
    for elapsed, least in zip(times, expected, strict=True):
        assert elapsed >= least - 0.005, (times, expected)
    with admin(server) as client:
        entry = client.penalties()[source]
        assert entry["failures"] == "8" and float(entry["delay"]) == CAP, entry
        stat = counters(client)
        assert stat["Penalised sources"] == 1 and stat["Penalty delays"] == 7, stat
        assert client.clear_penalty(source) == "Cleared 1 source"
        assert client.penalties() == {}
        assert counters(client)["Penalised sources"] == 0
    with one_per_worker(server, connect=lambda: LineClient(server.port, source=source)) as clients:
        for client in clients.values():  # cleared everywhere: each worker's next failure waits the base again
            assert client.cmd("USER alice") == b"+OK"
            start = time.perf_counter()
            assert client.cmd("PASS wrong").startswith(b"-ERR")
            assert time.perf_counter() - start < 0.5


def test_the_per_address_cap_holds_across_two_workers(cluster: Callable[..., ServerProcess]) -> None:
    """Regression: each worker admitted max_connections_per_ip, twice the setting in all."""
    server = cluster(config="max_connections_per_ip = 10\n")
    source = "127.0.0.8"
    with one_per_worker(server, connect=lambda: admitted(server, source)) as spread:
        wait_until(lambda: current_connections(server) == 2)  # the extras one_per_worker closed are gone
        held = [LineClient(server.port, source=source) for _ in range(8)]
        try:
            assert all(client.greeting.startswith(b"+OK") for client in held)
            assert {worker_serving(server, c) for c in [*spread.values(), *held]} == set(spread)
            for _ in range(6):  # whichever worker takes them: the server's 11th and later are refused
                assert refused(server, source) == PER_SOURCE
            with LineClient(server.port, source="127.0.0.9") as other:  # another address: its own count
                assert other.greeting.startswith(b"+OK")
            with admin(server) as client:
                assert counters(client)["Connections refused per IP"] == 6
            held.pop().close()  # one ends: one more is admitted (once the server saw the end)
            wait_until(lambda: current_connections(server) == 9)
            held.append(LineClient(server.port, source=source))
            assert held[-1].greeting.startswith(b"+OK")
        finally:
            for client in held:
                client.close()


def test_logins_in_flight_per_user_and_address_count_across_workers(cluster: Callable[..., ServerProcess]) -> None:
    """Regression: each worker counted its own logins in flight, so max_sessions_per_user_ip
    let N parallel password checks of one name from one address through. A login is held
    in flight on one worker by a filter that waits for a gate file."""
    with filter_tmp_dir() as gates:
        started, gate = gates / "started", gates / "gate"
        script = gates / "held-filter"
        script.write_text(f"#!/bin/sh\ntouch '{started}'\nwhile [ ! -e '{gate}' ]; do sleep 0.02; done\nexec cat\n")
        script.chmod(0o755)
        server = cluster(config="max_sessions_per_user_ip = 1\n", extra_args=["-t", str(script)])
        server.deliver("alice", crlf(b"Subject: held\n\nbody\n"))
        with one_per_worker(server) as clients:
            first, second = clients.values()
            assert first.cmd("USER alice") == b"+OK"
            first.send(b"PASS alicepw\r\n")  # its login now waits for the filter, on the first worker
            wait_until(started.exists)
            assert second.login("alice", "alicepw") == TOO_MANY_LOGINS  # on the other worker
            assert second.login("bob", "bobpw").startswith(b"+OK")  # another user: not this cap
            gate.touch()
            assert first.line().startswith(b"+OK")
        with admin(server) as client:
            assert counters(client)["Logins refused per user and IP"] == 1


def test_a_killed_workers_connections_no_longer_count(cluster: Callable[..., ServerProcess]) -> None:
    server = cluster(config="max_connections_per_ip = 2\n")
    source = "127.0.0.10"
    with one_per_worker(server, connect=lambda: admitted(server, source)) as spread:
        wait_until(lambda: current_connections(server) == 2)
        assert refused(server, source) == PER_SOURCE
        victim, survivor = spread
        os.kill(victim, signal.SIGKILL)
        assert spread[victim].read_until_closed(timeout=5, reset_ok=True) == b""

        new = admitted(server, source)  # once the supervisor has seen the worker die
        try:
            assert refused(server, source) == PER_SOURCE  # the survivor's and the new one: 2 again
        finally:
            new.close()


def test_stat_right_after_five_connections_shows_them(cluster: Callable[..., ServerProcess]) -> None:
    """Regression: workers reported twice a second, so STAT (and a scrape) said 0 current
    connections for up to 0.5 s."""
    metrics_port = free_port()
    server = cluster(extra_args=["--metrics-port", str(metrics_port)])
    server.deliver("alice", crlf(b"Subject: one\n\nbody\n"))
    with admin(server) as client:
        before = wait_until(lambda: (stat := counters(client))["Current connections"] == 0 and stat)
        made: list[int] = []
        with one_per_worker(server, made=made) as spread:
            extra = [LineClient(server.port) for _ in range(3)]
            first, second = spread.values()
            assert first.login("alice", "alicepw").startswith(b"+OK")
            assert b"body" in first.retr(1)
            assert second.login("bob", "bobpw").startswith(b"+OK")
            stat = counters(client)  # at once: no wait for a periodic report
            assert stat["Current connections"] == 5, stat
            assert stat["Total connections"] == before["Total connections"] + made[0] + 3, stat
            assert stat["Logins ok"] == before["Logins ok"] + 2, stat
            assert stat["Messages retrieved"] == before["Messages retrieved"] + 1, stat
            assert stat["Historical maximum traffic"] >= 5, stat
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
                scraped = response.read().decode()
            assert "geventpop3_current_connections 5.0" in scraped, scraped
            for c in extra:
                c.close()


def test_racing_connections_from_one_address_admit_exactly_the_cap(cluster: Callable[..., ServerProcess]) -> None:
    """40 connections opened at once from threads over 2 workers, each counting in the shared
    table: the check and the count are one step under its lock, so exactly 10 are admitted."""
    server = cluster(config="max_connections_per_ip = 10\n")
    source = "127.0.0.11"
    barrier = threading.Barrier(40)
    clients: list[LineClient] = []
    answers: list[bytes] = []
    lock = threading.Lock()

    def connect() -> None:
        barrier.wait()
        client = LineClient(server.port, greet=False, source=source)
        answer = client.line()
        with lock:
            clients.append(client)
            answers.append(answer)

    threads = [threading.Thread(target=connect) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    try:
        assert len(answers) == 40
        assert sum(answer.startswith(b"+OK") for answer in answers) == 10, answers
        assert all(answer.startswith(b"+OK") or answer == PER_SOURCE.rstrip(b"\r\n") for answer in answers), answers
        assert current_connections(server) == 10
    finally:
        for client in clients:
            client.close()
    wait_until(lambda: current_connections(server) == 0)
    held = [admitted(server, source) for _ in range(10)]  # every place was given back
    for client in held:
        client.close()


def test_a_right_password_on_one_worker_forgets_failures_counted_on_the_other(
        cluster: Callable[..., ServerProcess]) -> None:
    """The penalty is the supervisor's: failures from one worker, the success from the other
    (told over its channel, since the shared table shows the source's failures)."""
    server = cluster(login_failure_delay=BASE)
    source = "127.0.0.12"
    with one_per_worker(server, connect=lambda: LineClient(server.port, source=source)) as clients:
        failing, succeeding = clients.values()
        for _ in range(2):
            assert failing.cmd("USER alice") == b"+OK"
            assert failing.cmd("PASS wrong").startswith(b"-ERR")
        with admin(server) as client:
            assert client.penalties()[source]["failures"] == "2"
        assert succeeding.login("alice", "alicepw").startswith(b"+OK")
        with admin(server) as client:
            wait_until(lambda: client.penalties() == {})
