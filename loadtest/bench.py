"""Speed and memory of geventpop3 beside Dovecot, on loopback (issue 2).

Starts each server itself on a Maildir tree it builds, runs each phase against a
fresh server process, checks every byte it reads, and writes medians and ratios to
Dovecot into a Markdown file. Every phase is bounded (a duration, a count and
socket timeouts), so the whole run ends by itself.

    python -m loadtest.bench                    # all phases, 3 runs, with Dovecot
    python -m loadtest.bench --only pipeline --runs 5 --no-dovecot
    python -m loadtest.bench --tls              # sessions, retr, held over implicit TLS (issue 10)
    python -m loadtest.bench --only sessions --only held --client python   # the gevent client

The sessions and held phases are driven by popload (loadtest/popload.c, compiled on
demand; `--client c`, the default without TLS) or by the Python gevent client
(`--client python`). The client shares the cores with the server it measures, so it is
part of the figures: popload costs a fraction of the Python client's CPU per session and
does not queue NOOPs behind thousands of greenlets (results/bench-client.md). The other
phases, and everything over TLS, use the Python client. The report says which one ran.

Memory (the held phase, issue 21) is the PSS summed over the server's whole process tree
(supervisor, keeper, workers; Dovecot's processes), read from outside: `before_pss_kib`
on the freshly started server before any login (its idle footprint; no warm-up login,
so what the first logins leave behind, hash-thread arenas for one, counts), and
`kib_per_session_pss` as (the largest reading while the sessions are held) minus that,
over the sessions held.

With --tls both servers get the same throw-away RSA 2048 certificate and every client
connects over implicit TLS (a full handshake each time, verified against the throw-away
CA); the goals are issue 10's and the report goes to results/bench-tls.md.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import psutil  # noqa: E402
from gevent.pool import Pool  # noqa: E402

if __package__ in (None, ""):  # run as a script: make `loadtest` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from geventpop3.testing.certs import Certificates, make_certificates  # noqa: E402
from geventpop3.testing.ports import free_port  # noqa: E402
from loadtest.benchlib import (  # noqa: E402
    PHASE_ERRORS,
    BenchError,
    Dataset,
    Dovecot,
    GeventPop3,
    Server,
    build_dataset,
    connect,
    cpu_seconds,
    memory,
    own_cpu_seconds,
    password,
    reset_indexes,
    reset_peak,
    session,
    status_kib,
)
from loadtest.pop3_client import Pop3Client, Pop3Error, unstuff  # noqa: E402
from loadtest.popload import Held, PoploadError, build, write_manifest  # noqa: E402
from loadtest.popload import sessions as popload_sessions  # noqa: E402

PHASES = ("sessions", "pipeline", "login", "retr", "held")
CLIENT_PHASES = ("sessions", "held")  # what --client c drives; the others always use the Python client
NOOP_INFLIGHT = 2000  # NOOPs in flight in a round of the held phase
TLS_PHASES = ("sessions", "retr", "held")  # the figures issue 10 asks for
NOTES_MARKER = "<!-- notes: kept when the benchmark rewrites this file -->"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEFAULT_OUT = os.path.join(RESULTS, "bench-core.md")
DEFAULT_TLS_OUT = os.path.join(RESULTS, "bench-tls.md")

Result = dict[str, float]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- phases --------------------------------------------------------------------

def one_session(server: Server, user: str, expected: dict[str, bytes]) -> None:
    """Login, STAT, LIST, UIDL, RETR every message, QUIT; checks every answer."""
    client = session(server.port, user, 30, server.ssl_context)
    try:
        stat = client.stat()
        total = sum(map(len, expected.values()))
        if stat != (len(expected), total):
            raise BenchError(f"{user}: STAT {stat!r}, expected {len(expected)} {total}")
        sizes = dict(client.list())
        uids = dict(client.uidl())
        if sorted(uids.values()) != sorted(expected):
            raise BenchError(f"{user}: UIDL does not match the delivered files")
        for number, uid in sorted(uids.items()):
            body = unstuff(client.retr(number))
            want = expected[uid]
            if body != want or sizes.get(number) != len(want):
                raise BenchError(f"{user}: RETR {number} differs from the delivered file")
        client.quit()
    finally:
        client.close()


def phase_sessions(server: Server, data: Dataset, opts: argparse.Namespace) -> Result:
    """Full sessions per second, one client per user, for a fixed duration."""
    if opts.client == "c":
        return phase_sessions_c(server, data, opts)
    done = [0]
    in_use = [0]
    errors: list[str] = []
    pids = server.pids()
    server_cpu, client_cpu = cpu_seconds(pids), own_cpu_seconds()
    start = time.perf_counter()
    deadline = start + opts.duration

    def worker(user: str) -> None:
        while time.perf_counter() < deadline and not errors:
            try:
                one_session(server, user, data.expected[user])
                done[0] += 1
            except Pop3Error as exc:
                if "IN-USE" in exc.text:
                    in_use[0] += 1  # the previous session's lock not yet gone: try again
                    gevent.sleep(0.001)
                    continue
                errors.append(f"{user}: {exc}")
            except (BenchError, OSError) as exc:
                errors.append(f"{user}: {exc}")

    greenlets = [gevent.spawn(worker, user) for user in data.session_users[:opts.clients]]
    gevent.joinall(greenlets, timeout=opts.duration + 60)
    gevent.killall(greenlets, timeout=5)
    elapsed = time.perf_counter() - start
    server_cpu, client_cpu = cpu_seconds(pids) - server_cpu, own_cpu_seconds() - client_cpu
    if errors:
        raise BenchError(f"{len(errors)} failed sessions, first: {errors[0]}")
    return {"sessions_per_s": done[0] / elapsed, "sessions": done[0], "in_use_retries": in_use[0],
            "server_cpu_ms_per_session": 1000 * server_cpu / max(done[0], 1),
            "client_cpu_ms_per_session": 1000 * client_cpu / max(done[0], 1),
            "server_cores_busy": server_cpu / elapsed, "client_cores_busy": client_cpu / elapsed}


def phase_sessions_c(server: Server, data: Dataset, opts: argparse.Namespace) -> Result:
    """phase_sessions driven by popload: the same sessions and checks; its CPU from its own getrusage."""
    pids = server.pids()
    server_cpu = cpu_seconds(pids)
    report = popload_sessions(opts.popload, server.port, opts.sessions_manifest, opts.clients, opts.duration)
    server_cpu = cpu_seconds(pids) - server_cpu
    done, elapsed, client_cpu = report["sessions"], report["elapsed"], report["client_cpu_s"]
    if report["errors"]:
        raise BenchError(f"{report['errors']} failed sessions, first: {report['first_error']}")
    return {"sessions_per_s": done / elapsed, "sessions": done, "in_use_retries": report["in_use_retries"],
            "server_cpu_ms_per_session": 1000 * server_cpu / max(done, 1),
            "client_cpu_ms_per_session": 1000 * client_cpu / max(done, 1),
            "server_cores_busy": server_cpu / elapsed, "client_cores_busy": client_cpu / elapsed}


def phase_pipeline(server: Server, data: Dataset, opts: argparse.Namespace) -> Result:
    """1,000 commands (NOOP, LIST 1, UIDL 1, STAT) in one write: time to the last answer."""
    client = session(server.port, "pipe", 30, server.ssl_context)
    expected = data.expected["pipe"]
    uids = dict(client.uidl())
    sizes = dict(client.list())
    total = sum(map(len, expected.values()))
    commands = [b"NOOP", b"LIST 1", b"UIDL 1", b"STAT"]
    answers = [None, b"+OK 1 %d" % sizes[1], b"+OK 1 " + uids[1].encode(), b"+OK %d %d" % (len(expected), total)]
    payload = b"".join(commands[i % 4] + b"\r\n" for i in range(opts.pipeline))
    times = []
    for _ in range(opts.pipeline_reps):
        begin = time.perf_counter()
        client.send(payload)
        lines = [client.read_line() for _ in range(opts.pipeline)]
        times.append(time.perf_counter() - begin)
        for index, line in enumerate(lines):
            want = answers[index % 4]
            if (want is None and not line.startswith(b"+OK")) or (want is not None and line != want):
                raise BenchError(f"pipelined answer {index}: {line[:60]!r}, expected {want!r}")
    client.quit()
    return {"pipeline_ms": statistics.median(times) * 1000, "pipeline_best_ms": min(times) * 1000}


def phase_login(server: Server, data: Dataset, opts: argparse.Namespace) -> Result:
    """Login to the 10,000-message mailbox with no cache (first), then again (second)."""
    reset_indexes(os.path.join(data.root, "many"))
    result: Result = {}
    for which in ("first", "second"):
        client = connect(server.port, 120, server.ssl_context)
        client.command("USER many")
        begin = time.perf_counter()
        client.command("PASS pw-many")
        logged_in = time.perf_counter()
        stat = client.command("STAT").split()
        stated = time.perf_counter()
        if stat[1:3] != [str(data.many_count).encode(), str(data.many_total).encode()]:
            raise BenchError(f"many: STAT {stat!r}, expected {data.many_count} {data.many_total}")
        client.quit()
        result[f"{which}_login_ms"] = (logged_in - begin) * 1000
        result[f"{which}_login_stat_ms"] = (stated - begin) * 1000
    return result


def phase_retr(server: Server, data: Dataset, opts: argparse.Namespace) -> Result:
    """RETR of the big message: throughput and the serving process's peak RSS growth."""
    client = session(server.port, "big", 120, server.ssl_context)
    size = int(client.command("LIST 1").split()[2])
    if size != len(data.big_expected):
        raise BenchError(f"big: LIST says {size}, expected {len(data.big_expected)}")
    if isinstance(server, Dovecot):
        pids = server.pop3_pids()
        if len(pids) != 1:
            raise BenchError(f"expected one dovecot pop3 process, found {len(pids)}")
        pid = pids[0]
    else:
        pid = serving_pid(server.pids(), server.port, client.local_port())
    rss_before = status_kib(pid, "VmRSS")
    reset_peak(pid)
    pids = server.pids()
    server_cpu, client_cpu = cpu_seconds(pids), own_cpu_seconds()
    begin = time.perf_counter()
    client.send(b"RETR 1\r\n")
    client.status("RETR")
    body = client.read_body()
    elapsed = client.finished - begin
    server_cpu, client_cpu = cpu_seconds(pids) - server_cpu, own_cpu_seconds() - client_cpu
    peak = status_kib(pid, "VmHWM")
    if unstuff(body) != data.big_expected:
        raise BenchError("big: RETR differs from the delivered file")
    client.quit()
    return {"retr_mb_per_s": len(data.big_expected) / elapsed / 1e6, "retr_s": elapsed,
            "server_cpu_s": server_cpu, "client_cpu_s": client_cpu,
            "peak_growth_kib": peak - rss_before, "rss_before_kib": rss_before}


