"""Run one load-test scenario headless, end to end, and give a verdict.

It prepares the user pool, starts a local server (geventpop3, or the Dovecot peer for a
comparison, or none for a server you run yourself), runs Locust headless with CSV and
HTML reports, samples the server's memory and CPU once a second, then applies the gates:
the run fails (exit status 1) when more than --max-fail-ratio of the requests failed or
the 95th percentile of any POP3 step exceeds --max-p95 seconds.

    python -m loadtest.run --scenario dd --users 50 --run-time 60s --out loadtest/results/dd
    python -m loadtest.run --scenario stress --idle 10000 --dd-users 50 --out /tmp/stress
    python -m loadtest.run --scenario dd --server dovecot --out /tmp/dd-dovecot
    python -m loadtest.run --scenario mixed --server none --host pop3://mail.example.net:110 --no-refill ...
    python -m loadtest.run --scenario dd --tls implicit --out /tmp/dd-tls      # or --tls starttls

With --tls the POP3 users speak TLS: implicit (the local server's POP3S port) or STLS on
the plain port. A local server gets --tls-cert/--tls-key, or else a throw-away CA and RSA
2048 certificate made in --out/tls (needs trustme); the clients verify it (--cacert).

Everything lands in --out: locust_stats.csv (per step), locust_stats_history.csv,
locust_failures.csv, report.html, samples.csv (server RSS/CPU per second),
summary.json and summary.md (gates, per-step p50/p95, sessions/s, memory per session).
With --repeat N the runs go to run1..runN and summary.md gives the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from geventpop3.testing.certs import Certificates, make_certificates  # noqa: E402
from geventpop3.testing.ports import free_port  # noqa: E402
from loadtest.launch import Geventpop3Process, process_tree, wait_greeting  # noqa: E402
from loadtest.setup_pool import ensure_pool  # noqa: E402

DOVECOT_START = "dovecot-peer-start.sh"
DOVECOT_STOP = "dovecot-peer-stop.sh"
GATED_TYPES = ("POP3", "MSMP", "POOL")


@dataclass
class Scenario:
    classes: list[str]
    users: int
    spawn_rate: float
    run_time: str
    pool: dict[str, int]
    locust_args: list[str] = field(default_factory=list)


SCENARIOS = {
    # A few of every user class for a few seconds: the CI smoke run.
    "smoke": Scenario(["DownloadDeleteUser", "PollerUser", "IdleHolderUser", "AdminWatcherUser"], 8, 8, "5s",
                      {"dd": 8, "poll": 8, "idle": 8},
                      ["--poll-interval", "1", "--noop-interval", "1", "--watch-interval", "0.5"]),
    # The workloads together, as a production server sees them.
    "mixed": Scenario(["DownloadDeleteUser", "PollerUser", "IdleHolderUser", "AdminWatcherUser"], 100, 20, "60s",
                      {"dd": 100, "poll": 100, "idle": 100}, ["--poll-interval", "10", "--noop-interval", "10"]),
    # Throughput: download-and-delete sessions back to back.
    "dd": Scenario(["DownloadDeleteUser"], 50, 50, "30s", {"dd": 50}),
    # Held sessions only: memory per session.
    "hold": Scenario(["IdleHolderUser"], 10000, 500, "60s", {"idle": 10000}, ["--noop-interval", "30"]),
    # The stress scenario: N held sessions answering NOOP while 50 users download and delete.
    "stress": Scenario(["IdleHolderUser", "DownloadDeleteUser"], 10050, 500, "80s", {"idle": 10000, "dd": 50},
                       ["--noop-interval", "30"]),
}


# -- servers -------------------------------------------------------------------------

class Geventpop3Server:
    """geventpop3 in a subprocess, as an operator starts it."""

    kind = "geventpop3"

    def __init__(self, pool, out: Path, settings: dict[str, str], extra: list[str],  # noqa: ANN001
                 source: Path = REPO, tls: Certificates | None = None) -> None:
        self.port, self.admin_port = free_port(), free_port()
        self.pop3s_port = free_port() if tls else 0
        if tls:
            extra = ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--pop3s-port", str(self.pop3s_port),
                     *extra]
        self.admin = ("loadadmin", secrets.token_urlsafe(12))
        config = out / "server.toml"
        config.write_text("".join(f"{key} = {_toml(value)}\n" for key, value in settings.items()))
        (out / "server.log").unlink(missing_ok=True)
        self.server = Geventpop3Process(
            self.port, ["-L", "127.0.0.1", "-P", str(self.admin_port), "-d", str(pool.maildir),
                        "--users-file", str(pool.users_hashed), "--state-dir", str(out / "state"),
                        "--config", str(config), "-a", f"{self.admin[0]}:{self.admin[1]}", *extra],
            out / "server.log", cwd=source)

    def start(self) -> None:
        self.server.start()

    def pids(self) -> list[int]:
        return self.server.pids()

    def stop(self) -> None:
        self.server.stop()

    def locust_args(self) -> list[str]:
        return ["--msmp", f"127.0.0.1:{self.admin_port}", f"--msmp-user={self.admin[0]}",
                f"--msmp-password={self.admin[1]}"]  # the = form: a token may begin with "-"


class DovecotServer:
    """The private Dovecot POP3 peer (tools/dovecot-peer), for comparisons."""

    kind = "dovecot"

    def __init__(self, pool, out: Path, tools: Path, tls: Certificates | None = None) -> None:  # noqa: ANN001
        self.pool, self.out, self.tools = pool, out, tools
        self.port = free_port()
        self.pop3s_port = free_port() if tls else 0
        self.env = dict(os.environ)
        if tls:  # the peer script's TLS options: STLS on the port, implicit TLS on POP3S_PORT
            self.env.update(TLS_CERT=str(tls.cert), TLS_KEY=str(tls.key), POP3S_PORT=str(self.pop3s_port))
        self.rundir: Path | None = None

    def start(self) -> None:
        # Dovecot daemonizes with the script's stdout still open: read a file, not a pipe.
        output = self.out / "dovecot-start.txt"
        with open(output, "w") as handle:
            code = subprocess.run(["bash", str(self.tools / DOVECOT_START), str(self.port), str(self.pool.maildir),
                                   str(self.pool.users_plain)], stdout=handle, stderr=subprocess.STDOUT,
                                  timeout=600, env=self.env).returncode
        lines = output.read_text().strip().splitlines()
        if code != 0 or not lines:
            raise RuntimeError(f"dovecot peer did not start: {' '.join(lines[-3:])}")
        self.rundir = Path(lines[-1])
        wait_greeting(self.port, timeout=30)

    def pids(self) -> list[int]:
        try:
            master = int((self.rundir / "base" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, TypeError):
            return []
        return process_tree(master)

    def stop(self) -> None:
        if self.rundir is not None:
            subprocess.run(["bash", str(self.tools / DOVECOT_STOP), str(self.rundir)], capture_output=True,
                           timeout=120)
            with contextlib.suppress(OSError):
                shutil.copy(self.rundir / "dovecot.log", self.out / "dovecot.log")

    def locust_args(self) -> list[str]:
        return []


def _toml(value: str) -> str:
    try:
        float(value)
        return value
    except ValueError:
        return json.dumps(value)


# -- sampling ------------------------------------------------------------------------

CLOCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024




def proc_numbers(pid: int, pss: bool) -> tuple[int, float, int, int]:
    """(rss KiB, cpu seconds incl. reaped children, pss KiB or 0, open fds or 0) of one process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = sum(int(x) for x in fields[11:15]) / CLOCK  # utime stime cutime cstime
    rss = int(fields[21]) * PAGE_KB
    pss_kb = 0
    if pss:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss_kb = int(line.split()[1])
                break
    return rss, cpu, pss_kb, 0


