"""Full POP3 sessions/s through HAProxy, with one geventpop3 instance and with two.

Three configurations, measured in interleaved rounds (1 2 3, 3 2 1, 1 2 3, ...), each run
on fresh server processes and a fresh PostgreSQL database:

- `direct`: one instance, clients connect to it (the baseline, no HAProxy);
- `haproxy-1`: HAProxy (TCP mode, `send-proxy-v2`) in front of that one instance;
- `haproxy-2`: HAProxy (`balance roundrobin`) in front of two instances.

Every instance has `--workers 1`, `--state-url` to the one database of the run, its own
`instance_name` and ports, the same Maildir root (20 users x 10 messages of 4 KiB, from
loadtest/cpu_per_session.py) and, behind HAProxy, `proxy_networks = ["127.0.0.1/32"]`.
A session is USER/PASS, STAT, RETR of every message, QUIT; client thread c logs in as
user c only (no two clients wait for one mailbox, so no [IN-USE] retries). After a
warm-up (200 sessions, every user on every instance) a fixed count of sessions is
measured: sessions/s, and the CPU time per session (utime + stime from /proc) of the
geventpop3 processes, of HAProxy, of the PostgreSQL cluster and of the client.

    python -m loadtest.bench_haproxy                  # 3 rounds, 3000 sessions, 20 clients
    python -m loadtest.bench_haproxy --rounds 1 --sessions 600 --clients 10

Needs `haproxy` and PostgreSQL's server binaries (tools/install-system-deps.sh) and the
`postgres` extra. Loopback only; a throw-away PostgreSQL cluster (initdb + pg_ctl on a
free port, as the `postgres` user when run as root). Bounded: every run stops after
--run-timeout seconds. Every process and temporary directory it starts is removed at the
end, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from geventpop3.testing import launcher
from geventpop3.testing.haproxy import haproxy_config, start_haproxy
from geventpop3.testing.ports import free_port
from geventpop3.testing.postgres import PostgresServer
from loadtest.cpu_per_session import USERS, build, session
from loadtest.launch import tree_cpu_seconds

CONFIGURATIONS = ("direct", "haproxy-1", "haproxy-2")

def children_cpu_seconds(pid: int) -> float:
    """cutime + cstime: CPU of `pid`'s children that have exited and been reaped."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def tree_and_reaped_cpu_seconds(pid: int) -> float:
    """CPU of `pid`, its living descendants and its reaped children."""
    return tree_cpu_seconds(pid) + children_cpu_seconds(pid)


def client_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_accepts(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"haproxy did not listen on port {port}")
        time.sleep(0.05)


@dataclass
class Run:
    rate: float
    cpu_ms: dict[str, float] = field(default_factory=dict)  # geventpop3, haproxy, postgres, client


@contextlib.contextmanager
def configuration(name: str, root: Path, url: str,
                  haproxy_threads: int | None = None) -> Iterator[tuple[int, list[int], int | None]]:
    """Start `name`'s processes; yield (the clients' port, geventpop3 pids, haproxy pid)."""
    behind = name != "direct"
    count = 2 if name == "haproxy-2" else 1
    with contextlib.ExitStack() as stack:
        ports, pids = [], []
        for index in range(count):
            port = free_port()
            config = root / f"{name}-{index}.toml"
            config.write_text(f'instance_name = "{name}-{index}"\n'
                              + ('proxy_networks = ["127.0.0.1/32"]\n' if behind else ""))
            server = launcher.launch(
                [sys.executable, "-P", "-m", "geventpop3", "-l", "127.0.0.1", "-p", str(port),
                 "-L", "127.0.0.1", "-P", str(free_port()), "-d", str(root / "mail"),
                 "--users-file", str(root / "users"), "--state-url", url, "--state-dir", str(root / f"state-{index}"),
                 "--config", str(config), "--workers", "1", "--log-level", "WARNING", *launcher.tcp_only_msmp()],
                ready_file=root / f"{name}-{index}.ready", log_path=root / f"{name}-{index}.log", cwd=root,
                env=os.environ)
            stack.callback(launcher.stop, server)
            launcher.wait_ready(server, root / f"{name}-{index}.ready", 60)
            ports.append(port)
            pids.append(server.pid)
        if not behind:
            yield ports[0], pids, None
            return
        front = free_port()
        servers = [f"s{index} 127.0.0.1:{port} send-proxy-v2" for index, port in enumerate(ports)]
        config = haproxy_config({front: servers}, [f"nbthread {haproxy_threads}"] if haproxy_threads else [])
        proxy = start_haproxy(root, config, f"{name}-haproxy")
        stack.callback(terminate, proxy)
        wait_accepts(front, proxy)
        yield front, pids, proxy.pid