def serving_pid(pids: list[int], port: int, client_port: int) -> int:
    """The process holding the server side of the client's connection (with --workers: a worker)."""
    if len(pids) == 1:
        return pids[0]
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            for conn in psutil.Process(pid).net_connections("tcp"):
                if conn.laddr and conn.laddr.port == port and conn.raddr and conn.raddr.port == client_port:
                    return pid
    raise BenchError("no server process holds the RETR connection")


def phase_held(server: Server, data: Dataset, opts: argparse.Namespace) -> Result:
    """N sessions logged in at once, answering NOOP in rounds; server memory before and during."""
    if opts.client == "c":
        return phase_held_c(server, data, opts)
    users = data.held_users[:opts.held]
    gevent.sleep(0.5)
    before_pss, before_rss = memory(server.pids())
    clients: list[Pop3Client] = []
    errors: list[str] = []

    def open_one(user: str) -> None:
        try:
            clients.append(session(server.port, user, 120, server.ssl_context))
        except PHASE_ERRORS as exc:
            errors.append(f"{user}: {exc}")

    begin = time.perf_counter()
    pool = Pool(opts.held_concurrency)
    for user in users:
        if time.perf_counter() - begin > opts.held_timeout:
            break
        pool.spawn(open_one, user)
    pool.join(timeout=max(1.0, opts.held_timeout - (time.perf_counter() - begin)))
    pool.kill(timeout=5)
    established = time.perf_counter() - begin
    held = len(clients)
    result: Result = {"sessions": held, "failed_logins": len(errors), "establish_s": established,
                      "before_pss_kib": before_pss, "before_rss_kib": before_rss}
    try:
        if held < len(users):
            # Measured anyway over the sessions that did log in, and reported as such.
            log(f"  only {held} of {len(users)} sessions logged in"
                + (f"; first error: {errors[0]}" if errors else ""))
            if held < len(users) // 2:
                raise BenchError(f"only {held} of {len(users)} sessions logged in")
            errors.clear()
        samples = [memory(server.pids())]
        round_times = []

        latencies: list[float] = []

        def noop(client: Pop3Client) -> None:
            try:
                begin = time.perf_counter()
                client.command("NOOP")
                latencies.append(time.perf_counter() - begin)
            except PHASE_ERRORS as exc:
                errors.append(str(exc))

        client_cpu = 0.0
        for _ in range(opts.noop_rounds):
            start, cpu = time.perf_counter(), own_cpu_seconds()
            pool = Pool(NOOP_INFLIGHT)
            pool.map(noop, clients)
            round_times.append(time.perf_counter() - start)
            client_cpu += own_cpu_seconds() - cpu
            if errors:
                raise BenchError(f"{len(errors)} NOOPs failed, first: {errors[0]}")
            samples.append(memory(server.pids()))
        during_pss = max(s[0] for s in samples)
        during_rss = max(s[1] for s in samples)
        result.update({
            "during_pss_kib": during_pss, "during_rss_kib": during_rss,
            "kib_per_session_pss": (during_pss - before_pss) / held,
            "kib_per_session_rss": (during_rss - before_rss) / held,
            "noop_round_s": statistics.median(round_times),
            "noop_p50_ms": 1000 * percentile(latencies, 0.50),
            "noop_p99_ms": 1000 * percentile(latencies, 0.99),
            "client_cpu_us_per_noop": 1e6 * client_cpu / max(len(latencies), 1),
        })
    finally:
        for client in clients:
            client.close()
        gevent.idle()  # gevent closes descriptors from the event loop: let it, or they pile up
    return result


