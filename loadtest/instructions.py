"""Instructions per full POP3 session (callgrind), A/B between source trees.

Clock and CPU-time A/Bs on a shared 2-vCPU machine move ±15 % round to round; the number of
instructions the server executes for the same work does not (repeatable to about 0.5 %), so a
2 % change can be seen and bisected. Each tree (`--tree NAME=PATH`, run as `PYTHONPATH=PATH`)
serves (`--workers 1 --no-state`, or `--workers N`) under `valgrind --tool=callgrind`; after
`--warm-up` sessions the counters are zeroed, `--sessions` full sessions run (login, STAT,
RETR of each of 10 messages, QUIT, over poplib), and the dump's total is divided by them.
With workers, valgrind follows the forks and the interpreters started (one dump file each):
every process of the server's tree is zeroed and dumped by its pid (not every callgrind
on the machine: other measurements may run) and the totals are summed, the supervisor's
shown apart.

    python -m loadtest.instructions --tree before=/path/to/old --tree now=. [--sessions 200] [--workers 2]

Needs valgrind (Debian package `valgrind`). About 2 minutes a tree at the defaults.
"""

from __future__ import annotations

import argparse
import glob
import os
import poplib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from geventpop3.testing import launcher
from geventpop3.testing.ports import free_port
from loadtest.launch import interleaved, make_users, ratio_to

MESSAGES = 10
START_TIMEOUT = 300.0  # the interpreter starts some 50 times slower under valgrind


def deliver(maildir: str) -> None:
    """10 messages of about 2 KB in the user's new/: what each measured session retrieves."""
    for index in range(MESSAGES):
        Path(maildir, "new", f"{1_700_000_000 + index}.M{index}P1.bench").write_bytes(
            b"Subject: message %d\n\n" % index + b"a line of text in the body\n" * 80)


def session(port: int) -> None:
    client = poplib.POP3("127.0.0.1", port, timeout=120)
    client.user("bench")
    client.pass_("benchpw")
    count, _ = client.stat()
    if count != MESSAGES:
        raise RuntimeError(f"STAT says {count} messages, expected {MESSAGES}")
    for number in range(1, MESSAGES + 1):
        client.retr(number)
    client.quit()


def wait_serving(port: int, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            poplib.POP3("127.0.0.1", port, timeout=30).quit()
            return
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited ({server.returncode}) before serving") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"not serving after {START_TIMEOUT:.0f} s under valgrind") from None
            time.sleep(0.5)


def total_instructions(dump: str) -> int:
    """The `summary:`/`totals:` line of a callgrind dump (the first event is Ir)."""
    for line in Path(dump).read_text(encoding="ascii", errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dump}")


def tree_pids(pid: int) -> list[int]:
    """`pid` and every process under it (from /proc's children lists)."""
    found = [pid]
    for parent in found:
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        found.extend(int(child) for child in children)
    return found


def measure(tree: str, sessions: int, warm_up: int, workers: int = 1) -> tuple[float, float]:
    """Instructions the server of `tree` executes per full session: all of its processes, the supervisor's."""
    root = tempfile.mkdtemp(prefix="geventpop3-instructions.")
    try:
        make_users(root, ["bench"])
        deliver(os.path.join(root, "mail", "bench"))
        port = free_port()
        out = os.path.join(root, "callgrind.out")
        server = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", "--dump-instr=no",
             "--trace-children=yes", "--collect-atstart=yes", os.path.realpath(sys.executable),
             "-P", "-m", "geventpop3",
             "-l", "127.0.0.1", "-p", str(port), "-L", "127.0.0.1", "-P", str(free_port()),
             "-d", os.path.join(root, "mail"), "--users-file", os.path.join(root, "users"),
             "--workers", str(workers), *(["--no-state"] if workers == 1 else []), "--log-level", "WARNING",
             *launcher.tcp_only_msmp(tree)],
            env=dict(os.environ, PYTHONPATH=os.path.abspath(tree)), cwd=root,
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(root, "server.log"), "wb"))  # noqa: SIM115
        try:
            try:
                wait_serving(port, server)
            except RuntimeError:
                sys.stderr.write(Path(root, "server.log").read_text(errors="replace")[-3000:])
                raise
            for _ in range(warm_up):
                session(port)
            pids = tree_pids(server.pid)
            for pid in pids:
                subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
            for _ in range(sessions):
                session(port)
            if tree_pids(server.pid) != pids:
                raise RuntimeError("a process of the server started or ended while measured")
            totals: dict[int, int] = {}
            for pid in pids:
                before = set(glob.glob(f"{out}.{pid}.*"))
                subprocess.run(["callgrind_control", "-d", "measured", str(pid)], check=True, capture_output=True)
                dumps = set(glob.glob(f"{out}.{pid}.*")) - before
                if not dumps:
                    raise RuntimeError(f"callgrind wrote no dump for pid {pid}")
                totals[pid] = total_instructions(max(dumps, key=os.path.getmtime))
            return sum(totals.values()) / sessions, totals[server.pid] / sessions
        finally:
            server.terminate()
            server.wait(timeout=60)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", required=True, metavar="NAME=PATH",
                        help="a source tree to measure (repeatable; the first is the reference)")
    parser.add_argument("--sessions", type=int, default=200, help="measured sessions per run (default 200)")
    parser.add_argument("--warm-up", type=int, default=20, help="sessions before the counters are zeroed (default 20)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per tree, interleaved A, B, B, A (default 1)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1: one process)")
    opts = parser.parse_args(argv)
    if opts.sessions < 1 or opts.warm_up < 0 or opts.rounds < 1 or opts.workers < 1:
        parser.error("--sessions, --rounds and --workers at least 1, --warm-up not negative")
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("python -m loadtest.instructions: needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    trees = dict(spec.split("=", 1) for spec in opts.tree)
    results: dict[str, list[float]] = {name: [] for name in trees}
    for number, name in interleaved(list(trees), opts.rounds):
        value, supervisor = measure(trees[name], opts.sessions, opts.warm_up, opts.workers)
        results[name].append(value)
        apart = f" (the supervisor {supervisor / 1e6:.3f} M)" if opts.workers > 1 else ""
        print(f"round {number + 1} {name}: {value / 1e6:.3f} M instructions per full session{apart}", flush=True)
    first = next(iter(trees))
    reference = sorted(results[first])[len(results[first]) // 2]
    for name, values in results.items():
        median = sorted(values)[len(values) // 2]
        print(f"{name}: {median / 1e6:.3f} M per session ({ratio_to(median, reference, first)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