def measure(name: str, root: Path, postgres: PostgresServer, sessions: int, clients: int, run_timeout: float,
            haproxy_threads: int | None = None) -> Run:
    url = postgres.create_database()
    with configuration(name, root, url, haproxy_threads) as (port, pids, proxy):
        for number in range(200):  # two in a row per user: round robin brings each to both instances
            session(port, number // 2)
        per_client = max(1, sessions // clients)
        deadline = time.monotonic() + run_timeout
        stopping = threading.Event()  # set on Ctrl-C: each client ends after its current session

        def work(client: int) -> None:
            for _ in range(per_client):
                if stopping.is_set():
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name}: not done within --run-timeout {run_timeout:g} s")
                session(port, client)

        def sample() -> dict[str, float]:
            return {"geventpop3": sum(tree_and_reaped_cpu_seconds(pid) for pid in pids),
                    "haproxy": tree_and_reaped_cpu_seconds(proxy) if proxy else 0.0,
                    "postgres": tree_and_reaped_cpu_seconds(postgres.pid), "client": client_cpu_seconds()}

        before, started = sample(), time.monotonic()
        with ThreadPoolExecutor(clients) as pool:
            try:
                for future in [pool.submit(work, client) for client in range(clients)]:
                    future.result()
            except BaseException:
                stopping.set()
                raise
        elapsed = time.monotonic() - started
        after = sample()
    done = per_client * clients
    return Run(done / elapsed, {key: (after[key] - before[key]) / done * 1000 for key in before})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_haproxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each measuring every configuration (default 3)")
    parser.add_argument("--sessions", type=int, default=3000, help="measured sessions per run (default 3000)")
    parser.add_argument("--clients", type=int, default=20, help=f"client threads, at most {USERS} (default 20)")
    parser.add_argument("--run-timeout", type=float, default=300, help="seconds a run may take (default 300)")
    parser.add_argument("--haproxy-threads", type=int, metavar="N",
                        help="HAProxy's nbthread (default: HAProxy's own, one thread per CPU)")
    opts = parser.parse_args(argv)
    if not 1 <= opts.clients <= USERS or opts.rounds < 1 or opts.sessions < 1 or opts.run_timeout <= 0 \
            or (opts.haproxy_threads is not None and opts.haproxy_threads < 1):
        parser.error(f"positive --rounds, --sessions, --run-timeout and --haproxy-threads; --clients from 1 to {USERS}")
    if shutil.which("haproxy") is None:
        print("bench_haproxy: haproxy not installed (tools/install-system-deps.sh)", file=sys.stderr)
        return 2

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    runs: dict[str, list[Run]] = {name: [] for name in CONFIGURATIONS}
    root = Path(tempfile.mkdtemp(prefix="bench-haproxy-"))
    postgres = None
    try:
        build(str(root))
        postgres = PostgresServer(fsync=True).start()  # fsync on, as deployed
        for round_number in range(opts.rounds):
            order = CONFIGURATIONS if round_number % 2 == 0 else CONFIGURATIONS[::-1]
            for name in order:
                run = measure(name, root, postgres, opts.sessions, opts.clients, opts.run_timeout, opts.haproxy_threads)
                runs[name].append(run)
                cpu = ", ".join(f"{key} {value:.3f}" for key, value in run.cpu_ms.items())
                print(f"round {round_number + 1} {name}: {run.rate:.0f} sessions/s; CPU ms per session: {cpu}",
                      flush=True)
    except KeyboardInterrupt:
        print("bench_haproxy: interrupted, cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not cut the clean-up short
        if postgres is not None:
            postgres.destroy()
        shutil.rmtree(root, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    report(runs)
    return 0


def report(runs: dict[str, list[Run]]) -> None:
    keys = ("geventpop3", "haproxy", "postgres", "client")
    rate = {name: statistics.median(run.rate for run in values) for name, values in runs.items()}
    cpu = {name: {key: statistics.median(run.cpu_ms[key] for run in values) for key in keys}
           for name, values in runs.items()}
    print(f"\nmedians of {len(runs['direct'])} rounds; CPU in ms per session\n")
    print("| configuration | sessions/s | geventpop3 | HAProxy | PostgreSQL | client | server side total |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in CONFIGURATIONS:
        c = cpu[name]
        total = c["geventpop3"] + c["haproxy"] + c["postgres"]
        print(f"| {name} | {rate[name]:.0f} | {c['geventpop3']:.3f} | {c['haproxy']:.3f} | {c['postgres']:.3f} "
              f"| {c['client']:.3f} | {total:.3f} |")
    print(f"\nhaproxy-2 / haproxy-1: {rate['haproxy-2'] / rate['haproxy-1']:.3f} x sessions/s")
    print(f"haproxy-1 / direct: {rate['haproxy-1'] / rate['direct']:.3f} x sessions/s; HAProxy "
          f"{cpu['haproxy-1']['haproxy']:.3f} ms CPU per session")


if __name__ == "__main__":
    sys.exit(main())
