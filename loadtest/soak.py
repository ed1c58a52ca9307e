"""Soak: many sessions through one server process; its RSS and open descriptors must stay flat.

    PYTHONPATH=$PWD python -m loadtest.soak                       # 1,000,000 sessions, at most 30 min
    PYTHONPATH=$PWD python -m loadtest.soak --sessions 20000 --every 2000

Starts geventpop3 on 127.0.0.1 with `--users` mailboxes of a few messages each (users
file with cheap scrypt hashes, as the benchmark), then `--clients` greenlets each run
sessions on their own mailbox: login, STAT, RETR of one message (checked octet for
octet), QUIT. Nothing is deleted, so the mail never runs out. The server's VmRSS
(/proc/<pid>/status) and open descriptors (/proc/<pid>/fd) are sampled at start, after
the warm-up, every `--every` sessions and at the end (once its connections are closed),
printed as a table with a verdict: flat when the end is within `--rss-slack` of the
warm-up RSS and the descriptors are back to their count at start. Stops at `--sessions`
or after `--duration` seconds, whichever comes first. Exit status 0 when flat and no
session failed.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import gevent  # noqa: E402

from geventpop3.auth.users import hash_password  # noqa: E402
from geventpop3.testing.ports import free_port  # noqa: E402
from loadtest.launch import Geventpop3Process  # noqa: E402
from loadtest.pop3_client import Pop3Client, Pop3ConnectionError, Pop3Error, unstuff  # noqa: E402

SOAK_HASH_COST = (2**8, 8, 1)  # cheap scrypt: the soak measures sessions, not hashing
MESSAGES_PER_USER = 3


@dataclass
class Sample:
    sessions: int
    seconds: float
    rss_kib: int
    fds: int
    threads: int  # the server's threads: each new one brings its own malloc arena (RSS steps)
    label: str = ""


@dataclass
class Soak:
    """The shared counters of one run; greenlets only, so no lock."""

    target: int
    deadline: float
    done: int = 0
    failures: int = 0
    first_failure: str = ""
    samples: list[Sample] = field(default_factory=list)

    def more(self) -> bool:
        return self.done < self.target and time.monotonic() < self.deadline


def rss_and_threads(pid: int) -> tuple[int, int]:
    """VmRSS (KiB) and Threads of /proc/<pid>/status."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "Threads"):
                fields[name] = int(value.split()[0])
    return fields["VmRSS"], fields["Threads"]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def build_mail(root: str, users: int) -> tuple[str, dict[str, list[bytes]]]:
    """Maildirs of `users` users with a few messages each, and a users file; (users file, expected RETR)."""
    expected: dict[str, list[bytes]] = {}
    lines = []
    for index in range(users):
        user = f"soak{index:04d}"
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(root, "mail", user, sub), exist_ok=True)
        expected[user] = []
        for number in range(MESSAGES_PER_USER):
            content = (f"From: soak@example.org\r\nSubject: soak {user} {number}\r\n\r\n".encode()
                       + f"line of message {number}\r\n".encode() * (20 + 200 * number))
            name = f"17000000{index:04d}.M{number:06d}P1.soak"  # sorted: UIDL order = delivery order
            with open(os.path.join(root, "mail", user, "new", name), "wb") as handle:
                handle.write(content)
            expected[user].append(content)
        lines.append(f"{user}:{hash_password(user + 'pw', SOAK_HASH_COST)}\n")
    users_file = os.path.join(root, "users")
    with open(users_file, "w") as handle:
        handle.writelines(lines)
    return users_file, expected


def one_session(port: int, user: str, messages: list[bytes], rng: random.Random) -> None:
    client = Pop3Client("127.0.0.1", port, timeout=30)
    try:
        client.connect()
        client.login(user, user + "pw")
        total = sum(map(len, messages))
        if client.stat() != (len(messages), total):
            raise Pop3ConnectionError(f"{user}: STAT does not match the delivered mail")
        number = rng.randrange(len(messages))
        if bytes(unstuff(client.retr(number + 1))) != messages[number]:
            raise Pop3ConnectionError(f"{user}: RETR {number + 1} differs from the delivered file")
        client.quit()
    finally:
        client.close()


def client_loop(soak: Soak, port: int, user: str, messages: list[bytes], seed: int) -> None:
    rng = random.Random(seed)
    while soak.more():
        try:
            one_session(port, user, messages, rng)
            soak.done += 1
        except (Pop3Error, Pop3ConnectionError, OSError) as exc:
            soak.failures += 1
            soak.first_failure = soak.first_failure or str(exc)
            gevent.sleep(0.05)


