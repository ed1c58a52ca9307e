"""Server CPU time per NOOP on held (parked, logged-in) sessions, A/B between source trees.

What a held session costs the server each time its client speaks is the wake path: the
event loop's I/O watcher fires, the session reads, parses, answers, and parks again.
Wall-clock latency on a shared machine moves with everything else that runs; the CPU
time of the server's processes (utime + stime from /proc, summed over the process tree
with --workers) per NOOP answered does not. Each tree's server runs in turn (A, B, B, A,
...) with `--sessions` users logged in at once, then `--rounds` rounds of one NOOP per
session with `--in-flight` outstanding at any time (a closed loop, as `loadtest.bench
--only held` does it), from one epoll-driven client process; one warm-up round is not
measured.

    python -m loadtest.noop_cost --tree before=/path/to/old --tree now=. --workers 2

Reported per run: server CPU microseconds per NOOP, NOOPs/s, and the client-side
latency p50/p99 (the client is Python: on a loaded machine those move with the load).
"""

from __future__ import annotations

import argparse
import collections
import os
import select
import shutil
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from geventpop3.testing import launcher
from geventpop3.testing.ports import free_port
from loadtest.launch import interleaved, make_users, ratio_to, tree_cpu_seconds


def expect(sock: socket.socket, prefix: bytes) -> None:
    """Read one answer line (blocking) and check it starts with `prefix`."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(512)
        if not chunk:
            raise ConnectionError("closed by the server")
        data += chunk
    if not data.startswith(prefix):
        raise RuntimeError(f"unexpected answer {data[:80]!r}")


def login(port: int, number: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    expect(sock, b"+OK")
    name = f"n{number}"
    sock.sendall(f"USER {name}\r\n".encode())
    expect(sock, b"+OK")
    sock.sendall(f"PASS {name}pw\r\n".encode())
    expect(sock, b"+OK")
    sock.setblocking(False)
    return sock


def noop_rounds(socks: list[socket.socket], rounds: int, in_flight: int) -> list[float]:
    """`rounds` NOOPs per session on average, `in_flight` outstanding (at most one per session),
    always to the session idle longest; latencies in seconds."""
    fds = [s.fileno() for s in socks]
    poller = select.epoll(len(fds) + 1)
    for fd in fds:
        poller.register(fd, select.EPOLLIN)
    total = rounds * len(fds)
    idle = collections.deque(fds)
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    sent = 0
    clock = time.perf_counter
    write, read = os.write, os.read

    def send_next() -> None:
        nonlocal sent
        fd = idle.popleft()
        sent += 1
        sent_at[fd] = clock()
        write(fd, b"NOOP\r\n")

    while sent < min(in_flight, len(fds), total):
        send_next()
    while len(latencies) < total:
        ready = poller.poll(60)
        if not ready:
            raise RuntimeError(f"no NOOP answered for 60 s ({len(sent_at)} outstanding)")
        for fd, _ in ready:
            data = read(fd, 64)
            if data != b"+OK\r\n":
                raise RuntimeError(f"NOOP answered {data!r}")
            latencies.append(clock() - sent_at.pop(fd))
            idle.append(fd)
            if sent < total:
                send_next()
    poller.close()
    return latencies


def measure(tree: str, sessions: int, rounds: int, in_flight: int, workers: int) -> tuple[float, float, float, float]:
    """(server CPU us per NOOP, NOOPs/s, p50 ms, p99 ms) of `tree`'s server."""
    root = tempfile.mkdtemp(prefix="noop-cost-")
    socks: list[socket.socket] = []
    try:
        make_users(root, [f"n{number}" for number in range(sessions)])
        port = free_port()
        with open(os.path.join(root, "config.toml"), "w") as handle:
            handle.write(f"max_connections = {sessions + 100}\nmax_connections_per_ip = {sessions + 100}\n"
                         "idle_timeout = 600\n")
        command = [sys.executable, "-P", "-m", "geventpop3", "-p", str(port), "-l", "127.0.0.1",
                   "-P", str(free_port()), "-L", "127.0.0.1", "-d", os.path.join(root, "mail"),
                   "--users-file", os.path.join(root, "users"), "--config", os.path.join(root, "config.toml"),
                   "--no-state", "--log-level", "WARNING", "--workers", str(workers), *launcher.tcp_only_msmp(tree)]
        server, _ = launcher.start(command, ready_file=Path(root, "ready.json"), log_path=Path(root, "server.log"),
                                   timeout=60, env=dict(os.environ, PYTHONPATH=os.path.abspath(tree)), cwd=root)
        try:
            with ThreadPoolExecutor(32) as pool:
                socks = list(pool.map(lambda n: login(port, n), range(sessions)))
            noop_rounds(socks, 1, in_flight)  # warm-up
            cpu, started = tree_cpu_seconds(server.pid), time.perf_counter()
            latencies = noop_rounds(socks, rounds, in_flight)
            elapsed = time.perf_counter() - started
            used = tree_cpu_seconds(server.pid) - cpu
            latencies.sort()
            return (used / len(latencies) * 1e6, len(latencies) / elapsed,
                    latencies[len(latencies) // 2] * 1000, latencies[int(len(latencies) * 0.99)] * 1000)
        finally:
            for sock in socks:
                sock.close()
            launcher.stop(server, timeout=30)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.noop_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", required=True, metavar="NAME=PATH",
                        help="a source tree to measure (repeat: two or more)")
    parser.add_argument("--ab-rounds", type=int, default=4, help="A/B rounds, each measuring every tree once")
    parser.add_argument("--sessions", type=int, default=4000, help="held sessions (default 4000)")
    parser.add_argument("--rounds", type=int, default=5, help="measured NOOPs per session (default 5)")
    parser.add_argument("--in-flight", type=int, default=2000, help="NOOPs outstanding (default 2000)")
    parser.add_argument("--workers", type=int, default=2, help="server --workers (default 2)")
    opts = parser.parse_args(argv)
    trees = dict(item.split("=", 1) for item in opts.tree if "=" in item)
    if len(trees) != len(opts.tree) or not trees:
        parser.error("--tree NAME=PATH")
    if min(opts.ab_rounds, opts.sessions, opts.rounds, opts.in_flight, opts.workers) < 1:
        parser.error("--ab-rounds, --sessions, --rounds, --in-flight and --workers must be positive")
    results: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in trees}
    for ab_round, name in interleaved(list(trees), opts.ab_rounds):
        load = os.getloadavg()[0]
        row = measure(trees[name], opts.sessions, opts.rounds, opts.in_flight, opts.workers)
        results[name].append(row)
        print(f"round {ab_round + 1} {name}: {row[0]:.1f} us server CPU per NOOP, {row[1]:.0f} NOOPs/s, "
              f"p50 {row[2]:.1f} ms, p99 {row[3]:.1f} ms (load {load:.1f})", flush=True)
    first = statistics.median(r[0] for r in results[next(iter(trees))])
    for name, rows in results.items():
        cpu = statistics.median(r[0] for r in rows)
        print(f"{name}: median {cpu:.1f} us per NOOP ({ratio_to(cpu, first, next(iter(trees)))}), "
              f"{statistics.median(r[1] for r in rows):.0f} NOOPs/s, "
              f"p50 {statistics.median(r[2] for r in rows):.1f} ms, "
              f"p99 {statistics.median(r[3] for r in rows):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
