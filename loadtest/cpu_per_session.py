"""Server CPU time per full POP3 session, A/B between two source trees.

Wall-clock throughput on a shared machine moves with everything else that runs; the
CPU time the server process itself spends per session (utime + stime from
/proc/<pid>/stat) does not. Each tree's server runs in turn (A, B, B, A, ...) on a
fresh Maildir tree of 20 users x 10 messages of 4 KiB; each session is USER/PASS,
STAT, RETR of every message, QUIT, from 20 client threads.

    python -m loadtest.cpu_per_session --tree before=/path/to/old --tree now=. --rounds 4
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
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from loadtest.benchlib import wait_tls_greeting
from loadtest.launch import Certificate, free_port, make_certificate, wait_greeting

USERS, MESSAGES = 20, 10
CHEAP_COST = (2**8, 8, 1)  # the benchmarks' users: cheap to make, cached after the first login
BODY = b"x" * 70 + b"\n"


def build(root: str) -> None:
    """The Maildir tree and a users file of cheap scrypt hashes."""
    from geventpop3.users import hash_password

    entries = []
    for number in range(USERS):
        name = f"u{number}"
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(root, "mail", name, sub), exist_ok=True)
        for index in range(MESSAGES):
            path = os.path.join(root, "mail", name, "cur", f"{1_700_000_000 + index}.M{index}P1.host:2,S")
            with open(path, "wb") as handle:
                handle.write(b"Subject: m%d\n\n" % index + BODY * 56)
        entries.append(f"{name}:{hash_password(name + 'pw', CHEAP_COST)}")
    with open(os.path.join(root, "users"), "w", encoding="ascii") as handle:
        handle.write("\n".join(entries) + "\n")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def measure(tree: str, sessions: int, clients: int, tls: Certificate | None = None) -> tuple[float, float]:
    """(server CPU ms per session, sessions/s) of `tree`'s server, after a warm-up."""
    root = tempfile.mkdtemp(prefix="cpu-per-session-")
    try:
        build(root)
        port = plain_port = free_port()
        context = None
        command = [sys.executable, "-P", "-m", "geventpop3", "-p", str(plain_port), "-l", "127.0.0.1",
                   "-P", str(free_port()), "-L", "127.0.0.1", "-d", os.path.join(root, "mail"),
                   "--users-file", os.path.join(root, "users"), "--no-state", "--log-level", "WARNING"]
        if tls is not None:
            port = free_port()
            context = ssl.create_default_context(cafile=str(tls.ca))
            command += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--pop3s-port", str(port)]
        server = subprocess.Popen(command, env=dict(os.environ, PYTHONPATH=os.path.abspath(tree)), cwd=root,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_greeting(plain_port, 30)
            if context is not None:
                wait_tls_greeting(port, context, 30)
            for number in range(200):  # size caches and the password cache, as a running server has them
                session(port, number, context)
            cpu, started = cpu_seconds(server.pid), time.monotonic()
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(lambda number: session(port, number, context), range(sessions)))
            return (cpu_seconds(server.pid) - cpu) / sessions * 1000, sessions / (time.monotonic() - started)
        finally:
            server.terminate()
            server.wait(15)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.cpu_per_session", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", required=True, metavar="NAME=PATH",
                        help="a source tree to measure (repeat: two or more)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds, each measuring every tree once (default 4)")
    parser.add_argument("--sessions", type=int, default=6000, help="measured sessions per run (default 6000)")
    parser.add_argument("--clients", type=int, default=20, help="client threads (default 20)")
    parser.add_argument("--tls", action="store_true", help="implicit TLS, a full handshake per session (needs trustme)")
    opts = parser.parse_args(argv)
    trees = dict(item.split("=", 1) for item in opts.tree if "=" in item)
    if len(trees) < 2 or opts.rounds < 1 or opts.sessions < 1:
        parser.error("two or more --tree NAME=PATH, positive --rounds and --sessions")
    results: dict[str, list[float]] = {name: [] for name in trees}
    certificates = tempfile.mkdtemp(prefix="cpu-per-session-tls-") if opts.tls else None
    tls = make_certificate(certificates) if certificates else None
    for round_number in range(opts.rounds):
        order = list(trees) if round_number % 2 == 0 else list(reversed(trees))
        for name in order:
            ms, rate = measure(trees[name], opts.sessions, opts.clients, tls)
            results[name].append(ms)
            print(f"round {round_number + 1} {name}: {ms:.3f} ms server CPU per session ({rate:.0f} sessions/s)",
                  flush=True)
    first = statistics.median(results[next(iter(trees))])
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name}: median {median:.3f} ms per session, {median / first:.3f} x {next(iter(trees))}")
    if certificates:
        shutil.rmtree(certificates, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
