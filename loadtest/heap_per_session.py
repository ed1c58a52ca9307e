"""Python heap per held (logged-in, parked) session, A/B between source trees.

Tree PSS divided by the sessions held moves with what the first logins leave behind (the
hashing threads' malloc arenas, lazy imports, dict resizes): at 5,000 sessions a megabyte of
that reads as 200 bytes per session, and two runs of one tree differ by more than 5 %. What
one more session costs in Python objects does not move: tracemalloc counts it exactly. Each
tree (`--tree NAME=PATH`, run as `PYTHONPATH=PATH`) serves in-process, on loopback, with
`--sessions` users logged in after a warm-up; the bytes traced after minus before, per
session, are reported with the largest growths by source line. The clients live in the same
process and cost the same in every tree, so the difference between trees is the server's.

    python -m loadtest.heap_per_session --tree before=/path/to/old --tree now=. --sessions 3000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

WARM_UP = 20  # sessions opened and closed first: imports, caches, the first hash of each cost class


def tcp_only(tree: str) -> list[str]:
    """`--admin-socket none` where the tree has that flag: the default socket is one per machine."""
    flags = os.path.join(tree, "geventpop3", "flags.py")
    return ["--admin-socket", "none"] if os.path.exists(flags) and "--admin-socket" in open(flags).read() else []


def measure(root: str, sessions: int, top: int) -> dict[str, object]:
    """In a child whose PYTHONPATH is one tree: serve, hold `sessions` logins, trace the growth."""
    from gevent import monkey

    monkey.patch_all()
    import gc
    import socket
    import tracemalloc

    import gevent
    from gevent.pool import Pool

    tree = os.environ.get("PYTHONPATH", "")
    if os.path.exists(os.path.join(tree, "geventpop3", "app.py")):  # the flat tree of before issue 20
        from geventpop3.app import App  # type: ignore[import-not-found]

        from geventpop3.cli import parse_config  # type: ignore[attr-defined]
    else:
        from geventpop3.flags import parse_config
        from geventpop3.process.server import App
    tracemalloc.start(1)
    config = parse_config(["-d", os.path.join(root, "mail"), "--users-file", os.path.join(root, "users"),
                           "--config", os.path.join(root, "limits.toml"), "-p", "0", "-l", "127.0.0.1",
                           "-P", "0", "-L", "127.0.0.1", "--no-state", *tcp_only(tree)])
    app = App(config)
    gevent.spawn(app.run)
    while not app.pop3_servers:
        gevent.sleep(0.05)
    port = app.pop3_servers[0].socket.getsockname()[1]

    def answer(sock: socket.socket) -> bytes:
        line = b""
        while not line.endswith(b"\r\n"):
            chunk = sock.recv(1)
            if not chunk:
                raise ConnectionError("closed")
            line += chunk
        return line

    def login(index: int, held: list[socket.socket]) -> None:
        sock = socket.create_connection(("127.0.0.1", port))
        answer(sock)
        sock.sendall(f"USER u{index}\r\nPASS u{index}pw\r\n".encode())
        answer(sock)
        if not answer(sock).startswith(b"+OK"):
            raise RuntimeError(f"u{index} did not log in")
        held.append(sock)

    warm: list[socket.socket] = []
    for index in range(WARM_UP):
        login(index, warm)
    for sock in warm:
        sock.sendall(b"QUIT\r\n")
        answer(sock)
        sock.close()
    gevent.sleep(0.5)  # the logouts' records and closes run on the loop
    gc.collect()
    before, traced_before = tracemalloc.take_snapshot(), tracemalloc.get_traced_memory()[0]
    held: list[socket.socket] = []
    pool = Pool(200)
    for index in range(WARM_UP, WARM_UP + sessions):
        pool.spawn(login, index, held)
    pool.join(raise_error=True)
    gevent.sleep(0.5)
    gc.collect()
    after, traced_after = tracemalloc.take_snapshot(), tracemalloc.get_traced_memory()[0]
    lines = [(round(stat.size_diff / sessions, 1), str(stat.traceback))
             for stat in after.compare_to(before, "lineno")[:top]]
    return {"bytes_per_session": (traced_after - traced_before) / sessions, "top": lines}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.heap_per_session", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", required=True, metavar="NAME=PATH",
                        help="a source tree to measure (repeatable; the first is the reference)")
    parser.add_argument("--sessions", type=int, default=3000, help="sessions held (default 3000)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per tree, interleaved A, B, B, A (default 2)")
    parser.add_argument("--top", type=int, default=12, help="source lines listed per tree (default 12)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.child:  # stdlib imports only up to here: the child's tree may have no loadtest package

        print(json.dumps(measure(opts.child, opts.sessions, opts.top)))
        return 0
    from loadtest.launch import interleaved, make_users

    trees = dict(spec.split("=", 1) for spec in opts.tree)
    if not 0 < opts.sessions <= 20_000 or opts.rounds < 1:
        parser.error("--sessions from 1 to 20000, --rounds at least 1")
    results: dict[str, list[float]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(prefix="geventpop3-heap.") as root:
        make_users(root, [f"u{index}" for index in range(WARM_UP + opts.sessions)])
        with open(os.path.join(root, "limits.toml"), "w", encoding="ascii") as handle:
            handle.write("max_connections = 25000\nmax_connections_per_ip = 25000\n")
        for number, name in interleaved(list(trees), opts.rounds):
            child = subprocess.run(
                [sys.executable, "-P", os.path.abspath(__file__), "--tree", "x=x", "--child", root,
                 "--sessions", str(opts.sessions), "--top", str(opts.top)],
                env={**os.environ, "PYTHONPATH": os.path.abspath(trees[name])}, capture_output=True, text=True,
                timeout=600, check=False, cwd=root)
            if child.returncode != 0:
                print(f"{name}: failed: {child.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                return 1
            report = json.loads(child.stdout.strip().splitlines()[-1])
            results[name].append(report["bytes_per_session"])
            print(f"round {number + 1} {name}: {report['bytes_per_session']:.1f} B per held session")
            for size, where in report["top"]:
                print(f"    {size:8.1f} B  {where}")
    first = next(iter(trees))
    reference = statistics.median(results[first])
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name}: median {median:.1f} B per session ({median / reference:.3f} x {first})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