def phase_held_c(server: Server, data: Dataset, opts: argparse.Namespace) -> Result:
    """phase_held driven by popload: it holds the sessions while memory is sampled between its steps."""
    wanted = min(opts.held, len(data.held_users))
    gevent.sleep(0.5)
    before_pss, before_rss = memory(server.pids())
    with Held(opts.popload, server.port, opts.held_manifest, wanted, opts.noop_rounds, opts.held_concurrency,
              NOOP_INFLIGHT, opts.held_timeout, timeout=120) as held:
        opened = held.established()
        count = opened["sessions"]
        if count < wanted:
            log(f"  only {count} of {wanted} sessions logged in; first error: {opened['first_error']}")
            if count == 0 or count < wanted // 2:
                raise BenchError(f"only {count} of {wanted} sessions logged in")
        samples = [memory(server.pids())]
        held.go_on()
        for _ in range(opts.noop_rounds):
            step = held.round()
            if step["errors"]:
                raise BenchError(f"{step['errors']} NOOPs failed, first: {step['first_error']}")
            samples.append(memory(server.pids()))
            held.go_on()
        report = held.done()
    during_pss = max(s[0] for s in samples)
    during_rss = max(s[1] for s in samples)
    return {"sessions": count, "failed_logins": opened["failed_logins"], "establish_s": opened["establish_s"],
            "before_pss_kib": before_pss, "before_rss_kib": before_rss,
            "during_pss_kib": during_pss, "during_rss_kib": during_rss,
            "kib_per_session_pss": (during_pss - before_pss) / count,
            "kib_per_session_rss": (during_rss - before_rss) / count,
            "noop_round_s": report["noop_round_s"], "noop_p50_ms": report["noop_p50_ms"],
            "noop_p99_ms": report["noop_p99_ms"],
            "client_cpu_us_per_noop": 1e6 * report["rounds_cpu_s"] / max(report["noops"], 1)}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


