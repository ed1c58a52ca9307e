"""`--workers N`: a supervisor and N worker processes behind one port, one management plane.

Real processes throughout: which worker serves a connection is found from the
kernel's socket table (psutil), never assumed.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from helpers import (
    LineClient,
    ServerProcess,
    TlsFiles,
    admin,
    counters,
    crlf,
    free_port,
    keeper_of,
    logs_with,
    one_per_worker,
    run_server,
    state_db,
    tls_client,
    wait_until,
    workers_of,
)

from geventpop3.testing import launcher

MESSAGE = crlf(b"Subject: hello\n\nworkers\n")


def stat(server: ServerProcess) -> dict[str, int]:
    with admin(server) as client:
        return counters(client)


def settled_stat(server: ServerProcess) -> dict[str, int]:
    """STAT once `Total connections` held still for a second: the workers report twice a
    second, and the start-up's own probes of the POP3 port are connections too."""
    reading, since = stat(server), time.monotonic()

    def still() -> dict[str, int] | None:
        nonlocal reading, since
        now = stat(server)
        if now["Total connections"] != reading["Total connections"]:
            reading, since = now, time.monotonic()
        return now if time.monotonic() - since > 1.0 else None

    return wait_until(still)


@pytest.fixture
def cluster(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    """A server with two workers, POP3 on 127.0.0.1."""
    return start_server(workers=2, listen=["127.0.0.1"], admin_listen=["127.0.0.1"])


def test_two_workers_serve_one_port_and_a_session_on_one_makes_the_other_answer_in_use(
        cluster: ServerProcess) -> None:
    assert len(workers_of(cluster)) == 2
    with one_per_worker(cluster) as clients:
        first, second = clients.values()
        assert first.login("alice", "alicepw").startswith(b"+OK")
        assert second.login("alice", "alicepw").startswith(b"-ERR [IN-USE]")
        assert second.login("bob", "bobpw").startswith(b"+OK")


def test_set_changes_every_worker_and_add_logs_in_through_every_worker(cluster: ServerProcess) -> None:
    with admin(cluster) as client:
        client.set("max_login_failures", "1")  # a new session closes after its first failed login
        with one_per_worker(cluster) as clients:
            for pop in clients.values():
                assert pop.login("alice", "wrong").startswith(b"-ERR")
                pop.read_until_closed()
        client.set("max_login_failures", "3")
        with one_per_worker(cluster) as clients:
            for pop in clients.values():
                assert pop.login("alice", "wrong").startswith(b"-ERR")
                assert pop.cmd("NOOP").startswith(b"-ERR")  # still open: NOOP before login is an error
        client.add_user("dave", "davepw")
        added = time.monotonic()
        with one_per_worker(cluster) as clients:
            for pop in clients.values():
                assert pop.login("dave", "davepw").startswith(b"+OK")
                pop.cmd("QUIT")
        assert time.monotonic() - added < 10
        client.delete_user("dave")
        with one_per_worker(cluster) as clients:
            for pop in clients.values():
                assert pop.login("dave", "davepw").startswith(b"-ERR")


@pytest.mark.slow
def test_stat_totals_are_the_sum_of_what_clients_did_on_every_worker(cluster: ServerProcess) -> None:
    cluster.deliver("carol", MESSAGE)
    before = settled_stat(cluster)
    made: list[int] = []
    with one_per_worker(cluster, made=made) as clients:
        for pop in clients.values():  # each worker in turn: carol's mailbox is locked while a session is open
            assert pop.login("carol", "carolpw").startswith(b"+OK")
            assert pop.retr(1).endswith(b"workers\r\n")
            pop.cmd("QUIT")
    after = wait_until(lambda: (s := stat(cluster))["Messages retrieved"] == before["Messages retrieved"] + 2 and s)
    assert after["Logins ok"] == before["Logins ok"] + 2
    after = wait_until(lambda: (s := stat(cluster))["Total connections"] == before["Total connections"] + made[0]
                       and s)  # every connection one_per_worker made, on whichever worker
    assert after["Worker 0 connections"] + after["Worker 1 connections"] >= 2
    assert after["Worker 0 connections"] > 0 and after["Worker 1 connections"] > 0
    assert wait_until(lambda: stat(cluster)["Current connections"] == 0)
    with admin(cluster) as client:
        logs_with(client, "carol", "logout", count=2)
    # The one store has them: the supervisor is its only writer.
    def stored() -> int:
        with state_db(cluster) as db:
            return int(db.execute("SELECT COUNT(*) FROM access_log WHERE user = 'carol'").fetchone()[0])
    wait_until(lambda: stored() >= 4)


def test_historical_maximum_is_of_the_sum_over_workers(cluster: ServerProcess) -> None:
    with one_per_worker(cluster):
        wait_until(lambda: stat(cluster)["Current connections"] == 2)
    assert stat(cluster)["Historical maximum traffic"] >= 2


def test_sigkill_of_a_worker_releases_its_locks_and_is_replaced_while_the_other_serves_on(
        cluster: ServerProcess) -> None:
    with one_per_worker(cluster) as clients:
        (victim, doomed), (survivor_pid, survivor) = clients.items()
        assert doomed.login("alice", "alicepw").startswith(b"+OK")
        assert survivor.login("bob", "bobpw").startswith(b"+OK")
        wait_until(lambda: stat(cluster)["Logins ok"] >= 2)
        before = stat(cluster)["Total connections"]
        os.kill(victim, signal.SIGKILL)
        killed, killed_at = time.monotonic(), time.time()
        replacement = wait_until(lambda: [pid for pid in workers_of(cluster) if pid not in clients])
        # Replaced within 1 s: the kernel's start time of the new process, not when a poll saw it.
        assert psutil.Process(replacement[0]).create_time() - killed_at < 1.0
        # Replaced and serving (the supervisor says so once the new worker is ready).
        wait_until(lambda: sum(v for k, v in stat(cluster).items() if k.endswith("serving")) == 2)
        replaced_in = time.monotonic() - killed
        assert replaced_in < 5, f"replacement took {replaced_in:.2f} s"
        assert survivor.cmd("NOOP").startswith(b"+OK")  # the other worker's session did not notice
        # alice's lock went with the killed process: she logs in again at once.
        with LineClient(cluster.port) as again:
            assert again.login("alice", "alicepw").startswith(b"+OK")
            again.cmd("QUIT")
        assert survivor.cmd("QUIT").startswith(b"+OK")
        after = wait_until(lambda: (s := stat(cluster))["Total connections"] > before and s)
        assert after["Worker 0 starts"] + after["Worker 1 starts"] == 3
        assert replacement[0] in (after["Worker 0 pid"], after["Worker 1 pid"])
    assert "replacing it" in cluster.log()


def test_a_worker_killed_by_a_real_time_signal_is_named_and_replaced(cluster: ServerProcess) -> None:
    """signal.Signals names no real-time signal: the supervisor still logs one line and replaces the worker."""
    victim = workers_of(cluster)[0]
    number = int(signal.SIGRTMIN) + 6
    os.kill(victim, number)
    wait_until(lambda: f"killed by signal {number} " in cluster.log())
    wait_until(lambda: len(workers := workers_of(cluster)) == 2 and victim not in workers)
    wait_until(lambda: sum(v for k, v in stat(cluster).items() if k.endswith("serving")) == 2)
    assert "Traceback" not in cluster.log()


def test_a_replacement_worker_parses_the_config_file_the_supervisor_read_not_an_edit(
        start_server: Callable[..., ServerProcess]) -> None:
    """Every worker parses the supervisor's copy of the config file: an edit after the start (here
    half-written) reaches no worker, not even one started after it, until the server is restarted."""
    cluster = start_server(workers=2, listen=["127.0.0.1"], admin_listen=["127.0.0.1"],
                           config='users = ["carol:carolpw"]\n')
    cluster.config_path.write_text('users = ["carol:otherpw"\n')
    victim = workers_of(cluster)[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(workers := workers_of(cluster)) == 2 and victim not in workers)
    wait_until(lambda: sum(v for k, v in stat(cluster).items() if k.endswith("serving")) == 2)
    with one_per_worker(cluster) as clients:
        for client in clients.values():
            assert client.login("carol", "otherpw").startswith(b"-ERR")
            assert client.login("carol", "carolpw").startswith(b"+OK")
            assert client.cmd("QUIT").startswith(b"+OK")
    assert "Traceback" not in cluster.log()


def test_sigterm_with_sessions_open_ends_them_without_update_and_exits_0(cluster: ServerProcess) -> None:
    cluster.deliver("alice", MESSAGE)
    with one_per_worker(cluster) as clients:
        first, second = clients.values()
        assert first.login("alice", "alicepw").startswith(b"+OK")
        assert first.cmd("DELE 1").startswith(b"+OK")
        assert second.login("bob", "bobpw").startswith(b"+OK")
        wait_until(lambda: stat(cluster)["Logins ok"] >= 2)
        pids = workers_of(cluster)
        assert cluster.stop(signal.SIGTERM) == 0
        for client in (first, second):
            client.read_until_closed()
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)
    assert len(cluster.message_files("alice")) == 1  # no UPDATE without QUIT
    cluster.start()
    with admin(cluster) as client:
        logs_with(client, "alice", "ended=shutdown")
        logs_with(client, "bob", "ended=shutdown")


