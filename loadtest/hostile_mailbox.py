"""Issue 22's figures for hostile mailboxes, on one source tree (run it once per tree, A/B).

A victim, logged in, sends NOOP every 20 ms from a process of its own while an attacker
who owns a mailbox logs in to it: 500,000 empty files in new/ (login, then UIDL: cold,
then warm), 100,000 symlinks (log bytes per login), an 8 GiB sparse file (server CPU per
login, counted until the server goes quiet: before issue 22 it went on after the client
left), 20,000 DELE then every file renamed before QUIT (UPDATE time). The server is the
tree's own (`geventpop3.testing.Pop3TestServer`, one process); the limits that would refuse
these mailboxes are raised with `--after` (a tree before issue 22 does not know them).

    PYTHONPATH=/path/to/old python -m loadtest.hostile_mailbox
    PYTHONPATH=. python -m loadtest.hostile_mailbox --after
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path

import psutil

from geventpop3.testing import Pop3TestServer
from geventpop3.testing.lineclient import LineClient

USERS = {"victim": "victimpw", "many": "manypw", "links": "linkspw", "sparse": "sparsepw", "update": "updatepw"}
PERIOD = 0.02  # seconds between two of the victim's NOOPs


def _victim(port: int, stop: Event, out: Connection) -> None:
    client = LineClient(port, timeout=120)
    assert client.login("victim", USERS["victim"]).startswith(b"+OK")
    latencies = []
    while not stop.is_set():
        sent = time.perf_counter()
        assert client.cmd("NOOP").startswith(b"+OK")
        latencies.append(time.perf_counter() - sent)
        time.sleep(PERIOD)
    client.cmd("QUIT")
    out.send(latencies)


class Victim:
    """The victim's process, from construction to `result()`."""

    def __init__(self, port: int) -> None:
        self.stop = multiprocessing.Event()
        self.results, sending = multiprocessing.Pipe(False)
        self.process = multiprocessing.Process(target=_victim, args=(port, self.stop, sending))
        self.process.start()
        time.sleep(0.5)

    def result(self) -> str:
        self.stop.set()
        latencies = sorted(self.results.recv())
        self.process.join()
        p99 = latencies[max(0, int(len(latencies) * 0.99) - 1)]
        return f"victim NOOP n={len(latencies)} p99={p99 * 1000:.1f} ms max={latencies[-1] * 1000:.1f} ms"


def cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def maildir(server: Pop3TestServer, user: str) -> Path:
    box = server.maildir / user
    for sub in ("cur", "new", "tmp"):
        (box / sub).mkdir(parents=True, exist_ok=True)
    return box


def login(server: Pop3TestServer, user: str, uidl: bool = False) -> str:
    started = time.perf_counter()
    with LineClient(server.port, timeout=600, max_line=512) as client:
        answer = client.login(user, USERS[user])
        took = f"login {time.perf_counter() - started:.2f} s"
        if uidl and answer.startswith(b"+OK"):
            started = time.perf_counter()
            client.cmd("UIDL")
            took += f", UIDL of {len(client.body_lines())} in {time.perf_counter() - started:.2f} s"
        client.cmd("QUIT")
    return f"{answer[:40]!r} {took}"


def quiet_cpu(pid: int, since: float) -> float:
    """The server's CPU since `since`, once it has gone quiet (< 50 ms of CPU in a second)."""
    last = cpu(pid)
    for _ in range(120):
        time.sleep(1)
        now = cpu(pid)
        if now - last < 0.05:
            break
        last = now
    return cpu(pid) - since


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=500_000)
    parser.add_argument("--links", type=int, default=100_000)
    parser.add_argument("--dele", type=int, default=20_000)
    parser.add_argument("--after", action="store_true", help="raise max_messages_per_mailbox and max_message_size")
    args = parser.parse_args()
    settings = {"max_messages_per_mailbox": 10_000_000, "max_message_size": 16 << 30} if args.after else {}
    with Pop3TestServer(USERS, settings=settings) as server:
        pid = server.pid
        new = maildir(server, "many") / "new"
        for number in range(args.files):
            os.close(os.open(new / f"{1_700_000_000 + number}.M{number}.host", os.O_CREAT | os.O_WRONLY, 0o600))
        for attempt in ("cold", "warm"):
            victim = Victim(server.port)
            before = cpu(pid)
            outcome = login(server, "many", uidl=True)
            print(f"{args.files} files, {attempt}: {outcome}, server CPU {cpu(pid) - before:.2f} s; {victim.result()}",
                  flush=True)
        new = maildir(server, "links") / "new"
        for number in range(args.links):
            os.symlink("/etc/passwd", new / f"{1_700_000_000 + number}.L{number}.host")
        log = server.root / "server.log"
        for attempt in (1, 2):
            victim = Victim(server.port)
            size = log.stat().st_size
            outcome = login(server, "links")
            time.sleep(1.5)
            print(f"{args.links} symlinks, login {attempt}: {outcome}, log {log.stat().st_size - size} bytes; "
                  f"{victim.result()}", flush=True)
        with open(maildir(server, "sparse") / "new" / "1700000000.sparse.host", "wb") as handle:
            handle.truncate(8 << 30)
        for attempt in (1, 2):
            victim = Victim(server.port)
            before = cpu(pid)
            outcome = login(server, "sparse")
            print(f"8 GiB sparse file, login {attempt}: {outcome}, server CPU {quiet_cpu(pid, before):.2f} s; "
                  f"{victim.result()}", flush=True)
        box = maildir(server, "update")
        for number in range(args.dele):
            (box / "new" / f"{1_700_000_000 + number}.U{number}.host").write_bytes(b"Subject: x\n\nx\n")
        client = LineClient(server.port, timeout=900)
        assert client.login("update", USERS["update"]).startswith(b"+OK")
        for start in range(0, args.dele, 500):
            stop = min(start + 500, args.dele)
            client.send(b"".join(b"DELE %d\r\n" % number for number in range(start + 1, stop + 1)))
            for _ in range(start, stop):
                client.line()
        for name in os.listdir(box / "new"):
            os.rename(box / "new" / name, box / "cur" / f"{name}:2,S")
        victim = Victim(server.port)
        before = cpu(pid)
        started = time.perf_counter()
        answer = client.cmd("QUIT")
        print(f"{args.dele} DELE, renamed, QUIT: {answer[:40]!r} in {time.perf_counter() - started:.2f} s, "
              f"server CPU {cpu(pid) - before:.2f} s; {victim.result()}", flush=True)


if __name__ == "__main__":
    main()
