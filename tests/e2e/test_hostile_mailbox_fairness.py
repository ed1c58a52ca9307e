"""Hostile mailboxes cannot stall the other sessions, flood the log or burn a core (issue 22,
points 2, 3 and 5), against the real server over real sockets, with files made here.

The attacker owns a mailbox and fills it: many empty files, a tree of symlinks, an 8 GiB
sparse file, a rename of every message before QUIT, a size cache edited by hand, a message
rewritten after the login. A victim, logged in on the same process, times its NOOPs
meanwhile; the bounds are generous for a shared 2-core machine (the goal, met on an idle
one, is a max of 50 ms; the figures are in the issue's closing note).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from helpers import REPO, LineClient, ServerProcess, logged_in, server_env, wait_until

from geventpop3.mail import maildir
from geventpop3.state import keys

VICTIM_MAX = 0.25  # seconds: a victim's slowest NOOP while the attack runs (before: 0.4 to 1.6 s)
# A client in a process of its own (its own reading of 4 MB of UIDLs must not slow the victim's
# NOOPs in this one): login, UIDL (counted), QUIT; prints the count.
UIDL_CLIENT = """
import poplib, sys
session = poplib.POP3("127.0.0.1", int(sys.argv[1]), timeout=120)
session.user(sys.argv[2])
session.pass_(sys.argv[3])
print(len(session.uidl()[1]))
session.quit()
"""


def maildir_of(server: ServerProcess, user: str) -> Path:
    maildir.Mailbox(str(server.maildir), user).open()
    return Path(server.user_dir(user))


def empty_files(directory: Path, count: int, prefix: str = "M") -> None:
    for number in range(count):
        os.close(os.open(directory / f"{1_700_000_000 + number}.{prefix}{number}.host", os.O_CREAT | os.O_WRONLY,
                         0o600))


def victim_latencies(server: ServerProcess, busy: Callable[[], bool]) -> list[float]:
    """bob's NOOP round trips while `busy()` holds (bob is logged in first)."""
    bob = logged_in(server, "bob")
    latencies: list[float] = []
    try:
        while busy() or len(latencies) < 5:
            sent = time.perf_counter()
            assert bob.cmd("NOOP").startswith(b"+OK")
            latencies.append(time.perf_counter() - sent)
            time.sleep(0.005)
    finally:
        bob.cmd("QUIT")
        bob.close()
    return latencies


def server_cpu(server: ServerProcess) -> float:
    assert server.process is not None
    times = psutil.Process(server.process.pid).cpu_times()
    return times.user + times.system


# -- point 2: mailbox work off the loop and bounded ---------------------------------

MANY = 100_000