def machine_busy() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat), to see other load on the machine."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return round((sum(fields[:8]) - idle) / CLOCK, 2)


def available_kb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 1 << 40


class Sampler(threading.Thread):
    """Once a second: server RSS, PSS, CPU, descriptors and processes; the load generator's CPU."""

    def __init__(self, server, path: Path, interval: float = 1.0) -> None:  # noqa: ANN001
        super().__init__(daemon=True)
        self.server, self.path, self.interval = server, path, interval
        self.rows: list[dict] = []
        self.stopped = threading.Event()
        self.locust_pid: int | None = None
        self.min_available_kb = 2 * 1024 * 1024
        self.low_memory = False

    def sample(self) -> dict:
        pids = self.server.pids() if self.server else []
        many = len(pids) > 50
        rss = pss = 0
        cpu = 0.0
        for pid in pids:
            with contextlib.suppress(OSError, IndexError, ValueError):
                r, c, p, _ = proc_numbers(pid, pss=True)
                rss, cpu, pss = rss + r, cpu + c, pss + p
        fds = 0
        for pid in pids if not many else ():  # every process of the server (--workers: the tree)
            with contextlib.suppress(OSError):
                fds += len(os.listdir(f"/proc/{pid}/fd"))
        gen_cpu = 0.0
        if self.locust_pid:
            for pid in process_tree(self.locust_pid):  # with --processes: the workers too
                with contextlib.suppress(OSError, IndexError, ValueError):
                    gen_cpu += proc_numbers(pid, pss=False)[1]
        return {"time": time.time(), "machine_busy_s": machine_busy(), "rss_kb": rss, "pss_kb": pss,
                "cpu_s": round(cpu, 2), "fds": fds,
                "processes": len(pids), "loadgen_cpu_s": round(gen_cpu, 2)}

    def run(self) -> None:
        while not self.stopped.is_set():
            started = time.monotonic()
            self.rows.append(self.sample())
            if self.locust_pid and available_kb() < self.min_available_kb and not self.low_memory:
                self.low_memory = True  # protect the machine: end the run early, it fails its gate
                with contextlib.suppress(OSError):
                    os.kill(self.locust_pid, signal.SIGTERM)
            self.stopped.wait(max(self.interval - (time.monotonic() - started), 0.05))

    def stop(self) -> None:
        self.stopped.set()
        self.join(30)
        if self.rows:
            with open(self.path, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(self.rows[0]))
                writer.writeheader()
                writer.writerows(self.rows)