PHASE_FUNCS: dict[str, Callable[[Server, Dataset, argparse.Namespace], Result]] = {
    "sessions": phase_sessions, "pipeline": phase_pipeline, "login": phase_login,
    "retr": phase_retr, "held": phase_held,
}

# phase -> its headline rows: (metric, description, target check on (geventpop3, dovecot) -> (met, text))
TargetCheck = Callable[[float, float | None], tuple[bool | None, str]]
Headline = tuple[str, str, TargetCheck]


def versus_dovecot(test: Callable[[float, float], bool], text: str) -> TargetCheck:
    """A target that is a ratio to Dovecot's figure: unknown without Dovecot."""
    return lambda g, d: (None, "needs Dovecot") if d is None else (test(g, d), text)


HEADLINE: dict[str, list[Headline]] = {
    "sessions": [("sessions_per_s", "full sessions/s, 50 clients",
                  versus_dovecot(lambda g, d: g >= 3 * d, ">= 3x Dovecot"))],
    "held": [("before_pss_kib", "idle server tree PSS KiB, fresh start", lambda g, d: (g <= 60 * 1024, "<= 60 MiB")),
             ("kib_per_session_pss", "server tree PSS KiB per held session", lambda g, d: (g <= 4, "<= 4 KiB/session")),
             ("noop_p99_ms", "NOOP round p99 over the held sessions, ms",
              versus_dovecot(lambda g, d: g <= d / 2, "<= 1/2 Dovecot's"))],
    "retr": [("retr_mb_per_s", "RETR 64 MiB, MB/s", versus_dovecot(lambda g, d: g >= d, ">= Dovecot"))],
    "pipeline": [("pipeline_ms", "1,000 pipelined commands, ms",
                  versus_dovecot(lambda g, d: g <= 2 * d, "<= 2x Dovecot"))],
    "login": [("second_login_stat_ms", "second login + STAT, 10,000 messages, ms",
               lambda g, d: (g < 200, "< 200 ms"))],
}
# Issue 10's goals over implicit TLS; the other phases keep their plaintext targets.
TLS_HEADLINE: dict[str, list[Headline]] = {
    **HEADLINE,
    "sessions": [("sessions_per_s", "full TLS sessions/s, 50 clients",
                  versus_dovecot(lambda g, d: g >= 1.5 * d, ">= 1.5x Dovecot"))],
    "held": [("before_pss_kib", "idle server tree PSS KiB, fresh start", lambda g, d: (g <= 60 * 1024, "<= 60 MiB")),
             ("kib_per_session_pss", "server tree PSS KiB per held TLS session",
              lambda g, d: (g <= 16, "<= 16 KiB/session"))],
    "retr": [("retr_mb_per_s", "RETR 64 MiB over TLS, MB/s",
              versus_dovecot(lambda g, d: g >= 1.5 * d, ">= 1.5x Dovecot"))],
}


