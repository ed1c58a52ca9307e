"""Crash test: clients fetch and delete mail while the server is killed (SIGKILL) and restarted.

    PYTHONPATH=$PWD python -m loadtest.crash --kills 1000 --seed 1

POP3 clients log in, RETR messages (checked octet for octet and against LIST), DELE
most of them and QUIT (sometimes RSET first, sometimes they just hang up); a deliverer
keeps every mailbox topped up; an admin adds users over MSMP. Meanwhile the server is
killed with SIGKILL, at random moments and on purpose right after a client sent QUIT
(so inside UPDATE) or an ADD, and started again on the same directories. After every
restart the users acknowledged by `ADD` must all be listed; at the end:

- every delivered message is still on disk, or was received in full by a client that
  sent DELE for it (a kill inside UPDATE may leave some of a session's deletions done);
- a message whose deletion was acknowledged (+OK to QUIT) is gone;
- every file in new/ and cur/ is one delivered message, whole, and no message is on
  disk twice;
- every user acknowledged by `ADD` is listed and can log in.

The CI test (tests/external/test_crash.py) runs this command with 20 kills. It runs on
its own server process, for as many kills as asked, and stops by itself. Exit status 0
when no invariant broke and SIGTERM then stops the server cleanly, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from admin.client import MsmpClient, MsmpConnectionError, MsmpError
from geventpop3.mail import maildir
from geventpop3.testing import launcher
from geventpop3.testing.ports import free_port
from loadtest.launch import Geventpop3Process
from loadtest.pop3_client import Pop3Client, Pop3ConnectionError, Pop3Error, unstuff

_ID = re.compile(rb"\r\nX-Crash-Id: (\d+)\r\n")
MAILBOX_TARGET = 12  # messages the deliverer keeps in each mailbox
MAX_MARKS = 12  # messages a session retrieves and deletes at most


class Restartable(Protocol):
    """What the crash run needs of a server: tests/helpers.py ServerProcess has it, so has `CrashServer`."""

    port: int
    admin_port: int
    maildir: Path

    def start(self) -> object: ...

    def stop(self, sig: int = ...) -> int: ...


@dataclass
class Ledger:
    """What the clients saw, shared by the threads under one lock."""

    contents: dict[int, bytes] = field(default_factory=dict)  # id -> the delivered message
    owner: dict[int, str] = field(default_factory=dict)  # id -> its user
    fetched_and_marked: Counter[int] = field(default_factory=Counter)  # id -> sessions that RETR'd it whole, then DELE
    acknowledged_gone: set[int] = field(default_factory=set)  # marked by a session whose QUIT got +OK
    unanswered_quits: list[list[int]] = field(default_factory=list)  # marks of sessions killed after QUIT
    added_users: dict[str, str] = field(default_factory=dict)  # acknowledged by MSMP ADD +OK
    violations: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def violation(self, text: str) -> None:
        with self.lock:
            if len(self.violations) < 100:
                self.violations.append(text)

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] += n


@dataclass
class Report:
    kills: int
    seconds: float
    counts: Counter[str]
    violations: list[str]

    @property
    def ok(self) -> bool:
        return not self.violations

    def lines(self) -> list[str]:
        out = [f"kills: {self.kills} in {self.seconds:.0f} s"]
        out += [f"{name}: {value}" for name, value in sorted(self.counts.items())]
        out += [f"VIOLATION: {text}" for text in self.violations] or ["invariants: all held"]
        return out


# -- mail ------------------------------------------------------------------------

def make_message(message_id: int, rng: random.Random) -> bytes:
    """CRLF lines, none starting with '.', so RETR (unstuffed) gives it back octet for octet."""
    roll = rng.random()
    size = rng.randint(64, 2_000) if roll < 0.6 else rng.randint(2_000, 100_000) if roll < 0.97 else 1_500_000
    head = f"From: crash@example.org\r\nSubject: crash {message_id}\r\nX-Crash-Id: {message_id}\r\n\r\n".encode()
    line = f"{message_id:08d} ".encode() + b"x" * 66 + b"\r\n"
    return head + line * max(1, size // len(line))


def message_id(content: bytes | bytearray) -> int | None:
    found = _ID.search(content)
    return int(found.group(1)) if found else None


def files_on_disk(root: Path, users: Iterable[str]) -> list[tuple[str, Path]]:
    found = []
    for user in users:
        for sub in ("new", "cur"):
            directory = root / user / sub
            if directory.is_dir():
                found += [(user, directory / name) for name in os.listdir(directory)]
    return found


class Deliverer:
    """Keeps each mailbox at MAILBOX_TARGET messages so the clients never run dry."""

    def __init__(self, root: Path, users: list[str], ledger: Ledger, rng: random.Random) -> None:
        self.root, self.users, self.ledger, self.rng = root, users, ledger, rng
        self.next_id = 1
        self.lock = threading.Lock()  # the killer tops up too, while the server is down

    def top_up(self) -> None:
        with self.lock:
            for user in self.users:
                present = sum(len(os.listdir(self.root / user / sub)) for sub in ("new", "cur")
                              if (self.root / user / sub).is_dir())
                for _ in range(MAILBOX_TARGET - present):
                    self.deliver(user)

    def deliver(self, user: str) -> None:
        mid, self.next_id = self.next_id, self.next_id + 1
        content = make_message(mid, self.rng)
        with self.ledger.lock:  # recorded before it exists on disk
            self.ledger.contents[mid] = content
            self.ledger.owner[mid] = user
        maildir.deliver(str(self.root / user), content)
        self.ledger.count("delivered")


# -- the actors --------------------------------------------------------------------

class Run:
    """One crash run's threads: POP3 workers, the MSMP adder, the deliverer, and the killer."""

    def __init__(self, server: Restartable, users: dict[str, str], admin: tuple[str, str], seed: int,
                 workers: int, host: str = "127.0.0.1") -> None:
        self.server, self.users, self.admin, self.host = server, users, admin, host
        self.seed, self.workers = seed, workers
        self.ledger = Ledger()
        self.stop = threading.Event()
        self.quit_sent = threading.Event()  # a client just sent QUIT with deletions: kill inside UPDATE
        self.add_sent = threading.Event()  # the adder just sent ADD
        self.deliverer = Deliverer(server.maildir, sorted(users), self.ledger, random.Random(seed))
        self.on_disk: set[int] = set()  # ids found on disk by the final check

    # POP3 ------------------------------------------------------------------------
    def pop3_worker(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        while not self.stop.is_set():
            user = rng.choice(sorted(self.users))
            client = Pop3Client(self.host, self.server.port, timeout=10)
            try:
                self.session(client, user, rng)
            except Pop3Error as exc:
                self.ledger.count(f"pop3 -ERR {exc.step}")
                time.sleep(rng.uniform(0.005, 0.02))
            except (Pop3ConnectionError, OSError):
                self.ledger.count("pop3 connection cut or refused")
                time.sleep(rng.uniform(0.01, 0.05))
            finally:
                client.close()

    def session(self, client: Pop3Client, user: str, rng: random.Random) -> None:
        client.connect()
        client.login(user, self.users[user])
        self.ledger.count("pop3 logins")
        sizes = dict(client.list())
        marked: list[int] = []
        numbers = sorted(sizes)
        for number in rng.sample(numbers, min(len(numbers), rng.randint(1, MAX_MARKS))):
            mid = self.fetch(client, user, number, sizes[number])
            if mid is not None and rng.random() < 0.85:
                client.dele(number)
                marked.append(mid)
                with self.ledger.lock:
                    self.ledger.fetched_and_marked[mid] += 1
        ending = rng.random()
        if ending < 0.05:
            self.ledger.count("pop3 sessions dropped without QUIT")
            return
        if ending < 0.12:
            client.command("RSET")
            marked = []
        if marked:
            self.quit_sent.set()
        try:
            client.quit()
        except Pop3ConnectionError:
            with self.ledger.lock:
                self.ledger.unanswered_quits.append(marked)
            raise
        with self.ledger.lock:
            self.ledger.acknowledged_gone.update(marked)
            self.ledger.counts["messages deleted, acknowledged"] += len(marked)

    def fetch(self, client: Pop3Client, user: str, number: int, listed: int) -> int | None:
        """RETR one message and check it: the delivered octets, the size LIST gave, its owner."""
        body = bytes(unstuff(client.retr(number)))
        mid = message_id(body)
        with self.ledger.lock:
            expected = self.ledger.contents.get(mid) if mid is not None else None
            owner = self.ledger.owner.get(mid) if mid is not None else None
        if expected is None or body != expected or owner != user:
            self.ledger.violation(f"RETR {number} for {user}: not a delivered message of {user} "
                                  f"(id {mid}, {len(body)} octets)")
            return None
        if listed != len(body):
            self.ledger.violation(f"LIST said {listed} octets for message {mid}, RETR sent {len(body)}")
        self.ledger.count("messages retrieved in full")
        return mid

    # MSMP ------------------------------------------------------------------------
    def adder(self) -> None:
        rng = random.Random(self.seed + 7)
        serial = 0
        while not self.stop.is_set():
            client = MsmpClient(self.host, self.server.admin_port, timeout=10)
            try:
                client.connect()
                client.login(*self.admin)
                while not self.stop.is_set():
                    serial += 1
                    name, password = f"crash{self.seed}u{serial}", f"pw{serial}x{rng.randrange(10**6)}"
                    self.add_sent.set()
                    client.add_user(name, password)
                    with self.ledger.lock:
                        self.ledger.added_users[name] = password
                    self.ledger.count("msmp ADD acknowledged")
                    time.sleep(rng.uniform(0.01, 0.08))
            except MsmpError as exc:
                self.ledger.count(f"msmp -ERR {exc.command}")
                time.sleep(0.05)
            except (MsmpConnectionError, OSError):
                self.ledger.count("msmp connection cut or refused")
                time.sleep(rng.uniform(0.01, 0.05))
            finally:
                client.close()

    def check_users(self, when: str) -> None:
        """Every user acknowledged by ADD is listed by the (restarted) server."""
        with self.ledger.lock:
            acknowledged = dict(self.ledger.added_users)
        listed = set(self.admin_call(lambda client: client.list_users()))
        missing = sorted(set(acknowledged) - listed)
        if missing:
            self.ledger.violation(f"{when}: users acknowledged by ADD are gone: {missing[:5]}")

    def admin_call(self, call: Callable[[MsmpClient], list[str]], timeout: float = 30) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with MsmpClient(self.host, self.server.admin_port, timeout=10) as client:
                    client.connect()
                    client.login(*self.admin)
                    return call(client)
            except (MsmpConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    # the killer ------------------------------------------------------------------
    def kill_and_restart(self, rng: random.Random) -> None:
        roll = rng.random()
        if roll < 0.4:  # inside UPDATE
            self.quit_sent.clear()
            if self.quit_sent.wait(2):
                time.sleep(rng.uniform(0, 0.002))
                self.ledger.count("kills right after a QUIT")
        elif roll < 0.55:  # while an ADD is persisted
            self.add_sent.clear()
            if self.add_sent.wait(2):
                time.sleep(rng.uniform(0, 0.03))
                self.ledger.count("kills right after an ADD")
        else:
            time.sleep(rng.uniform(0.02, 0.4))
        self.server.stop(signal.SIGKILL)
        self.deliverer.top_up()  # also while the server is down
        self.server.start()

    def run(self, kills: int, progress: Callable[[int], None] | None = None) -> Report:
        started = time.monotonic()
        rng = random.Random(self.seed)
        self.deliverer.top_up()
        threads = [threading.Thread(target=self.pop3_worker, args=(i,), daemon=True) for i in range(self.workers)]
        threads += [threading.Thread(target=self.adder, daemon=True), threading.Thread(target=self.deliver_loop,
                                                                                      daemon=True)]
        for thread in threads:
            thread.start()
        try:
            for kill in range(1, kills + 1):
                self.kill_and_restart(rng)
                self.check_users(f"after kill {kill}")
                if progress:
                    progress(kill)
        finally:
            self.stop.set()
            for thread in threads:
                thread.join(30)
        self.final_check()
        return Report(kills, time.monotonic() - started, self.ledger.counts, self.ledger.violations)

    def deliver_loop(self) -> None:
        while not self.stop.wait(0.05):
            self.deliverer.top_up()

    # the verdict -----------------------------------------------------------------
    def final_check(self) -> None:
        ledger = self.ledger
        self.check_users("at the end")
        self.check_disk()
        self.count_partial_updates()
        with ledger.lock:
            sample = sorted(ledger.added_users.items())[-10:]
        for name, password in sample:  # the newest, added closest to a kill
            client = Pop3Client(self.host, self.server.port, timeout=10)
            try:
                client.connect()
                client.login(name, password)
                client.quit()
            except (Pop3Error, Pop3ConnectionError) as exc:
                ledger.violation(f"user {name} acknowledged by ADD cannot log in: {exc}")
            finally:
                client.close()

    def check_disk(self) -> None:
        ledger = self.ledger
        on_disk: Counter[int] = Counter()
        for user, path in files_on_disk(self.server.maildir, self.users):
            content = path.read_bytes()
            mid = message_id(content)
            if mid is None or ledger.contents.get(mid) != content or ledger.owner.get(mid) != user:
                ledger.violation(f"torn or foreign file {path} ({len(content)} octets, id {mid})")
                continue
            on_disk[mid] += 1
        for mid, copies in on_disk.items():
            if copies > 1:
                ledger.violation(f"message {mid} is on disk {copies} times")
        for mid in ledger.contents:
            if mid not in on_disk and not ledger.fetched_and_marked[mid]:
                ledger.violation(f"message {mid} lost: not on disk, never received and deleted by a client")
        for mid in ledger.acknowledged_gone & set(on_disk):
            ledger.violation(f"message {mid} is back on disk although its deletion was acknowledged")
        ledger.counts["messages on disk at the end"] = sum(on_disk.values())
        self.on_disk = set(on_disk)

    def count_partial_updates(self) -> None:
        """QUITs killed before their answer whose deletions were partly done: kills inside UPDATE."""
        ledger = self.ledger
        for marks in ledger.unanswered_quits:
            own = [mid for mid in marks if ledger.fetched_and_marked[mid] == 1]  # no other session marked it
            gone = sum(mid not in self.on_disk for mid in own)
            if 0 < gone < len(own):
                ledger.counts["kills caught inside UPDATE (deletions partly done)"] += 1
        ledger.counts["QUITs unanswered (killed during UPDATE or before)"] = len(ledger.unanswered_quits)


def run_crash(server: Restartable, users: dict[str, str], admin: tuple[str, str], kills: int, seed: int = 1,
              workers: int = 4, progress: Callable[[int], None] | None = None) -> Report:
    """Kill and restart a running `server` `kills` times under load; the report of what held."""
    return Run(server, users, admin, seed, workers).run(kills, progress)


# -- the command -------------------------------------------------------------------

class CrashServer:
    """geventpop3 for the command: POP3 and MSMP on 127.0.0.1, its Maildir and state under `root`."""

    def __init__(self, root: Path, users: dict[str, str], admin: tuple[str, str], workers: int | None = None) -> None:
        self.root = root
        self.maildir = root / "mail"
        self.port = free_port()
        self.admin_port = free_port()
        args = ["-P", str(self.admin_port), "-L", "127.0.0.1", "-d", str(self.maildir),
                "--state-dir", str(root / "state"), "--login-failure-delay", "0.05", "-a", ":".join(admin)]
        for name, password in users.items():
            args += ["-u", f"{name}:{password}"]
        if workers is not None:
            args += ["--workers", str(workers)]
        self.process = Geventpop3Process(self.port, args, root / "server.log")

    def start(self) -> CrashServer:
        self.process.start()
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(MsmpConnectionError), MsmpClient("127.0.0.1", self.admin_port, 2) as client:
                client.connect()
                return self
            if time.monotonic() > deadline:
                raise RuntimeError("MSMP did not come up")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send `sig` (SIGKILL after 30 s); the exit status. A killed supervisor's workers end on their own."""
        process = self.process.process
        assert process is not None
        return launcher.stop(process, sig, 30, kill_group=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=1000, help="SIGKILLs (and restarts) in the run (default 1000)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--workers", type=int, default=4, help="POP3 clients at once (default 4)")
    parser.add_argument("--users", type=int, default=8, help="mailboxes (default 8)")
    parser.add_argument("--dir", help="work directory (default: a temporary one, removed after a clean run)")
    parser.add_argument("--server-workers", type=int, help="the server's --workers (default: the server's own)")
    options = parser.parse_args(argv)
    if options.kills < 1 or options.workers < 1 or options.users < 1:
        parser.error("--kills, --workers and --users must be at least 1")
    root = Path(options.dir or tempfile.mkdtemp(prefix="geventpop3-crash-"))
    root.mkdir(parents=True, exist_ok=True)
    users = {f"mbox{i}": f"mbox{i}pw" for i in range(options.users)}
    server = CrashServer(root, users, ("admin", "adminpw"), options.server_workers).start()
    step = max(1, options.kills // 20)

    def progress(kill: int) -> None:
        if kill % step == 0:
            print(f"  {kill}/{options.kills} kills", flush=True)

    try:
        report = run_crash(server, users, ("admin", "adminpw"), options.kills, options.seed, options.workers,
                           progress)
    finally:
        status = server.stop()
    if status != 0:  # after all that, SIGTERM must still stop it cleanly
        report.violations.append(f"the server exited {status} at SIGTERM after the run")
    print("\n".join(report.lines()))
    if report.ok and not options.dir:
        shutil.rmtree(root, ignore_errors=True)
    elif not report.ok:
        print(f"work directory kept: {root}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