# -- gates and reports -----------------------------------------------------------------

def read_stats(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _num(text: str | None) -> float | None:
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def gate(rows: list[dict], max_fail_ratio: float, max_p95: float) -> tuple[bool, list[str]]:
    """SPECmail-style verdict: (passed, reasons it failed)."""
    reasons = []
    gated = [r for r in rows if r["Type"] in GATED_TYPES]
    requests = sum(int(r["Request Count"]) for r in gated)
    failures = sum(int(r["Failure Count"]) for r in gated)
    if requests == 0:
        reasons.append("no requests were made")
    elif failures / requests > max_fail_ratio:
        reasons.append(f"{failures} of {requests} requests failed ({failures / requests:.2%} > {max_fail_ratio:.2%})")
    for row in gated:
        p95 = _num(row.get("95%"))
        if row["Type"] == "POP3" and p95 is not None and p95 / 1000 > max_p95:
            reasons.append(f"p95 of POP3 {row['Name']} is {p95 / 1000:.2f} s (> {max_p95:g} s)")
    return not reasons, reasons


def summarize(out: Path, rows: list[dict], samples: list[dict], suite: dict, args, passed: bool,
              reasons: list[str], baseline: dict | None, duration: float) -> dict:  # noqa: ANN001
    steps = {}
    for row in rows:
        if not row["Type"]:
            continue
        steps[f"{row['Type']} {row['Name']}"] = {
            "count": int(row["Request Count"]), "failures": int(row["Failure Count"]),
            "p50_ms": _num(row.get("50%")), "p95_ms": _num(row.get("95%")), "rps": _num(row.get("Requests/s")),
        }
    dd = steps.get("SESSION download-and-delete", {})
    result: dict = {"scenario": args.scenario, "server": args.server, "users": args.users,
                    "run_time": args.run_time, "passed": passed, "reasons": reasons, "steps": steps,
                    "dd_sessions_per_s": dd.get("rps"), "suite": suite, "duration_s": round(duration, 1)}
    if samples:
        # The steady state: from the moment every idle session was held (stress) to the stop;
        # else the last samples before the stop, when `held_at_stop` sessions were held.
        stop = suite.get("stopping_at") or samples[-1]["time"]
        before_stop = [s for s in samples if s["time"] <= stop] or samples
        if suite.get("held_complete_at"):
            steady = [s for s in before_stop if s["time"] >= suite["held_complete_at"]] or before_stop[-3:]
        else:
            steady = before_stop[-3:]
        # PSS wherever the server is several processes (Dovecot; geventpop3 with --workers):
        # summed RSS would count the pages they share once per process.
        several = max(s["processes"] for s in samples) > 1
        mem_key = "pss_kb" if args.server == "dovecot" or several else "rss_kb"
        result["server_rss_max_kb"] = max(s["rss_kb"] for s in samples)
        result["server_pss_max_kb"] = max(s["pss_kb"] for s in samples)
        result["server_fds_max"] = max(s["fds"] for s in samples)
        result["server_processes_max"] = max(s["processes"] for s in samples)
        span = samples[-1]["time"] - samples[0]["time"]
        if span > 0:
            result["server_cpu_percent"] = round(100 * (samples[-1]["cpu_s"] - samples[0]["cpu_s"]) / span, 1)
            result["loadgen_cpu_percent"] = round(
                100 * (samples[-1]["loadgen_cpu_s"] - samples[0]["loadgen_cpu_s"]) / span, 1)
            result["machine_cpu_percent"] = round(
                100 * (samples[-1]["machine_busy_s"] - samples[0]["machine_busy_s"]) / span, 1)
            result["machine_cores"] = os.cpu_count()
        if len(steady) > 1 and steady[-1]["time"] > steady[0]["time"]:
            result["server_cpu_percent_steady"] = round(
                100 * (steady[-1]["cpu_s"] - steady[0]["cpu_s"]) / (steady[-1]["time"] - steady[0]["time"]), 1)
        held = suite.get("held_at_stop") or 0
        if baseline and held and args.scenario in ("stress", "hold"):
            steady_mem = statistics.median(s[mem_key] for s in steady)
            result["memory_basis"] = mem_key
            result["memory_baseline_kb"] = baseline[mem_key]
            result["memory_steady_kb"] = steady_mem
            result["memory_per_held_session_kb"] = round((steady_mem - baseline[mem_key]) / held, 2)
        result["held_sessions"] = held
        result["held_max"] = suite.get("held_max")
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    (out / "summary.md").write_text(render(result))
    return result


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def render(result: dict) -> str:
    lines = [f"# {result['scenario']} against {result['server']}: {'PASS' if result['passed'] else 'FAIL'}", ""]
    lines += [f"- {reason}" for reason in result["reasons"]]
    for key in ("users", "run_time", "duration_s", "dd_sessions_per_s", "held_sessions", "held_max",
                "memory_per_held_session_kb", "memory_basis", "memory_baseline_kb", "memory_steady_kb",
                "server_rss_max_kb", "server_pss_max_kb", "server_fds_max", "server_processes_max",
                "server_cpu_percent", "server_cpu_percent_steady", "loadgen_cpu_percent", "machine_cpu_percent",
                "machine_cores"):
        if result.get(key) is not None:
            lines.append(f"- {key}: {result[key]}")
    lines += ["", "| step | count | failures | p50 ms | p95 ms | per s |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, step in result["steps"].items():
        lines.append(f"| {name} | {step['count']} | {step['failures']} | {_ms(step['p50_ms'])} | "
                     f"{_ms(step['p95_ms'])} | {_ms(step['rps'])} |")
    return "\n".join(lines) + "\n"


def median_report(results: list[dict]) -> str:
    """Medians over repeated runs of the headline numbers and of every step's p50/p95."""
    def med(values: list) -> float | None:
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 2) if values else None

    first = results[0]
    lines = [f"# {first['scenario']} against {first['server']}: medians of {len(results)} runs", "",
             f"- verdicts: {', '.join('PASS' if r['passed'] else 'FAIL' for r in results)}"]
    for key in ("dd_sessions_per_s", "held_sessions", "memory_per_held_session_kb", "server_rss_max_kb",
                "server_pss_max_kb", "server_cpu_percent", "server_cpu_percent_steady", "loadgen_cpu_percent",
                "machine_cpu_percent"):
        value = med([r.get(key) for r in results])
        if value is not None:
            lines.append(f"- {key}: {value} (runs: {', '.join(str(r.get(key)) for r in results)})")
    lines += ["", "| step | count (median) | p50 ms | p95 ms |", "| --- | ---: | ---: | ---: |"]
    for name in first["steps"]:
        steps = [r["steps"].get(name, {}) for r in results]
        lines.append(f"| {name} | {_ms(med([s.get('count') for s in steps]))} | "
                     f"{_ms(med([s.get('p50_ms') for s in steps]))} | {_ms(med([s.get('p95_ms') for s in steps]))} |")
    return "\n".join(lines) + "\n"


# -- one run ---------------------------------------------------------------------------

def _seconds(text: str) -> float:
    total, number = 0.0, ""
    for char in text:
        if char.isdigit() or char == ".":
            number += char
        else:
            total += float(number or 0) * {"s": 1, "m": 60, "h": 3600}.get(char, 1)
            number = ""
    return total + float(number or 0)


def run_once(args, out: Path) -> dict:  # noqa: ANN001
    out.mkdir(parents=True, exist_ok=True)
    scenario = SCENARIOS[args.scenario]
    pool_counts = dict(scenario.pool)
    if args.idle is not None:
        pool_counts["idle"] = args.idle
    if args.dd_users is not None:
        pool_counts["dd"] = args.dd_users
    if args.scenario not in ("stress", "hold"):
        for group in pool_counts:
            pool_counts[group] = max(pool_counts[group], args.users)
    pool = ensure_pool(Path(args.pool), pool_counts)
    classes = list(scenario.classes)
    server = None
    tls = _certificate(args, out)
    if args.server == "geventpop3":
        # Every load client connects from 127.0.0.1: the per-address cap is lifted with the global one.
        settings = {"max_connections": "20000", "max_connections_per_ip": "20000", "log_level": args.log_level,
                    "login_failure_delay": "0.05"}
        settings.update(dict(item.split("=", 1) for item in args.set))
        server = Geventpop3Server(pool, out, settings, args.server_arg, Path(args.server_source).resolve(), tls)
    elif args.server == "dovecot":
        server = DovecotServer(pool, out, Path(args.tools), tls)
        classes = [c for c in classes if c != "AdminWatcherUser"]  # Dovecot has no MSMP
    host = args.host
    if server is not None:
        server.start()
        host = f"pop3://127.0.0.1:{server.pop3s_port if args.tls == 'implicit' else server.port}"
    sampler = Sampler(server, out / "samples.csv")
    fixed = []
    if args.scenario in ("stress", "hold"):
        idle = pool_counts.get("idle", 0)
        fixed.append(f"IdleHolderUser={idle}")
        if "DownloadDeleteUser" in classes:
            fixed.append(f"DownloadDeleteUser={pool_counts.get('dd', 0)}")
        users = idle + (pool_counts.get("dd", 0) if "DownloadDeleteUser" in classes else 0)
    else:
        users = args.users
    if "AdminWatcherUser" in classes:
        users += 1  # its fixed_count of 1 comes on top of the weighted users
    suite_file = out / "suite.json"
    command = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless",
               "-u", str(users), "-r", str(args.spawn_rate), "-t", args.run_time, "--host", host,
               "--pool", str(pool.root), "--csv", str(out / "locust"), "--csv-full-history",
               "--html", str(out / "report.html"), "--only-summary", "--stop-timeout", "10",
               "--summary-file", str(suite_file), "--loglevel", "WARNING", *scenario.locust_args]
    if fixed:
        command += ["--fixed", ",".join(fixed)]
    if args.scenario == "stress":
        # Figures of the steady state: from the moment every idle session is held (one process),
        # else from the end of spawning (Locust's own reset, which --processes supports).
        command += ["--reset-stats"] if args.processes else ["--reset-when-held", str(pool_counts.get("idle", 0))]
    if args.processes:
        command += ["--processes", str(args.processes), "--pool-shards", str(args.processes)]
    if args.no_refill:
        command.append("--no-refill")
    if server is not None:
        command += server.locust_args()
    if args.tls != "none":
        command += ["--tls", args.tls]
        cacert = tls.ca if tls is not None and not args.cacert else args.cacert
        if cacert:
            command += ["--cacert", str(cacert)]
    command += args.locust_arg + classes
    baseline = None
    started = time.time()
    try:
        if server is not None:
            time.sleep(1.0)  # let start-up allocations settle before the baseline
            baseline = sampler.sample()
            sampler.start()
        with open(out / "locust.log", "wb") as log:
            locust = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
            sampler.locust_pid = locust.pid
            limit = _seconds(args.run_time) + users / max(args.spawn_rate, 1) + 120
            try:
                code = locust.wait(limit)
            except subprocess.TimeoutExpired:
                locust.kill()
                code = locust.wait()
                raise RuntimeError(f"locust did not finish within {limit:.0f} s") from None
    finally:
        if server is not None:
            sampler.stop()
            server.stop()
    duration = time.time() - started
    if code not in (0, 1) or not (out / "locust_stats.csv").exists():
        raise RuntimeError(f"locust failed (exit {code}); see {out / 'locust.log'}")
    rows = read_stats(out / "locust_stats.csv")
    suite = json.loads(suite_file.read_text()) if suite_file.exists() else {}
    passed, reasons = gate(rows, args.max_fail_ratio, args.max_p95)
    if sampler.low_memory:
        passed = False
        reasons.append("stopped early: the machine ran low on memory")
    return summarize(out, rows, sampler.rows, suite, argparse.Namespace(**{**vars(args), "users": users}), passed,
                     reasons, baseline, duration)