def test_sighup_reloads_in_every_worker_and_the_supervisor_says_it_once(cluster: ServerProcess) -> None:
    assert cluster.process is not None
    cluster.process.send_signal(signal.SIGHUP)
    wait_until(lambda: f"geventpop3[{cluster.process.pid}] INFO reload done in 2 workers" in cluster.log())
    assert cluster.log().count("INFO reload done") == 2  # its own reload, then the workers' summary


def test_a_sighup_sent_to_a_worker_itself_is_ignored_with_one_line(cluster: ServerProcess) -> None:
    """Reloading in one worker alone would give it other users than the rest: only the supervisor reloads."""
    worker = workers_of(cluster)[0]
    os.kill(worker, signal.SIGHUP)
    wait_until(lambda: f"geventpop3[{worker}] WARNING worker" in cluster.log() and "SIGHUP ignored" in cluster.log())
    assert worker in workers_of(cluster) and "reload done" not in cluster.log()


def test_the_supervisor_killed_takes_its_workers_with_it(cluster: ServerProcess) -> None:
    """And its keeper, which holds the POP3 listeners: the port is free at once for a restart."""
    keeper = keeper_of(cluster)
    assert keeper is not None
    pids = [*workers_of(cluster), keeper]
    assert cluster.stop(signal.SIGKILL) == -signal.SIGKILL
    wait_until(lambda: not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                               for pid in pids))
    with pytest.raises(OSError):
        LineClient(cluster.port, timeout=2)


