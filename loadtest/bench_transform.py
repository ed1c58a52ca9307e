"""What a filter costs: RETR throughput and sessions/s with `cat` against no filter, and the cache.

    python loadtest/bench_transform.py [--runs 3] [--workdir DIR]

Starts two `python -m geventpop3` side by side on loopback over the same Maildir (no
filter, and `-t cat`) and measures, each the median of `--runs` runs alternating
between the two servers (so other load on the machine hits both alike):
  * RETR throughput of a warm session (filter outputs cached) for 4 KiB and 1 MiB messages;
  * the first login of a 500-message mailbox (every message filtered, the cache
    removed before each run) against the second login (all cache hits);
  * sessions/s: 20 concurrent clients, each session USER/PASS, RETR of all 10
    messages of 4 KiB, QUIT.
Every RETR is checked against the expected octet count, so a wrong answer cannot win.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()  # the benchmark client's sockets cooperate with the session pool

import argparse  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

from gevent.pool import Pool  # noqa: E402

if __package__ in (None, ""):  # run as a script: make `loadtest` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from geventpop3.auth.users import hash_password  # noqa: E402
from geventpop3.mail import maildir  # noqa: E402
from geventpop3.testing.ports import free_port  # noqa: E402
from loadtest.benchlib import session  # noqa: E402
from loadtest.launch import Geventpop3Process  # noqa: E402

CRLF = b"\r\n"
CHEAP_COST = (2**8, 8, 1)  # benchmark users only: the login cost is not what we measure
SESSION_USERS = 20
SESSION_COUNT = 400


def message(seed: int, size: int) -> bytes:
    head = f"From: bench@localhost\nSubject: message {seed}\n\n".encode()
    line = (f"{seed:08d} " + "abcdefghijklmnopqrstuvwxyz0123456789" * 2).encode()[:75] + b"\n"
    return head + line * ((size - len(head)) // len(line))


class Server(Geventpop3Process):
    """One of the two servers compared, with its own state directory (the filter cache)."""

    def __init__(self, workdir: str, root: str, users_file: str, extra: list[str], name: str) -> None:
        self.state = os.path.join(workdir, f"state-{name}")
        super().__init__(free_port(), ["-P", str(free_port()), "-d", root, "--users-file", users_file,
                                       "--state-dir", self.state, "--log-level", "WARNING", *extra],
                         os.path.join(workdir, f"server-{name}.log"))
        self.start()

    def drop_cache(self, user: str) -> None:
        shutil.rmtree(os.path.join(self.state, "filtered", user), ignore_errors=True)


def build(root: str, users_file: str) -> dict[str, list[int]]:
    """Deliver the mailboxes; returns user -> the RETR octets of each message."""
    mailboxes = {"small": (200, 4096), "large": (20, 1 << 20), "first": (500, 4096)}
    mailboxes.update({f"s{i:02d}": (10, 4096) for i in range(SESSION_USERS)})
    expected: dict[str, list[int]] = {}
    with open(users_file, "w") as users:
        for user, (count, size) in mailboxes.items():
            path = os.path.join(root, user)
            expected[user] = []
            for index in range(count):
                content = message(index, size)
                maildir.deliver(path, content)
                expected[user].append(len(content.replace(b"\n", CRLF)))
            users.write(f"{user}:{hash_password(f'pw-{user}', cost=CHEAP_COST)}\n")
    return expected


class Bench:
    """The measurements against one running server."""

    def __init__(self, server: Server, expected: dict[str, list[int]], runs: int) -> None:
        self.server = server
        self.expected = expected
        self.runs = runs

    def retr_all(self, user: str) -> tuple[float, int]:
        client = session(self.server.port, user, timeout=120)
        started = time.perf_counter()
        total = 0
        for number, size in enumerate(self.expected[user], 1):
            got = len(client.retr(number))  # the benchmark's messages have no line to dot-stuff
            if got != size:
                raise RuntimeError(f"{user} {number}: {got} octets, expected {size}")
            total += got
        elapsed = time.perf_counter() - started
        client.quit()
        return elapsed, total

    def login_seconds(self, user: str, cold: bool) -> float:
        if cold:
            self.server.drop_cache(user)
        started = time.perf_counter()
        client = session(self.server.port, user, timeout=120)
        elapsed = time.perf_counter() - started
        client.quit()
        return elapsed

    def sessions_per_second(self) -> float:
        users = [f"s{i:02d}" for i in range(SESSION_USERS)]
        pool = Pool(SESSION_USERS)
        started = time.perf_counter()
        for index in range(SESSION_COUNT):
            pool.spawn(self.retr_all, users[index % SESSION_USERS])
            if index % SESSION_USERS == SESSION_USERS - 1:
                pool.join(raise_error=True)  # one session per mailbox at a time (the lock)
        pool.join(raise_error=True)
        return SESSION_COUNT / (time.perf_counter() - started)

    def measures(self) -> dict[str, Callable[[], float]]:
        count = len(self.expected["first"])

        def rate(user: str) -> float:
            elapsed, total = self.retr_all(user)
            return total / elapsed / (1 << 20)

        return {
            "RETR 4 KiB (MiB/s)": lambda: rate("small"),
            "RETR 1 MiB (MiB/s)": lambda: rate("large"),
            f"first login, {count} msgs (s)": lambda: self.login_seconds("first", cold=True),
            f"second login, {count} msgs (s)": lambda: self.login_seconds("first", cold=False),
            "sessions/s (20 clients)": self.sessions_per_second,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-transform-")
    root = os.path.join(workdir, "mail")
    users_file = os.path.join(workdir, "users.txt")
    expected = build(root, users_file)
    labels = {"no filter": [], "cat": ["-t", "cat"]}
    servers = {label: Server(workdir, root, users_file, extra, label.replace(" ", "-"))
               for label, extra in labels.items()}
    try:
        benches = {label: Bench(server, expected, args.runs) for label, server in servers.items()}
        for bench in benches.values():  # warm: page cache, filter cache, first sessions
            bench.retr_all("small")
            bench.retr_all("large")
            bench.sessions_per_second()
        # Runs alternate between the two servers, so drift (other load on the machine) hits both alike.
        samples: dict[str, dict[str, list[float]]] = {label: {} for label in labels}
        for name in benches["cat"].measures():
            for _ in range(args.runs):
                for label, bench in benches.items():
                    samples[label].setdefault(name, []).append(bench.measures()[name]())
    finally:
        for server in servers.values():
            server.stop()
    print(f"{'median of ' + str(args.runs):32} {'no filter':>12} {'cat':>12}")
    for name in samples["cat"]:
        print(f"{name:32} {statistics.median(samples['no filter'][name]):12.3f} "
              f"{statistics.median(samples['cat'][name]):12.3f}")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
