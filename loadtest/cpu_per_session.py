"""Server CPU time per full POP3 session, A/B between two source trees.

Wall-clock throughput on a shared machine moves with everything else that runs; the
CPU time the server's processes themselves spend per session (utime + stime from
/proc/<pid>/stat) does not. Each tree's server runs in turn (A, B, B, A, ...) on a
fresh Maildir tree of 20 users x 10 messages of 4 KiB; each session is USER/PASS,
STAT, RETR of every message, QUIT, from 20 client threads.

    python -m loadtest.cpu_per_session --tree before=/path/to/old --tree now=. --rounds 4

`--state NAME=STATE` runs tree NAME with a state store instead of --no-state: `sqlite`
(the default state directory beside the Maildir root) or a `postgresql://` URL; the
same tree may be given twice under two names to compare stores. With PostgreSQL the
CPU of the database's own processes per session is reported too (every process named
`postgres` on this machine: run no other PostgreSQL meanwhile).

    python -m loadtest.cpu_per_session --tree sqlite=. --tree pg=. --state sqlite=sqlite \
        --state pg=postgresql://postgres@127.0.0.1:5432/bench --rounds 3
    python -m loadtest.cpu_per_session --tree w1=.@1 --tree w2=.@2   # one process vs two workers

The CPU time is summed over the server's process tree (with --workers: the supervisor
and every worker).

    python -m loadtest.cpu_per_session --tls --tree before=/path/to/old --tree now=.

With --tls every session is implicit TLS (POP3S) with a full handshake, against one
throw-away RSA 2048 certificate (trustme) that the client verifies.
"""

from __future__ import annotations

import argparse
import os
import poplib
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from geventpop3.testing import launcher
from geventpop3.testing.certs import Certificates, make_certificates
from geventpop3.testing.ports import free_port
from loadtest.benchlib import wait_tls_greeting
from loadtest.launch import (
    interleaved,
    make_users,
    own_cpu_seconds,
    ratio_to,
    tree_cpu_seconds,
)

USERS, MESSAGES = 20, 10
BODY = b"x" * 70 + b"\n"


def build(root: str) -> None:
    """The users (cheap scrypt hashes) and their Maildirs of MESSAGES messages of 4 KiB each."""
    names = [f"u{number}" for number in range(USERS)]
    make_users(root, names)
    for name in names:
        for index in range(MESSAGES):
            path = os.path.join(root, "mail", name, "cur", f"{1_700_000_000 + index}.M{index}P1.host:2,S")
            with open(path, "wb") as handle:
                handle.write(b"Subject: m%d\n\n" % index + BODY * 56)


def session(port: int, number: int, context: ssl.SSLContext | None = None) -> None:
    """One full session; a login refused as [IN-USE] (the user's last QUIT not yet done) is retried."""
    name = f"u{number % USERS}"
    while True:
        if context is None:
            client = poplib.POP3("127.0.0.1", port, timeout=30)
        else:
            client = poplib.POP3_SSL("127.0.0.1", port, timeout=30, context=context)
        try:
            client.user(name)
            client.pass_(name + "pw")
        except poplib.error_proto as exc:
            client.close()
            if b"IN-USE" in exc.args[0]:
                time.sleep(0.001)
                continue
            raise
        client.stat()
        for index in range(1, MESSAGES + 1):
            client.retr(index)
        client.quit()
        return


def postgres_cpu_seconds() -> float:
    """CPU time of every process named `postgres` (the database's server processes)."""
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm", encoding="ascii") as handle:
                if handle.read().strip() != "postgres":
                    continue
            total += own_cpu_seconds(int(pid))
        except OSError:
            continue
    return total


def state_args(state: str) -> list[str]:
    if state == "none":
        return ["--no-state"]
    if state == "sqlite":
        return []
    return ["--state-url", state]