def test_the_keeper_killed_stops_the_server_with_one_error_and_exit_1(cluster: ServerProcess) -> None:
    """Without it no worker can start and no certificate be read again: stopping beats serving on
    with workers that are gone (they die with it) and a supervisor that cannot replace them."""
    keeper = keeper_of(cluster)
    assert keeper is not None
    pids = workers_of(cluster)
    os.kill(keeper, signal.SIGKILL)
    assert cluster.process is not None
    assert cluster.process.wait(30) == 1
    assert f"ERROR the keeper (pid {keeper}) is gone" in cluster.log() and "Traceback" not in cluster.log()
    wait_until(lambda: not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                               for pid in pids))


@pytest.mark.slow
def test_a_worker_that_keeps_dying_right_after_ready_is_restarted_ever_later_and_the_rest_serves_on(
        cluster: ServerProcess) -> None:
    """Aborted (SIGABRT, a failure of its own) as soon as it serves, four times in a row: a
    crash loop at start. The first replacement starts at once, then 0.5, 1 and 2 s later
    (geventpop3.process.restarts)."""
    killed: list[int] = []
    gaps: list[float] = []  # from each kill to the start of the next process in slot 0

    def serving_pid() -> int | None:
        now = stat(cluster)
        return now["Worker 0 pid"] if now["Worker 0 serving"] and now["Worker 0 pid"] not in killed else None

    for _ in range(4):
        pid = wait_until(serving_pid, timeout=30)
        os.kill(pid, signal.SIGABRT)
        at = time.monotonic()
        killed.append(pid)
        wait_until(lambda: stat(cluster)["Worker 0 pid"] not in killed, timeout=30, interval=0.01)
        gaps.append(time.monotonic() - at)
        with LineClient(cluster.port) as client:  # the other worker serves on meanwhile
            assert client.login("alice", "alicepw").startswith(b"+OK")
            client.cmd("QUIT")
    assert gaps[1] >= 0.5 and gaps[2] >= 1.0 and gaps[3] >= 2.0, gaps
    assert gaps[0] < gaps[3] - 1.0, gaps
    log = cluster.log()
    assert "after it was ready, a failure at start (failure 1 in a row); replacing it now" in log
    assert "(failure 4 in a row); starting it again in 2.0 s" in log
    assert cluster.running
    wait_until(lambda: sum(v for k, v in stat(cluster).items() if k.endswith("serving")) == 2, timeout=30)