# -- driver --------------------------------------------------------------------

def start_server(kind: str, port: int, data: Dataset, workdir: str, opts: argparse.Namespace,
                 tls: Certificates | None = None) -> Server:
    if kind == "geventpop3":
        return GeventPop3(port, data, workdir, shlex.split(opts.gp_command) if opts.gp_command else None, tls,
                          workers=opts.workers)
    return Dovecot(port, data, tls)


def run_all(opts: argparse.Namespace) -> dict[str, dict[str, dict[str, list[float]]]]:
    """phase -> server -> metric -> one value per run."""
    workdir = opts.workdir or tempfile.mkdtemp(prefix="geventpop3-bench.")
    os.makedirs(workdir, exist_ok=True)
    os.chmod(workdir, 0o755)  # Dovecot's mail processes run as vmail and must reach the tree
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    try:
        log(f"building the Maildir tree in {workdir}")
        needs_held = "held" in opts.only
        data = build_dataset(workdir, held=opts.held if needs_held else 0, sessions_users=opts.clients,
                             many=opts.many if "login" in opts.only else 0,
                             big_size=(opts.big_mib << 20) if "retr" in opts.only else 4096, log=log)
        kinds = ["geventpop3"] + ([] if opts.no_dovecot else ["dovecot"])
        if opts.client == "c":
            prepare_popload(data, workdir, opts)
        tls = make_certificates(os.path.join(workdir, "tls"), rsa=True) if opts.tls else None  # RSA 2048, both servers
        for run in range(opts.runs):
            for phase in opts.only:
                for offset, kind in enumerate(kinds):
                    log(f"run {run + 1}/{opts.runs}: {phase} on {kind}")
                    port = opts.port_base + offset if opts.port_base else free_port()
                    load = os.getloadavg()  # the machine is shared: what else ran, beside this phase
                    server = start_server(kind, port, data, workdir, opts, tls)
                    try:
                        values = PHASE_FUNCS[phase](server, data, opts)
                    except PHASE_ERRORS as exc:
                        log(f"  FAILED: {exc}")
                        values = {"failed": 1.0}
                    finally:
                        server.stop()
                    values.update(loadavg_1m_before=load[0], loadavg_1m_after=os.getloadavg()[0])
                    log("  " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in values.items()))
                    slot = results.setdefault(phase, {}).setdefault(kind, {})
                    for key, value in values.items():
                        slot.setdefault(key, []).append(float(value))
    finally:
        if not opts.keep:
            # Not shutil.rmtree: under gevent its os.close calls only really close when the
            # event loop runs, and 10,000 Maildirs' descriptors would pile up past the limit.
            subprocess.run(["rm", "-rf", "--", workdir], check=False)
    return results