def sample(soak: Soak, pid: int, started: float, label: str = "") -> Sample:
    rss, threads = rss_and_threads(pid)
    taken = Sample(soak.done, time.monotonic() - started, rss, open_fds(pid), threads, label)
    soak.samples.append(taken)
    print(f"{taken.sessions:>10,} {taken.seconds:>8.0f} {taken.rss_kib / 1024:>9.1f} {taken.fds:>5} {threads:>7}  "
          f"{label}", flush=True)
    return taken


def settle_fds(pid: int, baseline: int, timeout: float = 10) -> None:
    """Wait (bounded) until the closed sessions' descriptors are gone from the server."""
    deadline = time.monotonic() + timeout
    while open_fds(pid) > baseline and time.monotonic() < deadline:
        gevent.sleep(0.05)


def verdict(samples: list[Sample], rss_slack: float) -> tuple[bool, str]:
    start, warm, end = samples[0], samples[1], samples[-1]
    rss_ok = end.rss_kib <= warm.rss_kib * (1 + rss_slack) + 1024
    fds_ok = end.fds <= start.fds
    text = (f"RSS {warm.rss_kib / 1024:.1f} MiB after warm-up -> {end.rss_kib / 1024:.1f} MiB at the end "
            f"({(end.rss_kib - warm.rss_kib) / 1024:+.1f} MiB, allowed +{rss_slack:.0%} + 1 MiB); "
            f"descriptors {start.fds} at start -> {end.fds} at the end")
    return rss_ok and fds_ok, text


def run(opts: argparse.Namespace, root: str) -> int:
    users_file, expected = build_mail(root, opts.users)
    port = free_port()
    server = Geventpop3Process(port, ["-d", os.path.join(root, "mail"), "--users-file", users_file,
                                      "--state-dir", os.path.join(root, "state"), "-P", str(free_port()),
                                      "-L", "127.0.0.1", "--log-level", "WARNING"],
                               os.path.join(root, "server.log")).start()
    assert server.process is not None
    pid = server.process.pid
    started = time.monotonic()
    soak = Soak(opts.sessions, started + opts.duration)
    print(f"{'sessions':>10} {'seconds':>8} {'RSS MiB':>9} {'fds':>5} {'threads':>7}", flush=True)
    try:
        sample(soak, pid, started, "start")
        users = sorted(expected)[:opts.clients]
        greenlets = [gevent.spawn(client_loop, soak, port, user, expected[user], i) for i, user in enumerate(users)]
        next_mark = min(opts.warmup, opts.sessions)
        label = "after warm-up"
        while soak.more():
            gevent.sleep(0.2)
            if soak.more() and soak.done >= next_mark:  # the last sample is the end one, below
                sample(soak, pid, started, label)
                label = ""
                next_mark = (soak.done // opts.every + 1) * opts.every
        gevent.joinall(greenlets, timeout=60)
        gevent.killall(greenlets, timeout=5)
        settle_fds(pid, soak.samples[0].fds)
        if len(soak.samples) < 2:
            sample(soak, pid, started, "after warm-up")
        end = sample(soak, pid, started, "end")
    finally:
        server.stop()
    flat, text = verdict(soak.samples, opts.rss_slack)
    print(f"\n{end.sessions:,} sessions in {end.seconds:.0f} s ({end.sessions / max(end.seconds, 1e-9):.0f}/s), "
          f"{opts.clients} clients, {soak.failures} failed{': ' + soak.first_failure if soak.failures else ''}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{platform.system()} {platform.release()}")
    print(f"verdict: {'FLAT' if flat else 'NOT FLAT'}: {text}")
    return 0 if flat and not soak.failures else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=1_000_000, help="sessions to run (default 1,000,000)")
    parser.add_argument("--duration", type=float, default=1800, help="stop after this many seconds (default 1800)")
    parser.add_argument("--clients", type=int, default=20, help="sessions at once, one mailbox each (default 20)")
    parser.add_argument("--users", type=int, default=0, help="mailboxes (default: as many as --clients)")
    parser.add_argument("--every", type=int, default=50_000, help="sample every N sessions (default 50,000)")
    parser.add_argument("--warmup", type=int, default=10_000, help="sessions before the warm-up sample (10,000)")
    parser.add_argument("--rss-slack", type=float, default=0.10, help="RSS growth allowed after warm-up (0.10)")
    parser.add_argument("--dir", help="work directory (default: a temporary one, removed at the end)")
    opts = parser.parse_args(argv)
    opts.users = opts.users or opts.clients
    if min(opts.sessions, opts.clients, opts.every, opts.warmup) < 1 or opts.duration <= 0:
        parser.error("--sessions, --clients, --every, --warmup and --duration must be positive")
    if opts.users < opts.clients:
        parser.error("--users must be at least --clients (one mailbox per client: no IN-USE)")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    root = opts.dir or tempfile.mkdtemp(prefix="geventpop3-soak-")
    os.makedirs(root, exist_ok=True)
    try:
        return run(opts, root)
    finally:
        if not opts.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