@pytest.mark.slow
def test_a_worker_started_after_the_users_file_changed_takes_the_supervisors_users(
        start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    """The same users in every process: a replacement worker that reads a file edited since
    the last reload gets the supervisor's content; the edit takes effect at SIGHUP, everywhere."""
    users_file = tmp_path / "users"
    users_file.write_text("alice:alicepw\nbob:bobpw\n")
    server = start_server(users={}, workers=2, listen=["127.0.0.1"], admin_listen=["127.0.0.1"],
                          extra_args=["--users-file", str(users_file)])
    users_file.write_text("alice:alicepw\ncarol:carolpw\n")  # not reloaded yet
    victim = workers_of(server)[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: "it takes this one" in server.log(), timeout=30)
    wait_until(lambda: victim not in workers_of(server)
               and sum(v for k, v in stat(server).items() if k.endswith("serving")) == 2, timeout=30)
    with one_per_worker(server) as clients:
        for pop in clients.values():
            assert pop.login("carol", "carolpw").startswith(b"-ERR")
            assert pop.login("bob", "bobpw").startswith(b"+OK")
            pop.cmd("QUIT")
    assert server.process is not None
    server.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "INFO reload done in 2 workers" in server.log())
    with one_per_worker(server) as clients:
        for pop in clients.values():
            assert pop.login("bob", "bobpw").startswith(b"-ERR")
            assert pop.login("carol", "carolpw").startswith(b"+OK")
            pop.cmd("QUIT")