def measure(tree: str, sessions: int, clients: int, state: str = "none", workers: int | None = None,
            tls: Certificates | None = None) -> tuple[float, float, float]:
    """(server CPU ms per session, sessions/s, database CPU ms per session) of `tree`'s
    server, after a warm-up; CPU summed over the server's process tree."""
    root = tempfile.mkdtemp(prefix="cpu-per-session-")
    try:
        build(root)
        port = plain_port = free_port()
        context = None
        command = [sys.executable, "-P", "-m", "geventpop3", "-p", str(plain_port), "-l", "127.0.0.1",
                   "-P", str(free_port()), "-L", "127.0.0.1", "-d", os.path.join(root, "mail"),
                   "--users-file", os.path.join(root, "users"), *state_args(state), "--log-level", "WARNING",
                   *launcher.tcp_only_msmp(tree),
                   *(["--workers", str(workers)] if workers is not None else [])]
        if tls is not None:
            port = free_port()
            context = ssl.create_default_context(cafile=str(tls.ca))
            command += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--pop3s-port", str(port)]
        server, _ = launcher.start(command, ready_file=Path(root, "ready.json"), log_path=Path(root, "server.log"),
                                   timeout=30, env=dict(os.environ, PYTHONPATH=os.path.abspath(tree)), cwd=root)
        try:
            if context is not None:
                wait_tls_greeting(port, context, 30)
            for number in range(200):  # size caches and the password cache, as a running server has them
                session(port, number, context)
            database = state.startswith("postgres")
            cpu, started = tree_cpu_seconds(server.pid), time.monotonic()
            db_cpu = postgres_cpu_seconds() if database else 0.0
            per_client = max(1, sessions // clients)
            # Client c logs in as user c (mod USERS) only: no two clients wait for one mailbox's
            # lock, so no [IN-USE] retries (whose count depends on how evenly the server
            # progresses, not on what a session costs) are measured.
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(lambda client: [session(port, client, context) for _ in range(per_client)],
                              range(clients)))
            done = per_client * clients
            rate = done / (time.monotonic() - started)
            db_ms = (postgres_cpu_seconds() - db_cpu) / done * 1000 if database else 0.0
            return (tree_cpu_seconds(server.pid) - cpu) / done * 1000, rate, db_ms
        finally:
            launcher.stop(server)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.cpu_per_session", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", required=True, metavar="NAME=PATH[@WORKERS]",
                        help="a source tree to measure (repeat: two or more); @WORKERS passes --workers "
                        "(trees from before it have no such flag): --tree w1=.@1 --tree w2=.@2 compares them")
    parser.add_argument("--rounds", type=int, default=4, help="rounds, each measuring every tree once (default 4)")
    parser.add_argument("--sessions", type=int, default=6000, help="measured sessions per run (default 6000)")
    parser.add_argument("--clients", type=int, default=20, help="client threads (default 20)")
    parser.add_argument("--state", action="append", default=[], metavar="NAME=STATE",
                        help="tree NAME's state store: none (default), sqlite, or a postgresql:// URL")
    parser.add_argument("--tls", action="store_true", help="implicit TLS, a full handshake per session (needs trustme)")
    opts = parser.parse_args(argv)
    trees: dict[str, tuple[str, int | None]] = {}
    for item in opts.tree:
        name, _, spec = item.partition("=")
        path, _, workers = spec.partition("@")
        if not name or not path or (workers and not workers.isdigit()):
            parser.error(f"--tree {item}: expected NAME=PATH or NAME=PATH@WORKERS")
        trees[name] = (path, int(workers) if workers else None)
    states = dict(item.split("=", 1) for item in opts.state if "=" in item)
    if len(trees) < 2 or opts.rounds < 1 or opts.sessions < 1:
        parser.error("two or more --tree NAME=PATH, positive --rounds and --sessions")
    results: dict[str, list[float]] = {name: [] for name in trees}
    rates: dict[str, list[float]] = {name: [] for name in trees}
    db_cpu: dict[str, list[float]] = {name: [] for name in trees}
    certificates = tempfile.mkdtemp(prefix="cpu-per-session-tls-") if opts.tls else None
    tls = make_certificates(certificates, rsa=True) if certificates else None
    for round_number, name in interleaved(list(trees), opts.rounds):
        path, workers = trees[name]
        ms, rate, db_ms = measure(path, opts.sessions, opts.clients, states.get(name, "none"), workers, tls)
        results[name].append(ms)
        rates[name].append(rate)
        db_cpu[name].append(db_ms)
        extra = f", database {db_ms:.3f} ms" if db_ms else ""
        print(f"round {round_number + 1} {name}: {ms:.3f} ms server CPU per session{extra} "
              f"({rate:.0f} sessions/s)", flush=True)
    first = statistics.median(results[next(iter(trees))])
    for name, values in results.items():
        median = statistics.median(values)
        db_median = statistics.median(db_cpu[name])
        extra = f" + {db_median:.3f} ms database" if db_median else ""
        print(f"{name}: median {median:.3f} ms per session{extra}, {ratio_to(median, first, next(iter(trees)))}; "
              f"median {statistics.median(rates[name]):.0f} sessions/s")
    if certificates:
        shutil.rmtree(certificates, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