def _certificate(args, out: Path) -> Certificates | None:  # noqa: ANN001
    """The local server's certificate for a TLS run: the one given, or a throw-away one in out/tls."""
    if args.tls == "none" or args.server == "none":
        return None
    if args.tls_cert:
        cert = Path(args.tls_cert)
        return Certificates(Path(args.cacert or cert), cert, Path(args.tls_key or cert))
    return make_certificates(out / "tls", rsa=True)  # RuntimeError without trustme


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--scenario", choices=sorted(SCENARIOS), default="mixed")
    add("--users", "-u", type=int, help="simulated users (not for stress/hold: see --idle and --dd-users)")
    add("--spawn-rate", "-r", type=float, help="users started per second")
    add("--run-time", "-t", help="e.g. 30s, 2m")
    add("--idle", type=int, help="held sessions in the stress/hold scenarios (default 10000)")
    add("--dd-users", type=int, help="download-and-delete users in the stress scenario (default 50)")
    add("--server", choices=["geventpop3", "dovecot", "none"], default="geventpop3",
        help="start this server locally (none: use --host)")
    add("--host", default="", help="pop3://HOST:PORT of a server you run (with --server none)")
    add("--pool", default="", help="pool directory (default: /tmp/geventpop3-loadtest-pool)")
    add("--out", required=True, type=Path, help="report folder")
    add("--repeat", type=int, default=1, help="runs; summary.md then holds the medians")
    add("--max-fail-ratio", type=float, default=0.01, help="gate: failed/total requests (default 0.01)")
    add("--max-p95", type=float, default=5.0, help="gate: seconds for the p95 of any POP3 step (default 5)")
    add("--processes", type=int, default=0, help="Locust load-generator processes (Locust's --processes)")
    add("--no-refill", action="store_true", help="do not re-deliver mail (the server's disk is elsewhere)")
    add("--log-level", default="WARNING", help="geventpop3 log level during the run")
    add("--set", action="append", default=[], metavar="KEY=VALUE", help="geventpop3 setting for the run")
    add("--server-source", default=str(REPO), help="run geventpop3 from this source tree (e.g. a patched copy)")
    add("--server-arg", action="append", default=[], help="extra geventpop3 flag")
    add("--locust-arg", action="append", default=[], help="extra Locust argument")
    add("--tls", choices=["none", "implicit", "starttls"], default="none",
        help="POP3 over TLS: implicit (POP3S port) or STLS on the plain port")
    add("--cacert", default="", help="CA file the clients verify the server with (default: the throw-away CA)")
    add("--tls-cert", default="", help="certificate chain of the local server (default: a throw-away one)")
    add("--tls-key", default="", help="its key (default: the certificate file)")
    add("--tools", default=str(REPO / "tools" / "dovecot-peer"), help="folder of the Dovecot peer scripts")
    args = parser.parse_args(argv)
    scenario = SCENARIOS[args.scenario]
    args.users = args.users or scenario.users
    args.spawn_rate = args.spawn_rate or scenario.spawn_rate
    args.run_time = args.run_time or scenario.run_time
    args.pool = args.pool or "/tmp/geventpop3-loadtest-pool"
    if args.server == "none" and not args.host:
        parser.error("--server none needs --host pop3://HOST:PORT")
    if args.repeat < 1 or args.repeat > 10:
        parser.error("--repeat must be 1..10")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = []
    for number in range(1, args.repeat + 1):
        out = args.out if args.repeat == 1 else args.out / f"run{number}"
        try:
            result = run_once(args, out)
        except RuntimeError as exc:
            print(f"run {number}: error: {exc}", file=sys.stderr)
            return 2
        results.append(result)
        print((out / "summary.md").read_text())
    if args.repeat > 1:
        text = median_report(results)
        (args.out / "summary.md").write_text(text)
        print(text)
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