def test_at_reload_the_workers_take_the_supervisors_users_even_when_its_reload_failed(
        start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    users_file = tmp_path / "users"
    users_file.write_text("alice:alicepw\n")
    server = start_server(users={}, workers=2, listen=["127.0.0.1"], admin_listen=["127.0.0.1"],
                          extra_args=["--users-file", str(users_file)])
    users_file.write_text("alice:alicepw\nbob:{BOGUS}x\n")
    with admin(server) as client:
        answer = client.command("RELOAD")
        assert not answer.ok and f"{users_file}:2" in answer.text, answer.text
    # One error, the supervisor's: the workers took the content in force there, not the file.
    assert server.log().count("users file not reloaded") == 1
    users_file.write_text("bob:bobpw\n")
    with admin(server) as client:
        assert client.command("RELOAD").ok
    with one_per_worker(server) as clients:
        for pop in clients.values():
            assert pop.login("alice", "alicepw").startswith(b"-ERR")
            assert pop.login("bob", "bobpw").startswith(b"+OK")
            pop.cmd("QUIT")


def test_a_bad_users_file_with_workers_is_one_line_and_exit_2_and_leaves_no_worker(tmp_path: Path) -> None:
    users_file = tmp_path / "users"
    users_file.write_text("alice:alicepw\nbob:{BOGUS}abc\n")
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    result = run_server("--workers", "2", "-p", "0", "-P", "0", "--no-state", "-d", str(tmp_path / "mail"),
                        "--users-file", str(users_file))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and f"{users_file}:2" in result.stderr, result.stderr
    assert {child.pid for child in psutil.Process().children(recursive=True)} <= before


@pytest.mark.slow
def test_a_worker_that_keeps_failing_at_start_is_retried_with_backoff_and_the_supervisor_stays(
        cluster: ServerProcess) -> None:
    aside = cluster.maildir.with_name("mail-aside")
    cluster.maildir.rename(aside)
    cluster.maildir.write_text("not a directory\n")  # every new worker fails to make its Maildir root
    victim = workers_of(cluster)[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: cluster.log().count("failure 2 in a row") == 1, timeout=15)
    assert cluster.running
    with admin(cluster) as client:
        assert counters(client)["Workers"] == 2  # MSMP answers all along
    cluster.maildir.unlink()
    aside.rename(cluster.maildir)
    wait_until(lambda: sum(v for k, v in stat(cluster).items() if k.endswith("serving")) == 2, timeout=20)


def test_workers_1_is_one_process_without_a_supervisor(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(workers=1, listen=["127.0.0.1"], admin_listen=["127.0.0.1"])
    assert workers_of(server) == []
    with LineClient(server.port) as client:
        assert client.login("alice", "alicepw").startswith(b"+OK")
    assert "Workers" not in stat(server)


@pytest.mark.parametrize("value", ["0", "abc", "-1", "100000"])
def test_a_bad_workers_value_is_one_line_and_exit_2(value: str) -> None:
    result = run_server("--workers", value, "-p", "0")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "workers" in result.stderr, result.stderr


def test_pop3s_is_served_by_every_worker(start_server: Callable[..., ServerProcess], tls_files: TlsFiles) -> None:
    pop3s = free_port()
    server = start_server(workers=2, listen=["127.0.0.1"], admin_listen=["127.0.0.1"],
                          extra_args=tls_files.server_args(pop3s))
    with one_per_worker(server, connect=lambda: tls_client(pop3s, tls_files), port=pop3s) as clients:
        for pop in clients.values():
            assert pop.greeting.startswith(b"+OK")
            assert pop.login("alice", "alicepw").startswith(b"+OK")
            pop.cmd("QUIT")


@pytest.mark.slow
def test_a_storm_of_outside_kills_never_leaves_the_port_without_a_worker_for_long(cluster: ServerProcess) -> None:
    """Every worker SIGKILLed at once, twelve times 0.3 s apart (the OOM killer under pressure):
    each time a new connection is greeted within one worker's start (forked: well under a
    second), no backoff, and the log says each kill came from outside."""
    waits = []
    for _ in range(12):
        victims = wait_until(lambda: len(pids := workers_of(cluster)) == 2 and pids)
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        at = time.monotonic()
        with LineClient(cluster.port, timeout=10) as client:  # queued until a new worker accepts it
            assert client.greeting.startswith(b"+OK")
        waits.append(time.monotonic() - at)
    log = cluster.log()
    assert max(waits) < 1.0, waits
    assert "starting it again in" not in log and "in a row" not in log
    assert "killed by SIGKILL" in log and "from outside; replacing it now" in log
    wait_until(lambda: sum(v for k, v in stat(cluster).items() if k.endswith("serving")) == 2)


def test_prometheus_serves_the_totals_and_per_worker_series(start_server: Callable[..., ServerProcess]) -> None:
    port = free_port()
    server = start_server(workers=2, listen=["127.0.0.1"], admin_listen=["127.0.0.1"],
                          extra_args=["--metrics-port", str(port)])

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return response.read().decode()

    with one_per_worker(server) as clients:
        for pop in clients.values():
            assert pop.cmd("NOOP").startswith(b"-ERR")  # connected, not logged in
        # Reports arrive twice a second per worker: wait until the latest of both show the pair
        # (a connection one_per_worker closed may still count in a report not yet replaced).
        per_worker = [f'geventpop3_worker_current_connections{{worker="{worker}"}} 1.0' for worker in ("0", "1")]
        text = wait_until(lambda: (page := scrape()) and "geventpop3_current_connections 2.0" in page
                          and all(line in page for line in per_worker) and page)
        for worker in ("0", "1"):
            assert f'geventpop3_worker_starts_total{{worker="{worker}"}} 1.0' in text


def test_dele_of_a_user_logged_in_on_one_worker_fails_and_leaves_it_on_every_worker(cluster: ServerProcess) -> None:
    with one_per_worker(cluster) as clients:
        first, second = clients.values()
        assert first.login("bob", "bobpw").startswith(b"+OK")
        with admin(cluster) as client:
            answer = client.command("DELE bob")
            assert not answer.ok and "logged in" in answer.text, answer.text
        assert first.cmd("QUIT").startswith(b"+OK")
        assert second.login("bob", "bobpw").startswith(b"+OK")  # put back on the other worker too
        assert second.cmd("QUIT").startswith(b"+OK")
    with admin(cluster) as client:
        wait_until(lambda: client.command("DELE bob").ok)
    with one_per_worker(cluster) as clients:
        for pop in clients.values():
            assert pop.login("bob", "bobpw").startswith(b"-ERR")


def test_workers_import_the_supervisors_code_when_it_runs_with_safe_path(tmp_path: Path) -> None:
    """`python -P -m geventpop3` started in a directory holding another `geventpop3` (a
    checkout, say): the workers must take -P too, or they import that one."""
    decoy = tmp_path / "geventpop3"
    (decoy / "cluster").mkdir(parents=True)
    (decoy / "__init__.py").write_text("")
    (decoy / "cluster" / "__init__.py").write_text("")
    (decoy / "cluster" / "__main__.py").write_text("raise SystemExit('the decoy was imported')\n")
    process, served = launcher.start(
        [sys.executable, "-P", "-m", "geventpop3", "-l", "127.0.0.1", "-p", "0", "--workers", "2",
         "-d", str(tmp_path / "mail"), "-P", "0", "--state-dir", str(tmp_path / "state")],
        ready_file=tmp_path / "ready.json", log_path=tmp_path / "server.log", timeout=60, cwd=tmp_path)
    try:
        with LineClient(served["pop3"][0]["port"]) as client:
            assert client.greeting.startswith(b"+OK")
        assert len(psutil.Process(process.pid).children(recursive=True)) == 3  # the keeper, two workers
    finally:
        launcher.stop(process)
    assert "decoy" not in (tmp_path / "server.log").read_text()