@pytest.mark.slow
def test_login_and_uidl_of_many_files_do_not_stall_a_victim(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(config="max_messages_per_mailbox = 1000000\n")
    empty_files(maildir_of(server, "alice") / "new", MANY)
    attacker = subprocess.Popen([sys.executable, "-c", UIDL_CLIENT, str(server.port), "alice", "alicepw"],
                                cwd=REPO, env=server_env(), stdout=subprocess.PIPE)
    try:
        latencies = victim_latencies(server, lambda: attacker.poll() is None)
        out, _ = attacker.communicate(timeout=120)
    finally:
        attacker.kill()
        attacker.wait()
    assert attacker.returncode == 0 and int(out) == MANY
    # Before: the listing, the sort and the 4 MB UIDL answer ran on the event loop (100,000
    # files: 0.25 s and more per step); now a pool thread and a runner in chunks do them.
    assert max(latencies) < VICTIM_MAX, sorted(latencies)[-5:]
    assert statistics.median(latencies) < 0.02, statistics.median(latencies)


def test_over_max_messages_per_mailbox_is_refused_and_nothing_deleted(
        start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(config="max_messages_per_mailbox = 5\n")
    for number in range(6):
        server.deliver("alice", b"Subject: %d\n\nbody\n" % number)
    files = sorted(server.message_files("alice"))
    with LineClient(server.port) as client:
        assert client.login("alice", "alicepw") == b"-ERR [SYS/PERM] Mailbox cannot be opened"
    assert sorted(server.message_files("alice")) == files
    wait_until(lambda: "6 messages, over max_messages_per_mailbox (5)" in server.log())
    os.unlink(files[0])
    with LineClient(server.port) as client:
        assert client.login("alice", "alicepw") == b"+OK Logged in, 5 messages"
        assert client.cmd("QUIT").startswith(b"+OK")


def test_messages_over_max_message_size_are_left_out(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(config="max_message_size = 2048\n")
    server.deliver("alice", b"Subject: small\n\nbody\n")
    big = Path(server.deliver("alice", b"Subject: big\n\n" + b"x" * 4096 + b"\n"))
    with LineClient(server.port) as client:
        assert client.login("alice", "alicepw") == b"+OK Logged in, 1 messages"
        assert client.cmd("QUIT").startswith(b"+OK")
    assert big.exists()
    wait_until(lambda: "1 over max_message_size" in server.log())


def test_sparse_file_costs_no_cpu_and_is_left_out(start_server: Callable[..., ServerProcess]) -> None:
    # Over the default max_message_size (1 GiB) an 8 GiB file is left out for its size alone: the
    # limit is raised here so that what skips it is its holes.
    server = start_server(config="max_message_size = 17179869184\n")
    server.deliver("alice", b"Subject: real\n\nbody\n")
    sparse = maildir_of(server, "alice") / "new" / "1700000000.sparse.host"
    with open(sparse, "wb") as handle:
        handle.truncate(8 << 30)  # 8 GiB of holes, no disk used: 18 s of CPU per login to measure before
    for _ in range(2):
        before = server_cpu(server)
        with LineClient(server.port) as client:
            assert client.login("alice", "alicepw") == b"+OK Logged in, 1 messages"
            assert client.cmd("QUIT").startswith(b"+OK")
        assert server_cpu(server) - before < 1.0
    wait_until(lambda: "1 sparse file" in server.log())
    assert server.log().count("sparse file") == 1  # once per change of the mailbox, not per login


BIG = 64 << 20
LINKS = 16


def test_a_client_gone_during_a_long_scan_frees_the_mailbox_at_once(server: ServerProcess) -> None:
    new = maildir_of(server, "alice") / "new"
    first = new / "1000.big.host"
    with open(first, "wb") as handle:
        block = (b"x" * 63 + b"\n") * (1 << 14)
        for _ in range(BIG // len(block)):
            handle.write(block)
    for number in range(1, LINKS):
        os.link(first, new / f"{1000 + number}.big.host")  # 1 GiB to measure: seconds of a pool thread
    client = LineClient(server.port)
    assert client.cmd("USER alice").startswith(b"+OK")
    client.send(b"PASS alicepw\r\n")
    time.sleep(0.3)  # the scan is under way (no answer can come before it ends)
    client.close()
    gone = time.monotonic()
    wait_until(lambda: "pop3 login abandoned: user=alice" in server.log(), timeout=5)
    assert "client gone while scanning" in server.log()
    assert time.monotonic() - gone < 1.5  # not after the scan (about 2 s here, more under load)
    with LineClient(server.port, timeout=60) as again:  # the lock was given back: not [IN-USE]
        assert again.login("alice", "alicepw") == b"+OK Logged in, %d messages" % LINKS


def test_update_after_every_file_was_renamed_is_linear(server: ServerProcess) -> None:
    count = 10_000
    box = maildir_of(server, "alice")
    for number in range(count):
        (box / "new" / f"{1_700_000_000 + number}.U{number}.host").write_bytes(b"Subject: x\n\nx\n")
    client = LineClient(server.port, timeout=60)
    assert client.login("alice", "alicepw").startswith(b"+OK")
    for start in range(0, count, 1000):
        client.send(b"".join(b"DELE %d\r\n" % number for number in range(start + 1, start + 1001)))
        for _ in range(1000):
            assert client.line().startswith(b"+OK")
    for name in os.listdir(box / "new"):  # a MUA marks them all seen: every name the snapshot knows is gone
        os.rename(box / "new" / name, box / "cur" / f"{name}:2,S")
    sent = time.monotonic()
    assert client.cmd("QUIT") == b"+OK Bye, %d messages deleted" % count
    # Before: each missing name listed new/ and cur/ again (10,000 x 10,000 names, seconds).
    assert time.monotonic() - sent < 2.0
    client.close()
    assert os.listdir(box / "cur") == [] and os.listdir(box / "new") == []


# -- point 3: log volume bounded ---------------------------------------------------

def test_a_symlink_tree_costs_one_log_line_once(server: ServerProcess) -> None:
    new = maildir_of(server, "alice") / "new"
    server.deliver("alice", b"Subject: real\n\nbody\n")
    for number in range(20_000):
        os.symlink("/etc/passwd", new / f"{1_700_000_000 + number}.L{number}.host")
    sizes = []
    for _ in range(2):
        size = server.log_path.stat().st_size
        with LineClient(server.port, timeout=30) as client:
            assert client.login("alice", "alicepw") == b"+OK Logged in, 1 messages"
            assert client.cmd("QUIT").startswith(b"+OK")
        wait_until(lambda start=size: b"pop3 logout: user=alice" in server.log_path.read_bytes()[start:])
        sizes.append(server.log_path.stat().st_size - size)
    # Before: one WARNING per symlink per login (20,000 lines, 3 MB).
    assert sizes[0] <= 4096 and sizes[1] < sizes[0], sizes
    assert "skipped 20000 entries: 20000 not a regular file" in server.log()


# -- point 5: size cache MAC, a message changed since the snapshot -------------------

def test_a_size_cache_edited_by_the_owner_is_not_trusted(server: ServerProcess) -> None:
    content = b"".join(b"%028d\n" % number for number in range(100))  # 2,900 octets stored, 3,000 sent
    server.deliver("alice", content)
    with LineClient(server.port) as client:
        assert client.login("alice", "alicepw").startswith(b"+OK")
        assert client.cmd("LIST 1") == b"+OK 1 3000"
        assert client.cmd("QUIT").startswith(b"+OK")
    key = server.state_dir / keys.SIZE_CACHE_KEY
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == keys.KEY_BYTES
    cache = Path(server.user_dir("alice")) / maildir.SIZE_CACHE
    data = cache.read_bytes()
    assert b" 2900 3000\n" in data
    for forged in (data.replace(b" 2900 3000\n", b" 2900 2901\n"), data.replace(b" 2900 3000\n", b" 2900 -5\n")):
        cache.write_bytes(forged)  # the MAC no longer verifies: measured again
        with LineClient(server.port) as client:
            assert client.login("alice", "alicepw").startswith(b"+OK")
            assert client.cmd("LIST 1") == b"+OK 1 3000"
            assert client.cmd("QUIT").startswith(b"+OK")
    server.restart()  # the key is the installation's: the cache it wrote stays good
    assert len(key.read_bytes()) == keys.KEY_BYTES
    rewritten = cache.read_bytes()
    with LineClient(server.port) as client:
        assert client.login("alice", "alicepw").startswith(b"+OK")
        assert client.cmd("QUIT").startswith(b"+OK")
    assert cache.read_bytes() == rewritten  # verified, so not written again


@pytest.mark.parametrize("size", [100, 200_000], ids=["small", "streamed"])
def test_a_message_grown_since_the_snapshot_is_not_sent_past_its_size(server: ServerProcess, size: int) -> None:
    path = Path(server.deliver("alice", b"Subject: grows\n\n" + b"x" * size + b"\n"))
    client = logged_in(server)
    try:
        announced = client.cmd("LIST 1")
        with open(path, "ab") as handle:  # rewritten in place: the same file, longer
            handle.write(b"appended by the owner after the login\n" * 100)
        assert client.cmd("RETR 1").startswith(b"-ERR")
        assert client.cmd("TOP 1 0").startswith(b"-ERR")
        assert client.cmd("NOOP") == b"+OK"
        assert client.cmd("LIST 1") == announced
    finally:
        client.cmd("QUIT")
        client.close()
    wait_until(lambda: "pop3 message not sent: user=alice" in server.log())
    assert server.log().count("pop3 message not sent") == 1  # then offered as -ERR without a look