def prepare_popload(data: Dataset, workdir: str, opts: argparse.Namespace) -> None:
    """Compile popload into the work directory and write its manifests (expected answers) there."""
    opts.popload = build(os.path.join(workdir, "popload-cache"))
    opts.sessions_manifest = write_manifest(
        os.path.join(workdir, "popload-sessions.manifest"),
        [(user, password(user), data.expected[user]) for user in data.session_users[:opts.clients]])
    opts.held_manifest = write_manifest(os.path.join(workdir, "popload-held.manifest"),
                                        [(user, password(user), {}) for user in data.held_users[:opts.held]])


def client_text(opts: argparse.Namespace) -> str:
    """Which load client made the figures: the report says it in its header."""
    driven = [phase for phase in opts.only if phase in CLIENT_PHASES]
    if opts.client == "c" and driven:
        rest = [phase for phase in opts.only if phase not in CLIENT_PHASES]
        return (f"load client: popload (C, loadtest/popload.c) for {', '.join(driven)}"
                + (f"; the Python gevent client for {', '.join(rest)}" if rest else ""))
    return "load client: the Python gevent client (loadtest/pop3_client.py)"


def median(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def machine() -> list[str]:
    try:
        dovecot = subprocess.run(["dovecot", "--version"], capture_output=True, text=True).stdout.strip() or "-"
    except OSError:
        dovecot = "-"
    import gevent as g

    return [f"- nproc: {os.cpu_count()}", f"- uname -a: `{' '.join(platform.uname())}`",
            f"- Python {platform.python_version()}, gevent {g.__version__}, Dovecot {dovecot}"]


def report(results: dict[str, Any], opts: argparse.Namespace) -> str:
    title = ("# Benchmark over implicit TLS (issue 10): geventpop3 beside Dovecot with TLS" if opts.tls
             else "# Benchmark of the POP3 core (issue 2): geventpop3 beside Dovecot")
    lines = [title, "",
             f"Written by `python -m loadtest.bench` on {time.strftime('%Y-%m-%d %H:%M %Z')}; "
             f"runs={opts.runs}, phases={','.join(opts.only)}, geventpop3 --workers "
             f"{opts.workers if opts.workers is not None else 'default (the CPUs)'}"
             f"{', over implicit TLS (RSA 2048, full handshakes)' if opts.tls else ''}; "
             f"{client_text(opts)}.", "", "## Machine",
             *(getattr(opts, "machine", None) or machine()), "",
             "## Headline (medians of the runs; ratio = geventpop3 / Dovecot)", "",
             "| phase | metric | geventpop3 | Dovecot | ratio | target | met |",
             "|---|---|---:|---:|---:|---|---|"]
    for phase in opts.only:
        if phase not in results:
            continue
        for metric, text, check in (TLS_HEADLINE if opts.tls else HEADLINE)[phase]:
            g = median(results[phase].get("geventpop3", {}).get(metric))
            d = median(results[phase].get("dovecot", {}).get(metric))
            ratio = f"{g / d:.2f}" if g is not None and d else "-"
            met, target = check(g, d) if g is not None else (None, "-")
            mark = {True: "yes", False: "**no**", None: "-"}[met]
            lines.append(f"| {phase} | {text} | {fmt(g)} | {fmt(d)} | {ratio} | {target} | {mark} |")
    lines += ["", "## Every figure (median, and each run)", ""]
    for phase in opts.only:
        if phase not in results:
            continue
        lines += [f"### {phase}", "", "| server | metric | median | runs |", "|---|---|---:|---|"]
        for kind, metrics in results[phase].items():
            for key, values in metrics.items():
                lines.append(f"| {kind} | {key} | {fmt(median(values))} | {', '.join(fmt(v) for v in values)} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def write_report(text: str, path: str) -> None:
    notes = ""
    if os.path.exists(path):
        with open(path) as handle:
            old = handle.read()
        if NOTES_MARKER in old:
            notes = old[old.index(NOTES_MARKER):]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text + "\n" + (notes or NOTES_MARKER + "\n"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--only", action="append", choices=PHASES, help="run only this phase (repeatable)")
    add("--runs", type=int, default=3, help="runs per phase and server; medians are reported (default 3)")
    add("--no-dovecot", action="store_true", help="measure geventpop3 alone")
    add("--port-base", type=int, default=0, help="geventpop3 listens here, Dovecot on the next port "
        "(default: free ports, so a server someone else left on a fixed port is never measured instead)")
    add("--duration", type=float, default=10.0, help="seconds of the sessions phase (default 10)")
    add("--clients", type=int, default=50, help="concurrent clients of the sessions phase (default 50)")
    add("--held", type=int, default=10_000, help="sessions held at once (default 10000)")
    add("--held-concurrency", type=int, default=200, help="logins in flight while opening them (default 200)")
    add("--held-timeout", type=float, default=300.0, help="seconds allowed to open the held sessions")
    add("--noop-rounds", type=int, default=3, help="NOOP rounds over the held sessions (default 3)")
    add("--pipeline", type=int, default=1000, help="commands in the pipelined write (default 1000)")
    add("--pipeline-reps", type=int, default=5, help="pipelined writes per run; their median counts")
    add("--many", type=int, default=10_000, help="messages of the login phase's mailbox (default 10000)")
    add("--big-mib", type=int, default=64, help="size of the RETR phase's message in MiB (default 64)")
    add("--workdir", help="where to build the Maildir tree (default: a new temporary directory)")
    add("--keep", action="store_true", help="keep the work directory")
    add("--gp-command", help="command that starts geventpop3, for A/B tests of a change "
        "(default: this Python -m geventpop3); the benchmark appends the flags")
    add("--tls", action="store_true", help="over implicit TLS, both servers with one throw-away RSA 2048 "
        f"certificate (needs trustme); default phases {','.join(TLS_PHASES)}, default --out {DEFAULT_TLS_OUT}")
    add("--workers", type=int, help="geventpop3's --workers (default: not given, so the server's own default, "
        "the number of CPUs; leave it out for an older --gp-command tree that has no such flag)")
    add("--client", choices=("c", "python"), help="load client of the sessions and held phases: c (popload, "
        "compiled on demand with cc; the default) or python (the gevent client; the only one, so the default, "
        "with --tls)")
    add("--out", help=f"Markdown result file (default {DEFAULT_OUT})")
    opts = parser.parse_args(argv)
    opts.only = [p for p in PHASES if p in (opts.only or (TLS_PHASES if opts.tls else PHASES))]
    opts.out = opts.out or (DEFAULT_TLS_OUT if opts.tls else DEFAULT_OUT)
    if opts.held > 19_000 or opts.runs < 1 or opts.duration <= 0:
        parser.error("--held at most 19000, --runs and --duration positive")
    if opts.tls and opts.client == "c":
        parser.error("--client c speaks no TLS: use --client python with --tls")
    opts.client = opts.client or ("python" if opts.tls else "c")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the servers started so far are stopped.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    if not opts.no_dovecot and shutil.which("dovecot") is None:
        log("dovecot is not installed: measuring geventpop3 alone")
        opts.no_dovecot = True
    opts.machine = machine()  # before the phases: afterwards the client may be short of descriptors
    try:
        results = run_all(opts)
    except PoploadError as exc:
        print(f"loadtest.bench: {exc}", file=sys.stderr)
        return 2
    text = report(results, opts)
    write_report(text, opts.out)
    print(text)
    log(f"written to {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
