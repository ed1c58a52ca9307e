"""How fast a test gets its server: `Pop3TestServer()` until it accepts, and `add_user`.

    python loadtest/bench_testserver.py [--runs 10]

For each configuration (no user, one user given to the constructor, tls=True) starts and
stops a server `--runs` times, timing the constructor (it returns once the server serves
its POP3 port) and a POP3 greeting read right after, then `add_user` in the running
server; prints medians and ranges, with `python -c pass` for scale (the interpreter's own
start on this machine), and the CPU time the server process used from start to exit
(user + system, from the kernel's accounting of reaped children: what a busy machine
does not distort). Runs in a plain process: no gevent here, as in a user's tests.
"""

from __future__ import annotations

import argparse
import resource
import socket
import statistics
import subprocess
import sys
import time

from geventpop3.testing import Pop3TestServer

CONFIGURATIONS: dict[str, dict[str, object]] = {
    "Pop3TestServer()": {},
    'Pop3TestServer(users={"alice": ...})': {"users": {"alice": "secret"}},
    "Pop3TestServer(tls=True)": {"tls": True},
}


def milliseconds(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) * 1000


def one_start(options: dict[str, object]) -> tuple[float, float, float]:
    """(ms from the constructor to a greeting read, ms of one add_user, server CPU ms)."""
    cpu = children_cpu()
    started = time.perf_counter()
    server = Pop3TestServer(**options)  # type: ignore[arg-type]
    try:
        with socket.create_connection((server.host, server.port), timeout=10) as client:
            assert client.recv(512).startswith(b"+OK")
        to_greeting = milliseconds(started)
        started = time.perf_counter()
        server.add_user("bob", "bobpw")
        added = milliseconds(started)
    finally:
        server.stop()
    return to_greeting, added, children_cpu() - cpu


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values):.0f} ms (range {min(values):.0f}-{max(values):.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    runs = parser.parse_args().runs
    python, python_cpu = [], []
    for _ in range(runs):
        cpu = children_cpu()
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        python.append(milliseconds(started))
        python_cpu.append(children_cpu() - cpu)
    print(f"python -c pass: {summary(python)}; CPU {summary(python_cpu)}")
    for name, options in CONFIGURATIONS.items():
        starts, adds, cpus = zip(*(one_start(options) for _ in range(runs)), strict=True)
        print(f"{name}: start {summary(list(starts))}; add_user {summary(list(adds))}; "
              f"server CPU start to exit {summary(list(cpus))}")


if __name__ == "__main__":
    main()
